"""OpenAI-style conversations -> template messages: the one home of content parts and roles.

    user_content(text, images, images_after_text=False)   the content parts of one user turn
    parse_content(content, where, resolve_image, role)    one message's content -> (text, images)
    to_messages(messages, resolve_image)                   a conversation -> (list[Message], images)

Content is a string or a list of parts: {"type": "text", "text"}, {"type": "image", "image":
<image>} or {"type": "image_url", "image_url": {"url"} | <url>}. Each image part becomes one
IMAGE_PLACEHOLDER in the message text, in reading order, and the non-empty pieces are joined by
newlines. What an image part's value means is the caller's: `resolve_image(value, where, role)`
turns it into whatever the caller keeps (data files: an ImageRef under their root, data/formats.py;
the server: a decoded image within its limits, from user messages only, serve/serving.py; the
Python API: the value as given, a PIL image or a path). Problems raise BadRecordError naming the
message and part (`messages[1].content[2]`) with a stable reason (malformed_record, unknown_role).
"""

from __future__ import annotations

from typing import Any, Callable

from vlmkit.constants import IMAGE_PLACEHOLDER
from vlmkit.data.types import Message
from vlmkit.errors import BadRecordError

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "developer": "system",  # OpenAI's newer name for the system turn
         "human": "user", "gpt": "assistant"}  # LLaVA's names
"""Accepted role names -> the template's role."""

ImageResolver = Callable[[Any, str, str], Any]
"""(an image part's value, where it is e.g. "messages[0].content[1]", the template role of its
message) -> the image the caller keeps; raises to refuse it."""


def keep_image(value: Any, where: str, role: str) -> Any:
    """The default resolver: the part's value as given (a PIL image, a path, bytes, an ImageRef)."""
    return value


def user_content(text: str, images: list, *, images_after_text: bool = False) -> list[dict]:
    """The content parts of one user turn: the images, then the text (LLaVA's order), or the text
    first with `images_after_text` (how the synthetic world asks its questions)."""
    image_parts = [{"type": "image", "image": image} for image in images]
    text_part = {"type": "text", "text": text}
    return [text_part, *image_parts] if images_after_text else [*image_parts, text_part]


def parse_content(content: Any, where: str, resolve_image: ImageResolver = keep_image,
                  role: str = "user") -> tuple[str, list]:
    """One message's content -> (text with one IMAGE_PLACEHOLDER per image, the resolved images)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRecordError("malformed_record", f"{where} must be a string or a list of parts, "
                             f"got {type(content).__name__}")
    pieces, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            value = part.get(kind)
            if isinstance(value, dict):  # {"url": ...}, image_url's shape (data files use it for both)
                value = value.get("url")
            if value is None or value == "":
                raise BadRecordError("malformed_record", f"{where}[{j}] has no image")
            images.append(resolve_image(value, f"{where}[{j}]", role))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise BadRecordError("malformed_record", f"{where}[{j}] must be a part of type text, image or "
                                 f"image_url, got {kind!r}")
    return "\n".join(p for p in pieces if p), images


def to_messages(messages: Any, resolve_image: ImageResolver = keep_image) -> tuple[list[Message], list]:
    """An OpenAI-style conversation -> (template messages with image placeholders, images in order)."""
    if not isinstance(messages, list) or not messages:
        raise BadRecordError("malformed_record", "messages must be a non-empty list of {'role', 'content'} objects")
    out, images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise BadRecordError("malformed_record", f"messages[{i}] must be an object with 'role' and 'content'")
        role = ROLES.get(msg["role"]) if isinstance(msg["role"], str) else None
        if role is None:
            raise BadRecordError("unknown_role", f"messages[{i}].role must be system, user or assistant, "
                                 f"got {msg['role']!r}")
        text, found = parse_content(msg.get("content"), f"messages[{i}].content", resolve_image, role)
        out.append(Message(role, text))
        images += found
    return out, images
