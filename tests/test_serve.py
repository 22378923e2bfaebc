"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client."""

import asyncio
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from tests.serving_support import build_checkpoint, data_url, live_server, png_bytes
from vlmkit.api import VLM
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import prompt_for, stream_messages
from vlmkit.infer.sampling import SamplingParams
from vlmkit.serve.app import create_app
from vlmkit.serve.metrics import FAILED
from vlmkit.serve.scheduler import Event, Scheduler
from vlmkit.serve.serving import EventRelay, WholeAnswer
from vlmkit.serve.settings import ImageLimits, ServerSettings

KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def model(model_dir):
    return VLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    (root / "a.png").write_bytes(png_bytes(1))
    return root


@pytest.fixture(scope="module")
def server(model, allowed):
    settings = ServerSettings(model_name="tiny", api_key=KEY, max_batch=8, max_queue=16, max_body_bytes=200_000,
                              max_tokens_cap=64,
                              images=ImageLimits(max_bytes=50_000, max_pixels=300 * 300, max_images=3,
                                                 allow_dir=allowed))
    app = create_app(Engine(model), settings)
    with live_server(app) as url:
        yield url, app


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server[0] + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_stream_equals_non_stream_and_reports_usage(client):
    full = ask(client, "what colour is the circle?")
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens > 0
    chunks = list(ask(client, "what colour is the circle?", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_matches_python_generate(client, model):
    got = ask(client, "describe the image").choices[0].message.content
    assert got == model.generate([{"role": "user", "content": "describe the image"}], max_new_tokens=24)


def test_images_as_data_urls_count_their_tokens(client, model):
    per_image = model.config.tokens_per_image
    text_only = ask(client, [text_part("how many shapes?")])
    one = ask(client, [image_part(data_url(png_bytes(1))), text_part("how many shapes?")])
    two = ask(client, [image_part(data_url(png_bytes(1))), image_part(data_url(png_bytes(2))),
                       text_part("how many shapes?")])
    assert one.usage.prompt_tokens - text_only.usage.prompt_tokens >= per_image
    assert two.usage.prompt_tokens - one.usage.prompt_tokens >= per_image
    # the image reaches the model: the same question about a different image gets a different answer
    answers = {ask(client, [image_part(data_url(png_bytes(s))), text_part("describe the image")],
                   max_tokens=12).choices[0].message.content for s in range(6)}
    assert len(answers) > 1


def test_file_urls_only_under_allow_dir(client, server, allowed):
    by_file = ask(client, [image_part((allowed / "a.png").as_uri()), text_part("describe")])
    by_data = ask(client, [image_part(data_url(png_bytes(1))), text_part("describe")])
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    r = post(server, {"messages": [{"role": "user", "content": [image_part("file:///etc/hostname")]}]})
    assert r.status_code == 400 and "outside the allowed directory" in r.json()["error"]["message"]
    r = post(server, {"messages": [{"role": "user", "content": [image_part("https://example.com/a.png")]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "remote_url_refused"
    assert "data URL" in r.json()["error"]["message"]


def test_symlinks_out_of_allow_dir_are_refused(server, allowed, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(3))
    (allowed / "link.png").symlink_to(outside)
    r = post(server, {"messages": [{"role": "user", "content": [image_part((allowed / "link.png").as_uri())]}]})
    assert r.status_code == 400 and "outside the allowed directory" in r.json()["error"]["message"]


def test_stop_strings_and_seed(client):
    text = ask(client, "describe the image", max_tokens=32).choices[0].message.content
    words = text.split()
    if len(words) >= 3:
        stop = words[2]
        cut = ask(client, "describe the image", max_tokens=32, stop=[stop]).choices[0].message.content
        assert cut == text[:text.index(stop)]
    a = ask(client, "describe the image", temperature=1.0, seed=7).choices[0].message.content
    b = ask(client, "describe the image", temperature=1.0, seed=7).choices[0].message.content
    assert a == b


def test_concurrent_requests_equal_sequential(client, server):
    prompts = [f"question number {i}: what colour is the shape?" for i in range(6)]
    contents = [[image_part(data_url(png_bytes(i))), text_part(p)] if i % 2 else p for i, p in enumerate(prompts)]
    sequential = [ask(client, c).choices[0].message.content for c in contents]
    scheduler = server[1].state.scheduler
    barrier = threading.Barrier(len(contents))

    def one(content, stream):
        barrier.wait()
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in ask(client, content, stream=True) if c.choices)
        return ask(client, content).choices[0].message.content

    with ThreadPoolExecutor(len(contents)) as pool:
        concurrent = list(pool.map(one, contents, [i % 3 == 0 for i in range(len(contents))]))
    assert concurrent == sequential
    assert scheduler.max_rows_seen >= 2  # they really shared decode steps


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"prompt": "hi"}, "messages"),
])
def test_schema_errors_are_422(server, body, param):
    r = post(server, body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param) and err["message"]


def test_bad_input_is_400(server):
    cases = {
        "bad base64": [image_part("data:image/png;base64,@@@notbase64")],
        "not an image": [image_part(data_url(b"this is not a png"))],
        "plain data url": [image_part("data:image/png,rawbytes")],
        "unknown scheme": [image_part("ftp://host/a.png")],
        "too many images": [image_part(data_url(png_bytes(i))) for i in range(4)],
    }
    for name, content in cases.items():
        r = post(server, {"messages": [{"role": "user", "content": content}]})
        assert r.status_code == 400, name
        assert r.json()["error"]["param"].startswith("messages[0].content["), name
    r = post(server, {"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": [image_part(data_url(png_bytes(1)))]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].content[0]"
    assert "user messages only" in r.json()["error"]["message"]
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post(server, {"messages": [{"role": "user", "content": "the red circle " * 60}], "max_tokens": 60})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]


def test_too_large_is_413(server):
    noisy = png_bytes(0, size=150)  # ~67 kB: over the 50 kB image limit, under the 200 kB body limit
    r = post(server, {"messages": [{"role": "user", "content": [image_part(data_url(noisy))]}]})
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages[0].content[0]"
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), "white").save(buf, format="PNG")  # a small file of too many pixels
    r = post(server, {"messages": [{"role": "user", "content": [image_part(data_url(buf.getvalue()))]}]})
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
    r = post(server, {"messages": [{"role": "user", "content": "x" * 300_000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_auth_is_401(server):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert post(server, body, key=None).status_code == 401
    r = post(server, body, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_queue_full_is_429_and_server_survives(model):
    # one row, one waiting place: of many simultaneous long requests, at most two can be taken at once
    app = create_app(Engine(model), ServerSettings(max_batch=1, max_queue=1, max_tokens_cap=200))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with live_server(app) as url:
        barrier = threading.Barrier(10)

        def one(_):
            barrier.wait()
            return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(one, range(10)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429} and codes.count(200) >= 2
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "queue_full" and "retry" in r.json()["error"]["message"]
            else:
                assert r.json()["usage"]["completion_tokens"] == 200
        r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(url + "/health").json() == {"status": "ok", "model": "vlmkit", "running": 0, "waiting": 0}


def test_unknown_path_and_web_page(server):
    r = httpx.get(server[0] + "/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and "vlmkit chat" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external resources
    assert json.loads(httpx.get(server[0] + "/health").text)["status"] == "ok"


def test_failing_request_does_not_disturb_its_neighbours(model):
    """A prompt that fails inside the engine (image tokens without pixels) fails alone."""
    engine = Engine(model)
    good = prompt_for(model, [{"role": "user", "content": "describe the image"}])
    bad = type(good)([model.config.image_token_id] * 3 + good.input_ids, None)
    expected = model.generate([{"role": "user", "content": "describe the image"}], max_new_tokens=20)
    scheduler = Scheduler(engine, max_batch=4).start()
    try:
        results = {name: [] for name in ("good1", "bad", "good2")}
        done = threading.Semaphore(0)

        def collect(name):
            def on_event(event):
                results[name].append(event)
                if event.error is not None or event.finish_reason is not None:
                    done.release()
            return on_event

        for name, prompt in (("good1", good), ("bad", bad), ("good2", good)):
            scheduler.submit(prompt, SamplingParams(max_new_tokens=20), collect(name))
        for _ in range(3):
            done.acquire()
    finally:
        scheduler.stop()
    assert "placeholder" in results["bad"][-1].error
    for name in ("good1", "good2"):
        assert results[name][-1].error is None
        assert "".join(e.delta for e in results[name]) == expected


def test_python_api_batch_and_stream_agree(model):
    picture = Image.open(io.BytesIO(png_bytes(4)))
    conversations = [
        [{"role": "user", "content": "what colour is the circle?"}],
        [{"role": "system", "content": "answer briefly"},
         {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "describe"}]}],
        [{"role": "user", "content": "how many shapes?"}, {"role": "assistant", "content": "three"},
         {"role": "user", "content": "and colours?"}],
    ]
    alone = [model.generate(c, max_new_tokens=16) for c in conversations]
    assert model.generate(conversations, max_new_tokens=16) == alone
    assert model.generate(conversations, max_new_tokens=16, max_batch=2) == alone
    assert "".join(stream_messages(model, conversations[1], max_new_tokens=16)) == alone[1]


def test_whole_answer_passes_on_the_last_event_with_all_text():
    """A request answered in one piece hears of its scheduler once: the whole text with the last
    event's finish reason and usage; an error goes on at once, whatever text came before it."""
    delivered = []
    whole = WholeAnswer(delivered.append)
    for delta in ("Hel", "", "lo"):
        whole(Event(delta=delta, prompt_tokens=5, completion_tokens=1))
    assert delivered == []
    whole(Event(delta="!", finish_reason="length", prompt_tokens=5, completion_tokens=4))
    assert delivered == [Event(delta="Hello!", finish_reason="length", prompt_tokens=5, completion_tokens=4)]

    failed = []
    whole = WholeAnswer(failed.append)
    whole(Event(delta="partial"))
    whole(Event(error="generation failed: boom", outcome=FAILED))
    assert failed == [Event(error="generation failed: boom", outcome=FAILED)]


def test_event_relay_wakes_the_loop_once_for_a_burst_of_events():
    """Events posted from another thread (the scheduler's, one per row after a step) reach their
    queues in order, with one wake-up of the loop for all those posted before it ran."""
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real_call_soon_threadsafe = loop.call_soon_threadsafe

        def counting_call_soon_threadsafe(callback, *args):
            wakeups.append(callback)
            return real_call_soon_threadsafe(callback, *args)

        loop.call_soon_threadsafe = counting_call_soon_threadsafe
        relay = EventRelay(loop)
        queues = [asyncio.Queue() for _ in range(3)]
        burst = threading.Thread(target=lambda: [relay.post(q, Event(delta=f"{i}{j}")) for j in range(4)
                                                 for i, q in enumerate(queues)])
        burst.start()
        burst.join()  # the whole burst is posted before the loop runs again
        got = [[(await q.get()).delta for _ in range(4)] for q in queues]
        assert got == [[f"{i}{j}" for j in range(4)] for i in range(3)]
        assert len(wakeups) == 1
        relay.post(queues[0], Event(delta="later"))  # after a delivery, the next post wakes the loop again
        assert (await queues[0].get()).delta == "later" and len(wakeups) == 2

    asyncio.run(main())
