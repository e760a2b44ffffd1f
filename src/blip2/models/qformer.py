"""The Querying Transformer (Q-Former).

A stack of BERT layers over ``[queries ; text]``:

- learned query embeddings (no position embedding), then text word + position embeddings (positions from 0),
  one LayerNorm over the joint sequence;
- self-attention and its output block are shared by queries and text;
- every ``cross_attention_freq``-th layer lets the *query slice only* attend to the image features;
- the feed-forward block is separate: ``query_ffn`` for query positions, ``text_ffn`` for text positions;
- an MLM-style LM head (tied to the word embeddings) for image-grounded text generation.

Which positions see which is decided by one of three masks (see ``attention_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.config import QFormerConfig
from blip2.errors import InputError

Mode = Literal["unimodal", "bidirectional", "causal"]
KVCache = list[tuple[Tensor, Tensor]]  # per layer: self-attention (keys, values), each [B, heads, P, head_dim]


@dataclass
class ImageContext:
    """What the queries' cross-attention reads of a batch of images, computed once: each layer's keys and values of
    the image features, each [B, heads, N, head_dim] (None for a layer without cross-attention). Stage 1 runs the
    queries over the same images in ITC and in ITM's rows; they all read one ``ImageContext`` (``select`` picks
    rows) instead of projecting the features again."""

    keys_values: list[tuple[Tensor, Tensor] | None]

    def __len__(self) -> int:
        return next(kv[0].shape[0] for kv in self.keys_values if kv is not None)

    def select(self, rows: Tensor) -> "ImageContext":
        """The context of images ``rows`` [R] (repeats allowed)."""
        return ImageContext([None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.keys_values])

    @staticmethod
    def cat(parts: list["ImageContext"]) -> "ImageContext":
        """The contexts of several batches, one after the other."""
        layers = zip(*(part.keys_values for part in parts))
        return ImageContext([None if kv[0] is None else (torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv]))
                             for kv in layers])


def attention_mask(num_queries: int, text_mask: Tensor | None, mode: Mode) -> Tensor:
    """Boolean mask [B, 1, L, L] (True = may attend) over ``[queries ; text]``, L = Q + T, in one of three modes.

    ``text_mask`` [B, T] marks real (1) and padding (0) text tokens. With Q=2 queries and T=3 text tokens::

        unimodal        bidirectional    causal (multimodal)
            q q t t t       q q t t t        q q t t t
        q   1 1 . . .   q   1 1 1 1 1    q   1 1 . . .
        q   1 1 . . .   q   1 1 1 1 1    q   1 1 . . .
        t   . . 1 1 1   t   1 1 1 1 1    t   1 1 1 . .
        t   . . 1 1 1   t   1 1 1 1 1    t   1 1 1 1 .
        t   . . 1 1 1   t   1 1 1 1 1    t   1 1 1 1 1

    Queries never see text in unimodal and causal modes; padding columns are always masked.
    """
    device = text_mask.device if text_mask is not None else None
    batch, num_text = text_mask.shape if text_mask is not None else (1, 0)
    is_query = torch.arange(num_queries + num_text, device=device) < num_queries  # [L]
    if mode == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    elif mode == "bidirectional":
        allowed = torch.ones(len(is_query), len(is_query), dtype=torch.bool, device=device)
    elif mode == "causal":
        earlier_or_self = torch.ones(len(is_query), len(is_query), dtype=torch.bool, device=device).tril()
        allowed = (earlier_or_self & ~is_query[:, None]) | (is_query[:, None] & is_query[None, :])
    else:
        raise InputError(f"unknown attention mode {mode!r}; use 'unimodal', 'bidirectional' or 'causal'")
    key_ok = torch.ones(batch, len(is_query), dtype=torch.bool, device=device)  # [B, L]
    if text_mask is not None:
        key_ok[:, num_queries:] = text_mask.bool()
    return (allowed[None] & key_ok[:, None, :])[:, None]  # [B, 1, L, L]


class Attention(nn.Module):
    """Multi-head attention followed by BERT's output block: dense, dropout, residual, LayerNorm (post-norm)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_dropout = nn.Dropout(cfg.hidden_dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)  # [B, L, H] -> [B, heads, L, H/heads]

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S, D_kv] -> keys, values [B, heads, S, d]."""
        return self._heads(self.key(source)), self._heads(self.value(source))

    def forward(
        self,
        x: Tensor,
        context: Tensor | tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, L, H]; ``context`` for cross-attention, features [B, N, D_kv] or their keys and values (else
        self-attention); returns ([B, L, H], (keys, values))."""
        q = self._heads(self.query(x))  # [B, heads, L, d]
        k, v = context if isinstance(context, tuple) else self.keys_values(x if context is None else context)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, heads, P + S, d]
            v = torch.cat([past[1], v], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, heads, L, d]
        attended = attended.transpose(1, 2).flatten(2)  # [B, L, H]
        return self.norm(self.out_dropout(self.out(attended)) + x), (k, v)


