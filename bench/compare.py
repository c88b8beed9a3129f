"""oxmgr against pm2 and supervisord, side by side. Run by hand, never by the tests.

    python3 -S bench/compare.py [--quick] [--pm2 PM2] [--supervisor-bin DIR] [--apps 100] [--samples 15]
                                [--lines 10000000] [--log-runs 5] [--only oxmgr,pm2,supervisord]
                                [--figures boot,apps,node,logs] [--settle 2]

Get the other managers outside the repository (nothing here installs them):

    npm install --prefix /opt/bench/pm2 pm2               # then --pm2 /opt/bench/pm2/node_modules/.bin/pm2
    python3 -m venv /opt/bench/sv && /opt/bench/sv/bin/pip install supervisor
                                                          # then --supervisor-bin /opt/bench/sv/bin

Every manager gets the same workload: an idle TCP server (Python, and Node
for the latency figures) that answers each connection with its pid. Sampled
figures are taken manager by manager in turn, sample after sample, so drift
in the machine hits all of them alike. oxmgr is driven through the launcher
`oxmgr.py install` writes (bytecode, `python3 -S`). Each manager runs in its
own temporary home, and at the end every process carrying this run's marker
variable is killed by pid.

Figures:
  boot            spawn of the daemon process until its control socket accepts
  rss             daemon RSS at rest, with 25 and with N apps (Python fixture)
  start each      N apps, one CLI call each (supervisord: a file plus `supervisorctl update`)
  start config    N apps from one config file, until the command returns
  list            list latency with N apps (oxmgr list, pm2 ls, supervisorctl status)
  restart         restart command until the app's port answers from a new pid
  crash           SIGKILL of the app until its port answers from a new pid,
                  beside the fixture's own cold start (spawn until it answers)
  logs            lines/s from one chatty app, from the app's own start until its last
                  line is in the log file, and lines lost (the app writes numbered lines
                  10,000 per write, as a buffered logger does, far faster than any manager
                  can store them, so the figure is the manager's)
"""

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
OXMGR_PY = os.path.join(os.path.dirname(HERE), "oxmgr.py")
PY = sys.executable
MARK = "OXBENCH_RUN"
RUN_ID = uuid.uuid4().hex

PY_FIXTURE = r"""
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
pid = str(os.getpid()).encode()
while True:
    c, _ = s.accept()
    c.sendall(pid)
    c.close()
"""
NODE_FIXTURE = r"""
const net = require("net");
net.createServer((c) => c.end(String(process.pid))).listen(Number(process.env.PORT), "127.0.0.1");
"""
# Numbered lines, written 10,000 per write as a buffered logger does. The block is
# built once and only its leading digits are replaced, so the app writes as fast as
# the disk takes it (~48M lines/s here, straight to a file) and the figure is the
# manager's, not Python's formatting (a print() per line runs at ~0.5M lines/s).
SPEW_FIXTURE = r"""
import os, time
n = int(os.environ["LINES"])
with open(os.environ["STAMP"], "w") as f:  # the clock starts when the app does
    f.write(repr(time.time()))
block = b"".join(b"line #####%04d\n" % i for i in range(10000))
out = os.fdopen(1, "wb", buffering=0)
for k in range(n // 10000):
    out.write(block.replace(b"#####", b"%05d" % k))
out.write(b"".join(b"line %09d\n" % i for i in range(n - n % 10000, n)))
"""


# -- helpers -------------------------------------------------------------------------


