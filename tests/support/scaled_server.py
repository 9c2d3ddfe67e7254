#!/usr/bin/env python3
"""A stand-in model server for the scale-to-zero tests.

Switchyard's `process` scaler runs it as a child. It listens at once but
answers its readiness path (`GET /v1/models`) with 503 until
`--ready-delay-s` has passed, as a model server loading weights does. Each
start appends `<pid>` as a line to `--starts-file`, so a test can count
starts and find the process. Chat requests get a fixed answer; with
`"stream": true` the answer streams one chunk every 0.25 s for
`--stream-s` seconds.

Standard library only: it runs wherever python3 does. It exits when its
parent does, so a test whose Switchyard was killed leaves nothing behind.
"""

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-delay-s", type=float, default=0.0)
    parser.add_argument("--starts-file", required=True)
    parser.add_argument("--stream-s", type=float, default=1.0)
    args = parser.parse_args()

    with open(args.starts_file, "a", encoding="utf-8") as starts:
        starts.write(f"{os.getpid()}\n")
    ready_at = time.monotonic() + args.ready_delay_s

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *rest):
            pass

        def send_json(self, status, value):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if time.monotonic() < ready_at:
                self.send_json(503, {"error": "loading"})
                return
            self.send_json(200, {"object": "list", "data": [{"id": "big"}]})

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            if not request.get("stream"):
                self.send_json(200, {
                    "id": "chatcmpl-scaled",
                    "object": "chat.completion",
                    "model": request.get("model", ""),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": f"pid {os.getpid()}"},
                        "finish_reason": "stop",
                    }],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                })
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            end = time.monotonic() + args.stream_s
            n = 0
            while time.monotonic() < end:
                chunk = {"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": f"t{n} "}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                n += 1
                time.sleep(0.25)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    parent = os.getppid()

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()

    ThreadingHTTPServer.request_queue_size = 256
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"scaled_server listening on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
