"""How a benchmark item is put to the model: one user turn, the item's images first, then the text.

The wording follows LLaVA-1.5's evaluation prompts: options as "A. text" lines followed by
"Answer with the option's letter from the given choices directly.", and for short answers
"Answer the question using a single word or phrase.". A `PromptFormat` with empty instructions
puts the question alone (the synthetic benchmark is asked exactly as its training data asks).

Both evaluation modes build the same OpenAI-style turn (image parts, then a text part): generation
hands it to the engine; perplexity scoring turns it into template messages with the engine's own
`normalize_messages` (one IMAGE_PLACEHOLDER per image), so both modes see the same prompt tokens.
Generation lists the options and asks for a letter; perplexity scoring asks cloze-style (options
not listed, each scored as the reply).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from vlmkit.eval.benchmarks import LETTERS, BenchItem


@dataclass(frozen=True)
class PromptFormat:
    choice_instruction: str = "Answer with the option's letter from the given choices directly."
    """Appended after the option lines of a multiple-choice item in generation mode."""
    short_instruction: str = "Answer the question using a single word or phrase."
    """Appended to yes/no and open-ended questions."""


LLAVA_PROMPTS = PromptFormat()
PLAIN_PROMPTS = PromptFormat(choice_instruction="", short_instruction="")


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


def chat_messages(item: BenchItem, images: list[Image.Image], fmt: PromptFormat, *,
                  list_options: bool) -> list[dict]:
    """OpenAI-style conversation: one user turn, the images first, then the question text."""
    parts = [{"type": "image", "image": image} for image in images]
    parts.append({"type": "text", "text": question_text(item, fmt, list_options=list_options)})
    return [{"role": "user", "content": parts}]
