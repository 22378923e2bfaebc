"""The server under faults, live on 127.0.0.1: clients that are killed, cancel or go away while
their request waits or decodes, a full server, requests past their timeout, SIGTERM; after each,
the server's rows (and the engine's cache rows) are back to zero and it still answers. Also
/metrics read by prometheus-client's own parser, /health, the API key check and the prompt-text
logging rule.

The engine is paced (each decode step takes STEP_S), so a long request is still decoding when a
test acts on it; each test waits for server-side conditions, never for a time."""

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving_support import (WAIT_S, PacedEngine, build_checkpoint, free_port, kill, live_server, raw_request,
                                   read_until, wait_for)
from vlmkit.api import VLM
from vlmkit.infer.engine import Engine
from vlmkit.serve.app import create_app
from vlmkit.serve.metrics import CANCELLED, FINISHED, TIMED_OUT, RecentRate
from vlmkit.serve.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
STEP_S = 0.02
LONG_TOKENS = 200
"""A long request: LONG_TOKENS x STEP_S = 4 s of decoding, far longer than any test waits to act."""
SHORT_TOKENS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("faults") / "model")


@pytest.fixture(scope="module")
def model(model_dir):
    return VLM.from_pretrained(model_dir)


def body(stream=False, max_tokens=LONG_TOKENS, content="describe the image"):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def paced_app(model, **settings):
    engine = PacedEngine(model, STEP_S)
    app = create_app(engine, ServerSettings(**settings))
    return app, app.state.scheduler, engine


def sample(app, name, **labels):
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def outcomes(app, outcome):
    return sample(app, "vlmkit_requests_total", outcome=outcome)


def all_freed(app, engine):
    scheduler = app.state.scheduler
    return (scheduler.num_running == 0 and scheduler.num_waiting == 0 and engine.rows == []
            and engine.cache is None and sample(app, "vlmkit_kv_cache_rows") == 0)


def still_answers(url):
    r = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=3), timeout=WAIT_S)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_killed_stream_socket_frees_its_row(model):
    app, scheduler, engine = paced_app(model)
    with live_server(app) as url:
        sock = raw_request(url, body(stream=True))
        read_until(sock, b'"content": "')  # the role chunk: the stream is on
        wait_for(lambda: sample(app, "vlmkit_kv_cache_rows") == 1, "the request's row in the KV cache")
        kill(sock)
        wait_for(lambda: outcomes(app, CANCELLED) == 1 and all_freed(app, engine), "the killed stream's row freed")
        assert outcomes(app, FINISHED) == 0
        still_answers(url)


def test_cancelled_stream_frees_its_row(model):
    app, scheduler, engine = paced_app(model)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        stream = client.chat.completions.create(model="tiny", messages=body()["messages"], temperature=0,
                                                max_tokens=LONG_TOKENS, stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()
        wait_for(lambda: outcomes(app, CANCELLED) == 1 and all_freed(app, engine), "the cancelled stream's row freed")
        still_answers(url)


def test_client_gone_while_decoding_frees_its_row(model):
    """A non-streamed request: its handler hears nothing until the answer, yet its row goes at once."""
    app, scheduler, engine = paced_app(model)
    with live_server(app) as url:
        sock = raw_request(url, body())
        wait_for(lambda: scheduler.num_running == 1 and scheduler.steps > 0, "the request decoding")
        kill(sock)
        wait_for(lambda: outcomes(app, CANCELLED) == 1 and all_freed(app, engine), "the gone client's row freed")
        wait_for(lambda: sample(app, "vlmkit_http_requests_total", path="/v1/chat/completions", status="499") == 1,
                 "the request counted as closed by its client")
        still_answers(url)


def test_client_gone_while_queued_frees_its_place_at_once(model):
    app, scheduler, engine = paced_app(model, max_batch=1)
    with live_server(app) as url:
        running = raw_request(url, body(stream=True))
        wait_for(lambda: scheduler.num_running == 1, "the first request decoding")
        queued = raw_request(url, body())
        wait_for(lambda: scheduler.num_waiting == 1, "the second request waiting")
        kill(queued)
        # its place is free while the first request still decodes, not once the line reaches it
        wait_for(lambda: scheduler.num_waiting == 0 and outcomes(app, CANCELLED) == 1 and scheduler.num_running == 1
                 and outcomes(app, FINISHED) == 0, "the queued request gone, the first one still decoding")
        kill(running)
        wait_for(lambda: outcomes(app, CANCELLED) == 2 and all_freed(app, engine), "every row freed")
        still_answers(url)


def test_past_capacity_is_429_with_retry_after_before_the_body_is_read(model):
    app, scheduler, engine = paced_app(model, max_batch=1, max_queue=1, retry_after_s=2)
    with live_server(app) as url:
        held = [raw_request(url, body(stream=True)), raw_request(url, body())]
        wait_for(lambda: scheduler.num_running == 1 and scheduler.num_waiting == 1, "one running, one waiting")
        # headers announcing a large body, and no body: the answer must not wait for it
        over = raw_request(url, None, declared_length=10_000_000)
        head, _, rest = read_until(over, b"}}").partition(b"\r\n\r\n")
        over.close()
        assert head.startswith(b"HTTP/1.1 429") and b"retry-after: 2" in head.lower()
        assert json.loads(rest)["error"]["code"] == "queue_full"
        for sock in held:
            kill(sock)
        wait_for(lambda: all_freed(app, engine), "every row freed")
        still_answers(url)


def test_request_timeout_is_504_and_frees_its_row(model):
    app, scheduler, engine = paced_app(model, request_timeout_s=0.3)
    with live_server(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body(), timeout=WAIT_S)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", url + "/v1/chat/completions", json=body(stream=True), timeout=WAIT_S) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
        assert events[-1] == "data: [DONE]"
        wait_for(lambda: outcomes(app, TIMED_OUT) == 2 and all_freed(app, engine), "the timed-out rows freed")


def test_sigterm_drains_then_exits_0(model_dir):
    """`vlmkit serve`'s run_server in a process of its own: on SIGTERM it refuses new connections,
    lets a short request finish, cuts a long one at the grace period, and exits 0."""
    # when the signal comes, the short request has SHORT_TOKENS steps left (a quarter of a second),
    # the long one LONG_TOKENS (10 s): the grace period lies far from both, so that a loaded
    # machine moves neither across it
    port, step_s, grace_s = free_port(), 0.05, 5.0
    code = f"from tests.serving_support import serve_paced; serve_paced({str(model_dir)!r}, {port}, {step_s}, {grace_s})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _health(url) is not None, "the server up")
        long = raw_request(url, body(stream=True))
        read_until(long, b'"role"')  # its first chunk: the request is in the scheduler
        short = raw_request(url, body(stream=True, max_tokens=SHORT_TOKENS))
        read_until(short, b'"role"')
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(port), "new connections refused")
        short_events, long_events = _events(read_until(short, b"[DONE]")), _events(read_until(long, b"[DONE]"))
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        proc.kill()
    assert short_events[-1] == "[DONE]" and json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
    assert long_events[-1] == "[DONE]"
    assert json.loads(long_events[-2])["error"]["code"] == "server_shutting_down"


