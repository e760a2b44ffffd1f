"""The frozen LLMs an ``LLMConfig`` names, built with their tokenizers: the packaged SmolLM2-135M-Instruct (a GGUF
converted once and cached, ``blip2.weights.gguf``) or a local transformers directory (decoder-only or
encoder-decoder, as its config.json says)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from blip2.config import LLMConfig
from blip2.data.text import LLMTokenizer
from blip2.errors import InputError
from blip2.models.language import FrozenLLM
from blip2.weights.gguf import smollm2_dir

SMOLLM2_DOCUMENT_START = "<|endoftext|>"


class LLMLoadError(InputError):
    """A language model directory is missing, incomplete or unreadable."""


def llm_from_hf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokenizer_specials: bool = False
) -> tuple[FrozenLLM, LLMTokenizer]:
    """Wrap an in-memory transformers LM (frozen in place) and its tokenizer (``LLMConfig.tokenizer_specials``)."""
    text = LLMTokenizer(tokenizer, bool(model.config.is_encoder_decoder), tokenizer_specials)
    return FrozenLLM(model, text.bos_token_id), text


def build_llm(cfg: LLMConfig, dtype: torch.dtype | None = None) -> tuple[FrozenLLM, LLMTokenizer]:
    """The LLM ``cfg`` names, in ``dtype`` (default: ``cfg.dtype``), and its tokenizer.

    "smollm2": the packaged SmolLM2-135M-Instruct, converted from GGUF on first use and read from
    the cache afterwards, with ``<|endoftext|>`` as its BOS (``use_document_start_as_bos``). "hf": the
    transformers directory ``cfg.path``; its config.json decides between a causal and a sequence-to-sequence
    LM (``is_encoder_decoder``).
    """
    dtype = dtype or getattr(torch, cfg.dtype)
    if cfg.kind == "smollm2":
        path = smollm2_dir()
        remedy = f"the SmolLM2 cache is damaged: delete {path} and run again to rebuild it"
        model, tokenizer = load_lm_dir(path, dtype, remedy)
        tokenizer = use_document_start_as_bos(model, tokenizer, SMOLLM2_DOCUMENT_START)
        return llm_from_hf(model, tokenizer, cfg.tokenizer_specials)
    path = Path(cfg.path).expanduser()
    remedy = "point llm.path at a transformers model directory (config.json, weights and tokenizer files)"
    return llm_from_hf(*load_lm_dir(path, dtype, remedy), cfg.tokenizer_specials)


def use_document_start_as_bos(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, token: str
) -> PreTrainedTokenizerBase:
    """Make ``token`` the BOS of tokenizer, model config and generation config (so an export carries it too).

    SmolLM2-Instruct names ``<|im_start|>`` its BOS, but that token opens a chat turn: after it the model
    expects a role name ("user", "assistant"), not a caption. Plain text in its pre-training started after
    the document separator ``<|endoftext|>``; with that as BOS, stage 2 learns faster (docs/llm.md).
    """
    if token not in tokenizer.get_vocab():
        raise InputError(f"{token!r} is not a token of this tokenizer")
    tokenizer.bos_token = token
    model.config.bos_token_id = model.generation_config.bos_token_id = tokenizer.bos_token_id
    return tokenizer


def load_lm_dir(
    path: Path, dtype: torch.dtype, remedy: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local transformers directory; any defect raises ``LLMLoadError`` naming it."""
    if not path.is_dir():
        raise LLMLoadError(f"LLM directory {path} does not exist: {remedy}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LLMLoadError(f"{path} has no config.json, so it is not a transformers model directory: {remedy}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise LLMLoadError(f"cannot read {config_file} ({error}): {remedy}") from error
    extra = {}
    if config.model_type == "blip-2":  # a whole Blip2 directory: its LLM lives under "language_model."
        config, extra = config.text_config, {"key_mapping": {r"^language_model\.": ""}}
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, output_loading_info=True, **extra
        )
    except Exception as error:
        raise LLMLoadError(f"cannot load the weights in {path} as {auto.__name__} ({error}): {remedy}") from error
    missing = sorted(info["missing_keys"])
    if missing:
        raise LLMLoadError(f"the weights in {path} lack {len(missing)} tensors, e.g. {missing[:3]}: {remedy}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise LLMLoadError(f"cannot load the tokenizer in {path} ({error}): {remedy}") from error
    return model, tokenizer