def run(argv, env, check=True, timeout=600):
    r = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed ({r.returncode}): {r.stderr[-500:]}")
    return r


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ask_pid(port, timeout=0.5):
    """Connect and return the pid the fixture sends, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            data = c.recv(64)
        return int(data) if data else None
    except (OSError, ValueError):
        return None


def wait_new_pid(port, old, deadline):
    while time.monotonic() < deadline:
        pid = ask_pid(port)
        if pid and pid != old:
            return True
    return False


def wait_socket(path, deadline):
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return True
        except OSError:
            time.sleep(0.0005)
        finally:
            s.close()
    return False


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def kill_marked():
    """Kill every process this run started (they all carry the marker variable)."""
    needle = f"{MARK}={RUN_ID}".encode()
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(name), signal.SIGKILL)
                    killed += 1
        except OSError:
            pass
    return killed


def stats(values):
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


# -- managers --------------------------------------------------------------------------


class Manager:
    name = "?"

    def __init__(self, root, fixtures):
        self.root = tempfile.mkdtemp(prefix=f"{self.name}-", dir=root)
        self.fixtures = fixtures
        self.env = dict(os.environ)
        self.env[MARK] = RUN_ID
        self.daemon = None

    def fixture_command(self, kind):
        return {"py": [PY, "-S", self.fixtures["py"]], "node": ["node", self.fixtures["node"]],
                "spew": [PY, "-S", self.fixtures["spew"]]}[kind]

    def boot(self):
        """Start a fresh daemon; return seconds from spawn until its socket accepts."""
        self.reset()
        t0 = time.perf_counter()
        self.daemon = self.spawn_daemon()
        if not wait_socket(self.socket_path, time.monotonic() + 30):
            raise RuntimeError(f"{self.name}: daemon did not come up")
        elapsed = time.perf_counter() - t0
        self.wait_settled()
        return elapsed

    def wait_settled(self):
        pass

    def shutdown(self):
        self.stop_daemon()
        if self.daemon is not None:
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
            self.daemon = None


class Oxmgr(Manager):
    name = "oxmgr"

    def __init__(self, root, fixtures):
        super().__init__(root, fixtures)
        self.env["OXMGR_HOME"] = os.path.join(self.root, "home")
        # oxmgr rotates at 20 MB by default and keeps 5 files; keep them all so the
        # log figure counts every line (the other managers here do not rotate)
        self.env["OXMGR_LOG_MAX_FILES"] = "1000"
        self.bin = os.path.join(self.root, "bin", "oxmgr")
        run([PY, "-S", OXMGR_PY, "install", "--prefix", os.path.dirname(self.bin)], self.env)
        self.cli = [self.bin]

    @property
    def socket_path(self):
        return os.path.join(self.env["OXMGR_HOME"], "daemon.sock")

    def reset(self):
        shutil.rmtree(self.env["OXMGR_HOME"], ignore_errors=True)
        os.makedirs(self.env["OXMGR_HOME"], mode=0o700)

    def spawn_daemon(self):
        log = open(os.path.join(self.root, "daemon.out"), "ab")
        return subprocess.Popen(self.cli + ["daemon", "run"], env=self.env, stdout=log, stderr=log,
                                start_new_session=True)

    def daemon_pid(self):
        return self.daemon.pid

    def stop_daemon(self):
        run(self.cli + ["daemon", "stop"], self.env, check=False)

    def start_one(self, name, kind, port):
        run(self.cli + ["start", " ".join(self.fixture_command(kind)), "--name", name, "--env", f"PORT={port}",
                        "--restart", "always"], self.env)

    def start_config(self, apps):
        path = os.path.join(self.root, "oxfile.toml")
        with open(path, "w") as f:
            f.write("version = 1\n")
            for name, kind, port in apps:
                f.write(f'[[apps]]\nname = "{name}"\ncommand = "{" ".join(self.fixture_command(kind))}"\n'
                        f'restart_policy = "always"\n[apps.env]\nPORT = "{port}"\n')
        run(self.cli + ["start", path], self.env)

    def list(self):
        run(self.cli + ["list"], self.env)

    def restart(self, name):
        run(self.cli + ["restart", name], self.env)

    def app_pid(self, name):
        return json.loads(run(self.cli + ["status", name, "--json"], self.env).stdout)["pid"]

    def start_spew(self, lines, stamp):
        env = dict(self.env, LINES=str(lines), STAMP=stamp)
        run(self.cli + ["start", " ".join(self.fixture_command("spew")), "--name", "spew", "--restart", "never"],
            env)
        return os.path.join(self.env["OXMGR_HOME"], "logs", "spew.out.log")


class Pm2(Manager):
    name = "pm2"

    def __init__(self, root, fixtures, pm2):
        super().__init__(root, fixtures)
        self.pm2 = pm2
        self.env["PM2_HOME"] = os.path.join(self.root, "home")
        self.daemon_js = os.path.join(os.path.dirname(os.path.realpath(pm2)), "..", "lib", "Daemon.js")
        if not os.path.exists(self.daemon_js):
            self.daemon_js = os.path.join(os.path.dirname(os.path.realpath(pm2)), "..", "pm2", "lib", "Daemon.js")

    @property
    def socket_path(self):
        return os.path.join(self.env["PM2_HOME"], "rpc.sock")

    def reset(self):
        shutil.rmtree(self.env["PM2_HOME"], ignore_errors=True)
        os.makedirs(self.env["PM2_HOME"])

    def spawn_daemon(self):
        log = open(os.path.join(self.root, "daemon.out"), "ab")
        return subprocess.Popen(["node", self.daemon_js], env=dict(self.env, SILENT="true"), stdout=log, stderr=log,
                                start_new_session=True)

    def wait_settled(self):
        run([self.pm2, "ping"], self.env)

    def daemon_pid(self):
        return self.daemon.pid

    def stop_daemon(self):
        run([self.pm2, "kill"], self.env, check=False)

    def _start_args(self, kind):
        cmd = self.fixture_command(kind)
        if kind == "node":
            return [cmd[1]]
        return [cmd[-1], "--interpreter", PY, "--interpreter-args", "-S"]

    def start_one(self, name, kind, port):
        run([self.pm2, "start"] + self._start_args(kind) + ["--name", name], dict(self.env, PORT=str(port)))

    def start_config(self, apps):
        path = os.path.join(self.root, "ecosystem.config.json")
        entries = []
        for name, kind, port in apps:
            cmd = self.fixture_command(kind)
            entries.append({"name": name, "script": cmd[-1], "interpreter": cmd[0] if kind != "node" else "node",
                            "interpreter_args": "-S" if kind != "node" else "", "env": {"PORT": str(port)}})
        with open(path, "w") as f:
            json.dump({"apps": entries}, f)
        run([self.pm2, "start", path], self.env)

    def list(self):
        run([self.pm2, "ls"], self.env)

    def restart(self, name):
        run([self.pm2, "restart", name], self.env)

    def app_pid(self, name):
        for app in json.loads(run([self.pm2, "jlist"], self.env).stdout):
            if app["name"] == name:
                return app["pid"]
        return None

    def start_spew(self, lines, stamp):
        path = os.path.join(self.root, "spew.out.log")
        run([self.pm2, "start", self.fixtures["spew"], "--interpreter", PY, "--interpreter-args", "-S", "--name",
             "spew", "--no-autorestart", "-o", path], dict(self.env, LINES=str(lines), STAMP=stamp))
        return path


class Supervisord(Manager):
    name = "supervisord"

    def __init__(self, root, fixtures, bindir):
        super().__init__(root, fixtures)
        self.bindir = bindir
        self.conf = os.path.join(self.root, "supervisord.conf")
        self.confd = os.path.join(self.root, "conf.d")

    @property
    def socket_path(self):
        return os.path.join(self.root, "supervisor.sock")

    def reset(self):
        shutil.rmtree(self.confd, ignore_errors=True)
        os.makedirs(self.confd)
        with open(self.conf, "w") as f:
            f.write(f"[unix_http_server]\nfile={self.socket_path}\n\n"
                    f"[supervisord]\nlogfile={self.root}/supervisord.log\npidfile={self.root}/supervisord.pid\n"
                    f"childlogdir={self.root}\nnodaemon=true\n\n"
                    "[rpcinterface:supervisor]\n"
                    "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
                    f"[supervisorctl]\nserverurl=unix://{self.socket_path}\n\n"
                    f"[include]\nfiles = {self.confd}/*.conf\n")

    def ctl(self, *args, check=True):
        return run([os.path.join(self.bindir, "supervisorctl"), "-c", self.conf] + list(args), self.env, check=check)

    def spawn_daemon(self):
        log = open(os.path.join(self.root, "daemon.out"), "ab")
        return subprocess.Popen([os.path.join(self.bindir, "supervisord"), "-c", self.conf], env=self.env,
                                stdout=log, stderr=log, start_new_session=True)

    def daemon_pid(self):
        return self.daemon.pid

    def stop_daemon(self):
        self.ctl("shutdown", check=False)

    def _program(self, name, kind, port, extra=""):
        return (f"[program:{name}]\ncommand={' '.join(self.fixture_command(kind))}\nenvironment=PORT=\"{port}\"\n"
                f"autostart=true\nautorestart=true\nstartsecs=0\n{extra}\n")

    def start_one(self, name, kind, port):
        with open(os.path.join(self.confd, f"{name}.conf"), "w") as f:
            f.write(self._program(name, kind, port))
        self.ctl("update")

    def start_config(self, apps):
        with open(os.path.join(self.confd, "all.conf"), "w") as f:
            for name, kind, port in apps:
                f.write(self._program(name, kind, port))
        self.ctl("update")

    def list(self):
        self.ctl("status", check=False)  # exits 3 when a program is not running

    def restart(self, name):
        self.ctl("restart", name)

    def app_pid(self, name):
        out = self.ctl("pid", name).stdout.strip()
        return int(out) if out.isdigit() else None

    def start_spew(self, lines, stamp):
        path = os.path.join(self.root, "spew.out.log")
        with open(os.path.join(self.confd, "spew.conf"), "w") as f:
            f.write(f"[program:spew]\ncommand={' '.join(self.fixture_command('spew'))}\n"
                    f"environment=LINES=\"{lines}\",STAMP=\"{stamp}\"\nautostart=true\nautorestart=false\nstartsecs=0\n"
                    f"stdout_logfile={path}\nstdout_logfile_maxbytes=0\n")
        self.ctl("update")
        return path


# -- figures ----------------------------------------------------------------------------


def fixture_cold_start(fixtures, kind):
    """Spawn the fixture directly; seconds until it answers on its port (taken between crash samples)."""
    port = free_ports(1)[0]
    argv = {"py": [PY, "-S", fixtures["py"]], "node": ["node", fixtures["node"]]}[kind]
    env = dict(os.environ, PORT=str(port))
    env[MARK] = RUN_ID
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env)
    while ask_pid(port, 0.2) is None:
        pass
    elapsed = time.perf_counter() - t0
    p.kill()
    p.wait()
    return elapsed


def measure(managers, args, fixtures):
    results = {m.name: {} for m in managers}
    results["_fixture"] = {}
    figures = args.figures.split(",")
    for group, fn in (("boot", measure_boot), ("apps", measure_apps), ("node", measure_node),
                      ("logs", measure_logs)):
        if group in figures:
            fn(managers, args, results)
    if "logs" in figures:
        results["_fixture"]["direct"] = fixture_direct_log(fixtures, args)
    return results


def measure_boot(managers, args, results):
    """Boot until the control socket accepts, interleaved."""
    for _ in range(args.samples):
        for m in managers:
            results[m.name].setdefault("boot", []).append(m.boot())
            m.shutdown()


def measure_apps(managers, args, results):
    """RSS at rest, start one by one up to 25 (RSS), then to N; then a fresh start from one
    config file, and list, restart and crash with N apps loaded. Each manager has its own
    ports: they all run at once for the latency figures."""
    n = args.apps
    ports = free_ports(n * len(managers))
    apps_of = {m.name: [(f"f{i}", "py", ports[j * n + i]) for i in range(n)] for j, m in enumerate(managers)}
    for m in managers:
        apps = apps_of[m.name]
        m.boot()
        time.sleep(args.settle)
        results[m.name]["rss_rest"] = rss_mib(m.daemon_pid())
        t0 = time.perf_counter()
        for i, (name, kind, port) in enumerate(apps):
            m.start_one(name, kind, port)
            if i == 24:
                time.sleep(args.settle)
                results[m.name]["rss_25"] = rss_mib(m.daemon_pid())
                t0 += args.settle
        results[m.name]["start_each"] = time.perf_counter() - t0
        time.sleep(args.settle + 1)
        results[m.name]["rss_n"] = rss_mib(m.daemon_pid())
        m.shutdown()
        kill_marked_apps(m)
    for m in managers:
        apps = apps_of[m.name]
        m.boot()
        t0 = time.perf_counter()
        m.start_config(apps)
        results[m.name]["start_config"] = time.perf_counter() - t0
        deadline = time.monotonic() + 120
        for _, _, port in apps:  # all up before the latency figures
            while ask_pid(port) is None and time.monotonic() < deadline:
                time.sleep(0.01)
    # list, restart and crash with N apps loaded, interleaved
    for _ in range(args.samples):
        for m in managers:
            t0 = time.perf_counter()
            m.list()
            results[m.name].setdefault("list", []).append(time.perf_counter() - t0)
    for i in range(args.samples):
        for m in managers:
            name, _, port = apps_of[m.name][i % n]
            old = ask_pid(port)
            t0 = time.perf_counter()
            m.restart(name)
            ok = wait_new_pid(port, old, time.monotonic() + 30)
            results[m.name].setdefault("restart", []).append(time.perf_counter() - t0 if ok else float("nan"))
    sample_crashes(managers, args, results, "crash", "py", lambda m, i: apps_of[m.name][(i + 7) % n][2])
    for m in managers:
        m.shutdown()
        kill_marked_apps(m)


def sample_crashes(managers, args, results, key, kind, port_for):
    """SIGKILL an app until its port answers from a new pid, manager after manager, with a
    cold start of the same fixture after each round (the target is relative to it)."""
    up_since = {}
    for i in range(args.samples):
        for m in managers:
            port = port_for(m, i)
            # Let the app count as stable (min uptime 1 s in all three), so no crash-loop
            # rule or backoff kicks in when one manager is measured alone.
            time.sleep(max(0.0, up_since.get(port, 0.0) + 1.1 - time.monotonic()))
            old = ask_pid(port)
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            ok = wait_new_pid(port, old, time.monotonic() + 30)
            results[m.name].setdefault(key, []).append(time.perf_counter() - t0 if ok else float("nan"))
            up_since[port] = time.monotonic()
        results["_fixture"].setdefault(kind, []).append(fixture_cold_start(managers[0].fixtures, kind))


def measure_node(managers, args, results):
    """Crash -> TCP ready with the Node fixture, one app per manager."""
    if shutil.which("node"):
        port_of = {}
        for m in managers:
            m.boot()
            port_of[m.name] = free_ports(1)[0]
            m.start_one("nodeapp", "node", port_of[m.name])
            deadline = time.monotonic() + 30
            while ask_pid(port_of[m.name]) is None and time.monotonic() < deadline:
                time.sleep(0.01)
        sample_crashes(managers, args, results, "crash_node", "node", lambda m, i: port_of[m.name])
        for m in managers:
            m.shutdown()
            kill_marked_apps(m)


def measure_logs(managers, args, results):
    """One chatty app per run: lines/s from the app's own start until its last line is in
    the log file, and lines lost. Runs are interleaved; the median is reported."""
    last = ("line %09d" % (args.lines - 1)).encode()
    for _ in range(args.log_runs):
        for m in managers:
            m.boot()
            stamp = os.path.join(m.root, "spew.stamp")
            if os.path.exists(stamp):
                os.unlink(stamp)
            path = m.start_spew(args.lines, stamp)
            deadline = time.monotonic() + 300
            done = False
            while time.monotonic() < deadline and not done:
                try:
                    with open(path, "rb") as f:
                        f.seek(max(0, os.path.getsize(path) - 200))
                        done = last in f.read()
                except OSError:
                    pass
                if not done:
                    time.sleep(0.001)
            finished = time.time()
            seen = set()
            try:
                for rotated in [path] + glob.glob(glob.escape(path) + ".*"):
                    with open(rotated, "rb") as f:
                        for line in f:
                            if line.startswith(b"line "):
                                seen.add(line)
                with open(stamp) as f:
                    began = float(f.read())
            except (OSError, ValueError):
                began = None
            rate = len(seen) / (finished - began) if done and began else float("nan")
            results[m.name].setdefault("log_rate", []).append(rate)
            results[m.name]["log_lost"] = max(results[m.name].get("log_lost", 0), args.lines - len(seen))
            m.shutdown()
            kill_marked_apps(m)
            for p in (path, stamp):
                if os.path.exists(p):
                    os.unlink(p)


def fixture_direct_log(fixtures, args):
    """The chatty app alone, stdout straight to a file: the most any manager can store."""
    rates = []
    root = os.path.dirname(fixtures["spew"])
    path, stamp = os.path.join(root, "direct.log"), os.path.join(root, "direct.stamp")
    for _ in range(args.log_runs):
        with open(path, "wb") as out:
            subprocess.run([PY, "-S", fixtures["spew"]], stdout=out, check=True,
                           env=dict(os.environ, LINES=str(args.lines), STAMP=stamp))
        finished = time.time()
        with open(stamp) as f:
            rates.append(args.lines / (finished - float(f.read())))
        os.unlink(path)
    return rates


def kill_marked_apps(manager):
    """Apps a manager left behind after its daemon stopped (supervisord stops its own; pm2 kill too)."""
    time.sleep(0.2)
    kill_marked()


def report(results, args, names):
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    rows = []

    def sampled(key, label, target=""):
        if not any(key in results[name] for name in names):
            return
        cells = []
        pm2 = stats(results["pm2"][key])[0] if "pm2" in results and key in results["pm2"] else None
        for name in names:
            values = [v for v in results[name].get(key, []) if v == v]
            if not values:
                cells.append("-")
                continue
            med, p95 = stats(values)
            cells.append(f"{ms(med)} (p95 {ms(p95)})")
        ox = stats(results["oxmgr"][key])[0]
        rows.append((label, cells, f"{ox / pm2:.2f}x" if pm2 else "-", target))

    def single(key, label, fmt, target=""):
        if not any(key in results[name] for name in names):
            return
        cells = [fmt(results[name].get(key)) if results[name].get(key) is not None else "-" for name in names]
        ox, pm2 = results["oxmgr"].get(key), results.get("pm2", {}).get(key)
        ratio = f"{ox / pm2:.2f}x" if ox and pm2 else "-"
        rows.append((label, cells, ratio, target))

    # Targets re-based when the daemon moved to asyncio (issue 10): ~30 ms and 4-7 MiB accepted.
    sampled("boot", "boot -> control socket accepts", "<= 0.2x")
    single("rss_rest", "daemon RSS at rest", lambda v: f"{v:.1f} MiB", "<= 0.3x")
    if args.apps != 25:
        single("rss_25", "daemon RSS, 25 apps", lambda v: f"{v:.1f} MiB")
    single("rss_n", f"daemon RSS, {args.apps} apps", lambda v: f"{v:.1f} MiB", "<= 0.25x")
    single("start_each", f"start {args.apps}, one CLI call each", lambda v: f"{v:.2f} s", "<= 0.15x")
    single("start_config", f"start {args.apps} from one config file", lambda v: f"{v:.2f} s", "<= 0.1x")
    sampled("list", f"list with {args.apps} apps", "<= 0.2x")
    sampled("restart", "restart -> TCP ready (Python fixture)", "<= 0.25x")
    fixture = results["_fixture"]

    def crash_target(kind):
        if not fixture.get(kind):
            return ""
        cold = stats(fixture[kind])[0]
        return f"<= {ms(cold + 0.006)} (its cold start {ms(cold)} + 6 ms)"

    sampled("crash", "crash (SIGKILL) -> TCP ready (Python fixture)", crash_target("py"))
    sampled("crash_node", "crash (SIGKILL) -> TCP ready (Node fixture)", crash_target("node"))
    for name in names:  # runs -> their median
        rates = [v for v in results[name].get("log_rate", []) if v == v]
        if "log_rate" in results[name]:
            results[name]["log_rate"] = statistics.median(rates) if rates else None
    single("log_rate", "log throughput, one chatty app", lambda v: f"{v:,.0f} lines/s", ">= 5x pm2")
    single("log_lost", "log lines lost", lambda v: f"{v}", "0")
    print(f"| figure | {' | '.join(names)} | oxmgr / pm2 | target |")
    print("|---|" + "---|" * len(names) + "---|---|")
    for label, cells, ratio, target in rows:
        print(f"| {label} | {' | '.join(cells)} | {ratio} | {target} |")
    direct = fixture.pop("direct", None)
    if direct:
        print(f"\nchatty app alone, stdout straight to a file: {statistics.median(direct):,.0f} lines/s "
              f"(median of {len(direct)}; no manager can store faster)")
    for kind, values in fixture.items():
        med, p95 = stats(values)
        print(f"\nfixture cold start ({kind}, spawned directly, sampled between the crash samples): "
              f"{ms(med)} median, {ms(p95)} p95")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer apps, samples and lines: under 2 minutes")
    ap.add_argument("--pm2", default=shutil.which("pm2") or "/opt/bench/pm2/node_modules/.bin/pm2")
    ap.add_argument("--supervisor-bin", default="/opt/bench/sv/bin")
    ap.add_argument("--apps", type=int, default=100)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--lines", type=int, default=10_000_000, help="lines the chatty app writes (15 bytes each)")
    ap.add_argument("--log-runs", type=int, default=5, help="chatty-app runs per manager (median reported)")
    ap.add_argument("--only", default="oxmgr,pm2,supervisord")
    ap.add_argument("--figures", default="boot,apps,node,logs", help="groups to measure (default: all)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds a daemon settles before its RSS is read")
    args = ap.parse_args()
    if args.quick:
        args.apps, args.samples, args.lines, args.log_runs, args.settle = 25, 5, 4_000_000, 3, 1.0
    root = tempfile.mkdtemp(prefix="oxcompare")
    fixtures = {}
    for kind, text in (("py", PY_FIXTURE), ("node", NODE_FIXTURE), ("spew", SPEW_FIXTURE)):
        fixtures[kind] = os.path.join(root, f"fixture_{kind}.{'js' if kind == 'node' else 'py'}")
        with open(fixtures[kind], "w") as f:
            f.write(text)
    wanted = args.only.split(",")
    managers = [Oxmgr(root, fixtures)]
    if "pm2" in wanted and os.path.exists(args.pm2):
        managers.append(Pm2(root, fixtures, args.pm2))
    if "supervisord" in wanted and os.path.exists(os.path.join(args.supervisor_bin, "supervisord")):
        managers.append(Supervisord(root, fixtures, args.supervisor_bin))
    versions = [f"Python {sys.version.split()[0]} ({PY} -S)"]
    if any(m.name == "pm2" for m in managers):
        # `pm2 --version` starts a God daemon: give it the run's marker so the clean-up kills it
        env = dict(os.environ, PM2_HOME=os.path.join(root, "pm2-version"), **{MARK: RUN_ID})
        versions.append("pm2 " + run([args.pm2, "--version"], env).stdout.strip()
                        .splitlines()[-1] + ", node " + run(["node", "--version"], os.environ).stdout.strip())
    if any(m.name == "supervisord" for m in managers):
        versions.append("supervisord " + run([os.path.join(args.supervisor_bin, "supervisord"), "--version"],
                                             os.environ).stdout.strip())
    t0 = time.monotonic()
    try:
        results = measure(managers, args, fixtures)
    finally:
        for m in managers:
            try:
                m.shutdown()
            except Exception:  # noqa: BLE001  (cleanup must go on)
                pass
        killed = kill_marked()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{os.cpu_count()} cores; {'; '.join(versions)}; {args.apps} apps, {args.samples} samples, "
          f"{args.lines:,} log lines x {args.log_runs} runs; {time.monotonic() - t0:.0f} s; "
          f"{killed} leftover processes killed\n")
    report(results, args, [m.name for m in managers])


if __name__ == "__main__":
    main()
