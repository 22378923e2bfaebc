"""lmms-eval's `vlmkit` model: any checkpoint `VLM.load` reads, on any lmms-eval task.

    pip install "vlmkit[eval]"
    lmms-eval --model vlmkit --model_args pretrained=runs/demo/final --tasks mme --batch_size 8

lmms-eval finds the model through the `lmms_eval.models` entry point (eval/lmms_manifest.py).
Model arguments: `pretrained=DIR` (required), `adapter=DIR` (a LoRA adapter merged in),
`device=cpu|cuda|cuda:1` (default: cuda when available), `dtype=float32|bfloat16|float16` (default:
the checkpoint's), `images_after_text=true` (put the visuals after the text, as a
`text-then-image` synthetic world asks), `max_new_tokens=N` (a task that sets none); `--batch_size` is the rows decoding together.

A request's context and its visuals (its task's `doc_to_visual`: PIL images, or paths: an image
file's, else a video's) become one user turn, put as `vlmkit eval` puts a question
(eval/prompts.py's `user_turn`: visuals first unless `images_after_text`), so an item gets the same
tokens here as there (docs/evaluation.md, "Running lmms-eval tasks on a vlmkit model").

  generate_until  the turn's prompt (eval/runner.py's `reply_prompt`) through the engine, as
                  `vlmkit eval` generates (`engine_replies`), requests grouped by their generation
                  settings; the reply stops before the first `until` string.
  loglikelihood   the continuation (its leading delimiter dropped) as the assistant's reply, scored
                  through the packed training forward as `vlmkit eval --mode ppl` scores an option
                  (`reply_samples`, eval/ppl.py's `sequence_logprobs`) over its supervised tokens
                  (the reply's and its end-of-turn token), and whether greedy decoding of the turn
                  gives exactly those tokens.

The first value `loglikelihood` returns follows lmms-eval 0.7 as it runs rather than as its base
class describes: its multiple-choice scoring picks the option with the smallest value, because its
own models return their loss, so this model returns the continuation's mean negative
log-likelihood per supervised token (the loss), and a multiple-choice pick is the option
`vlmkit eval --mode ppl` picks. lmms-eval 0.7's evaluator turns any answer but a string or a
`GenerationResult` into its str(), so each (value, is_greedy) pair travels as a GenerationResult's
text; `continuation_scores` gives the pairs themselves.

A request that cannot be asked (an unreadable visual, a prompt past the model's context) gets an
empty reply or an infinite loss, is logged and kept in `bad_requests` with its reason (as
`vlmkit eval` reports bad rows), and the run goes on.
"""

from __future__ import annotations

import json
import logging
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from vlmkit.api import VLM
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import IMAGE_EXTENSIONS
from vlmkit.data.prompt import Prompt
from vlmkit.data.types import Sample
from vlmkit.errors import BadRecordError, ConfigError, VlmkitError
from vlmkit.eval.benchmarks import BadRow
from vlmkit.eval.ppl import length_normalised, sequence_logprobs
from vlmkit.eval.prompts import user_turn
from vlmkit.eval.runner import DEFAULT_REPLY_TOKENS, GEN_CHUNK_BATCHES, engine_replies, reply_prompt, reply_samples
from vlmkit.infer.engine import Engine
from vlmkit.infer.sampling import SamplingParams

log = logging.getLogger("vlmkit.eval")

