#!/usr/bin/env python3
"""oxmgr.py: a process manager in one file, standard library only.

It keeps apps alive (restart on crash, backoff, crash-loop cut-off), keeps
their logs (rotated by rename while they run, no line lost), and answers a
command line compatible with Oxmgr and familiar to PM2 users. A per-user
daemon owns the processes; the CLI talks to it over a private Unix socket.

Usage:
    python3 oxmgr.py start "node server.js" --name api
    python3 oxmgr.py list
    python3 oxmgr.py logs api -f
    python3 oxmgr.py --help

Python 3.8 or newer. Linux is the tested platform; macOS uses the same POSIX
code. Every difference between platforms lives in one driver (section 6):
the Windows driver has the same methods, and says where Windows is not
supported yet.

The daemon and `runtime` run on asyncio, imported lean (ssl blocked while it
loads); the CLI never imports it. Each app is a pure state machine (section
11) that decides, and an async runtime (section 12) that carries the
decisions out. Async code lives in sections 12 to 15 only; sections 16 to 19
(client, boot services, CLI) are synchronous and never touch asyncio.

Sections (``grep -n '^# [0-9]\\+\\. ' oxmgr.py``):
     1. Header
     2. Constants and defaults
     3. Errors
     4. Small utilities
     5. Process table: parsers and CPU/memory sampling (pure)
     6. Platform drivers: every POSIX/Windows difference
     7. Config model
     8. Config files: oxfile.toml and PM2 ecosystem files
     9. State store, logs and the line framer
    10. IPC protocol
    11. App state machine (pure: decisions, no I/O)
    12. App runtime (async): one run of one child, the app, its rules
    13. Engine: every app, persistence, metrics, events
    14. Daemon: requests, the control server, recovery, shutdown
    15. Foreground runtime: PID 1 for containers
    16. Client (sync)
    17. Boot services and the launcher
    18. CLI
    19. Entry point
"""

# =============================================================================
# 1. Header
# =============================================================================

import collections
import errno
import os
import signal
import socket
import sys
import time

__version__ = "0.2.0"
__all__ = [
    "main", "run_daemon", "__version__", "AppSpec", "OxmgrError", "ConfigError", "UsageError",
    "ProcessNotFound", "DuplicateProcess", "DaemonNotRunning", "DaemonAlreadyRunning",
    "IpcError", "SpawnError", "StateError", "load_config",
]

# =============================================================================
# 2. Constants and defaults
# =============================================================================

ENV_HOME = "OXMGR_HOME"
ENV_DAEMON_ADDR = "OXMGR_DAEMON_ADDR"
ENV_ALLOW_REMOTE = "OXMGR_DAEMON_ALLOW_REMOTE"
ENV_LOG_MAX_SIZE_MB = "OXMGR_LOG_MAX_SIZE_MB"
ENV_LOG_MAX_FILES = "OXMGR_LOG_MAX_FILES"
ENV_LOG_MAX_DAYS = "OXMGR_LOG_MAX_DAYS"

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20            # a request before it is trusted (TCP: until its token); longer ones are refused
MAX_REQUEST_BYTES = 64 << 20         # a request on a trusted connection (a start of thousands of apps)
LOG_FRAME_LINES = 2000               # a logs reply goes out in frames of this many lines at most...
LOG_FRAME_BYTES = 1 << 20            # ... and about this many bytes
STRANGERS_MAX = 64                   # TCP connections yet to show the token; a newer one evicts the oldest
STRANGER_DEADLINE_S = 3.0            # ... and how long one may take to show it
STREAM_HIGH_WATER = 8 << 20          # a follower further behind than this is dropped
CLIENT_TIMEOUT_S = 15.0              # quick requests (list, status, ping)
CLIENT_LONG_TIMEOUT_S = 600.0        # requests that wait for processes to stop
DAEMON_BOOT_TIMEOUT_S = 10.0
DAEMON_LOG_MAX_BYTES = 10 << 20      # daemon.log is moved to daemon.log.1 past this, at daemon start

DEFAULT_NAMESPACE = "default"
DEFAULT_RESTART_POLICY = "on-failure"
DEFAULT_MAX_RESTARTS = 10
DEFAULT_MIN_UPTIME_S = 1.0
DEFAULT_STOP_TIMEOUT_S = 5.0
DEFAULT_STOP_SIGNAL = "SIGTERM"
DEFAULT_BACKOFF_BASE_S = 0.1         # exponential backoff start when restart_delay is 0
DEFAULT_BACKOFF_MAX_S = 15.0         # PM2's cap for exp_backoff_restart_delay
DEFAULT_BACKOFF_FACTOR = 2.0
BACKOFF_JITTER = 0.1                 # +/- 10 % so a fleet does not restart in lockstep
CRASH_WINDOW_S = 300.0               # crash_restart_limit counts restarts in this window
DEFAULT_INSTANCE_VAR = "NODE_APP_INSTANCE"
DEFAULT_HEALTH_INTERVAL_S = 30.0
DEFAULT_HEALTH_TIMEOUT_S = 5.0
DEFAULT_HEALTH_MAX_FAILURES = 3
DEFAULT_READY_TIMEOUT_S = 30.0
DEFAULT_WATCH_DELAY_S = 1.0
NODE_EVAL_TIMEOUT_S = 15.0           # evaluating an ecosystem.config.js with node
CONFIG_SUFFIXES = (".toml", ".json", ".json5", ".js", ".cjs", ".mjs")
DEFAULT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
STDERR_TAIL_LINES = 20               # last stderr lines kept for crash reports

MAX_NAME_BYTES = 240                 # NAME_MAX is 255 bytes: room for ".out.log.NN"
MAX_DURATION_S = 365 * 86400.0      # longer settings are typos, and timers past this overflow
MAX_SIZE_BYTES = 1 << 40

DEFAULT_LOG_MAX_SIZE_MB = 20.0
DEFAULT_LOG_MAX_FILES = 5
DEFAULT_LOG_MAX_DAYS = 14.0
DEFAULT_LOG_LINES = 100

TICK_S = 1.0                         # safety-net reconcile tick
METRICS_INTERVAL_S = 2.0             # OXMGR_METRICS_INTERVAL changes it
CPU_LIMIT_SAMPLES = 3                # max_cpu_percent: samples in a row over the limit before a restart
ENV_METRICS_INTERVAL = "OXMGR_METRICS_INTERVAL"
WATCH_IGNORED_NAMES = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", ".tox"})
READ_CHUNK = 1 << 16
CHATTY_PIPE_BYTES = 1 << 20          # an app that fills its 64 KiB pipe gets this much (pipe-max-size)
CHATTY_READS = 8                     # full-pipe reads before the pipe is grown
MAX_LINE_BYTES = 1 << 16             # a line longer than this is passed on in pieces
DRAIN_GRACE_S = 0.05                 # after an exit, how long output may still arrive (a grandchild holds the pipe)
KILL_WAIT_S = 10.0                   # after SIGKILL, how long before a process counts as stuck in the kernel

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130

RESTART_POLICIES = ("always", "on-failure", "never")

# Interpreters picked by file extension, as PM2 does for `pm2 start app.js`.
# "python" means the interpreter that runs the CLI.
INTERPRETERS = {
    ".js": "node", ".mjs": "node", ".cjs": "node",
    ".py": "python", ".sh": "sh", ".bash": "bash",
    ".rb": "ruby", ".php": "php", ".pl": "perl",
}

# Commands whose script argument names the app better than the program does.
_SCRIPT_RUNNERS = frozenset({
    "node", "nodejs", "bun", "deno", "python", "python3", "python2", "pypy3",
    "sh", "bash", "dash", "zsh", "ruby", "php", "perl", "uv", "npx", "tsx", "ts-node",
})

# =============================================================================
# 3. Errors
# =============================================================================


class OxmgrError(Exception):
    """Base of every error the user can see; the CLI turns it into an exit code."""

    exit_code = EXIT_ERROR


class UsageError(OxmgrError):
    """Raised when a flag or argument cannot be used as given."""

    exit_code = EXIT_USAGE


class ConfigError(OxmgrError):
    """Raised when an app definition is invalid; names the file, app and key."""


class ProcessNotFound(OxmgrError):
    """Raised when a target matches no managed process."""

    def __init__(self, target):
        super().__init__(target)
        self.target = target

    def __str__(self):
        return f"process not found: {self.target}"


class DuplicateProcess(OxmgrError):
    """Raised when a start would create a second app with the same name."""


class DaemonNotRunning(OxmgrError):
    """Raised when a command needs the daemon and it is not running."""


class DaemonAlreadyRunning(OxmgrError):
    """Raised by `daemon run` when another daemon holds the lock."""


class IpcError(OxmgrError):
    """Raised when a request or reply on the control socket is malformed."""


class SpawnError(OxmgrError):
    """Raised when a process cannot be started (not found, not executable)."""

    def __init__(self, message, code=EXIT_ERROR):
        super().__init__(message)
        self.code = code


class StateError(OxmgrError):
    """Raised when state.json cannot be read as oxmgr state."""


_ERROR_TYPES = {cls.__name__: cls for cls in (
    OxmgrError, UsageError, ConfigError, DuplicateProcess, DaemonNotRunning,
    DaemonAlreadyRunning, IpcError, SpawnError, StateError)}
# =============================================================================
# 4. Small utilities
# =============================================================================

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def _scaled_number(value, units, default_unit, expected, limit):
    """Return number * units[unit] for "1.5m", "150M" or a bare number, at most `limit`; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), default_unit
    else:
        text = str(value).strip().lower()
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):].strip() or default_unit
        try:
            number = float(digits)
        except ValueError:
            number = -1.0
    if unit not in units or number != number or number < 0 or number * units[unit] > limit:
        raise ValueError(f"expected {expected}, got {value!r}")
    return number * units[unit]


def parse_duration(value, default_unit="s"):
    """Return seconds for "500ms", "2s", "1.5m", "3h" or a bare number.

    A bare number is in `default_unit` ("s", or "ms" for PM2 files).
    """
    return _scaled_number(value, _DURATION_UNITS, default_unit, "a duration like '5s' or '500ms', up to 365d",
                          MAX_DURATION_S)


def parse_size(value):
    """Return bytes for "150M", "1G", "512K", "2048" (bytes) and the like."""
    return int(_scaled_number(value, _SIZE_UNITS, "", "a size like '200M', up to 1024G", MAX_SIZE_BYTES))


def format_bytes(n):
    """Return a short human size: 512B, 1.5K, 20.3M, 1.1G."""
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024.0
    return f"{n:.1f}G"  # pragma: no cover


def format_uptime(seconds):
    """Return 45s, 3m, 2h, 4d: the largest whole unit, as PM2 shows it."""
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_duration(seconds):
    """Return a compact duration for settings: 0s, 1.5s, 500ms, 5m."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def parse_signal(value):
    """Return the signal number for "SIGTERM", "TERM", "term" or "15"."""
    text = str(value).strip().upper()
    if text.isdigit():
        number = int(text)
        if 0 < number < getattr(signal, "NSIG", 65):
            return number
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        number = getattr(signal, name, None)
        if isinstance(number, int) and not name.startswith(("SIG_", "SIGRT")):
            return int(number)
    raise ValueError(f"unknown signal {value!r}; use a name like SIGTERM or SIGINT")


def signal_name(signum):
    """Return "SIGTERM" for 15; "signal 40" when the number has no name."""
    try:
        return signal.Signals(signum).name  # of aliases (SIGIOT, SIGCLD) the enum keeps the usual name
    except ValueError:
        return f"signal {signum}"


def decode_wait_status(status):
    """Split a waitpid() status into (exit_code, signal_number); one is None."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None  # pragma: no cover  (stopped/continued are not requested)


def describe_exit(code, signum):
    """Return "exited with code 1" or "killed by SIGKILL"."""
    if signum is not None:
        return f"killed by {signal_name(signum)}"
    if code is not None:
        return f"exited with code {code}"
    return "-"


def exit_code_number(code, signum):
    """Return one int for an exit: the code, or 128 + signum as sh/bash do."""
    if signum is not None:
        return 128 + signum
    return code if code is not None else 0


def atomic_write(path, data, backup=None, sync=True):
    """Write bytes to `path` so a reader sees the old file or the new, never half.

    Writes a temp file, fsyncs it and renames it over `path`. With `backup`,
    the previous file is first hard-linked there, so a good copy always exists.
    sync=False leaves the fsyncs to a later sync_file(): the rename alone
    survives our own death, only a power loss needs them.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quiet(tmp)  # a full disk must not also leave the half-written copy behind
        raise
    if backup is not None:
        try:
            link_tmp = f"{backup}.tmp{os.getpid()}"
            try:
                os.unlink(link_tmp)
            except FileNotFoundError:
                pass
            os.link(path, link_tmp)
            os.replace(link_tmp, backup)
        except FileNotFoundError:
            pass  # first write: nothing to keep yet
        except OSError:
            pass  # filesystems without hard links: the rename below is still atomic
    os.replace(tmp, path)
    if sync:
        _fsync_dir(os.path.dirname(path) or ".")


def sync_file(path):
    """fsync a file and its directory (after an atomic_write with sync=False)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(os.path.dirname(path) or ".")


def close_fd(fd):
    """Close a descriptor, ignoring one that is already closed (or None)."""
    try:
        if fd is not None:
            os.close(fd)
    except OSError:
        pass


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path):
    """Make a rename durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover  (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def random_unit():
    """Return a float in [0, 1) from os.urandom.

    random imports hashlib, and with it OpenSSL: ~4 MiB of daemon RSS for a jitter.
    """
    return int.from_bytes(os.urandom(7), "big") / float(1 << 56)


# json and shlex import re (~4 ms): they load on first use, so the daemon's
# socket listens before them (boot is counted until it accepts).


def to_json(value, sort_keys=False, indent=None):
    """Return JSON text: compact, as every frame and state file is written, or indented (--json)."""
    import json
    if indent:
        return json.dumps(value, indent=indent)
    return json.dumps(value, separators=(",", ":"), sort_keys=sort_keys)


def from_json(text):
    """Parse JSON text; ValueError (json's own, with line and column) when it is not JSON."""
    import json
    return json.loads(text)


def split_words(text):
    """Split text into words as a POSIX shell would (quotes, backslashes)."""
    import shlex
    return shlex.split(text)


def join_words(words):
    """Join words into one line that split_words() gives back."""
    import shlex
    return shlex.join(words)


# Characters that only a shell gives meaning to. A command containing any of
# them outside single quotes runs under /bin/sh -c; anything else is exec'd.
_SHELL_CHARS = frozenset("|&;<>()$`*?[\n")


def needs_shell(command):
    """Return True when `command` uses shell syntax (pipes, $VAR, globs...)."""
    quote = None
    escaped = False
    at_word_start = True
    for ch in command:
        if escaped:
            escaped = False
            at_word_start = False
            continue
        if quote == "'":
            if ch == "'":
                quote = None
            continue
        if ch == "\\":
            escaped = True
            continue
        if quote == '"':
            if ch == '"':
                quote = None
            elif ch in "$`":
                return True
            continue
        if ch in "'\"":
            quote = ch
            at_word_start = False
            continue
        if ch in _SHELL_CHARS or (at_word_start and ch in "#~"):
            return True
        at_word_start = ch in " \t"
    first = command.strip().split(None, 1)
    if first and "=" in first[0] and first[0].split("=", 1)[0].isidentifier():
        return True  # VAR=value cmd
    return False


def split_command(command, shell):
    """Return the argv for a command string: shlex rules, or `shell` + [command] for shell syntax."""
    if needs_shell(command):
        return list(shell) + [command]
    try:
        argv = split_words(command)
    except ValueError as exc:
        raise ValueError(f"cannot split command {command!r}: {exc}") from None
    if not argv:
        raise ValueError("empty command")
    return argv


def _moment_to_strftime(fmt):
    """Translate a PM2 (moment.js) date format like 'YYYY-MM-DD HH:mm:ss Z'."""
    if "%" in fmt:
        return fmt
    tokens = (("YYYY", "%Y"), ("YY", "%y"), ("MMMM", "%B"), ("MMM", "%b"), ("MM", "%m"),
              ("DD", "%d"), ("Do", "%d"), ("dddd", "%A"), ("ddd", "%a"), ("HH", "%H"),
              ("hh", "%I"), ("mm", "%M"), ("ss", "%S"), ("SSS", "%f"), ("A", "%p"),
              ("ZZ", "%z"), ("Z", "%z"))
    out = []
    i = 0
    while i < len(fmt):
        for token, repl in tokens:
            if fmt.startswith(token, i):
                out.append(repl)
                i += len(token)
                break
        else:
            out.append(fmt[i])
            i += 1
    return "".join(out)


def format_timestamp(fmt, when=None):
    """Format a log timestamp; %f (moment's SSS) is cut to milliseconds."""
    when = time.time() if when is None else when
    if "%f" in fmt:
        millis = "%03d" % int((when % 1) * 1000)
        fmt = fmt.replace("%f", millis)
    return time.strftime(fmt, time.localtime(when))


def _colour_on(stream):
    """Colour on a terminal, unless NO_COLOR is set (no-color.org)."""
    try:
        return stream.isatty() and "NO_COLOR" not in os.environ
    except (AttributeError, ValueError, OSError):
        return False


def _paint(text, code, enabled):
    return f"\033[{code}m{text}\033[0m" if enabled and code else text


def env_flag(name):
    """Return True when an environment variable is set to a true-looking value."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def split_host_port(text):
    """Split "host:port" or "[::1]:port" into (host, port); ValueError says the expected form."""
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port like 127.0.0.1:3000, got {text!r}")
    return host, int(port)


# =============================================================================
# 5. Process table: parsers and CPU/memory sampling (pure)
# =============================================================================

class ProcStats:
    """One process as seen in the process table (times in clock ticks)."""

    __slots__ = ("pid", "ppid", "pgid", "sid", "state", "cpu_ticks", "start_ticks", "rss_bytes")

    def __init__(self, pid, ppid, pgid, sid, state, cpu_ticks, start_ticks, rss_bytes):
        self.pid = pid
        self.ppid = ppid
        self.pgid = pgid
        self.sid = sid
        self.state = state            # R, S, D, Z...; a zombie holds no memory
        self.cpu_ticks = cpu_ticks    # utime + stime
        self.start_ticks = start_ticks  # since boot; with pid, identifies the process
        self.rss_bytes = rss_bytes

    def __repr__(self):
        return f"ProcStats(pid={self.pid}, ppid={self.ppid}, pgid={self.pgid}, state={self.state!r})"


def _parse_proc_stat(text, page_bytes=4096):
    """Parse the text of /proc/<pid>/stat into ProcStats, or None if malformed.

    The comm field is in parentheses and may itself contain spaces and
    parentheses, so split at the *last* ')'.
    """
    left = text.find("(")
    right = text.rfind(")")
    if left < 0 or right < left:
        return None
    try:
        pid = int(text[:left])
        fields = text[right + 2:].split()
        # fields[0] is field 3 (state) of proc(5)
        return ProcStats(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), sid=int(fields[3]),
                         state=fields[0], cpu_ticks=int(fields[11]) + int(fields[12]),
                         start_ticks=int(fields[19]), rss_bytes=int(fields[21]) * page_bytes)
    except (ValueError, IndexError):
        return None


def _parse_ps_output(text):
    """Parse `ps -A -o pid=,ppid=,pgid=,sess=,state=,time=,rss=,lstart=`-like text.

    Used where there is no /proc (macOS, BSD). cpu time is [[dd-]hh:]mm:ss,
    rss is KiB; the start time is kept as the remaining text's hash-free form.
    """
    table = {}
    for line in text.splitlines():
        parts = line.split(None, 7)
        if len(parts) < 7:
            continue
        try:
            pid, ppid, pgid, sid = (int(p) for p in parts[:4])
            cpu_s = _parse_ps_time(parts[5])
            rss = int(parts[6]) * 1024
        except ValueError:
            continue
        start = parts[7].strip() if len(parts) > 7 else ""
        table[pid] = ProcStats(pid, ppid, pgid, sid, parts[4][:1], int(cpu_s * 100),
                               _stable_number(start), rss)
    return table


def _parse_ps_time(text):
    """Return seconds for ps's [[dd-]hh:]mm:ss[.cc] cpu time."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    total = 0.0
    for part in text.split(":"):
        total = total * 60 + float(part)
    return days * 86400 + total


def _stable_number(text):
    """Return a deterministic integer for a string (Python's hash() is salted)."""
    n = 0
    for ch in text.encode():
        n = (n * 131 + ch) & 0xFFFFFFFFFFFF
    return n


def tree_members(table, root_pid, sid=None):
    """Return the pids of root_pid's tree: its descendants and its session.

    Each app runs in its own session, so session members that were reparented
    to init (a daemonizing grandchild) still count toward the app.
    """
    children = {}
    for st in table.values():
        children.setdefault(st.ppid, []).append(st.pid)
    seen = set()
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    if sid:
        seen.update(st.pid for st in table.values() if st.sid == sid)
    return seen


class TreeSampler:
    """Turn successive process tables into CPU% and RSS per process tree."""

    def __init__(self, ticks_per_s, clock=time.monotonic):
        self._clock = clock
        self._hz = ticks_per_s
        self._last_at = None
        self._last_ticks = {}   # pid -> (start_ticks, cpu_ticks) at the last sample

    def sample(self, roots, table):
        """Return {root_pid: (cpu_percent, rss_bytes)} for the given roots.

        `roots` maps a root pid to its session id (or None); `table` is
        {pid: ProcStats}, the driver's process_table().
        """
        now = self._clock()
        elapsed = (now - self._last_at) if self._last_at is not None else None
        result = {}
        seen_ticks = {}
        for root, sid in roots.items():
            cpu_delta = 0
            rss = 0
            for pid in tree_members(table, root, sid):
                st = table[pid]
                seen_ticks[pid] = (st.start_ticks, st.cpu_ticks)
                if st.state != "Z":
                    rss += st.rss_bytes
                prev = self._last_ticks.get(pid)
                if prev is not None and prev[0] == st.start_ticks:
                    cpu_delta += max(0, st.cpu_ticks - prev[1])
                elif elapsed is not None:
                    cpu_delta += st.cpu_ticks  # new since the last sample
            cpu = None
            if elapsed:
                cpu = round(100.0 * cpu_delta / self._hz / elapsed, 1)
            result[root] = (cpu, rss)
        self._last_at = now
        self._last_ticks = seen_ticks
        return result

# =============================================================================
# 6. Platform drivers: every POSIX/Windows difference lives here, nowhere else
# =============================================================================
#
# One class per platform, the same methods in each, chosen once at import
# (CPython's subprocess.py and honcho's compat.py split the same way): no call
# site asks which OS it runs on, and a test hands the engine a fake driver.
# A process tree is named by its leader's pid: on POSIX that is its process
# group (every app gets its own session); on Windows, its job object.

_WINDOWS = os.name == "nt"
_LINUX = sys.platform.startswith("linux")
_DARWIN = sys.platform == "darwin"
if _WINDOWS:  # pragma: no cover
    import msvcrt
else:
    import fcntl
    import resource

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class Child:
    """A spawned app process and the read ends of its stdout and stderr pipes."""

    __slots__ = ("pid", "stdout", "stderr", "popen", "start_ticks", "gate")

    def __init__(self, pid, stdout, stderr, popen=None, start_ticks=None, gate=None):
        self.pid = pid
        self.stdout = stdout          # binary file objects: the pipes' read ends
        self.stderr = stderr
        self.popen = popen
        self.start_ticks = start_ticks  # with the pid, proves identity after a daemon restart
        self.gate = gate              # fd the gated child waits on (see Driver.spawn)

    def release(self):
        """Let a gated child run (it is recorded now); closing the gate unwritten makes it exit."""
        gate, self.gate = self.gate, None
        if gate is not None:
            try:
                os.write(gate, b"\n")
            except OSError:
                pass  # it is gone already: its exit is reaped as usual
            close_fd(gate)

    def reaped(self, returncode):
        """Tell Popen the process is gone, so it never waits for a pid that may be reused."""
        if self.popen is not None:
            self.popen.returncode = returncode


def _which_in(program, path):
    """Find an executable on a PATH string (shutil.which drags in bz2 and lzma)."""
    for directory in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _spawn_error(exc, argv, cwd):
    """Turn what Popen raised into the SpawnError a user can act on (127: not found, 126: not executable)."""
    if isinstance(exc, FileNotFoundError):
        if cwd and exc.filename == cwd:
            return SpawnError(f"cwd does not exist: {cwd!r}", EXIT_NOT_FOUND)
        return SpawnError(f"command not found: {argv[0]!r}", EXIT_NOT_FOUND)
    if isinstance(exc, PermissionError):
        return SpawnError(f"permission denied: {argv[0]!r} is not executable", EXIT_NOT_EXECUTABLE)
    if isinstance(exc, NotADirectoryError):
        return SpawnError(f"cwd is not a directory: {cwd!r}", EXIT_NOT_FOUND)
    return SpawnError(f"cannot start {argv[0]!r}: {exc.strerror or exc}", EXIT_NOT_EXECUTABLE)


class _Reaper:
    """Collect exited children on SIGCHLD and hand each wait status to its owner.

    With reap_all (the daemon and PID 1), waitpid(-1) also reaps orphans
    reparented to us; otherwise only registered pids are waited for, so an
    engine can run inside a test process without stealing its children.
    asyncio's own child watchers neither reap orphans nor scale (one thread
    per child on 3.8-3.11), so this one is ours.
    """

    def __init__(self, loop, reap_all):
        self.reap_all = reap_all
        self._loop = loop
        self._callbacks = {}
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def watch(self, pid, callback):
        self._callbacks[pid] = callback

    def reap(self):
        """Reap every exited child now (also the safety-net tick)."""
        if self.reap_all:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                self._dispatch(pid, status)
        for pid in list(self._callbacks):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, None  # someone else reaped it; the exit status is lost
            if got:
                self._dispatch(pid, status)

    def _dispatch(self, pid, status):
        callback = self._callbacks.pop(pid, None)
        if callback is not None:
            code, signum = decode_wait_status(status) if status is not None else (None, None)
            callback(code, signum)

    def close(self):
        self._loop.remove_signal_handler(signal.SIGCHLD)


class _Inotify:
    """A directory watch (inotify(7), through libc): changes as events, no polling."""

    _MODIFY, _ATTRIB, _CLOSE_WRITE, _MOVED_FROM, _MOVED_TO = 0x2, 0x4, 0x8, 0x40, 0x80
    _CREATE, _DELETE, _DELETE_SELF, _MOVE_SELF = 0x100, 0x200, 0x400, 0x800
    _Q_OVERFLOW, _IGNORED, _ONLYDIR, _ISDIR = 0x4000, 0x8000, 0x01000000, 0x40000000
    _MASK = _MODIFY | _ATTRIB | _CLOSE_WRITE | _MOVED_FROM | _MOVED_TO | _CREATE | _DELETE | _DELETE_SELF | _MOVE_SELF

    def __init__(self):
        import ctypes
        self._ctypes = ctypes
        libc = self._libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")

    def fileno(self):
        return self.fd

    def add(self, directory):
        """Watch one directory; return the watch id or raise OSError."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), self._MASK | self._ONLYDIR)
        if wd < 0:
            err = self._ctypes.get_errno()
            raise OSError(err, os.strerror(err), directory)
        return wd

    def remove(self, wd):
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self):
        """Return [(wd, name, kind)]: kind is "change", "new_dir", "gone" (watch ended) or "overflow"."""
        try:
            data = os.read(self.fd, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return []
        out = []
        for wd, mask, _cookie, name in _parse_inotify(data):
            if mask & self._Q_OVERFLOW:
                kind = "overflow"
            elif mask & self._IGNORED:
                kind = "gone"
            elif mask & self._ISDIR and mask & (self._CREATE | self._MOVED_TO):
                kind = "new_dir"
            else:
                kind = "change"
            out.append((wd, name, kind))
        return out

    def close(self):
        close_fd(self.fd)


def _parse_inotify(data):
    """Split a read() of an inotify fd into (wd, mask, cookie, name) tuples."""
    import struct
    events = []
    offset = 0
    while offset + 16 <= len(data):
        wd, mask, cookie, length = struct.unpack_from("iIII", data, offset)
        name = data[offset + 16:offset + 16 + length].split(b"\0", 1)[0]
        events.append((wd, mask, cookie, os.fsdecode(name)))
        offset += 16 + length
    return events


class Driver:
    """What the engine asks of a platform, with the answers most platforms share.

    PosixDriver (and LinuxDriver) and WindowsDriver fill in the rest; every
    call site uses DRIVER, or the driver an engine was given (a fake in tests).
    """

    clock_ticks = 100          # process table cpu times per second
    forwarded_signals = ()     # what a container's PID 1 passes on to the apps

    def default_home(self):
        """Return $OXMGR_HOME, else this platform's per-user data directory + /oxmgr."""
        home = os.environ.get(ENV_HOME)
        return os.path.abspath(os.path.expanduser(home)) if home else os.path.join(self._data_home(), "oxmgr")

    def secure_home(self, root):
        """Make the home private; return a warning when it had to be tightened."""
        return None

    def owned_by_us(self, st):
        """True when a stat result belongs to this user (or root); where there are no uids, always."""
        return True

    def tcp_listener_uid(self, port):
        """The uid that owns the socket listening on a local TCP port, where the platform says; else None."""
        return None

    def marked_strays(self, home_root, known):
        """Process groups of an app of this home (a member's environment says so) that are not in `known`."""
        return []

    def read_stats(self, pid):
        """Return ProcStats for one pid, or None when it is gone (never raises)."""
        try:
            return self.process_table().get(pid)
        except OSError:
            return None

    def process_running(self, pid):
        """Return True while pid runs; a zombie waiting for its parent has stopped."""
        stats = self.read_stats(pid)
        return stats is not None and stats.state != "Z"

    def leftover_tree(self, tree, start_ticks):
        """True when a process tree recorded by a previous daemon still exists."""
        return False

    def grow_pipe(self, fd, size=CHATTY_PIPE_BYTES):
        """Give a pipe a larger kernel buffer where the kernel allows it; True when it took."""
        return False

    def make_subreaper(self):
        """Adopt orphaned descendants as PID 1 would; False where the kernel cannot."""
        return False

    def reaper_role(self):
        """Reap every orphan from now on: "PID 1", "subreaper", or None where that cannot be."""
        return None

    def console_pipe(self, fd):
        """Return (file, give_back) to write fd through an asyncio pipe transport; None: write it directly."""
        return None

    def raise_fd_limit(self):
        """Lift the soft open-files limit to the hard one: each app holds 4 fds."""

    def file_watch(self):
        """Return an inotify-like watch, or None: then watched trees are scanned."""
        return None

    def sd_notify(self, message):
        """Tell systemd (Type=notify) how we are doing; a no-op without NOTIFY_SOCKET."""
        return False


class PosixDriver(Driver):
    """macOS, the BSDs and the base of Linux: fork/exec, process groups, signals, Unix sockets."""

    shell = ("/bin/sh", "-c")
    kill_signal = getattr(signal, "SIGKILL", 9)   # the class is defined (and tested) on every platform
    service_system = "launchd" if _DARWIN else "systemd"
    unix_sockets = True
    stop_signals = ("SIGTERM", "SIGINT")      # a clean shutdown of the daemon or the runtime
    # Signals a container's PID 1 passes on to the apps (tini forwards everything it can catch).
    forwarded_signals = tuple(getattr(signal, name) for name in (
        "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGQUIT", "SIGCONT", "SIGALRM", "SIGURG", "SIGPWR", "SIGINFO")
        if hasattr(signal, name))

    def _data_home(self):
        return os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")

    def secure_home(self, root):
        """Make the home private (0700); return a warning when it had to be tightened.

        A home another user owns is refused: its owner could plant the socket
        or read what we write there.
        """
        st = os.stat(root)
        if st.st_uid != os.getuid():
            raise OxmgrError(f"home {root!r} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
                             f"set {ENV_HOME} to a directory of your own, or chown it")
        mode = st.st_mode & 0o777
        if mode & 0o077:
            os.chmod(root, 0o700)
            return f"home {root!r} was mode {mode:o}; set to 700 so only you can reach it"
        return None

    def owned_by_us(self, st):
        return self.trusted_uid(st.st_uid)

    # -- processes ----------------------------------------------------------------

    def check_program(self, argv, cwd, env):
        """Raise SpawnError now for what exec would refuse later: no program, not executable, no cwd."""
        program = argv[0]
        if cwd and not os.path.isdir(cwd):
            raise SpawnError(f"cwd {'is not a directory' if os.path.exists(cwd) else 'does not exist'}: {cwd!r}",
                             EXIT_NOT_FOUND)
        if os.sep in program:
            path = program if os.path.isabs(program) else os.path.join(cwd or os.getcwd(), program)
            if not os.path.exists(path):
                raise SpawnError(f"command not found: {program!r}", EXIT_NOT_FOUND)
        else:
            path = _which_in(program, env.get("PATH", os.defpath))
            if path is None:
                raise SpawnError(f"command not found: {program!r}", EXIT_NOT_FOUND)
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise SpawnError(f"permission denied: {program!r} is not executable", EXIT_NOT_EXECUTABLE)

    def spawn(self, argv, cwd, env, listen_fds=(), gated=False):
        """Start argv in its own session and process group, stdin from /dev/null.

        Returns a Child whose pid is the app's pid and its group id; stdout and
        stderr are pipes to us. listen_fds are passed as fds 3, 4... with
        LISTEN_FDS/LISTEN_PID set (systemd's socket passing). Raises SpawnError.

        gated: the child waits (a shell reading its stdin, which then execs the
        app in place, same pid) until Child.release(); if we die first, it reads
        end-of-file and exits. So no process runs that the state file does not name.
        """
        import subprocess
        kwargs = {}
        gated = gated and os.path.exists(self.shell[0])  # an image without a shell runs its apps ungated
        if gated:
            self.check_program(argv, cwd, env)  # exec errors would otherwise surface as an exit of the shell
            argv = [self.shell[0], "-c", 'read -r _ || exit 125; exec "$@" </dev/null', argv[0]] + list(argv)
        if listen_fds:
            # The environment is installed by the preexec hook, so look the program up on the app's PATH here.
            program = argv[0] if os.sep in argv[0] else (_which_in(argv[0], env.get("PATH")) or argv[0])
            argv = [program] + list(argv[1:])
            kwargs.update(preexec_fn=_pass_listen_fds(list(listen_fds), env),
                          pass_fds=tuple(range(3, 3 + len(listen_fds))))
            env = None
        out_r = out_w = err_r = err_w = gate_r = gate = None
        try:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            if gated:
                gate_r, gate = os.pipe()
            popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=gate_r if gated else subprocess.DEVNULL,
                                     stdout=out_w, stderr=err_w, close_fds=True, start_new_session=True, **kwargs)
        except (OSError, ValueError) as exc:
            for fd in (out_r, err_r, gate):
                close_fd(fd)
            if isinstance(exc, ValueError):  # an embedded NUL in argv, env or cwd
                raise SpawnError(f"cannot start {argv[0]!r}: {exc}", EXIT_NOT_EXECUTABLE) from None
            raise _spawn_error(exc, argv, cwd) from None
        finally:
            for fd in (out_w, err_w, gate_r):
                close_fd(fd)  # the child's ends
        stats = self.read_stats(popen.pid)
        return Child(popen.pid, open(out_r, "rb", buffering=0), open(err_r, "rb", buffering=0), popen,
                     stats.start_ticks if stats else None, gate)

    def spawn_detached(self, argv, log_path, env=None):
        """Start a background process in a new session, stdio to `log_path`."""
        import subprocess
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o600)
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                                    env=env, start_new_session=True)
        finally:
            os.close(fd)

    def exec_into(self, argv):
        """Replace this process with argv, keeping the pid (service managers track it)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)

    def kill_tree(self, tree, signum):
        """Send a signal to a whole process group; False when the group is gone."""
        if not tree or tree <= 1:
            return False  # never signal our own group or init's by accident
        try:
            os.killpg(tree, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def tree_alive(self, tree):
        """Return True while any member of the process group exists."""
        return self.kill_tree(tree, 0)

    def leftover_tree(self, tree, start_ticks):
        """True when a process group recorded by a previous daemon still exists.

        The leader must be the same process (pid, start time and group), or be
        gone while members remain: a group id is not reused while it has members.
        """
        stats = self.read_stats(tree)
        if stats is not None and stats.state != "Z":
            return stats.pgid == tree and (start_ticks is None or stats.start_ticks == start_ticks)
        return self.tree_alive(tree)

    def reaper(self, loop, reap_all=False):
        return _Reaper(loop, reap_all)

    def add_signal_handlers(self, loop, handlers):
        """handlers: {signal name: fn(signum)}; names this platform lacks are skipped."""
        for name, fn in handlers.items():
            signum = getattr(signal, name, None) if isinstance(name, str) else name
            if signum is not None:
                loop.add_signal_handler(signum, fn, signum)

    def reaper_role(self):
        if os.getpid() == 1:
            return "PID 1"
        return "subreaper" if self.make_subreaper() else None

    def console_pipe(self, fd):
        # A pipe or socket (docker's log driver, journald) gets a transport, which makes
        # the shared file description non-blocking until give_back(); a terminal or a
        # regular file is always writable.
        import stat as stat_mod
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return None
        if not (stat_mod.S_ISFIFO(mode) or stat_mod.S_ISSOCK(mode)):
            return None
        blocking = os.get_blocking(fd)
        return open(os.dup(fd), "wb", buffering=0), lambda: os.set_blocking(fd, blocking)

    def raise_fd_limit(self):
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = hard if hard != resource.RLIM_INFINITY else 1 << 16
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 1 << 20), hard))
        except (ValueError, OSError):  # pragma: no cover
            pass

    # -- process table ------------------------------------------------------------

    def process_table(self):
        """Return {pid: ProcStats} for every process (ps here; /proc on Linux)."""
        import subprocess
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,sess=,state=,time=,rss=,lstart="],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False).stdout
        return _parse_ps_output(out.decode("ascii", "replace"))

    # -- sockets ---------------------------------------------------------------------

    def _sun_path(self, path):
        return path, None

    def bind_unix(self, path, kind=socket.SOCK_STREAM):
        """Bind an AF_UNIX socket born 0600 (no window where others can connect)."""
        sock = socket.socket(socket.AF_UNIX, kind)
        addr, dir_fd = self._sun_path(path)
        old_umask = os.umask(0o177)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
            if dir_fd is not None:
                close_fd(dir_fd)
        return sock

    def connect_unix(self, path, timeout):
        """Connect to a Unix stream socket; OSError as connect raises it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            addr, dir_fd = self._sun_path(path)
        except OSError:
            sock.close()
            raise
        try:
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        finally:
            if dir_fd is not None:
                close_fd(dir_fd)
        return sock

    def peer_uid(self, sock):
        """Return the uid of the process at the other end of a Unix socket, or None."""
        import struct
        # LOCAL_PEERCRED (0x001 at level SOL_LOCAL 0) returns struct xucred.
        creds = sock.getsockopt(0, 0x001, struct.calcsize("IIh16I"))
        return struct.unpack("IIh16I", creds)[1]

    def trusted_uid(self, uid):
        """The daemon answers its own user, and root."""
        return uid in (os.getuid(), 0)

    def bind_notify(self, path):
        """Bind an app's NOTIFY_SOCKET (sd_notify's datagrams); return (socket, address for the app)."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        _unlink_quiet(path)
        return self.bind_unix(path, socket.SOCK_DGRAM), path

    def unbind_notify(self, sock, address):
        sock.close()
        if not address.startswith("@"):
            _unlink_quiet(address)

    def read_notify(self, sock):
        """Return the datagrams waiting on a notify socket as [(data, sender pid, sender uid)]."""
        out = []
        while len(out) < 64:  # a flood (anyone can reach an abstract socket) never holds the loop
            try:
                data, pid, uid = self._receive(sock)
            except OSError:  # drained (BlockingIOError), or the socket is gone
                return out
            out.append((data, pid, uid))
        return out

    def _receive(self, sock):
        return sock.recv(4096), None, None  # the socket sits in the private home: only we reach it

    def bind_listener(self, address):
        """Bind and listen on "tcp://host:port" or "unix:/path" for an app; SpawnError if it cannot."""
        try:
            if address.startswith("unix:"):
                path = address[5:]
                _unlink_quiet(path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(path)
            else:
                host, port = split_host_port(address[len("tcp://"):])
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
            sock.listen(1024)
        except OSError as exc:
            raise SpawnError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        return sock

    def unbind_listener(self, address, sock):
        sock.close()
        if address.startswith("unix:"):
            _unlink_quiet(address[5:])

    def lock(self, path):
        """Take the single-instance lock; return its fd, or None when another process holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise
        return fd

    def sd_notify(self, message):
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return False
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), address)
        except OSError:
            return False
        return True


