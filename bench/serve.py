"""Serving throughput: continuous batching vs one request at a time, 8 concurrent clients.

Starts `vlmkit serve` twice on the same checkpoint (a random VLM built here unless --model is
given): with --max-batch 8 and with --max-batch 1. Each run, 8 client threads (the official
`openai` client) send requests back to back, each with an image as a data URL; the bench
reports generated tokens per second over the whole run and prints the ratio, with the load average
(the machine may be shared: compare ratios from one run).

    .venv/bin/python bench/serve.py [--model DIR] [--clients 8] [--requests 3] [--max-tokens 64] [--threads 1]
                                    [--isa avx2] [--decoder 4x256]

`--decoder LAYERSxWIDTH` sizes the random checkpoint's decoder (default 4x256: 4.2M parameters,
17 MB, which the CPU's caches hold, so one row's decode step is bound by arithmetic and dispatch;
12x512, 40M parameters and 159 MB, must stream its weights from memory at every step, as any
real checkpoint does).

`--isa avx2` runs both servers on PyTorch's, MKL's and oneDNN's AVX2 kernels only (what an
AVX2-only CPU runs), also on a machine with AVX-512; without it the servers use the kernels the
environment allows.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
READY_TIMEOUT_S = 120
ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
"""The environment each `--isa` adds for the servers: which kernels PyTorch, MKL and oneDNN may pick."""


def build_checkpoint(out: Path, layers: int = 4, width: int = 256) -> Path:
    """A random VLM (ViT 2x128 on 64 px, pixel shuffle, a decoder of `layers` x `width`: heads of 32,
    half as many KV heads, MLP 3x wide) with a tokenizer trained here."""
    import pydoc_data.topics

    import torch

    from vlmkit.api import VLM
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.models.config import AdapterConfig, LLMConfig, VisionConfig, VLMConfig

    torch.manual_seed(0)
    texts = [t for t in pydoc_data.topics.topics.values()][:200]
    tok = Tokenizer.train(texts, vocab_size=2048)
    cfg = VLMConfig(vision=VisionConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                                        num_layers=2, num_heads=4),
                    adapter=AdapterConfig(kind="pixel_shuffle", scale_factor=2),
                    llm=LLMConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=3 * width,
                                  num_layers=layers, num_heads=width // 32, num_kv_heads=width // 64,
                                  max_position_embeddings=1024),
                    image_token_id=tok.image_token_id)
    model = VLM(cfg)
    model.tokenizer = tok
    model.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_data_url(seed: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(model: Path, max_batch: int, threads: int, *options: str,
                 ready_timeout_s: float = READY_TIMEOUT_S, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, int]:
    """`vlmkit serve` of `model` on a free port (with more command-line `options`, and `env` added to
    this process's environment), once its /health answers: (the process, its port)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit", "serve", "--model", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--threads", str(threads), *options], cwd=ROOT,
                            stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"vlmkit serve exited with {proc.returncode}")
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"vlmkit serve did not come up in {ready_timeout_s} s")


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> tuple[int, float]:
    import openai

    tokens = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        barrier.wait()
        for r in range(requests):
            out = api.chat.completions.create(
                model="bench", temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(i * 100 + r)}},
                    {"type": "text", "text": f"Describe picture number {i * 100 + r} in detail."}]}])
            tokens[i] += out.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: build a random one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's torch threads (1: steadiest on a shared 2-core machine)")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default=None,
                        help="restrict the servers to these kernels (avx2: as on an AVX2-only CPU)")
    parser.add_argument("--decoder", default="4x256", type=decoder_shape,
                        help="the random checkpoint's decoder, LAYERSxWIDTH (ignored with --model)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_checkpoint(Path(tmp) / "model", *args.decoder)
        results = {}
        for max_batch in (args.clients, 1):
            proc, port = start_server(model, max_batch, args.threads, env=ISA_ENV.get(args.isa))
            url = f"http://127.0.0.1:{port}"
            try:
                run_clients(url, 2, 1, 4)  # warm-up
                tokens, seconds = run_clients(url, args.clients, args.requests, args.max_tokens)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            results[max_batch] = tokens / seconds
            print(f"--max-batch {max_batch}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s "
                  f"({args.clients} clients x {args.requests} requests x {args.max_tokens} tokens)", flush=True)
    ratio = results[args.clients] / results[1]
    kernels = f"{args.isa} kernels" if args.isa else "the environment's kernels"
    shape = "given checkpoint" if args.model else f"decoder {args.decoder[0]}x{args.decoder[1]}"
    print(f"continuous batching / one at a time: {ratio:.2f}x (target >= 3x); {shape}, {kernels}, "
          f"{args.threads} thread(s), load average {load_average()}")


def decoder_shape(text: str) -> tuple[int, int]:
    """"12x512" -> (12, 512): a decoder's layers and width (a multiple of 64)."""
    try:
        layers, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--decoder wants LAYERSxWIDTH, e.g. 4x256, not {text!r}") from None
    if layers < 1 or width < 64 or width % 64:
        raise argparse.ArgumentTypeError(f"--decoder {text}: at least one layer, width a multiple of 64")
    return layers, width


def load_average() -> str:
    """The 1-minute load average (other jobs on a shared machine move the figures), or "n/a"."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
