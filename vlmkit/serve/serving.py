"""Serving chat completions: request -> prompt -> scheduler -> answer, without the HTTP.

    ChatServing.create(request)   the `chat.completion` body, or with `stream: true` an
                                  `EventStream` of server-sent events (serve/protocol.py writes both)

A request is checked beyond its schema and its prompt built in a worker thread (images are
decoded there: infer/generate.py's `prompt_for`, with `RequestImages` as the image resolver and
serve/videos.py's `RequestVideos` as the video resolver), so a bad request is refused before it
reaches the scheduler thread, which runs every request's decode
steps in one continuously changing batch (serve/scheduler.py). Whatever ends a request (its
answer, its client gone, its deadline, a drain) cancels its ticket, which frees its row.

A request that ends without its answer gets the error of its outcome: 500 (the engine failed on
it), 503 (the server is shutting down), 504 (past the server's timeout); streamed, an error event.
One log line per request (id, outcome, token counts, seconds) carries no text: its messages are
logged only with `ServerSettings.log_prompts`. The routes, authentication and error handlers are
serve/app.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from PIL import Image
from starlette.concurrency import run_in_threadpool

from vlmkit.data.prompt import Prompt
from vlmkit.errors import BadRecordError, VlmkitError
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import prompt_for
from vlmkit.infer.sampling import SamplingParams
from vlmkit.serve.images import resolve_image
from vlmkit.serve.metrics import CANCELLED, SHUT_DOWN, TIMED_OUT
from vlmkit.serve.protocol import (MAX_STOP_STRINGS, SSE_DONE, APIError, ChatCompletionRequest, Completion,
                                   bad_request, busy, chunk_body, completion_body, shutting_down,
                                   sse_event, usage_body, usage_chunk_body)
from vlmkit.serve.scheduler import DrainingError, Event, QueueFullError, Scheduler, Ticket
from vlmkit.serve.settings import ImageLimits, ServerSettings
from vlmkit.serve.videos import RequestVideos, video_error

log = logging.getLogger("vlmkit.serve")

SCRATCH_PREFIX = "vlmkit-request-"
NO_SCRATCH = os.devnull
"""The scratch directory given to a model that takes no video: never written, since RequestVideos
refuses a video part before writing it."""
VIDEO_REASONS = {"missing_video", "empty_video", "not_a_video", "truncated_video", "mixed_frame_sizes",
                 "not_an_image", "truncated_image", "image_too_large"}
"""Reasons the processor gives for a video it cannot decode past its first frame (a bad frame
in a directory, a file shorter than its header says); images are decoded before, by RequestImages."""


class RequestImages:
    """The image resolver of one request (data/messages.py calls it for each image part, in order):
    images in user messages only, at most `max_images` of them, each decoded within the limits.
    Raises APIError (400 / 413) naming the part, e.g. messages[0].content[1]."""

    def __init__(self, limits: ImageLimits):
        self.limits = limits
        self.count = 0

    def __call__(self, url: str, where: str, role: str) -> Image.Image:
        self.count += 1
        if self.count > self.limits.max_images:
            raise bad_request(f"{where}: more than {self.limits.max_images} images in one request", where,
                              "too_many_images")
        if role != "user":
            raise bad_request(f"{where}: images are allowed in user messages only", where)
        return resolve_image(url, self.limits, where)


class EventRelay:
    """Hands events from the scheduler thread to one event loop: a single wake-up of the loop
    carries every event posted since the last one. A decode step ends with an event per running
    row; waking the loop for each (a write to its self-pipe, a turn of the loop) would cost the
    scheduler thread the GIL once per row and step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        """Put `event` on `queue` from any thread (the loop's own included)."""
        with self._lock:
            wake = not self._pending  # otherwise a wake-up is already scheduled and will take it
            self._pending.append((queue, event))
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class WholeAnswer:
    """The scheduler callback of a request answered in one piece (not streamed): it gathers the
    text deltas on the scheduler thread and passes on only the last event, carrying the whole
    text, or an error, so the event loop hears of the request once instead of once per token."""

    def __init__(self, deliver: Callable[[Event], None]):
        self._deliver = deliver
        self._pieces: list[str] = []

    def __call__(self, event: Event) -> None:
        if event.error is not None:
            self._deliver(event)
        elif event.finish_reason is None:
            self._pieces.append(event.delta)
        else:
            self._pieces.append(event.delta)
            self._deliver(dataclasses.replace(event, delta="".join(self._pieces)))


