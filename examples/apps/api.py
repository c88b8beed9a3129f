"""A stand-in API for the examples: one HTTP server per instance.

Instance N listens on PORT + N (INSTANCE_ID comes from the oxfile's instance_var).
"""
import http.server
import os

port = int(os.environ.get("PORT", "8080")) + int(os.environ.get("INSTANCE_ID", "0"))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"api instance {os.environ.get('INSTANCE_ID', '0')} pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(fmt % args, flush=True)


print(f"api listening on 127.0.0.1:{port} ({os.environ.get('LOG_LEVEL', 'info')})", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