def _health(url):
    try:
        return httpx.get(url + "/health", timeout=WAIT_S).json()
    except httpx.TransportError:
        return None


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S).close()
        return False
    except ConnectionRefusedError:
        return True


def _events(raw: bytes) -> list[str]:
    """The data of each server-sent event in a raw chunked response (one event per chunk)."""
    return [line.removeprefix("data: ") for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_health_reflects_the_scheduler(model):
    app, scheduler, engine = paced_app(model)
    with live_server(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        scheduler.drain(WAIT_S)
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        r = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=3))
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert r.headers["retry-after"] == "1"
    app, scheduler, engine = paced_app(model)
    with live_server(app) as url:
        scheduler.stop()  # as if the scheduler thread had died
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "down"


def test_metrics_parse_with_prometheus_client(model):
    app = create_app(Engine(model), ServerSettings())
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        usages = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"shape {i}"}],
                                                 temperature=0, max_tokens=8).usage for i in range(3)]
        streamed = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                       temperature=0, max_tokens=5, stream=True,
                                                       stream_options={"include_usage": True}))
        usages.append(streamed[-1].usage)
        assert httpx.post(url + "/v1/chat/completions", json={"messages": []}).status_code == 422
        r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    chat = "/v1/chat/completions"
    assert value("vlmkit_http_requests_total", path=chat, status="200") == 4
    assert value("vlmkit_http_requests_total", path=chat, status="422") == 1
    assert value("vlmkit_requests_total", outcome=FINISHED) == 4
    assert value("vlmkit_requests_total", outcome=CANCELLED) == 0
    assert value("vlmkit_generated_tokens_total") == sum(u.completion_tokens for u in usages)
    assert value("vlmkit_time_to_first_token_seconds_count") == 4
    assert value("vlmkit_time_per_output_token_seconds_count") == sum(u.completion_tokens > 1 for u in usages)
    for gauge in ("vlmkit_queue_depth", "vlmkit_running_rows", "vlmkit_kv_cache_rows", "vlmkit_kv_cache_token_slots"):
        assert value(gauge) == 0, gauge
    assert value("vlmkit_generated_tokens_per_second") >= 0


def test_api_key_is_compared_as_fixed_length_digests(model, monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return secrets.compare_digest(a, b)

    app = create_app(Engine(model), ServerSettings(api_key="the-right-key"))
    monkeypatch.setattr("vlmkit.serve.app.secrets", type("S", (), {"compare_digest": staticmethod(spy)}))
    with live_server(app) as url:
        for key in ("short", "a-much-longer-wrong-key-than-the-right-one"):
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer the-right-key"})
        assert r.status_code == 200
    assert len(compared) == 3 and {len(a) for pair in compared for a in pair} == {32}


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompt_text_is_logged_only_when_asked(model, caplog, log_prompts):
    secret = "the secret word is marmalade"
    app = create_app(Engine(model), ServerSettings(log_prompts=log_prompts))
    with caplog.at_level(logging.DEBUG), live_server(app) as url:
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions", json=body(stream=stream, max_tokens=4, content=secret))
            assert r.status_code == 200
    assert any("completion tokens" in m for m in caplog.messages)  # the per-request lines are there
    assert (secret in caplog.text) == log_prompts


def test_recent_rate_follows_the_load_and_falls_to_zero(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("vlmkit.serve.metrics.time.monotonic", lambda: clock[0])
    rate = RecentRate(window_s=10)
    for _ in range(300):  # 30 s at 100 tokens every 0.1 s
        clock[0] += 0.1
        rate.add(100)
    assert rate.rate() == pytest.approx(1000, rel=0.1)
    clock[0] += 5  # idle for half a window: about half the rate
    assert rate.rate() == pytest.approx(500, rel=0.2)
    clock[0] += 10
    assert rate.rate() == 0
