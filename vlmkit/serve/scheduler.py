"""Continuous batching: one thread owns the engine and interleaves every request's decode steps.

Between two decode steps the scheduler retires finished or cancelled sequences and admits
waiting requests (prefill, then a new row in the running batch), so a request that arrives while
others are generating joins them at the next step instead of waiting for the batch to drain (the
iteration-level scheduling of Orca, Yu et al. OSDI 2022, as in vLLM and TGI).

The engine is touched only from the scheduler thread. Request handlers talk to it through
`submit` (thread-safe, raises QueueFullError when the waiting line is full) and receive `Event`s
through the callback they pass; callbacks run on the scheduler thread and must not block.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from vlmkit.data.prompt import Prompt
from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine, Sequence
from vlmkit.infer.sampling import SamplingParams
from vlmkit.serve.settings import ServerSettings

log = logging.getLogger("vlmkit.serve")

STOP_TIMEOUT_S = 30
"""How long `stop` waits for the scheduler thread (it finishes the decode step it is in)."""


class QueueFullError(VlmkitError):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


@dataclass
class Event:
    """What a request learns after a step: new text, and at the end why it stopped and its usage."""

    delta: str = ""
    finish_reason: str | None = None  # "stop" | "length" when done; None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request failed inside the engine


@dataclass
class Ticket:
    """One submitted request as the scheduler tracks it."""

    id: int
    prompt: Prompt
    params: SamplingParams
    on_event: Callable[[Event], None]
    cancelled: bool = False
    seq: Sequence | None = field(default=None, repr=False)


class Scheduler:
    """Runs `engine` on a daemon thread; at most `max_batch` rows decode together."""

    def __init__(self, engine: Engine, max_batch: int = ServerSettings.max_batch,
                 max_queue: int = ServerSettings.max_queue):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: list[Ticket] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="vlmkit-scheduler", daemon=True)
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_rows_seen = 0  # the widest decode batch so far

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=STOP_TIMEOUT_S)

    def submit(self, prompt: Prompt, params: SamplingParams, on_event: Callable[[Event], None]) -> Ticket:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are already waiting "
                                     f"(limit {self.max_queue}); retry later")
            ticket = Ticket(next(self._ids), prompt, params, on_event)
            self._waiting.append(ticket)
            self._cond.notify_all()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (its client went away); its row leaves the batch before the next step."""
        with self._cond:
            ticket.cancelled = True
            self._cond.notify_all()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ---- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
            for ticket in admit:
                self._admit(ticket)
            self._retire()
            if self._running:
                self._step()
                self._retire()
        for ticket in self._running + list(self._waiting):
            self._fail(ticket, "the server is shutting down")

    def _admit(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            return
        try:
            ticket.seq = self.engine.add(ticket.prompt, ticket.params)
        except Exception as e:  # one bad request must not stop the others
            log.exception("prefill failed for request %d", ticket.id)
            self._fail(ticket, f"generation failed: {e}")
            return
        self._running.append(ticket)
        self._emit(ticket)

    def _step(self) -> None:
        self.max_rows_seen = max(self.max_rows_seen, len(self._running))
        try:
            self.engine.step()
            self.steps += 1
        except Exception as e:
            log.exception("decode step failed")
            for ticket in self._running:
                self.engine.remove(ticket.seq)
                self._fail(ticket, f"generation failed: {e}")
            self._running = []
            return
        for ticket in self._running:
            self._emit(ticket)

    def _retire(self) -> None:
        keep = []
        for ticket in self._running:
            if ticket.cancelled or ticket.seq.finished:
                self.engine.remove(ticket.seq)
            else:
                keep.append(ticket)
        self._running = keep

    def _emit(self, ticket: Ticket) -> None:
        seq = ticket.seq
        delta = seq.take_delta()
        if not delta and not seq.finished:
            return
        event = Event(delta=delta, finish_reason=seq.finish_reason,
                      prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens)
        self._send(ticket, event)

    def _fail(self, ticket: Ticket, message: str) -> None:
        self._send(ticket, Event(error=message))

    def _send(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.on_event(event)
        except Exception:
            log.exception("event callback failed for request %d", ticket.id)
            ticket.cancelled = True
