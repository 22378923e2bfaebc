"""How a benchmark item is put to the model: one user turn with the item's videos, images and its text,
or, for an item with a history, the whole conversation with the visuals in its first turn.

The wording follows LLaVA-1.5's evaluation prompts: options as "A. text" lines followed by
"Answer with the option's letter from the given choices directly.", and for short answers
"Answer the question using a single word or phrase.". A `PromptFormat` with empty instructions
puts the question alone. The synthetic world's benchmarks are asked with no instruction and the
image where the world's training records put it (its `prompt_layout`, data/synth.py): before the
text (`SYNTH_PROMPTS`) or after it; `world_prompt_format` reads the layout from the world on disk,
so a benchmark is asked exactly as the model learned it.

Both evaluation modes and the lmms-eval plugin (eval/lmms.py) build the same OpenAI-style turn
(`user_turn`, on data/messages.py's `user_content`) and read it as every conversation is read
(data/messages.py, data/prompt.py), so a question becomes the same tokens in both modes as in
`VLM.generate`. Generation lists the options and asks for a letter; perplexity scoring asks
cloze-style (options not listed, each scored as the reply).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from vlmkit.data.messages import user_content
from vlmkit.data.synth import PromptLayout, visual_after_text
from vlmkit.data.world import world_prompt_layout
from vlmkit.eval.benchmarks import LETTERS, BenchItem


@dataclass(frozen=True)
class PromptFormat:
    choice_instruction: str = "Answer with the option's letter from the given choices directly."
    """Appended after the option lines of a multiple-choice item in generation mode."""
    short_instruction: str = "Answer the question using a single word or phrase."
    """Appended to yes/no and open-ended questions."""
    images_after_text: bool = False
    """Put the images after the text ("question\\n<image>") instead of before it (LLaVA's order)."""


LLAVA_PROMPTS = PromptFormat()
PLAIN_PROMPTS = PromptFormat(choice_instruction="", short_instruction="")
SYNTH_PROMPTS = PromptFormat(choice_instruction="", short_instruction="")
"""The synthetic world's benchmarks in the default (image-first) layout: no instruction, as its
training records have none."""


def synth_prompts(prompt_layout: PromptLayout) -> PromptFormat:
    """SYNTH_PROMPTS with the images where a world of `prompt_layout` puts them."""
    return replace(SYNTH_PROMPTS, images_after_text=visual_after_text(prompt_layout))


def world_prompt_format(world_dir: str | Path) -> PromptFormat:
    """How the benchmarks of the world in `world_dir` (synth.jsonl and its siblings) are asked: in
    the layout its world.json records (images first without one)."""
    return synth_prompts(world_prompt_layout(world_dir))


def question_text(item: BenchItem, fmt: PromptFormat, *, list_options: bool) -> str:
    """The text of the user turn: hint, question, options (when listed) and the instruction."""
    lines = [f"Hint: {item.hint}"] if item.hint else []
    lines.append(item.question)
    if item.kind == "choice" and list_options:
        lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices)]
        if fmt.choice_instruction:
            lines.append(fmt.choice_instruction)
    elif item.kind != "choice" and fmt.short_instruction:
        lines.append(fmt.short_instruction)
    return "\n".join(lines)


def chat_messages(item: BenchItem, images: list[Image.Image], fmt: PromptFormat, *, list_options: bool,
                  videos: Sequence = ()) -> list[dict]:
    """An item's conversation: its question as one user turn (`user_turn`), or after its history
    (user, assistant, ..., user), the videos and images in the first user turn and the later turns
    text only, as `vlmkit chat` and the server hold a conversation. A history turn's question is
    sent as written; only the item's own question is worded by `fmt`."""
    texts = [turn.question for turn in item.history] + [question_text(item, fmt, list_options=list_options)]
    messages = user_turn(texts[0], images, videos, images_after_text=fmt.images_after_text)
    for turn, text in zip(item.history, texts[1:]):
        messages += [{"role": "assistant", "content": turn.reply}, *user_turn(text, [])]
    return messages


def user_turn(text: str, images: Sequence, videos: Sequence = (), *, images_after_text: bool = False) -> list[dict]:
    """OpenAI-style conversation: one user turn, the videos and images then the text (the reverse
    for `images_after_text`); parts are joined with newlines when the turn is tokenised. Videos go
    before images, as data files place visuals that have no placeholder (data/formats.py)."""
    content = user_content(text, list(images), images_after_text=images_after_text)
    video_parts = [{"type": "video", "video": video} for video in videos]
    at = 1 if images_after_text else 0  # just before the image parts
    return [{"role": "user", "content": content[:at] + video_parts + content[at:]}]
