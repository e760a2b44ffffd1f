"""A conversation as the LLM reads it: messages (some with images) rendered into token ids, the visual prompt's
positions marked ``IMAGE_ID``, as ``ChatSession`` renders them.

Two formats. "chat": the LLM's own chat template, each image's visual prompt (``num_visual`` positions) at the
start of the user message that carries it, before its text (``TemplateFormat`` for one image in the first user
message). "vqa", and every LLM without a chat template: BLIP-2's prompt, the visual prompts first, then BOS and
the turns "Question: {} Answer: {reply}" joined by spaces (``QuestionAnswerFormat``; T5: no BOS, EOS last); a user
message with an image and no text adds nothing, so an image alone is captioned as ``model.caption`` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from blip2.data.images import load_image
from blip2.infer.chat import IMAGE_ID, IMAGE_MARK
from blip2.infer.generation import vqa_template
from blip2.models.language import FrozenLLM

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


def render(llm: FrozenLLM, messages: list[Message], num_visual: int, prompt_format: PromptFormat = "chat") -> Prompt:
    """The prompt that asks ``llm`` for the next assistant message."""
    images = [image for message in messages for image in message.images]
    if prompt_format == "chat" and llm.tokenizer.chat_template:
        ids = _template_ids(llm, messages, len(images), num_visual)
    else:
        ids = _vqa_ids(llm, messages, len(images), num_visual)
    return Prompt(ids, images, num_visual)


def _template_ids(llm: FrozenLLM, messages: list[Message], count: int, num_visual: int) -> list[int]:
    marked = [{"role": m.role, "content": IMAGE_MARK * len(m.images) + m.text} for m in messages]
    text = llm.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    if text.count(IMAGE_MARK) != count:
        raise ValueError(
            f"the chat template of {type(llm.model).__name__} did not keep the user messages' text as given, so the "
            'image cannot be placed in it: send "prompt_format": "vqa"'
        )
    first, *rest = text.split(IMAGE_MARK)
    ids = _tokens(llm, first)
    for piece in rest:
        ids += [IMAGE_ID] * num_visual + _tokens(llm, piece)
    return ids


def _vqa_ids(llm: FrozenLLM, messages: list[Message], count: int, num_visual: int) -> list[int]:
    template = vqa_template(llm)
    parts = [template.replace("{}", m.text) if m.role == "user" and m.text else m.text for m in messages]
    text = _tokens(llm, " ".join(part for part in parts if part))
    visual = [IMAGE_ID] * (num_visual * count)
    if llm.is_encoder_decoder:
        return visual + text + [llm.eos_token_id]
    return visual + [llm.bos_token_id] + text


def _tokens(llm: FrozenLLM, text: str) -> list[int]:
    return llm.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
