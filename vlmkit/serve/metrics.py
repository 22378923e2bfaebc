"""What the server exposes at GET /metrics, in Prometheus' text format (prometheus-client).

    vlmkit_http_requests_total{path, status}       HTTP requests by route and status code (499: the
                                                   client went away before its answer)
    vlmkit_requests_total{outcome}                 requests the scheduler took, by how they left it
                                                   (OUTCOMES)
    vlmkit_queue_depth                             requests waiting for a row
    vlmkit_running_rows                            rows decoding together
    vlmkit_kv_cache_rows                           rows the engine's KV cache holds
    vlmkit_kv_cache_token_slots                    token positions allocated in it (rows x capacity)
    vlmkit_time_to_first_token_seconds             histogram: request arrival -> first token
    vlmkit_time_per_output_token_seconds           histogram: a request's mean time between tokens
    vlmkit_generated_tokens_total                  tokens generated (rate() gives tokens/s)
    vlmkit_generated_tokens_per_second             the same over the last THROUGHPUT_WINDOW_S

Each app has a registry of its own, so that several apps in one process (tests, benches) keep
their own counts. The scheduler (serve/scheduler.py) reports into it; the gauges read the
scheduler's state when scraped.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FINISHED, CANCELLED, TIMED_OUT, FAILED, SHUT_DOWN = "finished", "cancelled", "timed_out", "failed", "shut_down"
OUTCOMES = (FINISHED, CANCELLED, TIMED_OUT, FAILED, SHUT_DOWN)
"""How a request leaves the scheduler: it finished (a stop or its length), its client went away,
it ran past the server's timeout, the engine failed on it, or the server stopped before it ended."""

CLIENT_CLOSED_REQUEST = 499
"""The status recorded for a request whose client went away before its answer (nginx's code)."""

THROUGHPUT_WINDOW_S = 10.0
"""The window of vlmkit_generated_tokens_per_second."""
MARK_INTERVAL_S = 1.0
"""How often that rate's running total is marked: its resolution."""

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds to a first token: milliseconds for a short prompt on an idle server, up to a minute in
a long queue."""
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Seconds between tokens: a millisecond for a tiny model on a GPU, up to a second for a large
model on a CPU."""


class RecentRate:
    """The rate of a growing total over about the last `window_s` seconds. `add` runs on every
    decode step, so the total is only marked once a MARK_INTERVAL_S, by `add` or by `rate`
    (thread-safe: the scheduler thread adds, a /metrics scrape reads)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S):
        self.window_s = window_s
        self.total = 0
        now = time.monotonic()
        self._marks: collections.deque[tuple[float, int]] = collections.deque([(now, 0)])  # (time, total then)
        self._next_mark = now + MARK_INTERVAL_S
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        self.total += count
        now = time.monotonic()
        if now >= self._next_mark:
            with self._lock:
                self._mark(now, self.total)

    def rate(self) -> float:
        """Per second since the last mark before the window (since the first one, on a young server)."""
        now, total = time.monotonic(), self.total
        with self._lock:
            if now >= self._next_mark:
                self._mark(now, total)
            base = next((m for m in reversed(self._marks) if m[0] <= now - self.window_s), self._marks[0])
        return (total - base[1]) / max(now - base[0], MARK_INTERVAL_S)

    def _mark(self, now: float, total: int) -> None:
        self._next_mark = now + MARK_INTERVAL_S
        self._marks.append((now, total))
        while len(self._marks) > 1 and self._marks[1][0] <= now - self.window_s:
            self._marks.popleft()  # the oldest mark kept is the last one before the window


class ServerMetrics:
    """The server's metrics in a registry of its own; `render()` is the /metrics body."""

    def __init__(self):
        registry = self.registry = CollectorRegistry()
        self.http_requests = Counter("vlmkit_http_requests", "HTTP requests by route and status code",
                                     ["path", "status"], registry=registry)
        self.requests = Counter("vlmkit_requests", "Requests the scheduler took, by how they ended", ["outcome"],
                                registry=registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome is reported, from 0
        self.queue_depth = Gauge("vlmkit_queue_depth", "Requests waiting for a row", registry=registry)
        self.running_rows = Gauge("vlmkit_running_rows", "Rows decoding together", registry=registry)
        self.cache_rows = Gauge("vlmkit_kv_cache_rows", "Rows the engine's KV cache holds", registry=registry)
        self.cache_slots = Gauge("vlmkit_kv_cache_token_slots",
                                 "Token positions allocated in the engine's KV cache (rows x capacity)",
                                 registry=registry)
        self.time_to_first_token = Histogram("vlmkit_time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its first token",
                                             buckets=TTFT_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram("vlmkit_time_per_output_token_seconds",
                                               "A finished request's mean seconds between output tokens",
                                               buckets=TPOT_BUCKETS, registry=registry)
        self.generated_tokens = Counter("vlmkit_generated_tokens", "Tokens generated", registry=registry)
        self.throughput = RecentRate()
        Gauge("vlmkit_generated_tokens_per_second",
              f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S:g} s",
              registry=registry).set_function(self.throughput.rate)

    def generated(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)
        self.throughput.add(tokens)

    def ended(self, outcome: str, output_tokens: int, decode_seconds: float) -> None:
        """A request left the scheduler; `decode_seconds` from its first token to its last."""
        self.requests.labels(outcome).inc()
        if outcome == FINISHED and output_tokens > 1:
            self.time_per_output_token.observe(decode_seconds / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
