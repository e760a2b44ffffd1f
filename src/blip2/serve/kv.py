"""Sequences of different lengths decoded together in one transformers key/value cache.

``RowSlots`` keeps the running rows' keys/values in preallocated storage, per layer [S, heads, C, head_dim]: row r
of the batch lives in slot r, right-aligned, its positions in columns [start[r], end). Each batched forward writes
every row's new position in place at the shared column ``end`` (``SlotLayer``, a transformers cache layer), and
attention reads columns [low, end] (low = the earliest start) with a mask hiding each row's columns before its start;
each row's position id is its own length, so rotary (Llama) and learned (OPT) positions are those it has alone, and
T5's relative bias sees the same distances. A row joins with one copy of its own cache (from its prefill alone),
leaves by moving the last row into its slot; nothing else is copied per step. The storage is rebuilt (the live
columns moved, its size doubled) only when it is full or a row longer than ``end`` joins.

Encoder-decoder LLMs (``EncoderDecoderBatch``, T5) keep the decoder's self-attention in ``RowSlots`` and the encoder
states and cross-attention cache padded on the right (``PaddedCache``), with the encoder mask over them.

In fp32 a row's logits then match its single-row run to rounding (about 1e-6 relative: batched matrix products and
the masked attention kernel add in another order), not bit for bit; tests check that greedy texts are equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

from blip2.errors import InputError
from blip2.infer.decoding import (
    DecoderRunner,
    EncoderDecoderRunner,
    cache_name,
    forward_accepts,
)
from blip2.models.language import FrozenLLM

Layers = list[tuple[Tensor, Tensor]]  # per layer: keys, values [1, heads, L, head_dim]


def check_batchable(llm: FrozenLLM) -> None:
    """Refuse LLMs whose cache layers are not plain growing ones (sliding windows, linear attention)."""
    config = llm.model.config.get_text_config(decoder=True)
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise InputError(
            f"{type(llm.model).__name__} keeps {sorted(kinds)} cache layers; the engine batches only full-attention "
            "caches (DynamicLayer)"
        )


def layers_of(cache: DynamicCache) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_layers(llm: FrozenLLM, layers: Layers, length: int) -> DynamicCache:
    """A new DynamicCache holding the first ``length`` positions of ``layers`` (copied: the cache grows)."""
    cache = DynamicCache(config=llm.model.config.get_text_config(decoder=True))
    for index, (keys, values) in enumerate(layers):
        cache.update(keys[:, :, :length], values[:, :, :length], index)
    return cache


def prefill(llm: FrozenLLM, rows: list[tuple[Tensor, Layers | None, int]]) -> tuple[Tensor, list[Layers]]:
    """Run the prompts of several new rows in one forward (a decoder-only LLM).

    ``rows``: (embeddings [1, n, H] of the positions to run, the layers caching the ``reuse`` positions before them
    or None, ``reuse``) -> (logits [A, V] after each prompt, each row's whole cache, reused and run, unpadded). The
    cached prefixes are padded on the left to a common width, the new positions on the left within theirs; a row
    alone runs exactly as ``DecoderRunner`` runs it.
    """
    if len(rows) == 1:
        embeds, layers, reuse = rows[0]
        runner = DecoderRunner(llm)
        if layers is not None:
            runner.cache = cache_from_layers(llm, layers, reuse)
        return runner.feed(embeds), [layers_of(runner.cache)]
    reused = [reuse if layers is not None else 0 for _, layers, reuse in rows]
    counts = [embeds.shape[1] for embeds, _, _ in rows]
    width, new = max(reused), max(counts)
    cache = DynamicCache(config=llm.model.config.get_text_config(decoder=True))
    if width:
        template = next(layers for _, layers, _ in rows if layers is not None)
        for index, (keys, _) in enumerate(template):
            blank = keys.new_zeros(1, keys.shape[1], 0, keys.shape[3])
            parts = [layers[index] if layers is not None else (blank, blank) for _, layers, _ in rows]
            cache.update(torch.cat([_pad_left(k[:, :, :n], width) for (k, _), n in zip(parts, reused)]),
                         torch.cat([_pad_left(v[:, :, :n], width) for (_, v), n in zip(parts, reused)]), index)
    embeds = torch.cat([_pad_left(e.transpose(1, 2), new).transpose(1, 2) for e, _, _ in rows])  # [A, N, H]
    device = embeds.device
    columns = torch.arange(width + new, device=device)[None]  # [1, P + N]
    old = torch.tensor(reused, device=device)[:, None]
    fresh = torch.tensor(counts, device=device)[:, None]
    mask = ((columns >= width - old) & (columns < width)) | (columns >= width + new - fresh)  # [A, P + N]
    positions = (old + torch.arange(new, device=device)[None] - (new - fresh)).clamp(min=0)  # [A, N]
    name = cache_name(llm.model)
    extra = {"logits_to_keep": 1} if forward_accepts(llm.model, "logits_to_keep") else {}
    out = llm.model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions, use_cache=True,
                    **{name: cache}, **extra)  # fmt: skip
    merged = layers_of(getattr(out, name))
    caches = []
    for row in range(len(rows)):
        real = mask[row].nonzero().squeeze(1)
        caches.append([(k[row : row + 1, :, real], v[row : row + 1, :, real]) for k, v in merged])
    return out.logits[:, -1], caches


def _pad_left(x: Tensor, width: int) -> Tensor:
    """Zero-pad dim 2 of [B, h, L, d] (or of [B, H, L] embeddings, transposed) on the left to ``width``."""
    return F.pad(x, [0, 0] * (x.dim() - 3) + [width - x.shape[2], 0])


class RowSlots:
    """The running rows' keys/values, written in place (see the module docstring)."""

    def __init__(self, num_layers: int):
        self.keys: list[Tensor] = []  # per layer [S, h, C, d]
        self.values: list[Tensor] = []
        self.starts: list[int] = []  # per row: its first column
        self.end = 0  # the column the next forward writes
        self.cache = Cache(layers=[SlotLayer(self, index) for index in range(num_layers)])

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def low(self) -> int:
        return min(self.starts, default=self.end)

    def add(self, layers: Layers) -> None:
        """A row holding ``layers`` (unpadded, [1, h, L, d] each) joins as the last row."""
        length = layers[0][0].shape[2]
        if not self.keys or len(self) == self.keys[0].shape[0] or length > self.end:
            self._rebuild(layers, len(self) + 1, length)
        row = len(self)
        for (keys, values), store_k, store_v in zip(layers, self.keys, self.values):
            store_k[row, :, self.end - length : self.end] = keys[0]
            store_v[row, :, self.end - length : self.end] = values[0]
        self.starts.append(self.end - length)

    def remove(self, gone: set[int]) -> list[int]:
        """Drop rows ``gone``, each replaced by the last row; -> the old index of each remaining row, in order."""
        order = list(range(len(self)))
        for row in sorted(gone, reverse=True):
            last = len(order) - 1
            if row != last:
                start = self.starts[last]
                for store in (*self.keys, *self.values):
                    store[row, :, start : self.end] = store[last, :, start : self.end]
                self.starts[row], order[row] = self.starts[last], order[last]
            self.starts.pop()
            order.pop()
        return order

    def row(self, index: int) -> Layers:
        """Row ``index``'s positions, copied."""
        span = slice(self.starts[index], self.end)
        return [(k[index : index + 1, :, span].clone(), v[index : index + 1, :, span].clone())
                for k, v in zip(self.keys, self.values)]  # fmt: skip

    def inputs(self) -> tuple[Tensor | None, Tensor]:
        """For the next forward of one position per row: attention mask [B, end + 1 - low] (None when no row is
        padded: then attention runs as for one unpadded sequence) and position ids [B, 1]."""
        if self.end == self.keys[0].shape[2]:
            self._rebuild(None, len(self), 0)
        low, device = self.low, self.keys[0].device
        starts = torch.tensor(self.starts, device=device)[:, None]  # [B, 1]
        columns = torch.arange(low, self.end + 1, device=device)[None]  # [1, W]
        mask = None if max(self.starts) == low else (columns >= starts).long()
        return mask, self.end - starts

    def write(self, index: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``index``'s new keys/values [B, h, 1, d] go to column ``end``; -> what attention reads."""
        rows, low = len(self), self.low
        self.keys[index][:rows, :, self.end] = keys[:, :, 0]
        self.values[index][:rows, :, self.end] = values[:, :, 0]
        return self.keys[index][:rows, :, low : self.end + 1], self.values[index][:rows, :, low : self.end + 1]

    def advance(self) -> None:
        self.end += 1

    def _rebuild(self, joining: Layers | None, rows: int, length: int) -> None:
        """New storage with room for ``rows`` rows, a row of ``length`` positions and twice the live columns to write
        into; the live columns move to end at max(live width, length) plus as much room on their left."""
        low, live = self.low, self.end - self.low
        end = max(live, length) * 2 + 16
        columns, slots = 2 * end, max(4, 2 * rows)
        template = self.keys or [k for k, _ in joining]
        shapes = [(slots, t.shape[1], columns, t.shape[3]) for t in template]
        keys = [template[0].new_zeros(shape) for shape in shapes]
        values = [template[0].new_zeros(shape) for shape in shapes]
        for new, old in zip((*keys, *values), (*self.keys, *self.values)):
            new[: len(self), :, end - live : end] = old[: len(self), :, low : self.end]
        self.keys, self.values = keys, values
        self.starts = [start - self.end + end for start in self.starts]
        self.end = end


class SlotLayer(CacheLayerMixin):
    """One LLM layer's view of ``RowSlots``, as transformers' attention calls it (one new position per row)."""

    def __init__(self, slots: RowSlots, index: int):
        super().__init__()
        self.slots, self.index = slots, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if key_states.shape[2] != 1:
            raise ValueError("the engine's batch cache takes one new position per row")
        return self.slots.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.slots.end - self.slots.low

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class DecoderBatch:
    """The running rows of a decoder-only LLM."""

    def __init__(self, llm: FrozenLLM):
        self.llm = llm
        self.slots = RowSlots(llm.model.config.get_text_config(decoder=True).num_hidden_layers)
        self._cache_name = cache_name(llm.model)
        self._keep_last = forward_accepts(llm.model, "logits_to_keep")

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, layers: Layers) -> None:
        """A row whose prompt has run (``prefill``): its whole cache."""
        self.slots.add(layers)

    def remove(self, gone: set[int]) -> list[int]:
        return self.slots.remove(gone)

    def row(self, index: int) -> Layers:
        return self.slots.row(index)

    def forward(self, tokens: list[int]) -> Tensor:
        """Feed each row its next token -> logits [B, V] after it."""
        mask, positions = self.slots.inputs()
        ids = torch.tensor(tokens, device=positions.device)[:, None]  # [B, 1]
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.llm.model(inputs_embeds=self.llm.embed(ids), attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_name: self.slots.cache}, **extra)  # fmt: skip
        self.slots.advance()
        return out.logits[:, -1]  # [B, V]


