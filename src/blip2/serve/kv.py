"""Sequences of different lengths decoded together: one transformers key/value cache whose rows are padded to a
common width, with an attention mask over the real positions and explicit positions per row.

Decoder-only LLMs (``DecoderBatch``): rows padded on the left, so every row's next token goes in the last column;
each row's position id is its own length, so rotary (Llama) and learned (OPT) positions are those the row has
alone. Encoder-decoder LLMs (``EncoderDecoderBatch``, T5): the decoder's self-attention cache is padded on the
left as above (T5's relative position bias only sees differences of positions, which the padding keeps), the
encoder states and the cross-attention cache on the right, with the encoder mask over them.

A row joins with the cache its prefill made alone (batch 1), and leaves by index. In fp32 a row's logits then
match its single-row run to rounding (about 1e-6 relative: batched matrix products and the masked attention kernel
add in another order), not bit for bit; tests check that greedy texts are equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

from blip2.infer.decoding import DecoderRunner, EncoderDecoderRunner, cache_name, forward_accepts
from blip2.models.language import FrozenLLM

Layers = list[tuple[Tensor, Tensor]]


def check_batchable(llm: FrozenLLM) -> None:
    """Refuse LLMs whose cache layers are not plain growing ones (sliding windows, linear attention)."""
    config = llm.model.config.get_text_config(decoder=True)
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise ValueError(
            f"{type(llm.model).__name__} keeps {sorted(kinds)} cache layers; the engine batches only full-attention "
            "caches (DynamicLayer)"
        )


class PaddedCache:
    """A DynamicCache whose rows are padded on one side; ``mask`` [B, W] marks the real positions."""

    def __init__(self, cache: DynamicCache, side: str):
        self.cache = cache
        self.side = side
        width = cache.get_seq_length()
        self.mask = torch.ones(1, width, dtype=torch.bool, device=_device(cache))

    def add(self, other: DynamicCache) -> None:
        """Append ``other``'s rows (unpadded, all of one length) at the bottom."""
        other_mask = torch.ones(other.layers[0].keys.shape[0], other.get_seq_length(), dtype=torch.bool,
                                device=self.mask.device)  # fmt: skip
        width = max(self.mask.shape[1], other_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.layers):
            mine.keys = torch.cat([self._pad(mine.keys, width), self._pad(theirs.keys, width)])
            mine.values = torch.cat([self._pad(mine.values, width), self._pad(theirs.values, width)])
        self.mask = torch.cat([self._pad(self.mask, width), self._pad(other_mask, width)])

    def keep(self, rows: Tensor) -> None:
        """Keep only ``rows`` (indices), then drop columns that are padding in every row."""
        self.mask = self.mask[rows]
        real = self.mask.any(dim=0).nonzero()
        start, stop = (int(real[0]), int(real[-1]) + 1) if len(real) else (0, 0)
        for layer in self.cache.layers:
            layer.keys = layer.keys[rows, :, start:stop].contiguous()
            layer.values = layer.values[rows, :, start:stop].contiguous()
        self.mask = self.mask[:, start:stop]

    def grow(self) -> None:
        """The last forward appended one real position to every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)

    def row(self, index: int) -> Layers:
        """Row ``index``'s real positions, copied: [(keys, values) [1, heads, L, head_dim] per layer]."""
        columns = self.mask[index].nonzero().squeeze(1)
        return [(layer.keys[index : index + 1, :, columns].clone(), layer.values[index : index + 1, :, columns].clone())
                for layer in self.cache.layers]  # fmt: skip

    def _pad(self, x: Tensor, width: int) -> Tensor:
        """Pad dim -2 of keys/values [B, h, L, d] or dim -1 of a mask [B, L] to ``width`` on ``side``."""
        missing = width - (x.shape[-1] if x.dim() == 2 else x.shape[-2])
        if missing == 0:
            return x
        sides = (missing, 0) if self.side == "left" else (0, missing)
        return F.pad(x, sides if x.dim() == 2 else (0, 0, *sides))


def _device(cache: DynamicCache) -> torch.device:
    return cache.layers[0].keys.device


