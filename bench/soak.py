"""Soak: `vlmkit serve` under a bounded load of well-behaved and misbehaving clients, then its state.

Starts `vlmkit serve` on 127.0.0.1 (on a random VLM built here unless --model is given; bench/serve.py's
checkpoint), warms it up with --warmup requests, reads its resident memory, then runs --clients
client threads until --requests requests are done or --max-seconds have passed. Each request is
drawn (seeded) from a mix:

    normal       non-streamed, half of them with an image; must answer 200 with a finish reason
    stream       streamed; must end with a finish reason and [DONE], no error event
    disconnect   streamed; the socket is killed (reset) after 1-5 events
    cancel       non-streamed; the connection is closed 0-300 ms after the request is sent
                 (while it is prepared, waits or decodes)
    malformed    invalid JSON, a schema violation, bad base64, a remote URL, max_tokens over the
                 cap, an image over the pixel limit; must answer its 4xx

After the load it waits (at most --settle-seconds) for the server to report no running or waiting
request, reads /metrics (rows, KV cache rows, requests by status) and its memory again, and asks
one more question. It exits 1 when a target is missed: at least 20% of the requests disconnecting
or cancelling, no 5xx answer (the server's own count, which includes the requests whose client
left), no row or cache row left, resident memory grown by at most 10% since the warm-up, and an
answer after the load. Loopback only.

    .venv/bin/python bench/soak.py [--model DIR] [--clients 12] [--requests 1000] [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import build_checkpoint, image_data_url, start_server  # noqa: E402

MIX = {"normal": 0.30, "stream": 0.25, "disconnect": 0.15, "cancel": 0.15, "malformed": 0.15}
LEAVING = ("disconnect", "cancel")
MIN_LEAVING_FRACTION = 0.20
MAX_RSS_GROWTH = 0.10
MAX_TOKENS_CAP = 64
"""The server's --max-tokens-cap; requests ask 4-48 tokens, and one malformed kind asks more."""
CANCEL_AFTER_S = (0.0, 0.3)
DISCONNECT_AFTER_EVENTS = (1, 5)
BOMB_SIDE = 5000
"""A BOMB_SIDE x BOMB_SIDE one-bit PNG: a few kB that would decode to 25 M pixels, over the
server's default 4096 x 4096 limit."""
HTTP_TIMEOUT_S = 120
READY_TIMEOUT_S = 180


