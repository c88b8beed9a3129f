"""`logs --lines N` of a huge log: how long it takes and whether the daemon answers meanwhile.

    python3 -S bench/logs_tail.py [--lines 1000000] [--oxmgr PATH] [--pm2 /opt/bench/pm2/node_modules/.bin/pm2]

One idle app whose log holds N lines (written straight into the file). A
client asks for the last N lines over the socket and reads every frame, while
another process (so the two do not share a GIL) pings the daemon every 10 ms; reported are the time for the whole
tail and the slowest ping meanwhile. --oxmgr runs another copy of oxmgr.py
(an older commit) in the same way, for comparison. With --pm2, `pm2 logs
--nostream --lines N` reads the same number of lines (pm2 tails in its CLI,
not its daemon, so only its time is comparable).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OXMGR_PY = os.path.join(os.path.dirname(HERE), "oxmgr.py")


PINGER = """
import select, socket, sys, time
def ping():
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sys.argv[1])
        s.sendall(b'{"op": "ping"}\\n')
        s.makefile("rb").readline()
    return time.perf_counter() - t0
ping()
print("up", flush=True)
worst = []
while not select.select([sys.stdin], [], [], 0.01)[0]:
    worst.append(ping())
print(" ".join(map(str, worst)))
"""


def bench_oxmgr(script, lines):
    home = tempfile.mkdtemp(prefix="oxlogs")
    env = dict(os.environ, OXMGR_HOME=home)
    py = [sys.executable, "-S"]
    try:
        subprocess.run(py + [script, "start", "sleep 100000", "--name", "big"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        with open(os.path.join(home, "logs", "big.out.log"), "w") as f:
            f.writelines(f"line {i:07d} of a log that has grown all week\n" for i in range(lines))
        sock_path = os.path.join(home, "daemon.sock")
        pinger = subprocess.Popen(py + ["-c", PINGER, sock_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  universal_newlines=True)
        pinger.stdout.readline()  # it has pinged once
        t0 = time.perf_counter()
        got = 0
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            s.sendall(json.dumps({"op": "logs", "targets": ["big"], "streams": ["out"], "lines": lines}).encode()
                      + b"\n")
            reader = s.makefile("rb")
            while True:
                frame = json.loads(reader.readline())
                if not frame.get("ok", True):
                    raise SystemExit(f"{script}: {frame['error']['message']}")
                got += len(frame["lines"])
                if not frame.get("more"):
                    break
        elapsed = time.perf_counter() - t0
        pings = [float(x) for x in pinger.communicate("")[0].split()]
        return elapsed, got, max(pings), len(pings)
    finally:
        subprocess.run(py + [script, "daemon", "stop"], env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)


def bench_pm2(pm2, lines):
    home = tempfile.mkdtemp(prefix="pm2logs")
    env = dict(os.environ, PM2_HOME=home)
    try:
        subprocess.run([pm2, "start", "sleep", "--name", "big", "--", "100000"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(home, "logs", "big-out.log"), "w") as f:
            f.writelines(f"line {i:07d} of a log that has grown all week\n" for i in range(lines))
        t0 = time.perf_counter()
        out = subprocess.run([pm2, "logs", "big", "--nostream", "--out", "--lines", str(lines), "--raw"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        return time.perf_counter() - t0, out.count(b"\n")
    finally:
        subprocess.run([pm2, "kill"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1000000)
    ap.add_argument("--oxmgr", action="append", default=[], help="another oxmgr.py to compare")
    ap.add_argument("--pm2")
    args = ap.parse_args()
    for script in [OXMGR_PY] + args.oxmgr:
        try:
            elapsed, got, worst, count = bench_oxmgr(script, args.lines)
        except (SystemExit, OSError, ValueError) as exc:
            print(f"{script}: failed: {exc}")
            continue
        print(f"{script}: {got} lines in {elapsed * 1000:.0f} ms ({got / elapsed / 1e6:.2f} M lines/s); "
              f"slowest of {count} pings meanwhile {worst * 1000:.1f} ms")
    if args.pm2:
        elapsed, got = bench_pm2(args.pm2, args.lines)
        print(f"pm2: {got} lines in {elapsed * 1000:.0f} ms")


if __name__ == "__main__":
    main()
