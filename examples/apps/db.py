"""A stand-in database for the examples: accepts TCP connections on DB_PORT."""
import os
import socket

port = int(os.environ.get("DB_PORT", "5433"))
server = socket.create_server(("127.0.0.1", port))
print(f"db listening on 127.0.0.1:{port}", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(b"ok\n")
    conn.close()
