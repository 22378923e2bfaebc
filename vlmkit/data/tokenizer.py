"""Tokenizers: train the built-in byte-level BPE, or load any local HF tokenizer directory.

`Tokenizer.train(texts, vocab_size)` trains a byte-level BPE (GPT-2's byte-to-unicode pre-tokenizer
and decoder, via HF `tokenizers`) whose first ids are the special tokens of vlmkit.constants
(pad, end of text, the ChatML role markers, the image token; with `qwen_vl=True`, for
native-resolution models, the Qwen-VL vision tokens instead of the image token, in the qwen_vl
format below). `save(dir)` writes the HF layout
(tokenizer.json, tokenizer_config.json with the chat template as a jinja string, special_tokens_map.json),
so transformers' AutoTokenizer loads the directory as a PreTrainedTokenizerFast.

`Tokenizer.load(dir)` reads any such directory (the built-in one, Qwen2 / SmolLM2 ChatML ones, Llama-3
ones) and works out the chat format from the special tokens it holds:

    builtin   ChatML markers, no default system prompt (vlmkit's own tokenizer)
    chatml    <|im_start|>role\\n ... <|im_end|>\\n    (Qwen2, Qwen3, SmolLM2)
    qwen_vl   ChatML with <|vision_start|> <|image_pad|> / <|video_pad|> <|vision_end|> around
              visual tokens and content parts joined with nothing (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
    internvl  ChatML with <img> <IMG_CONTEXT>... </img> for an image, an image part followed by a
              newline and parts joined with nothing (InternVL2.5, InternVL3)
    idefics3  the bos token, then `Role: ...<end_of_utterance>\\n` turns, images as their tiles
              (<fake_token_around_image>, <row_r_col_c>, <image>...; data/template.py) and parts
              joined with nothing (Idefics3, SmolVLM)
    deepseek_vl  the bos token, the template's fixed system text, then `User: ...\\n\\n` and
              `Assistant: ...<｜end▁of▁sentence｜>` turns, images as <image_placeholder> tokens and
              parts joined with nothing (DeepSeek-VL and its hybrid)
    llama3    <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>

A Qwen-VL template is told from a plain ChatML one by its jinja writing <|vision_start|> (Qwen2.5's
text tokenizers hold the vision tokens too), an InternVL one by its jinja writing <IMG_CONTEXT>,
an Idefics3 one by its jinja writing <end_of_utterance> (before the Llama-3 or ChatML tokens its
vocabulary holds too are considered), a DeepSeek-VL one by its jinja writing <image_placeholder>.
The text a DeepSeek-VL template writes before any message (its fixed system text) is its rendering
of no messages (`preamble`).

A template that writes a message's images before its text whatever their order in the message
(LLaVA-OneVision's: each image on its own line, then the texts side by side) is told by rendering a
text part and an image part in both orders (`visuals_first`); prompts then put each message's
visual parts first (data/prompt.py) and join them as that template does.

The system text that the directory's own jinja template adds (a default system prompt when a
conversation has none, as Qwen2's; a prefix before a given one, as Llama-3.1's date lines) is read
by rendering the template around probe strings, so data/template.py produces the same text.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer as _Backend, decoders, models, pre_tokenizers, trainers

from vlmkit.constants import (BUILTIN_SPECIAL_TOKENS, DEEPSEEK_END_OF_SENTENCE, DEEPSEEK_VL_IMAGE_TOKEN,
                              END_OF_UTTERANCE, EOS_TOKEN, IDEFICS3_TOKENS, IM_END,
                              IM_START, IMAGE_PLACEHOLDER, IMAGE_TOKEN, IMG_CONTEXT, INTERNVL_TOKENS,
                              LLAMA3_BEGIN_OF_TEXT, LLAMA3_CHAT_TOKENS, LLAMA3_END_OF_MESSAGE, LLAMA3_END_OF_TEXT,
                              LLAMA3_END_OF_TURN, LLAMA3_HEADER_END, LLAMA3_HEADER_START, PAD_TOKEN, IMAGE_PAD,
                              QWEN_VL_TOKENS, VIDEO_PAD, VISION_START)
from vlmkit.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"
"""Where multimodal checkpoints (Qwen-VL) keep the processor's chat template: {"chat_template": ...}."""

END_OF_TURN = {"llama3": LLAMA3_END_OF_TURN, "idefics3": END_OF_UTTERANCE, "deepseek_vl": DEEPSEEK_END_OF_SENTENCE}
"""Chat format -> the token that ends a turn, where it is not ChatML's <|im_end|>."""

