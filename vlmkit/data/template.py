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

Chat formats (the tokenizer's `template`): builtin and chatml render
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, llama3 renders
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>` after
`<|begin_of_text|>`. The text equals what the tokenizer's jinja chat template produces (tests
compare with transformers' apply_chat_template); a loaded template's default system prompt (when
a conversation has none) and system prefix (Llama-3.1's date lines) are inserted the same way.
Headers, contents and images are tokenised as separate pieces, so the assistant's first token
is the same in training as after the generation prompt.

Each IMAGE_PLACEHOLDER in message content becomes visual_tokens[i] copies of the tokenizer's image
token id, for the i-th placeholder in reading order. Bad records raise BadRecordError with reasons
placeholder_mismatch, unknown_role, no_assistant_turn, no_supervised_tokens.
"""

from __future__ import annotations

from vlmkit.constants import IGNORE_INDEX, IM_START, IMAGE_PLACEHOLDER, LLAMA3_HEADER_END, LLAMA3_HEADER_START
from vlmkit.data.types import Message, Record
from vlmkit.errors import BadRecordError

ROLES = ("system", "user", "assistant")

# A piece is ("text", str) or ("id", int) or ("image", index); `supervised` marks the loss.
Piece = tuple[str, object, bool]


def _header(tok, role: str) -> list[Piece]:
    if tok.template == "llama3":
        return [("id", tok.require(LLAMA3_HEADER_START), False), ("text", role, False),
                ("id", tok.require(LLAMA3_HEADER_END), False), ("text", "\n\n", False)]
    return [("id", tok.require(IM_START), False), ("text", f"{role}\n", False)]


def _footer(tok, supervised: bool) -> list[Piece]:
    end_of_turn: list[Piece] = [("id", tok.end_of_turn_id, supervised)]
    return end_of_turn if tok.template == "llama3" else end_of_turn + [("text", "\n", False)]


def _content(tok, text: str, supervised: bool, first_image: int, raw: bool = False) -> list[Piece]:
    """Text and image pieces of one message's content; images numbered from `first_image`.
    Llama-3 templates strip message content; `raw` text (the template's own system text) is kept."""
    if tok.template == "llama3" and not raw:
        text = text.strip()
    pieces: list[Piece] = []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            pieces.append(("image", first_image + k - 1, False))
        if chunk:
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
    images = 0
    for i, m in enumerate(messages):
        learn = supervise and m.role == "assistant"
        pieces += _header(tok, m.role)
        body = _content(tok, m.content, learn, images, raw=system_raw and i == 0)
        images += sum(p[0] == "image" for p in body)
        pieces += body + _footer(tok, learn)
    if generation_prompt:
        pieces += _header(tok, "assistant")
    return pieces


def _caption_pieces(record: Record, tok) -> list[Piece]:
    """LLaVA "plain": the images (in order), then the assistant text, then end of text."""
    pieces: list[Piece] = [("id", tok.bos_id, False)] if tok.bos_id is not None else []
    images = 0
    for m in record.messages:
        if m.role != "assistant":
            for _ in range(m.content.count(IMAGE_PLACEHOLDER)):
                pieces.append(("image", images, False))
                images += 1
    caption = "\n".join(m.content.strip() for m in record.messages if m.role == "assistant")
    pieces += _content(tok, caption, True, images)
    return pieces + [("id", tok.eos_id, True)]


def _tokens(pieces: list[Piece], tok, visual_tokens: list[int], record_id: str | None) -> tuple[list[int], list[int]]:
    n_images = sum(p[0] == "image" for p in pieces)
    if n_images != len(visual_tokens):
        raise BadRecordError("placeholder_mismatch", f"{n_images} {IMAGE_PLACEHOLDER} placeholder(s) in the text "
                             f"but {len(visual_tokens)} image(s)", record_id)
    image_id = tok.image_token_id if n_images else None
    if n_images and image_id is None:
        raise BadRecordError("no_image_token", "the tokenizer has no image token (add one with add_image_token)",
                             record_id)
    ids: list[int] = []
    labels: list[int] = []
    for kind, value, supervised in pieces:
        if kind == "image":
            new = [image_id] * visual_tokens[value]
        elif kind == "id":
            new = [value]
        else:
            new = _encode_text(tok, value)
        ids += new
        labels += new if supervised else [IGNORE_INDEX] * len(new)
    return ids, labels


def _encode_text(tok, text: str) -> list[int]:
    """Encode user text; a literal image-token string in it stays text, never an image slot."""
    marker = tok.image_token
    if not marker or marker not in text:
        return tok.encode(text)
    ids: list[int] = []
    for k, chunk in enumerate(text.split(marker)):
        if k:
            ids += tok.encode(marker[:1]) + tok.encode(marker[1:])
        if chunk:
            ids += tok.encode(chunk)
    return ids


def encode_record(record: Record, tok, visual_tokens: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a record; labels are unshifted, IGNORE_INDEX where unsupervised.

    visual_tokens[i] is the number of visual tokens of the record's i-th image (tiles x tokens per
    tile)."""
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
    ids, labels = _tokens(pieces, tok, visual_tokens, record.id)
    # labels[0] is never a target (the loss predicts position i from the tokens before it)
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        raise BadRecordError("no_supervised_tokens", f"nothing to learn from after templating ({len(ids)} tokens)",
                             record.id)
    return ids, labels


def encode_prompt(messages: list[Message], tok, visual_tokens: list[int]) -> list[int]:
    """Token ids of a conversation followed by the assistant header, ready for generation."""
    _check_roles(messages, None)
    ids, _ = _tokens(_chat_pieces(messages, tok, supervise=False, generation_prompt=True), tok, visual_tokens, None)
    return ids


def render(messages: list[Message], tok, add_generation_prompt: bool = False) -> str:
    """The conversation as text (images as IMAGE_PLACEHOLDER), as the jinja chat template renders it."""
    _check_roles(messages, None)
    out = []
    for kind, value, _ in _chat_pieces(messages, tok, supervise=False, generation_prompt=add_generation_prompt):
        if kind == "image":
            out.append(IMAGE_PLACEHOLDER)
        elif kind == "id":
            out.append(tok.decode([value], skip_special=False))
        else:
            out.append(value)
    return "".join(out)
