"""A conversation as the LLM reads it: messages (some with images) rendered into token ids, the visual prompts'
positions marked ``IMAGE_ID``, by ``blip2.data.conversation``: the same tokens ``ChatSession`` reads and chat
training trains on.

Two formats. "chat": the LLM's own chat template (``TemplateFormat``), each image's visual prompt (``num_visual``
positions) at the start of the user message that carries it, before its text. "vqa", and every LLM without a chat
template: BLIP-2's prompt (``QuestionAnswerFormat``), the visual prompts first, then BOS and the turns
"Question: {} Answer: {reply}" joined by spaces (T5: no BOS, EOS last); a user message with an image and no text
adds nothing, so an image alone is captioned as ``caption`` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from blip2.data.conversation import IMAGE_ID, QuestionAnswerFormat, conversation_format
from blip2.data.images import load_image
from blip2.data.text import LLMTokenizer

PromptFormat = Literal["chat", "vqa"]


@dataclass(frozen=True)
class UserImage:
    """A decoded image and the hash of its file bytes (what the image cache and the prefix cache know it by)."""

    key: str
    image: Image.Image = field(compare=False, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes, max_pixels: int, name: str = "image") -> "UserImage":
        """Decode ``data`` (``ImageError`` names ``name`` and the cause)."""
        return cls(hashlib.sha256(data).hexdigest(), load_image(data, max_pixels=max_pixels, name=name))


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    text: str
    images: tuple[UserImage, ...] = ()


@dataclass
class Prompt:
    """Token ids (``IMAGE_ID`` at visual positions) and the images whose visual prompts fill them, in order."""

    ids: list[int]
    images: list[UserImage]
    num_visual: int

    def key(self) -> list:
        """The ids with each visual position named by (image hash, index): equal keys mean equal LLM inputs."""
        key: list = list(self.ids)
        positions = [i for i, token in enumerate(self.ids) if token == IMAGE_ID]
        for block, image in enumerate(self.images):
            for offset, position in enumerate(positions[block * self.num_visual : (block + 1) * self.num_visual]):
                key[position] = (image.key, offset)
        return key


def render(
    tokenizer: LLMTokenizer, messages: list[Message], num_visual: int, prompt_format: PromptFormat = "chat"
) -> Prompt:
    """The prompt that asks the LLM (``tokenizer``'s) for the next assistant message."""
    conversation = conversation_format(tokenizer) if prompt_format == "chat" else QuestionAnswerFormat(tokenizer)
    texts = [{"role": m.role, "content": m.text} for m in messages]
    ids = conversation.token_ids(texts, num_visual, images=[len(m.images) for m in messages])
    return Prompt(ids, [image for message in messages for image in message.images], num_visual)
