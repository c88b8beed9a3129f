"""Watching a 10,000-file tree: what it costs the daemon. Run by hand, never by the tests.

    python3 -S bench/watch.py [--files 10000] [--idle 20] [--pm2 /opt/bench/pm2/node_modules/.bin/pm2]

For oxmgr (and pm2 when --pm2 points at it): one idle app (`sleep`) watches
a generated tree. Reported: time for `start` to return (the watches are set
up by then), the daemon's CPU seconds over an idle window, its RSS, and the
time from touching a file to the app running again, minus the debounce.
Each manager runs in its own temporary home; everything is stopped at the end.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OXMGR_PY = os.path.join(os.path.dirname(HERE), "oxmgr.py")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def make_tree(root, files):
    per_dir = 25
    for i in range(files):
        d = os.path.join(root, f"pkg{i // (per_dir * 20)}", f"mod{(i // per_dir) % 20}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file{i}.js"), "w") as f:
            f.write("// x\n")


def run(argv, env):
    return subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def measure(pid, tree, idle, delay, changes, first, app_state):
    """Idle CPU and RSS of the daemon, then touch `changes` files (numbered from `first`) and
    time each until app_state() = (restart count, running) shows the restart, minus the debounce."""
    time.sleep(1)
    c0 = cpu_seconds(pid)
    time.sleep(idle)
    idle_cpu = cpu_seconds(pid) - c0
    latencies = []
    for i in range(changes):
        before = app_state()[0]
        target = os.path.join(tree, "pkg0", "mod0", f"file{first + i}.js")
        t0 = time.perf_counter()
        with open(target, "a") as f:
            f.write("// change\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            count, running = app_state()
            if count > before and running:
                break
        latencies.append(time.perf_counter() - t0 - delay)
    return {"idle_cpu_s": idle_cpu, "rss_mib": rss_mib(pid), "latency_s": latencies}


def bench_oxmgr(tree, idle, delay, changes):
    home = tempfile.mkdtemp(prefix="oxw")
    env = dict(os.environ, OXMGR_HOME=home)
    ox = [sys.executable, "-S", OXMGR_PY]
    try:
        run(ox + ["list"], env)
        pid = json.loads(run(ox + ["daemon", "status", "--json"], env).stdout)["pid"]
        t0 = time.perf_counter()
        r = run(ox + ["start", "sleep 1000000", "--name", "w", "--cwd", tree, "--watch",
                      "--watch-delay", str(delay)], env)
        setup = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr

        sys.path.insert(0, os.path.dirname(HERE))
        import oxmgr

        def app_state():  # asked over the socket from here: a CLI call per poll would be the figure
            info = oxmgr.request(oxmgr.Home(home), "status", targets=["w"])["processes"][0]
            return info["restart_count"], info["status"] == "running"
        return dict(measure(pid, tree, idle, delay, changes, 0, app_state), setup_s=setup)
    finally:
        run(ox + ["daemon", "stop"], env)
        shutil.rmtree(home, ignore_errors=True)


def bench_pm2(pm2, tree, idle, delay, changes):
    home = tempfile.mkdtemp(prefix="pm2w")
    env = dict(os.environ, PM2_HOME=home)
    try:
        run([pm2, "ping"], env)
        with open(os.path.join(home, "pm2.pid")) as f:
            pid = int(f.read())
        t0 = time.perf_counter()
        # pm2's --watch-delay is in seconds on the command line (ms in ecosystem files)
        r = run([pm2, "start", "sleep", "--name", "w", "--cwd", tree, "--watch", tree,
                 "--watch-delay", str(delay), "--", "1000000"], env)
        setup = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr

        def app_state():
            return json.loads(run([pm2, "jlist"], env).stdout)[0]["pm2_env"]["restart_time"], True
        return dict(measure(pid, tree, idle, delay, changes, 100, app_state), setup_s=setup)
    finally:
        run([pm2, "kill"], env)
        shutil.rmtree(home, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--delay", type=float, default=0.2, help="watch debounce (s)")
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--pm2", help="path to a pm2 binary to compare with")
    args = ap.parse_args()
    tree = tempfile.mkdtemp(prefix="oxtree")
    try:
        make_tree(tree, args.files)
        rows = [("oxmgr", bench_oxmgr(tree, args.idle, args.delay, args.changes))]
        if args.pm2:
            rows.append(("pm2", bench_pm2(args.pm2, tree, args.idle, args.delay, args.changes)))
        print(f"{args.files} files in {sum(len(d) for _, d, _ in os.walk(tree))} directories, "
              f"{args.idle:g} s idle, debounce {args.delay:g} s")
        print("| manager | start returns | daemon CPU while idle | daemon RSS | change -> running (minus debounce) |")
        print("|---|---|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['setup_s'] * 1000:.0f} ms | {r['idle_cpu_s']:.2f} s in {args.idle:g} s | "
                  f"{r['rss_mib']:.1f} MiB | median {statistics.median(r['latency_s']) * 1000:.0f} ms |")
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
