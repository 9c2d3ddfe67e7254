#!/usr/bin/env python3
"""Instructions per request through Switchyard without a policy and with
each given plugin, counted by valgrind's callgrind, with the ratios.

Instruction counts do not depend on what else the machine is doing, so
this measures the policy's cost where `cargo bench --bench throughput`
(requests per second, timed) is too noisy on a shared machine. Caches,
page faults and the kernel's share are not counted: it complements the
timed benchmark, it does not replace it.

For each configuration it starts the release `switchyard` binary under
callgrind with two pools on a stand-in upstream in this process, sends
warm-up requests, switches instrumentation on, sends the measured
requests over two keep-alive connections, switches it off and stops the
proxy. The policy's epoch thread wakes every tick (5 ms by default)
whatever the traffic, and callgrind stretches time about fifty-fold, so
its instructions (`recv_timeout`) are subtracted.

Usage: policy_instructions.py [--requests 1000] [--shape tiny|typical|long]
           [--keep-profiles DIR] [PLUGIN.wasm ...]
With --keep-profiles, each run's callgrind file is copied into DIR
(`no-policy.callgrind`, `<n>-<plugin>.callgrind`) for callgrind_annotate.
Plugins default to cost_router as each interface version builds it: the
0.4.0 core module (`target/wasm32-unknown-unknown/release/`), the 0.3.0
component (`target/wasm32-wasip2/release/`) and the 0.2.0 component in
`proxy/policy/tests/fixtures/v0.2/`. Each plugin
must send model `auto` to pool `small` or `large`. Needs valgrind and
`cargo build --release -p switchyard`.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "target" / "release" / "switchyard"
DEFAULT_PLUGINS = [
    ROOT / "target" / "wasm32-unknown-unknown" / "release" / "cost_router.wasm",
    ROOT / "target" / "wasm32-wasip2" / "release" / "cost_router.wasm",
    ROOT / "proxy" / "policy" / "tests" / "fixtures" / "v0.2" / "cost_router.wasm",
]
WARM_UP_REQUESTS = 300
READY_TIMEOUT_S = 300
# The function the policy's epoch thread waits in between ticks.
EPOCH_THREAD_WAIT = "Receiver<T>::recv_timeout"

ANSWER = json.dumps({
    "id": "bench", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()


class Upstream(BaseHTTPRequestHandler):
    """Answers every POST with one fixed chat completion, GET with a
    model list (the readiness probe)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, body):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(b'{"object":"list","data":[]}')

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.reply(ANSWER)


def request_of(shape):
    """(body, headers) of a chat request: `tiny` is one short message
    and no extra headers; `typical` four messages of about 1,500
    characters and the headers an SDK and a tracing layer add; `long`
    the same conversation carried on for 100 exchanges (about 48,000
    characters)."""
    if shape == "tiny":
        return [{"role": "user", "content": "how fast is this proxy"}], {}
    messages = [
        {"role": "system",
         "content": "You are a support assistant for a hosting company. " * 6},
        {"role": "user",
         "content": "My deploy fails with exit code 137 after the build. " * 5},
        {"role": "assistant",
         "content": "Exit code 137 means the process was killed. " * 5},
        {"role": "user",
         "content": "How much memory does the build step get by default?"},
    ]
    headers = {
        "user-agent": "OpenAI/Python 1.54.0",
        "accept": "application/json",
        "x-request-id": "3f2b8c1e-2d4a-4c7e-9a51-6b0f7d2e8a90",
        "traceparent":
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "x-tenant": "acme",
    }
    if shape == "long":
        messages = messages[:1] + messages[1:3] * 100 + messages[3:]
    return messages, headers


def send(port, count, model, shape):
    """Sends `count` chat requests over two keep-alive connections."""
    messages, headers = request_of(shape)
    body = json.dumps({"model": model, "messages": messages}).encode()
    headers = dict(headers, **{"content-type": "application/json"})
    failures = []

    def connection(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            conn.request("POST", "/v1/chat/completions", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)

    threads = [threading.Thread(target=connection, args=(count // 2,))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit(f"policy_instructions: {len(failures)} requests failed "
                 f"(first status {failures[0]})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(admin_port):
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", admin_port,
                                              timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit("policy_instructions: switchyard did not become ready")


def epoch_thread_instructions(out_file):
    """Inclusive instructions of the epoch thread's wait loop."""
    report = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(out_file)],
        check=True, stdout=subprocess.PIPE, text=True).stdout
    for line in report.splitlines():
        if EPOCH_THREAD_WAIT in line:
            return int(line.split()[0].replace(",", ""))
    return 0


def measure(workdir, upstream_port, plugin, args, name):
    """Instructions per request with `plugin` (None: no policy); `name`
    names the kept profile."""
    api, admin = free_port(), free_port()
    config = workdir / "switchyard.toml"
    pools = "".join(
        f'[[pool]]\nname = "{name}"\n'
        f'endpoints = ["http://127.0.0.1:{upstream_port}"]\nmodel = "m"\n'
        for name in ("small", "large"))
    policy = f'[policy]\nplugin = "{plugin}"\n' if plugin else ""
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{api}"\n'
        f'admin = "127.0.0.1:{admin}"\n{pools}{policy}')
    out_file = workdir / "callgrind.out"
    log = workdir / "valgrind.log"
    with open(log, "w") as log_file:
        proxy = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out_file}", str(BINARY), "run",
             "--config", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT,
            env=dict(os.environ, RUST_LOG="warn"))
    try:
        wait_ready(admin)
        model = "auto" if plugin else "small"
        send(api, WARM_UP_REQUESTS, model, args.shape)
        subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)],
                       check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        send(api, args.requests, model, args.shape)
        subprocess.run(["callgrind_control", "-i", "off", str(proxy.pid)],
                       check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait()
    total = 0
    for line in log.read_text().splitlines():
        if "Collected :" in line:
            total = int(line.split(":")[-1].strip())
    if total == 0:
        sys.exit(f"policy_instructions: no count in {log}")
    if args.keep_profiles:
        args.keep_profiles.mkdir(parents=True, exist_ok=True)
        shutil.copy(out_file, args.keep_profiles / f"{name}.callgrind")
    return (total - epoch_thread_instructions(out_file)) / args.requests


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--shape", choices=["tiny", "typical", "long"],
                   default="typical")
    p.add_argument("--keep-profiles", type=Path, metavar="DIR")
    p.add_argument("plugins", nargs="*", type=Path, default=DEFAULT_PLUGINS)
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            sys.exit(f"policy_instructions: {tool} is missing; install "
                     "valgrind")
    if not BINARY.exists():
        sys.exit("policy_instructions: run `cargo build --release -p "
                 "switchyard` first")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream_port = server.server_address[1]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        baseline = measure(workdir, upstream_port, None, args, "no-policy")
        print(f"\ninstructions per request, {args.shape} chat request, "
              f"{args.requests} measured")
        print(f"{'no policy':<60} {baseline:>9.0f}")
        for n, plugin in enumerate(args.plugins, start=1):
            cost = measure(workdir, upstream_port, plugin.resolve(), args,
                           f"{n}-{plugin.stem}")
            label = str(plugin.resolve().relative_to(ROOT)) \
                if plugin.resolve().is_relative_to(ROOT) else str(plugin)
            print(f"{label:<60} {cost:>9.0f}  x{cost / baseline:.3f}")
    server.shutdown()


if __name__ == "__main__":
    main()
