"""Tests for oxmgr.py: units first (in the module's section order), then real processes.

Run: python3 -m unittest -v test_oxmgr   (also works under pytest and as a script)
Slow soak tests run only with OXMGR_SLOW_TESTS=1.
"""

import asyncio
import contextlib
import faulthandler
import io
import json
import os
import re
import select
import selectors
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oxmgr  # noqa: E402

TIMEOUT_SCALE = float(os.environ.get("OXMGR_TEST_TIMEOUT_SCALE", "1"))
SHORT_TIMEOUT = 10 * TIMEOUT_SCALE
LONG_TIMEOUT = 30 * TIMEOUT_SCALE
SLOW = oxmgr.env_flag("OXMGR_SLOW_TESTS")
SOAK_ROUNDS = os.environ.get("OXMGR_SOAK_ROUNDS")  # read before the tests clear OXMGR_* from the environment
SOAK_SEED = int(os.environ.get("OXMGR_SOAK_SEED", "7"))
HERE = os.path.dirname(os.path.abspath(__file__))
OXMGR_PY = os.path.join(HERE, "oxmgr.py")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
POSIX_ONLY = unittest.skipIf(os.name == "nt", "POSIX processes and signals")


def setUpModule():
    # A deadlock prints every thread's stack and exits instead of hanging CI.
    faulthandler.dump_traceback_later(LONG_TIMEOUT * 8, exit=True)


def tearDownModule():
    faulthandler.cancel_dump_traceback_later()


# -- helpers ---------------------------------------------------------------------


def wait_until(predicate, timeout=SHORT_TIMEOUT, message=""):
    """Poll predicate (10 ms doubling to 0.2 s) until truthy; return its value."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}; last value {last!r}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def read_text(path):
    with open(path) as f:
        return f.read()


def python_child(code):
    """Return a command line that runs `code` in a clean Python (no site)."""
    return f"{shlex.quote(sys.executable)} -S -c {shlex.quote(textwrap.dedent(code))}"


READY_THEN_SLEEP = """
    import os, sys, time
    print("ready", os.getpid(), flush=True)
    while True:
        time.sleep(60)
"""

IGNORE_SIGTERM = """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", os.getpid(), flush=True)
    while True:
        time.sleep(60)
"""

PRINT_SIGNALS = """
    import os, signal, sys, time
    def handler(signum, frame):
        print("got", signal.Signals(signum).name, flush=True)
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(s, handler)
    print("ready", os.getpid(), flush=True)
    while True:
        time.sleep(60)
"""


def EXIT_WITH(code, message="bye"):
    return f"""
    import sys
    print({message!r}, flush=True)
    print("err-" + {message!r}, file=sys.stderr, flush=True)
    sys.exit({code})
    """


def SPEW_LINES(n):
    return f"""
    import os, sys, time
    out = sys.stdout
    for i in range({n}):
        out.write("line %07d\\n" % i)
    out.flush()
    print("done", flush=True)
    while True:
        time.sleep(60)
    """


def pids_with_env(marker):
    """Return pids whose environment contains `marker` (NAME=value)."""
    needle = marker.encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read() + b"\0"
        except OSError:
            continue
        if b"\0" + needle in b"\0" + env:
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if f.read().split(b")")[-1].split()[0] == b"Z":
                        continue  # a zombie holds nothing
            except OSError:
                continue
            found.append(int(name))
    return found


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class HomeTestCase(unittest.TestCase):
    """A private OXMGR_HOME and a clean OXMGR_* environment for each test."""

    extra_env = {}
    home_name = "home"

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="oxt")
        self.addCleanup(tmp.cleanup)
        self.home_dir = os.path.join(tmp.name, self.home_name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OXMGR_")}
        env["OXMGR_HOME"] = self.home_dir
        env.update(self.extra_env)
        patcher = mock.patch.dict(os.environ, env, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.home = oxmgr.Home(self.home_dir)
        self.tmp = tmp.name

    def cli(self, *argv):
        """Run the CLI in-process; return (code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = oxmgr.main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    def cli_ok(self, *argv):
        code, out, err = self.cli(*argv)
        self.assertEqual(code, 0, f"oxmgr {' '.join(map(str, argv))} failed: {err}{self.daemon_log_tail()}")
        return out

    def cli_subprocess(self, *argv, timeout=LONG_TIMEOUT):
        return subprocess.run([sys.executable, OXMGR_PY] + [str(a) for a in argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)

    def daemon_log_tail(self, n=30):
        try:
            with open(self.home.daemon_log, errors="replace") as f:
                return "\n--- daemon.log ---\n" + "".join(f.readlines()[-n:])
        except OSError:
            return ""


class DaemonTestCase(HomeTestCase):
    """A real daemon subprocess per test; cleanup leaves no process behind."""

    def setUp(self):
        super().setUp()
        self.marker = f"OXMGR_HOME={self.home_dir}"
        self.addCleanup(self.kill_world)
        self.daemon = None
        self.start_daemon()

    def start_daemon(self):
        os.makedirs(self.home_dir, mode=0o700, exist_ok=True)
        log = open(self.home.daemon_log, "ab")
        self.addCleanup(log.close)
        argv = oxmgr.daemon_argv(self.home)  # stdio goes to our file
        self.daemon = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        wait_until(self.daemon_up, message="daemon ping" + self.daemon_log_tail())
        return self.daemon

    def daemon_up(self):
        try:
            return oxmgr.request(self.home, "ping", timeout=2)
        except oxmgr.OxmgrError:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError("daemon exited early" + self.daemon_log_tail()) from None
            return None

    def stop_daemon(self):
        """Graceful shutdown through the socket; waits for the process."""
        try:
            oxmgr.request(self.home, "shutdown", timeout=5)
        except oxmgr.OxmgrError:
            pass
        if self.daemon is not None:
            self.daemon.wait(LONG_TIMEOUT)

    def kill_world(self):
        """Stop the daemon (ours or one the CLI started), then check nothing survives."""
        try:
            pid = oxmgr.request(self.home, "ping", timeout=5)["pid"]
            oxmgr.request(self.home, "shutdown", timeout=5)
            wait_until(lambda: not oxmgr.DRIVER.process_running(pid), LONG_TIMEOUT, "daemon exit")
        except oxmgr.OxmgrError:
            pass
        if self.daemon is not None and self.daemon.poll() is None:
            try:
                self.daemon.wait(LONG_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        leaked = {pid: cmdline(pid) for pid in pids_with_env(self.marker)}
        kill_pids(leaked)
        if leaked:
            raise AssertionError(f"processes leaked by the test: {leaked}")

    def wait(self, predicate, message="", timeout=SHORT_TIMEOUT):
        try:
            return wait_until(predicate, timeout, message)
        except AssertionError as exc:
            raise AssertionError(f"{exc}{self.daemon_log_tail()}") from None

    def background_cli(self, *argv):
        """Run the CLI in a subprocess that the test does not wait for (it is killed at cleanup)."""
        cli = subprocess.Popen([sys.executable, OXMGR_PY] + list(argv), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, universal_newlines=True)

        def end():
            if cli.poll() is None:
                cli.kill()
            if not cli.stderr.closed:
                cli.communicate()
        self.addCleanup(end)
        return cli

    def finished(self, cli):
        _, err = cli.communicate(timeout=LONG_TIMEOUT)
        self.assertEqual(cli.returncode, 0, err)

    def start_app(self, name, code, *flags):
        self.cli_ok("start", python_child(code), "--name", name, *flags)
        return self.info(name)

    def info(self, name):
        return oxmgr.request(self.home, "status", targets=[name])["processes"][0]

    def wait_status(self, name, *statuses, timeout=SHORT_TIMEOUT):
        return self.wait(lambda: (lambda i: i if i["status"] in statuses else None)(self.info(name)),
                         f"{name} to be {statuses}", timeout)

    def wait_log(self, name, text, stream="out", timeout=SHORT_TIMEOUT):
        path = self.home.log_path(name, stream)

        def has():
            try:
                with open(path, errors="replace") as f:
                    return text in f.read()
            except OSError:
                return False
        return self.wait(has, f"{text!r} in {path}", timeout)

    def wait_ready_pid(self, name, timeout=SHORT_TIMEOUT):
        """Wait for the app's own 'ready <pid>' line and return that pid."""
        def ready():
            info = self.info(name)
            if not info["pid"]:
                return None
            try:
                with open(self.home.log_path(name, "out")) as f:
                    lines = f.read().split()
            except OSError:
                return None
            return info["pid"] if str(info["pid"]) in lines else None
        return self.wait(ready, f"{name} ready", timeout)


def write_stat(pid, comm, state="S", ppid=1, pgid=None, sid=None, utime=10, stime=5, start=1000, rss=100):
    """Build /proc/<pid>/stat text with the given fields."""
    pgid = pid if pgid is None else pgid
    sid = pid if sid is None else sid
    fields = [state, ppid, pgid, sid, 0, -1, 4194560, 0, 0, 0, 0, utime, stime, 0, 0, 20, 0, 1, 0,
              start, 1000000, rss]
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + " 0 0 0"


# -- 4. small utilities ------------------------------------------------------------


class TestUtilities(unittest.TestCase):

    def test_parse_duration_table(self):
        for text, unit, expected in [("500ms", "s", 0.5), ("2s", "s", 2.0), ("1.5m", "s", 90.0),
                                     ("3h", "s", 10800.0), ("1d", "s", 86400.0), ("5", "s", 5.0),
                                     (5, "s", 5.0), (1500, "ms", 1.5), ("0", "s", 0.0), (" 2 s", "s", 2.0)]:
            with self.subTest(text=text):
                self.assertAlmostEqual(oxmgr.parse_duration(text, unit), expected)

    def test_parse_duration_rejects_garbage(self):
        for text in ["", "abc", "-1", "5 parsecs", "nan", "inf", True, "1e999"]:
            with self.subTest(text=text), self.assertRaises(ValueError):
                oxmgr.parse_duration(text)

    def test_parse_size_table(self):
        for text, expected in [("150M", 150 << 20), ("1G", 1 << 30), ("512K", 512 << 10),
                               ("2048", 2048), (4096, 4096), ("1.5MB", int(1.5 * (1 << 20))), ("10mib", 10 << 20)]:
            with self.subTest(text=text):
                self.assertEqual(oxmgr.parse_size(text), expected)

    def test_parse_size_rejects_garbage(self):
        for text in ["lots", "12Q", "-5M", False]:
            with self.subTest(text=text), self.assertRaises(ValueError):
                oxmgr.parse_size(text)

    def test_format_helpers(self):
        self.assertEqual(oxmgr.format_bytes(512), "512B")
        self.assertEqual(oxmgr.format_bytes(20 << 20), "20.0M")
        self.assertEqual(oxmgr.format_bytes(None), "-")
        self.assertEqual(oxmgr.format_uptime(59), "59s")
        self.assertEqual(oxmgr.format_uptime(3600 * 5 + 1), "5h")
        self.assertEqual(oxmgr.format_uptime(86400 * 2), "2d")
        self.assertEqual(oxmgr.format_duration(0.25), "250ms")
        self.assertEqual(oxmgr.format_duration(300), "5m")

    def test_parse_signal_forms(self):
        for text in ["SIGTERM", "TERM", "term", "15"]:
            with self.subTest(text=text):
                self.assertEqual(oxmgr.parse_signal(text), signal.SIGTERM)
        for text in ["SIGNOPE", "0", "999", "SIG_IGN", ""]:
            with self.subTest(text=text), self.assertRaises(ValueError):
                oxmgr.parse_signal(text)

    def test_decode_wait_status_and_describe(self):
        self.assertEqual(oxmgr.decode_wait_status(3 << 8), (3, None))
        self.assertEqual(oxmgr.decode_wait_status(signal.SIGKILL), (None, signal.SIGKILL))
        self.assertEqual(oxmgr.describe_exit(None, signal.SIGKILL), "killed by SIGKILL")
        self.assertEqual(oxmgr.describe_exit(2, None), "exited with code 2")
        self.assertEqual(oxmgr.exit_code_number(None, signal.SIGTERM), 128 + signal.SIGTERM)

    def test_needs_shell_table(self):
        for command, expected in [
            ("node server.js", False), ("python3 -c 'print(1)'", False),
            ("echo 'a | b'", False), ('echo "a > b"', False), ("a\\|b", False),
            ("a | b", True), ("a && b", True), ("a > out.txt", True), ("echo $HOME", True),
            ('echo "$HOME"', True), ("echo `id`", True), ("ls *.js", True), ("FOO=1 node x", True),
            ("node x # comment", True), ("cd /tmp; ls", True), ("echo $(id)", True), ("cat ~/x", True),
        ]:
            with self.subTest(command=command):
                self.assertEqual(oxmgr.needs_shell(command), expected)

    def test_split_command(self):
        sh = ("/bin/sh", "-c")
        self.assertEqual(oxmgr.split_command("node 'my app.js' --port 3", sh), ["node", "my app.js", "--port", "3"])
        self.assertEqual(oxmgr.split_command("a | b", sh), ["/bin/sh", "-c", "a | b"])
        self.assertEqual(oxmgr.split_command("a | b", ("cmd.exe", "/c")), ["cmd.exe", "/c", "a | b"])
        with self.assertRaises(ValueError):
            oxmgr.split_command("node 'unbalanced", sh)
        with self.assertRaises(ValueError):
            oxmgr.split_command("   ", sh)

    def test_atomic_write_keeps_previous_copy(self):
        with tempfile.TemporaryDirectory() as d:
            path, backup = os.path.join(d, "s.json"), os.path.join(d, "s.json.bak")
            oxmgr.atomic_write(path, b"one", backup=backup)
            self.assertFalse(os.path.exists(backup))
            oxmgr.atomic_write(path, b"two", backup=backup)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), b"two")
            with open(backup, "rb") as f:
                self.assertEqual(f.read(), b"one")
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            self.assertEqual(sorted(os.listdir(d)), ["s.json", "s.json.bak"])  # no temp files left

    def test_moment_format_translation(self):
        self.assertEqual(oxmgr._moment_to_strftime("YYYY-MM-DD HH:mm:ss"), "%Y-%m-%d %H:%M:%S")
        self.assertEqual(oxmgr._moment_to_strftime("%H:%M"), "%H:%M")
        stamp = oxmgr.format_timestamp("%Y %f", when=1700000000.25)
        self.assertTrue(stamp.endswith(" 250"), stamp)

# -- 5. process table -------------------------------------------------------------------


class TestPlatformParsers(unittest.TestCase):

    def test_parse_proc_stat_comm_with_parens_and_spaces(self):
        text = write_stat(42, "evil) (name x", state="R", ppid=7, pgid=40, sid=39, utime=30, stime=12,
                          start=5555, rss=10)
        st = oxmgr._parse_proc_stat(text, page_bytes=4096)
        self.assertEqual((st.pid, st.ppid, st.pgid, st.sid, st.state), (42, 7, 40, 39, "R"))
        self.assertEqual(st.cpu_ticks, 42)
        self.assertEqual(st.start_ticks, 5555)
        self.assertEqual(st.rss_bytes, 40960)

    def test_parse_proc_stat_malformed_is_none(self):
        for text in ["", "12 no parens", "12 (x) S 1 2", "x (y) S 1 2 3"]:
            with self.subTest(text=text):
                self.assertIsNone(oxmgr._parse_proc_stat(text))

    def test_parse_proc_stat_real_self(self):
        st = oxmgr.DRIVER.read_stats(os.getpid())
        self.assertEqual(st.pid, os.getpid())
        self.assertEqual(st.ppid, os.getppid())
        self.assertGreater(st.rss_bytes, 0)
        self.assertIsNone(oxmgr.DRIVER.read_stats(2 ** 22 + 12345))

    def test_parse_ps_output(self):
        text = ("  101     1   101   101 Ss   00:01.50  2048 Mon Nov 20 10:00:00 2026\n"
                "  102   101   101   101 R  1-02:03:04  1024 Mon Nov 20 10:00:01 2026\n"
                "garbage line\n")
        table = oxmgr._parse_ps_output(text)
        self.assertEqual(sorted(table), [101, 102])
        self.assertEqual(table[101].rss_bytes, 2048 * 1024)
        self.assertEqual(table[101].cpu_ticks, 150)
        self.assertEqual(table[102].cpu_ticks, (86400 + 7384) * 100)
        self.assertEqual(table[102].ppid, 101)

    def test_tree_members_follows_children_and_session(self):
        S = oxmgr.ProcStats
        table = {1: S(1, 0, 1, 1, "S", 0, 0, 0), 10: S(10, 1, 10, 10, "S", 0, 0, 0),
                 11: S(11, 10, 10, 10, "S", 0, 0, 0), 12: S(12, 11, 12, 12, "S", 0, 0, 0),
                 13: S(13, 1, 10, 10, "S", 0, 0, 0), 20: S(20, 1, 20, 20, "S", 0, 0, 0)}
        self.assertEqual(oxmgr.tree_members(table, 10, sid=10), {10, 11, 12, 13})
        self.assertEqual(oxmgr.tree_members(table, 10), {10, 11, 12})

    def test_tree_sampler_cpu_and_rss(self):
        S = oxmgr.ProcStats
        now = [100.0]
        sampler = oxmgr.TreeSampler(clock=lambda: now[0], ticks_per_s=100)
        t1 = {10: S(10, 1, 10, 10, "S", 100, 5, 1000), 11: S(11, 10, 10, 10, "S", 50, 6, 500)}
        first = sampler.sample({10: 10}, t1)
        self.assertEqual(first[10], (None, 1500))
        now[0] = 102.0
        t2 = {10: S(10, 1, 10, 10, "S", 200, 5, 1000), 11: S(11, 10, 10, 10, "Z", 50, 6, 0),
              12: S(12, 10, 10, 10, "S", 40, 7, 2000)}
        cpu, rss = sampler.sample({10: 10}, t2)[10]
        self.assertEqual(rss, 3000)
        self.assertAlmostEqual(cpu, 70.0)  # (100 + 0 + 40 ticks) / 100 Hz / 2 s


# -- 6. platform drivers ---------------------------------------------------------------------


class TestLayout(unittest.TestCase):
    """The file's shape, checked on its source: sections, one platform split, public modules only."""

    @classmethod
    def setUpClass(cls):
        with open(OXMGR_PY, encoding="utf-8") as f:
            cls.lines = f.read().splitlines()
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            cls.test_lines = f.read().splitlines()

    def sections(self):
        """Yield (section number, line number, code without its comment) for every line."""
        section = 0
        for number, line in enumerate(self.lines, 1):
            banner = re.match(r"# (\d+)\. ", line)
            if banner:
                section = int(banner.group(1))
            yield section, number, line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""

    def test_sections_match_the_table_of_contents_and_the_tests(self):
        banners = [line[2:] for line in self.lines if re.match(r"# \d+\. ", line)]
        toc = [line.strip() for line in oxmgr.__doc__.splitlines() if re.match(r"\s+\d+\. ", line)]
        self.assertEqual(len(toc), len(banners))
        for entry, banner in zip(toc, banners):
            self.assertTrue(banner.startswith(entry), (entry, banner))
        self.assertEqual([int(b.split(".")[0]) for b in banners], list(range(1, len(banners) + 1)))
        numbers = [int(m.group(1)) for m in (re.match(r"# -- (\d+)\. ", line) for line in self.test_lines) if m]
        self.assertEqual(numbers, sorted(numbers), "the test file follows the module's order")
        self.assertTrue(set(numbers) <= set(range(1, len(banners) + 1)))

    def test_platform_tests_live_in_the_driver_section_only(self):
        driver = [int(b[2:].split(".")[0]) for b in self.lines if b.startswith("# ") and "Platform drivers" in b][0]
        for section, number, code in self.sections():
            if re.search(r"\bos\.name\b|\bsys\.platform\b|\b_WINDOWS\b|\b_LINUX\b|\b_DARWIN\b", code):
                self.assertEqual(section, driver, f"oxmgr.py:{number}: {code.strip()}")

    def test_public_standard_library_only(self):
        for _, number, code in self.sections():
            self.assertIsNone(re.match(r"\s*(import|from)\s+_(?!_future__)", code), f"oxmgr.py:{number}: {code}")
            for banned in ("_fast_parse", "marshal", "_RealChild", "_accept("):
                self.assertNotIn(banned, code, f"oxmgr.py:{number}")

    def test_the_bootstrap_imports_what_the_header_imports(self):
        """Only this file's bytecode may go under the cache prefix: the bootstrap loads the header's modules first."""
        header = [line.split()[1] for section, _, line in self.sections()
                  if section == 1 and line.startswith("import ")]
        self.assertEqual(oxmgr._HEADER_IMPORTS.split(", "), header)

    def test_every_driver_has_the_same_methods(self):
        def public(cls):
            return {name for name in dir(cls) if not name.startswith("_")}
        self.assertEqual(public(oxmgr.LinuxDriver), public(oxmgr.PosixDriver))
        self.assertEqual(public(oxmgr.WindowsDriver), public(oxmgr.PosixDriver))


@POSIX_ONLY
class TestPosixDriver(unittest.TestCase):
    """The real driver: processes, process groups, sockets, locks, file watches."""

    def setUp(self):
        self.driver = oxmgr.DRIVER
        tmp = tempfile.TemporaryDirectory(prefix="oxd")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name

    def spawn(self, code, cwd=None):
        child = self.driver.spawn([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd, dict(os.environ))
        self.addCleanup(child.stderr.close)
        self.addCleanup(child.stdout.close)
        self.addCleanup(self.reap, child)
        return child

    def reap(self, child):
        self.driver.kill_tree(child.pid, signal.SIGKILL)
        try:
            os.waitpid(child.pid, 0)
        except ChildProcessError:
            pass  # the test reaped it
        child.reaped(-9)

    def test_spawn_gives_its_own_session_and_group_and_kill_tree_reaches_both(self):
        child = self.spawn("""
            import os, subprocess, sys, time
            kid = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
            print(os.getpid(), kid.pid, flush=True)
            print("to stderr", file=sys.stderr, flush=True)
            time.sleep(60)
        """, cwd=self.tmp)
        pid, kid = map(int, child.stdout.readline().split())
        self.assertEqual(pid, child.pid)
        self.assertEqual(child.stderr.readline(), b"to stderr\n")
        self.assertEqual((os.getsid(pid), os.getpgid(pid), os.getpgid(kid)), (pid, pid, pid))
        self.assertIsNotNone(child.start_ticks)
        self.assertTrue(self.driver.tree_alive(pid))
        self.assertTrue(self.driver.kill_tree(pid, signal.SIGTERM))
        self.assertEqual(oxmgr.decode_wait_status(os.waitpid(pid, 0)[1]), (None, signal.SIGTERM))
        child.reaped(128 + signal.SIGTERM)
        wait_until(lambda: not self.driver.tree_alive(pid), message="the grandchild gone with the group")
        # Its zombie still takes signals until init reaps it (slowly, on some machines).
        wait_until(lambda: not self.driver.kill_tree(pid, signal.SIGTERM), message="the zombie reaped")
        self.assertFalse(self.driver.kill_tree(1, 0))  # never init's group
        self.assertFalse(self.driver.kill_tree(0, 0))  # never our own

    def test_spawn_errors_say_what_is_wrong(self):
        for argv, cwd, code, text in [
            (["/no/such/program"], None, 127, "command not found: '/no/such/program'"),
            ([self.tmp], None, 126, "permission denied"),
            (["true"], os.path.join(self.tmp, "missing"), 127, "cwd does not exist"),
            (["tr\0ue"], None, 126, "embedded null"),
        ]:
            with self.subTest(argv=argv), self.assertRaises(oxmgr.SpawnError) as cm:
                self.driver.spawn(argv, cwd, dict(os.environ))
            self.assertEqual(cm.exception.code, code)
            self.assertIn(text, str(cm.exception))

    def test_unix_socket_is_born_private_and_tells_the_peer_uid(self):
        for directory in (self.tmp, os.path.join(self.tmp, *["d" * 50] * 3)):  # too long for sun_path: via /proc
            with self.subTest(length=len(directory)):
                os.makedirs(directory, exist_ok=True)
                path = os.path.join(directory, "c.sock")
                server = self.driver.bind_unix(path)
                self.addCleanup(server.close)
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
                server.listen(1)
                client = self.driver.connect_unix(path, SHORT_TIMEOUT)
                self.addCleanup(client.close)
                conn, _ = server.accept()
                self.addCleanup(conn.close)
                self.assertEqual(self.driver.peer_uid(conn), os.getuid())
                self.assertEqual(self.driver.peer_uid(client), os.getuid())
                self.assertTrue(self.driver.trusted_uid(os.getuid()))
                self.assertFalse(self.driver.trusted_uid(65534) and os.getuid() != 65534)

    def test_lock_is_exclusive(self):
        path = os.path.join(self.tmp, "daemon.lock")
        fd = self.driver.lock(path)
        self.assertIsNotNone(fd)
        self.addCleanup(os.close, fd)
        self.assertIsNone(self.driver.lock(path))  # flock: another open file description is refused

    def test_process_table_and_leftover_trees(self):
        table = self.driver.process_table()
        me = table[os.getpid()]
        self.assertEqual(me.pid, os.getpid())
        self.assertEqual(self.driver.read_stats(os.getpid()).start_ticks, me.start_ticks)
        self.assertTrue(self.driver.process_running(os.getpid()))
        self.assertFalse(self.driver.process_running(2 ** 22 + 77))
        child = self.spawn("import os, time; print(os.getpid(), flush=True); time.sleep(60)")
        child.stdout.readline()
        self.assertTrue(self.driver.leftover_tree(child.pid, child.start_ticks))
        self.assertFalse(self.driver.leftover_tree(child.pid, child.start_ticks + 1))  # a stranger reusing the pid

    def test_parse_inotify_fixture(self):
        import struct
        create, isdir = oxmgr._Inotify._CREATE, oxmgr._Inotify._ISDIR
        data = struct.pack("iIII", 1, create, 0, 16) + b"file.txt".ljust(16, b"\0")
        data += struct.pack("iIII", 2, create | isdir, 7, 0)
        self.assertEqual(oxmgr._parse_inotify(data), [(1, create, 0, "file.txt"), (2, create | isdir, 7, "")])

    @unittest.skipUnless(sys.platform.startswith("linux"), "inotify")
    def test_file_watch_reports_changes_and_new_directories(self):
        watch = self.driver.file_watch()
        self.addCleanup(watch.close)
        wd = watch.add(self.tmp)
        with open(os.path.join(self.tmp, "f.txt"), "w") as f:
            f.write("x")
        os.mkdir(os.path.join(self.tmp, "sub"))
        seen = []
        while ("sub", "new_dir") not in seen:
            ready, _, _ = select.select([watch.fileno()], [], [], SHORT_TIMEOUT)
            self.assertTrue(ready, seen)
            seen += [(name, kind) for w, name, kind in watch.read() if w == wd]
        self.assertIn(("f.txt", "change"), seen)


# -- 7. config model -----------------------------------------------------------------


class TestConfigModel(unittest.TestCase):

    def test_defaults(self):
        spec = oxmgr.AppSpec.from_dict({"name": "api", "command": "node server.js"})
        self.assertEqual(spec.restart_policy, "on-failure")
        self.assertEqual(spec.max_restarts, 10)
        self.assertEqual(spec.min_uptime_s, 1.0)
        self.assertEqual(spec.stop_signal, "SIGTERM")
        self.assertEqual(spec.stop_timeout_s, 5.0)
        self.assertEqual(spec.env, {})
        self.assertEqual(spec.namespace, "default")

    def test_errors_name_the_key_and_say_what_is_expected(self):
        cases = [({"restart_policy": "sometimes"}, "restart_policy"), ({"max_restarts": -1}, "max_restarts"),
                 ({"stop_signal": "SIGNOPE"}, "stop_signal"), ({"stop_timeout_s": "soon"}, "stop_timeout_s"),
                 ({"env": {"A": [1]}}, "env"), ({"command": "node 'x"}, "command"),
                 ({"name": "has space"}, "name"), ({"name": "42"}, "name"), ({"bogus": 1}, "bogus"),
                 ({"cwd": "relative/dir"}, "cwd"), ({"exp_backoff": "maybe"}, "exp_backoff")]
        for extra, key in cases:
            data = {"name": "api", "command": "node x.js"}
            data.update(extra)
            with self.subTest(key=key):
                with self.assertRaises(oxmgr.ConfigError) as cm:
                    oxmgr.AppSpec.from_dict(data, where="oxfile.toml: app 'api'")
                message = str(cm.exception)
                self.assertIn("oxfile.toml: app 'api'", message)
                self.assertIn(key, message)

    def test_normalisation(self):
        spec = oxmgr.AppSpec.from_dict({"name": "a", "command": "x", "restart_policy": "on_failure",
                                        "stop_signal": "int", "env": {"N": 3, "B": True, "Z": None},
                                        "stop_exit_codes": [0, "2"], "log_date_format": "YYYY"})
        self.assertEqual(spec.restart_policy, "on-failure")
        self.assertEqual(spec.stop_signal, "SIGINT")
        self.assertEqual(spec.env, {"N": "3", "B": "true", "Z": ""})
        self.assertEqual(spec.stop_exit_codes, [0, 2])
        self.assertEqual(spec.log_date_format, "%Y")

    def test_spec_is_immutable_and_round_trips(self):
        spec = oxmgr.AppSpec.from_dict({"name": "a", "command": "x", "env": {"K": "V"}})
        with self.assertRaises(AttributeError):
            spec.name = "b"
        again = oxmgr.AppSpec.from_dict(spec.to_dict())
        self.assertEqual(again, spec)
        self.assertEqual(again.fingerprint(), spec.fingerprint())
        self.assertNotEqual(spec.replace(command="y").fingerprint(), spec.fingerprint())

    def test_infer_interpreter(self):
        self.assertEqual(oxmgr.infer_interpreter("app.js --port 3"), "node")
        self.assertEqual(oxmgr.infer_interpreter("worker.py"), sys.executable)
        self.assertEqual(oxmgr.infer_interpreter("./run.sh"), "sh")
        self.assertIsNone(oxmgr.infer_interpreter("node app.js"))

    def test_resolve_argv(self):
        spec = oxmgr.AppSpec.from_dict({"name": "a", "command": "app.js --port 3", "interpreter": "node",
                                        "interpreter_args": ["--inspect"]})
        self.assertEqual(oxmgr.resolve_argv(spec), ["node", "--inspect", "app.js", "--port", "3"])
        spec = oxmgr.AppSpec.from_dict({"name": "a", "command": "app.js > x", "interpreter": "node"})
        self.assertEqual(oxmgr.resolve_argv(spec), ["/bin/sh", "-c", "node app.js > x"])
        spec = oxmgr.AppSpec.from_dict({"name": "a", "command": "./bin/app", "interpreter": "none"})
        self.assertEqual(oxmgr.resolve_argv(spec), ["./bin/app"])

    def test_default_app_name(self):
        for command, name in [("node server.js", "server"), ("python3 -u worker.py", "worker"),
                              ("/usr/bin/redis-server --port 1", "redis-server"), ("app.js", "app"),
                              ("sh -c 'x | y'", "sh"), ("./123", "app-123"), ("bun run dev", "run"),
                              ("a | b", "a"), ("python3 -c 'print(1)'", "python3"),
                              ("python3 -m http.server 8000", "http.server")]:
            with self.subTest(command=command):
                self.assertEqual(oxmgr.default_app_name(command), name)

    def test_child_environment_layers(self):
        spec = oxmgr.AppSpec.from_dict({"name": "web-1", "command": "x", "env": {"A": "app", "PORT": "1"},
                                        "instance": 1})
        env = oxmgr.child_environment(spec, {"A": "cli", "PATH": "/bin", "OXMGR_HOME": "/elsewhere"}, 7, "/h")
        self.assertEqual(env["A"], "app")
        self.assertEqual(env["PATH"], "/bin")
        self.assertEqual((env["OXMGR_NAME"], env["OXMGR_ID"], env["NODE_APP_INSTANCE"]), ("web-1", "7", "1"))
        self.assertEqual(env["OXMGR_HOME"], "/h")  # the daemon's own: the marker a later daemon looks for


# -- 8. config files -------------------------------------------------------------------------

try:
    import tomllib  # novermin  (compared with when present)
except ImportError:  # Python < 3.11
    tomllib = None

EXAMPLES = os.path.join(HERE, "examples")
HAVE_NODE = oxmgr._which("node") is not None

# The oxfile of the Oxmgr README, as printed there.
OXMGR_README_OXFILE = """
version = 1

[defaults]
restart_policy = "on_failure"
max_restarts = 10
stop_timeout_secs = 5
max_memory_mb = 256

[[apps]]
name = "db"
command = "docker compose up db"
start_order = 0

[[apps]]
name = "api"
command = "node server.js"
depends_on = ["db"]
instances = 2
instance_var = "INSTANCE_ID"
restart_delay_secs = 2
start_delay_secs = 1
stop_signal = "SIGINT"
stop_timeout_secs = 8
namespace = "backend"
max_cpu_percent = 80

[apps.env]
BASE = "1"

[apps.profiles.prod]
instances = 4
start_order = 1
max_memory_mb = 768

[apps.profiles.prod.env]
NODE_ENV = "production"
"""

GOOD_OXFILE = """
version = 1
[defaults]
stop_timeout_secs = 2
[defaults.env]
SHARED = "yes"
[[apps]]
name = "one"
command = "python3 -c 'print(1)'"
[apps.env]
OWN = "1"
"""

SYNTAX_FORMS = r'''
# comment
bare = 'literal \no escape'
"quoted key" = "tab\there \u00e9 \U0001F600 \"q\" \\"
dotted.key.path = 1
dotted.other = true
ints = [1_000, +7, -3, 0xff, 0xDEAD_beef, 0o755, 0b1010, 0]
floats = [1.5, -0.25, 3e2, 6.02E+23, 1_0.0_1, inf, -inf, +inf]
nested = [[1, 2], ["a", 'b'], [], [ { x = 1 } ]]
multiline = [  # comment inside
    "a",
    "b",  # trailing comma follows
]
ml = """
first
second \
    joined"""
ml2 = """quotes "" inside and at the end"""""
lit_ml = QQQ
raw \n text QQQ
inline = { a = 1, b.c = "x", d = [1, 2] }
[table]
key = "value"
[table.sub]
deep = false
[[arr]]
n = 1
[[arr]]
n = 2
[arr.child]
c = 3
[[arr.items]]
i = 1
'''.replace("QQQ", "'''")

# A PM2 ecosystem file that uses every field the config issue names.
PM2_EVERY_FIELD = {
    "apps": [
        {
            "name": "api",
            "script": "server.js",
            "args": ["--port", "3000"],
            "node_args": "--max-old-space-size=256",
            "cwd": "srv",
            "instances": 3,
            "exec_mode": "cluster",
            "instance_var": "INSTANCE_ID",
            "increment_var": "PORT",
            "env": {"PORT": 3000, "DEBUG": False, "RATIO": 0.5, "NAME": "api", "EMPTY": None},
            "env_staging": {"NODE_ENV": "staging", "PORT": 4000},
            "autorestart": True,
            "max_restarts": 7,
            "min_uptime": 5000,
            "restart_delay": 1500,
            "kill_timeout": 8000,
            "listen_timeout": 12000,
            "wait_ready": True,
            "stop_exit_codes": [0, 3],
            "exp_backoff_restart_delay": 200,
            "max_memory_restart": "150M",
            "cron_restart": "0 */6 * * *",
            "watch": ["src", "config"],
            "ignore_watch": ["node_modules", "\\.log$"],
            "watch_delay": 2000,
            "out_file": "logs/api.out.log",
            "error_file": "logs/api.err.log",
            "log_file": "logs/api.log",
            "time": True,
            "namespace": "web",
        },
        {
            "name": "worker",
            "script": "worker.py",
            "interpreter_args": ["-u"],
            "instances": "max",
            "autorestart": False,
            "log_date_format": "YYYY-MM-DD HH:mm:ss",
            "merge_logs": True,
            "out_file": "logs/worker.log",
            "cron_restart": "*/30 * * * * *",
        },
        {"name": "tool", "script": "./bin/tool", "interpreter": "none", "instances": -1, "watch": True},
        {"name": "sh", "script": "job.sh", "args": "--fast 'two words'", "instances": 0},
    ]
}


def normalise_nan(value):
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, list):
        return [normalise_nan(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise_nan(v) for k, v in value.items()}
    return value


def generate_toml(rng):
    """A random TOML document in the oxfile subset, written in varied styles."""
    def key():
        if rng.random() < 0.8:
            return rng.choice(["name", "command", "a", "b_c", "x-y", "K9", "max_restarts", "env", "z"]) + \
                str(rng.randint(0, 50))
        return '"' + rng.choice(["with space", "dot.in.key", "é", "tab\\tkey"]) + str(rng.randint(0, 9)) + '"'

    def string():
        kind = rng.randint(0, 3)
        words = ["node", "server.js", "--port", "3000", "é", "日本", "$HOME", "a#b", "x=1", "'"]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 4)))
        if kind == 0:
            return '"' + text + rng.choice(["", "\\n", "\\t", "\\\"", "\\u00e9", "\\\\"]) + '"'
        if kind == 1:
            return "'" + text.replace("'", "") + "'"
        if kind == 2:
            return '"""\n' + text + "\nmore " + rng.choice(["", "\\\n   joined", "\"\" two quotes"]) + '"""'
        return "'''\n" + text.replace("'", "") + "\n'''"

    def scalar():
        choice = rng.randint(0, 5)
        if choice == 0:
            return str(rng.randint(-10 ** 6, 10 ** 6))
        if choice == 1:
            return rng.choice(["1_000", "0x1F", "0o17", "0b101", "+42", "-0"])
        if choice == 2:
            return rng.choice(["1.5", "-0.01", "2e3", "6.5E-2", "inf", "-inf", "nan", "3.0", "1e+2"])
        if choice == 3:
            return rng.choice(["true", "false"])
        return string()

    def value(depth=0):
        r = rng.random()
        if depth < 2 and r < 0.15:
            items = [value(depth + 1) for _ in range(rng.randint(0, 3))]
            sep = rng.choice([", ", ",\n  ", " , ", ",  # c\n"])
            trailing = "," if items and rng.random() < 0.3 else ""
            return "[" + sep.join(items) + trailing + "]"
        if depth < 2 and r < 0.25:
            keys = {key() for _ in range(rng.randint(0, 3))}
            return "{ " + ", ".join(f"{k} = {value(depth + 1)}" for k in keys) + " }"
        return scalar()

    lines = []
    used = set()

    def pairs(n):
        for _ in range(n):
            k = key()
            if k in used:
                continue
            used.add(k)
            lines.append(f"{k} = {value()}" + rng.choice(["", "  # note", "\t"]))

    pairs(rng.randint(0, 4))
    headers = set()
    for t in range(rng.randint(0, 4)):
        header = rng.choice([f"[table{t}]", "[[apps]]", f"[section{t}.sub]", f"[\"quoted {t}\"]"])
        if header in headers and not header.startswith("[["):
            continue
        headers.add(header)
        used.clear()
        lines.append("")
        lines.append(header)
        pairs(rng.randint(1, 5))
        if header == "[[apps]]" and rng.random() < 0.4:
            used.clear()
            lines.append("[apps.env]")
            pairs(rng.randint(1, 3))
    return "\n".join(lines) + "\n"