@dataclass
class Tally:
    """What the clients saw, by request kind."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(
        collections.Counter))
    failures: list[str] = field(default_factory=list)
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, status: int | str, failure: str | None = None, tokens: int = 0) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.statuses[kind][status] += 1
            self.tokens += tokens
            if failure is not None:
                self.failures.append(f"{kind}: {failure}")


def question(rng: random.Random, stream: bool, image: bool) -> dict:
    text = f"Describe picture number {rng.randrange(10_000)} in a few words."
    content = [{"type": "image_url", "image_url": {"url": image_data_url(rng.randrange(10_000))}},
               {"type": "text", "text": text}] if image else text
    return {"messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(4, 48),
            "temperature": rng.choice([0.0, 0.7]), "seed": rng.randrange(1000), "stream": stream}


def bomb_data_url() -> str:
    buf = io.BytesIO()
    Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def malformed(rng: random.Random, bomb: str) -> tuple[bytes, int]:
    """(a bad request body, the status it must get)."""
    user = lambda content: {"messages": [{"role": "user", "content": content}]}  # noqa: E731
    image = lambda url: [{"type": "image_url", "image_url": {"url": url}}]  # noqa: E731
    cases = [
        (b'{"messages": [{"role": "user", "content": "hi"}', 422),
        (json.dumps({"messages": []}).encode(), 422),
        (json.dumps({**user("hi"), "temperature": 5}).encode(), 422),
        (json.dumps(user(image("data:image/png;base64,@@@"))).encode(), 400),
        (json.dumps(user(image("https://example.com/a.png"))).encode(), 400),
        (json.dumps({**user("hi"), "max_tokens": MAX_TOKENS_CAP + 1}).encode(), 400),
        (json.dumps(user(image(bomb))).encode(), 413),
    ]
    return rng.choice(cases)


def post_raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a reset, as a killed client's socket ends."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def run_one(kind: str, rng: random.Random, http: httpx.Client, port: int, bomb: str, tally: Tally) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    if kind == "normal":
        r = http.post(url, json=question(rng, stream=False, image=rng.random() < 0.5))
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        tally.record(kind, r.status_code, None if ok else r.text[:200],
                     r.json()["usage"]["completion_tokens"] if ok else 0)
    elif kind == "stream":
        with http.stream("POST", url, json=question(rng, stream=True, image=False)) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        finished = len(events) >= 2 and events[-1] == "[DONE]" and "error" not in events[-2] and \
            json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        tally.record(kind, r.status_code, None if r.status_code == 200 and finished else str(events[-2:])[:200])
    elif kind == "disconnect":
        sock = post_raw(port, json.dumps(question(rng, stream=True, image=False)).encode())
        wanted, seen, received = rng.randint(*DISCONNECT_AFTER_EVENTS), 0, b""
        while seen < wanted:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            seen = received.count(b"data: ")
        reset(sock)
        tally.record(kind, "reset")
    elif kind == "cancel":
        sock = post_raw(port, json.dumps(question(rng, stream=False, image=rng.random() < 0.5)).encode())
        time.sleep(rng.uniform(*CANCEL_AFTER_S))
        reset(sock)
        tally.record(kind, "reset")
    else:
        data, expected = malformed(rng, bomb)
        r = http.post(url, content=data, headers={"Content-Type": "application/json"})
        tally.record(kind, r.status_code, None if r.status_code == expected else f"{r.status_code} != {expected}")


def drive(port: int, clients: int, requests: int, max_seconds: float, seed: int, bomb: str) -> tuple[Tally, float]:
    """`clients` threads send requests drawn from MIX until `requests` are done or time is up."""
    tally, counter, lock = Tally(), iter(range(requests)), threading.Lock()
    deadline = time.monotonic() + max_seconds
    kinds, weights = list(MIX), list(MIX.values())

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            while time.monotonic() < deadline:
                with lock:
                    if next(counter, None) is None:
                        return
                kind = rng.choices(kinds, weights)[0]
                try:
                    run_one(kind, rng, http, port, bomb, tally)
                except (httpx.HTTPError, OSError) as e:
                    tally.record(kind, "transport error", f"{type(e).__name__}: {e}")

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.monotonic() - start


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def server_metrics(port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=HTTP_TIMEOUT_S).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def settle(port: int, timeout_s: float) -> dict:
    """/health once no request runs or waits (or the last one seen after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=HTTP_TIMEOUT_S).json()
        if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def report(tally: Tally, seconds: float, after: dict, metrics: dict, rss: tuple[int, int], answers: bool) -> bool:
    total = sum(tally.counts.values())
    leaving = sum(tally.counts[k] for k in LEAVING)
    server_5xx = sum(v for (name, labels), v in metrics.items()
                     if name == "vlmkit_http_requests_total" and dict(labels)["status"].startswith("5"))
    cache_rows = metrics[("vlmkit_kv_cache_rows", ())]
    outcomes = {dict(labels)["outcome"]: int(v) for (name, labels), v in metrics.items()
                if name == "vlmkit_requests_total"}
    growth = rss[1] / rss[0] - 1
    print(f"{total} requests in {seconds:.1f} s ({total / seconds:.1f} requests/s, {tally.tokens} tokens answered "
          f"in full)")
    for kind in MIX:
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(tally.statuses[kind].items(), key=str))
        print(f"  {kind:<11} {tally.counts[kind]:>5}   {statuses}")
    print(f"  server outcomes (warm-up included): {outcomes}")
    for failure in tally.failures[:10]:
        print(f"  unexpected: {failure}")
    checks = [
        (f">= {MIN_LEAVING_FRACTION:.0%} disconnecting or cancelling", leaving / max(total, 1) >= MIN_LEAVING_FRACTION,
         f"{leaving / max(total, 1):.1%}"),
        ("every request got what it should (200s answered in full, 4xx as expected)", not tally.failures,
         f"{len(tally.failures)} unexpected"),
        ("0 server errors (5xx, by the server's count)", server_5xx == 0, f"{server_5xx:g}"),
        ("0 rows running or waiting after the load", after["running"] == 0 and after["waiting"] == 0,
         f"{after['running']} running, {after['waiting']} waiting"),
        ("0 KV cache rows after the load", cache_rows == 0, f"{cache_rows:g}"),
        (f"RSS growth <= {MAX_RSS_GROWTH:.0%} after the load vs after the warm-up", growth <= MAX_RSS_GROWTH,
         f"{rss[0] / 2**20:.0f} MiB -> {rss[1] / 2**20:.0f} MiB ({growth:+.1%})"),
        ("answers after the load", answers, "yes" if answers else "no"),
    ]
    for name, ok, value in checks:
        print(f"  [{'ok' if ok else 'MISSED'}] {name}: {value}")
    return all(ok for _, ok, _ in checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: build a random one)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=1000, help="requests after the warm-up")
    parser.add_argument("--max-seconds", type=float, default=600, help="the load stops after this, done or not")
    parser.add_argument("--warmup", type=int, default=60, help="requests (same mix) before memory is first read")
    parser.add_argument("--settle-seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args()
    bomb = bomb_data_url()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_checkpoint(Path(tmp) / "model")
        proc, port = start_server(model, args.max_batch, args.threads, "--max-queue", str(args.max_queue),
                                  "--max-tokens-cap", str(MAX_TOKENS_CAP), ready_timeout_s=READY_TIMEOUT_S)
        try:
            drive(port, args.clients, args.warmup, args.max_seconds, args.seed + 1, bomb)
            settle(port, args.settle_seconds)
            rss_warm = rss_bytes(proc.pid)
            tally, seconds = drive(port, args.clients, args.requests, args.max_seconds, args.seed, bomb)
            after = settle(port, args.settle_seconds)
            metrics = server_metrics(port)
            rss_after = rss_bytes(proc.pid)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=HTTP_TIMEOUT_S,
                           json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})
            answers = r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        finally:
            proc.terminate()
            code = proc.wait(timeout=HTTP_TIMEOUT_S)
    ok = report(tally, seconds, after, metrics, (rss_warm, rss_after), answers)
    print(f"  server exit code after SIGTERM: {code}")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
