#!/usr/bin/env python3
"""A stand-in model server for the scale-to-zero tests.

Switchyard's `process` scaler runs it as a child. It listens at once but
answers its readiness path (`GET /v1/models`) with 503 until
`--ready-delay-s` has passed, as a model server loading weights does. Each
start appends `<pid>` as a line to `--starts-file`, so a test can count
starts and find the process. Chat requests get a fixed answer after
`--chat-delay-s`, naming the pid, the request's arrival number (`seq`) and
how many requests were in progress when it arrived, itself included
(`concurrent`); with `"stream": true` the answer streams one chunk every
0.25 s for `--stream-s` seconds. Until `--generate-ready-delay-s` has
passed, POSTs answer 503 (the weights are still loading) while the GET
may already pass; each `/v1/completions` request appends
`completion max_tokens=<n>` to the starts file.

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
    parser.add_argument("--chat-delay-s", type=float, default=0.0)
    parser.add_argument("--generate-ready-delay-s", type=float, default=0.0)
    args = parser.parse_args()

    def record(line):
        with open(args.starts_file, "a", encoding="utf-8") as starts:
            starts.write(f"{line}\n")

    record(os.getpid())
    ready_at = time.monotonic() + args.ready_delay_s
    generates_at = time.monotonic() + args.generate_ready_delay_s
    lock = threading.Lock()
    counts = {"seq": 0, "in_progress": 0}

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
            if self.path == "/v1/completions":
                record(f"completion max_tokens={request.get('max_tokens')}")
            if time.monotonic() < generates_at:
                self.send_json(503, {"error": "weights loading"})
                return
            with lock:
                counts["seq"] += 1
                counts["in_progress"] += 1
                seq = counts["seq"]
                concurrent = counts["in_progress"]
            leave = threading.Event()

            def done():
                # Before the last byte goes out: the next request may
                # arrive as soon as the client has this one.
                if not leave.is_set():
                    leave.set()
                    with lock:
                        counts["in_progress"] -= 1

            try:
                self.answer(request, seq, concurrent, done)
            finally:
                done()

        def answer(self, request, seq, concurrent, done):
            time.sleep(args.chat_delay_s)
            if not request.get("stream"):
                content = f"pid {os.getpid()} seq {seq} concurrent {concurrent}"
                done()
                self.send_json(200, {
                    "id": "chatcmpl-scaled",
                    "object": "chat.completion",
                    "model": request.get("model", ""),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
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