class ConfigTestCase(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="oxcfg")
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text) if isinstance(text, str) else json.dumps(text))
        return path

    def load(self, name, text, profile=None, only=None):
        return oxmgr.load_config([self.write(name, text)], profile, only)

    def by_name(self, config):
        return {spec.name: spec for spec in config.apps}


class TestTomlReader(ConfigTestCase):

    def both(self, text):
        mine = oxmgr.toml_loads(text, "t.toml", builtin=True)
        if tomllib is not None:
            self.assertEqual(normalise_nan(mine), normalise_nan(tomllib.loads(text)), text)
        return mine

    def test_every_oxfile_in_the_repo_and_tests(self):
        docs = [OXMGR_README_OXFILE, GOOD_OXFILE, SYNTAX_FORMS]
        for root, _, files in os.walk(HERE):
            for name in files:
                if name.endswith(".toml"):
                    with open(os.path.join(root, name)) as f:
                        docs.append(f.read())
        self.assertGreaterEqual(len(docs), 4)
        for doc in docs:
            with self.subTest(doc=doc[:40]):
                self.both(doc)

    def test_syntax_forms(self):
        data = self.both(SYNTAX_FORMS)
        self.assertEqual(data["ints"], [1000, 7, -3, 255, 0xDEADBEEF, 0o755, 10, 0])
        self.assertEqual(data["ml"], "first\nsecond joined")
        self.assertEqual(data["ml2"], 'quotes "" inside and at the end""')
        self.assertEqual(data["lit_ml"], "raw \\n text ")
        self.assertEqual(data["inline"], {"a": 1, "b": {"c": "x"}, "d": [1, 2]})
        self.assertEqual(data["arr"][1]["child"], {"c": 3})
        self.assertEqual(data["dotted"], {"key": {"path": 1}, "other": True})

    def test_generated_corpus_matches_tomllib(self):
        import random
        rng = random.Random(1234)
        for i in range(400):
            doc = generate_toml(rng)
            with self.subTest(i=i, doc=doc):
                self.both(doc)

    def test_outside_the_subset_or_invalid_is_an_error(self):
        for doc in ["when = 2024-01-02", "t = 07:32:00", "d = 1979-05-27T07:32:00Z"]:
            with self.subTest(doc=doc):  # valid TOML, outside the subset: a clear error, never a guess
                with self.assertRaises(oxmgr.ConfigError) as cm:
                    oxmgr.toml_loads(doc, "dates.toml", builtin=True)
                self.assertIn("outside the TOML subset", str(cm.exception))
                self.assertIn("use Python 3.11+ or install tomli", str(cm.exception))
        cases = ["a = 1\na = 2", "[t]\n[t]", "a = [1\n", "s = \"unterminated", "k = \"bad \\q escape\"",
                 "x = 1 2", "[[a]]\n[a]", "a = 1\n[a]", "v = {a = 1}\nv.b = 2", "= 1", "n = 01", "n = 1__0",
                 "s = 'line\nbreak'", "[a]\nb.c = 1\n[a.b]", "key", "f = .5", "f = 5.", "b = True",
                 "arr = []\n[[arr]]", "inline = { a = 1, }", "s = \"\\uD800\""]
        for doc in cases:
            with self.subTest(doc=doc):
                with self.assertRaises(oxmgr.ConfigError) as cm:
                    oxmgr.toml_loads(doc, "bad.toml", builtin=True)
                self.assertRegex(str(cm.exception), r"^bad\.toml:\d+:\d+: ")
                if tomllib is not None:
                    with self.assertRaises(tomllib.TOMLDecodeError):
                        tomllib.loads(doc)


class TestOxfile(ConfigTestCase):

    def test_oxmgr_readme_example(self):
        config = self.load("oxfile.toml", OXMGR_README_OXFILE)
        apps = self.by_name(config)
        self.assertEqual([a.name for a in config.apps], ["db", "api-0", "api-1"])
        api = apps["api-1"]
        self.assertEqual((api.base_name, api.instance, api.instance_var), ("api", 1, "INSTANCE_ID"))
        self.assertEqual(sum(a.base_name == "api" for a in config.apps), 2)
        self.assertEqual(api.command, "node server.js")
        self.assertEqual(api.restart_policy, "on-failure")
        self.assertEqual(api.max_restarts, 10)
        self.assertEqual((api.restart_delay_s, api.start_delay_s, api.stop_timeout_s), (2.0, 1.0, 8.0))
        self.assertEqual(api.stop_signal, "SIGINT")
        self.assertEqual(api.namespace, "backend")
        self.assertEqual(api.max_cpu_percent, 80.0)
        self.assertEqual(api.max_memory_bytes, 256 << 20)
        self.assertEqual(api.env, {"BASE": "1"})
        self.assertEqual(api.depends_on, ["db"])
        self.assertEqual(apps["db"].stop_timeout_s, 5.0)
        self.assertEqual(apps["db"].cwd, self.dir)  # no cwd: the file's directory
        self.assertEqual(oxmgr.child_environment(api, {}, 3, "/h")["INSTANCE_ID"], "1")
        prod = self.by_name(self.load("oxfile.toml", OXMGR_README_OXFILE, profile="prod"))
        self.assertEqual(sorted(prod), ["api-0", "api-1", "api-2", "api-3", "db"])
        self.assertEqual(prod["api-3"].env, {"BASE": "1", "NODE_ENV": "production"})
        self.assertEqual(prod["api-0"].max_memory_bytes, 768 << 20)
        self.assertEqual(prod["db"].max_memory_bytes, 256 << 20)

    def test_layers_expansion_and_paths(self):
        os.environ["OXT_DIR"] = "/srv/data"
        self.addCleanup(os.environ.pop, "OXT_DIR")
        text = """
            version = 1
            [defaults]
            cwd = "apps"
            [defaults.env]
            A = "default"
            B = "default"
            [[apps]]
            name = "web"
            command = "./web --data $OXT_DIR"
            depends_on = ["base"]
            [apps.env]
            B = "app"
            DATA = "${OXT_DIR}/web"
            UNSET = "x${OXT_NOPE_UNSET}y"
            FALLBACK = "${OXT_NOPE_UNSET:-dflt}"
            HOME_DIR = "~"
            DOLLAR = "$$5"
            [apps.logs]
            out = "~/web.out"
            err = "logs/web.err"
            max_size_mb = 1.5
            max_files = 2
            max_days = 3
            [apps.profiles.qa]
            depends_on = []
            [apps.profiles.qa.env]
            A = "qa"
            [[apps]]
            name = "base"
            command = "true"
            cwd = "/abs"
            [[apps]]
            name = "off"
            command = "true"
            disabled = true
        """
        config = self.load("sub/oxfile.toml", text)
        apps = self.by_name(config)
        self.assertEqual(sorted(apps), ["base", "web"])  # disabled apps are skipped
        web = apps["web"]
        sub = os.path.join(self.dir, "sub")
        self.assertEqual(web.cwd, os.path.join(sub, "apps"))
        self.assertEqual(apps["base"].cwd, "/abs")
        self.assertEqual(web.env, {"A": "default", "B": "app", "DATA": "/srv/data/web", "UNSET": "xy",
                                   "FALLBACK": "dflt", "HOME_DIR": os.path.expanduser("~"), "DOLLAR": "$5"})
        self.assertEqual(web.command, "./web --data $OXT_DIR")  # the shell expands commands, at run time
        self.assertEqual(web.out_file, os.path.expanduser("~/web.out"))
        self.assertEqual(web.err_file, os.path.join(sub, "apps", "logs", "web.err"))
        self.assertEqual((web.log_max_bytes, web.log_max_files, web.log_max_age_s),
                         (int(1.5 * (1 << 20)), 2, 3 * 86400.0))
        self.assertTrue(any("$OXT_NOPE_UNSET is not set" in w for w in config.warnings), config.warnings)
        self.assertEqual([a.name for a in config.apps], ["base", "web"])
        qa = self.by_name(self.load("sub/oxfile.toml", text, "qa"))
        self.assertEqual(qa["web"].env["A"], "qa")
        self.assertEqual(qa["web"].depends_on, [])  # a profile's depends_on replaces the app's

    def test_every_key_maps(self):
        config = self.load("oxfile.toml", r"""
            version = 1
            [[apps]]
            name = "full"
            command = "python3 app.py"
            namespace = "ns"
            restart_policy = "always"
            max_restarts = 3
            crash_restart_limit = 4
            restart_delay_secs = 0.5
            start_delay_secs = 2
            min_uptime_secs = 3
            exp_backoff = true
            exp_backoff_max_secs = 30
            stop_signal = "SIGQUIT"
            stop_timeout_secs = 9
            stop_exit_codes = [0, 2]
            health_cmd = "curl -fsS localhost:1/health"
            health_http = "http://127.0.0.1:1/health"
            health_tcp = "127.0.0.1:1"
            health_interval_secs = 15
            health_timeout_secs = 3
            health_max_failures = 5
            wait_ready = true
            ready_tcp = "127.0.0.1:1"
            ready_timeout_secs = 20
            max_memory_mb = 512
            max_cpu_percent = 90.5
            watch = ["src"]
            ignore_watch = ['\.tmp$']
            watch_delay_secs = 2
            cron_restart = "0 3 * * *"
            log_date_format = "YYYY-MM-DD"
            listen = ["tcp://127.0.0.1:3000", "unix:/tmp/app.sock"]
            cluster_mode = true
            git_repo = "x"
            mystery = 1
        """)
        spec = config.apps[0]
        expected = {"namespace": "ns", "restart_policy": "always", "max_restarts": 3, "crash_restart_limit": 4,
                    "restart_delay_s": 0.5, "start_delay_s": 2.0, "min_uptime_s": 3.0, "exp_backoff": True,
                    "backoff_max_s": 30.0, "stop_signal": "SIGQUIT", "stop_timeout_s": 9.0, "stop_exit_codes": [0, 2],
                    "health_cmd": "curl -fsS localhost:1/health", "health_http": "http://127.0.0.1:1/health",
                    "health_tcp": "127.0.0.1:1", "health_interval_s": 15.0, "health_timeout_s": 3.0,
                    "health_max_failures": 5, "wait_ready": True, "ready_tcp": "127.0.0.1:1",
                    "ready_timeout_s": 20.0, "max_memory_bytes": 512 << 20, "max_cpu_percent": 90.5,
                    "watch": ["src"], "ignore_watch": ["\\.tmp$"], "watch_delay_s": 2.0, "cron_restart": "0 3 * * *",
                    "log_date_format": "%Y-%m-%d", "listen": ["tcp://127.0.0.1:3000", "unix:/tmp/app.sock"]}
        for key, value in expected.items():
            with self.subTest(key=key):
                self.assertEqual(getattr(spec, key), value)
        warnings = "\n".join(config.warnings)
        self.assertIn("cluster_mode: not supported by oxmgr.py, ignored; use instances", warnings)
        self.assertIn("git_repo: not supported", warnings)
        self.assertIn("mystery: unknown key, ignored", warnings)

    def test_example_web_stack(self):
        path = os.path.join(EXAMPLES, "oxfile.toml")
        config = oxmgr.load_config([path])
        self.assertEqual([a.name for a in config.apps], ["db", "api-0", "api-1", "worker"])
        apps = self.by_name(config)
        self.assertEqual(apps["api-1"].cwd, os.path.join(EXAMPLES, "apps"))
        self.assertEqual(apps["worker"].depends_on, ["api"])
        self.assertEqual(apps["api-0"].env["LOG_LEVEL"], "info")
        prod = oxmgr.load_config([path], profile="prod")
        self.assertEqual(len(prod.apps), 6)
        self.assertEqual(self.by_name(prod)["api-3"].env["LOG_LEVEL"], "warning")
        only = oxmgr.load_config([path], only="api,worker")
        self.assertEqual([a.name for a in only.apps], ["api-0", "api-1", "worker"])
        self.assertEqual(only.all_names, ["db", "api-0", "api-1", "worker"])


class TestEcosystem(ConfigTestCase):

    def test_every_field(self):
        config = self.load("ecosystem.config.json", PM2_EVERY_FIELD, profile="staging")
        apps = self.by_name(config)
        cpus = os.cpu_count()
        self.assertEqual(sorted(n for n in apps if n.startswith("api")), ["api-0", "api-1", "api-2"])
        api = apps["api-2"]
        srv = os.path.join(self.dir, "srv")
        self.assertEqual(api.cwd, srv)
        self.assertEqual(api.command, "server.js --port 3000")
        self.assertEqual((api.interpreter, api.interpreter_args), ("node", ["--max-old-space-size=256"]))
        self.assertEqual(oxmgr.resolve_argv(api), ["node", "--max-old-space-size=256", "server.js", "--port", "3000"])
        self.assertEqual(api.env, {"PORT": "4002", "DEBUG": "false", "RATIO": "0.5", "NAME": "api", "EMPTY": "",
                                   "NODE_ENV": "staging"})
        self.assertEqual(oxmgr.child_environment(api, {}, 0, "/h")["INSTANCE_ID"], "2")
        self.assertEqual(api.restart_policy, "on-failure")
        self.assertEqual(api.max_restarts, 7)
        self.assertEqual((api.min_uptime_s, api.stop_timeout_s, api.ready_timeout_s), (5.0, 8.0, 12.0))  # ms
        self.assertEqual(api.restart_delay_s, 0.2)  # exp_backoff_restart_delay sets the base delay
        self.assertEqual((api.exp_backoff, api.backoff_factor), (True, 1.5))
        self.assertTrue(api.wait_ready)
        self.assertEqual(api.stop_exit_codes, [0, 3])
        self.assertEqual(api.max_memory_bytes, 150 << 20)
        self.assertEqual(api.cron_restart, "0 */6 * * *")
        self.assertEqual((api.watch, api.ignore_watch, api.watch_delay_s),
                         (["src", "config"], ["node_modules", "\\.log$"], 2.0))
        self.assertEqual(api.out_file, os.path.join(srv, "logs", "api.out-2.log"))
        self.assertEqual(api.err_file, os.path.join(srv, "logs", "api.err-2.log"))
        self.assertEqual(api.combined_file, os.path.join(srv, "logs", "api-2.log"))
        self.assertEqual(api.log_date_format, oxmgr.DEFAULT_TIME_FORMAT)
        self.assertEqual(api.namespace, "web")
        workers = [a for a in config.apps if a.base_name == "worker"]
        self.assertEqual(len(workers), cpus)
        worker = workers[0]
        self.assertEqual(worker.interpreter, sys.executable)
        self.assertEqual(worker.interpreter_args, ["-u"])
        self.assertEqual(worker.restart_policy, "never")
        self.assertEqual(worker.log_date_format, "%Y-%m-%d %H:%M:%S")
        self.assertTrue(worker.merge_logs)
        self.assertEqual(worker.out_file, os.path.join(self.dir, "logs", "worker.log"))  # shared, not suffixed
        self.assertEqual(worker.cron_restart, "*/30 * * * * *")
        tool = [a for a in config.apps if a.base_name == "tool"]
        self.assertEqual(len(tool), max(1, cpus - 1))
        self.assertIsNone(tool[0].interpreter)
        self.assertEqual(oxmgr.resolve_argv(tool[0]), ["./bin/tool"])
        self.assertEqual(tool[0].watch, ["."])
        sh = [a for a in config.apps if a.base_name == "sh"][0]
        self.assertEqual(oxmgr.resolve_argv(sh), ["bash", "job.sh", "--fast", "two words"])
        self.assertIn("exec_mode: cluster runs 3 separate processes", "\n".join(config.warnings))

    def test_profile_only_when_asked(self):
        apps = self.by_name(self.load("ecosystem.config.json", PM2_EVERY_FIELD, only="api"))
        self.assertEqual(apps["api-0"].env["PORT"], "3000")
        self.assertNotIn("NODE_ENV", apps["api-0"].env)

    def test_unknown_and_ignored_keys_warn(self):
        config = self.load("e.json", {"apps": [{"name": "a", "script": "a.js", "vizion": False, "uid": "www",
                                                "scirpt_typo": 1}]})
        text = "\n".join(config.warnings)
        self.assertIn("vizion: not supported by oxmgr.py, ignored", text)
        self.assertIn("uid: not supported by oxmgr.py, ignored; run oxmgr as that user instead", text)
        self.assertIn("scirpt_typo: unknown key, ignored", text)

    def test_single_app_and_bare_array_forms(self):
        self.assertEqual([a.name for a in self.load("one.json", {"name": "solo", "script": "x.js"}).apps], ["solo"])
        self.assertEqual([a.name for a in self.load("arr.json", [{"script": "srv.js"}]).apps], ["srv"])

    def test_json5(self):
        config = self.load("ecosystem.config.json5", """
            // comments, unquoted keys, single quotes, trailing commas
            {
              apps: [{
                name: 'five', script: "app.js", /* block */ instances: 0x2,
                env: { A: 'it\\'s', B: +1.5e1, C: Infinity, },
              },],
            }
        """)
        apps = self.by_name(config)
        self.assertEqual(sorted(apps), ["five-0", "five-1"])
        self.assertEqual(apps["five-0"].env, {"A": "it's", "B": "15.0", "C": "inf"})

    def test_js_twin_equals_json_with_and_without_node(self):
        json_apps = oxmgr.load_config([os.path.join(EXAMPLES, "ecosystem.config.json")]).apps
        with mock.patch.dict(os.environ, {"OXMGR_NODE": "/nonexistent/node"}):
            literal_apps = oxmgr.load_config([os.path.join(EXAMPLES, "ecosystem.config.js")]).apps
        self.assertEqual(literal_apps, json_apps)
        self.assertEqual([a.name for a in json_apps], ["api-0", "api-1", "worker"])
        if HAVE_NODE:
            self.assertEqual(oxmgr.load_config([os.path.join(EXAMPLES, "ecosystem.config.js")]).apps, json_apps)

    @unittest.skipUnless(HAVE_NODE, "node is not installed")
    def test_js_with_dirname_and_process_env(self):
        os.environ["OXT_PORT"] = "4567"
        self.addCleanup(os.environ.pop, "OXT_PORT")
        path = self.write("deploy/ecosystem.config.js", """
            const path = require('path');
            module.exports = {
              apps: [{
                name: 'dyn',
                script: path.join(__dirname, 'bin', 'server.js'),
                env: { PORT: process.env.OXT_PORT || 3000, ROOT: __dirname },
              }],
            };
        """)
        spec = oxmgr.load_config([path]).apps[0]
        deploy = os.path.join(self.dir, "deploy")
        self.assertEqual(spec.env, {"PORT": "4567", "ROOT": deploy})
        self.assertEqual(oxmgr.resolve_argv(spec), ["node", os.path.join(deploy, "bin", "server.js")])
        mjs = self.write("esm/ecosystem.config.mjs", "export default { apps: [{ name: 'esm', script: 'a.js', "
                                                     "env: { N: [1, 2].length } }] };\n")
        self.assertEqual(oxmgr.load_config([mjs]).apps[0].env, {"N": "2"})
        with mock.patch.dict(os.environ, {"OXMGR_NODE": "/nonexistent/node"}):
            with self.assertRaises(oxmgr.ConfigError) as cm:
                oxmgr.load_config([path])
        message = str(cm.exception)
        self.assertIn("ecosystem.config.js:6:", message)
        self.assertIn("install node", message)
        broken = self.write("boom.config.js", "throw new Error('boom');\n")
        with self.assertRaises(oxmgr.ConfigError) as cm:
            oxmgr.load_config([broken])
        self.assertIn("node could not evaluate it: Error: boom", str(cm.exception))

    def test_convert_round_trip(self):
        for source in ("ecosystem.config.json", "ecosystem.config.js"):
            path = os.path.join(EXAMPLES, source)
            for profile in (None, "production"):
                with self.subTest(source=source, profile=profile):
                    text = oxmgr.dump_oxfile(oxmgr.load_config([path], profile), profile)
                    again = oxmgr.load_config([self.write(f"converted-{profile}.toml", text)], profile="production")
                    self.assertEqual(again.apps, oxmgr.load_config([path], profile="production").apps, text)
        everything = self.write("every.json", PM2_EVERY_FIELD)
        text = oxmgr.dump_oxfile(oxmgr.load_config([everything], "staging"), "staging")
        again = oxmgr.load_config([self.write("every.toml", text)])
        self.assertEqual(again.apps, oxmgr.load_config([everything], "staging").apps, text)