def _pass_listen_fds(fds, env):
    """Return a preexec_fn that puts held sockets at fds 3, 4... (systemd's socket passing).

    LISTEN_PID must be the child's own pid, known only after fork; so the
    environment is set here, in the child, before exec.
    """
    first, count = 3, len(fds)

    def child():
        # Lift every socket above the target range first, so no dup2 overwrites another.
        lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD, first + count) for fd in fds]
        for i, fd in enumerate(lifted):
            os.dup2(fd, first + i)  # dup2 clears close-on-exec
        os.environ.clear()
        os.environ.update(env)
        os.environ["LISTEN_PID"] = str(os.getpid())
    return child


class LinuxDriver(PosixDriver):
    """Linux: /proc for the process table, inotify, child subreaper, bigger pipes."""

    def __init__(self):
        try:
            self.clock_ticks = os.sysconf("SC_CLK_TCK")
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # pragma: no cover
            self.clock_ticks, self._page = 100, 4096

    def process_table(self):
        """Return {pid: ProcStats} for every process: one pass over /proc."""
        table = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue  # exited while we looked
            stats = _parse_proc_stat(raw.decode("ascii", "replace"), self._page)
            if stats is not None:
                table[stats.pid] = stats
        return table

    def tcp_listener_uid(self, port):
        want = f":{port:04X}"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()  # sl local rem st queues timer retransmits uid ...
                if len(fields) > 7 and fields[3] == "0A" and fields[1].endswith(want):
                    return int(fields[7])
        return None

    def tree_alive(self, tree):
        # A zombie still answers kill(0): a group of zombies waiting for a slow init
        # (someone else's to reap: a killed daemon's children) is gone all the same.
        if not super().tree_alive(tree):
            return False
        leader = self.read_stats(tree)
        if leader is not None and leader.state != "Z" and leader.pgid == tree:
            return True  # the usual case, without a look at every process
        return any(st.pgid == tree and st.state != "Z" for st in self.process_table().values())

    def marked_strays(self, home_root, known):
        # Our apps lead their own session and group (both outlive the leader), and carry OXMGR_HOME and OXMGR_ID.
        marker = b"\0" + os.fsencode(f"{ENV_HOME}={home_root}") + b"\0"
        found = []
        for st in self.process_table().values():
            if (st.pgid == st.sid and st.pgid not in known and st.pgid not in found and st.pid != os.getpid()
                    and st.pgid != os.getpgrp() and st.state != "Z"):
                try:
                    if os.stat(f"/proc/{st.pid}").st_uid != os.getuid():
                        continue
                    with open(f"/proc/{st.pid}/environ", "rb") as f:
                        env = b"\0" + f.read() + b"\0"
                except OSError:
                    continue
                if marker in env and b"\0OXMGR_ID=" in env:
                    found.append(st.pgid)
        return found

    def read_stats(self, pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return _parse_proc_stat(f.read().decode("ascii", "replace"), self._page)
        except OSError:
            return None

    def grow_pipe(self, fd, size=CHATTY_PIPE_BYTES):
        # Only for apps seen to fill their pipe: pipe pages count against the user's
        # pipe-user-pages-soft limit, past which every new pipe of that user gets one page.
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)  # 1031: the constant before 3.10
        except OSError:
            return False
        return True

    def make_subreaper(self):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
        except (ImportError, OSError, AttributeError):  # pragma: no cover
            return False

    def file_watch(self):
        try:
            return _Inotify()
        except (ImportError, OSError, AttributeError):  # pragma: no cover
            return None

    def _sun_path(self, path):
        # sun_path holds 108 bytes: a long home is reached through /proc/self/fd/N of
        # its open directory, which works for bind and connect alike.
        if len(os.fsencode(path)) < 100:
            return path, None
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | _O_CLOEXEC)
        return f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}", dir_fd

    def peer_uid(self, sock):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
        return int.from_bytes(creds[4:8], sys.byteorder)

    def bind_notify(self, path):
        if len(os.fsencode(path)) < 100:
            sock, address = super().bind_notify(path)
        else:
            # Too long for sun_path: an abstract name (sd_notify spells it with a leading @). Any
            # user can reach that, so every datagram's sender is checked (SO_PASSCRED).
            address = f"@oxmgr-{os.getuid()}-{os.urandom(8).hex()}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("\0" + address[1:])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        return sock, address

    def _receive(self, sock):
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        for level, kind, creds in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(creds) >= 12:
                pid, uid = int.from_bytes(creds[0:4], sys.byteorder), int.from_bytes(creds[4:8], sys.byteorder)
                return data, pid, uid
        return data, None, None


class WindowsDriver(Driver):  # pragma: no cover  (the Windows issue fills in what says "not on Windows yet")
    """Windows: job objects, loopback TCP with a token, Toolhelp for the process table."""

    shell = ("cmd.exe", "/c")
    kill_signal = None                        # TerminateJobObject
    service_system = "task-scheduler"
    unix_sockets = False
    stop_signals = ("SIGINT", "SIGBREAK")     # FILETIME counts 100 ns: cpu times are centiseconds too

    def _not_yet(self, what):
        # A SpawnError: an app whose start meets it becomes errored, with this reason.
        raise SpawnError(f"{what} is not on Windows yet; run the daemon on Linux or macOS for now")

    def _data_home(self):
        return os.environ.get("LOCALAPPDATA") or os.path.expanduser("~")

    def check_program(self, argv, cwd, env):
        if cwd and not os.path.isdir(cwd):
            raise SpawnError(f"cwd does not exist: {cwd!r}", EXIT_NOT_FOUND)

    def spawn(self, argv, cwd, env, listen_fds=(), gated=False):
        self._not_yet("supervising apps")

    def spawn_detached(self, argv, log_path, env=None):
        import subprocess
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                                    env=env, creationflags=0x00000008 | 0x00000200 | 0x08000000)
        finally:
            os.close(fd)

    def exec_into(self, argv):
        return False  # no exec that keeps the pid: the caller goes on in this process

    def kill_tree(self, tree, signum):
        self._not_yet("stopping a process tree")

    def tree_alive(self, tree):
        self._not_yet("watching a process tree")

    def process_running(self, pid):
        return pid in self.process_table()  # never os.kill(pid, 0): 0 is CTRL_C_EVENT here

    def reaper(self, loop, reap_all=False):
        self._not_yet("watching app exits")

    def add_signal_handlers(self, loop, handlers):
        # No loop.add_signal_handler here: the handler only asks the loop to act.
        for name, fn in handlers.items():
            signum = getattr(signal, name, None) if isinstance(name, str) else name
            if signum is not None:
                signal.signal(signum, lambda s, _frame, fn=fn: loop.call_soon_threadsafe(fn, s))

    def process_table(self):
        return _win32_process_table()

    def bind_unix(self, *args):
        self._not_yet("Unix sockets")

    connect_unix = bind_unix

    def bind_notify(self, path):
        self._not_yet("NOTIFY_SOCKET readiness")

    read_notify = bind_notify

    def bind_listener(self, address):
        self._not_yet("held sockets")

    def peer_uid(self, sock):
        return None

    def trusted_uid(self, uid):
        return False

    def unbind_notify(self, sock, address):
        sock.close()

    def unbind_listener(self, address, sock):
        sock.close()

    def lock(self, path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            return None
        return fd


_win32 = None  # (kernel32, psapi, structures), loaded on first use


def _win32_api():  # pragma: no cover  (Windows only)
    """Load kernel32/psapi privately (ctypes.windll's argtypes are global) and declare signatures once."""
    global _win32
    if _win32 is None:
        import ctypes
        from ctypes import wintypes

        class ProcessEntry32(ctypes.Structure):
            _fields_ = [("dwSize", wintypes.DWORD), ("cntUsage", wintypes.DWORD),
                        ("th32ProcessID", wintypes.DWORD), ("th32DefaultHeapID", ctypes.c_size_t),
                        ("th32ModuleID", wintypes.DWORD), ("cntThreads", wintypes.DWORD),
                        ("th32ParentProcessID", wintypes.DWORD), ("pcPriClassBase", wintypes.LONG),
                        ("dwFlags", wintypes.DWORD), ("szExeFile", wintypes.WCHAR * 260)]

        class MemoryCounters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                    "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]

        k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        psapi = ctypes.WinDLL("psapi", use_last_error=True)
        k32.CreateToolhelp32Snapshot.argtypes = [wintypes.DWORD, wintypes.DWORD]
        k32.CreateToolhelp32Snapshot.restype = wintypes.HANDLE
        for fn in (k32.Process32FirstW, k32.Process32NextW):
            fn.argtypes = [wintypes.HANDLE, ctypes.POINTER(ProcessEntry32)]
            fn.restype = wintypes.BOOL
        k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
        k32.OpenProcess.restype = wintypes.HANDLE
        k32.GetProcessTimes.argtypes = [wintypes.HANDLE] + [ctypes.POINTER(wintypes.FILETIME)] * 4
        k32.GetProcessTimes.restype = wintypes.BOOL
        k32.CloseHandle.argtypes = [wintypes.HANDLE]
        psapi.GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(MemoryCounters), wintypes.DWORD]
        psapi.GetProcessMemoryInfo.restype = wintypes.BOOL
        _win32 = (k32, psapi, ProcessEntry32, MemoryCounters)
    return _win32


def _win32_process_table():  # pragma: no cover  (Windows only)
    """Return {pid: ProcStats} from a Toolhelp snapshot plus per-process times and memory.

    cpu_ticks are centiseconds (FILETIME counts 100 ns); start_ticks is the
    creation FILETIME, which with the pid identifies a process.
    """
    import ctypes
    from ctypes import wintypes
    k32, psapi, ProcessEntry32, MemoryCounters = _win32_api()
    snapshot = k32.CreateToolhelp32Snapshot(0x2, 0)  # TH32CS_SNAPPROCESS
    if snapshot in (None, wintypes.HANDLE(-1).value):
        raise ctypes.WinError(ctypes.get_last_error())
    parents = {}
    try:
        entry = ProcessEntry32()
        entry.dwSize = ctypes.sizeof(entry)
        ok = k32.Process32FirstW(snapshot, ctypes.byref(entry))
        while ok:
            parents[entry.th32ProcessID] = entry.th32ParentProcessID
            ok = k32.Process32NextW(snapshot, ctypes.byref(entry))
    finally:
        k32.CloseHandle(snapshot)
    table = {}
    for pid, ppid in parents.items():
        handle = k32.OpenProcess(0x1000 | 0x0010, False, pid)  # QUERY_LIMITED_INFORMATION | VM_READ
        if not handle:
            continue  # gone, or not ours to look at
        try:
            times = [wintypes.FILETIME() for _ in range(4)]
            if not k32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
                continue
            as_int = [(t.dwHighDateTime << 32) | t.dwLowDateTime for t in times]
            counters = MemoryCounters()
            counters.cb = ctypes.sizeof(counters)
            rss = counters.WorkingSetSize if psapi.GetProcessMemoryInfo(
                handle, ctypes.byref(counters), counters.cb) else 0
            table[pid] = ProcStats(pid, ppid, pid, 0, "R", (as_int[2] + as_int[3]) // 100000, as_int[0], rss)
        finally:
            k32.CloseHandle(handle)
    return table


DRIVER = WindowsDriver() if _WINDOWS else LinuxDriver() if _LINUX else PosixDriver()
# =============================================================================
# 7. Config model
# =============================================================================

_NAME_FORBIDDEN = frozenset("/\\\0")


def validate_name(name):
    """Return `name` if it can name an app (and its log files), else raise ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError("expected a non-empty name")
    if name in (".", "..", "all") or name.isdigit() or name.startswith("-"):
        raise ValueError(f"{name!r} cannot be a name (reserved, numeric or starts with '-')")
    if len(name) > 128 or any(c in _NAME_FORBIDDEN or c.isspace() or not c.isprintable() for c in name):
        raise ValueError(f"{name!r} cannot be a name: use letters, digits and -_.@: (no spaces or '/')")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"{name!r} is {size} bytes in UTF-8; a name is at most {MAX_NAME_BYTES}, "
                         f"so its log files (<name>.out.log.N) fit a file name")
    return name


def _check_text(value):
    """Refuse what exec, a file name or the state file cannot carry: a NUL, a lone surrogate."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            try:
                _check_text(item)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_text(item)
    elif isinstance(value, str):
        if "\0" in value:
            raise ValueError(f"{value!r} contains a NUL character; remove it")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{value!r} is not valid text (a lone surrogate); write it in UTF-8") from None


def _v_str(value):
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _v_opt_str(value):
    return None if value is None or value == "" else _v_str(value)


def _v_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def _v_count(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number >= 0, got {value!r}") from None
    if number < 0 or number != float(value):
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return number


def _v_seconds(value):
    return parse_duration(value, "s")


def _v_factor(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value <= 10.0:
        raise ValueError(f"expected a number between 1 and 10, got {value!r}")
    return float(value)


def _v_signal(value):
    return signal_name(parse_signal(value))


def _v_policy(value):
    text = _v_str(value).strip().lower().replace("_", "-")
    if text == "onfailure":
        text = "on-failure"
    if text not in RESTART_POLICIES:
        raise ValueError(f"expected one of always, on-failure, never, got {value!r}")
    return text


def _v_env(value):
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of NAME = value, got {type(value).__name__}")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ValueError(f"invalid variable name {key!r}")
        if isinstance(val, bool):
            val = "true" if val else "false"
        elif val is None:
            val = ""
        elif isinstance(val, (int, float)):
            val = str(val)
        elif not isinstance(val, str):
            raise ValueError(f"{key}: expected a string, number or boolean, got {type(val).__name__}")
        out[key] = val
    return out


def _v_str_list(value):
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(value)


def _v_code_list(value):
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of exit codes, got {value!r}")
    codes = []
    for v in value:
        code = _v_count(v)
        if code > 255:
            raise ValueError(f"exit codes are 0..255, got {v!r}")
        codes.append(code)
    return codes


def _v_opt_count(value):
    return None if value is None else _v_count(value)


def _v_name(value):
    return validate_name(value)


def _v_namespace(value):
    return validate_name(_v_str(value)) if value != DEFAULT_NAMESPACE else value


def _v_command(value):
    text = _v_str(value)
    if not text.strip():
        raise ValueError("expected a command, got an empty string")
    split_command(text, DRIVER.shell)  # raises ValueError for unbalanced quotes
    return text


def _v_cwd(value):
    if value is None:
        return None
    text = _v_str(value)
    if not os.path.isabs(text):
        raise ValueError(f"expected an absolute path, got {value!r}")
    return text


def _v_date_format(value):
    if value is None or value == "":
        return None
    return _moment_to_strftime(_v_str(value))


def _v_str_list_nonempty(value):
    items = _v_str_list(value)
    if any(not item.strip() for item in items):
        raise ValueError("expected non-empty strings")
    return items


def _v_names(value):
    return [validate_name(n) for n in _v_str_list(value)]


def _v_int(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number != float(value):
        raise ValueError(f"expected a whole number, got {value!r}")
    return number


def _v_positive_count(value):
    number = _v_count(value)
    if number < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return number


def _v_size(value):
    return parse_size(value)


def _v_percent(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a percentage like 80, got {value!r}")
    try:
        number = float(str(value).rstrip("%"))
    except ValueError:
        raise ValueError(f"expected a percentage like 80, got {value!r}") from None
    if not 0 <= number <= 100000:
        raise ValueError(f"expected a percentage >= 0, got {value!r}")
    return number


def _v_host_port(value):
    text = _v_str(value).strip()
    if split_host_port(text)[1] == 0:
        raise ValueError(f"expected host:port like 127.0.0.1:3000, got {value!r}")
    return text


def _v_url(value):
    text = _v_str(value).strip()
    scheme, sep, rest = text.partition("://")
    if scheme.lower() not in ("http", "https") or not sep or not rest.split("/", 1)[0]:
        raise ValueError(f"expected a URL like http://127.0.0.1:3000/health, got {value!r}")
    return text


def _v_listen(value):
    out = []
    for item in _v_str_list(value):
        text = item.strip()
        if text.startswith("unix:"):
            if not text[5:]:
                raise ValueError(f"expected unix:/path/to.sock, got {item!r}")
        elif text.startswith("tcp://"):
            _v_host_port(text[6:])
        else:
            raise ValueError(f"expected tcp://host:port or unix:/path, got {item!r}")
        out.append(text)
    return out


def _v_signal_list(value):
    return [_v_signal(v) for v in _v_str_list(value)]


def _v_cron(value):
    if value is None or value == "":
        return None
    text = " ".join(_v_str(value).split())
    parse_cron(text)
    return text


_CRON_NAMES = {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9,
    "oct": 10, "nov": 11, "dec": 12, "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6,
}
_CRON_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                 "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@hourly": "0 * * * *"}


class CronSchedule:
    """A parsed cron expression: 5 fields, or 6 with seconds first (as PM2)."""

    __slots__ = ("text", "seconds", "minutes", "hours", "days", "months", "weekdays", "_any_day", "_any_weekday")

    def __init__(self, text, seconds, minutes, hours, days, months, weekdays, any_day, any_weekday):
        self.text = text
        self.seconds, self.minutes, self.hours = seconds, minutes, hours
        self.days, self.months, self.weekdays = days, months, weekdays
        self._any_day, self._any_weekday = any_day, any_weekday

    def _day_matches(self, t):
        day = t.tm_mday in self.days
        weekday = (t.tm_wday + 1) % 7 in self.weekdays   # tm_wday: Monday=0; cron: Sunday=0
        if self._any_day or self._any_weekday:
            return day and weekday
        return day or weekday  # both restricted: either matches, as in Vixie cron

    def next_after(self, when):
        """Return the first fire time (epoch seconds, local time) after `when`."""
        t = int(when) + 1
        limit = t + 366 * 86400 * 5
        while t < limit:
            lt = time.localtime(t)
            if lt.tm_mon not in self.months or not self._day_matches(lt):
                t = int(time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))) + 86400
                t = int(time.mktime(time.localtime(t)[:3] + (0, 0, 0, 0, 0, -1)))
                continue
            if lt.tm_hour not in self.hours:
                t += 3600 - lt.tm_min * 60 - lt.tm_sec
                continue
            if lt.tm_min not in self.minutes:
                t += 60 - lt.tm_sec
                continue
            if lt.tm_sec not in self.seconds:
                t += 1
                continue
            return float(t)
        raise ValueError(f"cron {self.text!r} never fires")  # pragma: no cover


def _cron_field(text, low, high, what):
    values = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"bad step {step_text!r} in {what} field {text!r}")
            step = int(step_text)
        if body == "*":
            start, end = low, high
        else:
            a, dash, b = body.partition("-")
            try:
                start = _CRON_NAMES[a.lower()] if a.lower() in _CRON_NAMES else int(a)
                end = (_CRON_NAMES[b.lower()] if b.lower() in _CRON_NAMES else int(b)) if dash else \
                    (high if step_text else start)
            except ValueError:
                raise ValueError(f"bad value {body!r} in {what} field {text!r}") from None
            if what == "weekday":
                if dash and end == 0 and start > 0:
                    end = 7  # mon-sun: Sunday at the end of the week
            top = high + 1 if what == "weekday" else high  # weekday 7 is Sunday too
            if not (low <= start <= top and low <= end <= top):
                raise ValueError(f"{body!r} is outside {low}-{high} in {what} field {text!r}")
            if start > end:
                raise ValueError(f"range {body!r} runs backwards in {what} field {text!r}")
        values.update(v % 7 if what == "weekday" else v for v in range(start, end + 1, step))
    return frozenset(values)


def parse_cron(text):
    """Parse a cron expression into a CronSchedule; ValueError says what is wrong."""
    text = " ".join(str(text).split())
    expanded = _CRON_ALIASES.get(text.lower(), text)
    fields = expanded.split()
    if len(fields) == 5:
        fields = ["0"] + fields
    if len(fields) != 6:
        raise ValueError(f"expected 5 fields (min hour day month weekday) or 6 (with seconds first), "
                         f"got {len(fields)} in {text!r}")
    sec, minute, hour, day, month, weekday = fields
    return CronSchedule(
        text, _cron_field(sec, 0, 59, "second"), _cron_field(minute, 0, 59, "minute"),
        _cron_field(hour, 0, 23, "hour"), _cron_field(day, 1, 31, "day"), _cron_field(month, 1, 12, "month"),
        _cron_field(weekday, 0, 6, "weekday"), day == "*", weekday == "*")


# The fields of an app, with their defaults and validators. The order is the
# order of `status` output and of converted config files.
_SPEC_FIELDS = (
    ("name", None, _v_name),
    ("command", None, _v_command),
    ("cwd", None, _v_cwd),
    ("env", None, _v_env),
    ("namespace", DEFAULT_NAMESPACE, _v_namespace),
    ("interpreter", None, _v_opt_str),
    ("interpreter_args", None, _v_str_list),
    ("restart_policy", DEFAULT_RESTART_POLICY, _v_policy),
    ("max_restarts", DEFAULT_MAX_RESTARTS, _v_count),
    ("crash_restart_limit", 0, _v_count),          # 0: no windowed limit
    ("min_uptime_s", DEFAULT_MIN_UPTIME_S, _v_seconds),
    ("restart_delay_s", 0.0, _v_seconds),
    ("exp_backoff", False, _v_bool),
    ("backoff_max_s", DEFAULT_BACKOFF_MAX_S, _v_seconds),
    ("backoff_factor", DEFAULT_BACKOFF_FACTOR, _v_factor),
    ("start_delay_s", 0.0, _v_seconds),
    ("stop_signal", DEFAULT_STOP_SIGNAL, _v_signal),
    ("stop_timeout_s", DEFAULT_STOP_TIMEOUT_S, _v_seconds),
    ("stop_exit_codes", None, _v_code_list),
    ("log_date_format", None, _v_date_format),
    ("out_file", None, _v_opt_str),
    ("err_file", None, _v_opt_str),
    ("instance", None, _v_opt_count),              # index when expanded from instances = N
    ("instance_var", DEFAULT_INSTANCE_VAR, _v_str),
    ("base_name", None, _v_opt_str),               # the app's name before expansion (a target)
    ("depends_on", None, _v_names),                # base names started (and ready) first
    ("start_order", 0, _v_int),                    # tie-break among apps whose dependencies are met
    ("combined_file", None, _v_opt_str),           # both streams in one file (PM2 log_file)
    ("merge_logs", False, _v_bool),                # instances share the base name's log files
    ("log_max_bytes", None, _v_size),              # per-app rotation; None: the daemon's setting
    ("log_max_files", None, _v_opt_count),
    ("log_max_age_s", None, _v_seconds),
    ("health_cmd", None, _v_opt_str),
    ("health_http", None, _v_url),
    ("health_tcp", None, _v_host_port),
    ("health_interval_s", DEFAULT_HEALTH_INTERVAL_S, _v_seconds),
    ("health_timeout_s", DEFAULT_HEALTH_TIMEOUT_S, _v_seconds),
    ("health_max_failures", DEFAULT_HEALTH_MAX_FAILURES, _v_positive_count),
    ("wait_ready", False, _v_bool),
    ("ready_tcp", None, _v_host_port),
    ("ready_timeout_s", DEFAULT_READY_TIMEOUT_S, _v_seconds),
    ("max_memory_bytes", 0, _v_size),              # 0: no limit
    ("max_cpu_percent", 0.0, _v_percent),          # 0: no limit
    ("watch", None, _v_str_list_nonempty),         # paths; relative ones are under cwd
    ("ignore_watch", None, _v_str_list_nonempty),
    ("watch_delay_s", DEFAULT_WATCH_DELAY_S, _v_seconds),
    ("cron_restart", None, _v_cron),
    ("listen", None, _v_listen),                   # sockets held by the daemon, passed as fd 3...
    ("forward_signals", None, _v_signal_list),     # runtime: the signals this app alone receives
)
_SPEC_DEFAULTS = {name: default for name, default, _ in _SPEC_FIELDS}
_SPEC_VALIDATORS = {name: check for name, _, check in _SPEC_FIELDS}
_MUTABLE_DEFAULTS = {"env": dict, "interpreter_args": list, "stop_exit_codes": list, "depends_on": list,
                     "watch": list, "ignore_watch": list, "listen": list, "forward_signals": list}


class AppSpec:
    """The normalised definition of one app: units in seconds and bytes.

    Built only through `from_dict`, which validates every key, so a spec that
    exists is a spec that can run.
    """

    __slots__ = tuple(name for name, _, _ in _SPEC_FIELDS) + ("_compact", "_fingerprint")

    def __init__(self, **values):
        for name, default, _ in _SPEC_FIELDS:
            value = values.pop(name, default)
            if value is None and name in _MUTABLE_DEFAULTS:
                value = _MUTABLE_DEFAULTS[name]()
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"unknown AppSpec fields: {sorted(values)}")
        object.__setattr__(self, "_compact", None)
        object.__setattr__(self, "_fingerprint", None)

    @classmethod
    def from_dict(cls, data, where="app"):
        """Validate a dict of spec fields; ConfigError names `where` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SPEC_VALIDATORS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; remove it or check its spelling")
        values = {}
        errors = []
        for key, value in data.items():
            if value is None and _SPEC_DEFAULTS[key] is None:
                continue
            try:
                _check_text(value)
                values[key] = _SPEC_VALIDATORS[key](value)
            except ValueError as exc:
                errors.append(f"{where}: {key}: {exc}")
        for key in ("name", "command"):
            if key not in values and not any(f": {key}: " in e for e in errors):
                errors.append(f"{where}: {key} is required")
        if errors:
            raise ConfigError("\n".join(errors))
        return cls(**values)

    def to_dict(self):
        """Return every field as JSON-ready data (a fresh copy)."""
        out = {}
        for name, _, _ in _SPEC_FIELDS:
            value = getattr(self, name)
            out[name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
        return out

    def replace(self, **changes):
        """Return a copy with some fields changed (validated)."""
        data = self.to_dict()
        data.update(changes)
        return AppSpec.from_dict(data, where=f"app {data.get('name')!r}")

    def compact(self):
        """Return the fields that differ from their defaults (cached: a spec never changes).

        This is what state.json stores: from_dict gives the same spec back.
        """
        if self._compact is None:
            object.__setattr__(self, "_compact", {
                name: value for name, value in self.to_dict().items()
                if name in ("name", "command") or value != (_MUTABLE_DEFAULTS[name]() if name in _MUTABLE_DEFAULTS
                                                            else _SPEC_DEFAULTS[name])})
        return self._compact

    def fingerprint(self):
        """Return a canonical string: equal strings mean an identical app."""
        if self._fingerprint is None:
            object.__setattr__(self, "_fingerprint", to_json(self.to_dict(), sort_keys=True))
        return self._fingerprint

    def __eq__(self, other):
        return isinstance(other, AppSpec) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"AppSpec(name={self.name!r}, command={self.command!r})"

    def __setattr__(self, name, value):
        raise AttributeError("AppSpec is immutable; use replace()")


def infer_interpreter(command):
    """Return the interpreter for `start app.js`-style commands, or None."""
    first = command.strip().split(None, 1)
    if not first:
        return None
    ext = os.path.splitext(first[0])[1].lower()
    interp = INTERPRETERS.get(ext)
    if interp == "python":
        return sys.executable or "python3"
    return interp


def resolve_argv(spec):
    """Return the argv that runs `spec`: interpreter first, sh -c for shell syntax."""
    interp = spec.interpreter
    if interp and interp != "none":
        prefix = [interp] + list(spec.interpreter_args)
        if needs_shell(spec.command):
            return list(DRIVER.shell) + [join_words(prefix) + " " + spec.command]
        return prefix + split_command(spec.command, DRIVER.shell)
    return split_command(spec.command, DRIVER.shell)


def default_app_name(command):
    """Name an app after its script (node server.js -> server) or program."""
    if needs_shell(command):
        argv = command.split()[:1]
    else:
        try:
            argv = split_command(command, DRIVER.shell)
        except ValueError:
            argv = command.split()
    base = os.path.basename(argv[0]) if argv else "app"
    if base.split(".")[0] in _SCRIPT_RUNNERS or base.startswith("python"):
        args = iter(argv[1:])
        for arg in args:
            if arg in ("-c", "-e", "--eval"):
                break  # inline code: the runner's name is all we have
            if arg == "-m":
                base = next(args, base) + ".py"  # a module name keeps its dots
                break
            if not arg.startswith("-"):
                base = os.path.basename(arg.rstrip("/")) or base
                break
    stem = os.path.splitext(base)[0] if "." in base[1:] and not base.startswith("python") else base
    clean = "".join(c if (c.isalnum() or c in "-_.@:") else "-" for c in stem).strip("-.") or "app"
    if clean.isdigit() or clean == "all":
        clean = "app-" + clean
    return clean


def health_kind(spec):
    """Return "cmd", "http", "tcp" or None: which health check the app has."""
    if spec.health_cmd:
        return "cmd"
    if spec.health_http:
        return "http"
    if spec.health_tcp:
        return "tcp"
    return None


def child_environment(spec, base_env, app_id, home_root):
    """Return the environment for one spawn of `spec` (or its health command): base, then app env, then ours.

    OXMGR_HOME lets an oxmgr run inside the app find this daemon, and with
    OXMGR_ID it marks the process as ours for a daemon after a kill -9.
    """
    env = dict(base_env)
    env.update(spec.env)
    env[ENV_HOME] = home_root
    env["OXMGR_NAME"] = spec.name
    env["OXMGR_ID"] = str(app_id)
    if spec.instance is not None:
        env[spec.instance_var] = str(spec.instance)
    return env


# =============================================================================
# 8. Config files: oxfile.toml and PM2 ecosystem files
# =============================================================================
#
# Both formats become the same AppSpec. Each reader returns plain data; one
# mapper per format turns its keys (with its own units) into AppSpec fields;
# expansion, ordering and the dependency checks are shared. Every problem is
# collected as "file: app 'name': key: what is wrong", so `validate` can list
# them all at once.


class Config:
    """Apps loaded from config files: expanded, ordered, with warnings."""

    def __init__(self):
        self.apps = []          # AppSpec per instance, in start order, after --only
        self.groups = []        # (file, first instance's AppSpec, {profile: overrides}, fields): for convert
        self.all_names = []     # every expanded name in the files, before --only (prune scope)
        self.warnings = []
        self.files = []


class _Problems:
    """Collect config problems; raise them together as one ConfigError."""

    def __init__(self):
        self.lines = []

    def add(self, where, key, message):
        self.lines.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def check(self):
        if self.lines:
            raise ConfigError("\n".join(self.lines))


# -- environment expansion -------------------------------------------------------

_VAR_PATTERN = r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"


def expand_vars(text, environ=None, missing=None):
    """Expand $VAR, ${VAR}, ${VAR:-default} and a leading ~, as a shell would.

    An unset variable becomes "" and its name is appended to `missing`;
    $$ is a literal $.
    """
    import re
    environ = os.environ if environ is None else environ

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        default = m.group(2)
        value = environ.get(name)
        if value is not None and (value or default is None):
            return value
        if default is not None:
            return default
        if missing is not None:
            missing.append(name)
        return ""

    out = re.sub(_VAR_PATTERN, sub, text)
    if out == "~" or out.startswith("~/"):
        out = os.path.expanduser(out)
    return out


# -- TOML ---------------------------------------------------------------------------


def toml_loads(text, path, builtin=False):
    """Parse TOML with tomllib (3.11+), else tomli, else the built-in subset reader."""
    if not builtin:
        try:
            import tomllib as toml  # novermin  (3.11+; tomli or the built-in reader otherwise)
        except ImportError:
            try:
                import tomli as toml
            except ImportError:
                toml = None
        if toml is not None:
            try:
                return toml.loads(text)
            except toml.TOMLDecodeError as exc:
                import re
                # "... (at line 4, column 11)" -> "path:4:11: ...", as the built-in reader says it
                m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", str(exc))
                where = f"{path}:{m.group(1)}:{m.group(2)}" if m else path
                message = str(exc)[:m.start()] if m else str(exc)
                raise ConfigError(f"{where}: invalid TOML: {message}") from None
    return _MiniToml(text, path).parse()


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


class _MiniToml:
    """Read the TOML subset oxfiles use, for Python < 3.11 without tomli.

    Tables, arrays of tables, dotted keys, the four string kinds, integers,
    floats, booleans, arrays and inline tables. Dates and times, and table
    layouts that need TOML's finer redefinition rules, are errors that name
    the line: never a guessed value.
    """

    def __init__(self, text, path):
        self.src = text
        self.pos = 0
        self.path = path
        self.root = {}
        self.headers = set()     # ids of tables opened by a [header]
        self.dotted = set()      # ids of tables made by dotted keys
        self.frozen = set()      # ids of inline tables and static arrays
        self.aot = set()         # ids of lists made by [[header]]

    def error(self, message, pos=None):
        pos = self.pos if pos is None else pos
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        raise ConfigError(f"{self.path}:{line}:{col}: {message}")

    def unsupported(self, what):
        self.error(f"{what} is outside the TOML subset the built-in reader handles; "
                   f"use Python 3.11+ or install tomli")

    def peek(self, n=1):
        return self.src[self.pos:self.pos + n]

    def skip_ws(self):
        while self.pos < len(self.src) and self.src[self.pos] in " \t":
            self.pos += 1

    def skip_comment(self):
        if self.peek() == "#":
            end = self.src.find("\n", self.pos)
            self.pos = len(self.src) if end < 0 else end

    def skip_blank(self):
        """Skip whitespace, comments and newlines (between statements or in arrays)."""
        while True:
            self.skip_ws()
            self.skip_comment()
            if self.peek() == "\n":
                self.pos += 1
            elif self.peek(2) == "\r\n":
                self.pos += 2
            else:
                return

    def end_of_line(self):
        self.skip_ws()
        self.skip_comment()
        if self.pos >= len(self.src):
            return
        if self.peek() == "\n":
            self.pos += 1
        elif self.peek(2) == "\r\n":
            self.pos += 2
        else:
            self.error(f"expected the end of the line, found {self.peek()!r}")

    def parse(self):
        table = self.root
        while True:
            self.skip_blank()
            if self.pos >= len(self.src):
                return self.root
            if self.peek(2) == "[[":
                self.pos += 2
                table = self.open_array_table(self.parse_key("]]"))
                if self.peek(2) != "]]":
                    self.error("expected ']]' to close the array-of-tables header")
                self.pos += 2
            elif self.peek() == "[":
                self.pos += 1
                table = self.open_table(self.parse_key("]"))
                if self.peek() != "]":
                    self.error("expected ']' to close the table header")
                self.pos += 1
            else:
                self.key_value(table, inline=False)
            self.end_of_line()

    def parse_key(self, closer=None):
        keys = []
        while True:
            self.skip_ws()
            c = self.peek()
            if c == '"':
                if self.peek(3) == '"""':
                    self.error("a key cannot be a multi-line string")
                keys.append(self.basic_string())
            elif c == "'":
                if self.peek(3) == "'''":
                    self.error("a key cannot be a multi-line string")
                keys.append(self.literal_string())
            else:
                start = self.pos
                while self.pos < len(self.src) and self.src[self.pos] in _BARE_KEY:
                    self.pos += 1
                if start == self.pos:
                    self.error(f"expected a key, found {c!r}" if c else "expected a key, found the end of the file")
                keys.append(self.src[start:self.pos])
            self.skip_ws()
            if self.peek() != ".":
                return keys
            self.pos += 1

    def descend(self, table, key, pos):
        """Step into a parent table for a header; arrays of tables give their last element."""
        node = table.get(key)
        if node is None:
            node = table[key] = {}
            return node
        if isinstance(node, list) and id(node) in self.aot:
            return node[-1]
        if not isinstance(node, dict) or id(node) in self.frozen:
            self.error(f"{key!r} is already a value, not a table", pos)
        return node

    def open_table(self, keys):
        pos = self.pos
        table = self.root
        for key in keys[:-1]:
            table = self.descend(table, key, pos)
        last = keys[-1]
        node = table.get(last)
        if node is None:
            node = table[last] = {}
        elif not isinstance(node, dict) or id(node) in self.frozen:
            self.error(f"table {'.'.join(keys)!r} is already defined as a value", pos)
        elif id(node) in self.headers or id(node) in self.dotted:
            self.error(f"table {'.'.join(keys)!r} is defined twice", pos)
        self.headers.add(id(node))
        return node

    def open_array_table(self, keys):
        pos = self.pos
        table = self.root
        for key in keys[:-1]:
            table = self.descend(table, key, pos)
        last = keys[-1]
        arr = table.get(last)
        if arr is None:
            arr = table[last] = []
            self.aot.add(id(arr))
        elif not isinstance(arr, list) or id(arr) not in self.aot:
            self.error(f"{'.'.join(keys)!r} is already defined and is not an array of tables", pos)
        node = {}
        arr.append(node)
        self.headers.add(id(node))
        return node

    def key_value(self, table, inline):
        pos = self.pos
        keys = self.parse_key()
        if self.peek() != "=":
            self.error(f"expected '=' after the key {'.'.join(keys)!r}")
        self.pos += 1
        self.skip_ws()
        value = self.value()
        for key in keys[:-1]:
            node = table.get(key)
            if node is None:
                node = table[key] = {}
                self.dotted.add(id(node))
            elif not isinstance(node, dict) or id(node) not in self.dotted:
                if isinstance(node, dict) and id(node) not in self.frozen:
                    self.unsupported("a dotted key into a table defined elsewhere")
                self.error(f"{key!r} is already a value, not a table", pos)
            table = node
        if keys[-1] in table:
            self.error(f"key {'.'.join(keys)!r} is defined twice", pos)
        table[keys[-1]] = value

    def value(self):
        c = self.peek()
        if c == '"':
            return self.multiline_basic() if self.peek(3) == '"""' else self.basic_string()
        if c == "'":
            return self.multiline_literal() if self.peek(3) == "'''" else self.literal_string()
        if c == "[":
            return self.array()
        if c == "{":
            return self.inline_table()
        for word, val in (("true", True), ("false", False)):
            if self.src.startswith(word, self.pos) and not self._bare_follows(len(word)):
                self.pos += len(word)
                return val
        return self.number()

    def _bare_follows(self, n):
        nxt = self.src[self.pos + n:self.pos + n + 1]
        return bool(nxt) and nxt in _BARE_KEY

    def number(self):
        import re
        start = self.pos
        m = re.compile(r"[0-9+\-_.eExobXOBa-fA-F:infatTzZ ]*").match(self.src, self.pos)
        token = m.group(0).split(" ")[0] if m else ""
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}.*|\d{2}:\d{2}.*", token):
            self.unsupported("a date or time")
        m = re.compile(r"[+-]?(inf|nan)(?![A-Za-z0-9_-])").match(self.src, self.pos)
        if m:
            self.pos = m.end()
            return float(m.group(0))
        for prefix, base, digits in (("0x", 16, "0-9A-Fa-f"), ("0o", 8, "0-7"), ("0b", 2, "01")):
            m = re.compile(rf"{prefix}([{digits}](?:_?[{digits}])*)(?![A-Za-z0-9_.-])").match(self.src, self.pos)
            if m:
                self.pos = m.end()
                return int(m.group(1).replace("_", ""), base)
        m = re.compile(r"[+-]?(?:0|[1-9](?:_?[0-9])*)(\.[0-9](?:_?[0-9])*)?([eE][+-]?[0-9](?:_?[0-9])*)?"
                       r"(?![A-Za-z0-9_.:-])").match(self.src, self.pos)
        if m and m.end() > start:
            self.pos = m.end()
            text = m.group(0).replace("_", "")
            return float(text) if (m.group(1) or m.group(2)) else int(text)
        self.error(f"expected a value (string, number, true/false, array or table), found {token or self.peek()!r}",
                   start)

    def basic_string(self):
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.src):
                self.error("unterminated string")
            c = self.src[self.pos]
            if c == '"':
                self.pos += 1
                return "".join(out)
            if c == "\n":
                self.error("unterminated string (a newline inside \"...\"; use \"\"\"...\"\"\" for several lines)")
            if c == "\\":
                out.append(self.escape())
                continue
            if (c < " " and c != "\t") or c == "\x7f":
                self.error(f"control character {c!r} in a string; escape it")
            out.append(c)
            self.pos += 1

    def escape(self):
        c = self.src[self.pos + 1:self.pos + 2]
        if c in _TOML_ESCAPES:
            self.pos += 2
            return _TOML_ESCAPES[c]
        if c in ("u", "U"):
            n = 4 if c == "u" else 8
            digits = self.src[self.pos + 2:self.pos + 2 + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.error(f"bad \\{c} escape: expected {n} hex digits")
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                self.error(f"\\{c}{digits} is not a Unicode scalar value")
            self.pos += 2 + n
            return chr(code)
        self.error(f"unknown escape \\{c}")

    def multiline_basic(self):
        self.pos += 3
        if self.peek() == "\n":
            self.pos += 1
        elif self.peek(2) == "\r\n":
            self.pos += 2
        out = []
        while True:
            if self.pos >= len(self.src):
                self.error('unterminated """ string')
            if self.peek(3) == '"""':
                extra = 0
                while extra < 2 and self.src[self.pos + 3 + extra:self.pos + 4 + extra] == '"':
                    extra += 1
                out.append('"' * extra)
                self.pos += 3 + extra
                return "".join(out)
            c = self.src[self.pos]
            if c == "\\":
                rest = self.pos + 1
                while rest < len(self.src) and self.src[rest] in " \t":
                    rest += 1
                if self.src[rest:rest + 1] == "\n" or self.src[rest:rest + 2] == "\r\n":
                    # a line-ending backslash trims the newline and the indentation after it
                    self.pos = rest
                    while self.pos < len(self.src) and self.src[self.pos] in " \t\r\n":
                        self.pos += 1
                    continue
                out.append(self.escape())
                continue
            if c == "\r" and self.peek(2) == "\r\n":
                out.append("\n")
                self.pos += 2
                continue
            if (c < " " and c not in "\t\n") or c == "\x7f":
                self.error(f"control character {c!r} in a string; escape it")
            out.append(c)
            self.pos += 1

    def literal_string(self):
        end = self.src.find("'", self.pos + 1)
        newline = self.src.find("\n", self.pos + 1)
        if end < 0 or (0 <= newline < end):
            self.error("unterminated string")
        text = self.src[self.pos + 1:end]
        if any((c < " " and c != "\t") or c == "\x7f" for c in text):
            self.error("control character in a literal string")
        self.pos = end + 1
        return text

    def multiline_literal(self):
        self.pos += 3
        if self.peek() == "\n":
            self.pos += 1
        elif self.peek(2) == "\r\n":
            self.pos += 2
        end = self.src.find("'''", self.pos)
        if end < 0:
            self.error("unterminated ''' string")
        extra = 0
        while extra < 2 and self.src[end + 3 + extra:end + 4 + extra] == "'":
            extra += 1
        text = self.src[self.pos:end + extra].replace("\r\n", "\n")
        if any((c < " " and c not in "\t\n") or c == "\x7f" for c in text):
            self.error("control character in a literal string")
        self.pos = end + 3 + extra
        return text

    def array(self):
        self.pos += 1
        items = []
        while True:
            self.skip_blank()
            if self.peek() == "]":
                self.pos += 1
                break
            items.append(self.value())
            self.skip_blank()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() == "]":
                self.pos += 1
                break
            else:
                self.error(f"expected ',' or ']' in an array, found {self.peek()!r}")
        self.frozen.add(id(items))
        return items

    def inline_table(self):
        self.pos += 1
        table = {}
        self.skip_ws()
        if self.peek() == "}":
            self.pos += 1
        else:
            while True:
                self.skip_ws()
                self.key_value(table, inline=True)
                self.skip_ws()
                if self.peek() == ",":
                    self.pos += 1
                elif self.peek() == "}":
                    self.pos += 1
                    break
                else:
                    self.error(f"expected ',' or '}}' in an inline table, found {self.peek()!r}")
        self.frozen.add(id(table))
        self.frozen.update(id(v) for v in table.values() if isinstance(v, dict))
        return table


def _toml_key(key):
    if key and all(c in _BARE_KEY for c in key):
        return key
    return _toml_string(key)


def _toml_string(text):
    out = ['"']
    for c in text:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c < " " or c == "\x7f":
            out.append("\\u%04x" % ord(c))
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# -- JavaScript literals (.json5, and .js/.cjs/.mjs without node) -------------------------


class _NeedsNode(Exception):
    """A .js config computes something: only node can evaluate it."""


class _JsLiteral:
    """Read a JavaScript object/array literal (JSON5 is a subset of this).

    Comments, unquoted keys, single quotes, trailing commas, hex numbers and
    plain template strings are fine. An identifier, call or expression
    raises _NeedsNode naming the line: it only has a value when the file runs.
    """

    def __init__(self, text, path):
        self.src = text
        self.pos = 0
        self.path = path

    def where(self, pos=None):
        pos = self.pos if pos is None else pos
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return f"{self.path}:{line}:{col}"

    def error(self, message, pos=None):
        raise ConfigError(f"{self.where(pos)}: {message}")

    def dynamic(self, start):
        end = start
        while end < len(self.src) and self.src[end] not in ",}]\n":
            end += 1
        snippet = self.src[start:end].strip()[:60]
        raise _NeedsNode(f"{self.where(start)}: {snippet!r} is computed when the file runs")

    def skip(self):
        while self.pos < len(self.src):
            c = self.src[self.pos]
            if c in " \t\r\n\ufeff\u00a0":
                self.pos += 1
            elif self.src.startswith("//", self.pos):
                end = self.src.find("\n", self.pos)
                self.pos = len(self.src) if end < 0 else end
            elif self.src.startswith("/*", self.pos):
                end = self.src.find("*/", self.pos + 2)
                if end < 0:
                    self.error("unterminated /* comment")
                self.pos = end + 2
            else:
                return

    def document(self):
        """Parse a whole .json5 document."""
        self.skip()
        value = self.value()
        self.skip()
        if self.pos < len(self.src):
            self.error(f"unexpected {self.src[self.pos]!r} after the value")
        return value

    def module_export(self):
        """Find `module.exports = <literal>` or `export default <literal>` and read it."""
        import re
        pattern = re.compile(r"module\.exports\s*=|exports\.apps\s*=|export\s+default\b")
        found = None
        while True:
            self.skip()
            if self.pos >= len(self.src):
                break
            c = self.src[self.pos]
            m = pattern.match(self.src, self.pos)
            if m:
                found = m
                self.pos = m.end()
                break
            if c in "'\"`":
                self.string(c)
            else:
                self.pos += 1
        if found is None:
            raise _NeedsNode(f"{self.path}: no 'module.exports = {{...}}' or 'export default {{...}}' literal")
        self.skip()
        value = self.value()
        if found.group(0).startswith("exports.apps"):
            value = {"apps": value}
        self.skip()
        while self.pos < len(self.src) and self.src[self.pos] == ";":
            self.pos += 1
            self.skip()
        if self.pos < len(self.src):
            self.dynamic(self.pos)
        return value

    def value(self):
        self.skip()
        start = self.pos
        c = self.src[self.pos:self.pos + 1]
        if not c:
            self.error("unexpected end of the file")
        if c == "{":
            value = self.obj()
        elif c == "[":
            value = self.arr()
        elif c in "'\"`":
            value = self.string(c)
        elif c in "0123456789.+-":
            value = self.number()
        else:
            word = self.identifier()
            literals = {"true": True, "false": False, "null": None, "undefined": None,
                        "Infinity": float("inf"), "NaN": float("nan")}
            if word not in literals:
                self.dynamic(start)
            value = literals[word]
        self.skip()
        nxt = self.src[self.pos:self.pos + 1]
        if nxt and nxt not in ",}]);":
            self.dynamic(start)  # an operator or call follows: `a + b`, `x || y`, `f(...)`
        return value

    def identifier(self):
        start = self.pos
        while self.pos < len(self.src) and (self.src[self.pos].isalnum() or self.src[self.pos] in "_$"):
            self.pos += 1
        if start == self.pos:
            self.error(f"unexpected {self.src[self.pos]!r}")
        return self.src[start:self.pos]

    def obj(self):
        self.pos += 1
        out = {}
        while True:
            self.skip()
            c = self.src[self.pos:self.pos + 1]
            if c == "}":
                self.pos += 1
                return out
            if c in "'\"":
                key = self.string(c)
            elif c == "[":
                self.dynamic(self.pos)  # a computed key
            elif c == ".":
                self.dynamic(self.pos)  # ...spread
            else:
                key = self.identifier()
            self.skip()
            c = self.src[self.pos:self.pos + 1]
            if c != ":":
                if c in ("(", ",", "}"):
                    self.dynamic(self.pos)  # a method or a shorthand property
                self.error(f"expected ':' after the key {key!r}")
            self.pos += 1
            out[key] = self.value()
            self.skip()
            c = self.src[self.pos:self.pos + 1]
            if c == ",":
                self.pos += 1
            elif c != "}":
                self.error(f"expected ',' or '}}' in an object, found {c!r}")

    def arr(self):
        self.pos += 1
        out = []
        while True:
            self.skip()
            c = self.src[self.pos:self.pos + 1]
            if c == "]":
                self.pos += 1
                return out
            if self.src.startswith("...", self.pos):
                self.dynamic(self.pos)
            out.append(self.value())
            self.skip()
            c = self.src[self.pos:self.pos + 1]
            if c == ",":
                self.pos += 1
            elif c != "]":
                self.error(f"expected ',' or ']' in an array, found {c!r}")

    def string(self, quote):
        start = self.pos
        self.pos += 1
        out = []
        escapes = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}
        while True:
            if self.pos >= len(self.src):
                self.error("unterminated string", start)
            c = self.src[self.pos]
            if c == quote:
                self.pos += 1
                return "".join(out)
            if quote == "`" and self.src.startswith("${", self.pos):
                self.dynamic(start)
            if c == "\n" and quote != "`":
                self.error("unterminated string (a newline inside quotes)", start)
            if c == "\\":
                try:
                    self.pos = self.escape(out, escapes)
                except (ValueError, IndexError):
                    self.error("bad escape in a string")
                continue
            out.append(c)
            self.pos += 1

    def escape(self, out, escapes):
        """Decode the escape at self.pos into out; return the position after it."""
        src, pos = self.src, self.pos
        e = src[pos + 1:pos + 2]
        if e in escapes:
            out.append(escapes[e])
            return pos + 2
        if e == "x":
            out.append(chr(int(src[pos + 2:pos + 4], 16)))
            return pos + 4
        if e == "u":
            if src[pos + 2:pos + 3] == "{":
                end = src.index("}", pos)
                out.append(chr(int(src[pos + 3:end], 16)))
                return end + 1
            digits = src[pos + 2:pos + 6]
            if len(digits) != 4:
                raise ValueError("short \\u escape")
            out.append(chr(int(digits, 16)))
            return pos + 6
        if e == "\n":
            return pos + 2  # a line continuation
        if e == "\r":
            return pos + (3 if src[pos + 2:pos + 3] == "\n" else 2)
        out.append(e)  # \' \" \\ and any other character stand for themselves
        return pos + 2

    def number(self):
        import re
        m = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|Infinity|NaN|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)").match(
            self.src, self.pos)
        if not m:
            self.dynamic(self.pos)
        text = m.group(0)
        self.pos = m.end()
        sign = -1 if text.startswith("-") else 1
        body = text.lstrip("+-")
        if body.lower().startswith("0x"):
            return sign * int(body, 16)
        if body in ("Infinity", "NaN"):
            return sign * float("inf") if body == "Infinity" else float("nan")
        if re.fullmatch(r"\d+", body):
            return sign * int(body)
        return sign * float(body)


