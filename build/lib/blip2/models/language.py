"""Frozen language models behind one interface: decoder-only (OPT, Llama, SmolLM2) and encoder-decoder (T5, Flan-T5).

BLIP-2 feeds the LLM ``inputs_embeds``: the projected query outputs (a soft visual prompt) followed by the
embeddings of text tokens. ``FrozenLLM`` gives the rest of the model what that needs and nothing more: the
embedding table (``embed``), its width (``hidden_size``), the dtype, and the id of the token text starts with
(``bos_token_id``). The wrapped model never trains: its parameters have ``requires_grad=False`` and it stays in
eval mode whatever ``.train()`` is called with; gradients still flow through it to the soft prompt. Its tokenizer
lives beside it (``blip2.data.text.LLMTokenizer``); building both from a config lives in ``blip2.weights.llms``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from blip2.errors import InputError


class FrozenLLM(nn.Module):
    """A causal or sequence-to-sequence transformers LM, frozen and in eval mode.

    ``hidden_size`` is the width of the input embeddings, i.e. what the soft prompt must have (OPT-350m's 512, not
    its 1024 hidden width). ``bos_token_id``: what decoder-only text starts with (OPT ``</s>``, Llama ``<s>``,
    SmolLM2 here ``<|endoftext|>``; None for T5), the visual prompt's first row with ``llm.bos_before_image``.
    """

    def __init__(self, model: PreTrainedModel, bos_token_id: int | None) -> None:
        super().__init__()
        if model.get_output_embeddings() is None:
            raise InputError(
                f"{type(model).__name__} has no language-modelling head: load it with AutoModelForCausalLM "
                "(decoder-only) or AutoModelForSeq2SeqLM (encoder-decoder)"
            )
        _check_tied_head(model)
        self.model = model.requires_grad_(False).eval()
        self.bos_token_id = bos_token_id
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

    def context_length(self) -> int | None:
        """The context window in tokens (None when positions are not bounded, as with T5's relative ones)."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def _input_embeddings(self) -> nn.Embedding:
        owner = self.model.get_encoder() if self.is_encoder_decoder else self.model
        return owner.get_input_embeddings()


def _check_tied_head(model: PreTrainedModel) -> None:
    """A model whose config ties lm_head to the input embeddings must actually share the tensor."""
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if tied and head is not table:
        raise InputError(
            f"{type(model).__name__}'s config sets tie_word_embeddings but lm_head does not share the "
            "input embedding tensor: call model.tie_weights() before wrapping it"
        )
