#!/usr/bin/env python3
"""Control-plane benchmark, driven by bench/control-plane.sh.

1. Propagation: three gateway nodes on one etcd. CHANGES times, a route's
   mocked answer is changed by a write to etcd (its v3 JSON gateway, as
   APISIX writes); the time from just before the write to the moment every
   node serves the new answer is recorded. Prints p50, p99 and max.
2. Rebuild at ROUTES routes while traffic flows: one node on the embedded
   store holding ROUTES routes; wrk loads one route while WRITES Admin API
   writes each make the node validate and compile the whole configuration.
   Prints the reload times the node logs (elapsed_ms), the Admin API write
   latency, and wrk's latency with and without the writes.

Everything listens on 127.0.0.1 ports picked free; stdlib only.
"""

import base64
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.environ["TURNPIKE_BIN"]
CHANGES = int(os.environ.get("CHANGES", "200"))
ROUTES = int(os.environ.get("ROUTES", "10000"))
WRITES = int(os.environ.get("WRITES", "20"))
WRK_SECONDS = int(os.environ.get("WRK_SECONDS", "10"))
KEY = "bench-key"
TMP = tempfile.mkdtemp(prefix="turnpike-cp-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Node:
    """A turnpike process on its own ports."""

    def __init__(self, name, provider, resources=""):
        self.port, self.status, self.admin = free_port(), free_port(), free_port()
        self.config = os.path.join(TMP, f"{name}.yaml")
        self.log = os.path.join(TMP, f"{name}.log")
        with open(self.config, "w") as f:
            f.write(
                f'gateway:\n  listen: ["127.0.0.1:{self.port}"]\n'
                f'  status: {{listen: "127.0.0.1:{self.status}"}}\n'
                f'  admin: {{listen: "127.0.0.1:{self.admin}", key: {KEY}}}\n'
                f"  workers: 1\n  log_level: info\n{provider}{resources}"
            )
        self.proc = subprocess.Popen(
            [BIN, "run", "-c", self.config], stdout=open(self.log, "w"), stderr=subprocess.STDOUT
        )
        wait_port(self.port, name, 120)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port)

    def get(self, path):
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.status, r.read()

    def admin_put(self, path, body):
        c = http.client.HTTPConnection("127.0.0.1", self.admin)
        c.request("PUT", path, json.dumps(body), {"X-API-KEY": KEY})
        r = c.getresponse()
        r.read()
        return r.status

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def mock(uri, text):
    return {
        "uri": uri,
        "plugins": {"mocking": {"response_example": text}},
        "upstream": {"nodes": {"127.0.0.1:1": 1}},
    }


def propagation():
    client, peer = free_port(), free_port()
    etcd = subprocess.Popen(
        ["etcd", "--data-dir", os.path.join(TMP, "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(TMP, "etcd.log"), "w"))
    wait_port(client, "etcd")
    conn = http.client.HTTPConnection("127.0.0.1", client)

    def put(key, value):
        body = {"key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(json.dumps(value).encode()).decode()}
        conn.request("POST", "/v3/kv/put", json.dumps(body))
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status

    provider = f'  config_provider: etcd\n  etcd: {{endpoints: ["http://127.0.0.1:{client}"]}}\n'
    put("/apisix/routes/prop", mock("/prop", "v-start"))
    nodes = [Node(f"etcd-node{i}", provider) for i in range(3)]
    try:
        for n in nodes:
            while n.get("/prop")[1] != b"v-start":
                time.sleep(0.01)
        latencies = []
        for i in range(CHANGES):
            want = f"v{i}".encode()
            started = time.perf_counter()
            put("/apisix/routes/prop", mock("/prop", f"v{i}"))
            pending = list(nodes)
            while pending:
                pending = [n for n in pending if n.get("/prop")[1] != want]
            latencies.append((time.perf_counter() - started) * 1000)
        print(f"propagation: {CHANGES} changes written to etcd, every one of 3 nodes serving it")
        print(f"  p50 {percentile(latencies, 50):.2f} ms   p99 {percentile(latencies, 99):.2f} ms   "
              f"max {max(latencies):.2f} ms   mean {statistics.mean(latencies):.2f} ms")
    finally:
        for n in nodes:
            n.stop()
        etcd.kill()
        etcd.wait()


def wrk(port, seconds):
    out = subprocess.run(
        ["wrk", "-t1", "-c20", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/hot"],
        capture_output=True, text=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
    p99 = re.search(r"99%\s+(\S+)", out).group(1)
    p50 = re.search(r"50%\s+(\S+)", out).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return f"{float(rps):.0f} req/s, p50 {p50}, p99 {p99}" + (
        f", NON-2XX {errors.group(1)}" if errors else "") + (f", socket errors {sock.group(1)}" if sock else "")


def rebuild():
    lines = ["routes:"]
    lines.append('  - {id: hot, uri: /hot, plugins: {mocking: {response_example: hot}}, '
                 'upstream: {nodes: {"127.0.0.1:1": 1}}}')
    for i in range(ROUTES - 1):
        lines.append(f'  - {{id: r{i}, uri: "/api/v1/svc{i % 97}/res{i}/*", '
                     f'upstream: {{nodes: {{"127.0.0.1:1": 1}}}}}}')
    provider = f'  config_provider: embedded\n  data_dir: "{os.path.join(TMP, "data")}"\n'
    started = time.perf_counter()
    node = Node("embedded", provider, "\n".join(lines) + "\n")
    while node.get("/hot")[0] != 200:
        time.sleep(0.05)
    print(f"rebuild: {ROUTES} routes imported into the embedded store and served in "
          f"{time.perf_counter() - started:.1f} s (first start)")
    try:
        print(f"  wrk alone ({WRK_SECONDS} s, 20 conn):        {wrk(node.port, WRK_SECONDS)}")
        write_ms = []
        done = threading.Event()

        def writer():
            for i in range(WRITES):
                t = time.perf_counter()
                status = node.admin_put(f"/apisix/admin/routes/w{i}", mock(f"/w{i}", "w"))
                assert status == 201, status
                write_ms.append((time.perf_counter() - t) * 1000)
                time.sleep(WRK_SECONDS / WRITES / 2)
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        under = wrk(node.port, WRK_SECONDS)
        t.join()
        print(f"  wrk with {WRITES} Admin API writes:    {under}")
        with open(node.log) as f:
            reloads = [int(m) for m in re.findall(r"elapsed_ms=(\d+)", f.read())]
        print(f"  snapshot rebuilds: {len(reloads)}, median {statistics.median(reloads)} ms, "
              f"max {max(reloads)} ms")
        print(f"  Admin API write (validate + commit + reply): median {statistics.median(write_ms):.0f} ms, "
              f"max {max(write_ms):.0f} ms")
    finally:
        node.stop()


if __name__ == "__main__":
    which = sys.argv[1:] or ["propagation", "rebuild"]
    if "propagation" in which:
        propagation()
    if "rebuild" in which:
        rebuild()
