"""Everything the search package asks of a model, in one module (the model's layout may move; fix imports here).

Public API used: ``blip2.load``, ``model.image_embeddings``, ``model.text_embeddings``, ``model.cfg.to_dict()``,
``model.trainable_state_dict()``. The ITM re-rank also needs the "match" logit the evaluation uses
(``model.pixel_values``, ``model.image_features``, ``model.tokenize_text``, ``model.itm_logits``), because
``model.itm`` returns the softmax probability, not the logit BLIP-2's re-rank adds to ITC.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


def load_model(source: str, device: str = "cpu") -> Any:
    """``blip2.load(source)``: a preset name or a model directory."""
    import blip2

    return blip2.load(source, device=device)


def model_identity(model: Any) -> str:
    """sha256 (hex) over the model's config and its trainable weights: two models with the same identity embed
    alike. The frozen encoder is named by the config, not hashed."""
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.model.trainable_state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def embedding_shape(model: Any) -> tuple[int, int]:
    """(queries per image Q, embedding width E) of the model's ITC embeddings."""
    qformer = model.cfg.qformer
    return qformer.num_query_tokens, qformer.embed_dim


def image_vectors(model: Any, images: Sequence[Image.Image], batch_size: int) -> np.ndarray:
    """Normalised per-query ITC embeddings [B, Q, E] float32."""
    return model.image_embeddings(list(images), batch_size=batch_size).float().cpu().numpy()


def text_vectors(model: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Normalised ITC text embeddings [B, E] float32; a text longer than the encoder's limit raises ValueError."""
    return model.text_embeddings(list(texts), batch_size=batch_size).float().cpu().numpy()


@torch.no_grad()
def image_features(model: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """The frozen encoder's features [B, N, D] (what ITM reads), on the CPU."""
    return model.model.image_features(model.pixel_values(list(images))).cpu()


@torch.no_grad()
def itm_match_logits(model: Any, features: torch.Tensor, text: str) -> torch.Tensor:
    """ITM "match" logit (class 1, averaged over queries, as evaluation's re-rank uses) of each image with the text.

    features: [P, N, D] -> [P] float32.
    """
    ids, mask = model.tokenize_text([text] * len(features))  # [P, T]
    return model.model.itm_logits(features.to(model.device), ids, mask)[:, 1].float().cpu()
