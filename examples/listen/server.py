"""An HTTP server on a socket held by oxmgr: several instances, one port, reloads without a failed request.

    python3 oxmgr.py start "python3 examples/listen/server.py" --name web \
        --listen tcp://127.0.0.1:8000 --instances 2 --wait-ready
    curl http://127.0.0.1:8000/        # "pid 1234": which instance answered
    python3 oxmgr.py reload web        # one instance at a time; no request fails

oxmgr binds the port once and passes it to every instance as fd 3, with
systemd's LISTEN_FDS/LISTEN_PID variables, so the instances share its accept
queue and a reload's replacement takes connections the moment it is up.
gunicorn (--bind fd://3) and uvicorn (--fd 3) speak the same protocol.
"""

import http.server
import os
import signal
import socket
import sys
import threading


def held_socket():
    """The first socket oxmgr passed (fd 3), checked the way sd_listen_fds() does."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("no socket from oxmgr: start me with --listen tcp://HOST:PORT")
    sock = socket.socket(fileno=3)  # family and type come from the descriptor
    # Instances race for each connection; the losers must not block in accept().
    sock.setblocking(False)
    return sock


def notify(message):
    """sd_notify: tell oxmgr (or systemd) we are ready."""
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message, address)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive pinning to an old process

    def do_GET(self):
        body = f"pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = held_socket()
# SIGTERM (oxmgr's stop): finish the request in hand, accept no more, exit 0.
signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown).start())
notify(b"READY=1\nSTATUS=serving on fd 3")
print(f"serving on {server.socket.getsockname()} as pid {os.getpid()}", flush=True)
server.serve_forever(poll_interval=0.1)
