"""An agent that echoes each invocation back, for berth's tests.

Follows the AgentCore HTTP contract with the standard library only:
POST /invocations and GET /ping on port 8080.

Payload switches (when the body is a JSON object):
  "sleep": seconds  wait that long before answering (ordering and queue tests)
  "crash": true     exit with status 3 without answering (424 tests)
  "raw": true       answer with the exact request bytes and Content-Type
"""

import json
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = int(time.time())
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
REQUEST_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Request-Id"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status, obj):
        self.send(status, json.dumps(obj).encode())

    def do_GET(self):
        if self.path != "/ping":
            return self.send_json(404, {"error": "not found"})
        self.send_json(200, {"status": "Healthy", "time_of_last_update": STARTED})

    def do_POST(self):
        body = self.read_body()
        if self.path != "/invocations":
            return self.send_json(404, {"error": "not found"})
        try:
            payload = json.loads(body)
        except ValueError:
            payload = body.decode("utf-8", "replace")
        opts = payload if isinstance(payload, dict) else {}
        if opts.get("sleep"):
            time.sleep(float(opts["sleep"]))
        if opts.get("crash"):
            sys.stdout.flush()
            os._exit(3)
        if opts.get("raw"):
            ctype = self.headers.get("Content-Type", "application/octet-stream")
            return self.send(200, body, ctype)
        headers = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.send_json(200, {
            "echo": payload,
            "session_id": self.headers.get(SESSION_HEADER),
            "request_id": self.headers.get(REQUEST_HEADER),
            "headers": headers,
            "env": {k: os.environ.get(k) for k in ("DOCKER_CONTAINER", "AWS_REGION")},
            "pid": os.getpid(),
        })


def main():
    host = "0.0.0.0" if os.environ.get("DOCKER_CONTAINER") == "1" else "127.0.0.1"
    server = ThreadingHTTPServer((host, int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
