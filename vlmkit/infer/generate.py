"""Conversations -> answers with one model: build each prompt (data/prompt.py), then run the engine.

    prompt_for(vlm, messages, resolve_image)   a conversation -> the model's Prompt (ids + pixels)
    generate_messages(vlm, messages, **kw)     one conversation -> str, a list of them -> list[str]
                                               (what `VLM.generate` runs)
    stream_messages(vlm, messages, **kw)       one conversation -> text deltas as they become final
                                               (the chat command)

`vlm` is a `VLM` (api.py): a model with its tokenizer and `image_processor()`. Keyword arguments
are SamplingParams fields (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
stop, stop_token_ids, ignore_eos), `decode` (how decode steps run: "dynamic", the default, "static"
or "graphs", CUDA graphs on a GPU; infer/static_decode.py) and, for `generate_messages`, max_batch
(rows decoded together).
"""

from __future__ import annotations

from typing import Iterator

from vlmkit.data.messages import ImageResolver, VideoResolver, keep_image
from vlmkit.data.prompt import Prompt, build_prompt
from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine
from vlmkit.infer.sampling import SamplingParams


def prompt_for(vlm, messages: list[dict], resolve_image: ImageResolver = keep_image,
               resolve_video: VideoResolver | None = None) -> Prompt:
    """The prompt of an OpenAI-style conversation for `vlm`: its tokenizer and chat template, its
    image processor (tiles, or a native model's grids and videos), its visual tokens per tile.
    Video parts need `resolve_video` (data/prompt.py's `build_prompt` refuses them without one).
    Raises BadRecordError for a conversation, image or video it cannot read."""
    if vlm.tokenizer is None:
        raise VlmkitError("this model has no tokenizer, so it cannot read messages; save the checkpoint "
                          "with its tokenizer")
    return build_prompt(messages, vlm.tokenizer, vlm.image_processor(), vlm.config.tokens_per_tile,
                        resolve_image, resolve_video)


def generate_messages(vlm, messages: list[dict] | list[list[dict]], **kw) -> str | list[str]:
    """Answer one conversation (-> str) or a list of conversations (-> list[str], batched). Image
    and video parts are taken as given (PIL images, paths, frame lists: the caller's own files)."""
    max_batch = kw.pop("max_batch", None)
    decode = kw.pop("decode", "dynamic")
    params = SamplingParams(**kw)
    batched = _is_batch(messages)
    prompts = [prompt_for(vlm, m, resolve_video=keep_image) for m in (messages if batched else [messages])]
    texts = [""] * len(prompts)
    for index, delta in Engine(vlm, decode=decode).run(prompts, params, max_batch):
        texts[index] += delta
    return texts if batched else texts[0]


def stream_messages(vlm, messages: list[dict], **kw) -> Iterator[str]:
    """Answer one conversation as a stream of text deltas."""
    decode = kw.pop("decode", "dynamic")
    prompt = prompt_for(vlm, messages, resolve_video=keep_image)
    for _, delta in Engine(vlm, decode=decode).run([prompt], SamplingParams(**kw)):
        yield delta


def _is_batch(messages) -> bool:
    """A list of conversations (each a list of messages) rather than one conversation."""
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)
