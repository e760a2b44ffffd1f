"""What each pre-training stage computes on a collated batch (``blip2.data.text``'s collates): its losses.

A batch's "image" is either pixels [B, 3, H, W] or cached frozen features [B, N, D] (a ``FeatureCache`` as the
dataset's transform) — the stages accept both.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from blip2.models.losses import STAGE1_LOSSES, stage1_losses, stage2_losses


def image_features(model, images: Tensor) -> Tensor:
    """Pixels [B, 3, H, W] through the frozen encoder, or cached features [B, N, D] as they are."""
    return images.to(model.device) if images.dim() == 3 else model.image_features(images.to(model.device))


def stage1_step(model, batch: dict[str, Any], losses: tuple[str, ...] = STAGE1_LOSSES) -> dict[str, Tensor]:
    """ITC + ITM + ITG (or the ``losses`` named) on one collated batch."""
    features = image_features(model, batch["image"])
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    return stage1_losses(model, features, ids, mask, losses)


def stage2_step(model, batch: dict[str, Any]) -> dict[str, Tensor]:
    """Language modelling on the target text, with the visual soft prompt in front (+ its spread over the batch)."""
    features = image_features(model, batch["image"])
    tensors = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, Tensor) and k != "image"}
    return stage2_losses(model, features, tensors)
