"""An agent that streams its answer as server-sent events.

The payload {"n": N, "delay": seconds} (defaults 5 and 0.2) asks for N events
`data: {"i": i}`, each flushed on its own with the delay between them, then
`data: {"done": true}`. The body is sent with chunked transfer encoding, one
chunk per event, so the connection stays usable afterwards.
"""

import json
import os
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = int(time.time())


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

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        if self.path != "/ping":
            return self.send_json(404, {"error": "not found"})
        self.send_json(200, {"status": "Healthy", "time_of_last_update": STARTED})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/invocations":
            return self.send_json(404, {"error": "not found"})
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        n = int(payload.get("n", 5))
        delay = float(payload.get("delay", 0.2))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(n):
            if i:
                time.sleep(delay)
            self.chunk(b"data: %s\n\n" % json.dumps({"i": i}).encode())
        self.chunk(b'data: {"done": true}\n\n')
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main():
    host = "0.0.0.0" if os.environ.get("DOCKER_CONTAINER") == "1" else "127.0.0.1"
    server = ThreadingHTTPServer((host, int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
