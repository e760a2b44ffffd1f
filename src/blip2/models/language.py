"""Frozen language models behind one interface: decoder-only (OPT, Llama, SmolLM2) and encoder-decoder (T5, Flan-T5).

BLIP-2 feeds the LLM ``inputs_embeds``: the projected query outputs (a soft visual prompt)
followed by the embeddings of text tokens. ``FrozenLLM`` gives the rest of the code what that
needs and nothing more: the embedding table (``embed``), its width (``hidden_size``), the special
token ids, and ``tokenize`` for text with an explicit BOS/EOS policy and padding side.
The wrapped model never trains: its parameters have ``requires_grad=False`` and it stays in eval
mode whatever ``.train()`` is called with; gradients still flow through it to the soft prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from blip2.config import LLMConfig
from blip2.weights.gguf import smollm2_dir


SMOLLM2_DOCUMENT_START = "<|endoftext|>"


class LLMLoadError(RuntimeError):
    """A language model directory is missing, incomplete or unreadable."""


class FrozenLLM(nn.Module):
    """A causal or sequence-to-sequence transformers LM with its tokenizer, frozen and in eval mode.

    ``hidden_size`` is the width of the input embeddings, i.e. what the soft prompt must have
    (OPT-350m's 512, not its 1024 hidden width). The tokenizer gets ``pad = eos`` when it has no
    pad token, and pads on the right.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        if model.get_output_embeddings() is None:
            raise ValueError(
                f"{type(model).__name__} has no language-modelling head: load it with AutoModelForCausalLM "
                "(decoder-only) or AutoModelForSeq2SeqLM (encoder-decoder)"
            )
        _check_tied_head(model)
        _ensure_pad_token(tokenizer, type(model).__name__)
        tokenizer.padding_side = "right"
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.hidden_size = self._input_embeddings().embedding_dim

    def train(self, mode: bool = True) -> "FrozenLLM":
        """Stay in eval mode whatever ``mode`` says: a frozen LLM never runs dropout."""
        return super().train(False)

    def forward(self, **inputs) -> object:
        """The wrapped model's forward, e.g. ``llm(inputs_embeds=..., attention_mask=..., labels=...)``."""
        return self.model(**inputs)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings, the encoder's for an encoder-decoder model: [B, T] -> [B, T, hidden_size]."""
        return self._input_embeddings()(input_ids)

    @property
    def dtype(self) -> torch.dtype:
        return self._input_embeddings().weight.dtype

    @property
    def bos_token_id(self) -> int | None:
        """What decoder-only text starts with: OPT ``</s>``, Llama ``<s>``, SmolLM2 ``<|im_start|>``; T5 has none."""
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int:
        """Where generation stops: OPT/T5 ``</s>``, SmolLM2-Instruct ``<|im_end|>``."""
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """Fills padded positions; may equal ``eos_token_id``, so mask labels by ``attention_mask``, not by id."""
        return self.tokenizer.pad_token_id

    def tokenize(
        self,
        texts: Sequence[str],
        max_len: int,
        add_bos: bool,
        add_eos: bool = False,
        pad_left: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both [B, T] with T = the longest row (at most ``max_len``).

        The tokenizer's own special tokens are never added; ``add_bos``/``add_eos`` say exactly what
        surrounds the text, and truncation cuts the text, never them. Rows are padded on the right
        (training) or, with ``pad_left``, on the left (batched generation: every prompt then ends at
        the last position, where new tokens are appended).
        """
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts, not one string")
        if add_bos and self.bos_token_id is None:
            raise ValueError(f"{type(self.model).__name__}'s tokenizer has no BOS token: call tokenize with add_bos=False")
        budget = max_len - int(add_bos) - int(add_eos)
        if budget < 1:
            raise ValueError(f"max_len={max_len} leaves no room for text after the BOS/EOS tokens")
        pieces = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        rows = [[self.bos_token_id] * add_bos + piece + [self.eos_token_id] * add_eos for piece in pieces]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, T]
        for index, row in enumerate(rows):
            span = slice(length - len(row), length) if pad_left else slice(0, len(row))
            input_ids[index, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, span] = 1
        return input_ids, attention_mask

    def _input_embeddings(self) -> nn.Embedding:
        owner = self.model.get_encoder() if self.is_encoder_decoder else self.model
        return owner.get_input_embeddings()


def llm_from_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> FrozenLLM:
    """Wrap an in-memory transformers LM and its tokenizer (frozen in place)."""
    return FrozenLLM(model, tokenizer)


def build_llm(cfg: LLMConfig, dtype: torch.dtype | None = None) -> FrozenLLM:
    """The LLM ``cfg`` names, in ``dtype`` (default: ``cfg.dtype``).

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
        return llm_from_hf(model, use_document_start_as_bos(model, tokenizer, SMOLLM2_DOCUMENT_START))
    path = Path(cfg.path).expanduser()
    remedy = "point llm.path at a transformers model directory (config.json, weights and tokenizer files)"
    return llm_from_hf(*load_lm_dir(path, dtype, remedy))


def use_document_start_as_bos(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, token: str
) -> PreTrainedTokenizerBase:
    """Make ``token`` the BOS of tokenizer, model config and generation config (so an export carries it too).

    SmolLM2-Instruct names ``<|im_start|>`` its BOS, but that token opens a chat turn: after it the model
    expects a role name ("user", "assistant"), not a caption. Plain text in its pre-training started after
    the document separator ``<|endoftext|>``; with that as BOS, stage 2 learns faster (docs/llm.md).
    """
    if token not in tokenizer.get_vocab():
        raise ValueError(f"{token!r} is not a token of this tokenizer")
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


def _check_tied_head(model: PreTrainedModel) -> None:
    """A model whose config ties lm_head to the input embeddings must actually share the tensor."""
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if tied and head is not table:
        raise ValueError(
            f"{type(model).__name__}'s config sets tie_word_embeddings but lm_head does not share the "
            "input embedding tensor: call model.tie_weights() before wrapping it"
        )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model_name: str) -> None:
    """Pad with EOS when the tokenizer has no pad token (Llama, GPT-2 style vocabularies)."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {model_name} has neither a pad nor an EOS token: set tokenizer.pad_token")
    tokenizer.pad_token = tokenizer.eos_token
