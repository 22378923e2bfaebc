"""How a benchmark item is put to the model: one user turn with the item's videos, images and its text.

The wording follows LLaVA-1.5's evaluation prompts: options as "A. text" lines followed by
"Answer with the option's letter from the given choices directly.", and for short answers
"Answer the question using a single word or phrase.". A `PromptFormat` with empty instructions
puts the question alone; `SYNTH_PROMPTS` also puts the image after the text, as the synthetic
world's training data asks (data/synth.py), so that benchmark is asked exactly as the model learned it.

Both evaluation modes and the lmms-eval plugin (eval/lmms.py) build the same OpenAI-style turn
(`user_turn`, on data/messages.py's `user_content`) and read it as every conversation is read
(data/messages.py, data/prompt.py), so a question becomes the same tokens in both modes as in
`VLM.generate`. Generation lists the options and asks for a letter; perplexity scoring asks
cloze-style (options not listed, each scored as the reply).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vlmkit.data.messages import user_content
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
SYNTH_PROMPTS = PromptFormat(choice_instruction="", short_instruction="", images_after_text=True)


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
    """An item's question as one user turn (`user_turn`)."""
    return user_turn(question_text(item, fmt, list_options=list_options), images, videos,
                     images_after_text=fmt.images_after_text)


def user_turn(text: str, images: Sequence, videos: Sequence = (), *, images_after_text: bool = False) -> list[dict]:
    """OpenAI-style conversation: one user turn, the videos and images then the text (the reverse
    for `images_after_text`); parts are joined with newlines when the turn is tokenised. Videos go
    before images, as data files place visuals that have no placeholder (data/formats.py)."""
    content = user_content(text, list(images), images_after_text=images_after_text)
    video_parts = [{"type": "video", "video": video} for video in videos]
    at = 1 if images_after_text else 0  # just before the image parts
    return [{"role": "user", "content": content[:at] + video_parts + content[at:]}]
