"""Running the app with uvicorn, and shutting it down cleanly: `run_server(app, host, port)`.

On SIGTERM (how process managers and clusters stop a service) or Ctrl-C the server drains: it
stops accepting connections and new requests (503 with Retry-After on a connection still open),
lets the requests it already took finish for `ServerSettings.drain_timeout_s` seconds, cuts the
rest (a 503, or an error event on a stream), stops the scheduler and returns, so that
`vlmkit serve` exits 0. uvicorn alone would re-raise the signal after its own shutdown, and the
process would end killed by it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from vlmkit.serve.scheduler import Scheduler

DRAIN_MARGIN_S = 5.0
"""uvicorn's own graceful-shutdown limit past the drain's grace period: by then the cut requests'
answers are sent; uvicorn cancels whatever is left."""
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that drains the scheduler on SIGTERM / SIGINT and returns instead of
    re-raising the signal."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler = scheduler
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame) -> None:
        self.scheduler.drain(self.grace_s)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(app: FastAPI, host: str, port: int) -> None:
    """Serve `app` (serve/app.py's `create_app`) until SIGTERM or Ctrl-C, then drain and return."""
    grace_s = app.state.settings.drain_timeout_s
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=grace_s + DRAIN_MARGIN_S)
    DrainingServer(config, app.state.scheduler, grace_s).run()
