"""Shared by the chat, serve and web-page tests: a tiny random VLM checkpoint with a tokenizer
trained here, a tiny random Qwen2-VL directory (native resolution, images of any size and video),
a live server on a free local port, and images as files / data URLs; for the fault tests, an
engine whose steps take a set time, raw HTTP requests on sockets a test can kill, and waiting for
a server-side condition."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import torch
import uvicorn
from PIL import Image

from tests.tokenizer_support import QWEN2_VL_TEMPLATE, qwen_vl_dir
from vlmkit.api import VLM
from vlmkit.constants import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.infer.engine import Engine
from vlmkit.models.config import AdapterConfig, LLMConfig, VisionConfig, VLMConfig
from vlmkit.serve.app import create_app
from vlmkit.serve.server import run_server
from vlmkit.serve.settings import ServerSettings

TEXTS = [
    "the red circle is left of the blue square",
    "a green triangle sits above a yellow star",
    "how many shapes are in the picture? there are three shapes",
    "what colour is the circle? the circle is red",
    "describe the image: a small purple square near the top right corner",
    "is there a star? yes, there is one star at the bottom",
    "héllo wörld, ünïcode text: café, naïve, 東京, ✓",
] * 4


def build_checkpoint(out: Path) -> Path:
    """A random VLM (ViT 1x32 on 16 px, pixel shuffle to 1 token per image, decoder 2x64) + tokenizer."""
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    cfg = VLMConfig(vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_layers=1, num_heads=2),
                    adapter=AdapterConfig(kind="pixel_shuffle", scale_factor=2),
                    llm=LLMConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                                  num_heads=4, num_kv_heads=2, max_position_embeddings=256),
                    image_token_id=tok.image_token_id)
    model = VLM(cfg, tokenizer=tok)
    with torch.no_grad():  # sharper logits: greedy answers far from ties and of varied length
        model.llm.lm_head.weight.mul_(30)
    model.save_pretrained(out)
    return out


NATIVE_PATCH, NATIVE_MERGE, NATIVE_TEMPORAL = 4, 2, 2
NATIVE_MAX_PIXELS = 32 * 32
"""The tiny Qwen2-VL's processor sizes every image within 32 x 32 pixels (at most 16 tokens)."""
NATIVE_WEIGHT_STD = 0.1
"""Random weights larger than transformers' init, so that greedy answers vary with the input."""


def build_qwen2_vl_dir(out: Path) -> Path:
    """A tiny random Qwen2-VL directory as transformers writes it, with a Qwen-VL tokenizer, chat
    template and processor config (patch 4, merge 2, images and videos within NATIVE_MAX_PIXELS):
    what `VLM.from_hf(out)` loads."""
    # Deferred: transformers is heavy and only the native-model tests need it.
    import transformers

    directory = qwen_vl_dir(out, QWEN2_VL_TEMPLATE)
    tok = Tokenizer.load(directory)
    config = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=500.0, mrope_section=[4, 6, 6])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=NATIVE_PATCH,
                           spatial_merge_size=NATIVE_MERGE, temporal_patch_size=NATIVE_TEMPORAL),
        image_token_id=tok.token_id(IMAGE_PAD), video_token_id=tok.token_id(VIDEO_PAD),
        vision_start_token_id=tok.token_id(VISION_START), vision_end_token_id=tok.token_id(VISION_END))
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.normal_(1.0 if is_norm_scale else 0.0, NATIVE_WEIGHT_STD)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(dict(
        min_pixels=NATIVE_PATCH * NATIVE_PATCH * 4, max_pixels=NATIVE_MAX_PIXELS, patch_size=NATIVE_PATCH,
        merge_size=NATIVE_MERGE, temporal_patch_size=NATIVE_TEMPORAL)))
    return directory


def png_bytes(seed: int, size: int | tuple[int, int] = 20) -> bytes:
    """A random PNG, size x size pixels or (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Run `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


WAIT_S = 60
"""How long a test waits for a server-side condition before it fails (generous: a loaded machine)."""
POLL_S = 0.01


class PacedEngine(Engine):
    """An engine whose decode steps take at least `step_s` seconds, so that a request is still
    decoding when a test disconnects, cancels or times it out."""

    def __init__(self, vlm, step_s: float):
        super().__init__(vlm)
        self.step_s = step_s

    def step(self) -> None:
        time.sleep(self.step_s)
        super().step()


def wait_for(condition, what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition()` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def raw_request(url: str, body: dict | None, path: str = "/v1/chat/completions",
                declared_length: int | None = None) -> socket.socket:
    """A POST sent on a socket of its own (the test reads or kills it); `declared_length` sends a
    Content-Length without the body."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode() if body is not None else b""
    length = declared_length if declared_length is not None else len(data)
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the socket receives up to and including `marker` (or all of it, once closed)."""
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def kill(sock: socket.socket) -> None:
    """Close with a reset, as the socket of a killed client process ends."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def serve_paced(model_dir: str, port: str, step_s: str, drain_timeout_s: str) -> None:
    """`vlmkit serve`'s run_server on a PacedEngine, in this process's main thread (where signals
    arrive): `python -c "from tests.serving_support import serve_paced; serve_paced(...)"`."""
    app = create_app(PacedEngine(VLM.from_pretrained(model_dir), float(step_s)),
                     ServerSettings(drain_timeout_s=float(drain_timeout_s)))
    run_server(app, "127.0.0.1", int(port))
