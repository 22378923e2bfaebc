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

Chat formats (the tokenizer's `template`): builtin, chatml, qwen_vl and internvl render
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, llama3 renders
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>` after
`<|begin_of_text|>`, idefics3 renders `{Role}: {content}<end_of_utterance>\\n` after the
tokenizer's bos token (`{Role}:` alone before content that opens with an image, and as the
generation prompt), deepseek_vl renders the template's fixed system text after the bos token, then
`{Role}: {content stripped}` followed by `\\n\\n` after a user turn and `<｜end▁of▁sentence｜>`
after any other (`Assistant:` as the generation prompt; the reference leaves the end off a last
turn, vlmkit keeps it there to supervise the stop). The text equals what the tokenizer's jinja
chat template produces (tests compare with transformers' apply_chat_template); a loaded
template's default system prompt (when a conversation has none) and system prefix (Llama-3.1's
date lines) are inserted the same way.
Headers, contents and images are tokenised as separate pieces, so the assistant's first token
is the same in training as after the generation prompt; in the deepseek_vl format the unsupervised
text between two special tokens is tokenised as one string, as the processor tokenises it.

Each IMAGE_PLACEHOLDER in message content becomes visual_tokens[i] copies of the tokenizer's image
token id, for the i-th placeholder in reading order. Each VIDEO_PLACEHOLDER becomes videos[j]'s
tokens (`VideoTokens`: temporal groups x tokens per group of the video token). The qwen_vl format
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) wraps them as transformers' processors do: an image is
`<|vision_start|>` + its `<|image_pad|>` tokens + `<|vision_end|>`, a video the same with
`<|video_pad|>`, or, when the video carries group times (Qwen3-VL), one such group per temporal
group, each after the text `<{t:.1f} seconds>`; that text is tokenised together with the text just
before it, as the processor's expanded string is. The internvl format (InternVL2.5, InternVL3)
writes an image as `<img>` + its `<IMG_CONTEXT>` tokens + `</img>`, as transformers' InternVL
processor does. The idefics3 format (Idefics3, SmolVLM) writes an image split into tiles
(`ImageTiles`) as transformers' Idefics3 processor does: each tile as `<fake_token_around_image>`,
`<row_r_col_c>` and its `<image>` tokens, a newline after each row of tiles, then the whole image
as a newline, `<fake_token_around_image><global-img>`, its tokens and `<fake_token_around_image>`;
an image of one tile (or given as a count) is that last part alone. Bad records raise
BadRecordError with reasons placeholder_mismatch, no_image_token, no_video_token, unknown_role,
no_assistant_turn, no_supervised_tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vlmkit.constants import (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IGNORE_INDEX, IM_START, IMAGE_PLACEHOLDER,
                              IMG_END, IMG_START, LLAMA3_HEADER_END, LLAMA3_HEADER_START, TILE_POSITION,
                              VIDEO_PLACEHOLDER, VISION_END, VISION_START)
from vlmkit.data.types import Message, Record
from vlmkit.errors import BadRecordError

ROLES = ("system", "user", "assistant")

# A piece is ("text", str) or ("id", int) or ("ids", list[int]) or ("image" | "video", index);
# `supervised` marks the loss.
Piece = tuple[str, object, bool]

VISUAL_BRACKETS = {"qwen_vl": (VISION_START, VISION_END), "internvl": (IMG_START, IMG_END)}
"""Chat format -> the tokens written around each run of visual tokens (none in the other formats)."""

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


@dataclass(frozen=True)
class ImageTiles:
    """An image split into a rows x cols grid of tiles and followed by the whole image as one more
    tile (data/split_images.py), each tile `tokens_per_tile` visual tokens; rows = cols = 0: the
    image is one tile. The idefics3 format writes where each tile sits; the others write the
    `total` tokens in one run."""

    rows: int
    cols: int
    tokens_per_tile: int

    @property
    def total(self) -> int:
        return (self.rows * self.cols + 1) * self.tokens_per_tile


ImageTokens = int | ImageTiles
"""How one image is written: its count of visual tokens, or its tiles."""


def _header(tok, role: str) -> list[Piece]:
    if tok.template in ("idefics3", "deepseek_vl"):
        return [("text", f"{role.capitalize()}:", False)]
    if tok.template == "llama3":
        return [("id", tok.require(LLAMA3_HEADER_START), False), ("text", role, False),
                ("id", tok.require(LLAMA3_HEADER_END), False), ("text", "\n\n", False)]
    return [("id", tok.require(IM_START), False), ("text", f"{role}\n", False)]


def _footer(tok, supervised: bool, role: str) -> list[Piece]:
    if tok.template == "deepseek_vl" and role == "user":
        return [("text", "\n\n", False)]
    end_of_turn: list[Piece] = [("id", tok.end_of_turn_id, supervised)]
    return end_of_turn if tok.template in ("llama3", "deepseek_vl") else end_of_turn + [("text", "\n", False)]


def _content(tok, text: str, supervised: bool, first: dict[str, int], raw: bool = False) -> list[Piece]:
    """Text, image and video pieces of one message's content; images and videos numbered from
    first["image"] and first["video"], which are advanced past them. Llama-3 templates strip
    message content; `raw` text (the template's own system text) is kept."""
    if tok.template in ("llama3", "deepseek_vl") and not raw:
        text = text.strip()
    if tok.template == "deepseek_vl":  # `{Role}: ...`, the space the content's as in idefics3
        text = " " + text
    if tok.template == "idefics3" and not text.startswith(IMAGE_PLACEHOLDER):
        # `{Role}: text` but `{Role}:<image>`: the space is the content's, as after the generation
        # prompt `Assistant:` the reply's first token holds it
        text = " " + text
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
    if tok.preamble:
        pieces.append(("text", tok.preamble, False))
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
        pieces += _content(tok, m.content, learn, visuals, raw=system_raw and i == 0) + _footer(tok, learn, m.role)
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


def _tokens(pieces: list[Piece], tok, visual_tokens: Sequence[ImageTokens], videos: Sequence[VideoTokens],
            record_id: str | None) -> tuple[list[int], list[int]]:
    _check_visuals(pieces, tok, visual_tokens, videos, record_id)
    ids: list[int] = []
    labels: list[int] = []
    expanded = _expand_visuals(pieces, tok, visual_tokens, videos)
    if tok.template == "deepseek_vl":
        expanded = _joined_text(expanded)
    for kind, value, supervised in expanded:
        new = value if kind == "ids" else _encode_text(tok, value)
        ids += new
        labels += new if supervised else [IGNORE_INDEX] * len(new)
    return ids, labels


def _check_visuals(pieces: list[Piece], tok, visual_tokens: Sequence[ImageTokens], videos: Sequence[VideoTokens],
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


def _expand_visuals(pieces: list[Piece], tok, visual_tokens: Sequence[ImageTokens], videos: Sequence[VideoTokens]
                    ) -> list[Piece]:
    """Image and video pieces -> their token ids (and Qwen3-VL's time texts, Idefics3's tile
    texts); single ids -> id lists."""
    out: list[Piece] = []
    for kind, value, supervised in pieces:
        if kind == "image":
            out += _image(tok, visual_tokens[value])
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


def _joined_text(pieces: list[Piece]) -> list[Piece]:
    """Each run of unsupervised text pieces as one piece (one string between special tokens, as a
    processor tokenises the rendered template)."""
    out: list[Piece] = []
    for piece in pieces:
        if piece[0] == "text" and not piece[2] and out and out[-1][0] == "text" and not out[-1][2]:
            out[-1] = ("text", out[-1][1] + piece[1], False)
        else:
            out.append(piece)
    return out


def _image(tok, image: ImageTokens) -> list[Piece]:
    """One image's pieces: its tiles in the idefics3 format, else its tokens in one run."""
    if tok.template == "idefics3":
        return _tiled(tok, image if isinstance(image, ImageTiles) else ImageTiles(0, 0, image))
    count = image.total if isinstance(image, ImageTiles) else image
    return _wrapped(tok, [tok.image_token_id] * count)


def _tiled(tok, image: ImageTiles) -> list[Piece]:
    """Idefics3's processor's text for a split image. The tile names and the newlines sit between
    special tokens, so each is tokenised alone, as the processor's whole string is; a tile name
    the vocabulary lacks (past row or column 6) stays text there too."""
    fake, run = tok.require(FAKE_IMAGE_TOKEN), [tok.image_token_id] * image.tokens_per_tile
    pieces: list[Piece] = []
    for row in range(1, image.rows + 1):
        for col in range(1, image.cols + 1):
            pieces += [("ids", [fake], False), ("text", TILE_POSITION.format(row=row, col=col), False),
                       ("ids", run, False)]
        # a newline ends each row; after the last one the whole image's own newline joins it
        pieces.append(("text", "\n\n" if row == image.rows else "\n", False))
    return pieces + [("ids", [fake], False), ("text", GLOBAL_IMAGE_TOKEN, False), ("ids", run + [fake], False)]


def _wrapped(tok, ids: list[int]) -> list[Piece]:
    """Visual token ids, between the format's brackets (`VISUAL_BRACKETS`) where it has them."""
    if tok.template not in VISUAL_BRACKETS:
        return [("ids", ids, False)]
    start, end = VISUAL_BRACKETS[tok.template]
    return [("ids", [tok.require(start), *ids, tok.require(end)], False)]


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


def encode_record(record: Record, tok, visual_tokens: Sequence[ImageTokens], videos: Sequence[VideoTokens] = ()
                  ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a record; labels are unshifted, IGNORE_INDEX where unsupervised.

    visual_tokens[i] is the number of visual tokens of the record's i-th image (tiles x tokens per
    tile, or its grid's tokens), or its `ImageTiles`; videos[j] the tokens of its j-th video."""
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


def encode_prompt(messages: list[Message], tok, visual_tokens: Sequence[ImageTokens],
                  videos: Sequence[VideoTokens] = ()) -> list[int]:
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
