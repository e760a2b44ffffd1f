"""A conversation about an image as LLM token ids, with ``IMAGE_ID`` where the visual prompt's vectors go.

Chat (``blip2.infer.chat``), the server's engine and chat training data all render conversations here, so what
a model is trained on is exactly what it is later asked in. Two formats:

SmolLM2-Instruct and other LLMs with a chat template (ChatML), the soft prompt opening the first user message
(the server may put several images in a conversation: ``images`` counts those opening each message)::

    <|im_start|>system\\nYou are a helpful AI assistant ...<|im_end|>\\n<|im_start|>user\\n
    [visual prompt]What is in the picture?<|im_end|>\\n<|im_start|>assistant\\n

An LLM without a chat template (OPT, T5) talks in BLIP-2's VQA prompt, the soft prompt first as in ``answer``::

    [visual prompt]</s>Question: What is it? Answer: a cat Question: What colour? Answer:

Message text is tokenized with special tokens split (``LLMTokenizer.ids``): only the template's own markers are
control tokens, never what a user (or a dataset) wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

from blip2.data.text import LLMTokenizer
from blip2.errors import InputError
from blip2.prompts import vqa_template

IMAGE_ID = -1  # stands for one visual-prompt position in a conversation's token list
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
ROLES = ("system", "user", "assistant")
_SLOT = "\x00blip2-message-{}\x00"  # stands for a message's text while the template is rendered


class TemplateFormat:
    """The LLM's own chat template; each image's visual prompt opens the message that carries it, right before its
    text (by default one image, opening the first user message)."""

    def __init__(self, tokenizer: LLMTokenizer):
        self.tokenizer = tokenizer

    def token_ids(self, messages: list[Message], num_visual: int, generation_prompt: bool = True,
                  images: Sequence[int] | None = None) -> list[int]:
        """``messages`` -> token ids; ``generation_prompt`` ends them with the glue that opens the reply; ``images``:
        how many images open each message (``num_visual`` positions each; default: one in the first user message)."""
        check_messages(messages)
        counts = image_counts(messages, images)
        slots = [{"role": m["role"], "content": _SLOT.format(i)} for i, m in enumerate(messages)]
        text = self.tokenizer.hf.apply_chat_template(slots, tokenize=False, add_generation_prompt=generation_prompt)
        ids: list[int] = []
        for index, message in enumerate(messages):
            slot = _SLOT.format(index)
            if text.count(slot) != 1:
                raise InputError(
                    f"the chat template of this LLM did not keep message {index}'s text as given, so the image and "
                    "the messages cannot be placed in it; use a model without this template"
                )
            glue, text = text.split(slot)
            visual = [IMAGE_ID] * (num_visual * counts[index])
            ids += self.tokenizer.template_ids(glue) + visual + self.tokenizer.ids(message["content"])
        return ids + self.tokenizer.template_ids(text)


class QuestionAnswerFormat:
    """No chat template: each turn is BLIP-2's VQA prompt ("Question: {} Answer:", "... Short answer:" for T5)
    followed by the reply; turns are joined by spaces; the visual prompts come first, then the text with the prompt's
    special tokens (``LLMTokenizer.prompt_ids``: BOS first for OPT, EOS last for T5), as ``answer`` reads it. A user
    message without text asks nothing: an image alone reads as ``caption`` reads it."""

    def __init__(self, tokenizer: LLMTokenizer):
        self.tokenizer = tokenizer
        self.template = vqa_template(tokenizer.is_encoder_decoder)

    def token_ids(self, messages: list[Message], num_visual: int, images: Sequence[int] | None = None) -> list[int]:
        """``messages`` -> token ids; ``images`` as for ``TemplateFormat`` (their visual prompts all go first)."""
        check_messages(messages)
        count = sum(image_counts(messages, images))
        parts = [self.template.replace("{}", m["content"]) if m["role"] == "user" and m["content"] else m["content"]
                 for m in messages]  # fmt: skip
        (text,) = self.tokenizer.prompt_ids([" ".join(part for part in parts if part)])  # BOS/EOS as for answers
        return [IMAGE_ID] * (num_visual * count) + text


def conversation_format(tokenizer: LLMTokenizer) -> TemplateFormat | QuestionAnswerFormat:
    """The LLM's chat template when it has one, else BLIP-2's question-answer prompt."""
    return TemplateFormat(tokenizer) if tokenizer.chat_template else QuestionAnswerFormat(tokenizer)


def image_counts(messages: list[Message], images: Sequence[int] | None) -> list[int]:
    """How many images open each message: ``images`` checked, or (None) one opening the first user message."""
    if images is None:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        return [int(index == first_user) for index in range(len(messages))]
    counts = list(images)
    if len(counts) != len(messages) or not all(isinstance(n, int) and n >= 0 for n in counts):
        raise InputError(f"images={counts}: give one image count (an integer >= 0) per message, {len(messages)} in all")
    return counts


def per_turn_images(messages: list[Message]) -> list[int]:
    """One image opening each user message (``llm.visual_prompt_per_turn``), as ``images`` counts."""
    return [int(m["role"] == "user") for m in messages]


def check_messages(messages: list[Message]) -> None:
    """Raise ValueError unless ``messages`` hold known roles and text, with at least one user message."""
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InputError(f"message {index} has role {message.get('role')!r}; roles: {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise InputError(f"message {index} has no text content")
    if not any(m["role"] == "user" for m in messages):
        raise InputError("the conversation has no user message")
