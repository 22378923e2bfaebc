"""Shared by the chat, serve and web-page tests: a tiny random VLM checkpoint with a tokenizer
trained here, a live server on a free local port, and images as files / data URLs."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
import uvicorn
from PIL import Image

from vlmkit.api import VLM
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.models.config import AdapterConfig, LLMConfig, VisionConfig, VLMConfig

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


def png_bytes(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
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
