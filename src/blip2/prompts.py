"""The paper's text prompts, one home for training and inference (so the two cannot drift apart).

Captioning reads no prompt; VQA wraps the question in "Question: {} Answer:" for decoder-only LLMs (OPT) and
"Question: {} Short answer:" for encoder-decoder ones (Flan-T5), BLIP-2 section 4.2.
"""

from __future__ import annotations

from collections.abc import Sequence

from blip2.errors import InputError

CAPTION_PROMPT = ""
VQA_TEMPLATES = {"decoder-only": "Question: {} Answer:", "encoder-decoder": "Question: {} Short answer:"}


def family(is_encoder_decoder: bool) -> str:
    return "encoder-decoder" if is_encoder_decoder else "decoder-only"


def vqa_template(is_encoder_decoder: bool) -> str:
    """The paper's VQA prompt for an LLM family."""
    return VQA_TEMPLATES[family(is_encoder_decoder)]


def format_questions(questions: Sequence[str], template: str) -> list[str]:
    """Put each question into ``template``, which must hold exactly one ``{}``."""
    if template.count("{}") != 1:
        raise InputError(f"prompt_template must contain exactly one '{{}}' where the question goes, got {template!r}")
    return [template.replace("{}", question.strip()) for question in questions]


def turn_prompt(message: str, is_encoder_decoder: bool) -> str:
    """What the Q-Former reads for one user message of a conversation with ``llm.visual_prompt_per_turn``: the
    message as a VQA question, the form it learns questions in ("" for a message without text: read no text)."""
    return format_questions([message], vqa_template(is_encoder_decoder))[0] if message.strip() else ""