DEFAULT_BATCH_SIZE = 8
SAMPLING_TEMPERATURE = 1.0
"""The temperature of `do_sample: true` without one (transformers' default)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VlmkitLMM(lmms):
    """A vlmkit model as lmms-eval's `lmms` (one process, one device); see the module docstring."""

    def __init__(self, pretrained: str, adapter: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 device: str | None = None, dtype: str | None = None, images_after_text: bool = False,
                 max_new_tokens: int = DEFAULT_REPLY_TOKENS, max_batch_size: int | None = None) -> None:
        """`max_batch_size` is lmms-eval's cap for its automatic batch size, which vlmkit does not
        use; it is accepted because lmms-eval passes it to every model."""
        super().__init__()
        model = VLM.load(pretrained, adapter=adapter)
        if model.tokenizer is None:
            raise VlmkitError(f"{pretrained}: the model has no tokenizer; evaluate a checkpoint saved with one")
        self.model = model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
                              _dtype(dtype)).eval()
        self.batch_size = _whole_number("batch_size", batch_size)
        self.images_after_text = images_after_text
        self.max_new_tokens = _whole_number("max_new_tokens", max_new_tokens)
        self.bad_requests: list[BadRow] = []
        """Requests that could not be asked, in the order met (`index`: the doc id, `id`: the task)."""

    @cached_property
    def engine(self) -> Engine:
        """The generation engine, made on first use (it builds derived decode weights)."""
        return Engine(self.model)

    # --- lmms-eval's requests ----------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's reply (see the module docstring); '' for a request that cannot be asked."""
        replies = [""] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        chunk_size = GEN_CHUNK_BATCHES * self.batch_size
        with tqdm(total=len(requests), desc="vlmkit generate", unit="req") as bar:
            for indices in by_settings.values():
                params = sampling_params(requests[indices[0]].args[1], self.max_new_tokens)
                for start in range(0, len(indices), chunk_size):
                    chunk = indices[start:start + chunk_size]
                    for i, reply in self._replies(requests, chunk, params).items():
                        replies[i] = reply
                    bar.update(len(chunk))
        return replies

    def _replies(self, requests: list[Instance], indices: list[int], params: SamplingParams) -> dict[int, str]:
        """The replies of the requests at `indices` that can be asked, decoded together."""
        asked, prompts = [], []
        for i in indices:
            try:
                prompts.append(reply_prompt(self.engine, self._turn(requests[i]), params.max_new_tokens))
                asked.append(i)
            except BadRecordError as e:
                self._bad(requests[i], e)
        return dict(zip(asked, engine_replies(self.engine, prompts, params, self.batch_size)))

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request (see the module docstring), a GenerationResult whose text is the pair
        (mean negative log-likelihood of the continuation's supervised tokens, whether greedy
        decoding gives it); (inf, False) for a request that cannot be asked. Requests that share a
        user turn (a multiple-choice item's options) decode its images and its greedy reply once;
        `batch_size` turns share one pack."""
        return [GenerationResult(text=score) for score in self.continuation_scores(requests)]

    def continuation_scores(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood, is_greedy) per request: what `loglikelihood` carries."""
        results: list[tuple[float, bool]] = [(math.inf, False)] * len(requests)
        by_turn: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, _, *visual_source = request.args
            by_turn.setdefault((context, *visual_source), []).append(i)
        turns = list(by_turn.values())
        with tqdm(total=len(requests), desc="vlmkit loglikelihood", unit="req") as bar:
            for start in range(0, len(turns), self.batch_size):
                batch = turns[start:start + self.batch_size]
                asked = [turn for turn in (self._reply_samples(requests, indices) for indices in batch) if turn]
                greedy = self._greedy_replies([[sample for _, sample in turn] for turn in asked])
                scored = [(i, sample, greedy_ids) for turn, greedy_ids in zip(asked, greedy) for i, sample in turn]
                means = length_normalised(sequence_logprobs(self.model, [sample for _, sample, _ in scored]))
                for (i, sample, greedy_ids), mean in zip(scored, means):
                    target = reply_targets(sample)
                    results[i] = (-mean, greedy_ids[:len(target)] == target)
                bar.update(sum(len(indices) for indices in batch))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vlmkit model answers single-turn requests (generate_until and "
                                  "loglikelihood); multi-round tasks are not supported")

    # --- a request's turn --------------------------------------------------------------------------

    def _turn(self, request: Instance) -> list[dict]:
        """The request's context and visuals as one OpenAI-style user turn. Raises BadRecordError."""
        images, videos = split_visuals(self._visuals(request))
        return user_turn(request.args[0], images, videos, images_after_text=self.images_after_text)

    def _visuals(self, request: Instance) -> list:
        """What the task's `doc_to_visual` gives for the request's document (nothing for a request
        without one: a multiple-choice task's unconditional continuations). Raises BadRecordError
        when it fails to read the document's files."""
        if len(request.args) < 3:
            return []
        doc_to_visual, doc_id, task, split = request.args[2:6]
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        except (OSError, ValueError) as e:  # a missing or undecodable file
            raise BadRecordError("unreadable_visual", f"doc_to_visual failed: {e}") from None
        return list(visuals or [])

    def _reply_samples(self, requests: list[Instance], indices: list[int]) -> list[tuple[int, Sample]]:
        """(request index, sample) for the requests of one user turn, each continuation as the
        reply; requests that cannot be asked are recorded and left out."""
        first = requests[indices[0]]
        try:
            messages = self._turn(first)
            replies = [self._continuation(requests[i]).lstrip() for i in indices]
            samples = reply_samples(self.model, self.model.image_processor(), messages, replies, str(first.doc_id))
        except BadRecordError as e:
            for i in indices:
                self._bad(requests[i], e)
            return []
        kept = []
        for i, sample in zip(indices, samples):
            if len(sample.input_ids) > self.engine.max_positions:
                self._bad(requests[i], BadRecordError("too_long", f"{len(sample.input_ids)} tokens exceed the "
                                                                  f"context of {self.engine.max_positions}"))
            else:
                kept.append((i, sample))
        return kept

    def _continuation(self, request: Instance) -> str:
        """The continuation: given as text (multiple-choice tasks), or the task's `doc_to_target`
        of the document (loglikelihood tasks)."""
        target = request.args[1]
        if isinstance(target, str):
            return target
        doc_id, task, split = request.args[3:6]
        return str(target(self.task_dict[task][split][doc_id]))

    def _greedy_replies(self, turns: list[list[Sample]]) -> list[list[int]]:
        """Each turn's greedy reply ids, as long as its longest supervised reply (or up to the end of
        turn): a reply is what greedy decoding gives (lmms-eval's `is_greedy`) when its supervised
        tokens (the reply and its end-of-turn token) begin these ids. The samples of a turn share
        their prompt; decoded through the engine, `batch_size` rows at once."""
        replies = []
        for start in range(0, len(turns), self.batch_size):
            chunk = turns[start:start + self.batch_size]
            sequences = [self.engine.add(reply_prefix(samples[0]),
                                         SamplingParams(max_new_tokens=max(len(reply_targets(s)) for s in samples)))
                         for samples in chunk]
            while not all(seq.finished for seq in sequences):
                self.engine.step()
            for seq in sequences:
                self.engine.remove(seq)
            replies += [seq.output_ids for seq in sequences]
        return replies

    def _bad(self, request: Instance, error: BadRecordError) -> None:
        self.bad_requests.append(BadRow.from_error(request.doc_id, error, request.task_name))
        log.warning("vlmkit: %s doc %s cannot be asked: %s", request.task_name, request.doc_id, error)


# --- helpers -----------------------------------------------------------------------------------------

def sampling_params(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> SamplingParams:
    """A task's `generation_kwargs` as engine settings: `until` -> stop strings, `max_new_tokens`,
    `temperature` with `do_sample` (greedy unless sampling; sampling without a temperature at 1),
    `top_p`, `top_k`, `repetition_penalty`. Other keys (`num_beams`, ...) are not used."""
    until = gen_kwargs.get("until") or []
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sample = gen_kwargs.get("do_sample", temperature > 0)
    return SamplingParams(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
                          temperature=(temperature or SAMPLING_TEMPERATURE) if sample else 0.0,
                          top_p=float(gen_kwargs.get("top_p") or 1.0), top_k=int(gen_kwargs.get("top_k") or 0),
                          repetition_penalty=float(gen_kwargs.get("repetition_penalty") or 1.0),
                          stop=[until] if isinstance(until, str) else list(until))


def split_visuals(visuals: list) -> tuple[list, list]:
    """(images, videos) of what `doc_to_visual` gave: PIL images and image-file paths are images,
    other paths videos (a file or a frame directory). Raises BadRecordError for anything else
    (audio, arrays)."""
    images, videos = [], []
    for visual in visuals:
        if isinstance(visual, Image.Image) or (isinstance(visual, (str, Path))
                                               and Path(visual).suffix.lower() in IMAGE_EXTENSIONS):
            images.append(visual)
        elif isinstance(visual, (str, Path)):
            videos.append(str(visual))
        else:
            raise BadRecordError("unsupported_visual", f"a {type(visual).__name__} visual; the vlmkit model "
                                                       "takes images and videos")
    return images, videos


def reply_prefix(sample: Sample) -> Prompt:
    """A reply sample's prompt: its tokens before the reply, with its images and videos."""
    start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    return Prompt(sample.input_ids[:start], sample.pixel_values, sample.image_grid_thw, sample.pixel_values_videos,
                  sample.video_grid_thw, sample.second_per_grid_ts)


def reply_targets(sample: Sample) -> list[int]:
    """A reply sample's supervised tokens, in order."""
    return [label for label in sample.labels if label != IGNORE_INDEX]


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _whole_number(name: str, value: int | str) -> int:
    """lmms-eval passes model arguments as parsed from text ('8' -> 8, 'auto' stays a string)."""
    if not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)