# Broken configs: (file name, content, fragments that the one message must contain).
BROKEN_CONFIGS = [
    # What exec, a file name or the state file cannot carry, and numbers no timer can hold (issue 11).
    ("nul-env.json", {"apps": [{"name": "a", "script": "x", "env": {"KEY": "a\u0000b"}}]},
     ["apps[0] 'a': env: KEY:", "contains a NUL character"]),
    ("nul-arg.json", {"apps": [{"name": "a", "script": "x", "args": ["1\u0000"]}]}, ["'a': command:", "NUL"]),
    ("surrogate.json", '{"apps": [{"name": "a", "script": "x", "env": {"K": "\\ud800"}}]}',
     ["'a': env: K:", "not valid text"]),
    ("huge-duration.toml", "[[apps]]\nname='a'\ncommand='x'\nstop_timeout_secs=1e306",
     ["'a': stop_timeout_secs: expected a duration", "up to 365d"]),
    ("huge-size.json", {"apps": [{"name": "a", "script": "x", "max_memory_restart": "1e306G"}]},
     ["'a': max_memory_restart: expected a size", "up to 1024G"]),
    ("syntax.toml", "version = 1\n[[apps]]\nname = 'a'\ncommand = \n", ["syntax.toml:4:"]),
    ("syntax.json", '{"apps": [{"name": "a",, "script": "x"}]}', ["syntax.json:1:", "invalid JSON"]),
    ("deps.toml", "[[apps]]\nname='a'\ncommand='x'\ndepends_on=['ghost']",
     ["app 'a': depends_on: unknown app 'ghost'"]),
    ("cycle.toml", "[[apps]]\nname='a'\ncommand='x'\ndepends_on=['b']\n[[apps]]\nname='b'\ncommand='x'\n"
                   "depends_on=['a']", ["depends_on: dependency cycle: a -> b -> a"]),
    ("self.toml", "[[apps]]\nname='a'\ncommand='x'\ndepends_on=['a']", ["depends_on: an app cannot depend on itself"]),
    ("dup.toml", "[[apps]]\nname='a'\ncommand='x'\n[[apps]]\nname='a'\ncommand='y'", ["name: 'a' is already used"]),
    ("dupx.toml", "[[apps]]\nname='web'\ncommand='x'\ninstances=2\n[[apps]]\nname='web-1'\ncommand='y'",
     ["instance name 'web-1' collides with app"]),
    ("dur.toml", "[[apps]]\nname='a'\ncommand='x'\nrestart_delay_secs='soon'",
     ["app 'a': restart_delay_secs: expected a duration"]),
    ("size.json", {"apps": [{"name": "a", "script": "x", "max_memory_restart": "lots"}]},
     ["apps[0] 'a': max_memory_restart: expected a size like '200M', up to 1024G, got 'lots'"]),
    ("sig.toml", "[[apps]]\nname='a'\ncommand='x'\nstop_signal='SIGFOO'", ["stop_signal: unknown signal 'SIGFOO'"]),
    ("cron.toml", "[[apps]]\nname='a'\ncommand='x'\ncron_restart='61 * * * *'",
     ["cron_restart: '61' is outside 0-59 in minute field"]),
    ("cron6.json", {"apps": [{"name": "a", "script": "x", "cron_restart": "* * *"}]},
     ["cron_restart: expected 5 fields"]),
    ("split.toml", "[[apps]]\nname='a'\ncommand=\"node 'x\"", ["app 'a': command: cannot split"]),
    ("nocmd.toml", "[[apps]]\nname='a'", ["app 'a': command: each app needs a command"]),
    ("noscript.json", {"apps": [{"name": "a"}]}, ["apps[0] 'a': script: each app needs a script"]),
    ("policy.toml", "[[apps]]\nname='a'\ncommand='x'\nrestart_policy='sometimes'",
     ["restart_policy: expected one of always, on-failure, never"]),
    ("inst.json", {"apps": [{"name": "a", "script": "x", "instances": "lots"}]},
     ["instances: expected a whole number"]),
    ("env.toml", "[[apps]]\nname='a'\ncommand='x'\nenv='A=1'", ["env: expected a table of NAME = value"]),
    ("version.toml", "version = 2\n[[apps]]\nname='a'\ncommand='x'", ["version: only version = 1 is known"]),
    ("noapps.toml", "version = 1\n", ["apps: expected at least one [[apps]] table"]),
    ("mode.json", {"apps": [{"name": "a", "script": "x", "exec_mode": "turbo"}]},
     ["exec_mode: expected fork or cluster"]),
    ("url.toml", "[[apps]]\nname='a'\ncommand='x'\nhealth_http='localhost/health'", ["health_http: expected a URL"]),
    ("ready.toml", "[[apps]]\nname='a'\ncommand='x'\nready_tcp='nowhere'", ["ready_tcp: expected host:port"]),
    ("max.toml", "[[apps]]\nname='a'\ncommand='x'\nmax_restarts=-1", ["max_restarts: expected a whole number >= 0"]),
    ("listen.toml", "[[apps]]\nname='a'\ncommand='x'\nlisten=['http://x']", ["listen: expected tcp://host:port"]),
    ("badname.toml", "[[apps]]\nname='has space'\ncommand='x'", ["name: 'has space' cannot be a name"]),
    ("longname.json", {"apps": [{"name": "\U0001F600" * 70, "script": "x"}]},
     ["name:", "is 280 bytes in UTF-8; a name is at most 240"]),
    ("kind.yaml", "apps: []", ["kind.yaml: unknown config type '.yaml'"]),
    ("dynamic.js", "module.exports = { apps: [{ name: 'a', script: require('path').join('x') }] };",
     ["dynamic.js:1:", "is computed when the file runs", "install node"]),
    ("bool.toml", "[[apps]]\nname='a'\ncommand='x'\nstart_delay_secs=true",
     ["start_delay_secs: expected a duration"]),
    ("defaults.toml", "[defaults]\ncommand='x'\n[[apps]]\nname='a'\ncommand='x'",
     ["[defaults]: command: belongs to an app"]),
]


@POSIX_ONLY
class TestValidate(HomeTestCase):

    def test_each_broken_config_gives_one_precise_message(self):
        """validate names the file, app and key of each problem, exits 1, and never shows a traceback."""
        self.assertGreaterEqual(len(BROKEN_CONFIGS), 20)
        for name, content, fragments in BROKEN_CONFIGS:
            path = os.path.join(self.tmp, name)
            with open(path, "w") as f:
                f.write(content if isinstance(content, str) else json.dumps(content))
            with self.subTest(config=name), mock.patch.dict(os.environ, {"OXMGR_NODE": "/nonexistent/node"}):
                code, out, err = self.cli("validate", path)
                self.assertEqual(code, 1, out + err)
                self.assertNotIn("Traceback", err)
                errors = [line for line in err.splitlines() if line.startswith("oxmgr: error: ")]
                self.assertEqual(len(errors), 1, err)
                for fragment in fragments:
                    self.assertIn(fragment, errors[0])

    def test_several_problems_are_all_listed(self):
        path = os.path.join(self.tmp, "many.toml")
        with open(path, "w") as f:
            f.write("[[apps]]\nname='a'\ncommand='x'\nstop_signal='NOPE'\nmax_restarts=-2\n"
                    "[[apps]]\nname='b'\ncommand='y'\ndepends_on=['zz']\n")
        code, _, err = self.cli("validate", path)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 3, err)

    def test_validate_needs_no_daemon_and_reports_the_order(self):
        code, out, err = self.cli("validate", os.path.join(EXAMPLES, "oxfile.toml"), "--env", "prod")
        self.assertEqual(code, 0, err)
        self.assertIn("ok: 3 apps, 6 processes; start order: db, api-0, api-1, api-2, api-3, worker", out)
        self.assertFalse(os.path.exists(self.home.sock))
        code, _, err = self.cli("validate", os.path.join(EXAMPLES, "oxfile.toml"), "--only", "nope")
        self.assertEqual(code, 1)
        self.assertIn("--only nope: no such app", err)

    def test_convert_cli_output_validates(self):
        out_path = os.path.join(self.tmp, "oxfile.toml")
        code, out, err = self.cli("convert", os.path.join(EXAMPLES, "ecosystem.config.json"), "-o", out_path)
        self.assertEqual(code, 0, err)
        self.assertIn("wrote", out)
        code, out, err = self.cli("validate", out_path)
        self.assertEqual(code, 0, err)
        self.assertIn("start order: api-0, api-1, worker", out)


# -- 9. state store, logs and the line framer ------------------------------------------------


def make_record(ident, name, **kw):
    spec = oxmgr.AppSpec.from_dict({"name": name, "command": "sleep 1"})
    return oxmgr.ProcessRecord(spec, id=ident, **kw)


