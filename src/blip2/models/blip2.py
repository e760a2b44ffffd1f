"""BLIP-2: frozen image encoder -> Q-Former -> (stage 1 heads | projection -> frozen LLM).

Data flow (shapes for batch B, image tokens N, queries Q)::

    pixel_values [B,3,H,W] --frozen encoder--> [B,N,D] --vision_norm--> [B,N,D]
        --Q-Former queries (cross-attention)--> [B,Q,H]
            stage 1: vision_proj -> [B,Q,256] (ITC), itm_head -> [B,Q,2] (ITM), LM head on text (ITG)
            stage 2: llm_proj -> [B,Q,H_llm], prepended to the LLM's input embeddings as a soft visual prompt
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from blip2.config import Blip2Config, ConfigError
from blip2.data.images import load_image
from blip2.infer import embeddings, generation
from blip2.infer.batching import ImageInput, Images
from blip2.infer.chat import ChatSession
from blip2.infer.decoding import GenerationOptions
from blip2.infer.qformer_generation import qformer_caption
from blip2.models.language import FrozenLLM
from blip2.models.qformer import QFormer
from blip2.models.vision import ImageEncoder
from blip2.weights.checkpoint import save_checkpoint
from blip2.weights.hf import export_hf


class Blip2Model(nn.Module):
    """The whole model. Only the Q-Former, ``vision_norm`` and the projections/heads train."""

    def __init__(
        self,
        cfg: Blip2Config,
        vision: ImageEncoder,
        tokenizer: PreTrainedTokenizerBase,
        llm: FrozenLLM | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.vision_norm = nn.LayerNorm(vision.out_dim, eps=cfg.vision_norm_eps)  # BLIP-2's trainable "ln_vision"
        if vision.position_channels:
            with torch.no_grad():
                self.vision_norm.weight[-vision.position_channels:] = cfg.vision_norm_position_gain
        self.qformer = QFormer(cfg.qformer)
        self.tokenizer = tokenizer
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

    def save(self, directory: str | Path) -> Path:
        """Config + trainable weights (safetensors); the frozen parts are named by the config, not copied."""
        return save_checkpoint(self, directory)

    def export_hf(self, directory: str | Path) -> Path:
        """A full, self-contained transformers Blip2 directory (frozen parts included)."""
        return export_hf(self, directory)

    # ---- image side -----------------------------------------------------------------------------------

    def pixel_values(self, images: Sequence[ImageInput]) -> Tensor:
        """PIL images or paths -> [B, 3, H, W] with the encoder's own preprocessing."""
        return self.vision.preprocess([load_image(im) for im in images]).to(self.device, self.vision_dtype)

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

    def tokenize_text(self, texts: Sequence[str], max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Q-Former text ([CLS] ... [SEP]) -> input_ids, attention_mask [B, T]."""
        tok = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=max_len or self.cfg.qformer.max_text_len,
            return_tensors="pt",
        )
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    # ---- stage 2 ----------------------------------------------------------------------------------------

    def _require_llm(self) -> FrozenLLM:
        if self.llm is None:
            raise RuntimeError("this is a stage-1 model (no LLM): load a stage-2 model to generate text with an LLM")
        return self.llm

    @property
    def num_visual(self) -> int:
        """LLM positions the visual prompt takes: the queries, plus BOS when ``llm.bos_before_image``."""
        return self.qformer.num_queries + int(self.cfg.llm is not None and self.cfg.llm.bos_before_image)

    def prompt_queries(self, prompt: Tensor) -> Tensor:
        """A visual prompt [B, V, H_llm] (``soft_prompt``) -> its projected queries [B, Q, H_llm], without a leading BOS."""
        return prompt[:, prompt.shape[1] - self.qformer.num_queries:]

    def soft_prompt(self, features: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        """Frozen image features [B, N, D] -> the LLM-space visual prompt [B, V, H_llm] (V = ``num_visual``:
        the projected queries, led by the BOS embedding when ``llm.bos_before_image``). With
        ``llm.prompt_to_qformer`` the queries also read each row's text prompt (None: no prompt, as for captions)."""
        llm = self._require_llm()
        if self.cfg.llm.prompt_to_qformer:
            texts = [""] * len(features) if prompts is None else list(prompts)
            if len(texts) != len(features):
                raise ValueError(f"{len(texts)} prompts for {len(features)} images: give one per image")
            queries = self.joint_queries(features, *self.tokenize_text(texts))  # [B, Q, H]
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
        prompts: Sequence[str] | None = None,
    ) -> Tensor:
        """LLM logits for the text positions.

        Decoder-only: ``input_ids`` [B, T] is the text (BOS included, no image placeholders) -> [B, T, V].
        Encoder-decoder: ``input_ids`` is the encoder text and ``decoder_input_ids`` [B, S] the decoder's -> [B, S, V].
        ``features`` (cached frozen-encoder outputs [B, N, D]) may replace ``pixel_values``; ``prompts``: the
        text prompts the Q-Former reads with ``llm.prompt_to_qformer``.
        """
        features = self.image_features(pixel_values) if features is None else features
        prompt = self.soft_prompt(features, prompts)  # [B, V, H_llm]
        return self.text_logits(prompt, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)

    def text_logits(
        self,
        prompt: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """``forward`` from an already computed visual prompt [B, Q, H_llm] (``soft_prompt``)."""
        llm = self._require_llm()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = torch.cat([prompt, llm.embed(input_ids)], dim=1)  # [B, Q + T, H_llm]
        mask = torch.cat([torch.ones(prompt.shape[:2], dtype=attention_mask.dtype, device=prompt.device), attention_mask], 1)
        if llm.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder LLM needs decoder_input_ids")
            out = llm.model(
                inputs_embeds=embeds, attention_mask=mask,
                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            )
            return out.logits
        # the LM head runs on the text positions only (the last T): the query positions' logits are never used
        return llm.model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=input_ids.shape[1]).logits

    def prompt_inputs(
        self, features: Tensor, prompts: Sequence[str], max_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The LLM input for generation, ``[visual prompt ; BOS + prompt]`` (decoder-only, left padded) or
        ``[visual prompt ; prompt + EOS]`` (encoder-decoder) -> (embeds [B, Q + T, H_llm], mask [B, Q + T]).

        Prompts are cut to ``max_len`` tokens (BOS/EOS included; default ``cfg.llm.max_text_len``, the training
        length); the inference methods check lengths first and pass a limit that cuts nothing.
        """
        llm = self._require_llm()
        visual = self.soft_prompt(features, prompts)  # [B, V, H_llm]
        decoder_only = not llm.is_encoder_decoder
        max_len = max_len or self.cfg.llm.max_text_len
        ids, mask = llm.tokenize(
            prompts, max_len, add_bos=decoder_only, add_eos=not decoder_only, pad_left=decoder_only
        )  # [B, T]
        ids, mask = ids.to(visual.device), mask.to(visual.device)
        embeds = torch.cat([visual, llm.embed(ids)], dim=1)
        return embeds, torch.cat([torch.ones(visual.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)

    # ---- inference: what users call (docs/inference.md) ------------------------------------------------------
    # Images are PIL images or paths (one or a sequence; pixel values [B, 3, H, W] work too); every method
    # batches internally. ``**gen`` are the fields of ``blip2.infer.decoding.GenerationOptions``.

    def generate(
        self, images: Images, prompts: str | Sequence[str] | None = None, batch_size: int = 8, **gen
    ) -> list[str]:
        """Text for each image, conditioned on a prompt per image (or one for all; None: no prompt).

        Greedy by default; ``num_beams`` for beam search, ``do_sample`` (with ``temperature``, ``top_p``,
        ``top_k``) for sampling; ``max_new_tokens`` (30). A prompt too long for the LLM raises ValueError.
        """
        return generation.generate(self, images, prompts, batch_size, GenerationOptions.from_kwargs(gen))

    def stream(self, image: ImageInput, prompt: str | None = None, **gen) -> Iterator[str]:
        """``generate`` for one image, as text pieces while they are decoded (greedy or sampling)."""
        return generation.stream(self, image, prompt, GenerationOptions.from_kwargs(gen))

    def caption(self, images: Images, prompt: str | None = None, batch_size: int = 8, **gen) -> list[str]:
        """A caption per image; ``prompt`` (e.g. "a photo of") is a prefix the caption continues."""
        return self.generate(images, prompt, batch_size, **gen)

    def answer(
        self,
        images: Images,
        questions: str | Sequence[str],
        prompt_template: str | None = None,
        batch_size: int = 8,
        **gen,
    ) -> list[str]:
        """Short answers: one question per image (or one for all, or one image for all questions).

        Each question goes into the paper's prompt, "Question: {} Answer:" (decoder-only) or
        "Question: {} Short answer:" (encoder-decoder), unless ``prompt_template`` (with one ``{}``) says otherwise.
        """
        options = GenerationOptions.from_kwargs(gen)
        return generation.answer(self, images, questions, prompt_template, batch_size, options)

    def chat(self, image: ImageInput, system: str | None = None, cache: bool = True) -> ChatSession:
        """A multi-turn conversation about ``image`` that encodes it once and keeps the LLM's key/value cache."""
        return ChatSession(self, image, system=system, cache=cache)

    def image_embeddings(self, images: Images, batch_size: int = 32) -> Tensor:
        """Normalised ITC embeddings [B, Q, 256], one per query (image-text similarity = max over queries)."""
        return embeddings.image_embeddings(self, images, batch_size)

    def text_embeddings(self, texts: str | Sequence[str], batch_size: int = 64) -> Tensor:
        """Normalised ITC embeddings [B, 256] of the texts ([CLS] through ``text_proj``)."""
        return embeddings.text_embeddings(self, texts, batch_size)

    def itm(self, images: Images, texts: str | Sequence[str], batch_size: int = 32) -> Tensor:
        """Image-text match probabilities [B] (softmax of the ITM head, class 1) for pairs (image i, text i)."""
        return embeddings.itm(self, images, texts, batch_size)

    def qformer_caption(self, images: Images, batch_size: int = 8, **gen) -> list[str]:
        """Captions from the Q-Former alone ([DEC]-started generation against the cached queries; no LLM needed).

        Greedy, sampling or beam search (``num_beams``); stops at [SEP] or after ``max_new_tokens``.
        """
        return qformer_caption(self, images, batch_size, GenerationOptions.from_kwargs(gen))
