"""Tiny tokenizer directories for tests, built on the spot (no downloads): vlmkit's built-in
tokenizer, and HF-layout directories in the ChatML (Qwen2-style, default system prompt) and
Llama-3 formats, and the Qwen-VL format, with their own jinja chat templates, written for these
tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from vlmkit.constants import IM_END, IM_START, QWEN_VL_TOKENS
from vlmkit.data.tokenizer import Tokenizer

SENTENCES = [
    "What color is the circle? The circle is red.",
    "Describe the image. A small blue square in the center and a large green cross on the left.",
    "The assert statement is a convenient way to insert debugging assertions into a program.",
    "How many shapes are there? There are three shapes in the picture.",
    "Hello, how are you today? I am fine, thank you; and you?",
    "Numbers like 42, 3.14 and 1000 appear in text, as do symbols: [a], {b}, <c>.",
    "Unicode text such as café, naïve, Zürich and 東京 is encoded as bytes.",
] * 20

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

# Llama-3.1 style: a system turn with a knowledge-cutoff line is always present.
LLAMA31_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set rest = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n' + system + '<|eot_id|>' -}}"
    "{%- for message in rest -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)


def builtin_tokenizer(vocab_size: int = 400) -> Tokenizer:
    return Tokenizer.train(SENTENCES, vocab_size=vocab_size)


def hf_dir(path: Path, specials: list[str], config: dict, vocab_size: int = 400) -> Path:
    """A byte-level BPE directory in HF layout with `specials` and tokenizer_config `config`."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return path


def chatml_dir(path: Path) -> Path:
    return hf_dir(path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                   "chat_template": CHATML_TEMPLATE})


def llama3_dir(path: Path, template: str = LLAMA3_TEMPLATE) -> Path:
    return hf_dir(path, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|eom_id|>"],
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template})


# Chat templates written for these tests from the families' documented format: Qwen2-VL's and
# Qwen2.5-VL's (a default system prompt, parts side by side) and Qwen3-VL's (no default system).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|im_end|>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")
QWEN_VL_SPECIALS = ["<|endoftext|>", IM_START, IM_END, *QWEN_VL_TOKENS]


def qwen_vl_dir(path, template):
    return hf_dir(path, QWEN_VL_SPECIALS, {"eos_token": IM_END, "pad_token": "<|endoftext|>",
                                           "chat_template": template})
