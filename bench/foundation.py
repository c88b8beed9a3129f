"""Foundation figures for oxmgr.py: run by hand, never by the tests.

    python3 -S bench/foundation.py [--apps 100] [--runs 15] [--respawns 300]

Measures, with the interpreter running this script started with -S (no site;
on some machines site adds ~20 ms and ~4 MiB to every process):

  rest RSS     daemon VmRSS after boot, no apps
  100-app RSS  daemon VmRSS with N idle apps (`sleep`), after metrics ticks
  boot         spawn -> control socket answers ping: the CLI's auto-start
               launcher (cached bytecode) and `python3 -S oxmgr.py daemon run`
  respawn      child exit -> replacement running: a C helper (gcc) writes a
               CLOCK_REALTIME stamp as its last act and its first act
  list         `python3 -S oxmgr.py list` wall time with N apps
  cli          `oxmgr list` through the launcher (5 apps) beside the interpreter's
               own start (`python3 -S -c pass`)

Every daemon gets a temporary OXMGR_HOME and is stopped at the end.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import oxmgr  # noqa: E402

OXMGR_PY = os.path.join(os.path.dirname(HERE), "oxmgr.py")
PY = [sys.executable, "-S"]

HELPER_C = r"""
#include <stdio.h>
#include <time.h>
int main(int argc, char **argv) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    FILE *f = fopen(argv[1], "a");
    fprintf(f, "start %ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);
    fflush(f);
    clock_gettime(CLOCK_REALTIME, &t);
    fprintf(f, "exit %ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);
    fclose(f);
    return 1;
}
"""


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def summary(values, unit="ms", scale=1000.0):
    return (f"median {statistics.median(values) * scale:.2f} {unit}, p95 {pct(values, 95) * scale:.2f} {unit}, "
            f"min {min(values) * scale:.2f} {unit} (n={len(values)})")


class World:
    """A temporary OXMGR_HOME with its own environment."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="oxbench")
        self.home = oxmgr.Home(os.path.join(self.dir, "home"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OXMGR_")}
        self.env["OXMGR_HOME"] = self.home.root

    def cli(self, *args, check=True):
        r = subprocess.run(PY + [OXMGR_PY] + list(args), env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True)
        if check and r.returncode != 0:
            raise SystemExit(f"oxmgr {' '.join(args)} failed: {r.stderr}")
        return r

    def ping(self):
        os.environ["OXMGR_HOME"] = self.home.root
        try:
            return oxmgr.request(self.home, "ping", timeout=5)
        finally:
            del os.environ["OXMGR_HOME"]

    def stop(self):
        self.cli("daemon", "stop", check=False)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_socket(path, deadline):
    """Poll connect() until the daemon answers; return when it has."""
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.sendall(b'{"op":"ping"}\n')
            if s.recv(4096):
                return True
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.0005)
    return False


def bench_boot(runs):
    out = {}
    for label in ("launcher", "script"):
        samples = []
        for _ in range(runs):
            w = World()
            try:
                w.home.ensure()
                os.environ["OXMGR_HOME"] = w.home.root
                oxmgr.warm_bytecode(oxmgr._bytecode_cache(w.home))  # warm, as for any start after the first
                del os.environ["OXMGR_HOME"]
                if label == "launcher":
                    argv = oxmgr.daemon_argv(w.home)
                else:
                    argv = PY + [OXMGR_PY, "daemon", "run"]
                log = open(w.home.daemon_log, "ab")
                t0 = time.perf_counter()
                proc = subprocess.Popen(argv, env=w.env, stdout=log, stderr=log, start_new_session=True)
                ok = wait_socket(w.home.sock, time.monotonic() + 10)
                samples.append(time.perf_counter() - t0)
                log.close()
                if not ok:
                    raise SystemExit("daemon did not come up")
                w.stop()
                proc.wait(10)
            finally:
                w.close()
        out[label] = samples
    return out


def bench_rss_and_list(apps, runs):
    w = World()
    try:
        w.cli("daemon", "status", check=False)
        w.cli("list")
        pid = w.ping()["pid"]
        time.sleep(3)  # a few ticks: metrics, timers
        rest = rss_kib(pid)
        specs = [{"name": f"idle{i}", "command": "sleep 1000000", "cwd": w.dir} for i in range(apps)]
        os.environ["OXMGR_HOME"] = w.home.root
        try:
            oxmgr.request(w.home, "start", timeout=120, apps=specs, env=w.env)
        finally:
            del os.environ["OXMGR_HOME"]
        time.sleep(6)  # three metric samples of all apps
        loaded = rss_kib(pid)
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            r = w.cli("list")
            samples.append(time.perf_counter() - t0)
            assert r.stdout.count("running") == apps, r.stdout[-500:]
        json_samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            r = w.cli("list", "--json")
            json_samples.append(time.perf_counter() - t0)
            assert len(json.loads(r.stdout)) == apps
        return rest, loaded, samples, json_samples
    finally:
        w.close()


def bench_respawn(count):
    if not shutil.which("gcc"):
        return None
    w = World()
    try:
        exe = os.path.join(w.dir, "stamp")
        src = exe + ".c"
        with open(src, "w") as f:
            f.write(HELPER_C)
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        stamps = os.path.join(w.dir, "stamps.txt")
        w.cli("start", f"{exe} {stamps}", "--name", "flap", "--restart", "always", "--min-uptime", "0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(stamps) as f:
                if f.read().count("start") > count:
                    break
            time.sleep(0.05)
        w.cli("stop", "flap")
        with open(stamps) as f:
            rows = [line.split() for line in f]
        gaps = []
        last_exit = None
        for kind, value in rows:
            if kind == "exit":
                last_exit = float(value)
            elif last_exit is not None:
                gaps.append(float(value) - last_exit)
        return gaps
    finally:
        w.close()


def bench_cli(runs):
    """`oxmgr list` through the launcher, beside a bare interpreter start."""
    w = World()
    try:
        prefix = os.path.join(w.dir, "prefix", "bin")
        subprocess.run(PY + [OXMGR_PY, "install", "--prefix", prefix], env=w.env, check=True,
                       stdout=subprocess.DEVNULL)
        launcher = os.path.join(prefix, "oxmgr")
        for i in range(5):
            subprocess.run([launcher, "start", "sleep 1000000", "--name", f"s{i}"], env=w.env, check=True,
                           stdout=subprocess.DEVNULL)

        bare, listed = [], []
        for _ in range(runs):  # interleaved, so drift in the machine hits both alike
            for argv, samples in ((PY + ["-c", "pass"], bare), ([launcher, "list"], listed)):
                t0 = time.perf_counter()
                subprocess.run(argv, env=w.env, check=True, stdout=subprocess.DEVNULL)
                samples.append(time.perf_counter() - t0)
        subprocess.run([launcher, "daemon", "stop"], env=w.env, stdout=subprocess.DEVNULL)
        return bare, listed
    finally:
        w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apps", type=int, default=100)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--respawns", type=int, default=300)
    args = ap.parse_args()
    print(f"oxmgr {oxmgr.__version__}, Python {sys.version.split()[0]} ({sys.executable} -S), "
          f"{os.cpu_count()} cores, PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}")
    boot = bench_boot(args.runs)
    print(f"boot -> first request answered, the CLI's auto-start: {summary(boot['launcher'])}")
    print(f"boot -> first request answered, python3 -S oxmgr.py daemon run: {summary(boot['script'])}")
    rest, loaded, lists, json_lists = bench_rss_and_list(args.apps, args.runs)
    print(f"daemon RSS at rest: {rest / 1024:.1f} MiB; with {args.apps} idle apps: {loaded / 1024:.1f} MiB")
    print(f"python3 -S oxmgr.py list, {args.apps} apps: {summary(lists)}")
    print(f"python3 -S oxmgr.py list --json, {args.apps} apps: {summary(json_lists)}")
    bare, listed = bench_cli(args.runs * 2)
    print(f"interpreter start, python3 -S -c pass: {summary(bare)}")
    print(f"oxmgr list through the launcher, 5 apps: {summary(listed)}")
    gaps = bench_respawn(args.respawns)
    if gaps:
        print(f"child exit -> replacement running: {summary(gaps)}")
    else:
        print("child exit -> replacement running: skipped (no gcc)")


if __name__ == "__main__":
    main()
