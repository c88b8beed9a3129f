"""Reload under load: why held sockets matter. Run by hand, never by the tests.

    python3 -S bench/reload.py [--requests 2000] [--reloads 10] [--pm2 /opt/bench/pm2/node_modules/.bin/pm2]

One HTTP app in 2 instances, a client loop of fresh connections over
loopback, and N reloads meanwhile. Three setups:

  held       oxmgr holds the port (listen), instances get it as fd 3
  reuseport  oxmgr, but each instance binds the port itself (SO_REUSEPORT)
  pm2        pm2 reload of the same self-binding app (fork mode)

Reported: requests answered, requests that failed (refused or reset), and
how many distinct pids answered. Failures are the point, not a test.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OXMGR_PY = os.path.join(ROOT, "oxmgr.py")
HELD_APP = os.path.join(ROOT, "examples", "listen", "server.py")

# The same server, binding its own port with SO_REUSEPORT (what an app does without held sockets).
REUSEPORT_APP = r'''
import http.server, os, signal, socket, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        body = f"pid {os.getpid()}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(http.server.HTTPServer):
    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()
server = S(("127.0.0.1", int(os.environ["PORT"])), H)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
print("ready", flush=True)
server.serve_forever(poll_interval=0.1)
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port):
        self.port, self.ok, self.failed, self.pids = port, 0, 0, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                body = conn.getresponse().read().decode()
                self.pids.add(body.split()[1])
                self.ok += 1
            except (OSError, http.client.HTTPException, IndexError):
                self.failed += 1
            finally:
                conn.close()


def wait_serving(port, deadline=20):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing serves on port {port}")


def drive(port, reload_once, reloads, requests):
    client = Client(port)
    for _ in range(reloads):
        reload_once()
    while client.ok + client.failed < requests:
        time.sleep(0.05)
    client.stop.set()
    client.thread.join()
    return client


def run_oxmgr(held, reloads, requests):
    home = tempfile.mkdtemp(prefix="oxrl")
    env = dict(os.environ, OXMGR_HOME=home)
    ox = [sys.executable, "-S", OXMGR_PY]
    port = free_port()
    try:
        if held:
            cmd = ["start", f"{sys.executable} -S {HELD_APP}", "--listen", f"tcp://127.0.0.1:{port}", "--wait-ready"]
        else:
            script = os.path.join(home, "app.py")
            os.makedirs(home, exist_ok=True)
            with open(script, "w") as f:
                f.write(REUSEPORT_APP)
            cmd = ["start", f"{sys.executable} -S {script}", "--env", f"PORT={port}", "--min-uptime", "0.5"]
        subprocess.run(ox + cmd + ["--name", "web", "-i", "2", "--stop-timeout", "10"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wait_serving(port)
        return drive(port, lambda: subprocess.run(ox + ["reload", "web"], env=env, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL), reloads, requests)
    finally:
        subprocess.run(ox + ["daemon", "stop"], env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)


def run_pm2(pm2, reloads, requests):
    home = tempfile.mkdtemp(prefix="pm2rl")
    env = dict(os.environ, PM2_HOME=home)
    port = free_port()
    script = os.path.join(home, "app.py")
    with open(script, "w") as f:
        f.write(REUSEPORT_APP)
    eco = os.path.join(home, "ecosystem.config.json")
    with open(eco, "w") as f:
        json.dump({"apps": [{"name": "web", "script": script, "interpreter": sys.executable, "instances": 2,
                             "exec_mode": "fork", "env": {"PORT": str(port)}, "kill_timeout": 10000}]}, f)
    try:
        subprocess.run([pm2, "start", eco], env=env, check=True, stdout=subprocess.DEVNULL)
        wait_serving(port)
        return drive(port, lambda: subprocess.run([pm2, "reload", "web"], env=env, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL), reloads, requests)
    finally:
        subprocess.run([pm2, "kill"], env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--pm2", help="path to a pm2 binary to compare with")
    args = ap.parse_args()
    rows = [("oxmgr, held socket", run_oxmgr(True, args.reloads, args.requests)),
            ("oxmgr, app binds with SO_REUSEPORT", run_oxmgr(False, args.reloads, args.requests))]
    if args.pm2:
        rows.append(("pm2 reload (fork mode, SO_REUSEPORT)", run_pm2(args.pm2, args.reloads, args.requests)))
    print(f"2 instances, {args.reloads} reloads during at least {args.requests} requests (fresh connection each)")
    print("| setup | answered | failed | pids that answered |")
    print("|---|---|---|---|")
    for name, c in rows:
        print(f"| {name} | {c.ok} | {c.failed} | {len(c.pids)} |")


if __name__ == "__main__":
    main()