def _which(program, environ=None):
    """Find an executable on PATH."""
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    return _which_in(program, (environ or os.environ).get("PATH", os.defpath))


# Loads a config module the way PM2 does (require, or import() for ES modules)
# and prints its value as JSON; functions and undefined fall away.
_NODE_LOADER = r"""
const path = require('path'), url = require('url');
const file = path.resolve(process.argv[1]);
(async () => {
  let mod;
  try { mod = require(file); }
  catch (e) {
    if (e && (e.code === 'ERR_REQUIRE_ESM' || /import statement|export|ES module/.test(String(e.message))))
      mod = await import(url.pathToFileURL(file).href);
    else throw e;
  }
  if (mod && typeof mod === 'object' && 'default' in mod && !('apps' in mod)) mod = mod.default;
  process.stdout.write(JSON.stringify(mod === undefined ? null : mod));
})().catch(e => { process.stderr.write(String((e && e.stack) || e)); process.exit(1); });
"""


def _eval_js_config(path, text):
    """Evaluate a .js/.cjs/.mjs config with node; without node, read its literal."""
    node = os.environ.get("OXMGR_NODE") or _which("node")
    if node and os.path.isfile(node):
        import subprocess
        try:
            result = subprocess.run([node, "-e", _NODE_LOADER, os.path.abspath(path)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.abspath(path)),
                                    timeout=NODE_EVAL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{path}: node did not finish evaluating it within "
                              f"{NODE_EVAL_TIMEOUT_S:g}s (does it wait for something?)") from None
        if result.returncode != 0:
            lines = [ln for ln in result.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "Error" in ln), lines[0] if lines else "no output")
            raise ConfigError(f"{path}: node could not evaluate it: {detail.strip()}")
        try:
            return from_json(result.stdout.decode("utf-8"))
        except ValueError:
            raise ConfigError(f"{path}: node printed something that is not JSON") from None
    try:
        return _JsLiteral(text, path).module_export()
    except _NeedsNode as exc:
        raise ConfigError(f"{exc}; install node to evaluate this file (or set OXMGR_NODE), "
                          f"or write a literal value") from None


def read_config_file(path):
    """Return the raw data of a config file, dispatching on its suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"{path}: unknown config type {suffix or '(none)'!r}; use .toml, .json, .json5, "
                          f".js, .cjs or .mjs")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    if suffix == ".toml":
        return toml_loads(text, path)
    if suffix == ".json":
        try:
            return from_json(text)
        except ValueError as exc:
            raise ConfigError(f"{path}:{getattr(exc, 'lineno', '?')}:{getattr(exc, 'colno', '?')}: "
                              f"invalid JSON: {getattr(exc, 'msg', exc)}") from None
    if suffix == ".json5":
        try:
            return _JsLiteral(text, path).document()
        except _NeedsNode as exc:
            raise ConfigError(f"{exc}; JSON5 holds literal values only") from None
    return _eval_js_config(path, text)


# -- key mapping ---------------------------------------------------------------------


def _cpu_instances(value):
    """PM2's instances: N, "max" or 0 (every CPU), -1 (all but one)."""
    cpus = os.cpu_count() or 1
    if isinstance(value, str) and value.strip().lower() == "max":
        return cpus
    number = _v_int(value)
    if number == 0:
        return cpus
    if number < 0:
        return max(1, cpus + number)
    return number


def _watch_paths(value):
    """watch = true (the app's cwd), a path, or a list of paths; false: off."""
    if isinstance(value, bool):
        return ["."] if value else []
    return _v_str_list_nonempty(value)


def _seconds(unit):
    return lambda value: parse_duration(value, unit)


def _mebibytes(value):
    """Oxmgr's *_mb keys: a number is MiB; a string with a unit ("1G") is read as a size."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return parse_size(f"{value}M")
    if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
        return parse_size(value.strip() + "M")
    return parse_size(value)


# PM2 ecosystem keys: key -> (AppSpec field, converter). Times are ms, as in PM2.
_PM2_KEYS = {
    "name": ("name", None),
    "cwd": ("cwd", None),
    "namespace": ("namespace", None),
    "interpreter": ("interpreter", None),
    "exec_interpreter": ("interpreter", None),
    "interpreter_args": ("interpreter_args", None),
    "node_args": ("interpreter_args", None),
    "instance_var": ("instance_var", None),
    "max_restarts": ("max_restarts", None),
    "min_uptime": ("min_uptime_s", _seconds("ms")),
    "restart_delay": ("restart_delay_s", _seconds("ms")),
    "kill_timeout": ("stop_timeout_s", _seconds("ms")),
    "listen_timeout": ("ready_timeout_s", _seconds("ms")),
    "wait_ready": ("wait_ready", None),
    "stop_exit_codes": ("stop_exit_codes", None),
    "max_memory_restart": ("max_memory_bytes", None),
    "cron_restart": ("cron_restart", None),
    "watch": ("watch", _watch_paths),
    "ignore_watch": ("ignore_watch", None),
    "watch_delay": ("watch_delay_s", _seconds("ms")),
    "out_file": ("out_file", None),
    "output": ("out_file", None),
    "error_file": ("err_file", None),
    "err_file": ("err_file", None),
    "error": ("err_file", None),
    "log_file": ("combined_file", None),
    "log": ("combined_file", None),
    "log_date_format": ("log_date_format", None),
    # Oxmgr's additions to the ecosystem format (its units: seconds)
    "restart_policy": ("restart_policy", None),
    "crash_restart_limit": ("crash_restart_limit", None),
    "max_memory_mb": ("max_memory_bytes", _mebibytes),
    "max_cpu_percent": ("max_cpu_percent", None),
    "kill_signal": ("stop_signal", None),
    "pm2_kill_signal": ("stop_signal", None),
    "stop_timeout": ("stop_timeout_s", _seconds("s")),
    "delay_start": ("start_delay_s", _seconds("s")),
    "start_delay": ("start_delay_s", _seconds("s")),
    "start_order": ("start_order", None),
    "priority": ("start_order", None),
    "health_cmd": ("health_cmd", None),
    "health_interval": ("health_interval_s", _seconds("s")),
    "health_timeout": ("health_timeout_s", _seconds("s")),
    "health_max_failures": ("health_max_failures", None),
    # oxmgr.py's own additions
    "depends_on": ("depends_on", None),
    "health_http": ("health_http", None),
    "health_tcp": ("health_tcp", None),
    "ready_tcp": ("ready_tcp", None),
    "listen": ("listen", None),
}
# Handled in code rather than by the table above.
_PM2_SPECIAL = frozenset({"script", "args", "cmd", "command", "env", "instances", "exec_mode", "autorestart",
                          "exp_backoff_restart_delay", "time", "merge_logs", "combine_logs", "disable_logs",
                          "increment_var", "health"})
# PM2 keys that oxmgr.py reads but does not act on: a warning says so.
_PM2_IGNORED = {
    "source_map_support": "", "vizion": "", "post_update": "", "force": "", "treekill": "",
    "pid_file": "", "log_type": "", "filter_env": "", "appendEnvToName": "", "automation": "",
    "pmx": "", "trace": "", "disable_trace": "", "shutdown_with_message": "", "kill_retry_time": "",
    "uid": "run oxmgr as that user instead", "gid": "run oxmgr as that user instead",
    "deep_monitoring": "", "instance_id_env": "", "max": "", "port": "",
}
# oxfile keys: key -> (AppSpec field, converter). Times are seconds, as in Oxmgr.
_OXFILE_KEYS = {
    "name": ("name", None),
    "command": ("command", None),
    "cwd": ("cwd", None),
    "namespace": ("namespace", None),
    "interpreter": ("interpreter", None),           # oxmgr.py: as PM2's, for converted files
    "interpreter_args": ("interpreter_args", None),
    "restart_policy": ("restart_policy", None),
    "max_restarts": ("max_restarts", None),
    "crash_restart_limit": ("crash_restart_limit", None),
    "restart_delay_secs": ("restart_delay_s", None),
    "start_delay_secs": ("start_delay_s", None),
    "min_uptime_secs": ("min_uptime_s", None),
    "exp_backoff": ("exp_backoff", None),
    "exp_backoff_max_secs": ("backoff_max_s", None),
    "stop_signal": ("stop_signal", None),
    "stop_timeout_secs": ("stop_timeout_s", None),
    "stop_exit_codes": ("stop_exit_codes", None),
    "instance_var": ("instance_var", None),
    "depends_on": ("depends_on", None),
    "start_order": ("start_order", None),
    "health_cmd": ("health_cmd", None),
    "health_http": ("health_http", None),
    "health_tcp": ("health_tcp", None),
    "health_interval_secs": ("health_interval_s", None),
    "health_timeout_secs": ("health_timeout_s", None),
    "health_max_failures": ("health_max_failures", None),
    "wait_ready": ("wait_ready", None),
    "ready_tcp": ("ready_tcp", None),
    "ready_timeout_secs": ("ready_timeout_s", None),
    "max_memory_mb": ("max_memory_bytes", _mebibytes),
    "max_cpu_percent": ("max_cpu_percent", None),
    "watch": ("watch", _watch_paths),
    "ignore_watch": ("ignore_watch", None),
    "watch_delay_secs": ("watch_delay_s", None),
    "cron_restart": ("cron_restart", None),
    "log_date_format": ("log_date_format", None),
    "listen": ("listen", None),
    "unified_logs": ("merge_logs", None),
    "forward_signals": ("forward_signals", None),
    # oxmgr.py's additions, so that a converted PM2 file means the same
    "exp_backoff_factor": ("backoff_factor", None),
}
_OXFILE_SPECIAL = frozenset({"env", "instances", "logs", "disabled", "profiles", "time", "increment_var"})
_OXFILE_LOG_KEYS = {
    "out": ("out_file", None), "err": ("err_file", None), "combined": ("combined_file", None),
    "max_size_mb": ("log_max_bytes", _mebibytes),
    "max_files": ("log_max_files", None), "max_days": ("log_max_age_s", lambda v: parse_duration(v, "d")),
    "date_format": ("log_date_format", None),
}
# Oxmgr oxfile features oxmgr.py does not have; each warning says what to use instead.
_OXFILE_IGNORED = {
    "cluster_mode": "use instances (and listen to share a port)",
    "cluster_instances": "use instances",
    "pre_reload_cmd": "run it before 'oxmgr reload'",
    "cgroup_enforce": "", "deny_gpu": "", "reuse_port": "use listen to share a port",
    "git_repo": "", "git_ref": "", "pull_secret": "",
}
_PATH_FIELDS = ("cwd", "out_file", "err_file", "combined_file")
_EXPANDED_FIELDS = _PATH_FIELDS + ("listen",)


def _map_keys(raw, table, special, ignored, where, problems, warnings, fields):
    """Convert one layer of keys through a key table into AppSpec fields."""
    for key, value in raw.items():
        if key in special or (table is _PM2_KEYS and key.startswith("env_")):
            continue
        if key in table:
            field, convert = table[key]
            try:
                value = convert(value) if convert else value
                if field not in _EXPANDED_FIELDS:  # checked once $VAR and ~ are expanded
                    value = _SPEC_VALIDATORS[field](value)
                fields[field] = value
            except ValueError as exc:
                problems.add(where, key, str(exc))
        elif key in ignored:
            hint = ignored[key]
            warnings.append(f"{where}: {key}: not supported by oxmgr.py, ignored" + (f"; {hint}" if hint else ""))
        else:
            warnings.append(f"{where}: {key}: unknown key, ignored; check its spelling")


def _env_layer(value, where, key, problems):
    if value is None:
        return {}
    try:
        return _v_env(value)
    except ValueError as exc:
        problems.add(where, key, str(exc))
        return {}


def _ecosystem_fields(raw, where, profile, base_dir, problems, warnings):
    """Map one PM2 app object to AppSpec fields (instances not yet expanded)."""
    fields = {}
    _map_keys(raw, _PM2_KEYS, _PM2_SPECIAL, _PM2_IGNORED, where, problems, warnings, fields)
    env = _env_layer(raw.get("env"), where, "env", problems)
    if profile:
        env.update(_env_layer(raw.get(f"env_{profile}"), where, f"env_{profile}", problems))
    fields["env"] = env
    profiles = [k[4:] for k in raw if k.startswith("env_")]
    for key in raw:
        if key.startswith("env_") and not isinstance(raw[key], dict):
            problems.add(where, key, "expected an object of NAME: value")
    health = raw.get("health")
    if isinstance(health, dict):
        sub = {"cmd": "health_cmd", "interval": "health_interval", "timeout": "health_timeout",
               "max_failures": "health_max_failures"}
        _map_keys({sub.get(k, k): v for k, v in health.items()}, _PM2_KEYS, _PM2_SPECIAL, {},
                  f"{where}: health", problems, warnings, fields)
    elif health is not None:
        problems.add(where, "health", "expected an object {cmd, interval, timeout, max_failures}")
    if "autorestart" in raw:
        try:
            if not _v_bool(raw["autorestart"]):
                fields["restart_policy"] = "never"
        except ValueError as exc:
            problems.add(where, "autorestart", str(exc))
    if "exp_backoff_restart_delay" in raw:
        try:
            fields["restart_delay_s"] = parse_duration(raw["exp_backoff_restart_delay"], "ms")
            fields["exp_backoff"] = True
            fields["backoff_factor"] = 1.5  # PM2 grows the delay by half each time
        except ValueError as exc:
            problems.add(where, "exp_backoff_restart_delay", str(exc))
    if raw.get("time") is True and not fields.get("log_date_format"):
        fields["log_date_format"] = DEFAULT_TIME_FORMAT
    if raw.get("disable_logs") is True:
        fields["out_file"] = fields["err_file"] = os.devnull
    mode = str(raw.get("exec_mode", "fork")).lower()
    if mode in ("cluster", "cluster_mode"):
        warnings.append(f"{where}: exec_mode: cluster runs {raw.get('instances', 1)} separate processes here; "
                        f"share a port with listen = [\"tcp://...\"]")
    elif mode not in ("fork", "fork_mode"):
        problems.add(where, "exec_mode", f"expected fork or cluster, got {raw.get('exec_mode')!r}")
    # The command: cmd/command, or script + args (+ interpreter from the extension).
    command = raw.get("cmd", raw.get("command"))
    script = raw.get("script")
    if command is not None and script is not None:
        problems.add(where, "script", "give either script (+ args) or cmd, not both")
    elif script is not None:
        if not isinstance(script, str) or not script.strip():
            problems.add(where, "script", f"expected a file or program, got {script!r}")
        else:
            args = raw.get("args", [])
            if isinstance(args, str):
                try:
                    args = split_words(args)
                except ValueError as exc:
                    problems.add(where, "args", f"cannot split {args!r}: {exc}")
                    args = []
            elif not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
                problems.add(where, "args", f"expected a string or a list of strings, got {args!r}")
                args = []
            cwd = fields.get("cwd") or base_dir
            local = os.path.join(os.path.expanduser(cwd), script)
            if os.sep not in script and os.path.isfile(local):
                script = "./" + script  # a file next to the app, not a program on PATH (PM2's rule)
            command = join_words([script] + [str(a) for a in args])
            if "interpreter" not in fields:
                ext = os.path.splitext(script)[1].lower()
                inferred = {".sh": "bash"}.get(ext) or (INTERPRETERS.get(ext) if ext != ".py" else "python")
                if inferred == "python":
                    inferred = sys.executable or "python3"
                if inferred:
                    fields["interpreter"] = inferred
    elif raw.get("args") is not None and command is not None:
        problems.add(where, "args", "args goes with script; put the arguments in cmd instead")
    if command is None:
        problems.add(where, "script", "each app needs a script (or cmd)")
    else:
        fields["command"] = command
    if isinstance(fields.get("interpreter_args"), str):
        fields["interpreter_args"] = split_words(fields["interpreter_args"])
    if fields.get("interpreter") == "none":
        fields["interpreter"] = None
    if "name" not in fields and command:
        fields["name"] = default_app_name(command if not script else os.path.basename(str(script)))
    instances = raw.get("instances", 1)
    try:
        fields["instances"] = _cpu_instances(instances)
    except ValueError as exc:
        problems.add(where, "instances", str(exc))
        fields["instances"] = 1
    if "increment_var" in raw:
        fields["_increment_var"] = raw["increment_var"]
    if raw.get("merge_logs") or raw.get("combine_logs"):
        fields["merge_logs"] = True
    profile_env = {p: {"env": raw[f"env_{p}"]} for p in profiles if isinstance(raw.get(f"env_{p}"), dict)}
    return fields, profile_env


def _oxfile_fields(layers, where, problems, warnings):
    """Map merged oxfile layers (defaults, app, profile) to AppSpec fields."""
    fields = {}
    env = {}
    for layer_where, layer in layers:
        _map_keys(layer, _OXFILE_KEYS, _OXFILE_SPECIAL, _OXFILE_IGNORED, layer_where, problems, warnings, fields)
        env.update(_env_layer(layer.get("env"), layer_where, "env", problems))
        logs = layer.get("logs")
        if isinstance(logs, dict):
            _map_keys(logs, _OXFILE_LOG_KEYS, frozenset(), {}, f"{layer_where}: logs", problems, warnings, fields)
        elif logs is not None:
            problems.add(layer_where, "logs", "expected a table ([apps.logs])")
        if "instances" in layer:
            try:
                fields["instances"] = _cpu_instances(layer["instances"])
            except ValueError as exc:
                problems.add(layer_where, "instances", str(exc))
        if "increment_var" in layer:
            fields["_increment_var"] = layer["increment_var"]
        if layer.get("time") is True and not fields.get("log_date_format"):
            fields["log_date_format"] = DEFAULT_TIME_FORMAT
    fields["env"] = env
    return fields


def _resolve_paths(fields, base_dir, where, problems, warnings):
    """Expand $VAR and ~ in paths and env values; relative paths are under base_dir."""
    missing = []
    env = fields.get("env") or {}
    fields["env"] = {k: expand_vars(v, missing=missing) for k, v in env.items()}
    for key in _PATH_FIELDS:
        value = fields.get(key)
        if isinstance(value, str) and value:
            value = expand_vars(value, missing=missing)
            if key == "cwd" or value != os.devnull:
                anchor = base_dir if key == "cwd" else (fields.get("cwd") or base_dir)
                value = os.path.normpath(os.path.join(anchor, value))
            fields[key] = value
    if not fields.get("cwd"):
        fields["cwd"] = base_dir
    for key in ("watch", "listen"):
        value = fields.get(key)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            fields[key] = [expand_vars(p, missing=missing) if isinstance(p, str) else p for p in value]
    for name in sorted(set(missing)):
        warnings.append(f"{where}: ${name} is not set; it expands to an empty string")


def _expand(fields, where, problems):
    """Turn one app's fields into AppSpecs: one per instance."""
    fields = dict(fields)
    increment_var = fields.pop("_increment_var", None)
    merge_logs = fields.get("merge_logs") is True
    count = fields.pop("instances", 1)  # the group's size is not stored: it is the number of instances
    base = fields.get("name")
    specs = []
    for i in range(count if count > 1 else 1):
        data = dict(fields)
        data["base_name"] = base
        if count > 1:
            data["name"] = f"{base}-{i}"
            data["instance"] = i
            if not merge_logs:
                # PM2: each instance gets its own file unless merge_logs
                for key in ("out_file", "err_file", "combined_file"):
                    path = data.get(key)
                    if path and path != os.devnull:
                        stem, ext = os.path.splitext(path)
                        data[key] = f"{stem}-{i}{ext}"
            if increment_var:
                env = dict(data.get("env") or {})
                try:
                    env[increment_var] = str(int(env.get(increment_var, os.environ.get(increment_var, "0"))) + i)
                except ValueError:
                    problems.add(where, "increment_var", f"{increment_var} must hold a number to increment")
                data["env"] = env
        try:
            specs.append(AppSpec.from_dict(data, where=where))
        except ConfigError as exc:
            problems.lines.extend(str(exc).splitlines())
            return []
    return specs


def _order(groups, problems):
    """Sort app groups so dependencies come first; start_order breaks ties.

    `groups` is a list of (where, base_name, depends_on, start_order); returns
    base names in start order. Unknown names and cycles are problems.
    """
    import heapq
    names = {g[1]: g for g in groups}
    index = {g[1]: i for i, g in enumerate(groups)}
    for where, name, deps, _ in groups:
        for dep in deps:
            if dep not in names:
                problems.add(where, "depends_on", f"unknown app {dep!r}; the apps are: {', '.join(sorted(names))}")
            elif dep == name:
                problems.add(where, "depends_on", "an app cannot depend on itself")
    pending = {name: {d for d in g[2] if d in names and d != name} for name, g in names.items()}
    ready = [(names[n][3], index[n], n) for n, deps in pending.items() if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, name = heapq.heappop(ready)
        order.append(name)
        for other, deps in pending.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, (names[other][3], index[other], other))
    stuck = [n for n in names if n not in order]
    if stuck and not any("cannot depend on itself" in line for line in problems.lines):
        # Walk the dependency edges from one stuck app until a name repeats: that is the cycle.
        path = [stuck[0]]
        while True:
            nxt = sorted(pending[path[-1]])[0]
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                break
            path.append(nxt)
        problems.add(names[cycle[0]][0], "depends_on", f"dependency cycle: {' -> '.join(cycle)}")
    return order + stuck


def _oxfile_apps(data, path, profile, problems, warnings):
    """Yield (where, fields, profile_overrides) for each app of an oxfile."""
    if not isinstance(data, dict):
        problems.add(path, None, "expected a TOML document")
        return
    version = data.get("version", 1)
    if version != 1:
        problems.add(path, "version", f"only version = 1 is known, got {version!r}")
    for key in data:
        if key == "deploy":
            warnings.append(f"{path}: deploy: not supported by oxmgr.py, ignored")
        elif key not in ("version", "defaults", "apps"):
            warnings.append(f"{path}: {key}: unknown top-level key, ignored")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.add(path, "defaults", "expected a table [defaults]")
        defaults = {}
    for key in ("name", "command", "profiles", "disabled"):
        if key in defaults:
            problems.add(f"{path}: [defaults]", key, "belongs to an app, not to [defaults]")
    apps = data.get("apps")
    if not isinstance(apps, list) or not apps:
        problems.add(path, "apps", "expected at least one [[apps]] table")
        return
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            problems.add(f"{path}: apps[{i}]", None, "expected a table")
            continue
        label = app.get("name") if isinstance(app.get("name"), str) else f"#{i + 1}"
        where = f"{path}: app {label!r}"
        profiles = app.get("profiles", {})
        if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
            problems.add(where, "profiles", "expected [apps.profiles.<name>] tables")
            profiles = {}
        layers = [(f"{path}: [defaults]", defaults), (where, app)]
        if profile and profile in profiles:
            layers.append((f"{where}: profile {profile!r}", profiles[profile]))
        disabled = False
        for _, layer in layers:
            if "disabled" in layer:
                try:
                    disabled = _v_bool(layer["disabled"])
                except ValueError as exc:
                    problems.add(where, "disabled", str(exc))
        if "command" not in app:
            problems.add(where, "command", "each app needs a command")
            continue
        fields = _oxfile_fields(layers, where, problems, warnings)
        fields.setdefault("name", label if label != f"#{i + 1}" else default_app_name(str(app.get("command"))))
        if not disabled:
            yield where, fields, profiles


