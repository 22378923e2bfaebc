"""Records to token ids and labels: chat templates, image-token expansion and loss masks.

    encode_record(record, tok, visual_tokens) -> (input_ids, labels)    training and scoring
    encode_prompt(messages, tok, visual_tokens) -> input_ids            generation (ends with the
                                                                         assistant header)
    render(messages, tok, add_generation_prompt) -> str                  the same text, for checks

What is supervised depends on the record's kind:
    chat     every assistant turn's content and its end-of-turn token (not the headers, not the
             user / system turns), as LLaVA-1.5 and Vicuna-style SFT mask them;
    caption  the caption: the images' tokens followed by the assistant turn's text and end of text,
             LLaVA-1.5's "plain" alignment format (the instruction of the user turn is dropped);
    text     every token of `record.text` and the end-of-text token.

Chat formats (the tokenizer's `template`): builtin, chatml and qwen_vl render
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, llama3 renders
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>` after
`<|begin_of_text|>`. The text equals what the tokenizer's jinja chat template produces (tests
compare with transformers' apply_chat_template); a loaded template's default system prompt (when
a conversation has none) and system prefix (Llama-3.1's date lines) are inserted the same way.
Headers, contents and images are tokenised as separate pieces, so the assistant's first token
is the same in training as after the generation prompt.

Each IMAGE_PLACEHOLDER in message content becomes visual_tokens[i] copies of the tokenizer's image
token id, for the i-th placeholder in reading order. Each VIDEO_PLACEHOLDER becomes videos[j]'s
tokens (`VideoTokens`: temporal groups x tokens per group of the video token). The qwen_vl format
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) wraps them as transformers' processors do: an image is
`<|vision_start|>` + its `<|image_pad|>` tokens + `<|vision_end|>`, a video the same with
`<|video_pad|>`, or, when the video carries group times (Qwen3-VL), one such group per temporal
group, each after the text `<{t:.1f} seconds>`; that text is tokenised together with the text just
before it, as the processor's expanded string is. Bad records raise BadRecordError with reasons
placeholder_mismatch, no_image_token, no_video_token, unknown_role, no_assistant_turn,
no_supervised_tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vlmkit.constants import (IGNORE_INDEX, IM_START, IMAGE_PLACEHOLDER, LLAMA3_HEADER_END, LLAMA3_HEADER_START,
                              VIDEO_PLACEHOLDER, VISION_END, VISION_START)
from vlmkit.data.types import Message, Record
from vlmkit.errors import BadRecordError

ROLES = ("system", "user", "assistant")

# A piece is ("text", str) or ("id", int) or ("ids", list[int]) or ("image" | "video", index);
# `supervised` marks the loss.
Piece = tuple[str, object, bool]

_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
_VISUAL_KIND = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}


@dataclass(frozen=True)
class VideoTokens:
    """How many tokens one video takes in the text, and the times written before its groups."""

    groups: int
    """Temporal groups (grid_thw's t)."""
    tokens_per_group: int
    """Visual tokens of one temporal group (h * w / merge_size**2)."""
    times: tuple[float, ...] | None = None
    """Seconds at each group's middle, written as `<t seconds>` before it (Qwen3-VL); None: none."""

    @property
    def total(self) -> int:
        return self.groups * self.tokens_per_group


def _header(tok, role: str) -> list[Piece]:
    if tok.template == "llama3":
        return [("id", tok.require(LLAMA3_HEADER_START), False), ("text", role, False),
                ("id", tok.require(LLAMA3_HEADER_END), False), ("text", "\n\n", False)]
    return [("id", tok.require(IM_START), False), ("text", f"{role}\n", False)]


def _footer(tok, supervised: bool) -> list[Piece]:
    end_of_turn: list[Piece] = [("id", tok.end_of_turn_id, supervised)]
    return end_of_turn if tok.template == "llama3" else end_of_turn + [("text", "\n", False)]


def _content(tok, text: str, supervised: bool, first: dict[str, int], raw: bool = False) -> list[Piece]:
    """Text, image and video pieces of one message's content; images and videos numbered from
    first["image"] and first["video"], which are advanced past them. Llama-3 templates strip
    message content; `raw` text (the template's own system text) is kept."""
    if tok.template == "llama3" and not raw:
        text = text.strip()
    pieces: list[Piece] = []
    for chunk in _PLACEHOLDERS.split(text):
        if chunk in _VISUAL_KIND:
            kind = _VISUAL_KIND[chunk]
            pieces.append((kind, first[kind], False))
            first[kind] += 1
        elif chunk:
            pieces.append(("text", chunk, supervised))
    return pieces


def _check_roles(messages: list[Message], record_id: str | None) -> None:
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise BadRecordError("unknown_role", f"messages[{i}] has role {m.role!r}; expected one of {ROLES}",
                                 record_id)


def _chat_pieces(messages: list[Message], tok, supervise: bool, generation_prompt: bool) -> list[Piece]:
    pieces: list[Piece] = []
    if tok.bos_id is not None:
        pieces.append(("id", tok.bos_id, False))
    messages = list(messages)
    system_raw = False  # the system text the template itself adds is not stripped
    if messages and messages[0].role == "system" and tok.system_prefix:
        content = messages[0].content.strip() if tok.template == "llama3" else messages[0].content
        messages[0], system_raw = Message("system", tok.system_prefix + content), True
    elif tok.default_system is not None and (not messages or messages[0].role != "system"):
        messages, system_raw = [Message("system", tok.default_system)] + messages, True
    visuals = {"image": 0, "video": 0}
    for i, m in enumerate(messages):
        learn = supervise and m.role == "assistant"
        pieces += _header(tok, m.role)
        pieces += _content(tok, m.content, learn, visuals, raw=system_raw and i == 0) + _footer(tok, learn)
    if generation_prompt:
        pieces += _header(tok, "assistant")
    return pieces


def _caption_pieces(record: Record, tok) -> list[Piece]:
    """LLaVA "plain": the images and videos (in order), then the assistant text, then end of text."""
    pieces: list[Piece] = [("id", tok.bos_id, False)] if tok.bos_id is not None else []
    visuals = {"image": 0, "video": 0}
    for m in record.messages:
        if m.role != "assistant":
            for placeholder in _PLACEHOLDERS.findall(m.content):
                kind = _VISUAL_KIND[placeholder]
                pieces.append((kind, visuals[kind], False))
                visuals[kind] += 1
    caption = "\n".join(m.content.strip() for m in record.messages if m.role == "assistant")
    pieces += _content(tok, caption, True, visuals)
    return pieces + [("id", tok.eos_id, True)]


def _tokens(pieces: list[Piece], tok, visual_tokens: list[int], videos: Sequence[VideoTokens],
            record_id: str | None) -> tuple[list[int], list[int]]:
    _check_visuals(pieces, tok, visual_tokens, videos, record_id)
    ids: list[int] = []
    labels: list[int] = []
    for kind, value, supervised in _expand_visuals(pieces, tok, visual_tokens, videos):
        new = value if kind == "ids" else _encode_text(tok, value)
        ids += new
        labels += new if supervised else [IGNORE_INDEX] * len(new)
    return ids, labels


def _check_visuals(pieces: list[Piece], tok, visual_tokens: list[int], videos: Sequence[VideoTokens],
                   record_id: str | None) -> None:
    n_images = sum(p[0] == "image" for p in pieces)
    n_videos = sum(p[0] == "video" for p in pieces)
    if n_images != len(visual_tokens):
        raise BadRecordError("placeholder_mismatch", f"{n_images} {IMAGE_PLACEHOLDER} placeholder(s) in the text "
                             f"but {len(visual_tokens)} image(s)", record_id)
    if n_videos != len(videos):
        raise BadRecordError("placeholder_mismatch", f"{n_videos} {VIDEO_PLACEHOLDER} placeholder(s) in the text "
                             f"but {len(videos)} video(s)", record_id)
    if n_images and tok.image_token_id is None:
        raise BadRecordError("no_image_token", "the tokenizer has no image token (add one with add_image_token)",
                             record_id)
    if n_videos and tok.video_token_id is None:
        raise BadRecordError("no_video_token", "the tokenizer has no video token (a Qwen-VL vocabulary has "
                             "<|video_pad|>)", record_id)


def _expand_visuals(pieces: list[Piece], tok, visual_tokens: list[int], videos: Sequence[VideoTokens]
                    ) -> list[Piece]:
    """Image and video pieces -> their token ids (and Qwen3-VL's time texts); single ids -> id lists."""
    out: list[Piece] = []
    for kind, value, supervised in pieces:
        if kind == "image":
            out += _wrapped(tok, [tok.image_token_id] * visual_tokens[value])
        elif kind == "video":
            for k, group in enumerate(_video_groups(tok, videos[value])):
                if k == 0 and group[0][0] == "text" and out and out[-1][0] == "text" and not out[-1][2]:
                    out[-1] = ("text", out[-1][1] + group[0][1], False)  # one string in the reference
                    group = group[1:]
                out += group
        elif kind == "id":
            out.append(("ids", [value], supervised))
        else:
            out.append((kind, value, supervised))
    return out


def _wrapped(tok, ids: list[int]) -> list[Piece]:
    """Visual token ids, between <|vision_start|> and <|vision_end|> in the qwen_vl format."""
    if tok.template != "qwen_vl":
        return [("ids", ids, False)]
    return [("ids", [tok.require(VISION_START), *ids, tok.require(VISION_END)], False)]


def _video_groups(tok, video: VideoTokens) -> list[list[Piece]]:
    """A video's pieces: one wrapped run of all its tokens, or with times one `<t seconds>` text and
    one wrapped run per temporal group."""
    if video.times is None:
        return [_wrapped(tok, [tok.video_token_id] * video.total)]
    group = [tok.video_token_id] * video.tokens_per_group
    return [[("text", f"<{t:.1f} seconds>", False), *_wrapped(tok, group)] for t in video.times]


def _encode_text(tok, text: str) -> list[int]:
    """Encode user text; a literal image- or video-token string in it stays text, never a visual slot."""
    markers = [m for m in (tok.image_token, tok.video_token) if m and m in text]
    if not markers:
        return tok.encode(text)
    ids: list[int] = []
    for chunk in re.split(f"({'|'.join(map(re.escape, markers))})", text):
        if chunk in markers:
            ids += tok.encode(chunk[:1]) + tok.encode(chunk[1:])
        elif chunk:
            ids += tok.encode(chunk)
    return ids


def encode_record(record: Record, tok, visual_tokens: list[int], videos: Sequence[VideoTokens] = ()
                  ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a record; labels are unshifted, IGNORE_INDEX where unsupervised.

    visual_tokens[i] is the number of visual tokens of the record's i-th image (tiles x tokens per
    tile, or its grid's tokens); videos[j] the tokens of its j-th video."""
    if record.kind == "text":
        pieces: list[Piece] = [("id", tok.bos_id, False)] if tok.bos_id is not None else []
        pieces += [("text", record.text, True)] if record.text else []
        pieces.append(("id", tok.eos_id, True))  # a placeholder string in text stays literal text
    else:
        _check_roles(record.messages, record.id)
        if not any(m.role == "assistant" for m in record.messages):
            raise BadRecordError("no_assistant_turn", f"a {record.kind} record needs an assistant turn", record.id)
        if record.kind == "caption":
            pieces = _caption_pieces(record, tok)
        else:
            pieces = _chat_pieces(record.messages, tok, supervise=True, generation_prompt=False)
    ids, labels = _tokens(pieces, tok, visual_tokens, videos, record.id)
    # labels[0] is never a target (the loss predicts position i from the tokens before it)
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        raise BadRecordError("no_supervised_tokens", f"nothing to learn from after templating ({len(ids)} tokens)",
                             record.id)
    return ids, labels


def encode_prompt(messages: list[Message], tok, visual_tokens: list[int], videos: Sequence[VideoTokens] = ()
                  ) -> list[int]:
    """Token ids of a conversation followed by the assistant header, ready for generation."""
    _check_roles(messages, None)
    pieces = _chat_pieces(messages, tok, supervise=False, generation_prompt=True)
    ids, _ = _tokens(pieces, tok, visual_tokens, videos, None)
    return ids


def render(messages: list[Message], tok, add_generation_prompt: bool = False) -> str:
    """The conversation as text (images and videos as their placeholders), as the jinja chat
    template renders it."""
    _check_roles(messages, None)
    out = []
    for kind, value, _ in _chat_pieces(messages, tok, supervise=False, generation_prompt=add_generation_prompt):
        if kind in ("image", "video"):
            out.append(IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER)
        elif kind == "id":
            out.append(tok.decode([value], skip_special=False))
        else:
            out.append(value)
    return "".join(out)
