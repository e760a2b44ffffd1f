"""A conversation as the LLM reads it: messages (some with images) rendered into token ids, the visual prompts'
positions marked ``IMAGE_ID``, by ``blip2.data.conversation``: the same tokens ``ChatSession`` reads and chat
training trains on.

Two formats. "chat": the LLM's own chat template (``TemplateFormat``), each image's visual prompt (``num_visual``
positions) at the start of the user message that carries it, before its text. "vqa", and every LLM without a chat
template: BLIP-2's prompt (``QuestionAnswerFormat``), the visual prompts first, then BOS and the turns
"Question: {} Answer: {reply}" joined by spaces (T5: no BOS, EOS last); a user message with an image and no text
adds nothing, so an image alone is captioned as ``caption`` does.

A model trained with ``llm.visual_prompt_per_turn`` reads each user message into a visual prompt of its own
(``ChatSession`` does the same): every user message opens with the visual prompts of the images it carries, or of
the conversation's latest image when it carries none, the Q-Former reading that message's text.
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
    """Token ids (``IMAGE_ID`` at visual positions) and the images whose visual prompts fill them, in order, with
    what the Q-Former reads for each (``reads``: "" for no text; a user message with ``llm.visual_prompt_per_turn``)."""

    ids: list[int]
    images: list[UserImage]
    num_visual: int
    reads: list[str]

    def key(self) -> list:
        """The ids with each visual position named by (image hash, what was read, index): equal keys mean equal LLM
        inputs."""
        key: list = list(self.ids)
        positions = [i for i, token in enumerate(self.ids) if token == IMAGE_ID]
        for block, (image, read) in enumerate(zip(self.images, self.reads)):
            for offset, position in enumerate(positions[block * self.num_visual : (block + 1) * self.num_visual]):
                key[position] = (image.key, read, offset)
        return key


def render(
    tokenizer: LLMTokenizer, messages: list[Message], num_visual: int, prompt_format: PromptFormat = "chat",
    per_turn: bool = False,
) -> Prompt:
    """The prompt that asks the LLM (``tokenizer``'s) for the next assistant message; ``per_turn``: a visual prompt
    read from each user message (``llm.visual_prompt_per_turn``, above)."""
    conversation = conversation_format(tokenizer) if prompt_format == "chat" else QuestionAnswerFormat(tokenizer)
    texts = [{"role": m.role, "content": m.text} for m in messages]
    placed = per_turn_images(messages) if per_turn else [list(m.images) for m in messages]
    ids = conversation.token_ids(texts, num_visual, images=[len(images) for images in placed])
    reads = [m.text if per_turn else "" for m, images in zip(messages, placed) for _ in images]
    return Prompt(ids, [image for images in placed for image in images], num_visual, reads)


def per_turn_images(messages: list[Message]) -> list[list[UserImage]]:
    """The images whose visual prompts open each message with ``llm.visual_prompt_per_turn``: a user message's own,
    or the conversation's latest until then; none for other roles."""
    latest: tuple[UserImage, ...] = ()
    placed = []
    for message in messages:
        latest = message.images or latest
        placed.append(list(latest) if message.role == "user" else [])
    return placed