def _ecosystem_apps(data, path, profile, problems, warnings):
    """Yield (where, fields, profile_overrides) for each app of a PM2 ecosystem file."""
    if isinstance(data, dict) and "apps" in data:
        for key in data:
            if key not in ("apps", "deploy"):
                warnings.append(f"{path}: {key}: unknown top-level key, ignored")
        apps = data["apps"]
        if isinstance(apps, dict):
            apps = [apps]
    elif isinstance(data, list):
        apps = data
    elif isinstance(data, dict) and ("script" in data or "cmd" in data):
        apps = [data]  # a single app, as PM2 also accepts
    else:
        problems.add(path, "apps", "expected { apps: [ ... ] }")
        return
    if not isinstance(apps, list) or not apps:
        problems.add(path, "apps", "expected a non-empty list of apps")
        return
    base_dir = os.path.dirname(os.path.abspath(path))
    for i, app in enumerate(apps):
        label = app.get("name") if isinstance(app, dict) and isinstance(app.get("name"), str) else None
        where = f"{path}: apps[{i}]" + (f" {label!r}" if label else "")
        if not isinstance(app, dict):
            problems.add(where, None, "expected an object")
            continue
        fields, profiles = _ecosystem_fields(app, where, profile, base_dir, problems, warnings)
        yield where, fields, profiles


def load_config(paths, profile=None, only=None):
    """Load config files into a Config: validated, expanded, in start order.

    Raises ConfigError listing every problem (file, app, key) at once.
    """
    if isinstance(paths, str):
        paths = [paths]
    problems = _Problems()
    config = Config()
    groups = []        # (where, fields, profiles)
    for path in paths:
        config.files.append(os.path.abspath(path))
        try:
            data = read_config_file(path)
        except ConfigError as exc:
            problems.lines.append(str(exc))
            continue
        base_dir = os.path.dirname(os.path.abspath(path))
        reader = _oxfile_apps if path.lower().endswith(".toml") else _ecosystem_apps
        found_profile = False
        apps = reader(data, path, profile, problems, config.warnings)
        while True:
            before = len(problems.lines)
            item = next(apps, None)
            if item is None:
                break
            where, fields, profiles = item
            found_profile = found_profile or (profile in profiles)
            _resolve_paths(fields, base_dir, where, problems, config.warnings)
            # an app whose keys already failed is not expanded: one message per problem
            groups.append((where, fields, profiles, path, len(problems.lines) == before))
        if profile and not found_profile and not problems.lines:
            config.warnings.append(f"{path}: no app has a profile {profile!r} (--env {profile}); "
                                   f"using the base settings")
    seen = {}
    for where, fields, _, _, _ in groups:
        name = fields.get("name")
        if isinstance(name, str) and name in seen:
            problems.add(where, "name", f"{name!r} is already used by {seen[name]}")
        seen[name] = where
    expanded = {}
    names_seen = {}
    for where, fields, profiles, path, valid in groups:
        if not valid:
            continue
        before = len(problems.lines)
        specs = _expand(fields, where, problems) if isinstance(fields.get("name"), str) else []
        if len(problems.lines) > before or not specs:
            continue
        expanded[fields["name"]] = (where, specs)
        config.groups.append((path, specs[0], profiles, fields))
        for spec in specs:
            if spec.name in names_seen and names_seen[spec.name] != fields["name"]:
                problems.add(where, "name",
                             f"instance name {spec.name!r} collides with app {names_seen[spec.name]!r}")
            names_seen[spec.name] = fields["name"]
    order = _order([(where, f["name"], f.get("depends_on") or [], f.get("start_order", 0))
                    for where, f, _, _, _ in groups if isinstance(f.get("name"), str)], problems)
    problems.check()
    wanted = None
    if only:
        wanted = {n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()}
        unknown = sorted(n for n in wanted if n not in expanded and n not in names_seen)
        if unknown:
            raise ConfigError(f"--only {', '.join(unknown)}: no such app in {', '.join(paths)}; "
                              f"the apps are: {', '.join(sorted(expanded))}")
    for base in order:
        for spec in expanded.get(base, (None, []))[1]:
            config.all_names.append(spec.name)
            if wanted is None or base in wanted or spec.name in wanted:
                config.apps.append(spec)
    return config


# AppSpec fields a converted oxfile does not write directly: derived, or in [apps.logs].
_DUMP_SKIP = frozenset({"name", "command", "base_name", "instance", "env", "out_file", "err_file",
                        "combined_file", "log_max_bytes", "log_max_files", "log_max_age_s"})


def dump_oxfile(config, profile=None):
    """Write a Config's apps as oxfile.toml text that loads to the same apps."""
    field_to_key = {}
    for key, (field, _) in _OXFILE_KEYS.items():
        field_to_key.setdefault(field, key)
    defaults = AppSpec(name="x", command="x").to_dict()
    lines = ["# Converted by oxmgr.py " + __version__ + (f" with profile {profile!r} applied" if profile else ""),
             "version = 1", ""]
    for _path, spec, profiles, fields in config.groups:
        data = spec.to_dict()
        lines.append("[[apps]]")
        lines.append(f"name = {_toml_value(spec.base_name or spec.name)}")
        lines.append(f"command = {_toml_value(spec.command)}")
        if fields.get("instances", 1) != 1:
            lines.append(f"instances = {fields['instances']}")
        if fields.get("_increment_var"):
            lines.append(f"increment_var = {_toml_value(fields['_increment_var'])}")
        for field, value in data.items():
            if field in _DUMP_SKIP or value == defaults[field] or field not in field_to_key:
                continue
            if field == "max_memory_bytes":
                value = value >> 20 if value % (1 << 20) == 0 else f"{value}b"
            elif isinstance(value, float) and value == int(value):
                value = int(value)
            lines.append(f"{_toml_key(field_to_key[field])} = {_toml_value(value)}")
        if spec.env:
            lines += ["", "[apps.env]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in spec.env.items()]
        logs = {}
        for key, (field, _) in _OXFILE_LOG_KEYS.items():
            value = fields.get(field) if field in ("out_file", "err_file", "combined_file") else data.get(field)
            if value is None or field == "log_date_format":
                continue
            if field == "log_max_bytes":
                value = value / (1 << 20)
            elif field == "log_max_age_s":
                value = value / 86400.0
            logs[key] = int(value) if isinstance(value, float) and value == int(value) else value
        if logs:
            lines += ["", "[apps.logs]"] + [f"{k} = {_toml_value(v)}" for k, v in logs.items()]
        if not profile:
            for pname, overrides in sorted(profiles.items()):
                penv = overrides.get("env") if isinstance(overrides, dict) else None
                if penv:
                    lines += ["", f"[apps.profiles.{_toml_key(pname)}.env]"]
                    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in _v_env(penv).items()]
        lines.append("")
    return "\n".join(lines)


# =============================================================================
# 9. State store, logs and the line framer
# =============================================================================


class Home:
    """The paths under OXMGR_HOME; nothing is created until ensure()."""

    def __init__(self, root=None):
        self.root = os.path.abspath(root or DRIVER.default_home())
        join = os.path.join
        self.state = join(self.root, "state.json")
        self.state_backup = join(self.root, "state.json.bak")
        self.sock = join(self.root, "daemon.sock")
        self.token = join(self.root, "daemon.token")
        self.addr = join(self.root, "daemon.addr")
        self.pid_file = join(self.root, "daemon.pid")
        self.lock = join(self.root, "daemon.lock")
        self.daemon_log = join(self.root, "daemon.log")
        self.logs = join(self.root, "logs")

    def ensure(self):
        """Create the home (0700) and its log directory; tighten a loose home.

        Returns a warning string when the mode had to be fixed, else None.
        """
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        warning = DRIVER.secure_home(self.root)
        os.makedirs(self.logs, mode=0o700, exist_ok=True)
        st = os.lstat(self.logs)  # planted while the home was open, it could point our appends anywhere
        if not DRIVER.owned_by_us(st) or os.path.islink(self.logs):
            raise OxmgrError(f"{self.logs!r} is not a directory of yours (uid {st.st_uid}); remove it")
        return warning

    def log_path(self, name, stream):
        """Return the default log path of an app stream ("out" or "err")."""
        return os.path.join(self.logs, f"{name}.{stream}.log")

    @property
    def dump(self):
        """Where `save` writes the app set and `resurrect` reads it."""
        return os.path.join(self.root, "dump.json")

    def notify_path(self, app_id):
        """Return the NOTIFY_SOCKET path of an app (by id: names can be long)."""
        return os.path.join(self.root, "notify", f"{app_id}.sock")


class Status:
    """Process statuses; values are what list, status and --json print."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    RESTARTING = "restarting"   # waiting out a restart delay
    ERRORED = "errored"         # gave up: crash loop or spawn failure

    ALL = ("starting", "running", "stopping", "stopped", "crashed", "restarting", "errored")


# Statuses with a live (or about to be live) process.
ALIVE_STATUSES = frozenset({Status.STARTING, Status.RUNNING, Status.STOPPING, Status.RESTARTING})

_RECORD_FIELDS = (
    # name, default
    ("id", None),
    ("status", Status.STOPPED),
    ("desired", "stopped"),         # what the user asked for: "running" or "stopped"
    ("pid", None),
    ("pgid", None),
    ("start_ticks", None),          # /proc start time; with pid, proves identity
    ("started_at", None),           # wall clock of the last spawn
    ("created_at", None),
    ("restart_count", 0),           # restarts since creation or the last reset
    ("last_exit_code", None),
    ("last_signal", None),
    ("status_reason", None),        # why the status is what it is (errored, crashed...)
    ("restart_reason", None),       # why a rule (health, limit, watch, cron) last restarted it
    ("other_groups", None),         # [pgid, start_ticks] of a reload's replacement or retired run
    ("base_env", None),             # environment of the CLI that started the app
)


class ProcessRecord:
    """One managed app as persisted: its spec plus runtime fields."""

    __slots__ = ("spec",) + tuple(name for name, _ in _RECORD_FIELDS)

    def __init__(self, spec, **values):
        self.spec = spec
        for name, default in _RECORD_FIELDS:
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"unknown ProcessRecord fields: {sorted(values)}")
        if self.base_env is None:
            self.base_env = {}
        if self.other_groups is None:
            self.other_groups = []

    @property
    def name(self):
        return self.spec.name

    def to_dict(self):
        """Return the whole record, its environment inline (save's dump.json)."""
        out = {"id": self.id, "name": self.spec.name}
        for name, _ in _RECORD_FIELDS[1:]:
            out[name] = getattr(self, name)
        out["spec"] = self.spec.to_dict()
        return out

    def to_state(self, env_index):
        """Return the record as state.json stores it: the environment as an index into "envs"."""
        out = {"id": self.id, "name": self.spec.name}
        for name, _ in _RECORD_FIELDS[1:-1]:  # base_env is last: written as env_index
            out[name] = getattr(self, name)
        out["base_env"] = env_index
        out["spec"] = self.spec.compact()
        return out

    @classmethod
    def from_dict(cls, data):
        """Rebuild a record; raises StateError naming what is wrong."""
        if not isinstance(data, dict):
            raise StateError(f"process entry is {type(data).__name__}, not an object")
        ident = data.get("id")
        if not isinstance(ident, int) or isinstance(ident, bool) or ident < 0:
            raise StateError(f"process entry has no valid id: {ident!r}")
        raw = data.get("spec")
        if isinstance(raw, dict) and "instances" in raw:  # written by 0.1, which stored the group size
            raw = {k: v for k, v in raw.items() if k != "instances"}
        try:
            spec = AppSpec.from_dict(raw, where=f"process {ident}")
        except ConfigError as exc:
            raise StateError(str(exc)) from None
        values = {}
        for name, default in _RECORD_FIELDS:
            values[name] = data.get(name, default)
        if values["status"] not in Status.ALL:
            raise StateError(f"process {ident}: unknown status {values['status']!r}")
        for key in ("pid", "pgid", "start_ticks", "last_exit_code", "last_signal", "restart_count"):
            if values[key] is not None and (not isinstance(values[key], int) or isinstance(values[key], bool)):
                raise StateError(f"process {ident}: {key} must be an integer")
        if not isinstance(values["base_env"] or {}, dict):
            raise StateError(f"process {ident}: base_env must be an environment")
        groups = values["other_groups"] or []
        if not isinstance(groups, list) or not all(isinstance(g, list) and len(g) == 2 and all(
                n is None or isinstance(n, int) and not isinstance(n, bool) for n in g) for g in groups):
            raise StateError(f"process {ident}: other_groups must be a list of [pgid, start_ticks]")
        return cls(spec, **values)


def save_state(home, next_id, records, sync=True):
    """Persist the process set atomically, keeping the previous good copy.

    It runs after every lifecycle change. Apps started from one shell share
    one environment, stored once in "envs".
    """
    env_index = {}   # id(dict) -> index; equal environments share an index too
    by_text = {}
    envs = []
    processes = []
    for rec in records:
        key = id(rec.base_env)
        if key not in env_index:
            text = to_json(rec.base_env or {}, sort_keys=True)
            if text not in by_text:
                by_text[text] = len(envs)
                envs.append(rec.base_env or {})
            env_index[key] = by_text[text]
        processes.append(rec.to_state(env_index[key]))
    text = to_json({"version": 1, "next_id": int(next_id), "envs": envs, "processes": processes})
    atomic_write(home.state, text.encode(), backup=home.state_backup, sync=sync)


def _parse_state(raw):
    data = from_json(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    if not isinstance(data, dict) or not isinstance(data.get("processes"), list):
        raise StateError("expected an object with a 'processes' list")
    envs = data.get("envs", [])
    if not isinstance(envs, list) or not all(isinstance(e, dict) for e in envs):
        raise StateError("'envs' must be a list of environments")
    for item in data["processes"]:
        index = item.get("base_env") if isinstance(item, dict) else None
        if isinstance(index, int) and not isinstance(index, bool):
            if not 0 <= index < len(envs):
                raise StateError(f"process {item.get('id')!r}: base_env {index} is not in 'envs'")
            item["base_env"] = envs[index]
    shared = {}  # records that shared an environment share it again (memory)
    records, skipped = [], []
    for item in data["processes"]:
        try:
            records.append(ProcessRecord.from_dict(item))
        except StateError as exc:  # one bad entry never costs the others; its processes are stopped
            item = item if isinstance(item, dict) else {}
            others = item.get("other_groups")
            groups = [[item.get("pgid"), item.get("start_ticks")]] + (others if isinstance(others, list) else [])
            skipped.append((str(exc), [g for g in groups if isinstance(g, list) and len(g) == 2
                                       and isinstance(g[0], int) and g[0] > 1]))
    for rec in records:
        rec.base_env = shared.setdefault(to_json(rec.base_env or {}, sort_keys=True), rec.base_env)
    ids = [r.id for r in records]
    names = [r.name for r in records]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise StateError("duplicate process id or name")
    next_id = data.get("next_id", 0)
    if not isinstance(next_id, int) or isinstance(next_id, bool):
        raise StateError("next_id must be an integer")
    next_id = max([next_id] + [i + 1 for i in ids])
    return next_id, records, skipped


def read_own_file(path, limit=64 << 20):
    """Return the bytes of a regular file this user owns; None when there is none; StateError otherwise.

    Opened non-blocking and checked on the open descriptor, so a fifo, a
    directory, a symlink loop or another user's planted file is refused
    rather than read, hung on or trusted.
    """
    import stat as stat_mod
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot open {path!r}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise StateError(f"{path!r} is not a regular file; remove it")
        if not DRIVER.owned_by_us(st):
            raise StateError(f"{path!r} belongs to uid {st.st_uid}, not to you; remove it or use your own "
                             f"{ENV_HOME}")
        if st.st_size > limit:
            raise StateError(f"{path!r} is {st.st_size} bytes, more than a state file can be")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as exc:
        raise StateError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load_state(home, leftovers=None):
    """Return (next_id, records, warnings) from state.json, recovering if needed.

    `leftovers` (a list) receives the [pgid, start_ticks] of entries left out,
    so their processes can be stopped rather than orphaned.

    A copy that cannot be read or parsed is reported (and a corrupt one moved
    to state.json.corrupt-<time>), then the last good copy (state.json.bak) is
    tried; with neither, the set starts empty and the warnings say so.
    """
    warnings = []
    for path in (home.state, home.state_backup):
        try:
            raw = read_own_file(path)
            if raw is None:
                continue
            next_id, records, skipped = _parse_state(raw)
        except StateError as exc:
            warnings.append(f"state file {exc}")
            continue
        except (ValueError, RecursionError, MemoryError) as exc:
            aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            try:
                os.replace(path, aside)
            except OSError:
                aside = path
            warnings.append(f"state file {path!r} is unreadable ({str(exc)[:200]}); moved to {aside!r}")
            continue
        for why, groups in skipped:
            warnings.append(f"state file {path!r}: {why}; that app is left out (add it again)")
            if leftovers is not None:
                leftovers.extend(groups)
        if path == home.state_backup:
            warnings.append(f"using the last good copy {path!r}")
        return next_id, records, warnings
    if warnings:
        warnings.append("starting with no apps: no copy of the state could be read")
    return 0, [], warnings

# -- logs ------------------------------------------------------------------------


class LogPolicy:
    """When logs rotate: size in bytes, rotated files kept, their age in seconds."""

    __slots__ = ("max_bytes", "max_files", "max_age_s")

    def __init__(self, max_bytes, max_files, max_age_s):
        self.max_bytes = max_bytes      # 0: never rotate by size
        self.max_files = max_files      # rotated files kept: name.log.1 .. .N
        self.max_age_s = max_age_s      # 0: keep rotated files whatever their age

    @classmethod
    def from_env(cls, environ=None):
        """Read OXMGR_LOG_MAX_SIZE_MB, _MAX_FILES, _MAX_DAYS; ConfigError names the bad one."""
        environ = os.environ if environ is None else environ

        def number(var, default, integer=False):
            raw = environ.get(var, "").strip()
            if not raw:
                return default
            try:
                value = int(raw) if integer else float(raw)
            except ValueError:
                value = -1
            if value < 0:
                kind = "a whole number" if integer else "a number"
                raise ConfigError(f"{var}={raw!r}: expected {kind} >= 0; unset it for the default")
            return value

        size_mb = number(ENV_LOG_MAX_SIZE_MB, DEFAULT_LOG_MAX_SIZE_MB)
        files = number(ENV_LOG_MAX_FILES, DEFAULT_LOG_MAX_FILES, integer=True)
        days = number(ENV_LOG_MAX_DAYS, DEFAULT_LOG_MAX_DAYS)
        return cls(int(size_mb * (1 << 20)), files, days * 86400.0)


class RotatingLog:
    """The append-only log of one app stream, rotated by rename while written.

    The daemon is the only writer, so rotating is close, rename, reopen: no
    copy-then-truncate window where lines are lost (pm2-logrotate's flaw).
    Rotation is checked after each write (supervisor's rule) and happens at a
    line boundary, so a line never straddles two files.
    """

    def __init__(self, path, policy, clock=time.time, owned=True):
        self.path = path
        self.policy = policy
        self.owned = owned            # ours to rotate and flush; any other file is only appended to
        self._clock = clock
        self._fd = None
        self._size = 0
        self._regular = True
        self._at_line_start = True    # the file ends with a newline (or is empty)
        self._opened_at = None

    def _open(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o640)
        st = os.fstat(self._fd)
        import stat as stat_mod
        # bpo-45401: never rotate a non-regular file such as /dev/null or a fifo
        self._regular = stat_mod.S_ISREG(st.st_mode)
        self._size = st.st_size
        self._at_line_start = True
        self._opened_at = self._clock()
        if self._size and self._regular:
            try:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    self._at_line_start = f.read(1) == b"\n"
            except OSError:
                pass  # unreadable: assume a line boundary
            if not self._at_line_start:
                self._write_all(b"\n")  # end a line a killed daemon (or another program) left open

    def write(self, data):
        """Append bytes, rotating first whenever the next line would not fit.

        Files stay within max_bytes unless a single line is longer than that;
        a line with no newline in sight is cut at twice the limit.
        """
        if self._fd is None:
            self._open()
        limit = self.policy.max_bytes if self.owned else 0
        while limit and self._regular and self._size + len(data) > limit:
            room = limit - self._size
            cut = data.rfind(b"\n", 0, max(room, 0)) + 1   # whole lines that still fit
            if not cut:
                if self._size and self._at_line_start:
                    self._rotate()
                    continue
                cut = data.find(b"\n") + 1                  # finish the current line first
                if not cut:
                    if self._size + len(data) < 2 * limit:
                        break
                    cut = len(data)
            self._write_all(data[:cut])
            data = data[cut:]
            self._rotate()
        if data:
            self._write_all(data)

    def _write_all(self, data):
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno == errno.EINTR:  # pragma: no cover
                    continue
                raise
            view = view[n:]
            self._size += n
        self._at_line_start = data[-1:] == b"\n"

    def should_rotate_by_age(self):
        """True when the current file is older than max_age and not empty."""
        age = self.policy.max_age_s
        return bool(age and self.owned and self._fd is not None and self._regular and self._size
                    and self._clock() - self._opened_at >= age)

    def rotate(self):
        """Rotate now (used for age-based rotation and by tests)."""
        if self._fd is None:
            self._open()
        if self._regular and self._size:
            self._rotate()

    def _rotate(self):
        # Close before rename so it also works where open files cannot be renamed.
        close_fd(self._fd)
        self._fd = None
        keep = self.policy.max_files
        if keep <= 0:
            _unlink_quiet(self.path)
        else:
            # Shift only the files that exist (.1 .. .n run without gaps), so a
            # large max_files costs nothing until it fills.
            have = len(self.rotated_paths())
            for i in range(have, keep - 1, -1):
                _unlink_quiet(f"{self.path}.{i}")
            for i in range(min(have, keep - 1), 0, -1):
                _rename_quiet(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            _rename_quiet(self.path, f"{self.path}.1")
        self._prune_by_age()
        self._open()

    def _prune_by_age(self):
        age = self.policy.max_age_s
        if not age:
            return
        cutoff = self._clock() - age
        for path in self.rotated_paths():
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
            except OSError:
                pass  # gone already

    def rotated_paths(self):
        """Return the existing rotated files, newest first."""
        out = []
        i = 1
        while True:
            p = f"{self.path}.{i}"
            if not os.path.exists(p):
                return out
            out.append(p)
            i += 1

    def truncate(self):
        """Empty the current file and delete the rotated ones (flush)."""
        if not self.owned:
            raise OxmgrError(f"not flushing {self.path!r}: oxmgr empties only the logs it owns "
                             f"(in its home, or named *.log)")
        for path in self.rotated_paths():
            _unlink_quiet(path)
        if self._fd is None:
            try:
                os.truncate(self.path, 0)
            except OSError:
                pass
            return
        if self._regular:
            os.ftruncate(self._fd, 0)
            self._size = 0
            self._opened_at = self._clock()

    def close(self):
        if self._fd is not None:
            close_fd(self._fd)
            self._fd = None


def _rename_quiet(src, dst):
    # A file another tool deleted is not an error: rotation must never fail.
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        pass


def move_log_files(old, new):
    """Rename a log and its rotated files (.1 .. .N) to a new path: an app that changed its name."""
    i = 1
    while os.path.exists(f"{old}.{i}"):
        i += 1
    for n in range(i - 1, 0, -1):
        _rename_quiet(f"{old}.{n}", f"{new}.{n}")
    _rename_quiet(old, new)


class LineBuffer:
    """Cut a byte stream at line ends: the one line framer.

    Log files, followers, the console and the control socket all get whole
    lines from it. A line longer than `limit` is passed on in pieces, so
    memory stays bounded; `at_line_start` says whether the next piece
    returned begins a line (it does not after such a cut).
    """

    __slots__ = ("limit", "pieces", "size", "at_line_start")

    def __init__(self, limit=MAX_LINE_BYTES):
        self.limit = limit
        self.pieces = []   # the unterminated rest, kept in pieces: a long line costs no quadratic copying
        self.size = 0
        self.at_line_start = True

    def feed(self, data):
        """Return the whole lines received so far (newlines kept), or a piece of an overlong line."""
        end = data.rfind(b"\n") + 1
        if end:
            if self.pieces:
                self.pieces.append(data[:end])
                out = b"".join(self.pieces)
            else:
                out = data if end == len(data) else data[:end]
            rest = data[end:]
            self.pieces, self.size = ([rest] if rest else []), len(rest)
        else:
            out = b""
            if data:
                self.pieces.append(data)
                self.size += len(data)
        if self.size > self.limit:
            out += self.flush()
        if out:
            self.at_line_start = out.endswith(b"\n")
        return out

    def flush(self):
        """Return the unterminated last line, if any (the stream has ended)."""
        out = b"".join(self.pieces)
        self.pieces, self.size = [], 0
        self.at_line_start = True
        return out


def stamp_lines(data, stamp, at_line_start):
    """Prefix every line that starts in `data` with `stamp` (--time, log_date_format)."""
    parts = data.split(b"\n")
    out = []
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if i == last and not part:
            break  # data ended with a newline: the next line starts later
        out.append(stamp + part if i > 0 or at_line_start else part)
    text = b"\n".join(out)
    return text + b"\n" if data.endswith(b"\n") else text


def _tail_start(f, end, n, block=1 << 16):
    """Scan back from `end`; yield between blocks, return (offset where the last n lines begin, lines found)."""
    if n <= 0 or end == 0:
        return end, 0
    f.seek(end - 1)
    skip = 1 if f.read(1) == b"\n" else 0  # the last line's own newline begins nothing
    need, seen, pos = n + skip, 0, end
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step)
        count = data.count(b"\n")
        if seen + count >= need:
            at = len(data)
            for _ in range(need - seen):
                at = data.rfind(b"\n", 0, at)
            return pos + at + 1, n
        seen += count
        yield
    return 0, seen - skip + 1  # the first line has no newline before it


def tail_scan(path, n):
    """Find the last n lines of a log, reaching back into its rotated files (linear, in steps).

    A generator: it yields between 64 KiB blocks (so a caller on the loop can
    let others run) and returns [(open file, start, end)], oldest first. Every
    file is opened and sized before the first yield, so a rotation meanwhile
    neither hides nor repeats a line.
    """
    files = []
    for i in range(1 << 16):
        name = path if i == 0 else f"{path}.{i}"
        try:
            f = open(name, "rb")
        except FileNotFoundError:
            if i == 0:
                continue  # no current file (yet): older ones may still have lines
            break
        except OSError as exc:  # out of descriptors, a directory...: said, not a silently short tail
            for f, _ in files:
                f.close()
            raise OxmgrError(f"cannot read {name!r}: {exc.strerror or exc}") from None
        files.append((f, os.fstat(f.fileno()).st_size))
    segments = []
    try:
        yield  # the snapshot is taken
        for f, end in files:
            if n <= 0:
                f.close()
                continue
            start, found = yield from _tail_start(f, end, n)
            segments.insert(0, (f, start, end))
            n -= found
    except BaseException:
        for f, _ in files:
            f.close()
        raise
    return segments


def read_segments(segments, chunk=1 << 18):
    """Yield lists of lines (no newline, a CRLF's CR dropped) from tail_scan's segments; closes the files."""
    try:
        for f, start, end in segments:
            f.seek(start)
            left, carry = end - start, b""
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    break
                left -= len(data)
                lines = (carry + data).split(b"\n")
                carry = lines.pop()
                if len(carry) > MAX_LINE_BYTES:  # a line with no end in sight goes in pieces, as it was written
                    lines.append(carry)
                    carry = b""
                yield [line[:-1] if line.endswith(b"\r") else line for line in lines]
            if carry:
                yield [carry[:-1] if carry.endswith(b"\r") else carry]
    finally:
        for f, _, _ in segments:
            f.close()


def tail_log(path, n):
    """Return the last n lines of a log (and its rotated files) as a list of bytes."""
    scan = tail_scan(path, n)
    while True:
        try:
            next(scan)
        except StopIteration as done:
            return [line for lines in read_segments(done.value) for line in lines]


# =============================================================================
# 10. IPC protocol (shared, sync, pure)
# =============================================================================


def encode(msg):
    """Return one protocol frame: a JSON object and a newline."""
    return to_json(msg).encode() + b"\n"


def decode(line, limit=MAX_REQUEST_BYTES):
    """Parse one frame into a dict; raise IpcError for anything else."""
    if len(line) > limit:
        raise IpcError(f"frame of {len(line)} bytes exceeds the {limit}-byte limit")
    try:
        msg = from_json(line.decode("utf-8") if isinstance(line, (bytes, bytearray)) else line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise IpcError(f"frame is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise IpcError(f"frame must be a JSON object, got {type(msg).__name__}")
    return msg


def error_to_wire(exc):
    """Return the reply for a failed request, keeping the error's class name."""
    return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc),
                                   **({"target": exc.target} if isinstance(exc, ProcessNotFound) else {})}}


def error_from_wire(reply):
    """Return the OxmgrError a failed reply stands for (same class when known)."""
    err = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(err, dict):
        return IpcError(f"malformed error reply: {reply!r}")
    kind = err.get("type")
    message = str(err.get("message", "unknown error"))
    if kind == "ProcessNotFound":
        return ProcessNotFound(err.get("target", message))
    cls = _ERROR_TYPES.get(kind, OxmgrError)
    return cls(message) if cls is not SpawnError else SpawnError(message)

# =============================================================================
# 11. App state machine (pure: decisions, no I/O)
# =============================================================================
#
# What an app is and what it wants lives in one AppState: the status, the
# user's wish, whether a child exists, and the restart arithmetic. Each event
# (a request, a spawn, an exit, a timer) is one method that moves the status
# along _TRANSITIONS and returns a Decision; section 12 carries it out. It
# never spawns, sleeps or reads a clock of its own, so every edge and every
# policy is tested without a loop (supervisor's finish() and transition()).

# The only legal status changes; AppState._set enforces them.
_TRANSITIONS = {
    Status.STOPPED: frozenset({Status.STARTING}),
    Status.STARTING: frozenset({Status.RUNNING, Status.STOPPING, Status.STOPPED, Status.CRASHED,
                                Status.RESTARTING, Status.ERRORED}),
    Status.RUNNING: frozenset({Status.STOPPING, Status.STOPPED, Status.CRASHED,
                               Status.RESTARTING, Status.ERRORED}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.STARTING}),   # STARTING: the second half of a restart
    Status.RESTARTING: frozenset({Status.STARTING, Status.STOPPED, Status.ERRORED}),
    Status.CRASHED: frozenset({Status.STARTING, Status.STOPPED}),
    Status.ERRORED: frozenset({Status.STARTING, Status.STOPPED}),
}

# Statuses in which nothing more will happen until someone asks.
SETTLED_STATUSES = frozenset({Status.STOPPED, Status.CRASHED, Status.ERRORED})


def next_backoff(attempt, base_s, cap_s, factor=DEFAULT_BACKOFF_FACTOR, jitter=BACKOFF_JITTER,
                 rand=random_unit):
    """Return the delay before restart `attempt` (0 = first) of a crash loop.

    base * factor**attempt, jittered by +/- `jitter`, never above `cap_s`.
    """
    base = base_s if base_s > 0 else DEFAULT_BACKOFF_BASE_S
    delay = min(cap_s, base * factor ** min(attempt, 64))
    if jitter:
        delay *= 1.0 + jitter * (2.0 * rand() - 1.0)
    return max(0.0, min(cap_s, delay))


def should_restart(policy, exit_code, signum, stop_exit_codes=()):
    """Return True when an exit under `policy` calls for a restart.

    on-failure restarts on a non-zero code or a signal death; an exit code in
    `stop_exit_codes` (PM2) is a deliberate stop under any policy.
    """
    if policy == "never":
        return False
    if exit_code is not None and exit_code in stop_exit_codes:
        return False
    if policy == "always":
        return True
    return signum is not None or exit_code != 0


class Decision:
    """What the app runtime must do next: the state machine's only output."""

    __slots__ = ("action", "delay")
    NOTHING, SPAWN, KILL = "nothing", "spawn", "kill"

    def __init__(self, action, delay=0.0):
        self.action = action    # NOTHING, SPAWN (after delay seconds) or KILL (stop the child)
        self.delay = delay

    def __eq__(self, other):
        return isinstance(other, Decision) and (self.action, self.delay) == (other.action, other.delay)

    def __repr__(self):
        return f"Decision({self.action!r}" + (f", {self.delay:g})" if self.delay else ")")


NOTHING = Decision(Decision.NOTHING)
KILL = Decision(Decision.KILL)


class AppState:
    """The status of one app, what its user wants, and when it restarts.

    Tell a crash loop from a service that fails now and then: an exit before
    min_uptime is unstable; more than max_restarts unstable exits in a row
    give up (not a lifetime budget, unlike Oxmgr), as does going over
    crash_restart_limit restarts within CRASH_WINDOW_S.
    """

    def __init__(self, record, clock, on_change=None):
        self.rec = record            # status, desired, counters: persisted with the app
        self._clock = clock
        self.on_change = on_change or (lambda old, new, reason: None)
        self.has_child = False       # a child of ours runs (or is being stopped)
        self.cause = None            # who asked for the start in progress: "user" or "crash"
        self.then_start = False      # STOPPING ends in STARTING: a restart
        self.unstable = 0            # exits before min_uptime, in a row
        self.recent = collections.deque()   # times of restarts inside CRASH_WINDOW_S
        # Loaded from disk: nothing of ours runs yet, whatever the file says.
        if record.status in ALIVE_STATUSES:
            record.status = Status.STOPPED
        record.pid = None

    @property
    def status(self):
        return self.rec.status

    @property
    def settled(self):
        """True when the app waits for nobody: stopped, crashed or errored."""
        return self.rec.status in SETTLED_STATUSES

    def _set(self, new, reason=None):
        """The one place a status changes: checks _TRANSITIONS, then tells on_change."""
        old = self.rec.status
        if new != old and new not in _TRANSITIONS[old]:
            raise AssertionError(f"{self.rec.spec.name}: illegal transition {old} -> {new}")
        self.rec.status = new
        self.rec.status_reason = reason
        self.on_change(old, new, reason)

    def note(self, reason):
        """Change the reason shown with an unchanged status (a reload that failed)."""
        self._set(self.rec.status, reason)

    def reset(self):
        """Zero the restart counters (`reset`, and every start a user asks for)."""
        self.unstable = 0
        self.recent.clear()

    # -- requests ----------------------------------------------------------------

    def request_start(self):
        """A user (or a config, or a daemon start) wants the app running."""
        self.rec.desired = "running"
        if self.rec.status in ALIVE_STATUSES:
            return NOTHING  # running, starting or about to restart already
        self.reset()
        self.cause = "user"
        self._set(Status.STARTING)  # STOPPED/CRASHED/ERRORED -> STARTING
        return Decision(Decision.SPAWN, self.rec.spec.start_delay_s)

    def request_stop(self, desired="stopped"):
        """Stop: a child is killed, a start that has not spawned or a pending restart just ends.

        `desired` is what a later daemon start should do: "stopped" for a
        user's stop, None to keep the user's wish (daemon shutdown).
        """
        if desired is not None:
            self.rec.desired = desired
        self.then_start = False
        if self.has_child:
            self._set(Status.STOPPING, "stop requested")  # RUNNING/STARTING -> STOPPING
            return KILL
        if self.rec.status in (Status.STARTING, Status.RESTARTING, Status.RUNNING) or (
                desired is not None and self.rec.status in (Status.CRASHED, Status.ERRORED)):
            self._set(Status.STOPPED, "stopped")  # STARTING/RESTARTING (CRASHED/ERRORED for a user) -> STOPPED
        return NOTHING

    def request_restart(self, count=True):
        """Restart: stop the child first (its port must be free), then start; a dead app just starts.

        `count`: a restart counts in restart_count (apply's replace does not).
        """
        self.rec.desired = "running"
        if count and self.rec.status in ALIVE_STATUSES:
            self.rec.restart_count += 1
        if self.has_child:
            self.then_start = True
            self._set(Status.STOPPING, "restart requested")  # RUNNING/STARTING -> STOPPING
            return KILL
        self.reset()
        self.cause = "user"
        self._set(Status.STARTING)  # STOPPED/CRASHED/ERRORED/RESTARTING -> STARTING
        return Decision(Decision.SPAWN, self.rec.spec.start_delay_s)

    def stopped(self, killed):
        """The stopped child and its group are gone."""
        self.has_child = False
        if self.then_start:
            self.then_start = False
            self.reset()
            self.cause = "user"
            self._set(Status.STARTING)  # STOPPING -> STARTING
            return Decision(Decision.SPAWN, self.rec.spec.start_delay_s)
        self._set(Status.STOPPED, "killed after stop_timeout" if killed else "stopped")  # STOPPING -> STOPPED
        return NOTHING

    # -- the child's life -----------------------------------------------------

    def spawned(self, needs_ready):
        """The child runs; without a readiness rule the app is running now."""
        self.has_child = True
        if not needs_ready:
            self._set(Status.RUNNING)  # STARTING -> RUNNING

    def ready(self, how):
        self._set(Status.RUNNING, f"ready: {how}")  # STARTING -> RUNNING

    def spawn_failed(self, what, code=None):
        """The start failed (no program, not ready in time): a user's start gives up, a crash restart counts it."""
        self.has_child = False
        if code is not None:
            self.rec.last_exit_code, self.rec.last_signal = code, None
        if self.cause == "crash":
            return self._after_exit(None, None, 0.0, what, "")  # STARTING -> RESTARTING/ERRORED
        self._set(Status.ERRORED, what)  # STARTING -> ERRORED
        return NOTHING

    def exited(self, code, signum, uptime_s, stderr_tail=""):
        """The child exited: a stop carries on; otherwise the restart policy decides."""
        self.has_child = False
        self.rec.last_exit_code, self.rec.last_signal = code, signum
        if self.rec.status == Status.STOPPING:
            return NOTHING  # the stop that asked for it sweeps the group, then calls stopped()
        return self._after_exit(code, signum, uptime_s, describe_exit(code, signum), stderr_tail)

    def restart_due(self):
        """The restart delay is over: spawn again, unless a user settled the app meanwhile."""
        if self.rec.status != Status.RESTARTING:
            return NOTHING
        self.cause = "crash"
        self._set(Status.STARTING)  # RESTARTING -> STARTING
        return Decision(Decision.SPAWN)

    def _after_exit(self, code, signum, uptime_s, what, stderr_tail):
        spec = self.rec.spec
        failed_start = code is None and signum is None
        if not failed_start and not should_restart(spec.restart_policy, code, signum, spec.stop_exit_codes):
            clean = code == 0 or (code is not None and code in spec.stop_exit_codes)
            self.rec.desired = "exited"  # it finished: a daemon restart will not rerun it; cron may
            self._set(Status.STOPPED if clean else Status.CRASHED, what)  # RUNNING -> STOPPED/CRASHED
            return NOTHING
        give_up = None
        if uptime_s >= spec.min_uptime_s:
            self.unstable = 0
        else:
            self.unstable += 1
            if self.unstable > spec.max_restarts:
                give_up = (f"crash loop: {self.unstable} exits in a row before min_uptime "
                           f"({format_duration(spec.min_uptime_s)}), last {what}")
        if give_up is None and spec.crash_restart_limit:
            now = self._clock()
            while self.recent and now - self.recent[0] > CRASH_WINDOW_S:
                self.recent.popleft()
            if len(self.recent) >= spec.crash_restart_limit:
                give_up = (f"restarted {len(self.recent)} times in {format_duration(CRASH_WINDOW_S)} "
                           f"(crash_restart_limit = {spec.crash_restart_limit}), last {what}")
            else:
                self.recent.append(now)
        if give_up is not None:
            reason = give_up + "; fix the app, then restart it"
            if stderr_tail:
                reason += "; stderr: " + stderr_tail[-300:]
            self._set(Status.ERRORED, reason)  # RUNNING/STARTING -> ERRORED
            return NOTHING
        if spec.exp_backoff:
            base = spec.restart_delay_s or DEFAULT_BACKOFF_BASE_S
            delay = next_backoff(max(0, self.unstable - 1), base, spec.backoff_max_s, spec.backoff_factor)
        else:
            delay = spec.restart_delay_s
        self.rec.restart_count += 1
        self._set(Status.RESTARTING, f"{what}; restarting" + (  # RUNNING/STARTING -> RESTARTING
            f" in {format_duration(round(delay, 3))}" if delay else ""))
        return Decision(Decision.SPAWN, delay)
