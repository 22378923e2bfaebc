"""OpenAI-style conversations -> template messages: the one home of content parts and roles.

    user_content(text, images, images_after_text=False)   the content parts of one user turn
    read_conversation(messages, resolve_image, resolve_video, separator, image_part)
                                                           a conversation -> Conversation (messages,
                                                           images, videos)
    to_messages(messages, resolve_image)                   the same for callers that take images only
    parse_content(content, where, resolve_image, role)     one message's content -> (text, images)

Content is a string or a list of parts: {"type": "text", "text"}, {"type": "image", "image":
<image>}, {"type": "image_url", "image_url": {"url"} | <url>}, {"type": "video", "video": <frames
| path>} or {"type": "video_url", "video_url": {"url"} | <url>} (vLLM's form). Each image part
becomes one IMAGE_PLACEHOLDER and each video part one VIDEO_PLACEHOLDER in the message text, in
reading order, and the non-empty pieces are joined by `separator` (a newline by default; the
Qwen-VL, InternVL and Idefics3 chat formats join parts with nothing, data/tokenizer.py
`part_separator`); an image part is written as `image_part`, the placeholder or, in the InternVL
format, the placeholder and a newline (data/tokenizer.py `image_part`). What a part's value means
is the caller's: `resolve_image(value, where, role)` turns it into whatever the caller keeps (data
files: an ImageRef under their root, data/formats.py; the server: a decoded image within its
limits, from user messages only, serve/serving.py; the Python API: the value as given, a PIL image
or a path), and `resolve_video` does the same for a video (a list of frames or a path; None: the
caller takes no video and a video part is a bad record, reason unexpected_video).
Problems raise BadRecordError naming the message and part (`messages[1].content[2]`) with a stable
reason (malformed_record, unknown_role, unexpected_video).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from vlmkit.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlmkit.data.types import Message
from vlmkit.errors import BadRecordError

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "developer": "system",  # OpenAI's newer name for the system turn
         "human": "user", "gpt": "assistant"}  # LLaVA's names
"""Accepted role names -> the template's role."""

ImageResolver = Callable[[Any, str, str], Any]
"""(an image part's value, where it is e.g. "messages[0].content[1]", the template role of its
message) -> the image the caller keeps; raises to refuse it."""
VideoResolver = ImageResolver
"""The same for a video part's value (a list of frames or a path)."""

PART_SEPARATOR = "\n"
"""What joins the pieces of a list content by default (vlmkit's built-in chat template does)."""
VISUAL_PARTS = {"image": ("image", IMAGE_PLACEHOLDER), "image_url": ("image", IMAGE_PLACEHOLDER),
                "video": ("video", VIDEO_PLACEHOLDER), "video_url": ("video", VIDEO_PLACEHOLDER)}
"""Part type -> (what it holds, its placeholder in the message text)."""


@dataclass
class Conversation:
    """A conversation read for a template: messages with placeholders, then what fills them."""

    messages: list[Message]
    images: list = field(default_factory=list)
    """The resolved images, in reading order (one per IMAGE_PLACEHOLDER)."""
    videos: list = field(default_factory=list)
    """The resolved videos, in reading order (one per VIDEO_PLACEHOLDER)."""


def keep_image(value: Any, where: str, role: str) -> Any:
    """The default resolver: the part's value as given (a PIL image, a path, bytes, an ImageRef)."""
    return value


def user_content(text: str, images: list, *, images_after_text: bool = False) -> list[dict]:
    """The content parts of one user turn: the images, then the text (LLaVA's order), or the text
    first with `images_after_text` (how a `text-then-image` synthetic world asks its questions)."""
    image_parts = [{"type": "image", "image": image} for image in images]
    text_part = {"type": "text", "text": text}
    return [text_part, *image_parts] if images_after_text else [*image_parts, text_part]


def read_content(content: Any, where: str, resolve_image: ImageResolver = keep_image, role: str = "user",
                 resolve_video: VideoResolver | None = None, separator: str = PART_SEPARATOR,
                 image_part: str = IMAGE_PLACEHOLDER) -> tuple[str, list, list]:
    """One message's content -> (text with a placeholder per image and video, the resolved images,
    the resolved videos)."""
    if content is None:
        return "", [], []
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list):
        raise BadRecordError("malformed_record", f"{where} must be a string or a list of parts, "
                             f"got {type(content).__name__}")
    pieces, found = [], {"image": [], "video": []}
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
            continue
        if kind not in VISUAL_PARTS:
            raise BadRecordError("malformed_record", f"{where}[{j}] must be a part of type text, image, "
                                 f"image_url, video or video_url, got {kind!r}")
        holds, placeholder = VISUAL_PARTS[kind]
        value = part.get(kind)
        if isinstance(value, dict):  # {"url": ...}, the *_url shape (data files use it for both)
            value = value.get("url")
        if value is None or (isinstance(value, (str, list, tuple)) and not value):  # no == on arrays and images
            raise BadRecordError("malformed_record", f"{where}[{j}] has no {holds}")
        resolve = resolve_image if holds == "image" else resolve_video
        if resolve is None:
            raise BadRecordError("unexpected_video", f"{where}[{j}] is a video; this input takes images only")
        found[holds].append(resolve(value, f"{where}[{j}]", role))
        pieces.append(image_part if holds == "image" else placeholder)
    return separator.join(p for p in pieces if p), found["image"], found["video"]


def parse_content(content: Any, where: str, resolve_image: ImageResolver = keep_image,
                  role: str = "user") -> tuple[str, list]:
    """One message's content -> (text with one IMAGE_PLACEHOLDER per image, the resolved images);
    a video part is refused (unexpected_video)."""
    text, images, _ = read_content(content, where, resolve_image, role)
    return text, images


def read_conversation(messages: Any, resolve_image: ImageResolver = keep_image,
                      resolve_video: VideoResolver | None = keep_image,
                      separator: str = PART_SEPARATOR, image_part: str = IMAGE_PLACEHOLDER) -> Conversation:
    """An OpenAI-style conversation -> template messages with placeholders, images and videos in order."""
    if not isinstance(messages, list) or not messages:
        raise BadRecordError("malformed_record", "messages must be a non-empty list of {'role', 'content'} objects")
    conversation = Conversation([])
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise BadRecordError("malformed_record", f"messages[{i}] must be an object with 'role' and 'content'")
        role = ROLES.get(msg["role"]) if isinstance(msg["role"], str) else None
        if role is None:
            raise BadRecordError("unknown_role", f"messages[{i}].role must be system, user or assistant, "
                                 f"got {msg['role']!r}")
        text, images, videos = read_content(msg.get("content"), f"messages[{i}].content", resolve_image, role,
                                            resolve_video, separator, image_part)
        conversation.messages.append(Message(role, text))
        conversation.images += images
        conversation.videos += videos
    return conversation


def to_messages(messages: Any, resolve_image: ImageResolver = keep_image) -> tuple[list[Message], list]:
    """An OpenAI-style conversation -> (template messages with image placeholders, images in order),
    for callers that take images only (a video part is refused: unexpected_video)."""
    conversation = read_conversation(messages, resolve_image, resolve_video=None)
    return conversation.messages, conversation.images