class PaddedCache:
    """A DynamicCache whose rows are padded on the right (T5's cross-attention); ``mask`` [B, W] marks real columns."""

    def __init__(self, cache: DynamicCache):
        self.cache = cache
        self.mask = torch.ones(1, cache.get_seq_length(), dtype=torch.bool, device=cache.layers[0].keys.device)

    def add(self, other: DynamicCache) -> None:
        """Append ``other``'s single unpadded row at the bottom."""
        width = max(self.mask.shape[1], other.get_seq_length())
        other_mask = self.mask.new_ones(1, other.get_seq_length())
        for mine, theirs in zip(self.cache.layers, other.layers):
            mine.keys = torch.cat([_pad_right(mine.keys, width, 2), _pad_right(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_right(mine.values, width, 2), _pad_right(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_right(self.mask, width, 1), _pad_right(other_mask, width, 1)])

    def keep(self, rows: Tensor) -> None:
        """Keep ``rows`` (in that order), then drop columns that are padding in every row."""
        self.mask = self.mask[rows]
        width = int(self.mask.any(dim=0).nonzero().max()) + 1
        for layer in self.cache.layers:
            layer.keys = layer.keys[rows, :, :width].contiguous()
            layer.values = layer.values[rows, :, :width].contiguous()
        self.mask = self.mask[:, :width]


def _pad_right(x: Tensor, width: int, dim: int) -> Tensor:
    """Zero-pad dim ``dim`` of ``x`` to ``width``."""
    pad = [0, 0] * (x.dim() - dim - 1) + [0, width - x.shape[dim]]
    return F.pad(x, pad)


class EncoderDecoderBatch:
    """The running rows of an encoder-decoder LLM: the decoder's self-attention in ``RowSlots``, the encoder states
    and the cross-attention cache padded on the right."""

    def __init__(self, llm: FrozenLLM):
        self.llm = llm
        self.slots = RowSlots(llm.model.config.get_text_config(decoder=True).num_decoder_layers)
        self.cross: PaddedCache | None = None
        self.encoder_states: Tensor | None = None  # [B, L_enc, H], padded like ``cross``
        self._cache_name = cache_name(llm.model)

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, runner: EncoderDecoderRunner) -> None:
        """A row whose encoder and first decoder position ``runner`` has run alone."""
        cache: EncoderDecoderCache = runner.cache
        states = runner.encoder_outputs.last_hidden_state  # [1, L_enc, H]
        self.slots.add(layers_of(cache.self_attention_cache))
        if self.cross is None:
            self.cross, self.encoder_states = PaddedCache(cache.cross_attention_cache), states
            return
        self.cross.add(cache.cross_attention_cache)
        width = self.cross.mask.shape[1]
        self.encoder_states = torch.cat([_pad_right(self.encoder_states, width, 1), _pad_right(states, width, 1)])

    def remove(self, gone: set[int]) -> list[int]:
        order = self.slots.remove(gone)
        if not order:
            self.cross = self.encoder_states = None
            return order
        rows = torch.tensor(order, device=self.encoder_states.device)
        self.cross.keep(rows)
        self.encoder_states = self.encoder_states[rows, : self.cross.mask.shape[1]].contiguous()
        return order

    def forward(self, tokens: list[int]) -> Tensor:
        mask, positions = self.slots.inputs()  # T5's relative positions need no ids
        ids = torch.tensor(tokens, device=positions.device)[:, None]  # [B, 1]
        cache = EncoderDecoderCache(self.slots.cache, self.cross.cache)  # cross-attention: computed, reused
        out = self.llm.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states), attention_mask=self.cross.mask.long(),
            decoder_input_ids=ids, decoder_attention_mask=mask, use_cache=True, **{self._cache_name: cache},
        )  # fmt: skip
        self.slots.advance()
        return out.logits[:, -1]  # [B, V]