# =============================================================================
# 12. App runtime (async): one run of one child, the app, its rules
# =============================================================================
#
# The async side carries out what section 11 decides. A Run is one child:
# its pipes go through the line framer into the logs, its exit is a future,
# and stop_tree() is the one stop routine (TERM, KILL after the timeout, then
# the rest of the group). An App owns one AppState and one lock that every
# operation takes, crash restarts included, and _launch() is the one way a
# child starts. Health, limits, watch and cron are small rules that ask the
# app to restart, with a reason.

asyncio = None  # imported lean by load_asyncio() when a daemon or a runtime starts; the CLI never needs it


def load_asyncio():
    """Import asyncio without ssl (~4 MiB and ~5 ms less), then give ssl back for https checks.

    asyncio imports ssl in a try/except and runs without it.
    """
    global asyncio
    if asyncio is None:
        blocked = "ssl" not in sys.modules
        if blocked:
            sys.modules["ssl"] = None
        try:
            import asyncio as module
        finally:
            if blocked and sys.modules.get("ssl", 0) is None:
                del sys.modules["ssl"]
        asyncio = module
    return asyncio


class _StartInterrupted(SpawnError):
    """A stop, restart or delete ended a start that was waiting (start delay, readiness)."""


class _Pipe:
    """One output pipe of a run, as an asyncio protocol: chunks in, EOF noted."""

    __slots__ = ("run", "stream", "transport", "full_reads")

    def __init__(self, run, stream):
        self.run = run
        self.stream = stream
        self.transport = None
        self.full_reads = 0   # reads that emptied a full pipe; -1 once the pipe was grown

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if len(data) >= READ_CHUNK and self.full_reads >= 0:
            # A chatty app: with a bigger pipe it blocks less and we wake less often.
            self.full_reads += 1
            if self.full_reads == CHATTY_READS:
                self.full_reads = -1
                self.run.engine.driver.grow_pipe(self.transport.get_extra_info("pipe").fileno())
        self.run._output(self.stream, data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.run._pipe_closed(self.stream)


class Run:
    """One spawn of a command: its child, its output pipes, its exit.

    `exited` resolves with (code, signum) once the child is reaped and its
    pipes are drained (or DRAIN_GRACE_S has passed while a grandchild holds
    them open): completion needs both, so the last lines are in the log before
    anyone acts on the exit.
    """

    def __init__(self, engine, child, on_output, on_exit=None):
        self.engine = engine
        self.child = child
        self.pid = child.pid
        self.started_at = time.time()
        self.spawned_at = engine.loop.time()
        self.exited = engine.loop.create_future()
        self._on_output = on_output     # fn(stream, chunk of whole lines, chunk starts a line)
        self._on_exit = on_exit         # fn(run), once exited is resolved
        self._framers = {"out": LineBuffer(), "err": LineBuffer()}
        self._open = 2                  # pipes not closed yet
        self._status = None             # (code, signum) once reaped
        self._grace = None
        self.transports = {}            # "out"/"err" -> asyncio read pipe transport
        engine.reaper.watch(child.pid, self._reaped)

    @classmethod
    async def start(cls, engine, argv, cwd, env, listen_fds=(), on_output=None, on_exit=None, gated=False):
        """Spawn argv and connect its pipes; SpawnError if it cannot start.

        gated: the child waits for engine.commit() (see Driver.spawn).
        """
        child = engine.driver.spawn(argv, cwd, env, listen_fds, gated=gated)
        run = cls(engine, child, on_output or (lambda stream, chunk, starts: None), on_exit)
        loop = engine.loop
        try:
            for stream, pipe in (("out", child.stdout), ("err", child.stderr)):
                run.transports[stream], _ = await loop.connect_read_pipe(lambda s=stream: _Pipe(run, s), pipe)
        except BaseException as exc:  # cancelled, or out of descriptors: the child must not outlive this
            engine.driver.kill_tree(run.pid, engine.driver.kill_signal)
            close_fd(child.gate)
            run.close()
            for pipe in (child.stdout, child.stderr):
                pipe.close()
            if isinstance(exc, OSError):
                raise SpawnError(f"cannot read the output of {argv[0]!r}: {exc}") from None
            raise
        return run

    def _output(self, stream, data):
        framer = self._framers[stream]
        starts = framer.at_line_start
        chunk = framer.feed(data)
        if chunk:
            self._on_output(stream, chunk, starts)

    def _flush(self, stream):
        """The stream ended: its unterminated last line is ended here, so the next run's first is its own."""
        framer = self._framers[stream]
        starts = framer.at_line_start
        rest = framer.flush()
        if rest:
            self._on_output(stream, rest + b"\n", starts)

    def _pipe_closed(self, stream):
        self._flush(stream)
        self._open -= 1
        if self._open == 0 and self._status is not None:
            self._finish()

    def _reaped(self, code, signum):
        self.child.reaped(exit_code_number(code, signum))
        self._status = (code, signum)
        if self._open == 0:
            self._finish()
        else:
            self._grace = self.engine.loop.call_later(DRAIN_GRACE_S, self._finish)

    def _finish(self):
        if self.exited.done():
            return
        if self._grace is not None:
            self._grace.cancel()
        for stream in ("out", "err"):
            self._flush(stream)  # a last line without a newline
        self.exited.set_result(self._status)
        if self._on_exit is not None:
            self._on_exit(self)

    def close(self):
        """Stop reading the pipes (the engine is closing; a grandchild may hold them open for good)."""
        for transport in self.transports.values():
            transport.close()

    def signal(self, signum):
        """Send a signal to the run's process tree; False when it is gone."""
        return self.engine.driver.kill_tree(self.pid, signum)

    async def stop(self, signum, timeout):
        """Stop the whole tree (see stop_tree); True when SIGKILL was needed."""
        return await stop_tree(self.engine, self.pid, signum, timeout, self.exited)


async def stop_tree(engine, tree, signum, timeout, exited=None):
    """Stop a process tree: `signum`, then SIGKILL after `timeout`, until no member is left.

    The one stop routine: stop, restart, a reload's retire, health commands,
    shutdown and the leftovers of a killed daemon. The leader's exit (when it
    is our child) is an event; members that outlive it are not our children,
    so they are polled, as systemd's control-group kill mode does. Returns
    True when SIGKILL was needed.
    """
    driver, loop = engine.driver, engine.loop
    deadline = loop.time() + timeout
    killed = False
    driver.kill_tree(tree, signum)
    if exited is not None and not exited.done():
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout)
        except asyncio.TimeoutError:
            killed = True
            driver.kill_tree(tree, driver.kill_signal)
            try:
                await asyncio.wait_for(asyncio.shield(exited), KILL_WAIT_S)
            except asyncio.TimeoutError:
                engine.log(f"pid {tree} survives SIGKILL (stuck in the kernel?)")
                return True
    killed_at = loop.time() if killed else None
    pause = 0.005
    while driver.tree_alive(tree):
        now = loop.time()
        if killed_at is None and now >= deadline:
            driver.kill_tree(tree, driver.kill_signal)
            killed, killed_at = True, now
        elif killed_at is not None and now - killed_at > KILL_WAIT_S:
            engine.log(f"process group {tree} survives SIGKILL (stuck in the kernel?)")
            break
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)
    return killed


async def run_command(engine, command, env, cwd, timeout):
    """Run a shell command (a health check); return (exit code or None on timeout, its output's tail)."""
    chunks = []

    def keep(stream, chunk, starts):
        chunks.append(chunk)
        del chunks[:-8]  # the tail is what explains a failure

    try:
        run = await Run.start(engine, list(engine.driver.shell) + [command], cwd, env, on_output=keep)
    except SpawnError as exc:
        return EXIT_NOT_FOUND, str(exc)
    try:
        code = exit_code_number(*await asyncio.wait_for(asyncio.shield(run.exited), timeout))
    except asyncio.TimeoutError:
        await run.stop(engine.driver.kill_signal, 0)
        code = None
    except asyncio.CancelledError:
        engine.driver.kill_tree(run.pid, engine.driver.kill_signal)  # a check is never left behind
        run.close()
        raise
    return code, b"".join(chunks)[-4096:].decode("utf-8", "replace")


