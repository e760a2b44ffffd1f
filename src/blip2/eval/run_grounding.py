"""Does a stage-2 model's text depend on the image? The language-modelling loss of each caption with its own
image's visual prompt against the loss with another image's prompt.

A grounded model explains its own image's captions better (``gap`` > 0, ``own_better`` near 1). A model whose
visual prompt has collapsed into one constant prefix, the failure stage 2 drifts into on small data
(docs/training.md), scores ``gap`` 0, ``own_better`` 0.5 and ``prompt_spread`` near 0, however low its loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from blip2.data.bad_images import BadImageCounter
from blip2.data.collate import Stage2Collate
from blip2.data.records import CAPTION, DatasetFormatError
from blip2.errors import InputError
from blip2.eval.runs import (
    FeaturesArg,
    batch_features,
    batches,
    eval_mode,
    open_eval_dataset,
    resolve_features,
)
from blip2.infer.batching import batch_slices
from blip2.models.losses import SpreadMeter, text_losses

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline


def evaluate_grounding(
    pipe: "Blip2Pipeline",
    data: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    features: FeaturesArg = None,
    *,
    caption_index: int | None = None,
    image_root: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every caption of the images of ``data`` (the first ``limit``; ``caption_index``: only that caption)
    with the training objective (``text_losses``, loss per target token) under two visual prompts: its own
    image's, and the previous image's in the data (the very first image takes its batch's last; ``batch_size``
    >= 2 so that it is another image).

    Returns ``metrics``: ``loss_own`` and ``loss_other`` (token-weighted means), ``gap`` (other - own, nats per
    token), ``own_better`` (share of captions with the lower loss under their own image; ties count half, so 0.5
    means the image makes no difference) and ``prompt_spread`` (``models.losses.prompt_spread`` over all the
    images, not per batch); and ``predictions``, both losses of every caption.
    """
    model = pipe.model
    llm = model.require_llm()
    if batch_size < 2:
        raise InputError(f"grounding needs batch_size >= 2 (the first image is compared with its batch's last), "
                         f"got {batch_size}")
    cache = resolve_features(pipe, features)
    dataset = open_eval_dataset(pipe, data, CAPTION, cache, image_root)
    captions = {record.image_id: record.captions_at(caption_index) if record.captions else ()
                for record in dataset.records}
    start = llm.model.config.decoder_start_token_id if llm.is_encoder_decoder else None
    collate = Stage2Collate(pipe.llm_tokenizer, model.cfg.llm.max_text_len, decoder_start_token_id=start)
    counter, spread = BadImageCounter(), SpreadMeter()
    rows: list[dict[str, Any]] = []
    sums = {"own": 0.0, "other": 0.0}
    tokens, previous = 0, None
    with eval_mode(model):
        for batch in batches(dataset, limit, batch_size, "grounding", progress, counter):
            feats = batch_features(model, batch, cache is not None)  # [B, N, D]
            prompt = model.soft_prompt(feats, *pipe.qformer_prompt_ids([""] * len(feats)))  # [B, V, H_llm]
            spread.add(model.prompt_queries(prompt))
            pool = prompt if previous is None else torch.cat([previous, prompt])  # [P, V, H_llm]
            prompts = {"own": prompt, "other": pool.roll(1, dims=0)[-len(prompt):]}  # row i: the image before i
            previous = prompt[-1:]
            items = [{"image": torch.tensor(row), "image_id": image_id, "text": text}
                     for row, image_id in enumerate(batch["image_id"]) for text in captions[image_id]]
            for where in batch_slices(len(items), batch_size):
                texts = collate(items[where])
                rows_of = texts.pop("image")  # [b]: each text's image within the batch
                tensors = {key: value.to(model.device) for key, value in texts.items() if isinstance(value, Tensor)}
                losses = {}
                for name, visual in prompts.items():
                    summed, counts = text_losses(model, visual[rows_of.to(visual.device)], tensors)  # [b], [b]
                    sums[name] += float(summed.sum())
                    losses[name] = (summed / counts).tolist()
                tokens += int(counts.sum())
                rows += [{"image_id": item["image_id"], "text": item["text"], "loss_own": own, "loss_other": other}
                         for item, own, other in zip(items[where], losses["own"], losses["other"])]
    if spread.count < 2:
        raise InputError(f"{data}: grounding compares images with each other and needs at least 2 readable images, "
                         f"got {spread.count}")
    if not rows:
        raise DatasetFormatError(f"{data}: none of its images has a caption to score")
    own, other = sums["own"] / tokens, sums["other"] / tokens
    better = sum((row["loss_own"] < row["loss_other"]) + 0.5 * (row["loss_own"] == row["loss_other"]) for row in rows)
    return {
        "task": "grounding",
        "data": str(data),
        "caption_index": caption_index,
        "num_images": spread.count,
        "num_texts": len(rows),
        "skipped_images": counter.bad,
        "metrics": {
            "loss_own": own,
            "loss_other": other,
            "gap": other - own,
            "own_better": better / len(rows),
            "prompt_spread": spread.value(),
        },
        "predictions": rows,
    }