class FeedForward(nn.Module):
    """BERT's intermediate + output block: up, GELU, down, dropout, residual, LayerNorm."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.dropout(self.down(F.gelu(self.up(x)))) + x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = Attention(cfg, cfg.encoder_width) if has_cross_attention else None
        self.query_ffn = FeedForward(cfg)
        self.text_ffn = FeedForward(cfg)

    def forward(
        self,
        x: Tensor,
        num_queries: int,
        mask: Tensor,
        image: Tensor | tuple[Tensor, Tensor] | None,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, L, H] whose first ``num_queries`` positions are queries, ``image`` the features [B, N, D] the queries
        cross-attend to (or their keys and values); returns ([B, L, H], self-attention (k, v))."""
        h, kv = self.self_attn(x, mask=mask, past=past)
        queries, text = h[:, :num_queries], h[:, num_queries:]  # [B, Q, H], [B, T, H]
        if num_queries and self.cross_attn is not None:
            if image is None:
                raise InputError("image_embeds are required when queries run through a cross-attention layer")
            queries, _ = self.cross_attn(queries, context=image)
        parts = []
        if num_queries:
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1), kv


class LMHead(nn.Module):
    """BERT's MLM head: dense, GELU, LayerNorm, then a decoder tied to the word embeddings (plus its own bias)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        """x [B, T, H], word_embeddings [V, H] -> logits [B, T, V]."""
        h = self.norm(F.gelu(self.dense(x)))  # [B, T, H]
        return F.linear(h, word_embeddings, self.bias)


@dataclass
class QFormerOutput:
    queries: Tensor | None  # [B, Q, H]
    text: Tensor | None  # [B, T, H]
    cache: KVCache | None


class QFormer(nn.Module):
    """Learned queries + BERT layers with periodic cross-attention to frozen image features."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.encoder_width <= 0:
            raise InputError("QFormerConfig.encoder_width must be set to the image encoder's feature width")
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, has_cross_attention=i % cfg.cross_attention_freq == 0) for i in range(cfg.num_layers)
        )
        self.lm_head = LMHead(cfg)
        self.apply(_init_bert)
        nn.init.normal_(self.query_tokens, std=0.02)

    @property
    def num_queries(self) -> int:
        return self.cfg.num_query_tokens

    def image_context(self, image_embeds: Tensor) -> ImageContext:
        """Image features [B, N, D] -> every cross-attention layer's keys and values of them (``ImageContext``)."""
        return ImageContext([layer.cross_attn.keys_values(image_embeds) if layer.cross_attn is not None else None
                             for layer in self.layers])

    def forward(
        self,
        image_embeds: Tensor | ImageContext | None = None,
        input_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        mode: Mode = "unimodal",
        past: KVCache | None = None,
        use_cache: bool = False,
    ) -> QFormerOutput:
        """Run the queries (attending to ``image_embeds`` [B, N, D], or to their ``ImageContext``) and/or text
        ``input_ids`` [B, T_new].

        Queries run when ``image_embeds`` is given; without it, only text runs (the text side of ITC).
        ``past`` is the cache of an earlier call holding the queries (and possibly earlier text): then only the
        new text runs, positions continuing after the cached text. ``text_mask`` [B, T_all] covers cached and new text.
        """
        past_len = past[0][0].shape[2] if past else 0
        if past and image_embeds is not None:
            raise InputError("give either image_embeds (queries run now) or past (queries cached), not both")
        if image_embeds is None and input_ids is None:
            raise InputError("nothing to run: give image_embeds and/or input_ids")
        new_queries = self.num_queries if image_embeds is not None else 0
        all_queries = new_queries or (self.num_queries if past else 0)
        past_text = past_len - all_queries if past else 0

        parts = []
        if new_queries:
            parts.append(self.query_tokens.expand(len(image_embeds), -1, -1))  # [B, Q, H]
        if input_ids is not None:
            positions = torch.arange(past_text, past_text + input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))  # [B, T, H]
        x = self.embed_dropout(self.embed_norm(torch.cat(parts, dim=1)))  # [B, L_new, H]

        num_text = past_text + (input_ids.shape[1] if input_ids is not None else 0)
        if text_mask is None and num_text:
            text_mask = torch.ones(x.shape[0], num_text, dtype=torch.long, device=x.device)
        mask = attention_mask(all_queries, text_mask, mode)[:, :, -x.shape[1]:]  # rows: the new positions only

        cache: KVCache = []
        for i, layer in enumerate(self.layers):
            image = image_embeds.keys_values[i] if isinstance(image_embeds, ImageContext) else image_embeds
            x, kv = layer(x, new_queries, mask, image, past[i] if past else None)
            cache.append(kv)
        return QFormerOutput(
            queries=x[:, :new_queries] if new_queries else None,
            text=x[:, new_queries:] if input_ids is not None else None,
            cache=cache if use_cache else None,
        )

    def lm_logits(self, text_states: Tensor) -> Tensor:
        """[B, T, H] text outputs -> [B, T, V] next-token logits."""
        return self.lm_head(text_states, self.word_embeddings.weight)


def _init_bert(module: nn.Module) -> None:
    """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
