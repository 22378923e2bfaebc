"""`vlmkit serve --model DIR`: the OpenAI-compatible server with its web chat page."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlmkit.errors import ConfigError
from vlmkit.serve.settings import ImageLimits, ServerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a vlmkit checkpoint or a transformers VLM directory (VLM.load)")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter directory (peft's format, e.g. RUN/adapters/STAGE) to merge into --model")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--allow-dir", default=None,
                        help="allow image_url / video_url file:// paths inside this directory (refused otherwise)")
    parser.add_argument("--max-batch", type=int, default=ServerSettings.max_batch,
                        help="requests decoded together (continuous batching); 1 = one at a time")
    parser.add_argument("--max-queue", type=int, default=ServerSettings.max_queue, help="waiting requests before 429")
    parser.add_argument("--max-tokens-cap", type=int, default=ServerSettings.max_tokens_cap,
                        help="largest max_tokens a request may ask")
    parser.add_argument("--request-timeout", type=float, default=ServerSettings.request_timeout_s,
                        help="seconds a request may wait and decode before it ends with a 504")
    parser.add_argument("--drain-timeout", type=float, default=ServerSettings.drain_timeout_s,
                        help="on SIGTERM: seconds running requests may take to finish before they are cut")
    parser.add_argument("--log-requests", action="store_true",
                        help="log one line per request (id, outcome, token counts, seconds; no text)")
    parser.add_argument("--log-prompts", action="store_true",
                        help="also log each request's messages (off by default: prompts may be private)")
    parser.add_argument("--name", default=None, help="model id reported by /v1/models (default: the directory name)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); fewer avoids oversubscribing shared cores")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top, to keep torch and the web framework out of `vlmkit serve --help`.
    import torch

    from vlmkit.api import VLM
    from vlmkit.infer.engine import Engine
    from vlmkit.serve.app import create_app
    from vlmkit.serve.server import run_server

    if args.max_batch < 1 or args.max_queue < 1:
        raise ConfigError("--max-batch and --max-queue must be >= 1")
    if args.request_timeout <= 0 or args.drain_timeout < 0:
        raise ConfigError("--request-timeout must be > 0 and --drain-timeout >= 0")
    allow_dir = Path(args.allow_dir) if args.allow_dir else None
    if allow_dir is not None and not allow_dir.is_dir():
        raise ConfigError(f"--allow-dir {allow_dir} is not a directory")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VLM.load(args.model, adapter=args.adapter).to(device).eval()
    settings = ServerSettings(model_name=args.name or Path(args.model).resolve().name, api_key=args.api_key,
                              max_batch=args.max_batch, max_queue=args.max_queue,
                              max_tokens_cap=args.max_tokens_cap, request_timeout_s=args.request_timeout,
                              drain_timeout_s=args.drain_timeout, log_prompts=args.log_prompts,
                              images=ImageLimits(allow_dir=allow_dir))
    if args.log_requests or args.log_prompts:
        _log_to_stderr()
    app = create_app(Engine(model), settings)
    print(f"vlmkit serve: {settings.model_name} on http://{args.host}:{args.port}/ "
          f"(max batch {settings.max_batch})", flush=True)
    run_server(app, args.host, args.port)
    return 0


def _log_to_stderr() -> None:
    """The server's INFO lines (one per request) to stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("vlmkit.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
