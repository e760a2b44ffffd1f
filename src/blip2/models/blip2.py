"""BLIP-2: frozen image encoder -> Q-Former -> (stage 1 heads | projection -> frozen LLM).

Data flow (shapes for batch B, image tokens N, queries Q)::

    pixel_values [B,3,H,W] --frozen encoder--> [B,N,D] --vision_norm--> [B,N,D]
        --Q-Former queries (cross-attention)--> [B,Q,H]
            stage 1: vision_proj -> [B,Q,256] (ITC), itm_head -> [B,Q,2] (ITM), LM head on text (ITG)
            stage 2: llm_proj -> [B,Q,H_llm], prepended to the LLM's input embeddings as a soft visual prompt
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.config import Blip2Config, ConfigError
from blip2.data.conversation import IMAGE_ID
from blip2.errors import InputError
from blip2.models.language import FrozenLLM
from blip2.models.qformer import QFormer
from blip2.models.vision import ImageEncoder


class Blip2Model(nn.Module):
    """The whole network. Only the Q-Former, ``vision_norm`` and the projections/heads train.

    Pure: tensors in, tensors out. Tokenizers, preprocessing and what users call live on the pipeline
    (``blip2.pipeline``); ``dec_token_id`` is the Q-Former vocabulary's ``[DEC]``, the BOS its ITG decodes from.
    """

    def __init__(self, cfg: Blip2Config, vision: ImageEncoder, dec_token_id: int, llm: FrozenLLM | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.vision_norm = nn.LayerNorm(vision.out_dim, eps=cfg.vision_norm_eps)  # BLIP-2's trainable "ln_vision"
        if vision.position_channels:
            with torch.no_grad():
                self.vision_norm.weight[-vision.position_channels:] = cfg.vision_norm_position_gain
        self.qformer = QFormer(cfg.qformer)
        self.dec_token_id = dec_token_id
        hidden = cfg.qformer.hidden_size
        self.vision_proj = nn.Linear(hidden, cfg.qformer.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.qformer.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.llm = llm
        self.llm_proj = nn.Linear(hidden, llm.hidden_size) if llm is not None else None
        if llm is not None and cfg.llm.bos_before_image and (llm.is_encoder_decoder or llm.bos_token_id is None):
            raise ConfigError("llm.bos_before_image needs a decoder-only LLM with a BOS token; this LLM is "
                              + ("encoder-decoder" if llm.is_encoder_decoder else "without BOS"))

    # ---- freezing -------------------------------------------------------------------------------------

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.vision, self.llm) if m is not None]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what trains: everything but the frozen encoder and LLM."""
        frozen = tuple(name + "." for name in ("vision", "llm"))
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable}

    @property
    def device(self) -> torch.device:
        return self.temp.device

    # ---- image side -----------------------------------------------------------------------------------

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Frozen encoder: [B, 3, H, W] -> [B, N, D] (what the feature cache stores)."""
        with torch.no_grad():
            return self.vision(pixel_values.to(self.vision_dtype))

    def query_states(self, features: Tensor, use_cache: bool = False):
        """Frozen features [B, N, D] -> Q-Former output whose ``queries`` are [B, Q, H]."""
        image_embeds = self.vision_norm(features.to(self.vision_norm.weight.dtype))
        return self.qformer(image_embeds=image_embeds, use_cache=use_cache)

    # ---- stage-1 heads ----------------------------------------------------------------------------------

    def image_embeds_itc(self, queries: Tensor) -> Tensor:
        """[B, Q, H] -> normalised [B, Q, E]."""
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_embeds_itc(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text alone through the Q-Former; the [CLS] output -> normalised [B, E]."""
        text = self.qformer(input_ids=input_ids, text_mask=attention_mask).text  # [B, T, H]
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def itm_logits(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The 2-way head on every joint query output, averaged: [B, 2]."""
        return self.itm_head(self.joint_queries(features, input_ids, attention_mask)).mean(dim=1)

    def joint_queries(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Queries and text [B, T] see each other in self-attention (ITM's mode): query outputs [B, Q, H]."""
        image_embeds = self.vision_norm(features.to(self.vision_norm.weight.dtype))
        return self.qformer(image_embeds, input_ids, attention_mask, mode="bidirectional").queries

    # ---- stage 2 ----------------------------------------------------------------------------------------

    def require_llm(self) -> FrozenLLM:
        if self.llm is None:
            raise InputError("this is a stage-1 model (no LLM): load a stage-2 model to generate text with an LLM")
        return self.llm

    @property
    def num_visual(self) -> int:
        """LLM positions the visual prompt takes: the queries, plus BOS when ``llm.bos_before_image``."""
        return self.qformer.num_queries + int(self.cfg.llm is not None and self.cfg.llm.bos_before_image)

    def prompt_queries(self, prompt: Tensor) -> Tensor:
        """A visual prompt [B, V, H_llm] (``soft_prompt``) -> its projected queries [B, Q, H_llm], without a leading BOS."""
        return prompt[:, prompt.shape[1] - self.qformer.num_queries:]

    def soft_prompt(self, features: Tensor, prompt_ids: Tensor | None = None, prompt_mask: Tensor | None = None) -> Tensor:
        """Frozen image features [B, N, D] -> the LLM-space visual prompt [B, V, H_llm] (V = ``num_visual``: the
        projected queries, led by the BOS embedding when ``llm.bos_before_image``). With ``llm.prompt_to_qformer``
        the queries also read each row's text prompt as Q-Former ids/mask [B, T] (for no prompt, the ids of "")."""
        llm = self.require_llm()
        if self.cfg.llm.prompt_to_qformer:
            if prompt_ids is None or len(prompt_ids) != len(features):
                raise InputError("a model whose Q-Former reads the prompt (llm.prompt_to_qformer) needs one "
                                 "tokenized prompt per image")
            queries = self.joint_queries(features, prompt_ids, prompt_mask)  # [B, Q, H]
        else:
            queries = self.query_states(features).queries  # [B, Q, H]
        prompt = self.llm_proj(queries).to(llm.dtype)  # [B, Q, H_llm]
        if self.num_visual == prompt.shape[1]:
            return prompt
        bos = llm.embed(torch.full((len(prompt), 1), llm.bos_token_id, device=prompt.device))  # [B, 1, H_llm]
        return torch.cat([bos.to(prompt.dtype), prompt], dim=1)

    def forward(
        self,
        pixel_values: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        features: Tensor | None = None,
        prompt_ids: Tensor | None = None,
        prompt_mask: Tensor | None = None,
    ) -> Tensor:
        """LLM logits for the text positions.

        Decoder-only: ``input_ids`` [B, T] is the text (BOS included, no image placeholders) -> [B, T, V].
        Encoder-decoder: ``input_ids`` is the encoder text and ``decoder_input_ids`` [B, S] the decoder's -> [B, S, V].
        ``features`` (cached frozen-encoder outputs [B, N, D]) may replace ``pixel_values``; ``prompt_ids``/``mask``:
        the Q-Former ids of the text prompts it reads with ``llm.prompt_to_qformer``.
        """
        features = self.image_features(pixel_values) if features is None else features
        prompt = self.soft_prompt(features, prompt_ids, prompt_mask)  # [B, V, H_llm]
        return self.text_logits(prompt, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)

    def text_logits(
        self,
        prompt: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """``forward`` from an already computed visual prompt [B, V, H_llm] (``soft_prompt``).

        Decoder-only ``input_ids`` [B, T] that hold ``IMAGE_ID`` placeholders (V per row: a conversation rendered
        with the image inside it, ``blip2.data.conversation``) take the visual rows there; without placeholders the
        visual prompt goes first. ``positions`` [K]: only these text positions' logits ([B, K, V_vocab]; default all T).
        """
        llm = self.require_llm()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not llm.is_encoder_decoder and (input_ids == IMAGE_ID).any():
            embeds, mask, offset = self.place_visual(prompt, input_ids), attention_mask, 0  # [B, T, H_llm], [B, T]
        else:
            embeds = torch.cat([prompt, llm.embed(input_ids)], dim=1)  # [B, V + T, H_llm]
            ones = torch.ones(prompt.shape[:2], dtype=attention_mask.dtype, device=prompt.device)
            mask, offset = torch.cat([ones, attention_mask], 1), prompt.shape[1]
        if llm.is_encoder_decoder:
            if decoder_input_ids is None:
                raise InputError("an encoder-decoder LLM needs decoder_input_ids")
            out = llm.model(
                inputs_embeds=embeds, attention_mask=mask,
                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            )
            return out.logits
        # the LM head runs only where a logit is used: the text positions (or those asked for), never the queries'
        keep = input_ids.shape[1] if positions is None else positions + offset  # the last T, or those asked for
        return llm.model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits

    def place_visual(self, prompt: Tensor, input_ids: Tensor) -> Tensor:
        """Token ids [B, T] holding S visual prompts (``V`` ``IMAGE_ID`` placeholders each, at least one per row)
        -> input embeddings [B, T, H_llm], the visual prompts [S, V, H_llm] in the placeholders' positions, in order
        (row by row)."""
        llm = self.require_llm()
        placeholders = input_ids == IMAGE_ID  # [B, T]
        counts, visual = placeholders.sum(dim=1), prompt.shape[1]
        if (counts == 0).any() or (counts % visual).any() or int(counts.sum()) != prompt.shape[0] * visual:
            raise InputError(f"the rows hold {counts.tolist()} image placeholders, but {len(prompt)} visual prompts "
                             f"of {visual} positions need a positive multiple of {visual} in every row, "
                             f"{len(prompt) * visual} in all")
        embeds = llm.embed(input_ids.clamp(min=0))  # [B, T, H_llm]
        return embeds.masked_scatter(placeholders[..., None], prompt.to(embeds.dtype))