def cache_from_layers(llm: FrozenLLM, layers: Layers, length: int) -> DynamicCache:
    """A new DynamicCache holding the first ``length`` positions of ``layers`` (copied: the cache grows)."""
    cache = DynamicCache(config=llm.model.config.get_text_config(decoder=True))
    for index, (keys, values) in enumerate(layers):
        cache.update(keys[:, :, :length], values[:, :, :length], index)
    return cache


class DecoderBatch:
    """The running rows of a decoder-only LLM."""

    def __init__(self, llm: FrozenLLM):
        self.llm = llm
        self.padded: PaddedCache | None = None
        self._cache_name = cache_name(llm.model)
        self._keep_last = forward_accepts(llm.model, "logits_to_keep")

    def __len__(self) -> int:
        return 0 if self.padded is None else self.padded.mask.shape[0]

    def add(self, runner: DecoderRunner) -> None:
        """A row whose prompt ``runner`` has run alone."""
        if self.padded is None:
            self.padded = PaddedCache(runner.cache, "left")
        else:
            self.padded.add(runner.cache)

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.padded = None
            return
        self.padded.keep(torch.tensor(rows, device=self.padded.mask.device))

    def row(self, index: int) -> Layers:
        return self.padded.row(index)

    def forward(self, tokens: list[int]) -> Tensor:
        """Feed each row its next token -> logits [B, V] after it."""
        padded = self.padded
        ids = torch.tensor(tokens, device=padded.mask.device)[:, None]  # [B, 1]
        positions = padded.mask.sum(dim=1, keepdim=True)  # [B, 1]: each row's own length
        padded.grow()
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.llm.model(
            inputs_embeds=self.llm.embed(ids), attention_mask=padded.mask.long(), position_ids=positions,
            use_cache=True, **{self._cache_name: padded.cache}, **extra,
        )  # fmt: skip
        padded.cache = getattr(out, self._cache_name)
        return out.logits[:, -1]  # [B, V]


class EncoderDecoderBatch:
    """The running rows of an encoder-decoder LLM: encoder states and cross-attention cache padded on the right,
    the decoder's self-attention cache on the left."""

    def __init__(self, llm: FrozenLLM):
        self.llm = llm
        self.decoder: PaddedCache | None = None
        self.cross: PaddedCache | None = None
        self.encoder_states: Tensor | None = None  # [B, L_enc, H], padded like ``cross``
        self._cache_name = cache_name(llm.model)

    def __len__(self) -> int:
        return 0 if self.decoder is None else self.decoder.mask.shape[0]

    def add(self, runner: EncoderDecoderRunner) -> None:
        """A row whose encoder and first decoder position ``runner`` has run alone."""
        cache: EncoderDecoderCache = runner.cache
        states = runner.encoder_outputs.last_hidden_state  # [1, L_enc, H]
        if self.decoder is None:
            self.decoder = PaddedCache(cache.self_attention_cache, "left")
            self.cross = PaddedCache(cache.cross_attention_cache, "right")
            self.encoder_states = states
            return
        self.decoder.add(cache.self_attention_cache)
        self.cross.add(cache.cross_attention_cache)
        width = self.cross.mask.shape[1]
        self.encoder_states = torch.cat([_pad_right(self.encoder_states, width), _pad_right(states, width)])

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.decoder = self.cross = self.encoder_states = None
            return
        index = torch.tensor(rows, device=self.decoder.mask.device)
        self.decoder.keep(index)
        self.cross.keep(index)
        self.encoder_states = self.encoder_states[index, : self.cross.mask.shape[1]].contiguous()

    def forward(self, tokens: list[int]) -> Tensor:
        ids = torch.tensor(tokens, device=self.decoder.mask.device)[:, None]  # [B, 1]
        self.decoder.grow()
        cache = EncoderDecoderCache(self.decoder.cache, self.cross.cache)  # cross-attention: computed, reused
        out = self.llm.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states), attention_mask=self.cross.mask.long(),
            decoder_input_ids=ids, decoder_attention_mask=self.decoder.mask.long(), use_cache=True,
            **{self._cache_name: cache},
        )  # fmt: skip
        self.decoder.cache = getattr(out, self._cache_name).self_attention_cache
        return out.logits[:, -1]  # [B, V]


def _pad_right(states: Tensor, width: int) -> Tensor:
    return F.pad(states, (0, 0, 0, width - states.shape[1]))
