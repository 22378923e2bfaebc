"""Continuous batching: one thread owns the engine and interleaves every request's decode steps.

Between two decode steps the scheduler retires finished or cancelled sequences and admits
waiting requests (prefill, then a new row in the running batch), so a request that arrives while
others are generating joins them at the next step instead of waiting for the batch to drain (the
iteration-level scheduling of Orca, Yu et al. OSDI 2022, as in vLLM and TGI).

The engine is touched only from the scheduler thread. Request handlers talk to it through
`submit` (thread-safe, raises QueueFullError when the waiting line is full, DrainingError once
the server is shutting down) and `cancel`, and receive `Event`s through the callback they pass;
callbacks run on the scheduler thread and must not block.

Every request leaves the scheduler once, with one of serve/metrics.py's OUTCOMES: finished;
cancelled (its client went away: `cancel` takes it out of the waiting line at once, or its row and
cache slots out of the batch before the next step); timed out (past its deadline, waiting or
decoding); failed (an error inside the engine); shut down (cut by a drain past its grace period,
or by `stop`). Its callback hears of every outcome but finished and cancelled as an error event.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from vlmkit.data.prompt import Prompt
from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine, Sequence
from vlmkit.infer.sampling import SamplingParams
from vlmkit.serve.metrics import CANCELLED, FAILED, FINISHED, SHUT_DOWN, TIMED_OUT, ServerMetrics
from vlmkit.serve.settings import ServerSettings

log = logging.getLogger("vlmkit.serve")

STOP_TIMEOUT_S = 30
"""How long `stop` waits for the scheduler thread (it finishes the decode step it is in)."""
SHUTTING_DOWN = "the server is shutting down"


class QueueFullError(VlmkitError):
    """The rows and the waiting line are full; the client should retry later (HTTP 429)."""


class DrainingError(VlmkitError):
    """The server is shutting down and takes no new request (HTTP 503)."""


@dataclass
class Event:
    """What a request learns after a step: new text, and at the end why it stopped and its usage."""

    delta: str = ""
    finish_reason: str | None = None  # "stop" | "length" when done; None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request ended without its answer
    outcome: str | None = None  # with `error`: why it ended (TIMED_OUT, FAILED or SHUT_DOWN)


@dataclass(eq=False)  # a ticket is itself only: the waiting line finds one by identity
class Ticket:
    """One submitted request as the scheduler tracks it."""

    id: int
    prompt: Prompt
    params: SamplingParams
    on_event: Callable[[Event], None]
    arrived: float
    """time.monotonic() when the request arrived; its time to first token counts from here."""
    deadline: float
    """time.monotonic() past which it is timed out, waiting or decoding."""
    stop_as: str | None = None
    """Set by `cancel` (or a deadline): the outcome it leaves with unless it finished first."""
    outcome: str | None = None
    """How it left the scheduler (serve/metrics.py's OUTCOMES); None while it is in."""
    first_token_at: float | None = None
    seq: Sequence | None = field(default=None, repr=False)


class Scheduler:
    """Runs `engine` on a daemon thread; at most `max_batch` rows decode together."""

    def __init__(self, engine: Engine, max_batch: int = ServerSettings.max_batch,
                 max_queue: int = ServerSettings.max_queue, timeout_s: float = ServerSettings.request_timeout_s,
                 metrics: ServerMetrics | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: list[Ticket] = []
        self._taken = 0  # requests submitted that have not ended: waiting, being admitted or running
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._drain_deadline: float | None = None  # set by `drain`: when running requests are cut
        self._thread = threading.Thread(target=self._loop, name="vlmkit-scheduler", daemon=True)
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_rows_seen = 0  # the widest decode batch so far
        self.cache_rows = 0  # rows the engine's KV cache holds, as of the scheduler's last round
        self.cache_slots = 0  # token positions allocated in it
        self.metrics.queue_depth.set_function(lambda: self.num_waiting)
        self.metrics.running_rows.set_function(lambda: self.num_running)
        self.metrics.cache_rows.set_function(lambda: self.cache_rows)
        self.metrics.cache_slots.set_function(lambda: self.cache_slots)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=STOP_TIMEOUT_S)

    def drain(self, grace_s: float) -> None:
        """Take no new request; those already taken may finish within `grace_s` seconds, then are
        cut (SHUT_DOWN). A second call keeps the first deadline."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace_s
            self._cond.notify_all()

    def submit(self, prompt: Prompt, params: SamplingParams, on_event: Callable[[Event], None],
               arrived: float | None = None) -> Ticket:
        """Queue a request that arrived at `arrived` (time.monotonic(); default now)."""
        arrived = time.monotonic() if arrived is None else arrived
        with self._cond:
            if self._stop or self._drain_deadline is not None:
                raise DrainingError(f"{SHUTTING_DOWN}; retry later")
            if self._taken >= self.max_batch + self.max_queue:
                raise QueueFullError(f"the server is busy: {self._taken} requests are running or waiting (limit "
                                     f"{self.max_batch} running + {self.max_queue} waiting); retry later")
            ticket = Ticket(next(self._ids), prompt, params, on_event, arrived, arrived + self.timeout_s)
            self._taken += 1
            self._waiting.append(ticket)
            self._cond.notify_all()
            return ticket

    def cancel(self, ticket: Ticket, outcome: str = CANCELLED) -> None:
        """Stop a request: a waiting one leaves the line now, a running one's row leaves the batch
        before the next step. A request that already ended keeps its outcome."""
        with self._cond:
            if ticket.stop_as is None:
                ticket.stop_as = outcome
            if ticket.outcome is None and ticket in self._waiting:
                self._waiting.remove(ticket)
                self._end(ticket, ticket.stop_as)
            self._cond.notify_all()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread runs (it stops with `stop`, or on an error of its own)."""
        return self._thread.is_alive()

    # ---- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._round():
                pass
        except Exception:  # a defect of the scheduler itself: /health then reports the server down
            log.exception("the scheduler stopped on an unexpected error")
        with self._cond:
            self._stop = True  # whatever stopped the loop, `submit` refuses from now on
            left = self._running + list(self._waiting)
            self._running, self._waiting = [], collections.deque()
        for ticket in left:
            self.engine.remove(ticket.seq)
            self._fail(ticket, SHUT_DOWN, SHUTTING_DOWN)
        self._note_cache()

    def _round(self) -> bool:
        """Admit, decode one step, retire; False once stopped."""
        with self._cond:
            while not self._stop and not self._waiting and not self._running:
                self._cond.wait()
            if self._stop:
                return False
            admit = []
            while self._waiting and len(self._running) + len(admit) < self.max_batch:
                admit.append(self._waiting.popleft())
        for ticket in admit:
            self._admit(ticket)
        self._retire()
        if self._running:
            self._step()
            self._retire()
        self._expire()
        self._note_cache()
        return True

    def _admit(self, ticket: Ticket) -> None:
        if ticket.stop_as is not None:
            self._end(ticket, ticket.stop_as)
            return
        try:
            ticket.seq = self.engine.add(ticket.prompt, ticket.params)
        except Exception as e:  # one bad request must not stop the others
            log.exception("prefill failed for request %d", ticket.id)
            self._fail(ticket, FAILED, f"generation failed: {e}")
            return
        ticket.first_token_at = time.monotonic()
        self.metrics.time_to_first_token.observe(ticket.first_token_at - ticket.arrived)
        self.metrics.generated(1)
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
                self._fail(ticket, FAILED, f"generation failed: {e}")
            self._running = []
            return
        self.metrics.generated(len(self._running))  # retired before the step: every row got a token
        for ticket in self._running:
            self._emit(ticket)

    def _retire(self) -> None:
        """Drop the rows of finished and stopped requests (the engine frees their cache rows)."""
        keep = []
        for ticket in self._running:
            if ticket.seq.finished:
                self._end(ticket, FINISHED)
            elif ticket.stop_as is not None:
                self._end(ticket, ticket.stop_as)
            else:
                keep.append(ticket)
                continue
            self.engine.remove(ticket.seq)
        self._running = keep

    def _expire(self) -> None:
        """Time out requests past their deadline; past a drain's grace period, cut every request."""
        now = time.monotonic()
        cut = self._drain_deadline is not None and now >= self._drain_deadline
        outcome, message = (SHUT_DOWN, SHUTTING_DOWN) if cut else (
            TIMED_OUT, f"the request did not finish within the server's timeout of {self.timeout_s:g} s")
        with self._cond:
            late = [t for t in self._waiting if cut or t.deadline <= now]
            for ticket in late:
                self._waiting.remove(ticket)
        for ticket in late:
            self._fail(ticket, outcome, message)
        late_running = [t for t in self._running if t.stop_as is None and (cut or t.deadline <= now)]
        for ticket in late_running:
            ticket.stop_as = outcome
            self._send(ticket, Event(error=message, outcome=outcome))
        if late_running:
            self._retire()

    def _note_cache(self) -> None:
        cache = self.engine.cache
        self.cache_rows = len(cache) if cache is not None else 0
        self.cache_slots = self.cache_rows * cache.capacity if cache is not None else 0

    def _end(self, ticket: Ticket, outcome: str) -> None:
        with self._cond:
            ticket.outcome = outcome
            self._taken -= 1
        seq = ticket.seq
        decoding = time.monotonic() - ticket.first_token_at if ticket.first_token_at is not None else 0.0
        self.metrics.ended(outcome, seq.num_output_tokens if seq is not None else 0, decoding)

    def _emit(self, ticket: Ticket) -> None:
        seq = ticket.seq
        delta = seq.take_delta()
        if not delta and not seq.finished:
            return
        event = Event(delta=delta, finish_reason=seq.finish_reason,
                      prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens)
        self._send(ticket, event)

    def _fail(self, ticket: Ticket, outcome: str, message: str) -> None:
        self._end(ticket, outcome)
        self._send(ticket, Event(error=message, outcome=outcome))

    def _send(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.on_event(event)
        except Exception:
            log.exception("event callback failed for request %d", ticket.id)
            if ticket.stop_as is None:
                ticket.stop_as = FAILED