# Image tokens recognised in loaded vocabularies, in order of preference.
IMAGE_TOKENS = (IMAGE_TOKEN, IMAGE_PAD)
TEMPLATES = ("builtin", "chatml", "llama3", "qwen_vl", "internvl", "idefics3", "deepseek_vl")
BOS_TEMPLATES = ("idefics3", "deepseek_vl")
"""Chat formats whose sequences open with the tokenizer's own bos token."""

# The built-in chat template, ChatML without a default system prompt. Message content is a string
# (IMAGE_PLACEHOLDER marks images) or a list of {"type": "text" | "image"} parts joined by newlines,
# as vlmkit's engine joins them.
BUILTIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# The built-in tokenizer of native-resolution models (`Tokenizer.train(..., qwen_vl=True)`): the
# Qwen-VL chat format without a default system prompt; images and videos are written as
# <|vision_start|><|image_pad|><|vision_end|> (<|video_pad|>), parts side by side.
NATIVE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
NATIVE_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IM_START, IM_END, *QWEN_VL_TOKENS)
"""The first ids of a native tokenizer: the Qwen-VL vision tokens stand where the built-in one has
its single image token."""


class Tokenizer:
    """A HF `tokenizers` backend plus what vlmkit's templates need: special ids and the chat format."""

    def __init__(self, backend: _Backend, config: dict, template: str):
        if template not in TEMPLATES:
            raise ConfigError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
        self.backend = backend
        self.config = config  # the tokenizer_config.json mapping, written back by save()
        self.template = template
        self.default_system: str | None = None
        """System prompt the chat template adds when a conversation has none."""
        self.system_prefix = ""
        """Text the chat template puts before a given system prompt (Llama-3.1's date lines)."""
        self.preamble = ""
        """Text the chat template writes before the first message, whatever it is (DeepSeek-VL's
        fixed system text)."""
        self.visuals_first = False
        """Whether the chat template writes a message's images before its text whatever their order
        in the message (LLaVA-OneVision's); data/prompt.py's `build_prompt` reads it."""

    # --- making one --------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2, *,
              qwen_vl: bool = False) -> "Tokenizer":
        """Train the built-in byte-level BPE on `texts` (deterministic for the same texts).

        qwen_vl: the tokenizer of a native-resolution model (the Qwen-VL chat format, with
        <|image_pad|> and <|video_pad|> between <|vision_start|> and <|vision_end|>) instead of the
        built-in format with its single image token."""
        specials = NATIVE_SPECIAL_TOKENS if qwen_vl else BUILTIN_SPECIAL_TOKENS
        if vocab_size < 256 + len(specials):
            raise ConfigError(f"vocab_size {vocab_size} is below 256 bytes + {len(specials)} special tokens")
        backend = _Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=list(specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        # The role names of the chat headers are frequent in every chat sample: make them whole tokens.
        headers = ["system\nuser\nassistant\n"] * 1000
        backend.train_from_iterator(itertools.chain(texts, headers), trainer=trainer)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "additional_special_tokens": list(specials[2:]),
            "chat_template": NATIVE_CHAT_TEMPLATE if qwen_vl else BUILTIN_CHAT_TEMPLATE,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
        }
        if not qwen_vl:  # a native tokenizer is told by its template and tokens, as Qwen-VL's are
            config["vlmkit_template"] = "builtin"
        return cls(backend, config, "qwen_vl" if qwen_vl else "builtin")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A HF tokenizer directory: tokenizer.json (+ tokenizer_config.json)."""
        path = Path(path)
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise ConfigError(f"{path}: no {TOKENIZER_FILE}; vlmkit loads fast (tokenizer.json) tokenizers only")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:  # the Rust side raises its own exception type
            raise ConfigError(f"{file}: cannot read tokenizer ({e})") from None
        config = {}
        if (path / CONFIG_FILE).is_file():
            try:
                config = json.loads((path / CONFIG_FILE).read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from None
        jinja = path / CHAT_TEMPLATE_FILE  # newer HF directories keep the template beside the config
        if "chat_template" not in config and jinja.is_file():
            config["chat_template"] = jinja.read_text()
        processor_template = path / PROCESSOR_TEMPLATE_FILE
        if "chat_template" not in config and processor_template.is_file():
            try:
                config["chat_template"] = json.loads(processor_template.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ConfigError(f"{processor_template}: not a JSON object with a chat_template ({e})") from None
        tok = cls(backend, config, _template_kind(backend, config, path))
        if tok.template == "deepseek_vl":
            tok.preamble = _render_own_template(tok, []) or ""
        elif tok.template != "builtin":
            tok.default_system, tok.system_prefix = _system_text(tok)
        tok.visuals_first = tok.template != "builtin" and _writes_visuals_first(tok)
        return tok

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        names = ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")
        special = {k: self.config[k] for k in names if self.config.get(k) is not None}
        (path / SPECIAL_MAP_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        return path

    def add_image_token(self) -> int:
        """The image token's id, adding IMAGE_TOKEN as a special token when the vocabulary has none."""
        if self.image_token_id is not None:
            return self.image_token_id
        self.backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        extra = list(self.config.get("additional_special_tokens") or [])
        self.config["additional_special_tokens"] = extra + [IMAGE_TOKEN]
        token_id = self.token_id(IMAGE_TOKEN)
        if isinstance(self.config.get("added_tokens_decoder"), dict):
            self.config["added_tokens_decoder"][str(token_id)] = {
                "content": IMAGE_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}
        return token_id

    # --- use ---------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added (special-token strings in it are matched)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        """The id of a single token string, or None when the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def require(self, token: str) -> int:
        token_id = self.token_id(token)
        if token_id is None:
            raise ConfigError(f"the {self.template} chat format needs token {token!r}, which this tokenizer lacks")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @property
    def image_token(self) -> str | None:
        if self.template == "internvl":  # its vocabulary (Qwen2.5-VL's) holds <|image_pad|> too
            return IMG_CONTEXT
        if self.template == "deepseek_vl":
            return DEEPSEEK_VL_IMAGE_TOKEN
        return next((t for t in IMAGE_TOKENS if self.token_id(t) is not None), None)

    @property
    def image_token_id(self) -> int | None:
        token = self.image_token
        return None if token is None else self.token_id(token)

    @property
    def video_token(self) -> str | None:
        """The token a video's visual tokens carry (Qwen-VL's <|video_pad|>), or None."""
        return VIDEO_PAD if self.token_id(VIDEO_PAD) is not None else None

    @property
    def video_token_id(self) -> int | None:
        return self.token_id(VIDEO_PAD)

    @property
    def part_separator(self) -> str:
        """What joins the pieces of a list content (data/messages.py): the Qwen-VL templates put
        parts side by side, vlmkit's built-in one on separate lines; a template that writes images
        first puts a message's texts side by side after them."""
        side_by_side = self.template in ("qwen_vl", "internvl", "idefics3", "deepseek_vl") or self.visuals_first
        return "" if side_by_side else "\n"

    @property
    def image_part(self) -> str:
        """What an image part of a list content becomes in the message text (data/messages.py):
        its placeholder, followed by a newline in the InternVL format (its template writes an
        image part as `<IMG_CONTEXT>\n`), and where the template writes images first, each on its
        own line."""
        own_line = self.template == "internvl" or self.visuals_first
        return IMAGE_PLACEHOLDER + "\n" if own_line else IMAGE_PLACEHOLDER

    @property
    def eos_id(self) -> int:
        """End of a text document (the id appended to text records)."""
        for token in (_token_str(self.config.get("eos_token")), EOS_TOKEN, LLAMA3_END_OF_TEXT):
            if token and self.token_id(token) is not None and token not in (IM_END, LLAMA3_END_OF_TURN):
                return self.token_id(token)
        return self.end_of_turn_id

    @property
    def bos_id(self) -> int | None:
        """The id put at the start of every sequence (Llama-3's <|begin_of_text|>; in the Idefics3
        format the tokenizer's bos token, which its templates open with: Idefics3's
        <|begin_of_text|>, SmolVLM's <|im_start|>; in the DeepSeek-VL format the bos token
        DeepSeek's tokenizer puts before every text), or None."""
        if self.template in BOS_TEMPLATES:
            token = _token_str(self.config.get("bos_token"))
            return None if token is None else self.token_id(token)
        return self.token_id(LLAMA3_BEGIN_OF_TEXT) if self.template == "llama3" else None

    @property
    def end_of_turn_id(self) -> int:
        return self.require(END_OF_TURN.get(self.template, IM_END))

    @property
    def pad_id(self) -> int:
        token = _token_str(self.config.get("pad_token"))
        if token and self.token_id(token) is not None:
            return self.token_id(token)
        return self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn in generation: end of turn, then end of text."""
        ids = [self.end_of_turn_id, self.eos_id]
        if self.template == "llama3" and self.token_id(LLAMA3_END_OF_MESSAGE) is not None:
            ids.append(self.token_id(LLAMA3_END_OF_MESSAGE))
        return list(dict.fromkeys(ids))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(template={self.template!r}, vocab_size={self.vocab_size}, "
                f"image_token_id={self.image_token_id})")


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _template_kind(backend: _Backend, config: dict, path: Path) -> str:
    if config.get("vlmkit_template") == "builtin":
        return "builtin"
    if DEEPSEEK_VL_IMAGE_TOKEN in str(config.get("chat_template") or "") and all(
            backend.token_to_id(t) is not None for t in (DEEPSEEK_VL_IMAGE_TOKEN, DEEPSEEK_END_OF_SENTENCE)):
        return "deepseek_vl"
    # Idefics3's vocabulary is Llama-3's and SmolVLM's is ChatML's: the template tells them apart.
    if END_OF_UTTERANCE in str(config.get("chat_template") or "") and all(
            backend.token_to_id(t) is not None for t in IDEFICS3_TOKENS):
        return "idefics3"
    if all(backend.token_to_id(t) is not None for t in LLAMA3_CHAT_TOKENS):
        return "llama3"
    if backend.token_to_id(IM_START) is not None and backend.token_to_id(IM_END) is not None:
        # Qwen2.5's text tokenizers (and InternVL's) hold the Qwen-VL vision tokens too: the template
        # tells which visual format, if any, the tokenizer is for.
        template = str(config.get("chat_template") or "")
        if IMG_CONTEXT in template and all(backend.token_to_id(t) is not None for t in INTERNVL_TOKENS):
            return "internvl"
        vision_template = VISION_START in template
        has_tokens = all(backend.token_to_id(t) is not None for t in QWEN_VL_TOKENS)
        return "qwen_vl" if vision_template and has_tokens else "chatml"
    raise ConfigError(f"{path}: unsupported chat format: the vocabulary has neither ChatML markers "
                      f"({IM_START}, {IM_END}) nor Llama-3 headers ({', '.join(LLAMA3_CHAT_TOKENS)})")


# Rendering the directory's own template around probe strings shows the system text it adds.
_PROBE = "\x00probe\x00"
_SYSTEM_PROBE = "\x00system\x00"


def _render_own_template(tok: Tokenizer, messages: list[dict]) -> str | None:
    template = tok.chat_template
    if isinstance(template, list):  # a list of named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return None
    try:
        # Imported here, inside the try: jinja2 is optional (torch brings it, vlmkit does not
        # require it); without it a template counts as adding no system text.
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=False,
            raise_exception=_raise, strftime_now=_strftime,
            bos_token=_token_str(tok.config.get("bos_token")) or "",
            eos_token=_token_str(tok.config.get("eos_token")) or "")
    except Exception:  # a template we cannot render offline: assume it adds no system text
        return None


def _system_text(tok: Tokenizer) -> tuple[str | None, str]:
    """(default system prompt when a conversation has none, prefix put before a given system prompt)."""
    if tok.template == "llama3":
        opener, closer = f"{LLAMA3_HEADER_START}system{LLAMA3_HEADER_END}\n\n", LLAMA3_END_OF_TURN
    else:
        opener, closer = f"{IM_START}system\n", IM_END
    default, prefix = None, ""
    alone = _render_probes(tok, [("user", _PROBE)])
    if alone is not None and opener in alone.split(_PROBE)[0]:
        default = alone.split(_PROBE)[0].split(opener, 1)[1].split(closer, 1)[0]
    given = _render_probes(tok, [("system", _SYSTEM_PROBE), ("user", _PROBE)])
    if given is not None and opener in given.split(_SYSTEM_PROBE)[0]:
        prefix = given.split(_SYSTEM_PROBE)[0].split(opener, 1)[1]
    return default, prefix


def _render_probes(tok: Tokenizer, turns: list[tuple[str, str]]) -> str | None:
    """The template's render of `turns` (role, probe text) in which every probe appears: with
    string contents, else with content-part lists (some templates, LLaVA-OneVision's, read only
    the latter and drop a string silently); None when neither shows them all."""
    for as_parts in (False, True):
        messages = [{"role": role, "content": [{"type": "text", "text": text}] if as_parts else text}
                    for role, text in turns]
        text = _render_own_template(tok, messages)
        if text is not None and all(probe in text for _, probe in turns):
            return text
    return None


def _writes_visuals_first(tok: Tokenizer) -> bool:
    """Whether the directory's template renders a user turn of a text part and an image part the
    same in both orders, the image written (the render differs from the text's alone)."""
    text, image = {"type": "text", "text": _PROBE}, {"type": "image"}
    renders = [_render_own_template(tok, [{"role": "user", "content": parts}])
               for parts in ([text, image], [image, text], [text])]
    return renders[0] is not None and _PROBE in renders[0] and renders[0] == renders[1] != renders[2]


def _raise(message):
    raise ValueError(message)


def _strftime(fmt: str) -> str:
    return time.strftime(fmt)