async def _open_tcp(host, port, timeout):
    """Open a TCP connection; localhost is 127.0.0.1, so no resolver thread is needed."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1" if host == "localhost" else host, port), timeout)
    return reader, writer


def _https_status(url, timeout):
    """Blocking GET of an https URL (run in a thread); return the status code."""
    import ssl
    import urllib.error
    import urllib.request
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a health check probes a local service, often self-signed
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def http_status(url, timeout):
    """GET url; return the HTTP status code. http runs on the loop, https in a thread."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() == "https":
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, _https_status, url, timeout), timeout + 1)
    hostport, slash, path = rest.partition("/")
    host, port = split_host_port(hostport) if hostport.rsplit(":", 1)[-1].isdigit() else (hostport.strip("[]"), 80)
    reader, writer = await _open_tcp(host, port, timeout)
    try:
        writer.write(f"GET {slash}{path} HTTP/1.0\r\nHost: {hostport}\r\nUser-Agent: oxmgr-health\r\n"
                     f"Connection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    parts = head.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise OSError(f"not an HTTP reply: {head[:40]!r}")
    return int(parts[1])


async def tcp_accepts(hostport, timeout):
    """Return once host:port accepts a connection; OSError or a timeout otherwise."""
    _, writer = await _open_tcp(*split_host_port(hostport), timeout)
    writer.close()


# -- rules: health, limits, watch, cron --------------------------------------------


class Health:
    """health_cmd, health_http or health_tcp, every interval while the app runs.

    After health_max_failures failed checks in a row the app is restarted.
    The same check also tells readiness (wait_ready with a health rule).
    """

    def __init__(self, app):
        self.app = app
        self.kind = health_kind(app.spec)
        self.status = "starting" if self.kind else "none"
        self.failures = 0          # failed checks in a row
        self.detail = None
        self.checked_at = None
        self._task = None

    def spawned(self):
        self.failures = 0
        self.status = "starting" if self.kind else "none"

    def running(self):
        self.stop()
        if self.kind:
            self._task = self.app.engine.background(self._loop(), self.app.name)

    def stop(self):
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def check(self):
        """Run the check once; return (healthy, detail)."""
        spec = self.app.spec
        timeout = spec.health_timeout_s
        try:
            if spec.health_cmd:
                env = child_environment(spec, self.app.rec.base_env, self.app.rec.id, self.app.engine.home.root)
                code, output = await run_command(self.app.engine, spec.health_cmd, env, spec.cwd, timeout)
                if code is None:
                    return False, f"health_cmd timed out after {format_duration(timeout)}"
                last = output.strip().splitlines()[-1][:120] if output.strip() else ""
                return code == 0, f"health_cmd exit {code}" + (f": {last}" if last else "")
            if spec.health_http:
                status = await http_status(spec.health_http, timeout)
                return 200 <= status < 300, f"HTTP {status}"
            if spec.health_tcp:
                await tcp_accepts(spec.health_tcp, timeout)
                return True, f"{spec.health_tcp} accepts"
        except asyncio.TimeoutError:
            return False, f"no answer within {format_duration(timeout)}"
        except OSError as exc:
            return False, exc.strerror or str(exc)
        except (ValueError, UnicodeError) as exc:  # a reply no HTTP server would send
            return False, f"{type(exc).__name__}: {exc}"
        return True, "no check"

    def record(self, ok, detail):
        self.checked_at = time.time()
        self.detail = detail
        self.failures = 0 if ok else self.failures + 1
        status = "healthy" if ok else "unhealthy"
        if status != self.status:
            self.status = status
            self.app.engine.log(f"{self.app.name}: {status} ({detail})")
            self.app.engine.emit("health", self.app, status=status, detail=detail)

    async def _loop(self):
        app, spec = self.app, self.app.spec
        while True:
            await asyncio.sleep(spec.health_interval_s)
            if app.state.status != Status.RUNNING:
                continue
            ok, detail = await self.check()
            if app.state.status != Status.RUNNING:
                continue
            self.record(ok, detail)
            if not ok and self.failures >= spec.health_max_failures:
                self._task = None
                app.engine.background(app.restart_for(
                    f"health check failed {self.failures} times in a row ({detail})"), app.name)
                return


class Limits:
    """max_memory_bytes at once, max_cpu_percent once sustained: checked after each metrics sample."""

    def __init__(self, app):
        self.app = app
        self.cpu_over = 0          # samples in a row over max_cpu_percent
        self.pending = False       # a limit restart is on its way

    def spawned(self):
        self.cpu_over = 0

    def sampled(self):
        app, spec = self.app, self.app.spec
        if app.state.status != Status.RUNNING or self.pending:
            return
        reason = None
        if spec.max_memory_bytes and app.memory_bytes and app.memory_bytes > spec.max_memory_bytes:
            reason = f"memory {format_bytes(app.memory_bytes)} over the {format_bytes(spec.max_memory_bytes)} limit"
        elif spec.max_cpu_percent and app.cpu_percent is not None:
            self.cpu_over = self.cpu_over + 1 if app.cpu_percent > spec.max_cpu_percent else 0
            if self.cpu_over >= CPU_LIMIT_SAMPLES:
                reason = (f"CPU over {spec.max_cpu_percent:g}% for {self.cpu_over} samples in a row "
                          f"(last {app.cpu_percent:g}%)")
        if reason:
            self.pending = True
            app.engine.background(self._restart(reason), app.name)

    async def _restart(self, reason):
        try:
            await self.app.restart_for(reason)
        finally:
            self.pending = False


class Watch:
    """Restart when files under the app's `watch` paths change, once changes settle (watch_delay)."""

    def __init__(self, app):
        self.app = app
        self._timer = None
        self._changed = None

    def attach(self):
        if self.app.spec.watch:
            self.app.engine.watcher.add(self.app)

    def detach(self):
        if self.app.spec.watch:
            self.app.engine.watcher.remove(self.app)
        self.stop()

    def stop(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def changed(self, path):
        app = self.app
        if app.rec.desired != "running" or app.closed:
            return
        self._changed = path
        self.stop()
        self._timer = app.loop.call_later(app.spec.watch_delay_s, self._fire)

    def _fire(self):
        self._timer = None
        app = self.app
        if app.rec.desired == "running" and not app.closed:
            rel = os.path.relpath(self._changed, app.spec.cwd or "/")
            app.engine.background(app.restart_for(f"watch: {rel} changed"), app.name)


class Cron:
    """cron_restart: restart on schedule (local time), also an app that has exited on its own."""

    def __init__(self, app):
        self.app = app
        self._timer = None
        self.next = None

    def attach(self):
        self.detach()
        if self.app.spec.cron_restart and not self.app.closed:
            self._arm(parse_cron(self.app.spec.cron_restart).next_after(time.time()))

    def detach(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.next = None

    def _arm(self, when):
        self.next = when
        # Re-check at least hourly: the wall clock can jump (NTP, DST) under a long timer.
        self._timer = self.app.loop.call_later(min(when - time.time(), 3600.0), self._tick, when)

    def _tick(self, when):
        self._timer = None
        if time.time() < when - 0.01:
            self._arm(when)
            return
        app = self.app
        self.attach()
        # An app that exited on its own restarts too; one a user stopped does not.
        if app.rec.desired in ("running", "exited") and not app.closed:
            app.engine.background(app.restart_for(f"cron_restart {app.spec.cron_restart!r}"), app.name)


def _watch_ignored(path, root, patterns, extra):
    """True when a changed path must not restart the app.

    Ignored: the usual suspects (.git, node_modules, __pycache__...), the
    paths in `extra` (oxmgr's own logs), and `patterns`: a glob (with * or ?)
    matches the path under the root or any part of it; anything else is a
    regular expression searched in that path (Oxmgr's meaning).
    """
    import fnmatch
    import re
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    if any(part in WATCH_IGNORED_NAMES for part in parts):
        return True
    if any(path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in extra):
        return True
    for pattern in patterns:
        if "*" in pattern or "?" in pattern:
            if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(part, pattern) for part in parts):
                return True
            continue
        try:
            if re.search(pattern, rel):
                return True
        except re.error:
            if pattern in rel:
                return True
    return False


class Watcher:
    """The file watch of every app with `watch`: one driver watch (inotify), or a scan every 2 s.

    Event-driven where the driver can: an idle tree of any size costs no CPU.
    """

    def __init__(self, engine):
        self.engine = engine
        self.watch = None
        self.dirs = {}        # watched directory -> [wd, {app: root}]
        self.wds = {}         # wd -> directory
        self.roots = {}       # app -> [(root, is_dir)]
        self._scan = {}       # app -> {path: (mtime, size)} without a driver watch
        self._scan_timer = None
        self._opened = False

    def _ignored(self, app, path, root):
        extra = [self.engine.home.root] + [p for p in (app.log_path(s) for s in ("out", "err", "combined")) if p]
        return _watch_ignored(path, root, app.spec.ignore_watch, extra)

    def add(self, app):
        base = app.spec.cwd or "/"
        roots = [(root, os.path.isdir(root)) for root in
                 (os.path.normpath(os.path.join(base, os.path.expanduser(e))) for e in app.spec.watch)]
        self.roots[app] = roots
        if not self._opened:
            self._opened = True
            self.watch = self.engine.driver.file_watch()
            if self.watch is not None:
                self.engine.loop.add_reader(self.watch.fileno(), self._read)
        if self.watch is None:
            self._scan[app] = self._snapshot(app)
            if self._scan_timer is None:
                self._scan_timer = self.engine.loop.call_later(2.0, self._poll)
            return
        for root, is_dir in roots:
            if is_dir:
                self._watch_tree(app, root, root)
            elif os.path.isdir(os.path.dirname(root)):
                self._watch_dir(app, os.path.dirname(root), root)
            else:
                self.engine.log_once(f"{app.name}: watch path {root!r} does not exist")

    def _watch_dir(self, app, directory, root):
        entry = self.dirs.get(directory)
        if entry is None:
            try:
                wd = self.watch.add(directory)
            except OSError as exc:
                self.engine.log_once(f"cannot watch {directory!r}: {exc.strerror or exc}"
                                     + ("; raise fs.inotify.max_user_watches" if exc.errno == errno.ENOSPC else ""))
                return
            entry = self.dirs[directory] = [wd, {}]
            self.wds[wd] = directory
        entry[1][app] = root

    def _watch_tree(self, app, top, root):
        for directory, subdirs, _files in os.walk(top):
            subdirs[:] = [d for d in subdirs if not self._ignored(app, os.path.join(directory, d), root)]
            self._watch_dir(app, directory, root)

    def remove(self, app):
        self.roots.pop(app, None)
        self._scan.pop(app, None)
        for directory in list(self.dirs):
            wd, apps = self.dirs[directory]
            apps.pop(app, None)
            if not apps:
                del self.dirs[directory]
                self.wds.pop(wd, None)
                try:
                    self.watch.remove(wd)
                except OSError:
                    pass

    def _read(self):
        for wd, name, kind in self.watch.read():
            if kind == "overflow":
                for app, roots in list(self.roots.items()):  # events were lost: assume a change
                    app.watch.changed(roots[0][0] if roots else app.spec.cwd)
                continue
            directory = self.wds.get(wd)
            if directory is None:
                continue
            if kind == "gone":
                self.wds.pop(wd, None)
                self.dirs.pop(directory, None)
                continue
            path = os.path.join(directory, name) if name else directory
            for app, root in list(self.dirs.get(directory, [None, {}])[1].items()):
                if root != directory and not os.path.isdir(root) and path != root:
                    continue  # a single watched file: other files of its directory do not count
                if self._ignored(app, path, root):
                    continue
                if kind == "new_dir":
                    self._watch_tree(app, path, root)
                app.watch.changed(path)

    def _snapshot(self, app):
        state = {}
        for root, is_dir in self.roots.get(app, ()):
            for directory, subdirs, files in (os.walk(root) if is_dir else [(os.path.dirname(root), [],
                                                                                [os.path.basename(root)])]):
                subdirs[:] = [d for d in subdirs if not self._ignored(app, os.path.join(directory, d), root)]
                for f in files:
                    path = os.path.join(directory, f)
                    if self._ignored(app, path, root):
                        continue
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    state[path] = (st.st_mtime, st.st_size)
        return state

    def _poll(self):  # pragma: no cover  (only where the driver has no file watch)
        self._scan_timer = None
        for app in list(self._scan):
            now = self._snapshot(app)
            before = self._scan[app]
            self._scan[app] = now
            changed = [p for p in set(now) | set(before) if now.get(p) != before.get(p)]
            if changed:
                app.watch.changed(changed[0])
        if self._scan:
            self._scan_timer = self.engine.loop.call_later(2.0, self._poll)

    def close(self):
        if self.watch is not None:
            self.engine.loop.remove_reader(self.watch.fileno())
            self.watch.close()
            self.watch = None
        if self._scan_timer is not None:
            self._scan_timer.cancel()


# -- the app ----------------------------------------------------------------------


class App:
    """One app instance at run time: its state, its current run, its rules.

    Every operation (start, stop, restart, reload, replace, delete, and the
    restart after a crash) holds the one lock, so two never interleave; a
    stop first ends a start that is waiting and cancels a restart that is
    waiting out its delay, then takes the lock.
    """

    def __init__(self, engine, record):
        self.engine = engine
        self.loop = engine.loop
        self.rec = record
        self.state = AppState(record, engine.loop.time, self._status_changed)
        self.run = None              # the current child (None between runs)
        self.logs = {}               # "out"/"err"/"combined" -> RotatingLog, opened on first output
        self.closed = False          # deleted: late timers and rules leave it alone
        self.cpu_percent = None      # of the whole process tree, last sample
        self.memory_bytes = None
        self.metrics_samples = 0     # samples taken of this app (lets a client wait for the next)
        self.notify_status = None    # last STATUS= the app sent
        self.health = Health(self)
        self.limits = Limits(self)
        self.watch = Watch(self)
        self.cron = Cron(self)
        self._err_tail = b""
        self._lock = asyncio.Lock()
        self._restart_task = None    # a crash restart waiting out its delay (not yet holding the lock)
        self._interrupt = None       # resolves to end a start that is waiting
        self._interrupted = []       # why, for each stop, restart or delete waiting for the lock
        self._ready = None           # resolves when the starting child is ready
        self._ready_run = None       # the run it waits for
        self._notify = None          # (socket, address, transport) of NOTIFY_SOCKET, once opened

    @property
    def spec(self):
        return self.rec.spec

    @property
    def name(self):
        return self.rec.spec.name

    def _status_changed(self, old, new, reason):
        self.engine.status_changed(self, old, new, reason)

    def needs_ready(self):
        """True when a start waits for readiness (wait_ready or ready_tcp)."""
        return self.spec.wait_ready or bool(self.spec.ready_tcp)

    def attach(self):
        """Start the rules that run whether or not the app does: watch and cron."""
        self.watch.attach()
        self.cron.attach()

    def detach(self):
        self.watch.detach()
        self.cron.detach()
        self.health.stop()

    # -- output -------------------------------------------------------------

    def log_path(self, stream, spec=None):
        """Return the file of "out", "err" or "combined" (None: no combined log)."""
        spec = spec or self.spec
        custom = {"out": spec.out_file, "err": spec.err_file, "combined": spec.combined_file}[stream]
        if custom or stream == "combined":
            return custom
        return self.engine.home.log_path(spec.base_name if spec.merge_logs and spec.base_name else spec.name, stream)

    def log(self, stream):
        log = self.logs.get(stream)
        if log is None:
            spec = self.spec
            default = self.engine.log_policy
            policy = LogPolicy(default.max_bytes if spec.log_max_bytes is None else spec.log_max_bytes,
                               default.max_files if spec.log_max_files is None else spec.log_max_files,
                               default.max_age_s if spec.log_max_age_s is None else spec.log_max_age_s)
            log = self.logs[stream] = self.engine.acquire_log(self.log_path(stream), policy)
        return log

    def close_logs(self):
        for log in self.logs.values():
            self.engine.release_log(log)
        self.logs = {}

    def _output(self, stream, chunk, starts):
        fmt = self.spec.log_date_format
        if fmt:
            chunk = stamp_lines(chunk, (format_timestamp(fmt) + ": ").encode(), starts)
        if stream == "err":
            self._err_tail = (self._err_tail + chunk)[-4096:]
        if self.engine.write_logs:
            for name in (stream, "combined") if self.spec.combined_file else (stream,):
                try:
                    self.log(name).write(chunk)
                except OSError as exc:
                    self.engine.log_once(f"{self.name}: cannot write {self.log_path(name)!r}: {exc}")
        self.engine.emit("output", self, stream=stream, data=chunk)

    def stderr_tail(self, n=STDERR_TAIL_LINES):
        """Return the last stderr lines (for crash reports)."""
        return self._err_tail.decode("utf-8", "replace").splitlines()[-n:]

    # -- readiness (sd_notify, ready_tcp, health) -------------------------------

    def _open_notify(self):
        """Open this app's NOTIFY_SOCKET (systemd's sd_notify protocol); return its address."""
        if self._notify is None:
            sock, address = self.engine.driver.bind_notify(self.engine.home.notify_path(self.rec.id))
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self._read_notify, sock)
            self._notify = (sock, address)
        return self._notify[1]

    def close_notify(self):
        if self._notify is not None:
            sock, address = self._notify
            self.loop.remove_reader(sock.fileno())
            self.engine.driver.unbind_notify(sock, address)
            self._notify = None

    def _read_notify(self, sock):
        for data, pid, uid in self.engine.driver.read_notify(sock):
            self._on_notify(data, pid, uid)

    def _on_notify(self, data, pid=None, uid=None):
        """One datagram; where the driver knows the sender, only the app's own groups are heard.

        Another user can reach an abstract socket, and during a reload the old
        process must not declare its replacement ready.
        """
        driver = self.engine.driver
        if uid is not None and not driver.trusted_uid(uid):
            self.engine.log_once(f"{self.name}: ignoring NOTIFY_SOCKET messages from uid {uid}")
            return
        awaited = self._ready_run
        group = None
        if pid is not None:
            stats = driver.read_stats(pid)
            group = stats.pgid if stats is not None else None  # gone already: it was ours to send
            if group is not None and group not in {r.pid for r in (self.run, awaited) if r is not None}:
                return
        for line in data.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition("=")
            if key == "READY" and value == "1":
                if self._ready is not None and not self._ready.done() and group in (None, awaited.pid):
                    self._ready.set_result("READY=1")
            elif key == "STATUS":
                self.notify_status = value[:200]

    async def _poll_tcp(self, ready):
        while not ready.done():
            try:
                await tcp_accepts(self.spec.ready_tcp, 1.0)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
                continue
            ready.set_result(f"{self.spec.ready_tcp} accepts")

    async def _poll_health(self, ready):
        while not ready.done():
            ok, detail = await self.health.check()
            if ok:
                self.health.record(True, detail)
                ready.set_result(f"health check passed ({detail})")
            else:
                await asyncio.sleep(0.2)

    async def _await_ready(self, run, interrupt, current):
        """Wait until the run is ready; raise SpawnError (or _StartInterrupted) if it is not."""
        spec = self.spec
        ready = self._ready = self.loop.create_future()
        self._ready_run = run
        waits, pollers = [], []
        if spec.wait_ready:
            waits.append("READY=1 on NOTIFY_SOCKET")
            if self.health.kind:
                waits.append("a passing health check")
                pollers.append(self.engine.background(self._poll_health(ready), self.name))
        if spec.ready_tcp:
            waits.append(f"{spec.ready_tcp} to accept")
            pollers.append(self.engine.background(self._poll_tcp(ready), self.name))
        try:
            await asyncio.wait([ready, run.exited, interrupt], timeout=spec.ready_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pollers:
                task.cancel()
            self._ready = self._ready_run = None
        if run.exited.done():  # first: its exit has been handled, whatever else came in the same turn
            raise SpawnError(f"{self.name!r} {describe_exit(*run.exited.result())} before it was ready")
        if ready.done():
            if current:
                self.state.ready(ready.result())  # STARTING -> RUNNING
                self.health.running()
            return
        if interrupt.done():
            raise _StartInterrupted(interrupt.result())
        what = (f"{self.name!r} was not ready within {format_duration(spec.ready_timeout_s)} "
                f"(waited for {' or '.join(waits)}); it was stopped")
        # Not ready in time: a failed start, and the process is stopped (systemd's rule).
        decision = None
        if current:
            self.run = self.rec.pid = None  # its exit is ours now, not a crash
            decision = self.state.spawn_failed(what)
        await run.stop(parse_signal(spec.stop_signal), spec.stop_timeout_s)
        if decision is not None:
            self.rec.pgid = None
            self._carry_out(decision, None)
        raise SpawnError(what)

    # -- spawning, exits, restarts ------------------------------------------------

    async def _spawn(self):
        """Start one run of the app; SpawnError if it cannot start."""
        spec, rec = self.spec, self.rec
        try:
            argv = resolve_argv(spec)
        except ValueError as exc:
            raise SpawnError(str(exc), EXIT_NOT_FOUND) from None
        env = child_environment(spec, rec.base_env, rec.id, self.engine.home.root)
        listen_fds = []
        try:
            if spec.wait_ready:
                env["NOTIFY_SOCKET"] = self._open_notify()
            if spec.listen:
                listen_fds = [sock.fileno() for sock in self.engine.held_sockets(self)]
                env["LISTEN_FDS"] = str(len(listen_fds))
                env["LISTEN_FDNAMES"] = ":".join([spec.base_name or spec.name] * len(listen_fds))
        except OSError as exc:
            raise SpawnError(f"cannot prepare {self.name!r}: {exc.strerror or exc}") from None
        return await Run.start(self.engine, argv, spec.cwd, env, listen_fds, self._output, self._exited,
                               gated=self.engine.persist)

    def _became(self, run):
        """A run is the app's current child now."""
        self.run = run
        rec = self.rec
        rec.pid = rec.pgid = run.pid
        rec.started_at = run.started_at
        rec.start_ticks = run.child.start_ticks
        self.cpu_percent = self.memory_bytes = None
        self.health.spawned()
        self.limits.spawned()

    async def _launch(self, delay=0.0, current=True):
        """Spawn a run and wait until it counts as started; return it, or raise SpawnError.

        The one launch path behind start, restart, a crash restart, replace and
        reload. Started means spawned or, with a readiness rule, ready; a
        reload's replacement (current=False) must otherwise stay up for
        min_uptime, and becomes the app's child only when its caller says so.
        A stop, restart or delete meanwhile raises _StartInterrupted and
        leaves the run to them.
        """
        interrupt = self._interrupt = self.loop.create_future()
        if self._interrupted:
            interrupt.set_result(self._interrupted[-1])  # asked before this launch began
        try:
            if interrupt.done():
                raise _StartInterrupted(interrupt.result())
            if delay > 0:
                await asyncio.wait([interrupt], timeout=delay)
                if interrupt.done():
                    raise _StartInterrupted(interrupt.result())
            if self.engine.closing:
                raise _StartInterrupted("the daemon is shutting down")
            try:
                run = await self._spawn()
            except _StartInterrupted:
                raise
            except Exception as exc:  # whatever stops a spawn makes this app errored, never stuck
                error = exc if isinstance(exc, SpawnError) else SpawnError(f"{type(exc).__name__}: {exc}")
                if current:
                    self._carry_out(self.state.spawn_failed(str(error), error.code), None)
                raise SpawnError(f"cannot start {self.name!r}: {error}", error.code) from None
            if current:
                self._became(run)
                self.state.spawned(self.needs_ready())
            else:
                self._hold(run)
            await self.engine.commit(run.child)  # in the records now: it may run
            if current:
                if run.exited.done():
                    self._exited(run)  # it exited while its pipes were being connected
                elif not self.needs_ready():
                    self.health.running()
            try:
                if self.needs_ready():
                    await self._await_ready(run, interrupt, current)
                elif not current:
                    await asyncio.wait([run.exited, interrupt], timeout=self.spec.min_uptime_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                    if run.exited.done():
                        raise SpawnError(f"the replacement {describe_exit(*run.exited.result())} within "
                                         f"min_uptime ({format_duration(self.spec.min_uptime_s)})")
                    if interrupt.done():
                        raise _StartInterrupted(interrupt.result())
            except SpawnError:
                if not current:
                    # A replacement that failed goes, with its group; the old process serves on.
                    await run.stop(parse_signal(self.spec.stop_signal), self.spec.stop_timeout_s)
                    self._let_go(run)
                raise
            return run
        finally:
            if self._interrupt is interrupt:
                self._interrupt = None

    def _hold(self, run):
        """Record a group that is not the app's child (a reload's replacement or retired run) until it is gone."""
        self.rec.other_groups = self.rec.other_groups + [[run.pid, run.child.start_ticks]]
        self.engine.save_soon()

    def _let_go(self, run):
        self.rec.other_groups = [g for g in self.rec.other_groups if g[0] != run.pid]
        self.engine.save_soon()

    def _interrupt_start(self, reason):
        """A stop, restart or delete is coming: end a start that is waiting, or one still to come."""
        self._interrupted.append(reason)
        if self._interrupt is not None and not self._interrupt.done():
            self._interrupt.set_result(reason)

    def _cancel_restart(self):
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None

    def _exited(self, run):
        """A run's child exited and its output is drained: the one exit handler."""
        if run is not self.run:
            return  # a stop's kill landed on a run already let go, or a reload's replacement/retired run
        self.run = None
        self.rec.pid = None
        self.health.stop()
        code, signum = run.exited.result()
        tail = " | ".join(self.stderr_tail(3))
        decision = self.state.exited(code, signum, self.loop.time() - run.spawned_at, tail)
        if self.state.status != Status.STOPPING:
            self._carry_out(decision, run.pid)

    def _carry_out(self, decision, tree):
        """After an exit or a failed start: respawn later, or clear up what the old tree left."""
        if decision.action == Decision.SPAWN:
            self._cancel_restart()  # a newer decision replaces a restart still waiting
            self._restart_task = self.engine.background(self._restart_later(tree, decision.delay), self.name)
        elif tree is not None:
            self.engine.background(self._sweep(tree), self.name)

    async def _sweep(self, tree):
        """Stop the members of an exited leader's group (they would keep its port), then forget the group."""
        if self.engine.driver.tree_alive(tree):
            await stop_tree(self.engine, tree, parse_signal(self.spec.stop_signal), self.spec.stop_timeout_s)
        if self.rec.pgid == tree and self.run is None:
            # Gone for good: a group id kept longer could be reused by a stranger.
            self.rec.pgid = None
            self.engine.save_soon()

    async def _restart_later(self, tree, delay):
        """A crash restart: the old group goes first, then the delay, then the launch under the lock."""
        if tree is not None:
            await self._sweep(tree)
        if delay > 0:
            await asyncio.sleep(delay)
        async with self._lock:
            if self._restart_task is asyncio.current_task():
                self._restart_task = None  # from here on a stop interrupts the launch instead
            if self.closed or self.engine.closing or self.state.restart_due().action != Decision.SPAWN:
                return
            try:
                await self._launch()
            except _StartInterrupted:
                pass  # a stop, restart or delete is waiting for the lock
            except SpawnError as exc:
                self.engine.log(str(exc))

    async def _sweep_leftover(self):
        """Before a start: a group this app left behind (a crashed leader's survivors) is stopped."""
        tree = self.rec.pgid
        if tree and self.run is None:
            await self._sweep(tree)

    # -- operations (each holds the lock) --------------------------------------------

    def precheck(self):
        """Raise SpawnError now if the app cannot be spawned (and mark it errored)."""
        spec = self.spec
        try:
            argv = resolve_argv(spec)
            env = child_environment(spec, self.rec.base_env, self.rec.id, self.engine.home.root)
            self.engine.driver.check_program(argv, spec.cwd, env)
        except (SpawnError, ValueError) as exc:
            error = exc if isinstance(exc, SpawnError) else SpawnError(str(exc), EXIT_NOT_FOUND)
            if self.state.status in ALIVE_STATUSES:
                raise SpawnError(f"cannot start {self.name!r}: {error}", error.code) from None
            self.state.request_start()
            self.state.spawn_failed(str(error), error.code)  # STARTING -> ERRORED
            raise SpawnError(f"cannot start {self.name!r}: {error}", error.code) from None

    def mark_starting(self):
        """Show the app as starting at once; start(launched=True) spawns it a moment later.

        Returns False when the app is alive or busy: then the later start is an ordinary one.
        """
        if self.state.status in ALIVE_STATUSES or self._lock.locked():
            self.rec.desired = "running"
            return False
        self._cancel_restart()
        self.state.request_start()  # STOPPED/CRASHED/ERRORED -> STARTING
        return True

    async def _exclusive(self, reason, op, *args, starts=True):
        """Run op under the app's lock, the way every operation runs.

        `reason` ends a start that is waiting (latched, so a launch still to
        come sees it too) and cancels a crash restart waiting out its delay; a
        plain start (no reason) leaves both alone. An operation that starts
        processes does nothing on a deleted app or during a shutdown.
        """
        if reason:
            self._interrupt_start(reason)
            self._cancel_restart()
        try:
            async with self._lock:
                if reason:
                    self._cancel_restart()
                    self._interrupted.remove(reason)  # served now; later requests stay latched
                    reason = None
                if starts and (self.closed or self.engine.closing):
                    return None
                return await op(*args)
        finally:
            if reason:
                self._interrupted.remove(reason)  # cancelled while waiting for the lock

    async def start(self, launched=False):
        """Start the app if it is not alive; raises SpawnError if it cannot.

        launched: mark_starting() made it STARTING; a stop, restart or delete
        since then has settled it, and this late start must not undo that.
        """
        await self._exclusive(None, self._start_locked, launched)

    async def _start_locked(self, launched):
        if launched:
            if self.state.status != Status.STARTING or self.run is not None:
                return
            decision = Decision(Decision.SPAWN, self.spec.start_delay_s)
        else:
            decision = self.state.request_start()
        if decision.action == Decision.SPAWN:
            await self._sweep_leftover()
            await self._launch(decision.delay)

    async def stop(self, desired="stopped"):
        """Stop the app and its whole process group; returns once they are gone.

        `desired` is what a later daemon start should do: "stopped" for a
        user's stop, None to keep the user's wish (daemon shutdown).
        """
        await self._exclusive("stopped before it was ready", self._stop_locked, desired, starts=False)

    async def _stop_locked(self, desired="stopped"):
        self.watch.stop()
        decision = self.state.request_stop(desired)
        if decision.action == Decision.KILL:
            await self._stop_run()
        else:
            await self._sweep_leftover()

    async def _stop_run(self):
        """Stop the current run (the status is STOPPING); return what the state decides next."""
        run = self.run
        killed = await run.stop(parse_signal(self.spec.stop_signal), self.spec.stop_timeout_s)
        if self.run is run:  # pragma: no cover  (its exit has been handled by now)
            self.run = None
        self.rec.pgid = None
        return self.state.stopped(killed)

    async def _restart_locked(self, spec=None, base_env=None, count=True, rule=False):
        """Stop the child (its port must be free), take a new definition if given, start again."""
        if rule and self.rec.desired == "stopped":
            return  # a user's stop, queued before this rule's restart, wins
        self.watch.stop()
        decision = self.state.request_restart(count=count)
        if decision.action == Decision.KILL:
            decision = await self._stop_run()
        else:
            await self._sweep_leftover()
        self._take(spec, base_env)
        await self._launch(self.spec.start_delay_s)

    async def restart(self, base_env=None):
        """Stop the old process (so its port is free), then start a new one."""
        await self._exclusive("restarted before it was ready", self._restart_locked, None, base_env)

    async def restart_for(self, reason):
        """Restart because a rule asked (health, limit, watch, cron); the reason is kept."""
        if self.closed or self.engine.closing:
            return
        self.rec.restart_reason = f"{reason} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self.engine.log(f"{self.name}: restarting: {reason}")
        try:
            await self._exclusive("restarted before it was ready", self._restart_locked, None, None, True, True)
        except SpawnError as exc:
            self.engine.log(str(exc))

    async def replace(self, spec, base_env):
        """Stop the app, take a new definition, start it (apply's changed app)."""
        await self._exclusive("replaced before it was ready", self._restart_locked, spec, base_env, False)

    async def reload(self, spec=None, base_env=None):
        """Start a replacement, wait until it is ready, then stop the old process.

        Ready means readiness (wait_ready, ready_tcp) or, without a rule, up
        for min_uptime. If the replacement fails, it is stopped and the old
        process keeps serving; SpawnError says why. An app that is not
        running is simply started.
        """
        return await self._exclusive("reloaded before it was ready", self._reload_locked, spec, base_env)

    async def _reload_locked(self, spec, base_env):
        if self.run is None or self.state.status != Status.RUNNING:
            await self._restart_locked(spec, base_env, count=False)
            return "started"
        old = self.run
        old_spec, old_env = self.rec.spec, self.rec.base_env
        self._take(spec, base_env)
        try:
            new = await self._launch(current=False)
        except SpawnError as exc:
            self._take(old_spec, old_env)  # roll back: the old process never stopped serving
            if self.run is old:
                self.state.note("reload failed; the old process keeps serving")
                self.health.running()
            raise SpawnError(f"reload of {self.name!r} failed: {exc}; the old process "
                             f"(pid {old.pid}) keeps serving") from None
        if self.run is not old:
            # The old process died while the replacement got ready: the replacement takes over.
            if self.state.status == Status.RESTARTING:
                self.state.restart_due()
            else:
                self.state.request_start()
            self._became(new)
            self.state.spawned(False)
        else:
            self._became(new)
            self.rec.restart_count += 1
            self.engine.save_soon()
        self._let_go(new)
        self._hold(old)
        if new.exited.done():
            self._exited(new)  # it died the moment it was ready
        else:
            self.health.running()
        await old.stop(parse_signal(self.spec.stop_signal), self.spec.stop_timeout_s)
        self._let_go(old)
        return "reloaded"

    def _take(self, spec, base_env):
        """Adopt a new definition and/or environment (reload, replace)."""
        if base_env is not None:
            self.rec.base_env = dict(base_env)
        if spec is not None and spec.fingerprint() != self.rec.spec.fingerprint():
            self.detach()
            self.close_logs()  # the log paths may have changed
            self.rec.spec = spec
            self.health = Health(self)
            self.attach()
        elif spec is not None:
            self.rec.spec = spec

    def rename(self, spec):
        """Take a new name (scale: web becomes web-0): the child runs on, its log files move."""
        for stream in ("out", "err"):
            old, new = self.log_path(stream), self.log_path(stream, spec)
            if old != new and old == self.engine.home.log_path(self.name, stream):
                self.engine.move_log(old, new)
        self.close_logs()
        self.rec.spec = spec
        self.engine.save_soon()

    async def delete(self):
        """Stop the app and forget it; its log files stay on disk."""
        await self._exclusive("deleted before it was ready", self._delete_locked, starts=False)

    async def _delete_locked(self):
        await self._stop_locked()
        self.closed = True
        self.detach()
        self.close_notify()
        self.close_logs()

    def send_signal(self, signum):
        """Send a signal to the app's process group; False when it has none."""
        return self.run is not None and self.run.signal(signum)

    def reset(self):
        self.rec.restart_count = 0
        self.state.reset()
        self.engine.save_soon()

    # -- reporting ----------------------------------------------------------

    def describe(self, group_sizes=None):
        """Return the public view of the app: no env values, ever; never raises (list must always work).

        group_sizes: {base name: instances}, counted once for a whole listing.
        """
        try:
            return self._view(group_sizes or self.engine.group_sizes())
        except Exception as exc:  # pragma: no cover  (a spec that exists is valid; this is the last line)
            return {"id": self.rec.id, "name": self.name, "status": self.rec.status,
                    "status_reason": f"cannot describe: {type(exc).__name__}: {exc}"}

    def _view(self, group_sizes):
        rec = self.rec
        spec = rec.spec
        run = self.run
        health = self.health
        return {
            "id": rec.id,
            "name": spec.name,
            "namespace": spec.namespace,
            "command": spec.command,
            "interpreter": spec.interpreter,
            "cwd": spec.cwd,
            "status": rec.status,
            "status_reason": rec.status_reason,
            "pid": run.pid if run else None,
            "restart_count": rec.restart_count,
            "restart_reason": rec.restart_reason,
            "uptime_ms": int((time.time() - run.started_at) * 1000) if run else 0,
            "started_at": run.started_at if run else None,
            "created_at": rec.created_at,
            "cpu_percent": self.cpu_percent if run else None,
            "memory_bytes": self.memory_bytes if run else None,
            "metrics_samples": self.metrics_samples,
            "health_status": health.status,
            "health_failures": health.failures,
            "health_detail": health.detail,
            "health_checked_at": health.checked_at,
            "health_check": health.kind and (spec.health_cmd or spec.health_http or spec.health_tcp),
            "notify_status": self.notify_status,
            "wait_ready": spec.wait_ready,
            "ready_tcp": spec.ready_tcp,
            "ready_timeout_ms": int(spec.ready_timeout_s * 1000),
            "max_memory_bytes": spec.max_memory_bytes,
            "max_cpu_percent": spec.max_cpu_percent,
            "watch": list(spec.watch),
            "cron_restart": spec.cron_restart,
            "cron_next": self.cron.next,
            "restart_policy": spec.restart_policy,
            "max_restarts": spec.max_restarts,
            "crash_restart_limit": spec.crash_restart_limit,
            "min_uptime_ms": int(spec.min_uptime_s * 1000),
            "restart_delay_ms": int(spec.restart_delay_s * 1000),
            "exp_backoff": spec.exp_backoff,
            "stop_signal": spec.stop_signal,
            "stop_timeout_ms": int(spec.stop_timeout_s * 1000),
            "last_exit_code": rec.last_exit_code,
            "last_signal": signal_name(rec.last_signal) if rec.last_signal else None,
            "desired": rec.desired,
            "out_log": self.log_path("out"),
            "err_log": self.log_path("err"),
            "combined_log": self.log_path("combined"),
            "base_name": spec.base_name or spec.name,
            "instance": spec.instance,
            "instances": group_sizes[spec.base_name or spec.name],
            "depends_on": list(spec.depends_on),
            "log_date_format": spec.log_date_format,
            "env_keys": sorted(spec.env),
        }
# =============================================================================
# 13. Engine: every app, persistence, metrics, events
# =============================================================================


def _metrics_interval():
    raw = os.environ.get(ENV_METRICS_INTERVAL, "").strip()
    try:
        value = float(raw) if raw else METRICS_INTERVAL_S
    except ValueError:
        value = -1
    if not 0.05 <= value <= 3600:
        raise ConfigError(f"{ENV_METRICS_INTERVAL}={raw!r}: expected seconds between 0.05 and 3600; "
                          f"unset it for {METRICS_INTERVAL_S:g}")
    return value


def _stderr_log(message):
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        sys.stderr.write(f"{stamp} oxmgr[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # pragma: no cover
        pass


def duplicate_app(name):
    """The error for a second app of the same name, with what to do instead."""
    return DuplicateProcess(f"an app named {name!r} already exists; restart it, delete it, or pick another --name")


class Engine:
    """Every app of a daemon or a runtime: lookup, start order, persistence, events, metrics.

    The seams are injected: the driver (spawn, kill, reap, sockets: a fake in
    the tests), the home's paths and the loop, whose clock is the engine's.
    Events go to `listeners` as fn(kind, app, data): "output" (stream, data),
    "status" (old, new, reason) and "health" (status, detail); followers, the
    console and the log files all read the same stream.
    """

    def __init__(self, loop, home, driver=None, log_policy=None, reap_all=False, log=None, persist=True,
                 write_logs=True):
        self.loop = loop
        self.home = home
        self.driver = driver or DRIVER
        self.log_policy = log_policy or LogPolicy.from_env()
        self.reaper = self.driver.reaper(loop, reap_all)
        self.log = log or _stderr_log
        self.persist = persist         # state.json: the daemon's apps outlive it, a runtime's do not
        self.closing = False           # shutting down: nothing starts any more
        self.write_logs = write_logs   # runtime: output to the console only, unless asked
        self.apps = {}                 # id -> App, in id order
        self.next_id = 0
        self.listeners = []
        self.watcher = Watcher(self)
        self.metrics_interval_s = _metrics_interval()
        self._sampler = TreeSampler(self.driver.clock_ticks)
        self._timers = {}
        self._save_handle = None
        self._gated = []               # spawned children waiting for the save that records them
        self._committed = None         # resolves when that save is done
        self._logged_once = set()
        self._background = set()
        self._logs = {}                # path -> [RotatingLog, users]: instances may share a file
        self._held = {}                # listen address -> socket, shared by every instance

    # -- registry -----------------------------------------------------------

    def load(self, next_id, records):
        self.next_id = next_id
        for rec in sorted(records, key=lambda r: r.id):
            app = self.apps[rec.id] = App(self, rec)
            app.attach()

    def by_name(self, name):
        for app in self.apps.values():
            if app.name == name:
                return app
        return None

    def unique_name(self, base):
        """Return base, or base-1, base-2... when the name is taken."""
        if self.by_name(base) is None:
            return base
        n = 1
        while self.by_name(f"{base}-{n}") is not None:
            n += 1
        return f"{base}-{n}"

    def group_sizes(self):
        """How many instances each group (base name) has now: derived, never stored."""
        return collections.Counter(a.spec.base_name or a.name for a in self.apps.values())

    def add(self, spec, base_env):
        """Register an app (not started); DuplicateProcess if the name is taken."""
        if self.by_name(spec.name) is not None:
            raise duplicate_app(spec.name)
        # Not copied: apps started by one request share one environment (memory, state.json size).
        rec = ProcessRecord(spec, id=self.next_id, created_at=time.time(), base_env=base_env)
        self.next_id += 1
        app = self.apps[rec.id] = App(self, rec)
        app.attach()
        self.save_soon()
        return app

    def remove(self, app):
        self.apps.pop(app.rec.id, None)
        self.release_sockets()
        self.save_soon()

    def resolve(self, targets, missing_ok=False):
        """Return the apps named by targets: id, name, base name of instances, namespace or "all"."""
        found = []
        for target in targets:
            target = str(target).strip()
            if target == "all":
                matched = list(self.apps.values())
            elif target.isdigit():
                app = self.apps.get(int(target))
                matched = [app] if app else []
            else:
                app = self.by_name(target)
                matched = [app] if app else [a for a in self.apps.values() if a.spec.base_name == target]
                if not matched:
                    matched = [a for a in self.apps.values() if a.spec.namespace == target]
            if not matched and target != "all" and not missing_ok:
                raise ProcessNotFound(target)
            for app in matched:
                if app not in found:
                    found.append(app)
        return found

    # -- events and persistence ------------------------------------------------

    def emit(self, kind, app, **data):
        for fn in list(self.listeners):
            fn(kind, app, data)

    def status_changed(self, app, old, new, reason):
        if old != new:
            self.log(f"{app.name}: {old} -> {new}" + (f" ({reason})" if reason else ""))
        self.emit("status", app, old=old, new=new, reason=reason)
        self.save_soon()

    def save_soon(self):
        """Save once, after this loop turn, however many changes it made.

        A timer, not call_soon: a respawn queued in the same turn runs first,
        so the new process never waits for the fsync.
        """
        if self.persist and self._save_handle is None:
            self._save_handle = self.loop.call_later(0, self.save_now)

    async def commit(self, child):
        """Let a gated child run once the records naming it are saved (one save per loop turn).

        Returns after the save, so no reply says "started" about an app the state file lacks.
        """
        if child.gate is None:
            return
        self._gated.append(child)
        if len(self._gated) == 1:
            self._committed = self.loop.create_future()
            self.loop.call_soon(self._release_gated, self._committed)
        await asyncio.shield(self._committed)

    def _release_gated(self, committed):
        gated, self._gated = self._gated, []
        saved = False
        try:
            # Unsynced: the rename survives a kill -9, which is what the gate guards against; the
            # fsync follows once the children run. A failed save is logged and the apps run anyway
            # (a new daemon finds them by their marker).
            saved = self.save_now(sync=False)
        finally:
            for child in gated:
                child.release()
            committed.set_result(None)
            if saved:
                self.loop.call_soon(self._sync_saved)

    def flush_save(self):
        """Do a save that save_soon() has scheduled now."""
        if self._save_handle is not None:
            self.save_now()

    def save_now(self, sync=True):
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        if not self.persist:
            return False
        try:
            save_state(self.home, self.next_id, [a.rec for a in self.apps.values()], sync)
        except OSError as exc:
            self.log_once(f"cannot save state to {self.home.state!r}: {exc}")
            return False
        return True

    def _sync_saved(self):
        try:
            sync_file(self.home.state)
        except OSError as exc:
            self.log_once(f"cannot sync {self.home.state!r}: {exc}")

    def log_once(self, message):
        if message not in self._logged_once:
            self._logged_once.add(message)
            self.log(message)

    def background(self, coro, what):
        """Run a task whose failure is logged rather than lost."""
        task = self.loop.create_task(coro)
        self._background.add(task)

        def done(t):
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                self.log(f"{what}: background task failed: {type(exc).__name__}: {exc}")

        task.add_done_callback(done)
        return task

    # -- shared resources: log files, held sockets ------------------------------

    def acquire_log(self, path, policy):
        """Return the RotatingLog of a path, shared by every app that writes there."""
        entry = self._logs.get(path)
        if entry is None:
            # A -o /etc/passwd (as root) must never be renamed away or emptied.
            owned = path.endswith(".log") or os.path.dirname(path) == self.home.logs
            if not owned and not path.startswith("/dev/"):
                self.log_once(f"{path!r} is not named *.log: appended to, never rotated or flushed")
            entry = self._logs[path] = [RotatingLog(path, policy, owned=owned), 0]
        entry[1] += 1
        return entry[0]

    def release_log(self, log):
        entry = self._logs.get(log.path)
        if entry is None or entry[0] is not log:
            log.close()
            return
        entry[1] -= 1
        if entry[1] <= 0:
            log.close()
            del self._logs[log.path]

    def move_log(self, old, new):
        """Rename a log file (and its rotated files) that only one app writes."""
        entry = self._logs.pop(old, None)
        if entry is not None:
            entry[0].close()
        move_log_files(old, new)

    def held_sockets(self, app):
        """Return the listening sockets of the app's `listen`, binding each address once.

        Every instance gets the same sockets, so they share the port, and a
        reload's replacement accepts from the same queue.
        """
        socks = []
        for address in app.spec.listen:
            if address not in self._held:
                self._held[address] = self.driver.bind_listener(address)
            socks.append(self._held[address])
        return socks

    def release_sockets(self):
        """Close held sockets that no registered app lists any more."""
        wanted = {address for a in self.apps.values() for address in a.spec.listen}
        for address in list(self._held):
            if address not in wanted:
                self.driver.unbind_listener(address, self._held.pop(address))

    # -- periodic work -------------------------------------------------------

    def start_timers(self):
        """The safety-net tick (reap, age-rotate logs) and the metrics samples."""
        self._every("tick", TICK_S, self.tick)
        self._every("metrics", self.metrics_interval_s, self.sample_metrics)

    def _every(self, name, interval, fn):
        def fire():
            try:
                fn()
            finally:
                self._timers[name] = self.loop.call_later(interval, fire)
        self._timers[name] = self.loop.call_later(interval, fire)

    def tick(self):
        self.reaper.reap()
        for app in self.apps.values():
            for log in app.logs.values():
                if log.should_rotate_by_age():
                    try:
                        log.rotate()
                    except OSError as exc:
                        self.log_once(f"{app.name}: cannot rotate {log.path!r}: {exc}")

    def sample_metrics(self):
        live = [a for a in self.apps.values() if a.run is not None]
        if not live:
            return
        try:
            sample = self._sampler.sample({a.run.pid: a.run.pid for a in live}, self.driver.process_table())
        except OSError as exc:  # pragma: no cover
            self.log_once(f"cannot read the process table: {exc}")
            return
        for app in live:
            app.cpu_percent, app.memory_bytes = sample.get(app.run.pid, (None, None))
            app.metrics_samples += 1
            app.limits.sampled()

    def close(self):
        """Release timers, watches and sockets (the daemon is exiting)."""
        for timer in self._timers.values():
            timer.cancel()
        if self._save_handle is not None:
            self._save_handle.cancel()
        for child in self._gated:
            close_fd(child.gate)  # never recorded: they exit
            child.gate = None
        for app in self.apps.values():
            app.detach()
            app.close_notify()
            app.close_logs()
            if app.run is not None:
                app.run.close()
        self.watcher.close()
        for address in list(self._held):
            self.driver.unbind_listener(address, self._held.pop(address))
        self.reaper.close()

    # -- many apps at once -------------------------------------------------------

    def waves(self, apps):
        """Group apps by dependency depth: each wave needs only earlier waves.

        depends_on names base names; within a wave, start_order then id.
        """
        by_base = {}
        for a in apps:
            by_base.setdefault(a.spec.base_name or a.name, []).append(a)
        depth = {}

        def level(base, path=()):
            if base not in depth:
                if base in path:
                    return 0  # a cycle (validate rejects these); break it rather than recurse
                deps = {d for a in by_base[base] for d in a.spec.depends_on if d in by_base and d != base}
                depth[base] = 1 + max((level(d, path + (base,)) for d in deps), default=-1)
            return depth[base]

        waves = [[] for _ in range(1 + max((level(b) for b in by_base), default=-1))]
        for a in sorted(apps, key=lambda a: (a.spec.start_order, a.rec.id)):
            waves[depth[a.spec.base_name or a.name]].append(a)
        return waves

    async def launch(self, apps):
        """Start the apps of one request; return the errors to report.

        Every app is checked now (program, permissions, cwd), so the usual
        mistakes are reported. With several apps and nothing to wait for (no
        readiness rule, no start delay), they show as starting at once and are
        spawned in dependency order in the background: starting a hundred apps
        should not hold the command for as long as they take to exec.
        """
        errors = []
        ok = []
        for app in apps:
            try:
                app.precheck()
                ok.append(app)
            except SpawnError as exc:
                errors.append(str(exc))
        if len(ok) < 2 or any(a.needs_ready() or a.spec.start_delay_s > 0 for a in ok):
            return errors + await self.start_in_order(ok)
        marked = {a for a in ok if a.mark_starting()}

        async def in_background():
            for error in await self.start_in_order(ok, launched=marked):
                self.log(error)
        self.background(in_background(), "start")
        return errors

    async def start_in_order(self, apps, launched=()):
        """Start apps dependencies first; return the SpawnError messages."""
        errors = []
        for wave in self.waves(apps):
            for app in wave:
                try:
                    await app.start(launched=app in launched)
                except SpawnError as exc:
                    errors.append(str(exc))
        return errors

    async def stop_all(self, apps, desired="stopped"):
        """Stop apps in reverse dependency order: each wave in parallel, each app with its own timeout."""
        for wave in reversed(self.waves(apps)):
            for exc in await asyncio.gather(*[a.stop(desired) for a in wave], return_exceptions=True):
                if isinstance(exc, BaseException):
                    self.log(f"stop failed: {exc}")
# =============================================================================
# 14. Daemon: requests, the control server, recovery, shutdown
# =============================================================================


async def _drive(scan):
    """Run a stepping generator (tail_scan) to its end, letting the loop run between steps."""
    while True:
        try:
            next(scan)
        except StopIteration as done:
            return done.value
        await asyncio.sleep(0)


def _arg_targets(msg):
    targets = msg.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, (str, int)) for t in targets):
        raise IpcError("'targets' must be a non-empty list of names or ids")
    return [str(t) for t in targets]


def _arg_env(msg, key="env"):
    env = msg.get(key)
    if env is None:
        return None
    try:
        env = _v_env(env)
        for name, value in env.items():
            if "\0" in name + value:
                raise ValueError(f"{name}: contains a NUL character")
            os.fsencode(name + value)  # what exec takes: UTF-8, or bytes a shell's environment carried
    except ValueError as exc:  # UnicodeEncodeError too
        raise IpcError(f"'{key}': {str(exc)[:200]}") from None
    return env


class Service:
    """What a request can ask of the engine: one _handle_<op> per operation.

    The daemon and the runtime both serve it over their control socket.
    """

    def __init__(self, engine, request_shutdown):
        self.engine = engine
        self.home = engine.home
        self.request_shutdown = request_shutdown
        self.started_at = time.time()
        self.shutting_down = False
        self.ready = asyncio.Event()   # set once leftovers of a killed daemon are cleared

    async def dispatch(self, msg, conn):
        op = msg.get("op")
        handler = getattr(self, f"_handle_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        if handler is None:
            raise IpcError(f"unknown op {op!r}; this daemon speaks protocol {PROTOCOL_VERSION}")
        if op not in ("ping", "shutdown") and not self.ready.is_set():
            await self.ready.wait()
        if self.shutting_down and op not in ("ping", "list", "status", "shutdown"):
            raise DaemonNotRunning("the daemon is shutting down; try again in a moment")
        try:
            return await handler(msg, conn)
        finally:
            self.engine.flush_save()  # what a reply reports is in the state file first (a kill -9 undoes nothing)

    def _listing(self, apps):
        sizes = self.engine.group_sizes()
        return [a.describe(sizes) for a in apps]

    def _targets(self, msg):
        apps = self.engine.resolve(_arg_targets(msg), missing_ok=bool(msg.get("missing_ok")))
        if not apps and msg.get("missing_ok"):
            raise ProcessNotFound(", ".join(_arg_targets(msg)))
        return apps

    def _specs_from(self, msg):
        """Validate the 'apps' of a request; names left out are picked from the command."""
        apps = msg.get("apps")
        if not isinstance(apps, list) or not apps:
            raise IpcError("'apps' must be a non-empty list of app definitions")
        specs = []
        taken = set()
        for i, raw in enumerate(apps):
            if not isinstance(raw, dict):
                raise IpcError(f"apps[{i}] must be an object")
            raw = dict(raw)
            if not raw.get("name") and isinstance(raw.get("command"), str):
                base = default_app_name(raw["command"])
                name = self.engine.unique_name(base)
                n = 1
                while name in taken:
                    name = self.engine.unique_name(f"{base}-{n}")
                    n += 1
                raw["name"] = name
            spec = AppSpec.from_dict(raw, where=f"app {raw.get('name') or i!r}")
            if spec.name in taken:
                raise DuplicateProcess(f"app {spec.name!r} appears twice in one request")
            taken.add(spec.name)
            specs.append(spec)
        return specs

    async def _delete(self, apps):
        await asyncio.gather(*[a.delete() for a in apps])
        for a in apps:
            self.engine.remove(a)

    async def _handle_ping(self, msg, conn):
        return {"ok": True, "pid": os.getpid(), "version": __version__, "protocol": PROTOCOL_VERSION,
                "apps": len(self.engine.apps), "uptime_s": round(time.time() - self.started_at, 3),
                "home": self.home.root}

    async def _handle_start(self, msg, conn):
        engine = self.engine
        warnings = []
        if "targets" in msg:
            started = engine.resolve(_arg_targets(msg), missing_ok=bool(msg.get("missing_ok")))
            if not started:
                raise ProcessNotFound(", ".join(_arg_targets(msg)))
        else:
            env = _arg_env(msg) or {}
            # "existing": "error" for `start <command>`; "start" for `start <config>` (PM2's habit)
            existing = msg.get("existing", "error")
            started = []
            for spec in self._specs_from(msg):
                app = engine.by_name(spec.name)
                if app is None:
                    started.append(engine.add(spec, env))
                    continue
                if existing != "start":
                    raise duplicate_app(spec.name)
                if app.spec.fingerprint() != spec.fingerprint():
                    warnings.append(f"{spec.name}: already registered with a different definition; "
                                    f"'oxmgr apply' replaces it")
                started.append(app)
        errors = await engine.launch(started)
        if errors:
            raise SpawnError("; ".join(errors))
        return {"ok": True, "processes": self._listing(started), "warnings": warnings}

    async def _handle_apply(self, msg, conn):
        """Reconcile: create new apps, start stopped ones, replace changed ones, leave the rest.

        Instances dropped from an app (a smaller `instances`) are deleted; with
        prune, so is every app not named in 'keep' (all the files' apps).
        """
        engine = self.engine
        env = _arg_env(msg) or {}
        specs = self._specs_from(msg)
        keep = msg.get("keep")
        if keep is not None and (not isinstance(keep, list) or not all(isinstance(k, str) for k in keep)):
            raise IpcError("'keep' must be a list of app names")
        wanted = {spec.name for spec in specs}
        bases = {spec.base_name or spec.name for spec in specs}
        shrunk = [a for a in engine.apps.values() if a.name not in wanted and (a.spec.base_name or a.name) in bases]
        pruned = [a for a in engine.apps.values() if msg.get("prune") and keep is not None
                  and a.name not in wanted and a.name not in keep and a not in shrunk]
        results = [{"name": a.name, "action": "deleted"} for a in shrunk + pruned]
        await self._delete(shrunk + pruned)
        errors = []
        touched = []
        for spec in specs:
            app = engine.by_name(spec.name)
            try:
                if app is None:
                    app = engine.add(spec, env)
                    action = "created"
                    await app.start()
                elif app.spec.fingerprint() != spec.fingerprint():
                    # Overlapping old and new is safe only on held sockets: a port the app binds
                    # itself would still be taken by the old process.
                    if spec.listen and spec.listen == app.spec.listen and app.state.status == Status.RUNNING:
                        action = "reloaded"
                        await app.reload(spec, env)
                    else:
                        action = "replaced"
                        await app.replace(spec, env)
                elif app.state.status in ALIVE_STATUSES:
                    action = "unchanged"
                else:
                    action = "started"
                    await app.start()
            except SpawnError as exc:
                errors.append(str(exc))
                action = "failed"
            results.append({"name": spec.name, "action": action})
            touched.append(app)
        reply = {"ok": True, "results": results, "processes": self._listing(touched)}
        if errors:
            reply["errors"] = errors
        return reply

    async def _handle_stop(self, msg, conn):
        apps = self._targets(msg)
        await self.engine.stop_all(apps)
        return {"ok": True, "processes": self._listing(apps)}

    async def _handle_restart(self, msg, conn):
        apps = self._targets(msg)
        env = _arg_env(msg) if msg.get("update_env") else None
        results = await asyncio.gather(*[a.restart(base_env=env) for a in apps], return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, SpawnError):
                raise result
        errors = [str(r) for r in results if isinstance(r, SpawnError)]
        if errors:
            raise SpawnError("; ".join(errors))
        return {"ok": True, "processes": self._listing(apps)}

    async def _handle_delete(self, msg, conn):
        apps = self._targets(msg)
        listing = self._listing(apps)
        await self._delete(apps)
        return {"ok": True, "processes": listing}

    async def _handle_reload(self, msg, conn):
        """Reload apps one at a time, so some instance always serves; stop at the first failure."""
        apps = self._targets(msg)
        env = _arg_env(msg) if msg.get("update_env") else None
        done = []
        for app in apps:
            try:
                await app.reload(base_env=env)
            except SpawnError as exc:
                note = f" (already reloaded: {', '.join(d.name for d in done)})" if done else ""
                raise SpawnError(f"{exc}{note}") from None
            done.append(app)
        return {"ok": True, "processes": self._listing(done)}

    async def _handle_scale(self, msg, conn):
        """Grow or shrink an app's instances: name-0 .. name-(count-1), on the same held sockets."""
        engine = self.engine
        name = msg.get("name")
        count = msg.get("count")
        if not isinstance(name, str) or not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise IpcError("scale needs 'name' and a 'count' >= 1")
        group = sorted((a for a in engine.apps.values() if (a.spec.base_name or a.name) == name),
                       key=lambda a: (a.spec.instance if a.spec.instance is not None else -1, a.rec.id))
        if not group:
            raise ProcessNotFound(name)
        first = group[0]
        names = [f"{name}-{i}" for i in range(len(group), count)]
        if len(group) == 1 and first.spec.instance is None and count > 1:
            names.append(f"{name}-0")
        taken = [n for n in names if engine.by_name(n) is not None]
        if taken:
            raise DuplicateProcess(f"cannot scale {name!r}: an app named {taken[0]} already exists")
        if len(group) == 1 and first.spec.instance is None and count > 1:
            # One plain app becomes the first of a group: web -> web-0; it keeps running.
            first.rename(first.spec.replace(name=f"{name}-0", base_name=name, instance=0))
        template = first.spec
        added = [engine.add(template.replace(name=f"{name}-{i}", base_name=name, instance=i), first.rec.base_env)
                 for i in range(len(group), count)]
        doomed = group[count:]
        await self._delete(doomed)
        errors = await engine.start_in_order(added)
        if errors:
            raise SpawnError("; ".join(errors))
        return {"ok": True, "processes": self._listing(group[:count] + added), "added": len(added),
                "removed": len(doomed)}

    async def _handle_save(self, msg, conn):
        apps = list(self.engine.apps.values())
        data = {"version": 1, "saved_at": time.time(), "processes": [a.rec.to_dict() for a in apps]}
        atomic_write(self.home.dump, to_json(data).encode())
        return {"ok": True, "path": self.home.dump, "count": len(apps)}

    async def _handle_resurrect(self, msg, conn):
        """Bring back what `save` wrote: missing apps are added, those that were running are started."""
        engine = self.engine
        try:
            with open(self.home.dump, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise OxmgrError(f"nothing to resurrect: {self.home.dump} does not exist; run 'oxmgr save' first") from None
        try:
            _, records, skipped = _parse_state(raw)
        except (ValueError, StateError, RecursionError) as exc:
            raise StateError(f"{self.home.dump} is unreadable ({exc}); save again") from None
        warnings = [f"{self.home.dump}: {why}; left out" for why, _ in skipped]
        to_start = []
        for rec in records:
            app = engine.by_name(rec.name)
            if app is None:
                app = engine.add(rec.spec, rec.base_env or {})
            elif app.spec.fingerprint() != rec.spec.fingerprint():
                warnings.append(f"{rec.name}: already registered with a different definition; left as it is")
            if rec.desired == "running" or rec.status in ALIVE_STATUSES:
                to_start.append(app)
        errors = await engine.start_in_order(to_start)
        if errors:
            raise SpawnError("; ".join(errors))
        return {"ok": True, "processes": self._listing(to_start), "warnings": warnings}

    async def _handle_list(self, msg, conn):
        return {"ok": True, "processes": self._listing(self.engine.apps.values())}

    async def _handle_status(self, msg, conn):
        out = []
        for app in self.engine.resolve(_arg_targets(msg)):
            info = app.describe()
            info["stderr_tail"] = app.stderr_tail(5) if app.state.status in (Status.CRASHED, Status.ERRORED) else []
            out.append(info)
        return {"ok": True, "processes": out}

    async def _handle_logs(self, msg, conn):
        targets = msg.get("targets") or ["all"]
        apps = self.engine.resolve(_arg_targets({"targets": targets}))
        lines = msg.get("lines", DEFAULT_LOG_LINES)
        if not isinstance(lines, int) or isinstance(lines, bool) or lines < 0:
            raise IpcError("'lines' must be a whole number >= 0")
        streams = msg.get("streams") or ["out", "err"]
        if not isinstance(streams, list) or not all(s in ("out", "err") for s in streams):
            raise IpcError("'streams' must be a list of 'out' and 'err'")
        # Every file is opened and sized, and a follower subscribed, in this one
        # loop turn: nothing written meanwhile is missed or shown twice. The
        # tail then goes out in frames of at most LOG_FRAME_LINES lines or
        # LOG_FRAME_BYTES ("more": true until the last), read in steps so other
        # clients are answered meanwhile; a follower's live lines wait behind it.
        scans = [(app.name, stream, tail_scan(app.log_path(stream), lines)) for app in apps for stream in streams]
        for _, _, scan in scans:
            next(scan, None)  # opens the files: the snapshot
        held = None
        if msg.get("follow"):
            held = []
            ids = None if "all" in targets else {a.rec.id for a in apps}

            def listener(kind, app, data):
                if kind != "output" or (ids is not None and app.rec.id not in ids) or data["stream"] not in streams:
                    return
                pieces = data["data"].split(b"\n")
                if not pieces[-1]:
                    pieces.pop()  # whole lines: the last newline ends the chunk
                for piece in pieces:
                    line = {"app": app.name, "stream": data["stream"], "line": piece.decode("utf-8", "replace")}
                    if held is None:
                        conn.send(line)
                    elif len(held) < STREAM_HIGH_WATER // 64:
                        held.append(line)
                    else:
                        conn.close(abort=True)  # a follower this far behind is dropped

            self.engine.listeners.append(listener)
            conn.on_close.append(lambda: self.engine.listeners.remove(listener))
        batch, size = [], 0
        try:
            for name, stream, scan in scans:
                for chunk in read_segments(await _drive(scan)):
                    for raw in chunk:
                        batch.append({"app": name, "stream": stream, "line": raw.decode("utf-8", "replace")})
                        size += len(raw) + 40
                        if len(batch) >= LOG_FRAME_LINES or size >= LOG_FRAME_BYTES:
                            conn.send({"ok": True, "lines": batch, "more": True})
                            batch, size = [], 0
                            await conn.writer.drain()
                    if conn.closed:
                        return None
        except OSError:
            conn.close()  # the client went away
            return None
        finally:
            for _, _, scan in scans:
                scan.close()
        reply = {"ok": True, "lines": batch, "more": False}
        if held is None:
            return reply
        conn.send(dict(reply, follow=True))
        conn.streaming = True
        for line in held:
            conn.send(line)
        held = None
        return None

    async def _handle_flush(self, msg, conn):
        apps = self.engine.resolve(_arg_targets({"targets": msg.get("targets") or ["all"]}))
        warnings = []
        for app in apps:
            for stream in ("out", "err"):
                try:
                    app.log(stream).truncate()
                except OxmgrError as exc:
                    warnings.append(str(exc))
                except OSError as exc:
                    raise OxmgrError(f"cannot flush {app.log_path(stream)!r}: {exc}") from None
        return {"ok": True, "processes": self._listing(apps), "warnings": warnings}

    async def _handle_signal(self, msg, conn):
        try:
            signum = parse_signal(msg.get("signal"))
        except ValueError as exc:
            raise IpcError(str(exc)) from None
        sent = [a for a in self.engine.resolve(_arg_targets(msg)) if a.send_signal(signum)]
        if not sent:
            raise OxmgrError(f"no running process to send {signal_name(signum)} to; start it first")
        return {"ok": True, "signal": signal_name(signum), "processes": self._listing(sent)}

    async def _handle_reset(self, msg, conn):
        apps = self.engine.resolve(_arg_targets(msg))
        for app in apps:
            app.reset()
        return {"ok": True, "processes": self._listing(apps)}

    async def _handle_shutdown(self, msg, conn):
        self.engine.loop.call_soon(self.request_shutdown)
        return {"ok": True, "pid": os.getpid()}


class _Connection:
    """One client of the control server: replies and streamed messages go out in order."""

    def __init__(self, writer, trusted):
        self.writer = writer
        self.trusted = trusted     # a Unix peer of ours, or a TCP peer once it has shown the token
        self.streaming = False     # a follow request owns the connection now
        self.closed = False
        self.on_close = []

    def send(self, msg):
        if self.closed:
            return
        self.writer.write(encode(msg))
        if self.streaming and self.writer.transport.get_write_buffer_size() > STREAM_HIGH_WATER:
            self.close(abort=True)  # a follower that does not read its stream is dropped, its backlog too

    def close(self, abort=False):
        if self.closed:
            return
        self.closed = True
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.close()
        for fn in self.on_close:
            fn()
        self.on_close = []


class ControlServer:
    """The control socket: newline-delimited JSON requests, answered in order, on every connection.

    The Unix socket is born 0600 in a 0700 home, and a peer of another user
    is refused (its uid from the kernel); TCP (OXMGR_DAEMON_ADDR, or where
    there are no Unix sockets) is loopback unless allowed, and every request
    carries the token from daemon.token.
    """

    def __init__(self, home, service, log, driver=None):
        self.home = home
        self.service = service
        self.log = log
        self.driver = driver or DRIVER
        self.token = None
        self._sockets = []       # (listening socket, needs_token), bound before asyncio is imported
        self._servers = []
        self.connections = set()
        self.strangers = collections.OrderedDict()  # TCP connections yet to show the token, oldest first

    def bind(self):
        """Bind and listen now: clients can connect (and wait) while the daemon finishes booting."""
        home, driver = self.home, self.driver
        if driver.unix_sockets:
            _unlink_quiet(home.sock)  # we hold the lock, so any socket file is stale
            sock = driver.bind_unix(home.sock)
            sock.listen(128)
            self._sockets.append((sock, False))
        text = os.environ.get(ENV_DAEMON_ADDR, "").strip() or ("" if driver.unix_sockets else "127.0.0.1:0")
        if text:
            self._bind_tcp(text)

    def _bind_tcp(self, text):
        try:
            host, port = split_host_port(text)
        except ValueError:
            raise ConfigError(f"{ENV_DAEMON_ADDR}={text!r}: expected host:port like 127.0.0.1:7070") from None
        if not is_loopback(host) and not env_flag(ENV_ALLOW_REMOTE):
            raise ConfigError(f"{ENV_DAEMON_ADDR}={text!r} is not a loopback address; set "
                              f"{ENV_ALLOW_REMOTE}=1 to listen there anyway (requests still need the token)")
        self.token = os.urandom(24).hex()
        atomic_write(self.home.token, self.token.encode())
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, port))
        sock.listen(128)
        bound = sock.getsockname()[1]
        atomic_write(self.home.addr, f"{host}:{bound}\n".encode())
        self._sockets.append((sock, True))
        self.log(f"also listening on {host}:{bound} (token in {self.home.token})")

    async def serve(self):
        for sock, needs_token in self._sockets:
            self._servers.append(await asyncio.start_server(
                lambda r, w, t=needs_token: self._serve_connection(r, w, t), sock=sock))

    def close(self):
        for server in self._servers:
            server.close()
        for sock, _ in self._sockets:
            sock.close()
        self._servers, self._sockets = [], []
        for conn in list(self.connections):
            conn.close()
        for path in (self.home.sock, self.home.token, self.home.addr):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _refused(self, writer):
        """True (and the peer told why) when a Unix peer is another user."""
        try:
            uid = self.driver.peer_uid(writer.get_extra_info("socket"))
        except OSError:
            uid = None
        if uid is None or self.driver.trusted_uid(uid):
            return False
        self.log(f"refused a connection from uid {uid}")
        writer.write(encode(error_to_wire(IpcError("permission denied: not your daemon"))))
        return True

    async def _serve_connection(self, reader, writer, needs_token):
        """Serve one client. A TCP peer is a stranger until a request carries the token: strangers
        are few (the oldest of STRANGERS_MAX makes way), brief (STRANGER_DEADLINE_S) and small
        (MAX_FRAME_BYTES), so idle connections cannot crowd the owner out."""
        conn = _Connection(writer, trusted=not needs_token)
        if not needs_token and self._refused(writer):
            conn.close()
            return
        if not conn.trusted:
            if len(self.strangers) >= STRANGERS_MAX:
                self.strangers.popitem(last=False)[0].close(abort=True)
            self.strangers[conn] = None
        self.connections.add(conn)
        framer = LineBuffer(MAX_REQUEST_BYTES if conn.trusted else MAX_FRAME_BYTES)
        deadline = asyncio.get_running_loop().time() + STRANGER_DEADLINE_S
        try:
            while not conn.closed:
                try:
                    if conn.trusted:
                        data = await reader.read(READ_CHUNK)
                    else:
                        data = await asyncio.wait_for(reader.read(READ_CHUNK),
                                                      deadline - asyncio.get_running_loop().time())
                except (OSError, asyncio.TimeoutError):
                    break
                if not data:
                    break
                if conn.streaming:
                    continue  # a follower has nothing more to say
                starts = framer.at_line_start
                lines = framer.feed(data).split(b"\n")
                tail = lines.pop()              # b"" unless an overlong frame was cut
                tail_is_new = starts or bool(lines)
                if not starts and lines:
                    del lines[0]                # the end of a frame already refused as too long
                for line in lines:
                    if conn.streaming:
                        break  # a follow request owns the connection: what it sent after is ignored
                    if line.strip() and not await self._answer(conn, line, needs_token):
                        return
                    if conn.trusted:
                        framer.limit = MAX_REQUEST_BYTES  # it showed the token
                if tail and tail_is_new:
                    await self._reply(conn, error_to_wire(IpcError(
                        f"request exceeds {framer.limit} bytes; send one JSON object per line")))
        finally:
            self.strangers.pop(conn, None)
            self.connections.discard(conn)
            conn.close()

    async def _reply(self, conn, reply):
        conn.send(reply)
        try:
            await conn.writer.drain()
        except OSError:
            conn.close()

    async def _answer(self, conn, line, needs_token):
        """Answer one request; False when the connection must end (a bad token)."""
        try:
            msg = decode(line)
            if needs_token:
                import hmac  # only in TCP mode: it loads OpenSSL's hashes, ~4 MiB
                if not hmac.compare_digest(str(msg.get("token", "")).encode("utf-8", "replace"), self.token.encode()):
                    await self._reply(conn, error_to_wire(IpcError(
                        "unauthorized: send the token from daemon.token with every TCP request")))
                    return False
                conn.trusted = True
                self.strangers.pop(conn, None)  # no longer one a newcomer can evict
            reply = await self.service.dispatch(msg, conn)
        except OxmgrError as exc:
            reply = error_to_wire(exc)
        except Exception as exc:  # a bug must not kill the daemon: it is logged and answered
            import traceback
            self.log("request failed:\n" + traceback.format_exc().rstrip())
            reply = {"ok": False, "error": {"type": "InternalError",
                                            "message": f"internal error: {type(exc).__name__}: {exc}"}}
        if reply is not None:  # None: the handler has sent its replies itself
            await self._reply(conn, reply)
        return True


def is_loopback(host):
    if host == "localhost":
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


class Host:
    """What the daemon and the runtime share: the lock, the control socket, stop signals, shutdown.

    run(main) takes the lock and binds the socket before asyncio is even
    imported (a client can connect at once and waits for its answer), then
    runs main(host) on the loop until a stop signal or a shutdown request.
    """

    def __init__(self, home, log, role="daemon", driver=None):
        self.home = home
        self.log = log
        self.role = role
        self.driver = driver or DRIVER
        self.exit_code = EXIT_OK
        self.engine = None
        self.service = None
        self.server = None
        self.on_shutdown = []     # coroutine functions awaited once the apps are stopped
        self.tasks = []           # tasks a shutdown cancels first (the daemon's recovery)
        self._stopping = None

    def run(self, main, warning=None):
        home = self.home
        lock_fd = self.driver.lock(home.lock)
        if lock_fd is None:
            pid = _read_pid(home.pid_file)
            raise DaemonAlreadyRunning(
                f"a {self.role} is already running for {home.root!r}" + (f" (pid {pid})" if pid else ""))
        try:
            if warning:
                self.log(warning)
            self.server = ControlServer(home, None, self.log, self.driver)
            self.server.bind()
            load_asyncio().run(self._main(main))
        finally:
            if self.server is not None:
                self.server.close()
            for path in (home.pid_file,):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            close_fd(lock_fd)
        self.log(f"{self.role} stopped")
        return self.exit_code

    async def _main(self, main):
        loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        seen = set()

        def loop_error(loop, context):
            # asyncio reports e.g. accept() out of descriptors (and pauses that listener
            # a second) each time: the log says each kind of trouble once.
            exc = context.get("exception")
            kind = (context.get("message"), type(exc).__name__)
            if kind not in seen:
                seen.add(kind)
                self.log(f"{kind[0]}" + (f": {type(exc).__name__}: {exc}" if exc else ""))

        loop.set_exception_handler(loop_error)
        self.driver.add_signal_handlers(loop, {name: self.request_shutdown for name in self.driver.stop_signals})
        try:
            await main(self)
            await self._stopping
            await self._shutdown()
        finally:
            if self.engine is not None:
                self.engine.close()

    def open(self, engine, service):
        """Attach the engine and the service; the control socket starts answering."""
        self.engine, self.service = engine, service
        self.server.service = service
        return self.server.serve()

    def request_shutdown(self, signum=None):
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(signum)

    async def _shutdown(self):
        self.log("shutting down: stopping apps")
        self.driver.sd_notify("STOPPING=1")
        self.service.shutting_down = True  # list and status still answer while the apps stop
        engine = self.engine
        engine.closing = True
        for task in self.tasks:
            task.cancel()
        for app in engine.apps.values():
            app.detach()  # no rule restarts an app that is being stopped
        # desired=None: a shutdown never changes what the user asked to run.
        await engine.stop_all(list(engine.apps.values()), desired=None)
        engine.save_now()
        self.server.close()
        for fn in self.on_shutdown:
            await fn()


class Daemon:
    """The per-user daemon: the engine with persistence, recovery after a kill -9, SIGHUP."""

    def __init__(self, home, log_file=None):
        self.home = home
        self.log_file = log_file
        self.host = Host(home, _stderr_log)

    def run(self):
        """Run in the foreground until shut down; return the exit code."""
        return self.host.run(self._main, self.home.ensure())

    async def _main(self, host):
        loop = asyncio.get_running_loop()
        home = self.home
        engine = Engine(loop, home, driver=host.driver, reap_all=True, log=host.log)
        service = Service(engine, host.request_shutdown)
        await host.open(engine, service)
        host.driver.raise_fd_limit()  # after the socket: start-up is counted until it accepts
        host.driver.add_signal_handlers(loop, {"SIGHUP": self._reopen_log})
        crashed = _read_pid(home.pid_file) is not None  # a clean stop removes it: the last daemon was killed
        atomic_write(home.pid_file, f"{os.getpid()}\n".encode())
        orphans = []  # the groups of entries this version cannot load
        next_id, records, warnings = load_state(home, orphans)
        for w in warnings:
            host.log(w)
        engine.load(next_id, records)
        host.log(f"daemon {__version__} started (pid {os.getpid()}, {len(records)} apps, home {home.root})")
        host.driver.sd_notify(f"READY=1\nSTATUS=supervising {len(records)} apps\nMAINPID={os.getpid()}")
        engine.start_timers()
        host.tasks.append(engine.background(self._recover(engine, service, crashed, orphans), "recovery"))

    async def _recover(self, engine, service, crashed, orphans=()):
        """Stop what a killed daemon left running, then start what should run.

        Its groups are in the records (each child ran only once recorded); a
        session leader that carries this home's marker but no record (a state
        file that could not be saved or read) is stopped too. The records keep
        naming the old groups until they are gone, so a kill -9 meanwhile
        loses nothing. The marker sweep runs only when the last daemon did not
        stop cleanly: after a clean stop, what an app detached on purpose
        (setsid) is left alone.
        """
        driver = engine.driver
        stops = {}  # process group -> how to stop it
        for a in engine.apps.values():
            rec = a.rec
            for tree, ticks in ([[rec.pgid, rec.start_ticks]] if rec.pgid else []) + rec.other_groups:
                if driver.leftover_tree(tree, ticks):
                    engine.log(f"{a.name}: stopping process group {tree} left by the previous daemon")
                    stops[tree] = (parse_signal(a.spec.stop_signal), a.spec.stop_timeout_s)
        for tree, ticks in orphans:
            if driver.leftover_tree(tree, ticks):
                engine.log(f"stopping process group {tree}: its app could not be loaded")
                stops[tree] = (parse_signal(DEFAULT_STOP_SIGNAL), DEFAULT_STOP_TIMEOUT_S)
        for tree in driver.marked_strays(engine.home.root, set(stops)) if crashed else ():
            engine.log(f"stopping process group {tree}: it carries this home's marker but no record names it")
            stops[tree] = (parse_signal(DEFAULT_STOP_SIGNAL), DEFAULT_STOP_TIMEOUT_S)
        await asyncio.gather(*[stop_tree(engine, tree, *how) for tree, how in stops.items()])
        for a in engine.apps.values():
            a.rec.pgid = None  # gone, or never ours: nothing may ever signal it
            a.rec.other_groups = []
        engine.save_now()
        service.ready.set()
        for error in await engine.start_in_order([a for a in engine.apps.values() if a.rec.desired == "running"]):
            engine.log(error)

    def _reopen_log(self, _signum=None):
        """SIGHUP: reopen daemon.log (after an external logrotate moved it)."""
        if not self.log_file:
            return
        try:
            fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o600)
        except OSError as exc:
            self.host.log(f"cannot reopen {self.log_file!r}: {exc}")
            return
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.host.log("log reopened")


def run_daemon(home=None, log_file=None):
    """Run the daemon in the foreground until it is shut down; return the exit code."""
    return Daemon(home or Home(), log_file=log_file).run()
# =============================================================================
# 15. Foreground runtime: PID 1 for containers
# =============================================================================

_APP_COLOURS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")
CONSOLE_BUFFER_BYTES = 4 << 20


class _Drain:
    """The protocol of a console write pipe: its end is all we need to know."""

    def __init__(self):
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        pass

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


class Console:
    """Write apps' lines to our stdout/stderr without ever blocking the loop.

    A pipe (docker's log driver) is written through an asyncio transport with
    a bounded buffer: a reader that stops reading costs lines (counted and
    reported), never the supervisor's attention. A terminal or a file is
    written directly.
    """

    def __init__(self, driver):
        self.driver = driver
        self.pipes = {}            # fd -> (transport, protocol, how to give the fd back)
        self.dropped = {1: 0, 2: 0}

    async def open(self):
        loop = asyncio.get_running_loop()
        # Both are looked at before either is connected: 2>&1 shares one description between them.
        pipes = {fd: self.driver.console_pipe(fd) for fd in (1, 2)}
        for fd, pipe in pipes.items():
            if pipe is not None:
                transport, protocol = await loop.connect_write_pipe(_Drain, pipe[0])
                self.pipes[fd] = (transport, protocol, pipe[1])

    def write(self, fd, data):
        pipe = self.pipes.get(fd)
        if pipe is None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                pass  # nowhere to write: nothing more to do
            return
        transport = pipe[0]
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > CONSOLE_BUFFER_BYTES:
            self.dropped[fd] += data.count(b"\n")
            return
        if self.dropped[fd]:
            transport.write(b"oxmgr | %d lines dropped: the reader of this stream was too slow\n" % self.dropped[fd])
            self.dropped[fd] = 0
        transport.write(data)

    async def close(self, timeout=5.0):
        """Write what is left (a reader gets timeout seconds), and give the descriptors back as they were."""
        for transport, protocol, give_back in self.pipes.values():
            transport.close()
            try:
                await asyncio.wait_for(protocol.closed, timeout)
            except asyncio.TimeoutError:
                transport.abort()
            give_back()
        self.pipes = {}


class Foreground:
    """The supervisor in the foreground, for containers: `oxmgr runtime`.

    The same engine as the daemon, composed with a console and PID 1's
    duties: every zombie is reaped (as PID 1, or as a child subreaper),
    signals are forwarded to the apps, output goes to our own stdout/stderr
    with `name |` prefixes, and the exit code is the apps' (tini's rule for
    one app). `oxmgr list` and friends work from inside, over the usual socket.
    """

    def __init__(self, home, specs, exit_code_from=None, on_error="exit", prefix=True, as_json=False,
                 write_logs=False, quiet=False):
        self.home = home
        self.specs = specs
        self.exit_code_from = exit_code_from
        self.on_error = on_error
        self.prefix = prefix
        self.as_json = as_json
        self.write_logs = write_logs
        self.quiet = quiet
        self.console = None
        self.engine = None
        self.host = Host(home, self.log, role="runtime")
        self._trigger = None      # the app whose failure ended the run
        self._started = False
        self._colour = _colour_on(sys.stdout)
        self._width = max((len(s.name) for s in specs), default=0)

    def log(self, message):
        if self.quiet:
            return
        line = f"oxmgr | {message}\n".encode()
        if self.console is not None:
            self.console.write(2, line)
        else:
            try:
                sys.stderr.write(line.decode())
                sys.stderr.flush()
            except (OSError, ValueError):  # pragma: no cover
                pass

    def run(self):
        self.role = self.host.driver.reaper_role()
        if self.role is None:
            self.log("cannot become a child subreaper: orphaned grandchildren go to init")  # pragma: no cover
        self.home.ensure()
        return self.host.run(self._main)

    async def _main(self, host):
        loop = asyncio.get_running_loop()
        self.console = Console(self.host.driver)
        await self.console.open()
        engine = self.engine = Engine(loop, self.home, driver=host.driver, reap_all=True, log=self.log,
                                      persist=False, write_logs=self.write_logs)
        service = Service(engine, host.request_shutdown)
        await host.open(engine, service)
        host.driver.add_signal_handlers(loop, {signum: self._forward for signum in host.driver.forwarded_signals})
        engine.listeners.append(self._on_event)
        host.on_shutdown.append(self._finish)
        for spec in self.specs:
            engine.add(spec, dict(os.environ))
        self.log(f"runtime {__version__} ({self.role or 'no subreaper'}): {len(self.specs)} apps")
        engine.start_timers()
        service.ready.set()  # `oxmgr list` works while the apps start
        host.tasks.append(engine.background(self._start_all(), "start"))

    async def _start_all(self):
        for error in await self.engine.start_in_order(list(self.engine.apps.values())):
            self.log(error)
        self._started = True
        self._check_end()

    def _forward(self, signum):
        name = signal_name(signum)
        live = [a for a in self.engine.apps.values() if a.run is not None]
        chosen = [a for a in live if name in a.spec.forward_signals]
        for app in chosen or [a for a in live if not a.spec.forward_signals]:
            app.send_signal(signum)

    def _on_event(self, kind, app, data):
        if kind == "output":
            self._emit(app, data["stream"], data["data"])
        elif kind == "status" and self._started:
            app.loop.call_soon(self._check_end)

    def _emit(self, app, stream, chunk):
        lines = chunk.split(b"\n")
        if not lines[-1]:
            lines.pop()  # whole lines: the last newline ends the chunk
        fd = 1 if stream == "out" else 2
        if self.as_json:
            out = b"".join(encode({"app": app.name, "stream": stream, "line": line.decode("utf-8", "replace")})
                           for line in lines)
        elif self.prefix:
            label = app.name.ljust(self._width)
            if self._colour:
                label = _paint(label, _APP_COLOURS[app.rec.id % len(_APP_COLOURS)], True)
            head = (label + " | ").encode()
            out = b"".join(head + line + b"\n" for line in lines)
        else:
            out = b"".join(line + b"\n" for line in lines)
        self.console.write(fd, out)

    def _check_end(self):
        if self.host.service.shutting_down:
            return
        apps = list(self.engine.apps.values())
        # An app that finished but has a cron_restart waits for its next run.
        settled = [a for a in apps if a.state.settled and not (a.spec.cron_restart and a.rec.desired == "exited")]
        failed = [a for a in settled if a.state.status != Status.STOPPED]
        if failed and self.on_error == "exit":
            self._trigger = failed[0]
            self.log(f"{failed[0].name} {failed[0].state.status}: {failed[0].rec.status_reason}; stopping the rest")
            self.host.request_shutdown()
        elif len(settled) == len(apps):
            self.log("every app has exited" if apps else "no apps to run")
            self.host.request_shutdown()

    async def _finish(self):
        self.host.exit_code = self._run_exit_code()
        self.log(f"exit code {self.host.exit_code}")
        await self.console.close()

    def _run_exit_code(self):
        """The exit code of the run (see the class docstring and the README)."""
        apps = list(self.engine.apps.values())
        if self.exit_code_from:
            chosen = [a for a in apps if self.exit_code_from in (a.name, a.spec.base_name)]
            return _app_exit_code(chosen[0]) if chosen else EXIT_ERROR
        if self._trigger is not None:
            return _app_exit_code(self._trigger) or EXIT_ERROR
        if len(apps) == 1:
            return _app_exit_code(apps[0])
        return EXIT_OK


def _app_exit_code(app):
    """One int for an app's last exit: its code, or 128 + N for a death by signal N."""
    return exit_code_number(app.rec.last_exit_code, app.rec.last_signal)
# =============================================================================
# 16. Client (sync): blocking sockets with timeouts, no event loop
# =============================================================================


class _LineReader:
    """Read newline-terminated frames from a blocking socket."""

    def __init__(self, sock):
        self.sock = sock
        self.framer = LineBuffer(64 * MAX_FRAME_BYTES)
        self.lines = collections.deque()

    def readline(self):
        while not self.lines:
            chunk = self.sock.recv(READ_CHUNK)
            if not chunk:
                if self.framer.flush():
                    raise IpcError("the daemon closed the connection mid-reply")
                return None
            data = self.framer.feed(chunk)
            if data and not data.endswith(b"\n"):
                raise IpcError("reply from the daemon is too large")  # pragma: no cover
            self.lines.extend(data.split(b"\n")[:-1])
        return self.lines.popleft()


def _connect(home, timeout):
    """Connect to the daemon; return (socket, token or None).

    The Unix socket must be served by this user (or root): another user who
    can write to the home must not receive the environment a start sends.
    """
    for path in (home.root, home.sock):
        try:
            st = os.lstat(path)
        except OSError:
            break  # no daemon there: connecting says so
        if not DRIVER.owned_by_us(st):
            raise IpcError(f"{path!r} belongs to uid {st.st_uid}, not to you; nothing was sent. "
                           f"Set {ENV_HOME} to a directory of your own")
    addr_text = os.environ.get(ENV_DAEMON_ADDR, "").strip()
    if not DRIVER.unix_sockets or (addr_text and not os.path.exists(home.sock)):
        try:
            with open(home.addr) as f:
                host, port = split_host_port(f.read())
            with open(home.token) as f:
                token = f.read().strip()
        except (OSError, ValueError):
            raise DaemonNotRunning(f"daemon not running (no address file in {home.root!r})") from None
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError:
            raise DaemonNotRunning(f"daemon not running at {host}:{port}") from None
        uid = DRIVER.tcp_listener_uid(port)  # a stale daemon.addr: another user may have taken the port
        if uid is not None and not DRIVER.trusted_uid(uid):
            sock.close()
            raise IpcError(f"{host}:{port} is served by uid {uid}, not by you; nothing was sent (the daemon "
                           f"that wrote {home.addr!r} is gone)")
        return sock, token
    try:
        sock = DRIVER.connect_unix(home.sock, timeout)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        raise DaemonNotRunning(f"daemon not running (no socket at {home.sock!r})") from None
    except OSError as exc:
        raise DaemonNotRunning(f"cannot reach the daemon at {home.sock!r}: {exc}") from None
    try:
        uid = DRIVER.peer_uid(sock)
    except OSError:
        uid = None
    if uid is not None and not DRIVER.trusted_uid(uid):
        sock.close()
        raise IpcError(f"{home.sock!r} is served by uid {uid}, not by you; nothing was sent. "
                       f"Use a home of your own (OXMGR_HOME)")
    return sock, None


def _exchange(sock, token, op, args):
    msg = {"op": op}
    msg.update(args)
    if token:
        msg["token"] = token
    try:
        sock.sendall(encode(msg))
    except OSError as exc:  # it died between accepting and reading
        raise IpcError(f"lost the daemon while sending {op!r}: {exc}") from None
    return _LineReader(sock)


def _checked(line):
    if line is None:
        raise IpcError("the daemon closed the connection without a reply; see daemon.log")
    reply = decode(line)
    if not reply.get("ok"):
        raise error_from_wire(reply)
    return reply


def request(home, op, timeout=CLIENT_TIMEOUT_S, **args):
    """Send one request and return the reply; a failed reply raises its error."""
    sock, token = _connect(home, timeout)
    try:
        reader = _exchange(sock, token, op, args)
        try:
            line = reader.readline()
        except socket.timeout:
            raise IpcError(f"the daemon did not answer {op!r} within {timeout:g}s; see "
                           f"{home.daemon_log}") from None
        except OSError as exc:
            raise IpcError(f"lost the daemon while waiting for {op!r}: {exc}") from None
    finally:
        sock.close()
    return _checked(line)


def stream(home, op, **args):
    """Send a streaming request; yield the first reply, then every message."""
    sock, token = _connect(home, CLIENT_TIMEOUT_S)
    try:
        reader = _exchange(sock, token, op, args)
        yield _checked(reader.readline())
        sock.settimeout(None)
        while True:
            line = reader.readline()
            if line is None:
                return
            yield decode(line)
    finally:
        sock.close()


def _bytecode_cache(home):
    """Where this file's bytecode is cached: the launcher's directory, or $OXMGR_HOME/pycache."""
    return globals().get("_bytecode_prefix") or os.path.join(home.root, "pycache")


def warm_bytecode(prefix):
    """Have the import system cache this file's bytecode under prefix (when it is not fresh there).

    Compiling this file costs ~100 ms and leaves ~8 MiB of compiler garbage
    in a process for good, so the short-lived CLI compiles, never the daemon.
    """
    import importlib.machinery
    saved = sys.pycache_prefix, sys.dont_write_bytecode
    sys.pycache_prefix, sys.dont_write_bytecode = prefix, False
    try:
        importlib.machinery.SourceFileLoader("oxmgr", os.path.abspath(__file__)).get_code("oxmgr")
    except (OSError, ImportError):  # pragma: no cover  (nowhere writable: the daemon compiles for itself)
        pass
    finally:
        sys.pycache_prefix, sys.dont_write_bytecode = saved


# What the header imports: a bootstrap imports these first, so that only this
# file's bytecode goes under the cache prefix (the standard library keeps its own).
_HEADER_IMPORTS = "collections, errno, os, signal, socket, sys, time"


def bootstrap_code(prefix, argv=None, quick_exit=False):
    """Python source that imports this file from its cached bytecode and runs main(argv).

    The import system's own loader checks and writes the cache (importlib.util
    would cost another millisecond of every CLI call). quick_exit (the CLI):
    leave by os._exit once the output is flushed, since tearing down the ~150
    modules a command has loaded costs ~2.5 ms of every call, measured.
    """
    path = os.path.abspath(__file__)
    leave = ("code = module.main(None)\nsys.stdout.flush()\nsys.stderr.flush()\nos._exit(code)\n" if quick_exit
             else f"sys.exit(module.main({argv!r}))\n")
    return (f"import {_HEADER_IMPORTS}\n"
            f"from importlib.machinery import SourceFileLoader\n"
            f"sys.pycache_prefix, saved = {prefix!r}, sys.dont_write_bytecode\n"
            f"sys.dont_write_bytecode = False\n"
            f"module = sys.modules['oxmgr'] = type(sys)('oxmgr')\n"
            f"module.__file__, module.__loader__ = {path!r}, SourceFileLoader('oxmgr', {path!r})\n"
            f"module._bytecode_prefix = sys.pycache_prefix\n"
            f"module.__loader__.exec_module(module)\n"
            f"sys.pycache_prefix, sys.dont_write_bytecode = None, saved\n" + leave)


def daemon_argv(home, log_file=None):
    """Return the argv that starts the daemon, importing this file from cached bytecode.

    -E: PYTHON* variables are for the apps, which get the CLI's environment;
    -S: the daemon needs nothing outside the standard library, and site costs
    start-up time and memory. With log_file, SIGHUP reopens that file.
    """
    run = ["daemon", "run"] + (["--log-file", log_file] if log_file else [])
    return [sys.executable, "-E", "-S", "-c", bootstrap_code(_bytecode_cache(home), run)]


def ensure_daemon(home):
    """Return the daemon's ping reply, starting the daemon detached if needed."""
    try:
        return request(home, "ping")
    except DaemonNotRunning:
        pass
    warning = home.ensure()
    if warning:
        print(f"oxmgr: warning: {warning}", file=sys.stderr)  # said once: the home is private from now on
    try:
        if os.path.getsize(home.daemon_log) > DAEMON_LOG_MAX_BYTES:
            os.replace(home.daemon_log, home.daemon_log + ".1")
    except OSError:
        pass  # no log yet
    warm_bytecode(_bytecode_cache(home))
    proc = DRIVER.spawn_detached(daemon_argv(home, log_file=home.daemon_log), home.daemon_log)
    deadline = time.monotonic() + DAEMON_BOOT_TIMEOUT_S
    pause = 0.002
    while True:
        try:
            return request(home, "ping")
        except (DaemonNotRunning, IpcError):  # IpcError: it accepted, then died booting
            exited = proc.poll() is not None
            if exited or time.monotonic() > deadline:
                if exited:
                    # Another CLI may have won the race to start it.
                    try:
                        return request(home, "ping")
                    except DaemonNotRunning:
                        pass
                tail = b" | ".join(tail_log(home.daemon_log, 3)).decode("utf-8", "replace")
                raise DaemonNotRunning(
                    f"the daemon did not start; {home.daemon_log} says: {tail or '(nothing)'}") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def call(home, op, timeout=CLIENT_TIMEOUT_S, **args):
    """request(), starting the daemon first if it is not running."""
    try:
        return request(home, op, timeout=timeout, **args)
    except DaemonNotRunning:
        ensure_daemon(home)
        return request(home, op, timeout=timeout, **args)


# =============================================================================
# 17. Boot services and the launcher
# =============================================================================
#
# `startup` prints the definition that starts the daemon at boot, `service`
# installs it. The definitions capture PATH and OXMGR_HOME from the shell
# that installs them: apps restored at boot must find `node` and friends.

SERVICE_SYSTEMS = ("systemd", "launchd", "task-scheduler")
LAUNCHD_LABEL = "com.oxmgr.daemon"


def _systemd_quote(text):
    """Quote one word for a unit file: "..." with \\ and " escaped, % doubled (specifiers)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


class ServiceDefinition:
    """What a boot service needs to know to run `oxmgr daemon run` for one home."""

    def __init__(self, home, python=None, script=None, path=None, system_wide=None):
        self.home = home
        self.python = python or sys.executable
        self.script = script or os.path.abspath(__file__)
        self.path = path if path is not None else os.environ.get("PATH", os.defpath)
        uid = os.getuid() if hasattr(os, "getuid") else None
        self.system_wide = (uid == 0) if system_wide is None else system_wide

    def argv(self):
        return [self.python, "-S", self.script, "daemon", "run"]

    def systemd_unit(self):
        """A unit that systemd-analyze verify accepts without a warning.

        KillMode=mixed: systemd sends SIGTERM to the daemon alone, which stops
        the apps gracefully (dependents first, each with its own signal and
        timeout); whatever is left after TimeoutStopSec is killed.
        """
        lines = ["[Unit]", f"Description=oxmgr process manager (OXMGR_HOME={self.home.root})",
                 f"Documentation=file://{self.script}"]
        if self.system_wide:
            lines += ["After=network-online.target", "Wants=network-online.target"]
        lines += ["", "[Service]", "Type=notify", "NotifyAccess=main",
                  "ExecStart=" + " ".join(_systemd_quote(a) for a in self.argv()),
                  "Environment=" + _systemd_quote(f"PATH={self.path}"),
                  "Environment=" + _systemd_quote(f"OXMGR_HOME={self.home.root}"),
                  "Restart=always", "RestartSec=2", "KillMode=mixed", "TimeoutStopSec=90",
                  "", "[Install]", "WantedBy=" + ("multi-user.target" if self.system_wide else "default.target"), ""]
        return "\n".join(lines)

    def launchd_plist(self):
        import plistlib
        data = {
            "Label": LAUNCHD_LABEL, "ProgramArguments": self.argv(),
            "EnvironmentVariables": {"PATH": self.path, "OXMGR_HOME": self.home.root},
            "RunAtLoad": True, "KeepAlive": True, "ProcessType": "Background", "ExitTimeOut": 90,
            "StandardOutPath": self.home.daemon_log, "StandardErrorPath": self.home.daemon_log,
        }
        return plistlib.dumps(data).decode("utf-8")

    def task_scheduler_xml(self):
        from xml.sax.saxutils import escape
        # Task Scheduler cannot set variables: cmd sets them, then runs the daemon.
        inner = (f'set "PATH={self.path}" && set "OXMGR_HOME={self.home.root}" && '
                 + " ".join(f'"{a}"' for a in self.argv()))
        return "\n".join([
            '<?xml version="1.0" encoding="UTF-16"?>',
            '<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">',
            "  <RegistrationInfo><Description>oxmgr process manager</Description></RegistrationInfo>",
            "  <Triggers><LogonTrigger><Enabled>true</Enabled></LogonTrigger></Triggers>",
            "  <Settings>",
            "    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>",
            "    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>",
            "    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>",
            "    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>",
            "    <RestartOnFailure><Interval>PT1M</Interval><Count>999</Count></RestartOnFailure>",
            "  </Settings>",
            '  <Actions Context="Author"><Exec>',
            "    <Command>cmd.exe</Command>",
            f"    <Arguments>/c {escape(inner)}</Arguments>",
            "  </Exec></Actions>",
            "</Task>", ""])

    def location(self, system, directory=None):
        """Return where the definition goes (directory overrides the usual place)."""
        if system == "systemd":
            base = directory or ("/etc/systemd/system" if self.system_wide
                                 else os.path.join(os.environ.get("XDG_CONFIG_HOME") or
                                                   os.path.expanduser("~/.config"), "systemd", "user"))
            return os.path.join(base, "oxmgr.service")
        if system == "launchd":
            return os.path.join(directory or os.path.expanduser("~/Library/LaunchAgents"), LAUNCHD_LABEL + ".plist")
        return os.path.join(directory or self.home.root, "oxmgr-task.xml")

    def text(self, system):
        return {"systemd": self.systemd_unit, "launchd": self.launchd_plist,
                "task-scheduler": self.task_scheduler_xml}[system]()

    def enable_commands(self, system, path):
        """The commands that enable (and start) the service at path."""
        if system == "systemd":
            ctl = "systemctl" if self.system_wide else "systemctl --user"
            commands = [f"{ctl} daemon-reload", f"{ctl} enable --now oxmgr.service"]
            if not self.system_wide:
                commands.append("loginctl enable-linger $USER   # start at boot, not at first login")
            return commands
        if system == "launchd":
            return [f"launchctl bootstrap gui/$(id -u) {path}"]
        return [f'schtasks /Create /TN oxmgr /XML "{path}" /F', "schtasks /Run /TN oxmgr"]

    def disable_commands(self, system, path):
        if system == "systemd":
            ctl = "systemctl" if self.system_wide else "systemctl --user"
            return [f"{ctl} disable --now oxmgr.service", f"{ctl} daemon-reload"]
        if system == "launchd":
            return [f"launchctl bootout gui/$(id -u) {path}"]
        return ["schtasks /Delete /TN oxmgr /F"]


# The `oxmgr` command that `oxmgr.py install` writes. The import system caches
# the file's bytecode under the launcher's lib directory (sys.pycache_prefix),
# so a CLI call does not recompile it (~100 ms), and an edited file is
# recompiled once; the daemon it starts loads the same cache.
_LAUNCHER = """#!{python} -S
# oxmgr launcher, written by `python3 {source} install`; `oxmgr uninstall` removes it.
# It runs {source} from the bytecode the import system keeps under {cache}.
{bootstrap}"""


def _launcher_paths(prefix):
    """Return (launcher, cache directory) for an install prefix (default ~/.local/bin, /usr/local/bin for root)."""
    root = hasattr(os, "getuid") and os.getuid() == 0
    prefix = os.path.abspath(os.path.expanduser(prefix or ("/usr/local/bin" if root else "~/.local/bin")))
    return os.path.join(prefix, "oxmgr"), os.path.join(os.path.dirname(prefix), "lib", "oxmgr")


def install_launcher(prefix=None):
    """Write the `oxmgr` launcher and fill its bytecode cache; return (launcher, cache dir, on_path)."""
    launcher, cache = _launcher_paths(prefix)
    os.makedirs(os.path.dirname(launcher), exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    warm_bytecode(cache)
    text = _LAUNCHER.format(python=sys.executable, source=os.path.abspath(__file__), cache=cache,
                            bootstrap=bootstrap_code(cache, quick_exit=True))
    atomic_write(launcher, text.encode())
    os.chmod(launcher, 0o755)
    on_path = os.path.dirname(launcher) in os.environ.get("PATH", "").split(os.pathsep)
    return launcher, cache, on_path


def uninstall_launcher(prefix=None):
    """Remove what install_launcher wrote; return the paths removed."""
    launcher, cache = _launcher_paths(prefix)
    try:
        with open(launcher) as f:
            if "oxmgr launcher" not in f.read(300):
                raise OxmgrError(f"{launcher} was not written by oxmgr install; remove it yourself")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise OxmgrError(f"{launcher} was not written by oxmgr install; remove it yourself") from None
    _unlink_quiet(launcher)
    removed = [launcher]
    if os.path.isdir(cache):
        # The import system's tree of .pyc files (every Python version's); nothing else is touched.
        for directory, _dirs, files in os.walk(cache, topdown=False):
            for name in files:
                if ".pyc" in name:
                    _unlink_quiet(os.path.join(directory, name))
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty: something else lives there
        removed.append(cache)
    return removed


def _service_manager_running(system):
    """True when we can talk to the service manager here (systemd may be absent, as in containers)."""
    if system == "systemd":
        return os.path.isdir("/run/systemd/system") and _which("systemctl") is not None
    if system == "launchd":  # pragma: no cover
        return _which("launchctl") is not None
    return _which("schtasks") is not None  # pragma: no cover


def _run_commands(commands):
    """Run shell commands in order; return the first failure as text, or None."""
    import subprocess
    for command in commands:
        result = subprocess.run(command.split("#")[0], shell=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)
        if result.returncode != 0:
            return f"{command.split('#')[0].strip()!r} failed: {result.stdout.strip()[-300:]}"
    return None


# =============================================================================
# 18. CLI
# =============================================================================

_STATUS_COLOURS = {
    Status.RUNNING: "32", Status.STARTING: "33", Status.RESTARTING: "33", Status.STOPPING: "33",
    Status.STOPPED: "90", Status.CRASHED: "31", Status.ERRORED: "31;1",
}


def _table(headers, rows, colour_cols=None):
    """Return a plain-text table; colour_cols maps a column index to a colour fn."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths)):
            padded = cell.ljust(w)
            if colour_cols and i in colour_cols:
                padded = colour_cols[i](cell) + " " * (w - len(cell))
            cells.append(padded)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _fmt_cpu(value):
    return "-" if value is None else f"{value:.1f}"


def _print_json(data):
    print(to_json(data, indent=2))


def _typed(check):
    """An argparse type from a config validator, so both reject the same values."""
    def convert(text):
        import argparse
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = check.__name__.lstrip("_")
    return convert


_duration_arg = _typed(parse_duration)
_count_arg = _typed(_v_count)
_signal_arg = _typed(lambda text: signal_name(parse_signal(text)))


def _env_pairs(pairs):
    env = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError("expected NAME=value")
            env.update(_v_env({key: value}))  # the rule a config file's env follows
        except ValueError as exc:
            raise UsageError(f"--env {pair!r}: {exc}") from None
    return env


# Start flags and the AppSpec field each one sets.
_START_FLAGS = (
    # flags, spec field, argparse kwargs
    (("--name",), "name", {"metavar": "NAME", "help": "app name (default: from the script or program)"}),
    (("--namespace",), "namespace", {"metavar": "NS", "help": "group apps; a namespace is a target"}),
    (("--cwd",), "cwd", {"metavar": "DIR", "help": "working directory (default: here)"}),
    (("--restart",), "restart_policy", {"metavar": "POLICY", "help": "always, on-failure (default) or never"}),
    (("--max-restarts",), "max_restarts", {"type": _count_arg, "metavar": "N",
                                            "help": "unstable restarts in a row before errored (10)"}),
    (("--crash-restart-limit",), "crash_restart_limit", {"type": _count_arg, "metavar": "N",
                                                          "help": "restarts allowed in 5 minutes (off)"}),
    (("--min-uptime",), "min_uptime_s", {"type": _duration_arg, "metavar": "DUR",
                                         "help": "a run shorter than this is unstable (1s)"}),
    (("--restart-delay",), "restart_delay_s", {"type": _duration_arg, "metavar": "DUR",
                                               "help": "wait before restarting (0: at once)"}),
    (("--exp-backoff",), "exp_backoff", {"action": "store_true", "default": None,
                                         "help": "double the delay on each unstable restart, with jitter"}),
    (("--exp-backoff-max",), "backoff_max_s", {"type": _duration_arg, "metavar": "DUR",
                                               "help": "cap of the exponential backoff (15s)"}),
    (("--start-delay",), "start_delay_s", {"type": _duration_arg, "metavar": "DUR",
                                           "help": "wait before the first spawn"}),
    (("--stop-signal", "--kill-signal"), "stop_signal", {"type": _signal_arg, "metavar": "SIG",
                                                         "help": "graceful stop signal (SIGTERM)"}),
    (("--stop-timeout",), "stop_timeout_s", {"type": _duration_arg, "metavar": "DUR",
                                             "help": "SIGKILL the group after this (5s)"}),
    (("--stop-exit-codes",), "stop_exit_codes", {"metavar": "CODES",
                                                 "help": "comma-separated exit codes that mean 'do not restart'"}),
    (("--log-date-format",), "log_date_format", {"metavar": "FMT",
                                                 "help": "prefix log lines with a time (strftime or PM2 format)"}),
    (("--interpreter",), "interpreter", {"metavar": "PROG", "help": "run the script with PROG ('none' to exec it)"}),
    (("--interpreter-args",), "interpreter_args", {"metavar": "ARGS", "help": "arguments for the interpreter"}),
    (("-o", "--output"), "out_file", {"metavar": "PATH", "help": "stdout log file"}),
    (("-e", "--error"), "err_file", {"metavar": "PATH", "help": "stderr log file"}),
    (("--health-cmd",), "health_cmd", {"metavar": "CMD", "help": "healthy when this shell command exits 0"}),
    (("--health-http",), "health_http", {"type": _typed(_v_url), "metavar": "URL", "help": "healthy on a 2xx reply"}),
    (("--health-tcp",), "health_tcp", {"type": _typed(_v_host_port), "metavar": "HOST:PORT",
                                       "help": "healthy when it accepts a connection"}),
    (("--health-interval",), "health_interval_s", {"type": _duration_arg, "metavar": "DUR",
                                                   "help": "time between checks (30s)"}),
    (("--health-timeout",), "health_timeout_s", {"type": _duration_arg, "metavar": "DUR",
                                                 "help": "a check slower than this fails (5s)"}),
    (("--health-max-failures",), "health_max_failures", {"type": _typed(_v_positive_count), "metavar": "N",
                                                         "help": "restart after N failures in a row (3)"}),
    (("--wait-ready",), "wait_ready", {"action": "store_true", "default": None,
                                       "help": "start returns when the app is ready: READY=1 on $NOTIFY_SOCKET "
                                               "or a passing health check"}),
    (("--ready-tcp",), "ready_tcp", {"type": _typed(_v_host_port), "metavar": "HOST:PORT",
                                     "help": "ready when this port accepts"}),
    (("--ready-timeout", "--listen-timeout"), "ready_timeout_s", {"type": _duration_arg, "metavar": "DUR",
                                                                  "help": "not ready by then: stopped (30s)"}),
    (("--max-memory-mb", "--max-memory-restart"), "max_memory_bytes", {
        "type": _typed(lambda v: _mebibytes(v)), "metavar": "MB",
        "help": "restart when the process tree uses more (MiB, or a size like 150M)"}),
    (("--max-cpu-percent",), "max_cpu_percent", {"type": _typed(_v_percent), "metavar": "PCT",
                                                 "help": f"restart after {CPU_LIMIT_SAMPLES} samples in a row above"}),
    (("--watch",), "watch", {"action": "append", "nargs": "?", "const": ".", "metavar": "PATH",
                             "help": "restart when files change under PATH (the cwd without one); repeatable"}),
    (("--ignore-watch",), "ignore_watch", {"action": "append", "metavar": "PATTERN",
                                           "help": "do not restart for these (glob or regex); repeatable"}),
    (("--watch-delay",), "watch_delay_s", {"type": _duration_arg, "metavar": "DUR",
                                           "help": "restart once changes have settled this long (1s)"}),
    (("--cron-restart", "--cron"), "cron_restart", {"type": _typed(_v_cron), "metavar": "EXPR",
                                                   "help": "restart on a schedule: 5 cron fields, or 6 with seconds"}),
    (("--listen",), "listen", {"action": "append", "type": _typed(lambda v: _v_listen([v])[0]), "metavar": "ADDR",
                               "help": "hold a socket (tcp://host:port or unix:/path) and pass it as fd 3...; "
                                       "repeatable"}),
)


def _args_start(p):
    p.add_argument("cmd", nargs="+", metavar="command",
                   help="a command line (quote it), a script like app.js, or an app name/id")
    for flags, dest, kwargs in _START_FLAGS:
        kwargs = dict(kwargs)
        kwargs.setdefault("default", None)
        p.add_argument(*flags, dest=dest, **kwargs)
    p.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="set a variable (repeatable); with a config file, a profile name as in PM2")
    p.add_argument("--time", action="store_true", help="prefix log lines with the time")
    p.add_argument("--no-autorestart", action="store_true", help="same as --restart never")
    p.add_argument("-i", "--instances", metavar="N", help="run N copies: N, max (one per CPU) or -1")
    p.add_argument("--instance-var", metavar="NAME", help=f"variable holding the copy's index ({DEFAULT_INSTANCE_VAR})")
    p.add_argument("--only", metavar="A,B", help="with a config file: only these apps")


