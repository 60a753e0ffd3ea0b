"""An agent whose state lives in process memory: each invocation adds one.

A session's turns all reach one sandbox, so they see one counter; another
session, or the same id after its sandbox was terminated, starts again at 1.
"""

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = int(time.time())
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
lock = threading.Lock()
count = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/ping":
            return self.send_json(404, {"error": "not found"})
        self.send_json(200, {"status": "Healthy", "time_of_last_update": STARTED})

    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/invocations":
            return self.send_json(404, {"error": "not found"})
        with lock:
            count += 1
            n = count
        self.send_json(200, {
            "count": n,
            "pid": os.getpid(),
            "session_id": self.headers.get(SESSION_HEADER),
        })


def main():
    host = "0.0.0.0" if os.environ.get("DOCKER_CONTAINER") == "1" else "127.0.0.1"
    server = ThreadingHTTPServer((host, int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