class TestStateStore(HomeTestCase):

    def setUp(self):
        super().setUp()
        self.home.ensure()

    def test_round_trip(self):
        recs = [make_record(0, "a", desired="running", restart_count=3, base_env={"K": "V"}),
                make_record(4, "b", status="errored", status_reason="crash loop")]
        oxmgr.save_state(self.home, 5, recs)
        next_id, loaded, warnings = oxmgr.load_state(self.home)
        self.assertEqual((next_id, warnings), (5, []))
        self.assertEqual([r.to_dict() for r in loaded], [r.to_dict() for r in recs])
        with open(self.home.state) as f:
            data = json.load(f)
        self.assertEqual(set(data), {"version", "next_id", "envs", "processes"})
        self.assertTrue({"id", "name", "status", "pid"} <= set(data["processes"][0]))

    def test_environments_are_stored_once(self):
        shared = {"PATH": "/bin", "SECRET": "x" * 1000}
        recs = [make_record(i, f"app{i}", base_env=shared) for i in range(20)]
        recs.append(make_record(20, "other", base_env={"PATH": "/usr/bin"}))
        recs.append(make_record(21, "twin", base_env=dict(shared)))  # equal content, another dict
        oxmgr.save_state(self.home, 22, recs)
        with open(self.home.state) as f:
            data = json.load(f)
        self.assertEqual(len(data["envs"]), 2)
        self.assertLess(os.path.getsize(self.home.state), 20 * 1000)
        _, loaded, _ = oxmgr.load_state(self.home)
        self.assertEqual([r.base_env for r in loaded], [r.base_env for r in recs])
        self.assertIs(loaded[0].base_env, loaded[19].base_env)  # shared again in memory

    def test_home_is_private(self):
        os.chmod(self.home_dir, 0o755)
        warning = self.home.ensure()
        self.assertIn("700", warning)
        self.assertEqual(stat.S_IMODE(os.stat(self.home_dir).st_mode), 0o700)

    def test_corrupt_state_is_set_aside_and_backup_used(self):
        oxmgr.save_state(self.home, 1, [make_record(0, "good")])
        oxmgr.save_state(self.home, 2, [make_record(0, "good"), make_record(1, "newer")])
        with open(self.home.state, "w") as f:
            f.write('{"processes": [ garbage')
        next_id, loaded, warnings = oxmgr.load_state(self.home)
        self.assertEqual([r.name for r in loaded], ["good"])
        self.assertTrue(any("unreadable" in w for w in warnings), warnings)
        self.assertTrue(any(n.startswith("state.json.corrupt-") for n in os.listdir(self.home_dir)))

    def test_invalid_records_count_as_corrupt(self):
        for bad in ['{"processes": [{"id": "x"}]}', '[]', '{"processes": [{"id": 0, "spec": {}}]}',
                    '{"processes": [1, "x", null, {"id": 1, "other_groups": 5}]}',
                    '{"processes": [{"id": 0, "status": "weird", "spec": {"name": "a", "command": "b"}}]}']:
            with self.subTest(bad=bad):
                with open(self.home.state, "w") as f:
                    f.write(bad)
                _, loaded, warnings = oxmgr.load_state(self.home)
                self.assertEqual(loaded, [])
                self.assertTrue(warnings)

    def test_missing_state_is_empty(self):
        self.assertEqual(oxmgr.load_state(self.home), (0, [], []))

    def test_one_bad_record_costs_only_itself(self):
        """A record this version refuses (a duration past the cap, written by an older one) is left out, alone."""
        oxmgr.save_state(self.home, 3, [make_record(0, "a"), make_record(1, "b"), make_record(2, "c")])
        with open(self.home.state) as f:
            state = json.load(f)
        state["processes"][1]["spec"]["stop_timeout_s"] = 1e306
        with open(self.home.state, "w") as f:
            json.dump(state, f)
        _, loaded, warnings = oxmgr.load_state(self.home)
        self.assertEqual([r.name for r in loaded], ["a", "c"])
        self.assertTrue(any("stop_timeout_s" in w and "left out" in w for w in warnings), warnings)

    def test_the_processes_of_a_left_out_entry_are_reported_for_stopping(self):
        rec = make_record(1, "b", pgid=4242, start_ticks=99, other_groups=[[4343, 7]])
        oxmgr.save_state(self.home, 2, [make_record(0, "a"), rec])
        with open(self.home.state) as f:
            state = json.load(f)
        state["processes"][1]["spec"]["restart_delay_s"] = "soon"
        with open(self.home.state, "w") as f:
            json.dump(state, f)
        leftovers = []
        _, loaded, _ = oxmgr.load_state(self.home, leftovers)
        self.assertEqual([r.name for r in loaded], ["a"])
        self.assertEqual(leftovers, [[4242, 99], [4343, 7]])

    def test_every_fault_of_one_copy_falls_back_to_the_other(self):
        """Deep nesting, a symlink loop, a directory, a fifo (never hung on): reported, then the other copy."""
        def deep(path):
            with open(path, "w") as f:
                f.write("[" * 5000 + "]" * 5000)

        def loop(path):
            os.symlink(path, path)

        def directory(path):
            os.mkdir(path)

        faults = {"nesting": deep, "symlink loop": loop, "directory": directory, "fifo": os.mkfifo}
        for what, make in faults.items():
            for broken in ("state", "state_backup"):
                with self.subTest(fault=what, copy=broken):
                    for name in os.listdir(self.home_dir):
                        path = os.path.join(self.home_dir, name)
                        if name.startswith("state.json"):
                            os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                    oxmgr.save_state(self.home, 1, [make_record(0, "kept")])
                    oxmgr.save_state(self.home, 1, [make_record(0, "kept")])  # the backup holds it too
                    os.unlink(getattr(self.home, broken))
                    make(getattr(self.home, broken))
                    _, loaded, warnings = oxmgr.load_state(self.home)
                    self.assertEqual([r.name for r in loaded], ["kept"])
                    if broken == "state":
                        self.assertTrue(warnings and "state.json" in warnings[0], warnings)

    def test_both_copies_unreadable_starts_empty_and_says_so(self):
        os.mkdir(self.home.state)
        os.mkdir(self.home.state_backup)
        _, loaded, warnings = oxmgr.load_state(self.home)
        self.assertEqual(loaded, [])
        self.assertEqual(len(warnings), 3, warnings)
        self.assertIn("not a regular file", warnings[0])
        self.assertIn("starting with no apps", warnings[-1])

    @unittest.skipUnless(IS_ROOT, "needs root to own a file as another user")
    def test_a_logs_directory_planted_by_another_user_is_refused(self):
        os.chown(self.home.logs, 65534, 65534)
        with self.assertRaises(oxmgr.OxmgrError) as cm:
            self.home.ensure()
        self.assertIn("is not a directory of yours (uid 65534)", str(cm.exception))

    @unittest.skipUnless(IS_ROOT, "needs root to own a file as another user")
    def test_a_state_file_of_another_user_is_not_trusted(self):
        oxmgr.save_state(self.home, 1, [make_record(0, "planted")])
        os.chown(self.home.state, 65534, 65534)
        _, loaded, warnings = oxmgr.load_state(self.home)
        self.assertEqual(loaded, [])
        self.assertIn("belongs to uid 65534", warnings[0])

    def test_a_failed_write_leaves_no_temp_file(self):
        with mock.patch("os.fsync", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                oxmgr.save_state(self.home, 1, [make_record(0, "a")])
        self.assertEqual([n for n in os.listdir(self.home_dir) if ".tmp" in n], [])




class TestRotatingLog(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.path = os.path.join(self.dir, "app.out.log")

    def make(self, max_bytes=100, max_files=3, max_age_s=0, clock=time.time):
        log = oxmgr.RotatingLog(self.path, oxmgr.LogPolicy(max_bytes, max_files, max_age_s), clock=clock)
        self.addCleanup(log.close)
        return log

    def read_all(self):
        paths = sorted((p for p in os.listdir(self.dir) if p.startswith("app.out.log")),
                       key=lambda p: -int(p.rsplit(".", 1)[1]) if p[-1].isdigit() else 0)
        data = b""
        for p in paths:
            with open(os.path.join(self.dir, p), "rb") as f:
                data += f.read()
        return data

    def test_rotates_by_size_into_numbered_files(self):
        log = self.make(max_bytes=100, max_files=3)
        for i in range(40):
            log.write(b"line %02d\n" % i)
        names = sorted(os.listdir(self.dir))
        self.assertEqual(names, ["app.out.log", "app.out.log.1", "app.out.log.2", "app.out.log.3"])
        for name in names:
            self.assertLessEqual(os.path.getsize(os.path.join(self.dir, name)), 100)

    def test_no_line_is_split_or_lost(self):
        log = self.make(max_bytes=64, max_files=1000)
        expected = b"".join(b"n%05d\n" % i for i in range(3000))
        view = expected
        while view:  # odd-sized writes that end mid-line
            log.write(view[:37])
            view = view[37:]
        self.assertEqual(self.read_all(), expected)
        for name in os.listdir(self.dir):
            with open(os.path.join(self.dir, name), "rb") as f:
                data = f.read()
            self.assertTrue(data.endswith(b"\n") or name == "app.out.log", name)

    def test_keeps_only_max_files(self):
        log = self.make(max_bytes=10, max_files=2)
        for _ in range(20):
            log.write(b"0123456789\n")
        self.assertEqual(sorted(os.listdir(self.dir)), ["app.out.log", "app.out.log.1", "app.out.log.2"])

    def test_lowering_max_files_prunes_the_surplus_at_the_next_rotation(self):
        for i in range(1, 6):
            with open(os.path.join(self.dir, f"app.out.log.{i}"), "wb") as f:
                f.write(b"old %d\n" % i)
        log = self.make(max_bytes=10, max_files=2)
        log.write(b"0123456789\n")
        log.write(b"abcdefghij\n")
        self.assertEqual(sorted(os.listdir(self.dir)), ["app.out.log", "app.out.log.1", "app.out.log.2"])
        with open(os.path.join(self.dir, "app.out.log.2"), "rb") as f:
            self.assertEqual(f.read(), b"0123456789\n")

    def test_age_rotation_and_pruning(self):
        now = [1_000_000.0]
        log = self.make(max_bytes=0, max_files=5, max_age_s=100, clock=lambda: now[0])
        log.write(b"old\n")
        self.assertFalse(log.should_rotate_by_age())
        now[0] += 101
        self.assertTrue(log.should_rotate_by_age())
        log.rotate()
        os.utime(self.path + ".1", (now[0] - 500, now[0] - 500))
        log.write(b"new\n")
        now[0] += 101
        log.rotate()  # the first rotated file is older than max_age: pruned
        self.assertEqual(sorted(os.listdir(self.dir)), ["app.out.log", "app.out.log.1"])
        with open(self.path + ".1", "rb") as f:
            self.assertEqual(f.read(), b"new\n")

    def test_non_regular_file_is_never_rotated(self):
        log = oxmgr.RotatingLog(os.devnull, oxmgr.LogPolicy(1, 2, 0))
        self.addCleanup(log.close)
        for _ in range(5):
            log.write(b"x\n")
        self.assertTrue(os.path.exists(os.devnull))
        self.assertFalse(os.path.exists(os.devnull + ".1"))

    def test_vanished_file_is_tolerated(self):
        log = self.make(max_bytes=20, max_files=2)
        log.write(b"first line\n")
        os.unlink(self.path)
        log.write(b"second line that rotates\n")
        log.write(b"third\n")
        self.assertIn(b"third", self.read_all())

    def test_truncate_and_tail(self):
        log = self.make(max_bytes=30, max_files=5)
        for i in range(10):
            log.write(b"row %d\n" % i)
        self.assertEqual(oxmgr.tail_log(self.path, 7), [b"row %d" % i for i in range(3, 10)])
        self.assertEqual(oxmgr.tail_log(self.path, 2), [b"row 8", b"row 9"])
        log.truncate()
        self.assertEqual(os.listdir(self.dir), ["app.out.log"])
        self.assertEqual(os.path.getsize(self.path), 0)
        log.write(b"after\n")
        self.assertEqual(oxmgr.tail_log(self.path, 5), [b"after"])

    def test_policy_from_env(self):
        policy = oxmgr.LogPolicy.from_env({"OXMGR_LOG_MAX_SIZE_MB": "0.5", "OXMGR_LOG_MAX_FILES": "2",
                                           "OXMGR_LOG_MAX_DAYS": "1"})
        self.assertEqual((policy.max_bytes, policy.max_files, policy.max_age_s), (1 << 19, 2, 86400.0))
        with self.assertRaises(oxmgr.ConfigError) as cm:
            oxmgr.LogPolicy.from_env({"OXMGR_LOG_MAX_FILES": "many"})
        self.assertIn("OXMGR_LOG_MAX_FILES", str(cm.exception))

    def test_stamp_lines(self):
        self.assertEqual(oxmgr.stamp_lines(b"a\nb\n", b"T ", True), b"T a\nT b\n")
        self.assertEqual(oxmgr.stamp_lines(b"rest\nnext", b"T ", False), b"rest\nT next")
        self.assertEqual(oxmgr.stamp_lines(b"\n", b"T ", True), b"T \n")


class TestLineBuffer(unittest.TestCase):
    """The one line framer: logs, followers, the console and the control socket all read through it."""

    def test_whole_lines_out_the_partial_one_kept(self):
        buf = oxmgr.LineBuffer(limit=100)
        self.assertEqual(buf.feed(b"ab"), b"")
        self.assertEqual(buf.feed(b"c\nde"), b"abc\n")
        self.assertEqual(buf.feed(b"f\ng\n"), b"def\ng\n")
        self.assertTrue(buf.at_line_start)
        self.assertEqual(buf.feed(b"tail"), b"")
        self.assertEqual(buf.flush(), b"tail")
        self.assertEqual(buf.flush(), b"")

    def test_an_overlong_line_goes_out_in_pieces(self):
        buf = oxmgr.LineBuffer(limit=4)
        self.assertEqual(buf.feed(b"abcdefgh"), b"abcdefgh")
        self.assertFalse(buf.at_line_start)            # the next piece continues that line
        self.assertEqual(buf.feed(b"ij\nk"), b"ij\n")
        self.assertTrue(buf.at_line_start)
        self.assertEqual(buf.feed(b"lmnop"), b"klmnop")  # the tail alone outgrew the limit

    def test_any_chunking_gives_back_the_same_bytes(self):
        import random
        rng = random.Random(7)
        stream = b"".join(b"x" * rng.randrange(0, 40) + b"\n" for _ in range(500)) + b"end"
        for _ in range(20):
            buf = oxmgr.LineBuffer(limit=16)
            out, i = [], 0
            while i < len(stream):
                n = rng.randrange(1, 50)
                piece = buf.feed(stream[i:i + n])
                self.assertTrue(not piece or piece.endswith(b"\n") or not buf.at_line_start)
                out.append(piece)
                i += n
            out.append(buf.flush())
            self.assertEqual(b"".join(out), stream)


# -- 10. protocol ----------------------------------------------------------------------------


class TestProtocol(unittest.TestCase):

    def test_encode_decode(self):
        frame = oxmgr.encode({"op": "list", "x": "é"})
        self.assertTrue(frame.endswith(b"\n"))
        self.assertEqual(frame.count(b"\n"), 1)
        self.assertEqual(oxmgr.decode(frame), {"op": "list", "x": "é"})

    def test_decode_rejects(self):
        for line in [b"garbage", b"[1, 2]", b"\xff\xfe", b"{" + b" " * oxmgr.MAX_REQUEST_BYTES + b"}"]:
            with self.subTest(line=line[:20]), self.assertRaises(oxmgr.IpcError):
                oxmgr.decode(line)

    def test_error_round_trip_keeps_class(self):
        for exc in [oxmgr.ProcessNotFound("nope"), oxmgr.DuplicateProcess("dup"), oxmgr.SpawnError("x", 127),
                    oxmgr.IpcError("bad"), oxmgr.ConfigError("cfg")]:
            with self.subTest(exc=type(exc).__name__):
                back = oxmgr.error_from_wire(json.loads(json.dumps(oxmgr.error_to_wire(exc))))
                self.assertIs(type(back), type(exc))
                self.assertEqual(str(back), str(exc))
        self.assertIsInstance(oxmgr.error_from_wire({"ok": False, "error": {"type": "Weird", "message": "m"}}),
                              oxmgr.OxmgrError)
        self.assertIsInstance(oxmgr.error_from_wire({"ok": False}), oxmgr.IpcError)



# -- 11. app state machine: pure, no loop, no process ----------------------------------------


def spec_of(**kw):
    data = {"name": "app", "command": "true"}
    data.update(kw)
    return oxmgr.AppSpec.from_dict(data)


SPAWN, KILL, NOTHING = oxmgr.Decision.SPAWN, oxmgr.Decision.KILL, oxmgr.Decision.NOTHING


class TestAppState(unittest.TestCase):
    """Every edge of the status table and every restart rule, as decisions."""

    def state(self, status="stopped", now=None, **kw):
        rec = oxmgr.ProcessRecord(spec_of(**kw), id=0)
        self.now = now or [0.0]
        self.changes = []
        state = oxmgr.AppState(rec, lambda: self.now[0], lambda old, new, why: self.changes.append(new))
        rec.status = status
        return state

    def running(self, **kw):
        """A state that was started and whose child runs."""
        state = self.state(**kw)
        self.assertEqual(state.request_start().action, SPAWN)
        state.spawned(needs_ready=False)
        return state

    def test_every_status_has_a_row_and_no_self_loops(self):
        statuses = set(oxmgr.Status.ALL)
        self.assertEqual(set(oxmgr._TRANSITIONS), statuses)
        for old, targets in oxmgr._TRANSITIONS.items():
            self.assertNotIn(old, targets)
            self.assertTrue(targets <= statuses)
        self.assertEqual(oxmgr.SETTLED_STATUSES | oxmgr.ALIVE_STATUSES, statuses)

    def test_legal_and_illegal_edges(self):
        for old in oxmgr.Status.ALL:
            for new in oxmgr.Status.ALL:
                if new == old:
                    continue
                state = self.state(old)
                with self.subTest(edge=f"{old}->{new}"):
                    if new in oxmgr._TRANSITIONS[old]:
                        state._set(new)
                        self.assertEqual(state.status, new)
                    else:
                        with self.assertRaises(AssertionError) as cm:
                            state._set(new)
                        self.assertIn(f"illegal transition {old} -> {new}", str(cm.exception))

    def test_loaded_state_never_claims_a_running_child(self):
        for status in oxmgr.ALIVE_STATUSES:
            rec = oxmgr.ProcessRecord(spec_of(), id=0, status=status, pid=123)
            oxmgr.AppState(rec, lambda: 0.0)
            self.assertEqual((rec.status, rec.pid), ("stopped", None))

    def test_start_from_every_settled_status_and_not_twice(self):
        for status in oxmgr.SETTLED_STATUSES:
            with self.subTest(status=status):
                state = self.state(status, start_delay_s=2)
                self.assertEqual(state.request_start(), oxmgr.Decision(SPAWN, 2.0))
                self.assertEqual((state.status, state.rec.desired, state.cause), ("starting", "running", "user"))
        for status in oxmgr.ALIVE_STATUSES:
            with self.subTest(status=status):
                self.assertEqual(self.state(status).request_start().action, NOTHING)

    def test_readiness_keeps_starting_until_ready(self):
        state = self.state()
        state.request_start()
        state.spawned(needs_ready=True)
        self.assertEqual(state.status, "starting")
        state.ready("READY=1")
        self.assertEqual((state.status, state.rec.status_reason), ("running", "ready: READY=1"))

    def test_stop_kills_a_child_and_ends_a_start_or_restart_without_one(self):
        state = self.running()
        self.assertEqual(state.request_stop().action, KILL)
        self.assertEqual(state.status, "stopping")
        self.assertEqual(state.exited(None, signal.SIGTERM, 5.0).action, NOTHING)  # the stop carries on
        self.assertEqual(state.stopped(killed=True).action, NOTHING)
        self.assertEqual((state.status, state.rec.status_reason, state.rec.desired),
                         ("stopped", "killed after stop_timeout", "stopped"))
        for status in ("starting", "restarting"):
            with self.subTest(status=status):
                state = self.state(status)
                self.assertEqual(state.request_stop().action, NOTHING)
                self.assertEqual(state.status, "stopped")
        state = self.state("crashed")
        self.assertEqual(state.request_stop(desired=None).action, NOTHING)  # a shutdown changes nothing
        self.assertEqual(state.status, "crashed")
        self.assertEqual(state.request_stop().action, NOTHING)  # a user's stop settles it as stopped
        self.assertEqual((state.status, state.rec.desired), ("stopped", "stopped"))

    def test_restart_stops_first_then_starts(self):
        state = self.running(start_delay_s=1)
        self.assertEqual(state.request_restart().action, KILL)
        self.assertEqual((state.status, state.rec.restart_count), ("stopping", 1))
        self.assertEqual(state.exited(None, signal.SIGTERM, 3.0).action, NOTHING)
        self.assertEqual(state.stopped(killed=False), oxmgr.Decision(SPAWN, 1.0))
        self.assertEqual(self.changes, ["starting", "running", "stopping", "starting"])  # never "stopped"
        dead = self.state("crashed")
        self.assertEqual(dead.request_restart().action, SPAWN)  # nothing to stop
        self.assertEqual((dead.status, dead.rec.restart_count), ("starting", 0))
        waiting = self.state("restarting")
        self.assertEqual(waiting.request_restart(count=False).action, SPAWN)
        self.assertEqual(waiting.rec.restart_count, 0)

    def test_exit_under_each_policy(self):
        for policy, code, sig, stop_codes, status in [
            ("always", 0, None, [], "restarting"), ("always", 3, None, [3], "stopped"),
            ("on-failure", 0, None, [], "stopped"), ("on-failure", 1, None, [], "restarting"),
            ("on-failure", None, signal.SIGKILL, [], "restarting"), ("on-failure", 2, None, [2], "stopped"),
            ("never", 1, None, [], "crashed"), ("never", None, signal.SIGKILL, [], "crashed"),
            ("never", 0, None, [], "stopped"),
        ]:
            with self.subTest(policy=policy, code=code, sig=sig):
                state = self.running(restart_policy=policy, stop_exit_codes=stop_codes)
                decision = state.exited(code, sig, 10.0)
                self.assertEqual(state.status, status)
                self.assertEqual(decision.action, SPAWN if status == "restarting" else NOTHING)
                self.assertEqual(state.rec.desired, "running" if status == "restarting" else "exited")
                self.assertEqual((state.rec.last_exit_code, state.rec.last_signal), (code, sig))

    def test_crash_loop_gives_up_after_max_restarts_with_the_stderr(self):
        state = self.running(max_restarts=3, min_uptime_s=1)
        for _ in range(3):
            self.assertEqual(state.exited(1, None, 0.1).action, SPAWN)
            self.assertEqual(state.restart_due().action, SPAWN)
            state.spawned(needs_ready=False)
        self.assertEqual(state.exited(1, None, 0.1, "fatal: no config").action, NOTHING)
        self.assertEqual(state.status, "errored")
        self.assertIn("crash loop: 4 exits in a row", state.rec.status_reason)
        self.assertIn("stderr: fatal: no config", state.rec.status_reason)
        self.assertEqual((state.rec.restart_count, state.rec.desired), (3, "running"))

    def test_a_stable_run_resets_the_count(self):
        state = self.running(max_restarts=2, min_uptime_s=1)
        for _ in range(10):
            for uptime in (0.1, 0.1, 5.0):  # the third run is stable: back to 0
                self.assertEqual(state.exited(1, None, uptime).action, SPAWN)
                state.restart_due()
                state.spawned(needs_ready=False)
        self.assertEqual(state.status, "running")

    def test_crash_restart_limit_counts_a_five_minute_window(self):
        state = self.running(crash_restart_limit=3, min_uptime_s=1)
        for _ in range(3):
            self.now[0] += 10
            self.assertEqual(state.exited(1, None, 10.0).action, SPAWN)
            state.restart_due()
            state.spawned(needs_ready=False)
        self.now[0] += 10
        self.assertEqual(state.exited(1, None, 10.0).action, NOTHING)
        self.assertIn("crash_restart_limit = 3", state.rec.status_reason)
        self.assertEqual(state.request_start().action, SPAWN)  # a user start clears the window
        state.spawned(needs_ready=False)
        self.now[0] += 400
        self.assertEqual(state.exited(1, None, 10.0).action, SPAWN)

    def test_restart_delay_and_exponential_backoff(self):
        state = self.running(restart_delay_s=30)
        self.assertEqual(state.exited(1, None, 60.0), oxmgr.Decision(SPAWN, 30.0))
        self.assertIn("restarting in 30s", state.rec.status_reason)
        state = self.running(exp_backoff=True, restart_delay_s=0.2, backoff_max_s=1.0, max_restarts=100)
        delays = []
        for _ in range(5):
            delays.append(state.exited(1, None, 0.0).delay)
            state.restart_due()
            state.spawned(needs_ready=False)
        self.assertTrue(0.18 <= delays[0] <= 0.22 and 0.36 <= delays[1] <= 0.44, delays)
        self.assertLessEqual(max(delays), 1.0)
        self.assertTrue(0.18 <= state.exited(1, None, 60.0).delay <= 0.22)  # a stable run starts over

    def test_restart_due_only_while_restarting(self):
        state = self.running()
        state.exited(1, None, 5.0)
        self.assertEqual(state.restart_due().action, SPAWN)
        self.assertEqual((state.status, state.cause), ("starting", "crash"))
        for status in ("stopped", "starting", "running", "errored"):
            self.assertEqual(self.state(status).restart_due().action, NOTHING)

    def test_a_failed_start_gives_up_a_failed_crash_restart_counts(self):
        state = self.state()
        state.request_start()
        self.assertEqual(state.spawn_failed("command not found: 'nodex'", 127).action, NOTHING)
        self.assertEqual((state.status, state.rec.last_exit_code), ("errored", 127))
        state = self.running(max_restarts=1)
        state.exited(1, None, 0.1)
        state.restart_due()
        self.assertEqual(state.spawn_failed("command not found: 'x'", 127).action, NOTHING)  # 2 in a row > 1
        self.assertEqual(state.status, "errored")
        self.assertIn("command not found", state.rec.status_reason)

    def test_settled_and_reset(self):
        self.assertEqual({s for s in oxmgr.Status.ALL if self.state(s).settled}, oxmgr.SETTLED_STATUSES)
        state = self.running(max_restarts=1)
        state.exited(1, None, 0.1)
        state.reset()
        state.restart_due()
        state.spawned(needs_ready=False)
        self.assertEqual(state.exited(1, None, 0.1).action, SPAWN)  # the count started over

    def test_next_backoff_doubles_caps_and_jitters(self):
        mid = lambda: 0.5  # noqa: E731  (no jitter at the midpoint)
        delays = [oxmgr.next_backoff(a, 0.1, 2.0, rand=mid) for a in range(8)]
        self.assertEqual([round(d, 3) for d in delays], [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
        self.assertAlmostEqual(oxmgr.next_backoff(3, 0.1, 60, factor=1.5, rand=mid), 0.3375)
        self.assertEqual(oxmgr.next_backoff(10_000, 1, 15, rand=mid), 15)  # no overflow
        self.assertAlmostEqual(oxmgr.next_backoff(2, 1.0, 100, rand=lambda: 0.0), 3.6)
        self.assertAlmostEqual(oxmgr.next_backoff(2, 1.0, 100, rand=lambda: 0.999999), 4.4, places=3)


# -- 12. app runtime and 13. engine, on a fake driver and a virtual clock -------------------------

FAKE_PID_BASE = 2 ** 22 + 1000  # above Linux's pid_max: nothing real can ever have these pids


class AutojumpSelector(selectors.DefaultSelector):
    """When the loop would wait for a timer, jump the virtual clock to it instead (real I/O first)."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def select(self, timeout=None):
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            return super().select(SHORT_TIMEOUT)  # no timer: only real I/O can move things on
        self.clock[0] += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock the test controls: a 30 s delay passes in microseconds."""

    def __init__(self):
        self.now = [1000.0]
        super().__init__(AutojumpSelector(self.now))

    def time(self):
        return self.now[0]


class FakeChild:
    """A child that exits when told (or signalled); its output goes through real pipes."""

    def __init__(self, driver, pid, argv, env):
        self.driver, self.pid, self.argv, self.env = driver, pid, argv, env
        out_r, self.out = os.pipe()
        err_r, self.err = os.pipe()
        self.stdout = open(out_r, "rb", buffering=0)
        self.stderr = open(err_r, "rb", buffering=0)
        self.popen = self.start_ticks = self.gate = None
        self.signals = []
        self.alive = True

    def reaped(self, returncode):
        pass

    def write(self, data, stream="out"):
        os.write(self.out if stream == "out" else self.err, data)

    def exit(self, code=None, signum=None):
        if self.alive:
            self.alive = False
            os.close(self.out)
            os.close(self.err)
            self.driver.reaped(self.pid, code, signum)


class FakeDriver(oxmgr.LinuxDriver):
    """The engine's only seam: spawns fake children, kills by telling them, reaps on demand."""

    def __init__(self):
        super().__init__()
        self.children = []
        self.fail_next = None       # a SpawnError the next spawn raises
        self.ignore = set()         # signals the children shrug off
        self._watchers = {}

    @property
    def last(self):
        return self.children[-1]

    def spawn(self, argv, cwd, env, listen_fds=(), gated=False):
        if self.fail_next:
            exc, self.fail_next = self.fail_next, None
            raise exc
        child = FakeChild(self, FAKE_PID_BASE + len(self.children), argv, env)
        self.children.append(child)
        return child

    def _receive(self, sock):
        return sock.recv(4096), None, None  # fake children have no pid to check a sender against

    def check_program(self, argv, cwd, env):
        if argv[0].startswith("/no/"):
            raise oxmgr.SpawnError(f"command not found: {argv[0]!r}", oxmgr.EXIT_NOT_FOUND)

    def _child(self, tree):
        return next((c for c in self.children if c.pid == tree), None)

    def kill_tree(self, tree, signum):
        child = self._child(tree)
        if child is None or not child.alive:
            return False
        child.signals.append(signum)
        if signum != 0 and signum not in self.ignore:
            child.exit(signum=signum)
        return True

    def tree_alive(self, tree):
        child = self._child(tree)
        return child is not None and child.alive

    def reaper(self, loop, reap_all=False):
        driver = self

        class Reaper:
            def watch(self, pid, callback):
                driver._watchers[pid] = callback

            def reap(self):
                pass

            def close(self):
                pass
        return Reaper()

    def reaped(self, pid, code, signum):
        self._watchers.pop(pid)(code, signum)

    def process_table(self):
        return {}

    def file_watch(self):
        return None


class EngineTestCase(unittest.TestCase):
    """An engine on a FakeDriver and a VirtualLoop: no process, no real waiting."""

    def setUp(self):
        oxmgr.load_asyncio()
        self.loop = VirtualLoop()
        asyncio.set_event_loop(self.loop)  # asyncio.Lock() looks the loop up on 3.8 and 3.9
        self.addCleanup(self.close_loop)
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.home = oxmgr.Home(tmp.name)
        self.home.ensure()
        self.driver = FakeDriver()
        self.logged = []
        self.engine = oxmgr.Engine(self.loop, self.home, driver=self.driver, log_policy=oxmgr.LogPolicy(0, 0, 0),
                                   log=self.logged.append)
        self.transitions = []
        self.engine.listeners.append(
            lambda kind, app, data: self.transitions.append(data["new"]) if kind == "status" else None)

    def close_loop(self):
        for child in self.driver.children:
            child.exit(code=0)
        self.loop.run_until_complete(asyncio.sleep(0.1))  # the exits are handled
        tasks = asyncio.all_tasks(self.loop)
        while tasks:
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            tasks = asyncio.all_tasks(self.loop)
        self.engine.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        asyncio.set_event_loop(None)

    def run_async(self, coro):
        return self.loop.run_until_complete(coro)

    def run_until(self, predicate, message=""):
        async def waiter():
            deadline = time.monotonic() + SHORT_TIMEOUT
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out waiting for {message or predicate}")
                await asyncio.sleep(0.001)
        self.run_async(waiter())

    def advance(self, seconds):
        """Let `seconds` of virtual time pass, with everything due meanwhile run."""
        self.run_async(asyncio.sleep(seconds))

    def add(self, **kw):
        return self.engine.add(spec_of(**kw), {"FROM_CLI": "1"})

    def start(self, app):
        self.run_async(app.start())

    def start_ready(self, app):
        """Start an app with wait_ready: its child says READY=1 once it is spawned."""
        start = self.loop.create_task(app.start())
        self.run_until(lambda: len(self.driver.children) and app._ready is not None, "waiting for READY=1")
        app._on_notify(b"READY=1")
        self.run_async(start)

    def crashed(self, **kw):
        """An app that ran, then crashed: it waits out its restart delay."""
        app = self.add(**kw)
        self.start(app)
        self.driver.last.exit(code=1)
        self.run_until(lambda: app.state.status == "restarting", "restarting")
        return app


class TestEngineFake(EngineTestCase):

    def test_crash_restarting_running(self):
        """A non-zero exit under on-failure goes running -> restarting -> running with a new child."""
        app = self.add()
        self.start(app)
        first = self.driver.last
        self.advance(5)
        first.exit(code=1)
        self.run_until(lambda: len(self.driver.children) == 2, "respawn")
        self.run_until(lambda: app.state.status == "running", "running")
        self.assertEqual(self.transitions, ["starting", "running", "restarting", "starting", "running"])
        self.assertEqual((app.rec.restart_count, app.rec.last_exit_code), (1, 1))
        self.assertEqual(app.run.pid, self.driver.last.pid)
        self.assertEqual(self.driver.last.env["FROM_CLI"], "1")

    def test_fast_crashes_end_errored(self):
        """Exits before min_uptime, more than max_restarts in a row, give up with the reason."""
        app = self.add(max_restarts=2)
        self.start(app)
        for _ in range(3):
            child = self.driver.last
            child.write(b"fatal: config missing\n", "err")
            child.exit(code=3)
            self.run_until(lambda c=child: app.state.status == "errored" or (
                app.state.status == "running" and app.run.pid != c.pid), "running again or errored")
        self.assertEqual(app.state.status, "errored")
        self.assertEqual(len(self.driver.children), 3)
        self.assertIn("crash loop: 3 exits", app.rec.status_reason)
        self.assertIn("fatal: config missing", app.rec.status_reason)
        self.assertEqual(app.rec.desired, "running")  # a daemon restart tries again

    def test_launch_checks_every_app_now_and_spawns_the_rest_in_the_background(self):
        good = [self.add(name=f"g{i}") for i in range(3)]
        bad = self.add(name="bad", command="/no/such/program --flag")
        seen = {}

        async def scenario():
            seen["errors"] = await self.engine.launch(good + [bad])
            seen["statuses"] = [a.state.status for a in good]   # the reply goes out now
            seen["spawned"] = len(self.driver.children)
            await good[1].stop()  # a stop before its turn wins over the late start

        self.run_async(scenario())
        self.assertEqual(len(seen["errors"]), 1, seen["errors"])
        self.assertIn("cannot start 'bad': command not found: '/no/such/program'", seen["errors"][0])
        self.assertEqual(bad.state.status, "errored")
        self.assertEqual((seen["statuses"], seen["spawned"]), (["starting"] * 3, 0))
        self.run_until(lambda: good[0].state.status == good[2].state.status == "running", "background start")
        self.assertEqual((good[1].state.status, good[1].rec.desired), ("stopped", "stopped"))
        self.assertEqual(len(self.driver.children), 2)

    def test_launch_of_one_app_or_one_with_a_start_delay_waits(self):
        one = self.add(name="one")
        self.assertEqual(self.run_async(self.engine.launch([one])), [])
        self.assertEqual(one.state.status, "running")  # spawned before the reply
        delayed = [self.add(name="d1"), self.add(name="d2", start_delay_s=30)]
        self.assertEqual(self.run_async(self.engine.launch(delayed)), [])
        self.assertEqual([a.state.status for a in delayed], ["running", "running"])

    def test_start_delay_is_waited_before_the_spawn(self):
        app = self.add(start_delay_s=30)
        task = self.loop.create_task(app.start())
        self.advance(29)
        self.assertEqual((app.state.status, len(self.driver.children)), ("starting", 0))
        self.advance(2)
        self.assertTrue(task.done())
        self.assertEqual((app.state.status, len(self.driver.children)), ("running", 1))

    def test_stop_escalates_to_sigkill_after_the_timeout(self):
        self.driver.ignore = {signal.SIGTERM}
        app = self.add(stop_timeout_s=30)
        self.start(app)
        child = self.driver.last
        stop = self.loop.create_task(app.stop())
        self.advance(29)
        self.assertEqual((child.signals, app.state.status), ([signal.SIGTERM], "stopping"))
        self.advance(2)
        self.run_until(stop.done, "stop done")
        self.assertEqual(child.signals[:2], [signal.SIGTERM, signal.SIGKILL])
        self.assertEqual((app.state.status, app.rec.status_reason, app.rec.desired),
                         ("stopped", "killed after stop_timeout", "stopped"))

    def test_final_status_only_after_output_drains(self):
        """The last lines a child wrote are in the log when its exit status is recorded."""
        app = self.add(restart_policy="never")
        self.start(app)
        seen = {}

        def on_status(kind, a, data):
            if kind == "status" and data["new"] == "crashed":
                with open(a.log_path("out"), "rb") as f:
                    seen["log"] = f.read()

        self.engine.listeners.append(on_status)
        child = self.driver.last
        child.write(b"last words\nand no newline")
        child.exit(code=2)  # reaped before the loop ever read the pipe
        self.run_until(lambda: "log" in seen, "crashed")
        self.assertEqual(seen["log"], b"last words\nand no newline\n")  # the daemon ends the line

    def test_policies(self):
        for policy, code, expected in [("never", 1, "crashed"), ("on-failure", 0, "stopped"),
                                       ("always", 0, "running")]:
            with self.subTest(policy=policy, code=code):
                app = self.add(name=f"p-{policy}", restart_policy=policy)
                self.start(app)
                self.advance(10)
                spawned = len(self.driver.children)
                self.driver.last.exit(code=code)
                self.run_until(lambda a=app, want=expected, n=spawned: a.state.status == want
                               and (want != "running" or len(self.driver.children) > n), expected)

    def test_spawn_failure_at_start_is_errored_and_reported(self):
        app = self.add()
        self.driver.fail_next = oxmgr.SpawnError("command not found: 'nodex'", 127)
        with self.assertRaises(oxmgr.SpawnError) as cm:
            self.start(app)
        self.assertIn("cannot start 'app': command not found", str(cm.exception))
        self.assertEqual((app.state.status, app.rec.last_exit_code), ("errored", 127))

    def test_a_stop_wins_over_an_hour_of_start_delay(self):
        """stop and delete never wait out start_delay: it is not slept holding the lock."""
        for op in ("stop", "delete"):
            with self.subTest(op=op):
                app = self.add(name=f"late-{op}", start_delay_s=3600)
                start = self.loop.create_task(app.start())
                self.advance(1)
                began = self.loop.time()
                self.run_async(getattr(app, op)())
                self.assertLess(self.loop.time() - began, 1)
                self.run_until(start.done, "the start gave up")
                self.assertIsInstance(start.exception(), oxmgr.SpawnError)
                self.assertEqual([c for c in self.driver.children if c.env["OXMGR_NAME"] == app.name], [])

    def test_any_exception_out_of_a_spawn_errors_that_app_only(self):
        """One app whose spawn raises something unexpected is errored with the reason; the batch goes on."""
        first, bad, last = self.add(name="first"), self.add(name="bad"), self.add(name="last")
        real_spawn = self.driver.spawn

        def spawn(argv, cwd, env, listen_fds=(), gated=False):
            if env["OXMGR_NAME"] == "bad":
                raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
            return real_spawn(argv, cwd, env, listen_fds, gated)

        self.driver.spawn = spawn
        errors = self.run_async(self.engine.start_in_order([first, bad, last]))
        self.assertEqual([a.state.status for a in (first, bad, last)], ["running", "errored", "running"])
        self.assertIn("UnicodeEncodeError", bad.rec.status_reason)
        self.assertEqual(len(errors), 1)

    def test_spawn_failure_on_restart_counts_as_unstable(self):
        app = self.add(max_restarts=1)
        self.start(app)
        self.driver.fail_next = oxmgr.SpawnError("command not found: 'x'", 127)
        self.driver.last.exit(code=1)
        self.run_until(lambda: app.state.status == "errored", "errored")
        self.assertIn("command not found", app.rec.status_reason)

    def test_restart_delay_is_waited_out(self):
        app = self.crashed(restart_delay_s=30)
        self.assertIn("restarting in 30s", app.rec.status_reason)
        self.advance(29)
        self.assertEqual((app.state.status, len(self.driver.children)), ("restarting", 1))
        self.advance(2)
        self.run_until(lambda: app.state.status == "running", "running after the delay")
        self.assertEqual(len(self.driver.children), 2)

    def test_stop_cancels_a_pending_restart(self):
        """A stop during a 30 s restart delay: the delay passes and nothing respawns."""
        app = self.crashed(restart_delay_s=30)
        self.run_async(app.stop())
        self.assertEqual(app.state.status, "stopped")
        self.advance(60)
        self.assertEqual((app.state.status, len(self.driver.children)), ("stopped", 1))

    def test_a_start_during_the_delay_leaves_the_crash_restart_to_happen(self):
        app = self.crashed(restart_delay_s=30)
        self.start(app)  # already on its way back: nothing to do
        self.assertEqual((app.state.status, len(self.driver.children)), ("restarting", 1))
        self.advance(31)
        self.run_until(lambda: app.state.status == "running", "the crash restart")
        self.assertEqual(len(self.driver.children), 2)

    def test_a_user_restart_during_the_delay_replaces_the_crash_restart(self):
        app = self.crashed(restart_delay_s=30)
        self.run_async(app.restart())
        self.assertEqual((app.state.status, len(self.driver.children)), ("running", 2))
        self.advance(60)
        self.assertEqual(len(self.driver.children), 2)  # the crash restart did not spawn a third

    def notify_ready(self, child):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", child.env["NOTIFY_SOCKET"])

    def test_a_crash_during_a_reload_waits_for_the_lock(self):
        """The old child dies while its replacement gets ready: the crash restart waits, and the replacement
        takes over; no third process is spawned."""
        app = self.add(wait_ready=True, ready_timeout_s=60)
        self.start_ready(app)
        old = self.driver.last
        reload = self.loop.create_task(app.reload())
        self.run_until(lambda: len(self.driver.children) == 2, "replacement spawned")
        old.exit(code=1)
        self.run_until(lambda: app.state.status == "restarting", "the crash is seen")
        self.advance(5)
        self.assertEqual(len(self.driver.children), 2)  # the crash restart waits for the reload
        self.notify_ready(self.driver.last)
        self.run_until(reload.done, "reloaded")
        self.advance(5)
        self.assertEqual((app.state.status, app.run.pid, len(self.driver.children)),
                         ("running", self.driver.last.pid, 2))

    def test_a_reload_or_replace_after_a_delete_spawns_nothing(self):
        self.driver.ignore = {signal.SIGTERM}
        app = self.add(stop_timeout_s=30)
        self.start(app)
        delete = self.loop.create_task(app.delete())
        self.advance(1)
        for op in (app.reload(), app.replace(spec_of(command="true --new"), None)):
            late = self.loop.create_task(op)
            self.advance(40)
            self.run_until(lambda t=late: t.done() and delete.done(), "delete, then the late operation")
        self.assertEqual([c.alive for c in self.driver.children], [False])

    def test_nothing_starts_once_a_shutdown_began(self):
        """A rule's restart queued behind a shutdown's stop does not spawn (the next daemon would run a twin)."""
        self.driver.ignore = {signal.SIGTERM}
        app = self.add(stop_timeout_s=30)
        self.start(app)
        self.engine.closing = True
        stop = self.loop.create_task(app.stop(desired=None))
        rule = self.loop.create_task(app.restart_for("watch: a.js changed"))
        self.advance(40)
        self.run_until(lambda: stop.done() and rule.done(), "stop and the rule's restart")
        self.assertEqual((app.state.status, len(self.driver.children), app.rec.desired), ("stopped", 1, "running"))

    def test_ready_and_exit_in_the_same_turn_is_an_exit(self):
        app = self.add(wait_ready=True, restart_policy="never")
        start = self.loop.create_task(app.start())
        self.run_until(lambda: self.driver.children, "spawned")
        # READY=1 lands in the very turn the exit is handled, after it
        self.engine.listeners.append(lambda kind, a, data: a._on_notify(b"READY=1")
                                     if kind == "status" and data["new"] == "crashed" else None)
        self.driver.last.exit(code=1)
        with self.assertRaises(oxmgr.SpawnError) as cm:
            self.run_async(start)
        self.assertIn("exited with code 1 before it was ready", str(cm.exception))
        self.assertEqual(app.state.status, "crashed")

    def test_a_stop_during_a_restarts_stop_phase_ends_the_restart(self):
        """The stop comes while the old child is still stopping: no new child is spawned, the app ends stopped."""
        self.driver.ignore = {signal.SIGTERM}
        app = self.add(stop_timeout_s=30, wait_ready=True, ready_timeout_s=60)
        self.start_ready(app)
        restart = self.loop.create_task(app.restart())
        self.advance(1)
        stop = self.loop.create_task(app.stop())
        self.advance(100)
        self.run_until(lambda: restart.done() and stop.done(), "restart and stop")
        self.assertIn("stopped before it was ready", str(restart.exception()))
        self.assertEqual((app.state.status, app.rec.desired, len(self.driver.children)), ("stopped", "stopped", 1))

    def test_a_ready_timeout_forgets_the_group(self):
        app = self.add(wait_ready=True, ready_timeout_s=5)
        with self.assertRaises(oxmgr.SpawnError):
            self.start(app)
        self.assertEqual((app.state.status, app.rec.pid, app.rec.pgid), ("errored", None, None))

    def test_a_rule_restart_queued_behind_a_user_stop_does_not_undo_it(self):
        self.driver.ignore = {signal.SIGTERM}
        app = self.add(stop_timeout_s=30)
        self.start(app)
        restart = self.loop.create_task(app.restart())  # the old child is slow to stop
        self.advance(1)
        stop = self.loop.create_task(app.stop())
        self.advance(1)
        rule = self.loop.create_task(app.restart_for("watch: a.js changed"))  # desired is still "running"
        self.advance(100)
        self.run_until(lambda: restart.done() and stop.done() and rule.done(), "all three")
        self.assertIsInstance(restart.exception(), oxmgr.SpawnError)  # ended before its launch: said so
        self.assertEqual((app.state.status, app.rec.desired), ("stopped", "stopped"))

    def test_every_waiting_stop_ends_the_start_before_it(self):
        """stop, restart, stop: the restart's launch is ended by the second stop, not waited out."""
        self.driver.ignore = {signal.SIGTERM}
        app = self.add(stop_timeout_s=30, wait_ready=True, ready_timeout_s=60)
        self.start_ready(app)
        first = self.loop.create_task(app.stop())
        self.advance(1)
        restart = self.loop.create_task(app.restart())
        self.advance(1)
        second = self.loop.create_task(app.stop())
        self.advance(300)
        self.run_until(lambda: first.done() and restart.done() and second.done(), "all three")
        self.assertIn("stopped before it was ready", str(restart.exception()))
        self.assertEqual((app.state.status, len(self.driver.children)), ("stopped", 1))

    def test_a_restart_finishing_its_stop_phase_during_a_shutdown_spawns_nothing(self):
        self.driver.ignore = {signal.SIGTERM}
        db = self.add(name="db", stop_timeout_s=10)
        api = self.add(name="api", depends_on=["db"], stop_timeout_s=10)
        self.start(db)
        self.start(api)
        restart = self.loop.create_task(db.restart())
        self.advance(1)
        self.engine.closing = True
        shutdown = self.loop.create_task(self.engine.stop_all([db, api], desired=None))
        self.advance(100)
        self.run_until(lambda: shutdown.done() and restart.done(), "shutdown")
        self.assertIn("shutting down", str(restart.exception()))
        self.assertEqual(len(self.driver.children), 2)
        self.assertEqual({db.state.status, api.state.status}, {"stopped"})

    def test_replace_waits_the_new_definitions_start_delay(self):
        app = self.add()
        self.start(app)
        replace = self.loop.create_task(app.replace(spec_of(command="true --v2", start_delay_s=30), None))
        self.advance(5)
        self.assertEqual(len(self.driver.children), 1)
        self.advance(40)
        self.run_async(replace)
        self.assertEqual(len(self.driver.children), 2)

    def test_restart_stops_before_starting(self):
        app = self.add()
        self.start(app)
        old = self.driver.last
        self.run_async(app.restart())
        self.assertFalse(old.alive)
        self.assertEqual(old.signals, [signal.SIGTERM])
        self.assertEqual((len(self.driver.children), app.rec.restart_count), (2, 1))

    def test_dependency_waves_order_start_and_stop(self):
        db = self.add(name="db")
        api = [self.add(name=f"api-{i}", base_name="api", instance=i, depends_on=["db"]) for i in range(2)]
        worker = self.add(name="worker", depends_on=["api"], start_order=-5)
        lone = self.add(name="lone", start_order=3)
        self.assertEqual(self.engine.waves([worker, lone, api[1], db, api[0]]), [[db, lone], api, [worker]])
        self.run_async(self.engine.start_in_order([worker, api[0], api[1], db]))
        self.assertEqual([c.env["OXMGR_NAME"] for c in self.driver.children], ["db", "api-0", "api-1", "worker"])
        stopped = []
        self.engine.listeners.append(lambda k, a, d: stopped.append(a.name) if k == "status" and
                                     d["new"] == "stopped" else None)
        self.run_async(self.engine.stop_all([db, api[0], api[1], worker]))
        self.assertEqual((stopped[0], sorted(stopped[1:3]), stopped[3]), ("worker", ["api-0", "api-1"], "db"))
        self.assertEqual(self.engine.group_sizes()[api[0].spec.base_name], 2)

    def test_resolve_targets(self):
        a = self.add(name="a")
        b = self.add(name="b", namespace="web")
        c = self.add(name="c", namespace="web")
        self.assertEqual(self.engine.resolve(["all"]), [a, b, c])
        self.assertEqual(self.engine.resolve(["web", "a", "1"]), [b, c, a])
        self.assertEqual(self.engine.resolve([str(a.rec.id)]), [a])
        with self.assertRaises(oxmgr.ProcessNotFound):
            self.engine.resolve(["nope"])
        with self.assertRaises(oxmgr.DuplicateProcess):
            self.add(name="a")
        self.assertEqual(self.engine.unique_name("a"), "a-1")

    def test_memory_over_the_limit_restarts_at_once(self):
        app = self.add(max_memory_bytes=100 << 20)
        self.start(app)
        app.memory_bytes, app.cpu_percent = 150 << 20, 1.0
        app.limits.sampled()
        self.run_until(lambda: len(self.driver.children) == 2 and app.state.status == "running", "restart")
        self.assertIn("memory 150.0M over the 100.0M limit", app.rec.restart_reason)
        self.assertEqual(app.rec.restart_count, 1)

    def test_cpu_needs_a_sustained_excess(self):
        app = self.add(max_cpu_percent=50)
        self.start(app)
        for cpu in (90, 90, 10, 90, 90):  # a spike, a dip: the count starts over
            app.cpu_percent = cpu
            app.limits.sampled()
        self.advance(1)
        self.assertEqual(len(self.driver.children), 1)
        app.cpu_percent = 95
        app.limits.sampled()
        self.run_until(lambda: len(self.driver.children) == 2, "restart")
        self.assertIn("CPU over 50% for 3 samples in a row", app.rec.restart_reason)


@POSIX_ONLY
class TestRunReal(unittest.TestCase):
    """Runs of real children on the real driver, in this process."""

    def setUp(self):
        oxmgr.load_asyncio()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.home = oxmgr.Home(tmp.name)

    def run_engine(self, scenario):
        async def main():
            engine = oxmgr.Engine(asyncio.get_running_loop(), self.home, log=lambda m: None, persist=False)
            try:
                return await scenario(engine)
            finally:
                engine.close()
        return asyncio.run(main())

    @unittest.skipUnless(sys.platform.startswith("linux"), "F_SETPIPE_SZ is Linux only")
    def test_a_chatty_pipe_is_grown_and_a_quiet_one_is_not(self):
        import fcntl
        get_size = getattr(fcntl, "F_GETPIPE_SZ", 1032)

        async def scenario(engine):
            got = []
            code = ("import os, sys, time\nfor _ in range(40):\n    os.write(1, b'x' * 65536)\n"
                    "os.write(2, b'quiet\\n')\nprint('done', flush=True)\ntime.sleep(60)\n")
            run = await oxmgr.Run.start(engine, [sys.executable, "-S", "-c", code], None, dict(os.environ),
                                        on_output=lambda stream, chunk, starts: got.append((stream, chunk)))
            try:
                # "done" ends a 2.5 MB line, which arrives in pieces cut anywhere (even inside "done")
                while not b"".join(chunk for stream, chunk in got if stream == "out").endswith(b"done\n"):
                    await asyncio.sleep(0.01)
                return [fcntl.fcntl(run.transports[s].get_extra_info("pipe").fileno(), get_size)
                        for s in ("out", "err")]
            finally:
                await run.stop(signal.SIGKILL, 0)
                run.close()

        self.assertEqual(self.run_engine(scenario), [oxmgr.CHATTY_PIPE_BYTES, 1 << 16])

    def test_exit_waits_for_the_output_and_a_held_pipe_does_not_hold_it(self):
        async def scenario(engine):
            lines = []
            code = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-S', '-c', "
                    "'import time; time.sleep(60)'])\nprint('bye', flush=True)\nsys.exit(3)\n")
            run = await oxmgr.Run.start(engine, [sys.executable, "-S", "-c", code], None, dict(os.environ),
                                        on_output=lambda stream, chunk, starts: lines.append(chunk))
            result = await asyncio.wait_for(asyncio.shield(run.exited), SHORT_TIMEOUT)
            alive = engine.driver.tree_alive(run.pid)
            await run.stop(signal.SIGTERM, SHORT_TIMEOUT)  # the grandchild holds the pipe open
            run.close()
            return result, lines, alive, engine.driver.tree_alive(run.pid)

        result, lines, alive_before, alive_after = self.run_engine(scenario)
        self.assertEqual(result, (3, None))
        self.assertEqual(lines, [b"bye\n"])
        self.assertEqual((alive_before, alive_after), (True, False))


# -- end to end: a real daemon, real processes, real signals ------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid):
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if (lambda st: st is not None and st.pgid == pgid and st.state != "Z")(oxmgr.DRIVER.read_stats(pid))]


@POSIX_ONLY
class TestEndToEnd(DaemonTestCase):

    def test_start_list_status_json_then_stop(self):
        """start gives a running app with a live pid in list, status and --json; stop kills its group."""
        self.start_app("api", READY_THEN_SLEEP)
        pid = self.wait_ready_pid("api")
        self.assertTrue(oxmgr.DRIVER.process_running(pid))
        out = self.cli_ok("list")
        self.assertRegex(out, r"ID\s+NAME\s+NAMESPACE\s+STATUS\s+PID\s+UPTIME\s+RESTARTS\s+CPU%\s+RAM\s+HEALTH")
        self.assertRegex(out, rf"0\s+api\s+default\s+running\s+{pid}\s")
        status = self.cli_ok("status", "api")
        self.assertIn("PID:", status)
        self.assertRegex(status, rf"(?m)^PID:\s+{pid}$")
        self.assertRegex(status, r"(?m)^Status:\s+running$")
        data = json.loads(self.cli_ok("list", "--json"))
        self.assertEqual(len(data), 1)
        for key in ("id", "name", "namespace", "command", "status", "pid", "restart_count", "uptime_ms",
                    "cpu_percent", "memory_bytes", "health_status"):
            self.assertIn(key, data[0])
        self.assertEqual((data[0]["name"], data[0]["status"], data[0]["pid"]), ("api", "running", pid))
        self.assertEqual(json.loads(self.cli_ok("status", "api", "--json"))["pid"], pid)
        self.assertEqual(os.getpgid(pid), pid)
        self.assertEqual(os.getsid(pid), pid)
        out = self.cli_ok("stop", "api")
        self.assertIn("stopped api", out)
        self.assertFalse(oxmgr.DRIVER.process_running(pid))
        self.assertEqual(group_members(pid), [])
        self.assertRegex(self.cli_ok("status", "api"), r"(?m)^PID:\s+-$")

    def test_exec_without_shell_and_shell_when_needed(self):
        """A plain command is exec'd (its pid is the app), shell syntax runs under sh -c."""
        self.start_app("plain", "import os; print('ready', os.getpid(), flush=True); import time; time.sleep(60)")
        pid = self.wait_ready_pid("plain")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            self.assertEqual(f.read().split(b"\0")[:2], [sys.executable.encode(), b"-S"])  # no sh in between
        self.assertEqual(oxmgr.DRIVER.read_stats(pid).pgid, pid)
        marker = os.path.join(self.tmp, "shell-ran")
        self.cli_ok("start", f"echo one | cat > {shlex.quote(marker)} && sleep 60", "--name", "piped")
        self.wait(lambda: os.path.exists(marker) and read_text(marker) == "one\n", "shell pipeline output")
        pid = self.info("piped")["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            self.assertEqual(f.read().split(b"\0")[:2], [b"/bin/sh", b"-c"])

    def test_stdin_env_cwd(self):
        """The app gets /dev/null as stdin, the CLI's environment plus --env, OXMGR_* and its cwd."""
        os.environ["FROM_SHELL"] = "shell-value"
        code = """
            import os, sys
            print("stdin", repr(sys.stdin.read()), flush=True)
            for k in ("FROM_SHELL", "SECRET_TOKEN", "OXMGR_NAME", "OXMGR_ID"):
                print(k, os.environ.get(k), flush=True)
            print("cwd", os.getcwd(), flush=True)
            print("ready", os.getpid(), flush=True)
            import time; time.sleep(60)
        """
        self.start_app("envy", code, "--env", "SECRET_TOKEN=hunter2", "--cwd", self.tmp)
        self.wait_ready_pid("envy")
        with open(self.home.log_path("envy", "out")) as f:
            out = f.read()
        for line in ["stdin ''", "FROM_SHELL shell-value", "SECRET_TOKEN hunter2", "OXMGR_NAME envy",
                     "OXMGR_ID 0", f"cwd {os.path.realpath(self.tmp)}"]:
            self.assertIn(line, out)
        for argv in (["list"], ["list", "--json"], ["status", "envy"], ["status", "envy", "--json"]):
            printed = self.cli_ok(*argv)
            self.assertNotIn("hunter2", printed, argv)
            self.assertNotIn("shell-value", printed, argv)
        self.assertIn("SECRET_TOKEN", self.cli_ok("status", "envy"))  # the name, never the value

    def test_restart_update_env(self):
        """restart --update-env hands the app this shell's environment; plain restart keeps the old one."""
        code = "import os, time; print('v=' + os.environ.get('APP_V', '-'), os.getpid(), flush=True); time.sleep(60)"
        os.environ["APP_V"] = "1"
        self.start_app("upd", code)
        self.wait_log("upd", "v=1")
        os.environ["APP_V"] = "2"
        self.cli_ok("restart", "upd")
        self.wait(lambda: read_text(self.home.log_path("upd", "out")).count("v=1") == 2, "second v=1")
        self.cli_ok("restart", "upd", "--update-env")
        self.wait_log("upd", "v=2")

    def test_sigkill_under_always_gives_a_new_pid(self):
        self.start_app("keeper", READY_THEN_SLEEP, "--restart", "always")
        pid = self.wait_ready_pid("keeper")
        os.kill(pid, signal.SIGKILL)
        new = self.wait(lambda: (lambda i: i["pid"] if i["pid"] not in (None, pid) and i["status"] == "running"
                                 else None)(self.info("keeper")), "a new pid")
        self.assertNotEqual(new, pid)
        info = self.info("keeper")
        self.assertEqual(info["restart_count"], 1)
        self.assertEqual(info["last_signal"], "SIGKILL")

    def test_exit_zero_on_failure_stops_and_never_crashes(self):
        self.start_app("oneshot", EXIT_WITH(0))
        info = self.wait_status("oneshot", "stopped")
        self.assertEqual(info["last_exit_code"], 0)
        self.assertEqual(info["restart_count"], 0)
        self.start_app("fragile", EXIT_WITH(4), "--restart", "never")
        info = self.wait_status("fragile", "crashed")
        self.assertEqual(info["last_exit_code"], 4)
        self.assertIn("exited with code 4", self.cli_ok("status", "fragile"))

    def test_fast_crashes_become_errored_with_reason(self):
        self.start_app("looper", EXIT_WITH(3, "boom"), "--max-restarts", "2")
        info = self.wait_status("looper", "errored")
        self.assertEqual(info["restart_count"], 2)
        status = self.cli_ok("status", "looper")
        self.assertIn("errored (crash loop: 3 exits in a row", status)
        self.assertIn("err-boom", status)  # the last stderr lines say why

    def test_crash_restart_limit(self):
        self.start_app("limited", EXIT_WITH(1), "--crash-restart-limit", "2", "--min-uptime", "0")
        info = self.wait_status("limited", "errored")
        self.assertEqual(info["restart_count"], 2)
        self.assertIn("crash_restart_limit = 2", info["status_reason"])

    def test_stubborn_child_killed_after_stop_timeout_with_grandchild(self):
        """A child ignoring SIGTERM is SIGKILLed after stop_timeout; its grandchild dies with the group."""
        code = """
            import os, signal, subprocess, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            kid = subprocess.Popen([sys.executable, "-S", "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
            print("grandchild", kid.pid, flush=True)
            print("ready", os.getpid(), flush=True)
            time.sleep(600)
        """
        self.start_app("stubborn", code, "--stop-timeout", "0.3")
        pid = self.wait_ready_pid("stubborn")
        with open(self.home.log_path("stubborn", "out")) as f:
            grandchild = int(f.read().split("grandchild")[1].split()[0])
        self.assertEqual(oxmgr.DRIVER.read_stats(grandchild).pgid, pid)
        self.cli_ok("stop", "stubborn")
        self.assertFalse(oxmgr.DRIVER.process_running(pid))
        self.wait(lambda: not oxmgr.DRIVER.process_running(grandchild) or oxmgr.DRIVER.read_stats(grandchild) is None
                  or oxmgr.DRIVER.read_stats(grandchild).state == "Z", "grandchild gone")
        info = self.info("stubborn")
        self.assertEqual((info["status"], info["status_reason"]), ("stopped", "killed after stop_timeout"))

    def test_group_member_outliving_the_leader_is_killed_before_restart(self):
        """When the leader crashes, the rest of its group is stopped before the new one starts."""
        port = free_port()
        code = f"""
            import os, socket, subprocess, sys, time
            kid = subprocess.Popen([sys.executable, "-S", "-c",
                "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
                "print('bound', flush=True); time.sleep(600)"], stdout=sys.stdout)
            print("kid", kid.pid, "ready", os.getpid(), flush=True)
            time.sleep(600)
        """
        self.start_app("holder", code, "--restart", "always")
        pid = self.wait_ready_pid("holder")
        self.wait_log("holder", "bound")
        with open(self.home.log_path("holder", "out")) as f:
            kid = int(f.read().split("kid")[1].split()[0])
        os.kill(pid, signal.SIGKILL)
        self.wait(lambda: (lambda i: i["pid"] not in (None, pid))(self.info("holder")), "restart")
        self.wait(lambda: read_text(self.home.log_path("holder", "out")).count("bound") == 2,
                  "the new grandchild bound the same port")
        self.assertFalse(oxmgr.DRIVER.read_stats(kid) is not None and oxmgr.DRIVER.read_stats(kid).state != "Z")

    def test_restart_frees_the_port_first(self):
        """restart stops the old process before starting the new one, so the port is free."""
        port = free_port()
        code = f"""
            import os, socket, time
            s = socket.socket()
            s.bind(("127.0.0.1", {port}))
            s.listen()
            print("ready", os.getpid(), flush=True)
            time.sleep(600)
        """
        self.start_app("web", code)
        first = self.wait_ready_pid("web")
        self.cli_ok("restart", "web")
        second = self.wait_ready_pid("web")
        self.assertNotEqual(first, second)
        self.assertEqual(self.info("web")["status"], "running")
        self.assertEqual(self.info("web")["restart_count"], 1)

    def test_several_targets_ids_namespaces_and_all(self):
        self.start_app("a", READY_THEN_SLEEP, "--namespace", "web")
        self.start_app("b", READY_THEN_SLEEP, "--namespace", "web")
        self.start_app("c", READY_THEN_SLEEP)
        out = self.cli_ok("stop", "web")
        self.assertIn("stopped a", out)
        self.assertIn("stopped b", out)
        self.assertEqual(self.info("c")["status"], "running")
        self.cli_ok("start", "web")
        self.wait_status("a", "running")
        self.cli_ok("stop", "0", "c")
        self.assertEqual([self.info(n)["status"] for n in "abc"], ["stopped", "running", "stopped"])
        self.cli_ok("delete", "all")
        self.assertEqual(json.loads(self.cli_ok("list", "--json")), [])

    def test_client_path_stays_light(self):
        """list, status, stop and restart load the public modules they use, and no asyncio, thread or subprocess."""
        self.start_app("light", READY_THEN_SLEEP)

        def modules(code):
            result = subprocess.run([sys.executable, "-S", "-c", code + "\nprint(' '.join(sorted(sys.modules)))"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                    timeout=LONG_TIMEOUT)
            self.assertEqual(result.returncode, 0, result.stderr)
            return set(result.stdout.split())

        loaded = modules("import sys, contextlib, io; sys.path.insert(0, %r); import oxmgr\n"
                         "with contextlib.redirect_stdout(io.StringIO()):\n"
                         "    for argv in (['list'], ['status', 'light'], ['ls', '--json'], ['restart', 'light'],\n"
                         "                 ['stop', 'light']):\n"
                         "        assert oxmgr.main(argv) == 0, argv" % HERE)
        # The header's imports, argparse (built for one command) and what they bring; nothing else.
        used = modules("import sys, contextlib, io, argparse, locale, collections, errno, json, os, shlex, signal, "
                       "socket, time, fcntl, resource")
        self.assertLessEqual(loaded - used, {"oxmgr"})
        for heavy in ("asyncio", "subprocess", "concurrent", "ssl", "hashlib", "dataclasses", "datetime", "inspect",
                      "typing", "logging", "ctypes", "tomllib", "importlib.util"):
            self.assertNotIn(heavy, loaded)
        self.assertEqual(self.info("light")["status"], "stopped")  # the calls did their work

    def test_pgid_forgotten_once_the_group_is_gone(self):
        self.start_app("brief", EXIT_WITH(0))
        self.wait_status("brief", "stopped")

        def saved():  # the save follows the change within the same loop turn; poll for it
            with open(self.home.state) as f:
                record = [p for p in json.load(f)["processes"] if p["name"] == "brief"][0]
            return record if record["status"] == "stopped" else None
        self.assertIsNone(self.wait(saved, "state saved")["pgid"])

    def test_status_of_unknown_app(self):
        code, out, err = self.cli("status", "nope")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip(), "oxmgr: error: process not found: nope")
        code, _, err = self.cli("stop", "ghost")
        self.assertEqual((code, err.strip()), (1, "oxmgr: error: process not found: ghost"))

    def test_duplicate_name_and_bad_flags(self):
        self.start_app("dup", READY_THEN_SLEEP)
        code, _, err = self.cli("start", python_child(READY_THEN_SLEEP), "--name", "dup")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)
        for argv in (["start", "x", "--restart", "sometimes"], ["start", "x", "--stop-timeout", "soon"],
                     ["start", "x", "--env", "NOEQUALS"], ["start", "x", "--stop-signal", "SIGNOPE"],
                     ["start", "x", "--name", "bad name"], ["frobnicate"]):
            with self.subTest(argv=argv):
                with contextlib.redirect_stderr(io.StringIO()):
                    code, _, err = self.cli(*argv)
                self.assertEqual(code, 2, err)

    def test_spawn_failure_reports_and_registers_errored(self):
        code, _, err = self.cli("start", "definitely-not-a-command-xyz --flag", "--name", "typo")
        self.assertEqual(code, 1)
        self.assertIn("command not found: 'definitely-not-a-command-xyz'", err)
        self.assertEqual(self.info("typo")["status"], "errored")

    def test_config_start_reports_a_broken_app_and_brings_up_the_rest(self):
        path = os.path.join(self.tmp, "oxfile.toml")
        with open(path, "w") as f:
            for name in ("w1", "w2", "w3"):
                f.write(f"[[apps]]\nname = '{name}'\ncommand = {oxmgr._toml_string(python_child(READY_THEN_SLEEP))}\n")
            f.write("[[apps]]\nname = 'broken'\ncommand = './missing-binary --port 1'\n")
        code, _, err = self.cli("start", path)
        self.assertEqual(code, 1)
        self.assertIn("cannot start 'broken': command not found: './missing-binary'", err)
        self.assertEqual(self.info("broken")["status"], "errored")
        pids = {name: self.wait_ready_pid(name) for name in ("w1", "w2", "w3")}
        self.assertEqual(len(set(pids.values())), 3)
        self.assertEqual({self.info(n)["status"] for n in pids}, {"running"})

    def test_apply_twice_changes_nothing_then_replaces_only_the_edited_app_and_prunes(self):
        path = os.path.join(self.tmp, "oxfile.toml")
        command = oxmgr._toml_string(python_child(READY_THEN_SLEEP))

        def write(apps):
            with open(path, "w") as f:
                for name, label in apps:
                    f.write(f"[[apps]]\nname = '{name}'\ncommand = {command}\n[apps.env]\nLABEL = '{label}'\n")

        def pids():
            return {p["name"]: p["pid"] for p in json.loads(self.cli_ok("list", "--json"))}

        write([("a", "1"), ("b", "1"), ("c", "1")])
        self.assertIn("apply: 3 created", self.cli_ok("apply", path))
        first = {name: self.wait_ready_pid(name) for name in "abc"}
        out = self.cli_ok("apply", path)
        self.assertIn("apply: 3 unchanged", out)
        self.assertEqual(pids(), first)

        write([("a", "1"), ("b", "2"), ("c", "1")])
        out = self.cli_ok("apply", path)
        self.assertIn("replaced  b", out)
        self.assertIn("apply: 1 replaced, 2 unchanged", out)
        now = pids()
        self.assertEqual((now["a"], now["c"]), (first["a"], first["c"]))
        self.assertNotEqual(now["b"], first["b"])

        write([("a", "1"), ("b", "2")])
        self.assertIn("apply: 2 unchanged", self.cli_ok("apply", path))  # without --prune c stays
        self.assertIn("c", pids())
        out = self.cli_ok("apply", path, "--prune")
        self.assertIn("deleted   c", out)
        self.assertEqual(set(pids()), {"a", "b"})
        self.wait(lambda: not oxmgr.DRIVER.process_running(first["c"]), "c's process to be gone")

    def test_apply_2_then_3_instances_stores_no_stale_group_size(self):
        """The group size is derived, never stored: after 2 then 3 instances every instance says 3."""
        path = os.path.join(self.tmp, "oxfile.toml")
        for count in (2, 3):
            with open(path, "w") as f:
                f.write(f"[[apps]]\nname = 'web'\ncommand = {oxmgr._toml_string(python_child(READY_THEN_SLEEP))}\n"
                        f"instances = {count}\n")
            self.cli_ok("apply", path)
        self.assertEqual([self.info(f"web-{i}")["instances"] for i in range(3)], [3, 3, 3])
        self.cli_ok("save")  # one more save, after every change
        with open(self.home.state) as f:
            specs = [p["spec"] for p in json.load(f)["processes"]]
        self.assertEqual([s["name"] for s in specs], ["web-0", "web-1", "web-2"])
        self.assertFalse([s for s in specs if "instances" in s], specs)

    def test_interpreter_from_extension(self):
        script = os.path.join(self.tmp, "worker.py")
        with open(script, "w") as f:
            f.write("import os, sys, time\nprint('ready', os.getpid(), sys.executable, flush=True)\ntime.sleep(60)\n")
        shell = os.path.join(self.tmp, "job.sh")
        with open(shell, "w") as f:
            f.write("echo shell-ok $$\nexec sleep 60\n")
        self.cli_ok("start", script)
        self.wait_ready_pid("worker")
        info = self.info("worker")
        self.assertEqual(info["interpreter"], sys.executable)
        self.cli_ok("start", shell)
        self.wait_log("job", "shell-ok")
        self.assertEqual(self.info("job")["interpreter"], "sh")

    @unittest.skipUnless(HAVE_NODE, "node is not installed")
    def test_interpreter_node_for_js(self):
        script = os.path.join(self.tmp, "server.js")
        with open(script, "w") as f:
            f.write("console.log('ready', process.pid); setInterval(() => {}, 1000);\n")
        self.cli_ok("start", script)
        pid = self.wait_ready_pid("server")
        self.assertEqual(self.info("server")["interpreter"], "node")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            self.assertIn(b"node", f.read().split(b"\0")[0])

    def test_logs_lines_streams_prefixes_and_flush(self):
        code = """
            import sys, time
            for i in range(5):
                print("out", i, flush=True)
                print("err", i, file=sys.stderr, flush=True)
            print("ready", flush=True)
            time.sleep(60)
        """
        self.start_app("talk", code)
        self.start_app("quiet", "import time; print('hello from quiet', flush=True); time.sleep(60)")
        self.wait_log("talk", "ready")
        self.wait_log("talk", "err 4", "err")
        self.wait_log("quiet", "hello")
        out = self.cli_ok("logs", "talk", "--lines", "2", "--out")
        self.assertEqual(out.splitlines(), ["out 4", "ready"])
        out = self.cli_ok("logs", "talk", "--err", "--lines", "3")
        self.assertEqual(out.splitlines(), ["err 2", "err 3", "err 4"])
        out = self.cli_ok("logs", "--lines", "1")
        self.assertIn("talk | ready", out)
        self.assertIn("quiet | hello from quiet", out)
        lines = [json.loads(x) for x in self.cli_ok("logs", "talk", "--json", "--lines", "1").splitlines()]
        self.assertEqual(lines, [{"app": "talk", "stream": "out", "line": "ready"},
                                 {"app": "talk", "stream": "err", "line": "err 4"}])
        self.cli_ok("flush", "talk")
        self.assertEqual(self.cli_ok("logs", "talk"), "")
        self.assertIn("hello", self.cli_ok("logs", "quiet"))

    def test_time_prefix(self):
        self.start_app("stamped", "import time; print('tick', flush=True); time.sleep(60)", "--time")
        self.wait_log("stamped", "tick")
        line = self.cli_ok("logs", "stamped", "--lines", "1").strip()
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d: tick$")
        self.start_app("custom", "import time; print('tock', flush=True); time.sleep(60)",
                       "--log-date-format", "YYYY/MM/DD")
        self.wait_log("custom", "tock")
        self.assertRegex(self.cli_ok("logs", "custom").strip(), r"^\d{4}/\d\d/\d\d: tock$")

    def test_chatty_app_does_not_stall_the_daemon(self):
        """While one app floods its pipe, requests are answered and other apps' lines still arrive."""
        flood = """
            import os, sys
            chunk = (b"x" * 1023 + b"\\n") * 64
            out = sys.stdout.buffer
            while True:
                out.write(chunk)
        """
        self.start_app("flood", flood)
        self.wait(lambda: os.path.exists(self.home.log_path("flood", "out"))
                  and os.path.getsize(self.home.log_path("flood", "out")) > (1 << 20), "flood under way")
        self.start_app("calm", "import time\nfor i in range(20):\n    print('calm', i, flush=True)\n"
                               "    time.sleep(0.01)\ntime.sleep(60)")
        for _ in range(20):
            self.assertEqual(len(oxmgr.request(self.home, "list", timeout=SHORT_TIMEOUT)["processes"]), 2)
        self.wait_log("calm", "calm 19")
        self.assertEqual(self.info("flood")["status"], "running")

    def test_exp_backoff_delays_grow(self):
        self.start_app("backoff", EXIT_WITH(1), "--exp-backoff", "--restart-delay", "0.05",
                       "--max-restarts", "4")
        self.wait_status("backoff", "errored")
        with open(self.home.daemon_log) as f:
            delays = [float(line.split("restarting in ")[1].split("ms")[0])
                      for line in f if "backoff: running -> restarting" in line]
        self.assertEqual(len(delays), 4, delays)
        self.assertTrue(all(b > a for a, b in zip(delays, delays[1:])), delays)  # doubling beats +/-10% jitter

    def test_start_delay(self):
        """--start-delay holds the first spawn back by at least that long."""
        asked = time.time()
        self.start_app("later", READY_THEN_SLEEP, "--start-delay", "0.3")
        self.wait_ready_pid("later")
        self.assertGreaterEqual(self.info("later")["started_at"] - asked, 0.3)  # a floor, never flaky

    def test_signal_and_reset(self):
        self.start_app("sig", PRINT_SIGNALS)
        self.wait_ready_pid("sig")
        out = self.cli_ok("signal", "SIGUSR1", "sig")
        self.assertIn("sent SIGUSR1 to sig", out)
        self.wait_log("sig", "got SIGUSR1")
        self.cli_ok("signal", "usr2", "sig")
        self.wait_log("sig", "got SIGUSR2")
        self.cli_ok("restart", "sig")
        self.assertEqual(self.info("sig")["restart_count"], 1)
        self.cli_ok("reset", "sig")
        self.assertEqual(self.info("sig")["restart_count"], 0)
        self.cli_ok("stop", "sig")
        code, _, err = self.cli("signal", "HUP", "sig")
        self.assertEqual(code, 1)
        self.assertIn("no running process", err)


@POSIX_ONLY
class TestDaemonLifecycle(DaemonTestCase):

    def test_kill_9_of_the_daemon_then_any_cli_call(self):
        """After kill -9 of the daemon, the next CLI call restores every app: one copy each, no orphan."""
        self.start_app("one", READY_THEN_SLEEP)
        self.start_app("two", IGNORE_SIGTERM, "--stop-timeout", "0.3")
        self.start_app("halted", READY_THEN_SLEEP)
        old = {n: self.wait_ready_pid(n) for n in ("one", "two", "halted")}
        self.cli_ok("stop", "halted")
        self.daemon.kill()
        self.daemon.wait()
        self.assertTrue(oxmgr.DRIVER.process_running(old["one"]))  # orphaned, still running
        # Any CLI call brings a daemon back (auto-start, detached) which cleans up and restores.
        self.daemon = None
        out = self.cli_ok("list")
        self.assertIn("one", out)
        self.wait(lambda: not oxmgr.DRIVER.process_running(old["one"]) and not oxmgr.DRIVER.process_running(old["two"]),
                  "old children stopped")
        new = {n: self.wait_ready_pid(n) for n in ("one", "two")}
        self.assertNotEqual(new["one"], old["one"])
        self.assertEqual(self.info("halted")["status"], "stopped")
        for name in ("one", "two"):
            copies = [p for p in pids_with_env(f"OXMGR_NAME={name}") if self.marker_in(p)]
            self.assertEqual(copies, [new[name]], f"exactly one {name}")

    def marker_in(self, pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return self.marker.encode() + b"\0" in f.read() + b"\0"
        except OSError:
            return False

    def test_sigterm_to_the_daemon_stops_children_and_next_start_restores(self):
        """SIGTERM stops every child (in parallel); the next daemon runs what was running."""
        for name in ("a", "b", "c"):
            self.start_app(name, IGNORE_SIGTERM if name == "b" else READY_THEN_SLEEP, "--stop-timeout", "0.5")
        self.start_app("off", READY_THEN_SLEEP)
        pids = {n: self.wait_ready_pid(n) for n in ("a", "b", "c", "off")}
        self.cli_ok("stop", "off")
        self.daemon.send_signal(signal.SIGTERM)
        self.assertEqual(self.daemon.wait(LONG_TIMEOUT), 0)
        self.assertEqual(pids_with_env(self.marker), [], "no child left")
        self.assertFalse(os.path.exists(self.home.sock))
        with open(self.home.state) as f:
            state = json.load(f)
        self.assertEqual({p["name"]: p["desired"] for p in state["processes"]},
                         {"a": "running", "b": "running", "c": "running", "off": "stopped"})
        self.start_daemon()
        for name in ("a", "b", "c"):
            self.assertNotEqual(self.wait_ready_pid(name), pids[name])
        self.assertEqual(self.info("off")["status"], "stopped")

    def test_list_answers_while_a_shutdown_stops_the_apps(self):
        self.start_app("slow", IGNORE_SIGTERM, "--stop-timeout", "60")
        pid = self.wait_ready_pid("slow")
        oxmgr.request(self.home, "shutdown")
        self.wait(lambda: oxmgr.request(self.home, "list")["processes"][0]["status"] == "stopping", "stopping")
        code, _, err = self.cli("start", python_child(READY_THEN_SLEEP), "--name", "late")
        self.assertEqual(code, 1)
        self.assertIn("shutting down", err)
        os.kill(pid, signal.SIGKILL)  # the shutdown ends when the app does, not 60 s from now
        self.assertEqual(self.daemon.wait(LONG_TIMEOUT), 0)

    def test_daemon_stop_command_and_status(self):
        self.start_app("x", READY_THEN_SLEEP)
        self.wait_ready_pid("x")
        out = self.cli_ok("daemon", "status")
        self.assertIn(f"pid {self.daemon.pid}", out)
        self.assertIn("1 apps", out)
        out = self.cli_ok("daemon", "stop")
        self.assertIn("daemon stopped", out)
        self.assertEqual(self.daemon.wait(LONG_TIMEOUT), 0)
        self.assertEqual(pids_with_env(self.marker), [])
        code, out, _ = self.cli("daemon", "status")
        self.assertEqual(code, 1)
        self.assertIn("not running", out)
        self.assertIn("not running", self.cli_ok("daemon", "stop"))

    def test_second_daemon_refuses(self):
        result = subprocess.run([sys.executable, OXMGR_PY, "daemon", "run"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=LONG_TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertIn("already running", result.stderr)
        self.assertIn(str(self.daemon.pid), result.stderr)
        self.assertTrue(self.daemon_up())

    def test_daemon_run_as_a_script_execs_into_bytecode(self):
        """`python3 oxmgr.py daemon run` stays the same process but sheds the compiled source."""
        self.stop_daemon()
        log = open(os.path.join(self.tmp, "fg.log"), "wb")
        self.addCleanup(log.close)
        self.daemon = subprocess.Popen([sys.executable, OXMGR_PY, "daemon", "run"], stdout=log, stderr=log,
                                       start_new_session=True)
        ping = self.wait(self.daemon_up, "foreground daemon")
        self.assertEqual(ping["pid"], self.daemon.pid)  # exec, not fork
        with open(f"/proc/{self.daemon.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        self.assertEqual(argv[1:3], [b"-E", b"-S"])
        self.assertIn(b"sys.pycache_prefix", argv[4])  # imported from cached bytecode, not compiled
        self.start_app("fg", READY_THEN_SLEEP)
        self.wait_ready_pid("fg")

    def test_cli_autostarts_a_detached_daemon(self):
        self.stop_daemon()
        self.daemon = None
        result = self.cli_subprocess("start", python_child(READY_THEN_SLEEP), "--name", "auto")
        self.assertEqual(result.returncode, 0, result.stderr)
        ping = oxmgr.request(self.home, "ping")
        daemon_pid = ping["pid"]
        self.assertEqual(os.getsid(daemon_pid), daemon_pid)  # its own session
        with open(f"/proc/{daemon_pid}/cmdline", "rb") as f:
            self.assertIn(b"-S", f.read().split(b"\0"))
        self.wait_ready_pid("auto")
        self.assertIn("started", read_text(self.home.daemon_log))
        self.cli_ok("daemon", "stop")
        self.wait(lambda: not oxmgr.DRIVER.process_running(daemon_pid), "auto-started daemon gone")

    def test_corrupt_state_recovers_last_good_copy(self):
        """A corrupt state.json does not stop the daemon; the apps of the last good copy come back."""
        self.start_app("survivor", READY_THEN_SLEEP)
        self.wait_ready_pid("survivor")
        self.cli_ok("reset", "survivor")  # one more save, so the backup holds the running app
        self.stop_daemon()
        with open(self.home.state, "w") as f:
            f.write("{ this is not json")
        self.start_daemon()
        self.wait_ready_pid("survivor")
        self.assertTrue(any(n.startswith("state.json.corrupt-") for n in os.listdir(self.home_dir)))
        self.assertIn("unreadable", read_text(self.home.daemon_log))

    def test_big_daemon_log_is_rotated_at_start(self):
        self.stop_daemon()
        self.daemon = None
        with open(self.home.daemon_log, "wb") as f:
            f.truncate(oxmgr.DAEMON_LOG_MAX_BYTES + 1)
        self.cli_ok("list")
        self.assertGreater(os.path.getsize(self.home.daemon_log + ".1"), oxmgr.DAEMON_LOG_MAX_BYTES)
        self.assertLess(os.path.getsize(self.home.daemon_log), 1 << 20)

    def test_sighup_reopens_the_daemon_log(self):
        self.stop_daemon()
        self.daemon = None
        result = self.cli_subprocess("daemon", "status")
        self.assertEqual(result.returncode, 1)
        self.cli_ok("list")  # auto-start: stdio to daemon.log
        pid = oxmgr.request(self.home, "ping")["pid"]
        os.replace(self.home.daemon_log, self.home.daemon_log + ".old")
        os.kill(pid, signal.SIGHUP)
        self.wait(lambda: os.path.exists(self.home.daemon_log) and "log reopened" in read_text(self.home.daemon_log),
                  "new daemon.log")
        self.cli_ok("daemon", "stop")


def process_state(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


@unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
class TestKill9(DaemonTestCase):
    """kill -9 of the daemon at the worst moment: the child it just spawned stops it (SIGSTOP) on its
    first instruction, and the test kills it then. The state file must already name that child, and
    the next daemon must leave exactly one copy of every app and nothing else of ours."""

    def stopper(self, name, *flags):
        """Start an app that stops its parent (the daemon) on start-up while the flag file exists."""
        self.flag = os.path.join(self.tmp, f"stop-{name}")
        command = f"if [ -e {self.flag} ]; then rm -f {self.flag}; kill -STOP $PPID; fi; exec sleep 600"
        return command

    def arm(self, *names):
        """Create the flag, once the apps named have passed the point where they look for it."""
        for name in names:
            self.wait(lambda n=name: cmdline(self.info(n)["pid"]).startswith("sleep"), f"{name} settled")
        with open(self.flag, "w"):
            pass

    def ours(self, name):
        return [p for p in pids_with_env(f"OXMGR_NAME={name}") if self.marker_in(p)]

    def marker_in(self, pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return self.marker.encode() + b"\0" in f.read() + b"\0"
        except OSError:
            return False

    def frozen_state(self, daemon_pid, cli=None):
        """Wait for the daemon to be stopped by its child; return what state.json says then."""
        self.wait(lambda: process_state(daemon_pid) == "T", "the daemon stopped by its new child")
        with open(self.home.state) as f:
            state = json.load(f)
        os.kill(daemon_pid, signal.SIGKILL)
        if self.daemon is not None and self.daemon.pid == daemon_pid:
            self.daemon.wait()
        self.wait(lambda: process_state(daemon_pid) in (None, "Z"), "the daemon killed")
        self.daemon = None
        if cli is not None:
            cli.kill()
            cli.communicate()
        return state

    def recorded(self, state, name):
        """Every pid state.json charges to the app: its child, and a reload's other groups."""
        entry = next(p for p in state["processes"] if p["name"] == name)
        return {entry["pgid"]} | {g[0] for g in entry.get("other_groups", [])} - {None}

    def assert_one_copy_each(self, names, old_pids):
        self.cli_ok("list")  # a new daemon: recovery
        for name in names:
            self.wait(lambda n=name: self.info(n)["status"] == "running" and self.ours(n) == [self.info(n)["pid"]],
                      f"exactly one {name}: {self.ours(name)}")
        for pid in old_pids:
            self.wait(lambda p=pid: process_state(p) in (None, "Z"), f"old pid {pid} gone")

    def test_start(self):
        command = self.stopper("t4")
        self.arm()
        cli = self.background_cli("start", command, "--name", "t4")
        state = self.frozen_state(self.daemon.pid, cli)
        live = self.ours("t4")
        self.assertEqual(len(live), 1)
        self.assertEqual(self.recorded(state, "t4"), set(live), "state.json names the child before it runs")
        self.assert_one_copy_each(["t4"], live)

    def test_restart_and_crash_restart(self):
        command = self.stopper("r")
        self.cli_ok("start", command, "--name", "r")
        first = self.wait(lambda: self.info("r")["pid"], "first child")
        self.arm("r")
        cli = self.background_cli("restart", "r")
        state = self.frozen_state(self.daemon.pid, cli)
        live = self.ours("r")
        self.assertEqual(self.recorded(state, "r"), set(live))
        self.assert_one_copy_each(["r"], live + [first])
        daemon_pid = oxmgr.request(self.home, "ping")["pid"]
        crashed = self.info("r")["pid"]
        self.arm("r")
        os.kill(crashed, signal.SIGKILL)  # a crash: the respawn stops the daemon
        state = self.frozen_state(daemon_pid)
        live = self.ours("r")
        self.assertEqual(self.recorded(state, "r"), set(live))
        self.assert_one_copy_each(["r"], live + [crashed])

    def test_recovery(self):
        command = self.stopper("a")
        self.cli_ok("start", command, "--name", "a")
        self.cli_ok("start", "sleep 600", "--name", "b")
        old = [self.info("a")["pid"], self.info("b")["pid"]]
        self.arm("a", "b")
        os.unlink(self.flag)
        self.daemon.kill()
        self.daemon.wait()
        self.arm()
        daemon = self.start_daemon_unchecked()
        state = self.frozen_state(daemon.pid)
        live = self.ours("a")
        self.assertEqual(self.recorded(state, "a"), set(live), "recovery records each child before it runs")
        self.assert_one_copy_each(["a", "b"], old + live)

    def start_daemon_unchecked(self):
        log = open(self.home.daemon_log, "ab")
        self.addCleanup(log.close)
        self.daemon = subprocess.Popen(oxmgr.daemon_argv(self.home), stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        return self.daemon

    def test_reload(self):
        command = self.stopper("web")
        self.cli_ok("start", command, "--name", "web", "--min-uptime", "0.2")
        old = self.info("web")["pid"]
        self.arm("web")
        cli = self.background_cli("reload", "web")
        state = self.frozen_state(self.daemon.pid, cli)
        live = self.ours("web")
        self.assertEqual(len(live), 2)  # the old one serves on while its replacement starts
        self.assertEqual(self.recorded(state, "web"), set(live), "the replacement is recorded too")
        self.assert_one_copy_each(["web"], live)
        self.assertNotIn(old, self.ours("web"))

    @unittest.skipUnless(SLOW, "soak test: set OXMGR_SLOW_TESTS=1")
    def test_soak_cli_churn_raced_with_kill_9(self):
        """Random CLI churn, the daemon killed at a random moment (recovery included): after each round
        every app meant to run runs exactly once and nothing else of ours runs."""
        import random
        import threading
        rng = random.Random(SOAK_SEED)
        rounds = int(SOAK_ROUNDS or 200)
        names = [f"s{i}" for i in range(6)]
        lost = duplicates = orphans = 0
        for round_no in range(rounds):
            victim = self.daemon
            timer = threading.Timer(rng.uniform(0, 0.08), lambda v=victim: v.poll() is None and v.kill())
            timer.start()
            confirmed = {}  # name -> the desired state a reply confirmed, for apps no later op touched
            for _ in range(rng.randrange(1, 12)):
                name, op = rng.choice(names), rng.choice(["start", "start", "stop", "restart", "delete", "reload"])
                try:
                    if op == "start":
                        oxmgr.request(self.home, "start", timeout=5, env=dict(os.environ),
                                      apps=[{"name": name, "command": "sleep 600"}], existing="start")
                    else:
                        oxmgr.request(self.home, op, timeout=5, targets=[name])
                except oxmgr.ProcessNotFound:
                    confirmed[name] = None
                    continue
                except oxmgr.OxmgrError:
                    confirmed.pop(name, None)
                    break  # killed under us: what this op did is unknown
                confirmed[name] = {"start": "running", "restart": "running", "reload": "running",
                                   "stop": "stopped", "delete": None}[op]
            timer.join()
            victim.kill()
            victim.wait()
            self.wait(lambda v=victim: process_state(v.pid) in (None, "Z"), "killed")
            if rng.random() < 0.4:  # a kill during recovery too
                self.start_daemon_unchecked()
                time.sleep(rng.uniform(0, 0.03))  # the moment of the kill, not a wait for anything
                self.daemon.kill()
                self.daemon.wait()
            self.start_daemon()
            settled = self.wait(self.settled, "every app settled", timeout=LONG_TIMEOUT)
            listed = {p["name"]: p for p in settled}
            for name, desired in confirmed.items():
                if (desired is None) != (name not in listed) or (desired and listed[name]["desired"] != desired):
                    lost += 1
            running = {p["name"]: p["pid"] for p in settled if p["status"] == "running"}
            for pid in pids_with_env(self.marker):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                except OSError:
                    continue
                name = env.get(b"OXMGR_NAME", b"").decode()
                if not name or pid == running.get(name):
                    continue  # the daemon itself carries the home too
                if name in running:
                    duplicates += 1
                else:
                    orphans += 1
                print(f"round {round_no}: pid {pid} ({cmdline(pid)}) of {name!r} is not the running one: {running}",
                      file=sys.stderr)
                kill_pids([pid])
            self.assertEqual((lost, duplicates, orphans), (0, 0, 0),
                             f"round {round_no}: {confirmed} "
                             f"{[(p['name'], p['status'], p['pid'], p['desired']) for p in settled]}"
                             + self.daemon_log_tail(60))
        print(f"\nsoak: {rounds} rounds, {lost} lost, {duplicates} duplicates, {orphans} orphans", file=sys.stderr)

    def settled(self):
        processes = oxmgr.request(self.home, "list", timeout=5)["processes"]
        if any(p["status"] in ("starting", "stopping", "restarting")
               or p["status"] == "stopped" and p["desired"] == "running" for p in processes):
            return None  # still recovering
        if any(p["status"] == "running" and process_state(p["pid"]) in (None, "Z") for p in processes):
            return None
        return processes

    def marked_process(self):
        env = dict(os.environ, OXMGR_ID="7", OXMGR_NAME="stray")
        proc = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], env=env, start_new_session=True)
        self.addCleanup(lambda: proc.poll() is None and (os.killpg(proc.pid, signal.SIGKILL), proc.wait()))
        return proc

    def test_a_marked_stray_is_stopped_after_a_kill_9(self):
        """A group of ours that no record names (a state file lost) is stopped by the next daemon."""
        self.daemon.kill()
        self.daemon.wait()
        stray = self.marked_process()
        unrelated = subprocess.Popen(["sleep", "600"], env=dict(os.environ, OXMGR_ID="7", OXMGR_HOME=self.tmp),
                                     start_new_session=True)
        self.addCleanup(lambda: (unrelated.kill(), unrelated.wait()))
        self.start_daemon()
        self.wait(lambda: stray.poll() is not None and not group_members(stray.pid), "the stray's group stopped")
        self.assertIsNone(unrelated.poll(), "another home's process is not ours")
        self.assertIn("no record names it", read_text(self.home.daemon_log))

    def test_after_a_clean_stop_what_an_app_detached_is_left_alone(self):
        self.stop_daemon()
        detached = self.marked_process()
        self.start_daemon()
        oxmgr.request(self.home, "list")  # recovery is done
        self.assertIsNone(detached.poll())
        self.assertNotIn("no record names it", read_text(self.home.daemon_log))


class TestCarelessUse(DaemonTestCase):
    """What a careless user (and a big fleet) does to the daemon: issue 11's medium and low findings."""

    def test_big_replies_stream_and_big_configs_start(self):
        """list of 5,000 apps, logs --lines 20000 and a config of 1,100 apps: the frame cap is for requests."""
        self.stop_daemon()
        records = [make_record(i, f"app{i}", desired="stopped") for i in range(5000)]
        oxmgr.save_state(self.home, 5000, records)
        self.start_daemon()
        listing = self.cli_ok("list", "--json")
        self.assertEqual(len(json.loads(listing)), 5000)
        os.makedirs(self.home.logs, exist_ok=True)
        with open(self.home.log_path("app1", "out"), "w") as f:
            f.writelines(f"line {i:06d} {'x' * 40}\n" for i in range(30000))
        out = self.cli_ok("logs", "app1", "--out", "--lines", "20000").splitlines()
        self.assertEqual((len(out), out[0][:11], out[-1][:11]), (20000, "line 010000", "line 029999"))
        self.cli_ok("delete", "all")
        path = os.path.join(self.tmp, "fleet.toml")
        with open(path, "w") as f:
            f.write("".join(f"[[apps]]\nname = 'w{i}'\ncommand = 'true'\nrestart = 'never'\n" for i in range(1100)))
        out = self.cli_ok("start", path)
        self.assertEqual(out.count("started w"), 1100)

    def test_a_million_line_tail_comes_whole_in_frames(self):
        """logs --lines 1000000 is linear and framed: every line, in order, and the daemon answers meanwhile."""
        self.start_app("big", READY_THEN_SLEEP)
        path = self.home.log_path("big", "out")
        with open(path, "a") as f:
            f.writelines(f"{i}\n" for i in range(1000000))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.home.sock)
            s.sendall(b'{"op": "logs", "targets": ["big"], "streams": ["out"], "lines": 1000000}\n')
            reader = s.makefile("rb")
            first = json.loads(reader.readline())
            self.assertTrue(first["more"])
            self.assertTrue(self.daemon_up())  # answered while the tail is half sent
            lines, frame = [x["line"] for x in first["lines"]], first
            while frame["more"]:
                frame = json.loads(reader.readline())
                lines.extend(x["line"] for x in frame["lines"])
        self.assertEqual(len(lines), 1000000)
        self.assertEqual((lines[0], lines[-1]), ("1", "999999"))  # line 0 is the app's own "ready"

    def test_two_writers_of_one_file_never_tear_lines(self):
        """Two apps with the same -o, and -o X -e X: each line arrives whole."""
        shared = os.path.join(self.tmp, "shared.log")
        spew = """
            import os, sys
            tag = os.environ["OXMGR_NAME"]
            for i in range(50000):
                stream = sys.stderr if i % 3 == 0 else sys.stdout
                stream.write(f"{tag} {i} " + "y" * (i % 97) + "\\n")
            sys.stdout.flush(); sys.stderr.flush()
        """
        for name in ("left", "right"):
            self.cli_ok("start", python_child(spew), "--name", name, "-o", shared, "-e", shared, "--restart", "never")
        for name in ("left", "right"):
            self.wait_status(name, "stopped", timeout=LONG_TIMEOUT)
        with open(shared) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 100000)
        pattern = re.compile(r"^(left|right) (\d+) (y*)$")
        for line in lines:
            match = pattern.match(line)
            self.assertTrue(match and len(match.group(3)) == int(match.group(2)) % 97, line)

    def test_an_unterminated_last_line_is_ended_by_the_daemon(self):
        self.cli_ok("start", "printf 'no newline'", "--name", "partial", "--restart", "never")
        self.wait_status("partial", "stopped")
        self.cli_ok("restart", "partial")
        self.wait(lambda: read_text(self.home.log_path("partial", "out")).count("no newline") == 2, "second run")
        self.assertEqual(read_text(self.home.log_path("partial", "out")), "no newline\nno newline\n")
        self.stop_daemon()
        with open(self.home.log_path("partial", "out"), "a") as f:
            f.write("left open by a killed daemon")
        self.start_daemon()
        self.cli_ok("restart", "partial")
        self.wait(lambda: read_text(self.home.log_path("partial", "out")).count("no newline") == 3, "third run")
        self.assertTrue(read_text(self.home.log_path("partial", "out")).endswith("daemon\nno newline\n"))

    def test_flush_and_rotation_leave_foreign_files_alone(self):
        victim = os.path.join(self.tmp, "passwd")
        with open(victim, "w") as f:
            f.write("root:x:0:0::/root:/bin/sh\n")
        self.stop_daemon()
        with mock.patch.dict(os.environ, {"OXMGR_LOG_MAX_SIZE_MB": "0.0001"}):
            self.start_daemon()
        self.cli_ok("start", "sh -c 'for i in 1 2 3 4 5 6 7 8 9; do echo line-$i-padding-padding; done'",
                    "--name", "careless", "-o", victim, "--restart", "never")
        self.wait(lambda: "line-9" in read_text(victim), "output appended")
        self.assertFalse(os.path.exists(victim + ".1"), "never rotated")
        code, _, err = self.cli("flush", "careless")
        self.assertEqual(code, 0, err)
        self.assertIn("not flushing", err)
        self.assertTrue(read_text(victim).startswith("root:x:0:0"))
        self.assertIn("never rotated or flushed", read_text(self.home.daemon_log))

    def test_an_undecodable_argument_is_an_error_not_a_traceback(self):
        code, _, err = self.cli("stop", "\udcff")  # `oxmgr stop $'\xff'`: the shell's byte, surrogate-escaped
        self.assertEqual(code, 1)
        self.assertIn("process not found", err)
        self.assertNotIn("Traceback", err)
        code, _, err = self.cli("start", "sleep 1", "--name", "x", "--env", "K=\udcff")
        self.assertEqual(code, 2)  # a bad flag value
        self.assertIn("not valid text", err)
        self.assertTrue(self.daemon_up())

    def test_a_loose_home_is_tightened_and_said_once(self):
        self.stop_daemon()
        self.daemon = None
        os.chmod(self.home_dir, 0o777)
        code, _, err = self.cli("list")
        self.assertEqual(code, 0, err)
        self.assertIn("was mode 777; set to 700", err)
        self.assertEqual(stat.S_IMODE(os.stat(self.home_dir).st_mode), 0o700)
        self.cli_ok("daemon", "stop")
        code, _, err = self.cli("list")
        self.assertNotIn("set to 700", err)

    @unittest.skipUnless(IS_ROOT, "needs root to act as another user")
    def test_a_home_or_socket_of_another_user_is_refused_before_a_byte_is_sent(self):
        self.stop_daemon()
        self.daemon = None
        received = os.path.join(self.tmp, "received")
        listener = textwrap.dedent(f"""
            import os, socket
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.bind({self.home.sock!r})
            os.chmod({self.home.sock!r}, 0o777)
            s.listen()
            print("listening", flush=True)
            c, _ = s.accept()
            c.settimeout(5)
            try:
                data = c.recv(65536)
            except OSError:
                data = b""
            open({received!r}, "wb").write(data)
        """)
        for owner in ("home", "socket"):
            with self.subTest(planted=owner):
                if os.path.exists(self.home.sock):
                    os.unlink(self.home.sock)
                with open(received, "wb"):
                    pass
                os.chmod(received, 0o666)  # the spy records what it gets here
                os.chmod(self.tmp, 0o755)
                os.chmod(self.home_dir, 0o777)
                os.chown(self.home_dir, 65534 if owner == "home" else 0, 65534 if owner == "home" else 0)
                spy = subprocess.Popen([sys.executable, "-S", "-c", listener], stdout=subprocess.PIPE)
                self.addCleanup(lambda p=spy: (p.kill(), p.wait(), p.stdout.close()))
                self.assertEqual(spy.stdout.readline().strip(), b"listening")
                code, _, err = self.cli("start", "sleep 600", "--name", "secret", "--env", "API_KEY=hunter2")
                self.assertEqual(code, 1, err)
                self.assertIn("belongs to uid 65534, not to you", err)
                spy.kill()
                spy.wait()
                self.assertEqual(read_text(received), "", "nothing was sent")
        os.chown(self.home_dir, 0, 0)
        if os.path.exists(self.home.sock):
            os.unlink(self.home.sock)


@POSIX_ONLY
class TestIpcSecurity(DaemonTestCase):

    def raw(self, payload, read=True):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(SHORT_TIMEOUT)
            s.connect(self.home.sock)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while read:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return [json.loads(x) for x in data.splitlines()]

    def test_socket_and_home_modes(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.home_dir).st_mode), 0o700)
        st = os.stat(self.home.sock)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.home.state).st_mode), 0o600)

    def test_bad_frames_get_errors_and_the_daemon_lives(self):
        replies = self.raw(b"garbage\n[1,2]\n" + b'{"op": "frobnicate"}\n' + b'{"op": "stop", "targets": 5}\n'
                           + b'{"op": "ping"}\n')
        self.assertEqual([r["ok"] for r in replies], [False, False, False, False, True])
        self.assertEqual(replies[0]["error"]["type"], "IpcError")
        self.assertIn("not JSON", replies[0]["error"]["message"])
        self.assertIn("unknown op 'frobnicate'", replies[2]["error"]["message"])
        huge = b'{"op": "ping", "pad": "' + b"x" * (oxmgr.MAX_REQUEST_BYTES + 10) + b'"}\n{"op": "ping"}\n'
        replies = self.raw(huge)
        self.assertEqual([r["ok"] for r in replies], [False, True])
        self.assertIn("exceeds", replies[0]["error"]["message"])
        self.raw(b'{"op": "pi', read=False)  # a client that hangs up mid-frame
        self.assertTrue(self.daemon_up())
        replies = self.raw(b'{"op": "logs", "follow": true}\n{"op": "shutdown"}\n')  # after a follow: ignored
        self.assertEqual([r.get("follow") for r in replies], [True])
        self.assertTrue(self.daemon_up())

    def test_out_of_descriptors_pauses_accepting_and_is_logged_once(self):
        import resource
        self.stop_daemon()
        log = open(self.home.daemon_log, "ab")
        self.addCleanup(log.close)
        self.daemon = subprocess.Popen(oxmgr.daemon_argv(self.home), stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
        self.wait(self.daemon_up, "daemon with 64 descriptors")
        for _ in range(2):  # two floods: two pauses, one line in the log
            flood = []
            for _ in range(100):
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(self.home.sock)
                flood.append(conn)
            self.wait(lambda: "out of system resource" in read_text(self.home.daemon_log), "the daemon ran out")
            for conn in flood:
                conn.close()
            self.wait(self.daemon_up, "accepting again")
        self.assertEqual(read_text(self.home.daemon_log).count("out of system resource"), 1)

    def test_fuzzed_frames_each_get_one_error_or_answer(self):
        """Random frames (random ops, fields of every JSON type, lone surrogates, cut and garbled bytes):
        each gets one reply naming what is wrong, never an internal error, and the daemon lives on."""
        import random
        rng = random.Random(11)
        rounds = 20000 if SLOW else 1500
        ops = ["ping", "start", "apply", "stop", "restart", "delete", "reload", "scale", "save", "resurrect", "list",
               "status", "logs", "flush", "signal", "reset", "nope", None, 7, ["list"]]
        keys = ["apps", "count", "existing", "follow", "keep", "lines", "missing_ok", "name", "prune", "signal",
                "streams", "targets", "update_env", "env", "apps", "token"]

        def value(depth=0):
            kind = rng.randrange(12 if depth < 3 else 8)
            return [None, True, 1e308 * 10, -1, 2 ** 70, "\ud800", "x\u0000y", rng.choice(["all", "0", "a", ""]),
                    lambda: [value(depth + 1) for _ in range(rng.randrange(3))],
                    lambda: {rng.choice(keys + ["name", "command"]): value(depth + 1) for _ in range(rng.randrange(4))},
                    lambda: [{"name": "fz", "command": value(depth + 1)}], lambda: ["all", value(depth + 1)]][kind]

        def resolve(v):
            v = v() if callable(v) else v
            if isinstance(v, list):
                return [resolve(x) for x in v]
            if isinstance(v, dict):
                return {k: resolve(x) for k, x in v.items()}
            return v

        pid = self.daemon.pid
        replies = 0
        for _ in range(rounds):
            msg = {"op": rng.choice(ops)}
            for key in rng.sample(keys, rng.randrange(4)):
                msg[key] = resolve(value())
            if msg["op"] == "start" and rng.random() < 0.5:
                msg["apps"] = [{"name": "fz", "command": "sleep 600"}]
            frame = json.dumps(msg).encode()
            cut = rng.random()
            if cut < 0.1:
                frame = frame[:rng.randrange(len(frame))]
            elif cut < 0.2:
                at = rng.randrange(len(frame))
                frame = frame[:at] + bytes([rng.randrange(256)]) + frame[at + 1:]
            frame = frame.replace(b"\n", b" ") + b"\n"
            if not frame.strip():
                continue
            with self.subTest(frame=frame[:200]):
                got = self.raw(frame)
                self.assertEqual(len(got), 1)
                self.assertIn("ok", got[0])
                if not got[0]["ok"]:
                    self.assertNotEqual(got[0]["error"]["type"], "InternalError", got[0])
                replies += 1
        self.assertTrue(self.daemon_up())
        self.assertEqual(oxmgr.request(self.home, "ping")["pid"], pid)
        self.assertNotIn("request failed", read_text(self.home.daemon_log))
        print(f"\nfuzz: {rounds} frames, {replies} replies, daemon pid {pid} unchanged", file=sys.stderr)

    @unittest.skipUnless(IS_ROOT, "needs root to connect as another user")
    def test_peer_uid_check_refuses_other_users(self):
        os.chmod(self.home.sock, 0o666)
        os.chmod(self.tmp, 0o755)  # open every door on purpose: the uid check must still refuse
        os.chmod(self.home_dir, 0o755)
        code = textwrap.dedent(f"""
            import os, socket, sys
            os.setgid(65534); os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.connect({self.home.sock!r})
            s.sendall(b'{{"op": "list"}}\\n')
            print(s.recv(65536).decode())
        """)
        result = subprocess.run([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=LONG_TIMEOUT)
        self.assertTrue(result.stdout.strip(), result.stderr)
        reply = json.loads(result.stdout.strip().splitlines()[0])
        self.assertFalse(reply["ok"])
        self.assertIn("permission denied", reply["error"]["message"])
        self.assertIn("refused a connection from uid 65534", read_text(self.home.daemon_log))


@POSIX_ONLY
class TestTcpMode(DaemonTestCase):
    extra_env = {"OXMGR_DAEMON_ADDR": "127.0.0.1:0"}

    def tcp(self, msg):
        with open(os.path.join(self.home_dir, "daemon.addr")) as f:
            host, port = oxmgr.split_host_port(f.read())
        with socket.create_connection((host, port), timeout=SHORT_TIMEOUT) as s:
            s.sendall(oxmgr.encode(msg))
            return json.loads(s.makefile("rb").readline())

    def test_token_required(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.home.token).st_mode), 0o600)
        reply = self.tcp({"op": "list"})
        self.assertFalse(reply["ok"])
        self.assertIn("unauthorized", reply["error"]["message"])
        self.assertFalse(self.tcp({"op": "list", "token": "wrong"})["ok"])
        with open(self.home.token) as f:
            token = f.read().strip()
        self.assertTrue(self.tcp({"op": "list", "token": token})["ok"])

    def test_idle_strangers_cannot_crowd_out_the_owner(self):
        """Hundreds of connections that never send a token: the owner is answered, and each stranger is
        closed (the oldest make way for newer ones, the rest at their deadline)."""
        with open(os.path.join(self.home_dir, "daemon.addr")) as f:
            host, port = oxmgr.split_host_port(f.read())
        idle = []
        self.addCleanup(lambda: [c.close() for c in idle])
        for _ in range(300):
            idle.append(socket.create_connection((host, port), timeout=SHORT_TIMEOUT))
        with open(self.home.token) as f:
            token = f.read().strip()
        self.assertTrue(self.tcp({"op": "list", "token": token})["ok"])
        for conn in idle:
            conn.settimeout(LONG_TIMEOUT)
            try:
                self.assertEqual(conn.recv(1), b"")  # closed by the daemon
            except ConnectionResetError:
                pass
        self.assertTrue(self.daemon_up())
        self.assertNotIn("Too many open files", read_text(self.home.daemon_log))

    @unittest.skipUnless(IS_ROOT and sys.platform.startswith("linux"), "needs root to act as another user")
    def test_a_port_taken_by_another_user_gets_no_token(self):
        """After a kill -9 daemon.addr is stale; another user who binds that port receives nothing."""
        with open(os.path.join(self.home_dir, "daemon.addr")) as f:
            host, port = oxmgr.split_host_port(f.read())
        self.daemon.kill()
        self.daemon.wait()
        os.unlink(self.home.sock)
        received = os.path.join(self.tmp, "received")
        with open(received, "wb"):
            pass
        os.chmod(received, 0o666)
        os.chmod(self.tmp, 0o755)
        spy = subprocess.Popen([sys.executable, "-S", "-c", textwrap.dedent(f"""
            import os, socket
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(({host!r}, {port})); s.listen()
            print("listening", flush=True)
            c, _ = s.accept(); c.settimeout(5)
            try:
                data = c.recv(65536)
            except OSError:
                data = b""
            open({received!r}, "wb").write(data)
        """)], stdout=subprocess.PIPE)
        self.addCleanup(lambda: (spy.kill(), spy.wait(), spy.stdout.close()))
        self.assertEqual(spy.stdout.readline().strip(), b"listening")
        self.daemon = None
        code, _, err = self.cli("start", "sleep 600", "--name", "secret", "--env", "API_KEY=hunter2")
        self.assertEqual(code, 1, err)
        self.assertIn("is served by uid 65534, not by you; nothing was sent", err)
        spy.kill()
        spy.wait()
        self.assertEqual(read_text(received), "")

    def test_non_loopback_refused(self):
        os.environ["OXMGR_DAEMON_ADDR"] = "0.0.0.0:0"
        other = oxmgr.Home(os.path.join(self.tmp, "other"))
        os.environ["OXMGR_HOME"] = other.root
        result = subprocess.run([sys.executable, OXMGR_PY, "daemon", "run"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=LONG_TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertIn("is not a loopback address", result.stderr)
        self.assertIn("OXMGR_DAEMON_ALLOW_REMOTE", result.stderr)


@POSIX_ONLY
class TestLogRotationEndToEnd(DaemonTestCase):
    extra_env = {"OXMGR_LOG_MAX_SIZE_MB": "0.05", "OXMGR_LOG_MAX_FILES": "100"}

    def read_rotated(self, name):
        path = self.home.log_path(name, "out")
        files = [path]
        i = 1
        while os.path.exists(f"{path}.{i}"):
            files.insert(0, f"{path}.{i}")
            i += 1
        chunks = []
        for p in files:
            with open(p, "rb") as f:
                chunks.append(f.read())
        return files, b"".join(chunks)

    def test_100k_lines_all_present_in_order_across_rotation(self):
        """With a small rotation size, 100,000 numbered lines arrive once each, in order."""
        self.start_app("spew", SPEW_LINES(100_000))
        self.wait_log("spew", "done", timeout=LONG_TIMEOUT)
        files, data = self.read_rotated("spew")
        self.assertGreater(len(files), 10)
        lines = data.decode().splitlines()
        self.assertEqual(lines[:-1], ["line %07d" % i for i in range(100_000)])
        for p in files:
            self.assertLessEqual(os.path.getsize(p), int(0.05 * (1 << 20)))

    def test_logs_follow_keeps_printing_across_rotation_and_restart(self):
        ticker = os.path.join(self.tmp, "go")
        app = f"""
            import os, sys, time
            print("ready", os.getpid(), flush=True)
            while not os.path.exists({ticker!r}):
                time.sleep(0.01)
            for i in range(20000):
                print("n%06d" % i)
            sys.stdout.flush()
            print("finished", flush=True)
            sys.exit(1)
        """
        self.start_app("flow", app, "--restart", "never")
        self.wait_ready_pid("flow")
        follower = subprocess.Popen([sys.executable, OXMGR_PY, "logs", "flow", "-f", "--lines", "1", "--out"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: (follower.kill(), follower.wait(), follower.stdout.close(), follower.stderr.close()))
        reader = LineReader(follower.stdout)
        first = reader.next_line()
        self.assertTrue(first.startswith("ready"), first)
        open(ticker, "w").close()
        got = []
        while True:
            line = reader.next_line()
            if line == "finished":
                break
            got.append(line)
        self.assertEqual(got, ["n%06d" % i for i in range(20000)])
        self.assertGreater(len(self.read_rotated("flow")[0]), 2)  # it did rotate meanwhile
        os.unlink(ticker)
        self.cli_ok("restart", "flow")  # the follower keeps going across a restart too
        self.assertTrue(reader.next_line().startswith("ready"))


# -- health, readiness, metrics, limits, watch, cron ---------------------------------------------

NOTIFY_READY = """
    import os, socket, sys, time
    def notify(message):
        address = os.environ["NOTIFY_SOCKET"]
        if address.startswith("@"):
            address = "\\0" + address[1:]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(message, address)
        s.close()
    marker = sys.argv[1] if len(sys.argv) > 1 else None
    time.sleep(float(os.environ.get("READY_AFTER", "0.3")))
    if marker:
        open(marker, "w").close()
    notify(b"READY=1\\nSTATUS=serving requests")
    print("ready", os.getpid(), flush=True)
    while True:
        time.sleep(60)
"""


def http_app(status_file):
    """An HTTP server on $PORT whose /health answers the code written in status_file."""
    return f"""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    code = int(open({status_file!r}).read().strip() or 200)
                except (OSError, ValueError):
                    code = 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
            def log_message(self, *args):
                pass
        server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
        print("ready", os.getpid(), flush=True)
        server.serve_forever()
    """


class TestWatchRules(unittest.TestCase):

    def test_watch_ignored_table(self):
        root = "/app"
        for path, patterns, expected in [
            ("/app/src/a.js", [], False), ("/app/node_modules/x/y.js", [], True), ("/app/.git/HEAD", [], True),
            ("/app/src/__pycache__/m.pyc", [], True), ("/app/logs/a.log", [r"\.log$"], True),
            ("/app/tmp/x.tmp", ["*.tmp"], True), ("/app/tmp/x.txt", ["*.tmp"], False),
            ("/app/build/out.js", ["build"], True), ("/app/src/build.js", ["^build/"], False),
            ("/app/a[b", ["a[b"], True), ("/home/oxmgr/logs/x.log", [], True),
        ]:
            with self.subTest(path=path, patterns=patterns):
                self.assertEqual(oxmgr._watch_ignored(path, root, patterns, ["/home/oxmgr"]), expected)


@POSIX_ONLY
class TestHealthAndLimits(DaemonTestCase):
    extra_env = {"OXMGR_METRICS_INTERVAL": "0.2"}

    def test_memory_is_counted_for_the_whole_tree(self):
        """A parent whose child holds 60 MB reports at least 50 MB: the tree, not the main pid."""
        code = """
            import os, subprocess, sys, time
            kid = subprocess.Popen([sys.executable, "-S", "-c",
                "import sys, time; x = bytearray(60 * 1024 * 1024); x[::4096] = b'y' * len(x[::4096]); "
                "print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
            kid.stdout.readline()
            print("ready", os.getpid(), flush=True)
            time.sleep(600)
        """
        self.start_app("tree", code)
        pid = self.wait_ready_pid("tree")
        info = self.wait(lambda: (lambda i: i if (i["memory_bytes"] or 0) >= 50 << 20 and i["metrics_samples"] >= 2
                                  else None)(self.info("tree")), "tree memory >= 50 MB, and a CPU figure")
        self.assertLess(oxmgr.DRIVER.read_stats(pid).rss_bytes, 50 << 20)  # the parent alone is small
        listed = json.loads(self.cli_ok("list", "--json"))[0]
        self.assertGreaterEqual(listed["memory_bytes"], 50 << 20)
        self.assertIsNotNone(listed["cpu_percent"])
        self.assertRegex(self.cli_ok("list"), r"tree\s+default\s+running\s+\d+\s+\S+\s+0\s+[\d.]+\s+[\d.]+M")
        self.assertGreater(info["metrics_samples"], 0)

    def test_memory_limit_restarts_with_the_reason(self):
        code = """
            import os, time
            print("ready", os.getpid(), flush=True)
            hog = []
            while True:
                hog.append(bytearray(8 * 1024 * 1024))
                hog[-1][::4096] = b"x" * len(hog[-1][::4096])
                time.sleep(0.05)
        """
        self.start_app("hog", code, "--max-memory-mb", "40")
        info = self.wait(lambda: (lambda i: i if i["restart_reason"] else None)(self.info("hog")), "limit restart")
        self.assertRegex(info["restart_reason"], r"memory [\d.]+M over the 40.0M limit")
        self.assertGreaterEqual(info["restart_count"], 1)
        self.assertIn("Last restart:", self.cli_ok("status", "hog"))

    def test_cpu_spike_does_not_restart_but_sustained_load_does(self):
        spike = """
            import os, time
            end = time.monotonic() + 0.25
            while time.monotonic() < end:
                pass
            print("spike done", flush=True)
            print("ready", os.getpid(), flush=True)
            time.sleep(600)
        """
        self.start_app("spiky", spike, "--max-cpu-percent", "50")
        self.wait_log("spiky", "spike done")
        after = self.info("spiky")["metrics_samples"]
        self.wait(lambda: self.info("spiky")["metrics_samples"] >= after + 6, "six more samples")
        self.assertEqual(self.info("spiky")["restart_count"], 0)
        busy = "import os\nprint('ready', os.getpid(), flush=True)\nwhile True:\n    pass\n"
        self.start_app("busy", busy, "--max-cpu-percent", "50")
        info = self.wait(lambda: (lambda i: i if i["restart_reason"] else None)(self.info("busy")), "cpu restart")
        self.assertIn("CPU over 50% for 3 samples in a row", info["restart_reason"])

    def test_health_http_failing_restarts_passing_is_healthy(self):
        status_file = os.path.join(self.tmp, "code")
        port = free_port()
        with open(status_file, "w") as f:
            f.write("200")
        self.cli_ok("start", python_child(http_app(status_file)), "--name", "web", "--env", f"PORT={port}",
                    "--health-http", f"http://127.0.0.1:{port}/health", "--health-interval", "0.1",
                    "--health-max-failures", "2")
        self.wait_ready_pid("web")
        self.wait(lambda: self.info("web")["health_status"] == "healthy", "healthy")
        self.assertRegex(self.cli_ok("list"), r"web\s+default\s+running.*healthy")
        self.assertIn("healthy (HTTP 200", self.cli_ok("status", "web"))
        with open(status_file, "w") as f:
            f.write("503")
        info = self.wait(lambda: (lambda i: i if i["restart_reason"] else None)(self.info("web")), "health restart")
        self.assertIn("health check failed 2 times in a row (HTTP 503)", info["restart_reason"])
        self.assertEqual(info["restart_count"], 1)

    def test_health_cmd_and_tcp(self):
        port = free_port()
        listener = f"""
            import os, socket, time
            s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
            print("ready", os.getpid(), flush=True)
            while True:
                s.accept()[0].close()
        """
        self.start_app("tcp", listener, "--health-tcp", f"127.0.0.1:{port}", "--health-interval", "0.1")
        self.wait(lambda: self.info("tcp")["health_status"] == "healthy", "tcp healthy")
        self.start_app("cmdfail", READY_THEN_SLEEP, "--health-cmd", "echo broken >&2; exit 3",
                       "--health-interval", "0.1", "--health-max-failures", "1")
        info = self.wait(lambda: (lambda i: i if i["restart_reason"] else None)(self.info("cmdfail")), "cmd restart")
        self.assertIn("health_cmd exit 3: broken", info["restart_reason"])
        self.start_app("slow", READY_THEN_SLEEP, "--health-cmd", "sleep 30", "--health-interval", "0.1",
                       "--health-timeout", "0.2", "--health-max-failures", "5")
        self.wait(lambda: "timed out" in (self.info("slow")["health_detail"] or ""), "health_cmd timeout")
        self.assertTrue(self.daemon_up())


@POSIX_ONLY
class TestReadiness(DaemonTestCase):

    def test_start_waits_for_ready_1(self):
        """start --wait-ready returns after the app sent READY=1, not before."""
        marker = os.path.join(self.tmp, "about-to-be-ready")
        command = python_child(NOTIFY_READY) + " " + shlex.quote(marker)
        self.cli_ok("start", command, "--name", "notified", "--wait-ready", "--env", "READY_AFTER=1")
        self.assertTrue(os.path.exists(marker))  # written just before READY=1
        info = self.info("notified")
        self.assertEqual(info["status"], "running")
        self.assertEqual(info["status_reason"], "ready: READY=1")
        self.wait(lambda: self.info("notified")["notify_status"] == "serving requests", "STATUS= shown")
        self.assertRegex(self.cli_ok("status", "notified"), r"(?m)^App status:\s+serving requests$")

    def test_never_ready_fails_with_a_clear_message(self):
        code, _, err = self.cli("start", python_child(READY_THEN_SLEEP), "--name", "mute", "--wait-ready",
                                "--ready-timeout", "0.5")
        self.assertEqual(code, 1)
        self.assertIn("'mute' was not ready within 500ms (waited for READY=1 on NOTIFY_SOCKET); it was stopped", err)
        info = self.info("mute")
        self.assertEqual((info["status"], info["pid"]), ("errored", None))
        self.assertEqual(pids_with_env("OXMGR_NAME=mute"), [])

    def test_ready_tcp_and_exit_before_ready(self):
        port = free_port()
        code = f"""
            import os, socket, time
            time.sleep(0.3)
            s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
            print("ready", os.getpid(), flush=True)
            while True:
                s.accept()[0].close()
        """
        self.cli_ok("start", python_child(code), "--name", "porty", "--ready-tcp", f"127.0.0.1:{port}")
        self.assertEqual(self.info("porty")["status_reason"], f"ready: 127.0.0.1:{port} accepts")
        code, _, err = self.cli("start", python_child(EXIT_WITH(4)), "--name", "quitter", "--wait-ready",
                                "--restart", "never")
        self.assertEqual(code, 1)
        self.assertIn("'quitter' exited with code 4 before it was ready", err)

    def test_stop_interrupts_a_start_waiting_for_readiness(self):
        starter = subprocess.Popen([sys.executable, OXMGR_PY, "start", python_child(READY_THEN_SLEEP), "--name",
                                    "waiting", "--wait-ready", "--ready-timeout", "60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(starter.wait)
        self.wait(lambda: oxmgr.request(self.home, "list")["processes"] and self.info("waiting")["pid"], "spawned")
        self.cli_ok("stop", "waiting")
        _, err = starter.communicate(timeout=LONG_TIMEOUT)
        self.assertEqual(starter.returncode, 1)
        self.assertIn("stopped before it was ready", err)
        self.assertEqual(self.info("waiting")["status"], "stopped")

    def test_dependent_starts_after_its_dependency_is_ready(self):
        marker = os.path.join(self.tmp, "db-ready")
        db = python_child(NOTIFY_READY) + " " + shlex.quote(marker)
        api = python_child(f"""
            import os, time
            print("db was ready:", os.path.exists({marker!r}), flush=True)
            print("ready", os.getpid(), flush=True)
            time.sleep(600)
        """)
        path = os.path.join(self.tmp, "oxfile.toml")
        with open(path, "w") as f:
            f.write(f"[[apps]]\nname = 'api'\ncommand = {oxmgr._toml_string(api)}\ndepends_on = ['db']\n"
                    f"[[apps]]\nname = 'db'\ncommand = {oxmgr._toml_string(db)}\nwait_ready = true\n"
                    f"[apps.env]\nREADY_AFTER = '1'\n")
        self.cli_ok("apply", path)
        self.wait_log("api", "db was ready: True")


NOTIFY_ON_FILES = """
    import os, socket, sys, time
    address = os.environ["NOTIFY_SOCKET"]
    address = "\\0" + address[1:] if address.startswith("@") else address
    me, folder = os.getpid(), sys.argv[1]
    while True:  # the test drops go-<pid> (send READY=1) and status-<pid> (send its text as STATUS=)
        for name, message in ((f"go-{me}", b"READY=1"), (f"status-{me}", None)):
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    text = f.read()
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.sendto(message or b"STATUS=" + text, address)
                s.close()
                os.unlink(path)
        time.sleep(0.01)
"""


@unittest.skipUnless(sys.platform.startswith("linux"), "SO_PASSCRED")
class TestNotifySenders(DaemonTestCase):
    """Only the app's own process group is heard on its NOTIFY_SOCKET (issue 11, finding 12)."""

    home_name = "h" * 110  # too long for sun_path: the notify socket is abstract, reachable by anyone

    def drop(self, name, text=b""):
        path = os.path.join(self.tmp, name)
        with open(path + ".tmp", "wb") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        self.wait(lambda: not os.path.exists(path), f"the app took {name}")

    def heard(self, pid, text):
        """Make the app send STATUS=text and wait until the daemon shows it: all before it was handled."""
        self.drop(f"status-{pid}", text.encode())
        self.wait(lambda: self.info("n")["notify_status"] == text, f"STATUS={text}")

    def starting(self):
        return self.background_cli("start", python_child(NOTIFY_ON_FILES) + " " + self.tmp, "--name", "n",
                                   "--wait-ready", "--ready-timeout", "60")

    def test_strangers_cannot_declare_an_app_ready(self):
        cli = self.starting()
        pid = self.wait(lambda: oxmgr.request(self.home, "list")["processes"] and self.info("n")["pid"], "spawned")
        self.wait(lambda: "sleep" in cmdline(pid) or "python" in cmdline(pid), "the app itself")
        with open(f"/proc/{pid}/environ", "rb") as f:
            address = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)[b"NOTIFY_SOCKET"].decode()
        self.assertTrue(address.startswith("@"), address)
        target = "\0" + address[1:]
        forge = ("import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
                 f"s.sendto(b'READY=1\\nSTATUS=forged', {target!r})")
        if IS_ROOT:  # another user, who can read /proc/net/unix (the interpreter is loaded as root first)
            subprocess.run([sys.executable, "-S", "-c", "import os, socket; os.setgroups([]); os.setgid(65534); "
                            "os.setuid(65534); " + forge], check=True, timeout=LONG_TIMEOUT)
        subprocess.run([sys.executable, "-S", "-c", forge], check=True, timeout=LONG_TIMEOUT)  # us, another group
        self.heard(pid, "from the app")
        self.assertEqual(self.info("n")["status"], "starting")
        self.assertIsNone(cli.poll())
        if IS_ROOT:
            self.assertIn("ignoring NOTIFY_SOCKET messages from uid 65534", read_text(self.home.daemon_log))
        self.drop(f"go-{pid}")
        self.finished(cli)
        self.assertEqual(self.info("n")["status"], "running")

    def test_the_old_process_cannot_end_its_reload(self):
        cli = self.starting()
        old = self.wait(lambda: oxmgr.request(self.home, "list")["processes"] and self.info("n")["pid"], "spawned")
        self.drop(f"go-{old}")
        self.finished(cli)
        reload = self.background_cli("reload", "n")
        new = self.wait(lambda: next((p for p in pids_with_env("OXMGR_NAME=n") if p != old
                                      and "python" in cmdline(p)), None), "the replacement")
        self.drop(f"go-{old}")  # the old process says READY=1 again
        self.drop(f"status-{new}", b"new one waiting")
        self.wait(lambda: self.info("n")["notify_status"] == "new one waiting", "the replacement heard")
        self.assertIsNone(reload.poll(), "the old process's READY=1 must not complete the reload")
        self.assertEqual(self.info("n")["pid"], old)
        self.drop(f"go-{new}")
        self.finished(reload)
        self.assertEqual(self.info("n")["pid"], new)


@POSIX_ONLY
class TestWatchAndCron(DaemonTestCase):

    def test_watch_restarts_once_per_settled_change(self):
        src = os.path.join(self.tmp, "src")
        os.makedirs(os.path.join(src, "node_modules"))
        open(os.path.join(src, "existing.js"), "w").close()
        self.start_app("watched", READY_THEN_SLEEP, "--cwd", src, "--watch", "--watch-delay", "0.3",
                       "--ignore-watch", "*.tmp")
        self.wait_ready_pid("watched")
        with open(os.path.join(src, "ignored.tmp"), "w") as f:
            f.write("x")
        with open(os.path.join(src, "node_modules", "dep.js"), "w") as f:
            f.write("x")
        os.utime(os.path.join(src, "existing.js"))  # a plain touch: only the timestamps change
        info = self.wait(lambda: (lambda i: i if i["restart_count"] == 1 else None)(self.info("watched")), "restart")
        self.assertIn("watch: existing.js changed", info["restart_reason"])  # not the ignored files
        self.wait_ready_pid("watched")
        for i in range(50):  # a burst inside one debounce window
            with open(os.path.join(src, f"burst{i}.js"), "w") as f:
                f.write(str(i))
        self.wait(lambda: self.info("watched")["restart_count"] == 2, "one restart for the burst")
        self.wait_ready_pid("watched")
        os.makedirs(os.path.join(src, "lib"))  # new directories are watched too
        self.wait(lambda: self.info("watched")["restart_count"] == 3, "restart for the new directory")
        self.wait_ready_pid("watched")
        with open(os.path.join(src, "lib", "deep.js"), "w") as f:
            f.write("x")
        info = self.wait(lambda: (lambda i: i if i["restart_count"] == 4 else None)(self.info("watched")), "deep")
        self.assertIn("lib/deep.js", info["restart_reason"])

    def test_cron_restarts_an_exited_app_but_not_a_stopped_one(self):
        once = "import os\nprint('run', os.getpid(), flush=True)\n"
        self.start_app("nightly", once, "--cron-restart", "*/2 * * * * *")
        self.start_app("held", once, "--cron-restart", "*/2 * * * * *")
        self.wait_status("held", "stopped")
        self.cli_ok("stop", "held")

        def runs(name):
            try:
                with open(self.home.log_path(name, "out")) as f:
                    return f.read().count("run ")
            except OSError:
                return 0
        held_runs = runs("held")
        self.wait(lambda: runs("nightly") >= 3, "two cron runs", timeout=LONG_TIMEOUT)
        self.assertEqual(runs("held"), held_runs)
        info = self.info("nightly")
        self.assertIn("cron_restart '*/2 * * * * *'", info["restart_reason"])
        self.assertIn("Cron:", self.cli_ok("status", "nightly"))


# -- container mode: runtime ----------------------------------------------------------------------

_UNSHARE = []


def unshare_works():
    """True when `unshare --pid --fork --mount-proc` may be used here (root, or a permissive kernel)."""
    if not _UNSHARE:
        try:
            ok = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=SHORT_TIMEOUT).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        _UNSHARE.append(ok)
    return _UNSHARE[0]


def children_of(pid):
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        st = oxmgr.DRIVER.read_stats(int(name))
        if st is not None and st.ppid == pid:
            out.append(st)
    return out


SPAWN_ORPHANS = """
    import os, time
    for i in range(100):
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(0.05 + (i % 10) * 0.02)
                os._exit(0)
            os._exit(0)
    time.sleep(0.05)
    print("spawned 100", flush=True)
"""

POLITE = """
    import os, signal, sys, time
    def bye(signum, frame):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("ready", os.getpid(), flush=True)
    while True:
        time.sleep(60)
"""


class RuntimeRun:
    """One `oxmgr runtime` process under test, as PID 1 (unshare) or as a subreaper."""

    def __init__(self, case, args, pid1, env=None):
        argv = [sys.executable, OXMGR_PY, "runtime"] + list(args)
        if pid1:
            argv = ["unshare", "--pid", "--fork", "--mount-proc"] + argv
        self.pid1 = pid1
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        case.addCleanup(self.kill)
        self.out = LineReader(self.proc.stdout)
        self.lines = []

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()

    @property
    def pid(self):
        """The runtime's own pid (as the host sees it)."""
        if not self.pid1:
            return self.proc.pid
        return wait_until(lambda: next((st.pid for st in children_of(self.proc.pid)), None), message="PID 1")

    def expect(self, text):
        """Read stdout until a line containing text; return that line."""
        while True:
            line = self.out.next_line()
            self.lines.append(line)
            if text in line:
                return line

    def expect_all(self, *texts):
        """Read stdout until each text has appeared on some line, in any order."""
        missing = set(texts)
        while missing:
            line = self.expect("")
            missing = {t for t in missing if t not in line}

    def finish(self):
        """Wait for the exit; return (exit code, stderr)."""
        self.proc.wait(LONG_TIMEOUT)
        rest = self.proc.stdout.read().decode(errors="replace")
        self.lines += rest.splitlines()
        return self.proc.returncode, self.proc.stderr.read().decode(errors="replace")


class RuntimeCases:
    """The runtime's duties; run as a subreaper and as PID 1 by the two classes below."""

    pid1 = False

    def setUp(self):
        if self.pid1 and not unshare_works():
            self.skipTest("unshare --pid is not permitted here")
        super().setUp()
        self.marker = f"OXMGR_HOME={self.home_dir}"
        self.addCleanup(self.no_leftovers)

    def no_leftovers(self):
        leaked = {pid: cmdline(pid) for pid in pids_with_env(self.marker)}
        kill_pids(leaked)
        if leaked:
            raise AssertionError(f"processes leaked by the runtime: {leaked}")

    def oxfile(self, text):
        path = os.path.join(self.tmp, "oxfile.toml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def app(self, name, code, extra=""):
        return f"[[apps]]\nname = {name!r}\ncommand = {oxmgr._toml_string(python_child(code))}\n{extra}\n"

    def run_rt(self, *args):
        return RuntimeRun(self, args, self.pid1)

    def test_every_zombie_is_reaped(self):
        """An app that leaves 100 orphaned grandchildren behind: none of them stays a zombie."""
        rt = self.run_rt(self.oxfile(self.app("server", READY_THEN_SLEEP) + self.app("spawner", SPAWN_ORPHANS)))
        rt.expect("spawner | spawned 100")
        pid = rt.pid

        def clean():
            kids = children_of(pid)
            return not any(st.state == "Z" for st in kids) and len(kids) == 1  # only the server is left
        self.assertTrue(wait_until(clean, message="orphans reaped"))
        os.kill(pid, signal.SIGTERM)
        code, err = rt.finish()
        self.assertEqual(code, 0, err)

    def test_exit_codes_and_signal_deaths(self):
        for command, expected in [("exit 0", 0), ("exit 3", 3), ("exit 126", 126), ("exit 255", 255),
                                  ("kill -9 $$", 137), ("kill -SEGV $$", 139),
                                  ("(sleep 600 &); exit 3", 3)]:  # a group member outlives the app: tini's exit
            with self.subTest(command=command):
                rt = self.run_rt("-q", "--", "sh", "-c", command)
                code, err = rt.finish()
                self.assertEqual(code, expected, err)

    def test_sigterm_stops_every_app_then_exits(self):
        """SIGTERM: each app gets its stop signal, a stubborn one is killed after its timeout, nothing survives."""
        rt = self.run_rt(self.oxfile(self.app("polite", POLITE) + self.app("stubborn", IGNORE_SIGTERM,
                                                                             "stop_timeout_secs = 0.5")
                                     + self.app("server", READY_THEN_SLEEP)))
        rt.expect_all("polite   | ready", "stubborn | ready", "server   | ready")
        os.kill(rt.pid, signal.SIGTERM)
        code, err = rt.finish()
        self.assertEqual(code, 0, err)
        self.assertIn("polite   | got SIGTERM", rt.lines)
        self.assertIn("stubborn: stopping -> stopped (killed after stop_timeout)", err)
        self.assertIn("exit code 0", err)

    def test_signals_are_forwarded(self):
        rt = self.run_rt("--", sys.executable, "-S", "-c", textwrap.dedent(PRINT_SIGNALS))
        rt.expect("ready")
        for sig in (signal.SIGUSR1, signal.SIGHUP):
            os.kill(rt.pid, sig)
            rt.expect(f"got {signal.Signals(sig).name}")
        os.kill(rt.pid, signal.SIGTERM)
        code, _ = rt.finish()
        self.assertEqual(code, 128 + signal.SIGTERM)  # one app: its own exit, as tini reports it

    def test_one_shot_job_does_not_end_the_run(self):
        rt = self.run_rt(self.oxfile(self.app("job", "print('job done', flush=True)")
                                     + self.app("server", READY_THEN_SLEEP)))
        rt.expect_all("job    | job done", "server | ready")
        listing = wait_until(lambda: (lambda ps: ps if ps["job"] == "stopped" else None)(
            {p["name"]: p["status"] for p in oxmgr.request(self.home, "list")["processes"]}), message="job stopped")
        self.assertEqual(listing, {"job": "stopped", "server": "running"})  # answered from inside
        self.assertIsNone(rt.proc.poll())
        self.assertIn("server", self.cli_ok("status", "server"))
        os.kill(rt.pid, signal.SIGTERM)
        self.assertEqual(rt.finish()[0], 0)

    def test_output_lines_arrive_whole_with_prefixes(self):
        talker = """
            import sys
            name = sys.argv[1]
            for i in range(3000):
                sys.stdout.write(f"{name}:{i}:" + "x" * (i % 700) + "\\n")
            sys.stdout.write("END\\n")
        """
        path = self.oxfile("".join(
            f"[[apps]]\nname = {n!r}\ncommand = {oxmgr._toml_string(python_child(talker) + ' ' + n)}\n"
            for n in ("alpha", "beta")) + "[[apps]]\nname = 'keep'\ncommand = 'sleep 60'\n")
        rt = self.run_rt(path)
        seen = {"alpha": [], "beta": []}
        while any(not lines or lines[-1] != "END" for lines in seen.values()):
            line = rt.out.next_line()
            label, sep, text = line.partition(" | ")
            self.assertTrue(sep, line)
            seen[label.strip()].append(text)
        for name, lines in seen.items():
            self.assertEqual(lines, [f"{name}:{i}:" + "x" * (i % 700) for i in range(3000)] + ["END"])
        os.kill(rt.pid, signal.SIGTERM)
        rt.finish()

    def test_a_shared_stdout_and_stderr_pipe_is_given_back_blocking(self):
        """2>&1 into a pipe: the runtime writes it non-blocking, and leaves it as it found it."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        argv = [sys.executable, OXMGR_PY, "runtime", "--", sys.executable, "-S", "-c", "print('hi')"]
        proc = subprocess.Popen(argv, stdout=w, stderr=w)
        self.assertEqual(proc.wait(LONG_TIMEOUT), 0)
        self.assertTrue(os.get_blocking(w))
        self.assertIn(b"| hi", os.read(r, 65536))

    def test_a_cron_app_that_finished_waits_for_its_next_run(self):
        rt = self.run_rt(self.oxfile(self.app("nightly", "print('run', flush=True)",
                                              "cron_restart = '*/2 * * * * *'")))
        rt.expect("nightly | run")
        rt.expect("nightly | run")  # the run did not end when it exited
        os.kill(rt.pid, signal.SIGTERM)
        self.assertIn(rt.finish()[0], (0, 128 + signal.SIGTERM))  # its own exit: between runs, or stopped

    def test_children_get_clean_signal_state(self):
        rt = self.run_rt("--", "sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status")
        code, err = rt.finish()
        self.assertEqual(code, 0, err)
        self.assertIn("sh | SigBlk:\t0000000000000000", rt.lines)
        self.assertIn("sh | SigIgn:\t0000000000000000", rt.lines)

    def test_a_failed_app_stops_the_rest(self):
        path = self.oxfile(self.app("bad", EXIT_WITH(3), "restart_policy = 'on_failure'\nmax_restarts = 1")
                           + self.app("server", READY_THEN_SLEEP))
        rt = self.run_rt(path)
        code, err = rt.finish()
        self.assertEqual(code, 3, err)
        self.assertIn("bad errored", err)
        rt = self.run_rt("--on-error", "continue", path)
        rt.expect("server | ready")
        wait_until(lambda: {p["name"]: p["status"] for p in oxmgr.request(self.home, "list")["processes"]}["bad"]
                   == "errored", message="bad errored")
        self.assertIsNone(rt.proc.poll())
        os.kill(rt.pid, signal.SIGTERM)
        self.assertEqual(rt.finish()[0], 0)


@POSIX_ONLY
class TestRuntimeSubreaper(RuntimeCases, HomeTestCase):
    """The runtime as a child subreaper, without a PID namespace."""

    def test_exit_code_sweep_0_to_255(self):
        """Every exit code 0..255 comes out unchanged (forks of this process: no interpreter start-up)."""
        for code in range(256):
            pid = os.fork()
            if pid == 0:  # the child runs the runtime and exits with its code
                try:
                    with open(os.devnull, "w") as null:
                        os.dup2(null.fileno(), 1)
                        os.dup2(null.fileno(), 2)
                    os._exit(oxmgr.main(["runtime", "-q", "--", "sh", "-c", f"exit {code}"]))
                finally:
                    os._exit(99)
            _, status = os.waitpid(pid, 0)
            self.assertEqual(oxmgr.decode_wait_status(status), (code, None))

    def test_exit_code_from_json_and_log_files(self):
        path = self.oxfile(self.app("job", "print('done', flush=True)") + self.app("server", POLITE))
        rt = self.run_rt("--exit-code-from", "server", "--json", "--log-files", path)
        first = json.loads(rt.out.next_line())
        self.assertTrue({"app", "stream", "line"} <= set(first))
        while True:
            item = json.loads(rt.out.next_line())
            if item["app"] == "server" and item["line"].startswith("ready"):
                break
        os.kill(rt.pid, signal.SIGTERM)
        code, err = rt.finish()
        self.assertEqual(code, 0, err)  # server's own exit: it handled SIGTERM and exited 0
        with open(self.home.log_path("job", "out")) as f:
            self.assertEqual(f.read(), "done\n")
        self.assertFalse(os.path.exists(self.home.state))  # a runtime keeps no state.json

    def test_forward_signals_rule_picks_the_app(self):
        path = self.oxfile(self.app("a", PRINT_SIGNALS, "forward_signals = ['SIGUSR2']")
                           + self.app("b", PRINT_SIGNALS))
        rt = self.run_rt(path)
        rt.expect_all("a | ready", "b | ready")
        os.kill(rt.pid, signal.SIGUSR2)
        self.assertEqual(rt.expect("got SIGUSR2"), "a | got SIGUSR2")
        os.kill(rt.pid, signal.SIGUSR1)
        self.assertEqual(rt.expect("got SIGUSR1"), "b | got SIGUSR1")
        os.kill(rt.pid, signal.SIGTERM)
        rt.finish()
        self.assertNotIn("b | got SIGUSR2", rt.lines)
        self.assertNotIn("a | got SIGUSR1", rt.lines)


@POSIX_ONLY
@unittest.skipUnless(sys.platform.startswith("linux"), "PID namespaces")
class TestRuntimePid1(RuntimeCases, HomeTestCase):
    """The same duties as PID 1 of a new PID namespace (unshare), as in a container."""
    pid1 = True


# -- reload with held sockets, scale, save/resurrect, boot services ---------------------------------

LISTEN_SERVER = os.path.join(HERE, "examples", "listen", "server.py")


def http_pid(port, timeout=SHORT_TIMEOUT):
    """GET / on a fresh connection; return the pid the server says it has."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        reply = conn.getresponse()
        body = reply.read().decode()
        if reply.status != 200 or not body.startswith("pid "):
            raise OSError(f"bad reply {reply.status}: {body!r}")
        return int(body.split()[1])
    finally:
        conn.close()


class LoadClient:
    """Requests in a loop on a thread, counting answers, failures and the pids that answered."""

    def __init__(self, port):
        import threading
        self.port = port
        self.ok = 0
        self.failures = []
        self.pids = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.pids.add(http_pid(self.port))
                self.ok += 1
            except OSError as exc:
                self.failures.append(repr(exc))

    def stop(self):
        self._stop.set()
        self._thread.join(LONG_TIMEOUT)


@POSIX_ONLY
class TestReload(DaemonTestCase):

    def start_web(self, port, *flags, instances="2"):
        self.cli_ok("start", f"{sys.executable} -S {LISTEN_SERVER}", "--name", "web", "--listen",
                    f"tcp://127.0.0.1:{port}", "-i", instances, "--wait-ready", "--stop-timeout", "10", *flags)
        return {self.info(f"web-{i}")["pid"] for i in range(int(instances))}

    def test_reload_under_load_fails_no_request(self):
        """2 instances behind a held socket, 2,000+ requests, 10 reloads: no failure, every pid replaced."""
        port = free_port()
        first = self.start_web(port)
        client = LoadClient(port)
        self.addCleanup(client.stop)
        for _ in range(10):
            self.cli_ok("reload", "web")
        wait_until(lambda: client.ok >= 2000, LONG_TIMEOUT, "2,000 requests")
        client.stop()
        self.assertEqual(client.failures, [])
        now = {self.info(f"web-{i}")["pid"] for i in range(2)}
        self.assertFalse(now & first, "every pid has changed")
        self.assertGreaterEqual(len(client.pids), 2 + 10 * 2 - 1)  # requests were answered across the reloads
        self.assertEqual(self.info("web-0")["restart_count"], 10)

    def test_replacement_that_never_gets_ready_leaves_the_old_one_serving(self):
        port = free_port()
        broken = os.path.join(self.tmp, "broken")
        app = f"""
            import os, runpy, sys, time
            if os.path.exists({broken!r}):
                time.sleep(600)  # a bad deploy: it never says READY=1
            sys.argv = [{LISTEN_SERVER!r}]
            runpy.run_path({LISTEN_SERVER!r}, run_name="__main__")
        """
        self.cli_ok("start", python_child(app), "--name", "web", "--listen", f"tcp://127.0.0.1:{port}",
                    "-i", "2", "--wait-ready", "--ready-timeout", "0.5")
        before = {self.info(f"web-{i}")["pid"] for i in range(2)}
        open(broken, "w").close()
        code, _, err = self.cli("reload", "web")
        self.assertEqual(code, 1)
        self.assertIn("reload of 'web-0' failed: 'web-0' was not ready within 500ms", err)
        self.assertIn("the old process (pid", err)
        self.assertIn("keeps serving", err)
        self.assertEqual({self.info(f"web-{i}")["pid"] for i in range(2)}, before)
        self.assertEqual({self.info(f"web-{i}")["status"] for i in range(2)}, {"running"})
        answered = {http_pid(port) for _ in range(40)}
        self.assertTrue(answered <= before and answered, answered)
        alive = {p: cmdline(p) for p in pids_with_env(self.marker) if p != self.daemon.pid}
        self.assertEqual(sorted(alive), sorted(before), alive)  # the replacement is gone, the old two remain

    def test_reload_without_readiness_waits_min_uptime_and_rolls_back_a_crash(self):
        self.start_app("plain", READY_THEN_SLEEP, "--min-uptime", "0.2")
        old = self.wait_ready_pid("plain")
        self.assertIn("reloaded plain", self.cli_ok("reload", "plain"))
        new = self.wait_ready_pid("plain")
        self.assertNotEqual(new, old)
        self.assertFalse(oxmgr.DRIVER.process_running(old))
        # a replacement that dies at once: the running one stays
        flag = os.path.join(self.tmp, "die")
        code = f"import os, sys, time\nif os.path.exists({flag!r}): sys.exit(9)\n" \
               f"print('ready', os.getpid(), flush=True)\ntime.sleep(600)\n"
        self.start_app("fragile", code, "--min-uptime", "0.5")
        keep = self.wait_ready_pid("fragile")
        open(flag, "w").close()
        rc, _, err = self.cli("reload", "fragile")
        self.assertEqual(rc, 1)
        self.assertIn("the replacement exited with code 9 within min_uptime", err)
        self.assertEqual(self.info("fragile")["pid"], keep)

    def test_scale_grows_and_shrinks_on_the_same_port(self):
        port = free_port()
        self.start_web(port)
        self.assertIn("scaled web to 4 (+2, -0)", self.cli_ok("scale", "web", "4"))
        pids = {self.info(f"web-{i}")["pid"] for i in range(4)}
        self.assertEqual(len(pids), 4)
        seen = set()
        wait_until(lambda: seen.add(http_pid(port)) or seen == pids, LONG_TIMEOUT, "all 4 answer on one port")
        self.assertIn("scaled web to 1 (+0, -3)", self.cli_ok("scale", "web", "1"))
        names = [p["name"] for p in json.loads(self.cli_ok("list", "--json"))]
        self.assertEqual(names, ["web-0"])
        only = self.info("web-0")["pid"]
        self.assertEqual({http_pid(port) for _ in range(10)}, {only})
        self.start_app("single", READY_THEN_SLEEP)
        self.cli_ok("scale", "single", "2")
        self.assertEqual(sorted(p["name"] for p in json.loads(self.cli_ok("list", "--json"))),
                         ["single-0", "single-1", "web-0"])

    def test_scale_of_a_single_app_keeps_it_running_and_its_log(self):
        """web becomes web-0 of a group: the same process, its pipe intact, its old lines under web-0."""
        ticker = """
            import os, sys, time
            print("ready", os.getpid(), flush=True)
            n = 0
            while True:
                n += 1
                print("tick", n, flush=True)
                time.sleep(0.02)
        """
        self.start_app("web", ticker)
        pid = self.wait_ready_pid("web")
        self.assertIn("scaled web to 2 (+1, -0)", self.cli_ok("scale", "web", "2"))
        self.assertEqual((self.info("web-0")["pid"], self.info("web-0")["restart_count"]), (pid, 0))
        self.assertFalse(os.path.exists(self.home.log_path("web", "out")))
        logged = self.cli_ok("logs", "web-0", "--lines", "100000")
        self.assertIn(f"ready {pid}", logged)  # the lines from before the rename
        before = logged.count("tick")
        self.wait(lambda: self.cli_ok("logs", "web-0", "--lines", "100000").count("tick") > before + 3,
                  "web-0 still writing to its pipe")
        self.assertEqual((self.info("web-0")["pid"], self.info("web-0")["status"]), (pid, "running"))

    def test_apply_reloads_a_changed_app_on_held_sockets(self):
        port = free_port()
        path = os.path.join(self.tmp, "oxfile.toml")

        def write(label):
            with open(path, "w") as f:
                command = oxmgr._toml_string(sys.executable + " -S " + LISTEN_SERVER)
                f.write(f"[[apps]]\nname = 'web'\ncommand = {command}\n"
                        f"instances = 2\nlisten = ['tcp://127.0.0.1:{port}']\nwait_ready = true\n"
                        f"[apps.env]\nLABEL = '{label}'\n")
        write("one")
        self.cli_ok("apply", path)
        before = {self.info(f"web-{i}")["pid"] for i in range(2)}
        write("two")
        out = self.cli_ok("apply", path)
        self.assertIn("reloaded  web-0", out)
        self.assertIn("reloaded  web-1", out)
        self.assertFalse(before & {self.info(f"web-{i}")["pid"] for i in range(2)})

    def test_unix_socket_is_held_too(self):
        path = os.path.join(self.tmp, "app.sock")
        self.cli_ok("start", f"{sys.executable} -S {LISTEN_SERVER}", "--name", "unixweb", "--listen",
                    f"unix:{path}", "--wait-ready")
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(SHORT_TIMEOUT)
            s.connect(path)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        self.assertIn(f"pid {self.info('unixweb')['pid']}".encode(), reply)
        self.cli_ok("delete", "unixweb")
        self.assertFalse(os.path.exists(path))  # the last user is gone: the socket is closed and removed

    @unittest.skipUnless(HAVE_NODE, "node is not installed")
    def test_node_example_on_held_socket(self):
        port = free_port()
        self.cli_ok("start", "node " + os.path.join(HERE, "examples", "listen", "server.js"), "--name", "nodeweb",
                    "--listen", f"tcp://127.0.0.1:{port}", "-i", "2", "--min-uptime", "0.3")
        # start answers once the instances are checked; the second may still be spawning.
        pids = self.wait(lambda: (lambda p: p if None not in p else None)(
            {self.info(f"nodeweb-{i}")["pid"] for i in range(2)}), "both instances spawned")
        for name in ("nodeweb-0", "nodeweb-1"):  # both listen (which one gets a connection is the kernel's call)
            self.wait_log(name, f"serving on fd 3 as pid {self.info(name)['pid']}", timeout=LONG_TIMEOUT)
        self.assertIn(http_pid(port), pids)
        self.cli_ok("reload", "nodeweb")
        self.assertFalse(pids & {self.info(f"nodeweb-{i}")["pid"] for i in range(2)})
        self.assertIn(http_pid(port), {self.info(f"nodeweb-{i}")["pid"] for i in range(2)})


@POSIX_ONLY
class TestSaveResurrect(DaemonTestCase):

    def test_save_daemon_stop_resurrect(self):
        """save, daemon stop, a fresh state, resurrect: the same apps with the same config run again."""
        self.start_app("alpha", READY_THEN_SLEEP, "--restart", "always", "--env", "K=v", "--namespace", "ns")
        self.start_app("beta", READY_THEN_SLEEP, "--max-restarts", "3", "--stop-timeout", "2")
        self.start_app("idle", READY_THEN_SLEEP)
        self.cli_ok("stop", "idle")
        specs = {n: oxmgr.request(self.home, "status", targets=[n])["processes"][0] for n in ("alpha", "beta")}
        self.assertIn("saved 3 apps", self.cli_ok("save"))
        self.assertEqual(stat.S_IMODE(os.stat(self.home.dump).st_mode), 0o600)
        self.cli_ok("daemon", "stop")
        for path in (self.home.state, self.home.state_backup):
            os.unlink(path)  # a new machine, or a wiped home: only dump.json is left
        out = self.cli_ok("resurrect")
        self.assertIn("resurrected alpha", out)
        self.assertNotIn("resurrected idle", out)
        for name in ("alpha", "beta"):
            self.wait_ready_pid(name)
            info = self.info(name)
            for key in ("command", "namespace", "restart_policy", "max_restarts", "stop_timeout_ms", "env_keys", "cwd"):
                self.assertEqual(info[key], specs[name][key], key)
        self.assertEqual(self.info("idle")["status"], "stopped")
        with open(self.home.log_path("alpha", "out")) as f:
            self.assertIn("ready", f.read())

    def test_resurrect_without_a_dump(self):
        code, _, err = self.cli("resurrect")
        self.assertEqual(code, 1)
        self.assertIn("nothing to resurrect", err)
        self.assertIn("run 'oxmgr save' first", err)


class TestBootServices(HomeTestCase):

    def definition(self, system_wide):
        return oxmgr.ServiceDefinition(self.home, path="/usr/local/bin:/usr/bin:/opt/node 20/bin:/srv/100%",
                                       system_wide=system_wide)

    @unittest.skipUnless(oxmgr._which("systemd-analyze"), "systemd-analyze is not installed")
    def test_systemd_unit_passes_verify_without_a_warning(self):
        for system_wide in (True, False):
            with self.subTest(system_wide=system_wide):
                unit = self.definition(system_wide).systemd_unit()
                path = os.path.join(self.tmp, "oxmgr.service")
                with open(path, "w") as f:
                    f.write(unit)
                result = subprocess.run(["systemd-analyze", "verify", path], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, universal_newlines=True, timeout=LONG_TIMEOUT)
                self.assertEqual((result.returncode, result.stdout), (0, ""))
                self.assertIn('Environment="PATH=/usr/local/bin:/usr/bin:/opt/node 20/bin:/srv/100%%"', unit)
                self.assertIn(f'Environment="OXMGR_HOME={self.home.root}"', unit)
                self.assertIn("KillMode=mixed", unit)
                self.assertIn("Restart=always", unit)
                self.assertIn("Type=notify", unit)
                self.assertIn(f'"{sys.executable}" "-S" "{OXMGR_PY}" "daemon" "run"', unit)
                self.assertIn("multi-user.target" if system_wide else "default.target", unit)

    def test_launchd_plist_and_task_scheduler_xml_parse(self):
        import plistlib
        import xml.etree.ElementTree as ET
        d = self.definition(False)
        plist = plistlib.loads(d.launchd_plist().encode())
        self.assertEqual(plist["ProgramArguments"], [sys.executable, "-S", OXMGR_PY, "daemon", "run"])
        self.assertEqual(plist["EnvironmentVariables"]["PATH"], "/usr/local/bin:/usr/bin:/opt/node 20/bin:/srv/100%")
        self.assertEqual(plist["EnvironmentVariables"]["OXMGR_HOME"], self.home.root)
        self.assertTrue(plist["RunAtLoad"] and plist["KeepAlive"])
        root = ET.fromstring(d.task_scheduler_xml().encode("utf-16"))
        ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
        arguments = root.find("t:Actions/t:Exec/t:Arguments", ns).text
        self.assertIn("OXMGR_HOME=" + self.home.root, arguments)
        self.assertIn(OXMGR_PY, arguments)
        self.assertIsNotNone(root.find("t:Triggers/t:LogonTrigger", ns))

    def test_startup_prints_and_service_installs_into_a_directory(self):
        out = self.cli_ok("startup", "--system", "systemd")
        self.assertIn("[Service]", out)
        self.assertIn("systemctl", out)
        self.assertIn("launchctl bootstrap", self.cli_ok("startup", "--system", "launchd"))
        target = os.path.join(self.tmp, "units")
        out = self.cli_ok("service", "install", "--system", "systemd", "--dir", target)
        unit = os.path.join(target, "oxmgr.service")
        self.assertIn(f"wrote {unit}", out)
        with open(unit) as f:
            self.assertIn("ExecStart=", f.read())
        code, out, _ = self.cli("service", "status", "--system", "systemd", "--dir", target)
        self.assertEqual(code, 0)
        self.assertIn("installed at", out)
        self.assertIn(f"removed {unit}", self.cli_ok("service", "uninstall", "--system", "systemd", "--dir", target))
        code, out, _ = self.cli("service", "status", "--system", "systemd", "--dir", target)
        self.assertEqual(code, 1)
        self.assertIn("not installed", out)

    def test_daemon_tells_systemd_it_is_ready(self):
        """Under Type=notify the daemon sends READY=1 once its socket accepts."""
        notify = os.path.join(self.tmp, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(notify)
            listener.settimeout(LONG_TIMEOUT)
            env = dict(os.environ, NOTIFY_SOCKET=notify)
            daemon = subprocess.Popen([sys.executable, OXMGR_PY, "daemon", "run"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.addCleanup(daemon.wait)
            self.addCleanup(lambda: daemon.poll() is None and daemon.send_signal(signal.SIGTERM))
            message = listener.recv(4096).decode()
            self.assertIn("READY=1", message)
            self.assertIn(f"MAINPID={daemon.pid}", message)
            self.assertTrue(oxmgr.request(self.home, "ping"))
            daemon.send_signal(signal.SIGTERM)
            self.assertIn("STOPPING=1", listener.recv(4096).decode())


@POSIX_ONLY
class TestLauncher(HomeTestCase):
    """`oxmgr.py install` writes a launcher that runs the file from cached bytecode."""

    def setUp(self):
        super().setUp()
        self.source = os.path.join(self.tmp, "src", "oxmgr.py")
        os.makedirs(os.path.dirname(self.source))
        with open(os.path.join(HERE, "oxmgr.py"), "rb") as f, open(self.source, "wb") as out:
            out.write(f.read())
        self.prefix = os.path.join(self.tmp, "prefix", "bin")
        self.launcher = os.path.join(self.prefix, "oxmgr")
        self.cache_dir = os.path.join(self.tmp, "prefix", "lib", "oxmgr")
        saved, sys.pycache_prefix = sys.pycache_prefix, self.cache_dir
        try:
            import importlib.util
            self.cache = importlib.util.cache_from_source(self.source)  # where the import system keeps it
        finally:
            sys.pycache_prefix = saved
        self.addCleanup(self.stop_daemon)

    def run_cmd(self, argv, code=0):
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                timeout=LONG_TIMEOUT)
        self.assertEqual(result.returncode, code, f"{argv}: {result.stdout}{result.stderr}")
        return result.stdout + result.stderr

    def stop_daemon(self):  # a no-op unless a test failed before its own `daemon stop`
        subprocess.run([sys.executable, "-S", self.source, "daemon", "stop"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=LONG_TIMEOUT)

    def test_install_runs_from_bytecode_refreshes_it_and_uninstall_removes_it(self):
        out = self.run_cmd([sys.executable, "-S", self.source, "install", "--prefix", self.prefix])
        self.assertIn(f"installed {self.launcher}", out)
        self.assertIn(f"add {self.prefix} to PATH", out)
        self.assertEqual(stat.S_IMODE(os.stat(self.launcher).st_mode), 0o755)
        with open(self.launcher) as f:
            self.assertEqual(f.readline(), f"#!{sys.executable} -S\n")
        cached = os.stat(self.cache).st_mtime_ns
        self.assertIn(f"oxmgr {oxmgr.__version__}", self.run_cmd([self.launcher, "--version"]))
        self.assertEqual(os.stat(self.cache).st_mtime_ns, cached)  # served from the cache, not recompiled

        with open(self.source, "a") as f:  # an edited file is picked up on the next call
            f.write('\n__version__ = "9.9.9-edited"\n')
        self.assertIn("oxmgr 9.9.9-edited", self.run_cmd([self.launcher, "--version"]))
        self.assertNotEqual(os.stat(self.cache).st_mtime_ns, cached)

        self.assertIn("no apps yet", self.run_cmd([self.launcher, "list"]))  # starts the daemon
        pid = json.loads(self.run_cmd([self.launcher, "daemon", "status", "--json"]))["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        self.assertEqual(argv[:3], [sys.executable.encode(), b"-E", b"-S"])
        self.assertIn(self.cache_dir.encode(), argv[4])  # the launcher's bytecode, not a second compile
        self.run_cmd([self.launcher, "daemon", "stop"])

        out = self.run_cmd([sys.executable, "-S", self.source, "uninstall", "--prefix", self.prefix])
        self.assertIn(f"removed {self.launcher}, {self.cache_dir}", out)
        self.assertFalse(os.path.exists(self.launcher))
        self.assertFalse(os.path.exists(self.cache_dir))
        self.assertIn("nothing to remove", self.run_cmd([sys.executable, "-S", self.source, "uninstall",
                                                         "--prefix", self.prefix]))

    def test_uninstall_leaves_a_file_it_did_not_write(self):
        os.makedirs(self.prefix)
        with open(self.launcher, "w") as f:
            f.write("#!/bin/sh\necho somebody else's oxmgr\n")
        out = self.run_cmd([sys.executable, "-S", self.source, "uninstall", "--prefix", self.prefix], code=1)
        self.assertIn(f"{self.launcher} was not written by oxmgr install", out)
        self.assertTrue(os.path.exists(self.launcher))


class TestExamples(HomeTestCase):

    def test_cli_walkthrough_runs_clean(self):
        """examples/cli-walkthrough.sh runs start to end and leaves nothing running."""
        env = dict(os.environ, PORT=str(free_port()), PYTHON=sys.executable)
        result = subprocess.run(["sh", os.path.join(HERE, "examples", "cli-walkthrough.sh")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                timeout=LONG_TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])
        self.assertRegex(result.stdout, r"0\s+web\s+default\s+running\s+\d+\s+\S+\s+1\s")  # restarted once
        self.assertIn("daemon stopped", result.stdout)
        leaked = pids_with_env(f"OXMGR_HOME={self.home_dir}")
        kill_pids(leaked)
        self.assertEqual(leaked, [])


class LineReader:
    """Read lines from a pipe with a deadline (select, no sleeping)."""

    def __init__(self, pipe, timeout=LONG_TIMEOUT):
        self.fd = pipe.fileno()
        self.buf = b""
        self.timeout = timeout

    def next_line(self):
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line within {self.timeout}s; have {self.buf[-200:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"stream ended; have {self.buf[-200:]!r}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


if __name__ == "__main__":
    unittest.main()