def _args_config_one(p):
    p.add_argument("config", help="oxfile.toml or ecosystem.config.{js,cjs,mjs,json,json5}")
    p.add_argument("--env", metavar="PROFILE", help="apply a profile ([apps.profiles.P] or env_P)")
    p.add_argument("--only", metavar="A,B", help="only these apps")


def _args_config_many(p):
    p.add_argument("configs", nargs="+", metavar="config", help="config files (their apps merge)")
    p.add_argument("--env", metavar="PROFILE", help="apply a profile ([apps.profiles.P] or env_P)")
    p.add_argument("--only", metavar="A,B", help="only these apps")


def _args_apply(p):
    _args_config_many(p)
    p.add_argument("--prune", action="store_true", help="delete apps that are in none of the files")


def _args_convert(p):
    p.add_argument("source", help="ecosystem.config.{js,cjs,mjs,json,json5}")
    p.add_argument("-o", "--out", metavar="PATH", help="write here (default: print)")
    p.add_argument("--env", metavar="PROFILE", help="bake in a profile (default: keep them as profiles)")


def _args_runtime(p):
    _args_start(p)
    p.add_argument("--exit-code-from", metavar="APP", help="exit with this app's code")
    p.add_argument("--on-error", choices=("exit", "continue"), default="exit",
                   help="when an app crashes or gives up: stop the rest and exit (default), or keep going")
    p.add_argument("--no-prefix", action="store_true", help="print one app's lines as they are")
    p.add_argument("--json", action="store_true", help="print each line as a JSON object")
    p.add_argument("--log-files", action="store_true", help="also write the usual log files")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print oxmgr's own lines")