@dataclass
class Submitted:
    """A request in the scheduler's hands: its ticket, the queue its events arrive on, its ids."""

    ticket: Ticket
    events: asyncio.Queue
    completion: Completion


@dataclass
class EventStream:
    """A streamed answer: its server-sent events, and `close`, which frees its request; the HTTP
    side calls it however the response ends, also when the stream never started."""

    events: AsyncIterator[str]
    close: Callable[[], None]


class ChatServing:
    """POST /v1/chat/completions for one engine, driven through its scheduler."""

    def __init__(self, engine: Engine, scheduler: Scheduler, settings: ServerSettings):
        self.engine = engine
        self.scheduler = scheduler
        self.settings = settings
        self._relay: EventRelay | None = None  # for the event loop the requests run on

    async def create(self, request: ChatCompletionRequest) -> dict | EventStream:
        """The answer to a request: its `chat.completion` body, or with `stream` its events."""
        arrived = time.monotonic()
        prompt, params = await run_in_threadpool(self.prepare, request)
        submitted = self.submit(prompt, params, arrived, whole=not request.stream)
        if self.settings.log_prompts:
            log.info("%s messages:\n%s", submitted.completion.id, request.transcript())
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return EventStream(self.stream(submitted, include_usage), lambda: self.scheduler.cancel(submitted.ticket))
        return await self.complete(submitted)

    # ---- request -> prompt (a worker thread) ---------------------------------------------------

    def prepare(self, request: ChatCompletionRequest) -> tuple[Prompt, SamplingParams]:
        """Check a request beyond its schema and build its prompt; raises APIError (400 / 413)."""
        if request.n != 1:
            raise bad_request(f"n={request.n} is not supported; this server returns one choice (n=1)", "n")
        stop = request.stop_list()
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise bad_request(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                              "stop")
        cap = self.settings.max_tokens_cap
        requested = request.requested_max_tokens()
        if requested is not None and requested > cap:
            raise bad_request(f"max_tokens {requested} is over this server's limit of {cap}", "max_tokens")
        prompt = self.build(request)
        params = SamplingParams(max_new_tokens=self._max_new_tokens(len(prompt.input_ids), requested),
                                temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                                repetition_penalty=request.repetition_penalty, seed=request.seed, stop=stop,
                                ignore_eos=request.ignore_eos)
        return prompt, params

    def build(self, request: ChatCompletionRequest) -> Prompt:
        """The request's prompt through the model's own processor (tiles, or native-resolution grids
        and videos); a data-URL video lives in a scratch directory only while its prompt is built."""
        conversation = [message.model_dump(exclude_none=True) for message in request.messages]
        vlm = self.engine.vlm
        limits = self.settings.images
        takes_video = vlm.config.is_native
        # Only a model that takes videos makes a scratch directory: creating and removing one are
        # file-system calls (a removal can take milliseconds), on every request's way in.
        scratch = (tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) if takes_video
                   else contextlib.nullcontext(NO_SCRATCH))
        with scratch as directory:
            videos = RequestVideos(limits, Path(directory), takes_video=takes_video)
            try:
                return prompt_for(vlm, conversation, RequestImages(limits), videos)
            except BadRecordError as e:
                if len(videos.parts) == 1 and e.reason in VIDEO_REASONS:  # only that video can be at fault
                    raise video_error(e, videos.parts[0]) from None
                raise bad_request(str(e), "messages") from None
            except VlmkitError as e:
                raise bad_request(str(e), "messages") from None

    def _max_new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """The request's max_tokens (by default as many as the cap and the context allow), checked
        against the room the prompt leaves in the model's context."""
        context = self.engine.max_positions
        room = context - prompt_tokens
        max_tokens = requested if requested is not None else min(self.settings.max_tokens_cap, room)
        if room < 1 or max_tokens > room:
            raise bad_request(f"the prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} it exceeds "
                              f"the model's context of {context} tokens", "messages", "context_length_exceeded")
        return max_tokens

    # ---- prompt -> scheduler -> answer (the event loop) ----------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams, arrived: float, whole: bool) -> Submitted:
        """Hand the prompt to the scheduler; its events come back on this event loop: every text
        delta, or with `whole` one event with the whole text (`WholeAnswer`). 429 when the
        scheduler's waiting line is full, 503 once the server is shutting down."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        relay = self._relay
        if relay is None or relay.loop is not loop:  # the first request, or a new loop (tests start several)
            relay = self._relay = EventRelay(loop)

        def deliver(event: Event) -> None:
            relay.post(events, event)

        try:
            ticket = self.scheduler.submit(prompt, params, WholeAnswer(deliver) if whole else deliver, arrived)
        except QueueFullError as e:
            raise busy(str(e), self.settings.retry_after_s) from None
        except DrainingError as e:
            raise shutting_down(str(e), self.settings.retry_after_s) from None
        completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.settings.model_name)
        return Submitted(ticket, events, completion)

    async def complete(self, submitted: Submitted) -> dict:
        """Wait for the whole answer (submitted with `whole`: one event); an answer cut short is its
        outcome's error (500, 503, 504)."""
        event = Event()
        try:
            event = await submitted.events.get()
            if event.error is not None:
                raise self._error(event)
        finally:
            self.scheduler.cancel(submitted.ticket)
            _log_end(submitted, event)
        return completion_body(submitted.completion, event.delta, event.finish_reason, _usage(event))

    async def stream(self, submitted: Submitted, include_usage: bool) -> AsyncIterator[str]:
        """The answer as server-sent events: a role chunk, content chunks, the finish chunk, the usage
        chunk (include_usage), [DONE]; a failure becomes an error event. Whatever ends the stream
        (done, client gone, server stopping) frees the request's row."""
        completion = submitted.completion
        event = Event()
        try:
            yield sse_event(chunk_body(completion, {"role": "assistant", "content": ""}, None, include_usage))
            while True:
                event = await submitted.events.get()
                if event.error is not None:
                    yield sse_event(self._error(event).body())
                    break
                if event.delta:
                    yield sse_event(chunk_body(completion, {"content": event.delta}, None, include_usage))
                if event.finish_reason is not None:
                    yield sse_event(chunk_body(completion, {}, event.finish_reason, include_usage))
                    if include_usage:
                        yield sse_event(usage_chunk_body(completion, _usage(event)))
                    break
            yield SSE_DONE
        finally:
            self.scheduler.cancel(submitted.ticket)
            _log_end(submitted, event)

    def _error(self, event: Event) -> APIError:
        """The error of a request that ended without its answer (event.outcome says why)."""
        if event.outcome == SHUT_DOWN:
            return shutting_down(event.error, self.settings.retry_after_s)
        if event.outcome == TIMED_OUT:
            return APIError(504, event.error, "server_error", None, "request_timeout")
        return APIError(500, event.error, "server_error", None, "generation_failed")


def _usage(event: Event) -> dict:
    return usage_body(event.prompt_tokens, event.completion_tokens)


def _log_end(submitted: Submitted, last: Event) -> None:
    """One line per request, without its text; `last` is the last event it got (none: its client
    went away first)."""
    ended = last.finish_reason or last.outcome or CANCELLED
    log.info("%s: %s after %.3f s, %d prompt tokens, %d completion tokens", submitted.completion.id, ended,
             time.monotonic() - submitted.ticket.arrived, len(submitted.ticket.prompt.input_ids),
             last.completion_tokens)
