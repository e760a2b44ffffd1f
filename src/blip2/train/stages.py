"""What each pre-training stage feeds the trainer: collate functions (text -> token ids) and loss functions.

Items come from ``blip2.data.datasets`` (captions or VQA); their "image" is either pixels [3, H, W] or cached
frozen features [N, D] (a ``FeatureCache`` as the dataset's transform) — the stages accept both.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from blip2.data.datasets import collate_skip_bad
from blip2.models.losses import IGNORE, stage1_losses, stage2_losses

CAPTION_PROMPT = ""
VQA_PROMPT = {"decoder-only": "Question: {} Answer:", "encoder-decoder": "Question: {} Short answer:"}


def image_features(model, images: Tensor) -> Tensor:
    """Pixels [B, 3, H, W] through the frozen encoder, or cached features [B, N, D] as they are."""
    return images.to(model.device) if images.dim() == 3 else model.image_features(images.to(model.device))


class Stage1Collate:
    """Caption items -> {"image", "input_ids", "attention_mask", "bad_images"} with the Q-Former's tokenizer."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items: list) -> dict[str, Any]:
        batch = collate_skip_bad(items)
        if batch.get("text"):
            tok = self.tokenizer(batch["text"], padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
            batch["input_ids"], batch["attention_mask"] = tok.input_ids, tok.attention_mask
        return batch


def stage1_step(model, batch: dict[str, Any]) -> dict[str, Tensor]:
    """ITC + ITM + ITG on one collated batch."""
    features = image_features(model, batch["image"])
    return stage1_losses(model, features, batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))


def prompt_and_target(item: dict[str, Any], family: str, seed: int = 0) -> tuple[str, str]:
    """What the LLM reads (after the visual prompt) and what it must produce, for a caption or a VQA item.

    Decoder-only captions: no prompt, the caption is the target. Encoder-decoder captions: prefix language
    modelling — the caption is split at a word boundary drawn from (seed, image, caption); the prefix goes to the encoder.
    VQA items: the paper's prompt for the family, the first answer as the target.
    """
    if "question" in item:
        return VQA_PROMPT[family].format(item["question"]), item["answers"][0]
    text = item["text"]
    if family == "decoder-only":
        return CAPTION_PROMPT, text
    words = text.split()
    cut = random.Random(f"{seed}/{item['image_id']}/{text}").randint(0, max(len(words) - 1, 0))  # reproducible on resume
    return " ".join(words[:cut]), " ".join(words[cut:])


class Stage2Collate:
    """Caption and/or VQA items -> LLM token ids with labels on the target text only."""

    def __init__(self, llm, max_len: int, seed: int = 0):
        self.llm, self.max_len = llm, max_len
        self.family = "encoder-decoder" if llm.is_encoder_decoder else "decoder-only"
        self.seed = seed

    def __call__(self, items: list) -> dict[str, Any]:
        batch = collate_skip_bad([self._as_pair(item) if isinstance(item, dict) else item for item in items])
        if batch.get("prompt"):
            prompts, targets = batch["prompt"], batch["target"]
            batch.update(self._decoder_only(prompts, targets) if self.family == "decoder-only" else self._seq2seq(prompts, targets))
        return batch

    def _as_pair(self, item: dict[str, Any]) -> dict[str, Any]:
        prompt, target = prompt_and_target(item, self.family, self.seed)
        return {"image": item["image"], "image_id": item["image_id"], "prompt": prompt, "target": target}

    def _ids(self, texts) -> list[list[int]]:
        return self.llm.tokenizer(list(texts), add_special_tokens=False).input_ids

    def _decoder_only(self, prompts, targets) -> dict[str, Tensor]:
        """BOS + prompt + target + EOS; labels only on target + EOS (prompt, BOS and padding ignored)."""
        bos, eos = self.llm.bos_token_id, self.llm.eos_token_id
        spaced = [(" " + t) if p else t for p, t in zip(prompts, targets)]
        rows, labels = [], []
        for p, t in zip(self._ids(prompts), self._ids(spaced)):
            head = ([bos] if bos is not None else []) + p
            tail = (t + [eos])[: max(self.max_len - len(head), 1)]
            rows.append(head + tail)
            labels.append([IGNORE] * len(head) + tail)
        return _pad_right(rows, labels, self.llm.pad_token_id)

    def _seq2seq(self, prompts, targets) -> dict[str, Tensor]:
        """Encoder: prompt + EOS; decoder target: target + EOS (teacher forcing from the decoder start token)."""
        enc_ids, enc_mask = self.llm.tokenize(list(prompts), self.max_len, add_bos=False, add_eos=True)
        dec_ids, dec_mask = self.llm.tokenize(list(targets), self.max_len, add_bos=False, add_eos=True)
        labels = dec_ids.masked_fill(dec_mask == 0, IGNORE)
        start = self.llm.model.config.decoder_start_token_id
        decoder_input_ids = torch.cat([torch.full_like(dec_ids[:, :1], start), dec_ids[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(dec_mask[:, :1]), dec_mask[:, :-1]], dim=1)
        return {"input_ids": enc_ids, "attention_mask": enc_mask, "labels": labels,
                "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_mask}


def _pad_right(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [B, T]
    label_ids = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, : len(row)] = torch.tensor(row)
        label_ids[i, : len(label)] = torch.tensor(label)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}


def stage2_step(model, batch: dict[str, Any]) -> dict[str, Tensor]:
    """Language modelling on the target text, with the visual soft prompt in front (+ its spread over the batch)."""
    features = image_features(model, batch["image"])
    tensors = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, Tensor) and k != "image"}
    return stage2_losses(model, features, tensors, batch.get("prompt"))