def _args_targets(p):
    p.add_argument("targets", nargs="+", metavar="target", help="app name, id, namespace or all")


def _args_restart(p):
    _args_targets(p)
    p.add_argument("--update-env", action="store_true", help="use this shell's environment from now on")


def _args_json(p):
    p.add_argument("--json", action="store_true", help="print JSON")


def _args_status(p):
    _args_targets(p)
    _args_json(p)


def _args_logs(p):
    p.add_argument("target", nargs="?", default="all", help="app name, id, namespace or all (default)")
    p.add_argument("--lines", "-n", type=_count_arg, default=DEFAULT_LOG_LINES, metavar="N",
                   help=f"lines from the end of each log (default {DEFAULT_LOG_LINES})")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--err", action="store_true", help="stderr only")
    group.add_argument("--out", action="store_true", help="stdout only")
    _args_json(p)


def _args_flush(p):
    p.add_argument("target", nargs="?", default="all")


def _args_signal(p):
    p.add_argument("signal", metavar="SIG", type=_signal_arg)
    _args_targets(p)


def _args_reload(p):
    _args_targets(p)
    p.add_argument("--update-env", action="store_true", help="use this shell's environment from now on")


def _args_scale(p):
    p.add_argument("name", help="the app (its base name)")
    p.add_argument("count", type=_typed(_v_positive_count), help="how many instances")


def _args_service_system(p):
    p.add_argument("--system", choices=("auto",) + SERVICE_SYSTEMS, default="auto",
                   help="the boot service system (default: this platform's)")


def _args_service(p):
    p.add_argument("action", choices=("install", "uninstall", "status"))
    _args_service_system(p)
    p.add_argument("--dir", help="write the definition here instead of the usual place (and do not enable it)")


def _args_none(p):
    pass


def _args_install(p):
    p.add_argument("--prefix", metavar="DIR",
                   help="where to put the oxmgr command (~/.local/bin; /usr/local/bin for root)")


def _args_daemon(p):
    import argparse
    dsub = p.add_subparsers(dest="daemon_command", metavar="<run|stop|status>")
    dsub.required = True
    kw = {"formatter_class": p.formatter_class}
    d = dsub.add_parser("run", help="run the daemon in the foreground", **kw)
    d.add_argument("--log-file", help=argparse.SUPPRESS)
    dsub.add_parser("stop", help="stop the daemon and its apps (they run again next time)", **kw)
    _args_json(dsub.add_parser("status", help="is the daemon running", **kw))


# (names, help, arguments): the subcommands, in --help order.
_SUBCOMMANDS = (
    (("start",), "start a command (or existing apps) under supervision", _args_start),
    (("stop",), "stop apps (name, id, namespace or all)", _args_targets),
    (("restart",), "stop then start apps", _args_restart),
    (("reload",), "replace apps with no downtime: start the new, wait until ready, stop the old", _args_reload),
    (("scale",), "change how many instances of an app run", _args_scale),
    (("save",), "remember the running set in dump.json", _args_none),
    (("resurrect",), "bring back the set saved by save", _args_none),
    (("startup",), "print the boot service that starts the daemon", _args_service_system),
    (("service",), "install, uninstall or check the boot service", _args_service),
    (("install",), "put a fast `oxmgr` command on PATH (runs this file from cached bytecode)", _args_install),
    (("uninstall",), "remove the `oxmgr` command that install wrote", _args_install),
    (("delete", "del"), "stop and forget apps", _args_targets),
    (("list", "ls", "ps"), "show all apps", _args_json),
    (("status", "describe", "show"), "show apps in detail", _args_status),
    (("logs",), "print (or follow) app logs", _args_logs),
    (("flush",), "empty log files", _args_flush),
    (("signal",), "send a signal to apps' process groups", _args_signal),
    (("reset",), "zero restart counters", _args_targets),
    (("import",), "start the apps of a config file", _args_config_one),
    (("apply",), "make the running apps match config files (idempotent)", _args_apply),
    (("convert",), "turn a PM2 ecosystem file into an oxfile.toml", _args_convert),
    (("validate",), "check config files without a daemon", _args_config_many),
    (("runtime",), "supervise in the foreground, as a container's PID 1", _args_runtime),
    (("daemon",), "run, stop or check the daemon", _args_daemon),
)


def _build_parser(only=None):
    """Build the argparse parser (on call, never at import).

    With `only`, just that subcommand is built: every add_parser costs
    argparse's gettext lookups, and the CLI's start-up time is the product.
    """
    import argparse

    class Formatter(argparse.HelpFormatter):
        # argparse sizes help with shutil, which drags in bz2, lzma and zlib.
        def __init__(self, prog):
            try:
                width = int(os.environ.get("COLUMNS") or os.get_terminal_size(sys.__stdout__.fileno()).columns)
            except (OSError, ValueError, AttributeError):
                width = 80
            super().__init__(prog, width=max(40, width - 2))

    parser = argparse.ArgumentParser(
        prog="oxmgr", description="A process manager in one file: keeps apps alive, keeps their logs.",
        epilog="Run 'oxmgr <command> --help' for a command's options.", formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"oxmgr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for names, helptext, add_args in _SUBCOMMANDS:
        if only is None or only in names:
            add_args(sub.add_parser(names[0], aliases=list(names[1:]), help=helptext, formatter_class=Formatter))
    return parser


def _print_done(verb, reply):
    for info in reply.get("processes", []):
        if verb == "deleted":
            print(f"deleted {info['name']} (id {info['id']})")
            continue
        pid = f", pid {info['pid']}" if info.get("pid") else ""
        print(f"{verb} {info['name']} (id {info['id']}{pid}, {info['status']})")


def _looks_like_target(text):
    return text == "all" or text.isdigit() or not any(c.isspace() or c in "/." for c in text)


def _is_config_path(text):
    """True for an existing config file; like PM2, a plain app.js is a script, app.config.js a config."""
    lower = text.lower()
    if lower.endswith((".js", ".cjs", ".mjs")):
        return ".config." in os.path.basename(lower) and os.path.isfile(text)
    return lower.endswith(CONFIG_SUFFIXES) and os.path.isfile(text)


def _print_warnings(warnings):
    for warning in warnings:
        print(f"oxmgr: warning: {warning}", file=sys.stderr)


def _load(paths, profile=None, only=None):
    config = load_config(paths, profile, only)
    _print_warnings(config.warnings)
    return config


def _start_config(home, paths, profile, only):
    config = _load(paths, profile, only)
    reply = call(home, "start", timeout=CLIENT_LONG_TIMEOUT_S, apps=[a.to_dict() for a in config.apps],
                 env=dict(os.environ), existing="start")
    _print_warnings(reply.get("warnings", ()))
    _print_done("started", reply)
    return EXIT_OK


def _expand_cli_instances(spec, args):
    """`start <command> -i N`: the same expansion a config file gets."""
    if args.instances is None:
        return [spec]
    try:
        count = _cpu_instances(args.instances)
    except ValueError as exc:
        raise UsageError(f"--instances {args.instances!r}: {exc}") from None
    if count < 1:
        raise UsageError(f"--instances {args.instances!r}: expected a number >= 1, max or -1")
    if args.instance_var:
        spec["instance_var"] = args.instance_var
    if count == 1:
        return [spec]
    base = spec.get("name") or default_app_name(spec["command"])
    return [dict(spec, name=f"{base}-{i}", base_name=base, instance=i) for i in range(count)]


def _given_flags(args):
    return {dest: getattr(args, dest) for _, dest, _ in _START_FLAGS if getattr(args, dest) is not None}


def _config_profile(args, verb):
    """With a config file, --env names a profile (PM2's habit); other flags belong in the file."""
    profiles = [e for e in args.env or () if "=" not in e]
    if len(profiles) > 1 or len(profiles) != len(args.env or ()) or _given_flags(args):
        raise UsageError(f"with a config file, {verb} takes --env PROFILE and --only; "
                         f"put other settings in the file")
    return profiles[0] if profiles else None


def _command_specs(args, parts, where):
    """Build the app definitions for `<verb> <command> [flags]` (one per instance)."""
    if args.only:
        raise UsageError("--only goes with a config file")
    command = parts[0] if len(parts) == 1 else parts[0] + " " + join_words(parts[1:])
    spec = _given_flags(args)
    spec["command"] = command
    spec["cwd"] = os.path.abspath(args.cwd or os.getcwd())
    if args.no_autorestart:
        spec["restart_policy"] = "never"
    if args.time and not spec.get("log_date_format"):
        spec["log_date_format"] = DEFAULT_TIME_FORMAT
    if "stop_exit_codes" in spec:
        spec["stop_exit_codes"] = [c for c in spec["stop_exit_codes"].replace(" ", "").split(",") if c]
    if "interpreter_args" in spec:
        spec["interpreter_args"] = split_words(spec["interpreter_args"])
    if spec.get("interpreter") is None:
        inferred = infer_interpreter(command)
        if inferred:
            spec["interpreter"] = inferred
    spec["env"] = _env_pairs(args.env)
    for key in ("out_file", "err_file"):
        if spec.get(key):
            spec[key] = os.path.abspath(spec[key])
    specs = _expand_cli_instances(spec, args)
    for one in specs:
        check = dict(one)
        check.setdefault("name", default_app_name(command))
        try:
            AppSpec.from_dict(check, where=where)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return specs


def cmd_start(args):
    home = Home()
    parts = args.cmd
    if len(parts) == 1 and _is_config_path(parts[0]):
        return _start_config(home, parts, _config_profile(args, "start"), args.only)
    if len(parts) == 1 and not _given_flags(args) and not args.env and not args.time and not args.no_autorestart \
            and args.instances is None and not args.only and _looks_like_target(parts[0]):
        try:
            reply = call(home, "start", timeout=CLIENT_LONG_TIMEOUT_S, targets=[parts[0]])
        except ProcessNotFound:
            pass  # not an app: run it as a command
        else:
            _print_done("started", reply)
            return EXIT_OK
    specs = _command_specs(args, parts, "start")
    reply = call(home, "start", timeout=CLIENT_LONG_TIMEOUT_S, apps=specs, env=dict(os.environ))
    _print_done("started", reply)
    return EXIT_OK


def cmd_runtime(args):
    """Supervise in the foreground, as a container's PID 1 (or a subreaper elsewhere)."""
    parts = args.cmd
    if len(parts) == 1 and _is_config_path(parts[0]):
        specs = _load(parts, _config_profile(args, "runtime"), args.only).apps
    else:
        if args.restart_policy is None and not args.no_autorestart:
            args.restart_policy = "never"  # tini's rule: run it once, exit with its code
        raw = _command_specs(args, parts, "runtime")
        for i, one in enumerate(raw):
            one.setdefault("name", default_app_name(one["command"]) if len(raw) == 1 else f"app-{i}")
        specs = [AppSpec.from_dict(one, where="runtime") for one in raw]
    if args.exit_code_from and not any(args.exit_code_from in (s.name, s.base_name) for s in specs):
        raise UsageError(f"--exit-code-from {args.exit_code_from!r}: no such app; the apps are: "
                         f"{', '.join(s.name for s in specs)}")
    if args.no_prefix and len({s.base_name or s.name for s in specs}) > 1:
        raise UsageError("--no-prefix is for one app: with several, the prefix says whose line it is")
    runtime = Foreground(Home(), specs, exit_code_from=args.exit_code_from, on_error=args.on_error,
                         prefix=not args.no_prefix, as_json=args.json, write_logs=args.log_files, quiet=args.quiet)
    return runtime.run()


def cmd_import(args):
    return _start_config(Home(), [args.config], args.env, args.only)


def cmd_apply(args):
    config = _load(args.configs, args.env, args.only)
    reply = call(Home(), "apply", timeout=CLIENT_LONG_TIMEOUT_S, apps=[a.to_dict() for a in config.apps],
                 env=dict(os.environ), prune=args.prune, keep=config.all_names)
    counts = {}
    for item in reply["results"]:
        counts[item["action"]] = counts.get(item["action"], 0) + 1
        print(f"{item['action']:<9} {item['name']}")
    print("apply: " + ", ".join(f"{n} {action}" for action, n in sorted(counts.items())))
    for error in reply.get("errors", ()):
        print(f"oxmgr: error: {error}", file=sys.stderr)
    return EXIT_ERROR if reply.get("errors") else EXIT_OK


def cmd_convert(args):
    config = _load([args.source], args.env)
    text = dump_oxfile(config, args.env)
    if not args.out:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise OxmgrError(f"cannot write {args.out!r}: {exc}") from None
    print(f"wrote {args.out} ({len(config.groups)} apps); check it with: oxmgr validate {args.out}")
    return EXIT_OK


def cmd_validate(args):
    config = _load(args.configs, args.env, args.only)
    order = ", ".join(spec.name for spec in config.apps)
    print(f"ok: {len(config.groups)} apps, {len(config.apps)} processes; start order: {order}")
    return EXIT_OK


def _expand_targets(targets):
    """Replace config-file targets by their apps' names; say whether any were files."""
    names = []
    from_files = False
    for target in targets:
        if _is_config_path(target):
            # base names: all instances of each app, whatever profile started them
            names.extend(spec.base_name or spec.name for _, spec, _, _ in load_config([target]).groups)
            from_files = True
        else:
            names.append(target)
    return names, from_files


def _simple(op, verb, **extra):
    def run(args):
        targets, from_files = _expand_targets(args.targets)
        reply = call(Home(), op, timeout=CLIENT_LONG_TIMEOUT_S, targets=targets, missing_ok=from_files, **extra)
        _print_done(verb, reply)
        return EXIT_OK
    return run


def cmd_reload(args):
    extra = {"update_env": True, "env": dict(os.environ)} if args.update_env else {}
    return _simple("reload", "reloaded", **extra)(args)


def cmd_scale(args):
    reply = call(Home(), "scale", timeout=CLIENT_LONG_TIMEOUT_S, name=args.name, count=args.count)
    print(f"scaled {args.name} to {args.count} (+{reply['added']}, -{reply['removed']})")
    return EXIT_OK


def cmd_save(args):
    reply = call(Home(), "save")
    print(f"saved {reply['count']} apps to {reply['path']}")
    return EXIT_OK


def cmd_resurrect(args):
    reply = call(Home(), "resurrect", timeout=CLIENT_LONG_TIMEOUT_S)
    _print_warnings(reply.get("warnings", ()))
    _print_done("resurrected", reply)
    return EXIT_OK


def _service_system(args):
    return DRIVER.service_system if args.system == "auto" else args.system


def cmd_startup(args):
    system = _service_system(args)
    definition = ServiceDefinition(Home())
    path = definition.location(system)
    print(f"# {system}: save this as {path}")
    print(definition.text(system))
    print("# then enable it:")
    for command in definition.enable_commands(system, path):
        print(command)
    print("# or let oxmgr do all of it: oxmgr service install")
    return EXIT_OK


def cmd_service(args):
    system = _service_system(args)
    definition = ServiceDefinition(Home())
    path = definition.location(system, args.dir)
    if args.action == "status":
        installed = os.path.exists(path)
        try:
            running = request(Home(), "ping")["pid"]
        except OxmgrError:
            running = None
        print(f"{system} service: {'installed at ' + path if installed else 'not installed (' + path + ')'}; "
              f"daemon {'running, pid ' + str(running) if running else 'not running'}")
        return EXIT_OK if installed else EXIT_ERROR
    manage = args.dir is None
    if manage and not _service_manager_running(system):
        manage = False
        note = f"{system} is not running here, so it was not enabled; on a machine where it runs:"
    else:
        note = None
    if args.action == "install":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, definition.text(system).encode("utf-16" if system == "task-scheduler" else "utf-8"))
        os.chmod(path, 0o644)
        print(f"wrote {path}")
        commands = definition.enable_commands(system, path)
    else:
        commands = definition.disable_commands(system, path)
        if manage:
            failure = _run_commands(commands[:1])
            if failure:
                print(f"oxmgr: warning: {failure}", file=sys.stderr)
        _unlink_quiet(path)
        print(f"removed {path}")
        commands = commands[1:]
    if manage:
        failure = _run_commands(commands)
        if failure:
            raise OxmgrError(f"{failure}; run the commands yourself: {'; '.join(commands)}")
        print(f"{'enabled and started' if args.action == 'install' else 'disabled'} the {system} service")
    elif commands:
        print(note or "to enable it:")
        for command in commands:
            print(f"  {command}")
    return EXIT_OK


def cmd_install(args):
    launcher, cache, on_path = install_launcher(args.prefix)
    print(f"installed {launcher} (bytecode in {cache})")
    if not on_path:
        print(f"add {os.path.dirname(launcher)} to PATH to run it as `oxmgr`")
    return EXIT_OK


def cmd_uninstall(args):
    removed = uninstall_launcher(args.prefix)
    print("removed " + ", ".join(removed) if removed else "nothing to remove")
    return EXIT_OK


def cmd_restart(args):
    extra = {"update_env": True, "env": dict(os.environ)} if args.update_env else {}
    return _simple("restart", "restarted", **extra)(args)


def cmd_list(args):
    reply = call(Home(), "list")
    procs = reply["processes"]
    if args.json:
        _print_json(procs)
        return EXIT_OK
    if not procs:
        print("no apps yet; start one with: oxmgr start \"<command>\" --name <name>")
        return EXIT_OK
    colour = _colour_on(sys.stdout)
    rows = [[str(p["id"]), p["name"], p["namespace"], p["status"], str(p["pid"] or "-"),
             format_uptime(p["uptime_ms"] / 1000.0) if p["pid"] else "-", str(p["restart_count"]),
             _fmt_cpu(p["cpu_percent"]), format_bytes(p["memory_bytes"]), p["health_status"]]
            for p in procs]
    headers = ["ID", "NAME", "NAMESPACE", "STATUS", "PID", "UPTIME", "RESTARTS", "CPU%", "RAM", "HEALTH"]
    print(_table(headers, rows, {3: lambda s: _paint(s, _STATUS_COLOURS.get(s), colour)}))
    return EXIT_OK


def _health_line(p):
    if not p.get("health_check"):
        return "none"
    parts = [p["health_status"]]
    if p.get("health_detail"):
        parts.append(p["health_detail"])
    if p.get("health_failures"):
        parts.append(f"{p['health_failures']} failures in a row")
    if p.get("health_checked_at"):
        parts.append(f"checked {format_uptime(time.time() - p['health_checked_at'])} ago")
    return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0] + f" ({p['health_check']})"


def _status_lines(p):
    uptime = format_uptime(p["uptime_ms"] / 1000.0) if p["pid"] else "-"
    last_exit = describe_exit(p["last_exit_code"], parse_signal(p["last_signal"]) if p["last_signal"] else None)
    restart = (f"{p['restart_policy']}, max {p['max_restarts']} unstable in a row, "
               f"min uptime {format_duration(p['min_uptime_ms'] / 1000.0)}, "
               f"delay {format_duration(p['restart_delay_ms'] / 1000.0)}"
               + (", exponential backoff" if p["exp_backoff"] else "")
               + (f", at most {p['crash_restart_limit']} in 5m" if p["crash_restart_limit"] else ""))
    pairs = [
        ("Name", p["name"]), ("ID", p["id"]), ("Namespace", p["namespace"]),
        ("Status", p["status"] + (f" ({p['status_reason']})" if p.get("status_reason") else "")),
        ("PID", p["pid"] or "-"), ("Command", p["command"]),
        ("Interpreter", p["interpreter"] or "-"), ("Cwd", p["cwd"] or "-"),
        ("Uptime", uptime), ("Restarts", p["restart_count"]), ("Last exit", last_exit),
        ("Restart", restart),
        ("Stop", f"{p['stop_signal']}, then SIGKILL after {format_duration(p['stop_timeout_ms'] / 1000.0)}"),
        ("CPU", f"{_fmt_cpu(p['cpu_percent'])}%" if p["cpu_percent"] is not None else "-"),
        ("Memory", format_bytes(p["memory_bytes"])), ("Health", _health_line(p)),
        ("Out log", p["out_log"]), ("Err log", p["err_log"]),
        ("Env", ", ".join(p["env_keys"]) or "-"),
        ("Created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["created_at"])) if p["created_at"] else "-"),
    ]
    if p.get("wait_ready") or p.get("ready_tcp"):
        what = " or ".join(filter(None, ["READY=1 on NOTIFY_SOCKET" if p["wait_ready"] else None,
                                         f"{p['ready_tcp']} accepting" if p["ready_tcp"] else None]))
        pairs.append(("Ready", f"waits for {what}, up to {format_duration(p['ready_timeout_ms'] / 1000.0)}"))
    if p.get("notify_status"):
        pairs.append(("App status", p["notify_status"]))
    limits = []
    if p.get("max_memory_bytes"):
        limits.append(f"memory {format_bytes(p['max_memory_bytes'])}")
    if p.get("max_cpu_percent"):
        limits.append(f"CPU {p['max_cpu_percent']:g}%")
    if limits:
        pairs.append(("Limits", ", ".join(limits)))
    if p.get("watch"):
        pairs.append(("Watch", ", ".join(p["watch"])))
    if p.get("cron_restart"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["cron_next"])) if p.get("cron_next") else "-"
        pairs.append(("Cron", f"{p['cron_restart']} (next {when})"))
    if p.get("restart_reason"):
        pairs.append(("Last restart", p["restart_reason"]))
    width = max(len(k) for k, _ in pairs) + 2
    lines = [f"{(k + ':').ljust(width)}{v}" for k, v in pairs]
    for line in p.get("stderr_tail") or ():
        lines.append(f"{'Stderr:'.ljust(width)}{line}")
    return lines


def cmd_status(args):
    reply = call(Home(), "status", targets=args.targets)
    procs = reply["processes"]
    if args.json:
        _print_json(procs[0] if len(procs) == 1 else procs)
        return EXIT_OK
    print("\n\n".join("\n".join(_status_lines(p)) for p in procs))
    return EXIT_OK


def _print_log_line(item, prefix, colour, as_json):
    if as_json:
        print(to_json(item))
        return
    line = item["line"]
    if item["stream"] == "err" and colour:
        line = _paint(line, "31", True)
    if prefix:
        print(f"{_paint(item['app'], '36', colour)} | {line}")
    else:
        print(line)


def cmd_logs(args):
    home = Home()
    streams = ["err"] if args.err else ["out"] if args.out else ["out", "err"]
    colour = _colour_on(sys.stdout)
    single = args.target != "all"
    params = {"targets": [args.target], "lines": args.lines, "streams": streams, "follow": args.follow}
    try:
        request(home, "ping")
    except DaemonNotRunning:
        ensure_daemon(home)
    messages = stream(home, "logs", **params)
    try:
        prefix = not single
        while True:  # the tail, in frames
            frame = next(messages, None)
            if frame is None:
                raise IpcError("the daemon closed the connection mid-reply")
            if frame.get("ok") is False:
                raise error_from_wire(frame)
            if not prefix and len({item["app"] for item in frame["lines"]}) > 1:
                prefix = True
            for item in frame["lines"]:
                _print_log_line(item, prefix, colour, args.json)
            if not frame.get("more"):
                break
        if not args.follow:
            return EXIT_OK
        sys.stdout.flush()
        for item in messages:
            if "line" in item:
                _print_log_line(item, prefix, colour, args.json)
                sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        messages.close()
    print("oxmgr: the daemon closed the log stream", file=sys.stderr)
    return EXIT_ERROR


def cmd_flush(args):
    reply = call(Home(), "flush", targets=[args.target])
    _print_done("flushed", reply)
    _print_warnings(reply.get("warnings", []))
    return EXIT_OK


def cmd_signal(args):
    reply = call(Home(), "signal", signal=args.signal, targets=args.targets)
    _print_done(f"sent {reply['signal']} to", reply)
    return EXIT_OK


def cmd_daemon(args):
    home = Home()
    if args.daemon_command == "run":
        return run_daemon(home, log_file=args.log_file)
    if args.daemon_command == "stop":
        try:
            reply = request(home, "shutdown")
        except DaemonNotRunning:
            print("daemon not running")
            return EXIT_OK
        pid = reply.get("pid")
        deadline = time.monotonic() + CLIENT_LONG_TIMEOUT_S
        pause = 0.005
        while DRIVER.process_running(pid):
            if time.monotonic() > deadline:
                raise OxmgrError(f"the daemon (pid {pid}) is still stopping; see {home.daemon_log}")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        print(f"daemon stopped (pid {pid})")
        return EXIT_OK
    try:
        info = request(home, "ping")
    except DaemonNotRunning:
        if args.json:
            _print_json({"running": False, "home": home.root})
        else:
            print(f"daemon not running (home {home.root})")
        return EXIT_ERROR
    if args.json:
        info = dict(info, running=True)
        info.pop("ok", None)
        _print_json(info)
    else:
        print(f"daemon running: pid {info['pid']}, version {info['version']}, {info['apps']} apps, "
              f"up {format_uptime(info['uptime_s'])}, home {info['home']}")
    return EXIT_OK


COMMANDS = {
    "start": cmd_start,
    "stop": _simple("stop", "stopped"),
    "restart": cmd_restart,
    "delete": _simple("delete", "deleted"), "del": _simple("delete", "deleted"),
    "list": cmd_list, "ls": cmd_list, "ps": cmd_list,
    "status": cmd_status, "describe": cmd_status, "show": cmd_status,
    "logs": cmd_logs,
    "flush": cmd_flush,
    "signal": cmd_signal,
    "reset": _simple("reset", "reset"),
    "import": cmd_import,
    "apply": cmd_apply,
    "convert": cmd_convert,
    "validate": cmd_validate,
    "runtime": cmd_runtime,
    "reload": cmd_reload,
    "scale": cmd_scale,
    "save": cmd_save,
    "resurrect": cmd_resurrect,
    "startup": cmd_startup,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
    "service": cmd_service,
    "daemon": cmd_daemon,
}


# =============================================================================
# 19. Entry point
# =============================================================================


def _exec_daemon(log_file):
    """Run as a script, become the daemon loaded from cached bytecode (the same pid).

    Python compiled this file to run it, and the compiler's garbage would
    stay in the daemon's RSS (~21 MiB instead of ~12) for its lifetime.
    """
    home = Home()
    home.ensure()
    warm_bytecode(_bytecode_cache(home))
    DRIVER.exec_into(daemon_argv(home, log_file=log_file))  # returns only where there is no exec


def main(argv=None):
    """Run the CLI; return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["daemon", "run"] and (len(argv) == 2 or (len(argv) == 4 and argv[2] == "--log-file")):
        # The daemon's own start: no argparse, which would stay in its memory for good.
        log_file = argv[3] if len(argv) == 4 else None
        try:
            if __name__ == "__main__":
                _exec_daemon(log_file)
            return run_daemon(log_file=log_file)
        except OxmgrError as exc:
            print(f"oxmgr: error: {exc}", file=sys.stderr)
            return exc.exit_code
    first = next((a for a in argv if not a.startswith("-")), None)
    known = any(first in names for names, _, _ in _SUBCOMMANDS)
    parser = _build_parser(first if known else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except OxmgrError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"oxmgr: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `oxmgr logs | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:  # pragma: no cover
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
