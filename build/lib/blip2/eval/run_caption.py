"""Captioning evaluation: caption every image of a dataset and score against its references
(``caption_metrics``: BLEU-1..4, METEOR, ROUGE-L, CIDEr as pycocoevalcap computes them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip2.data.bad_images import BadImageCounter
from blip2.data.records import CAPTION
from blip2.eval.caption_metrics import evaluate_captions
from blip2.eval.runs import (
    FeaturesArg,
    batch_features,
    batches,
    eval_mode,
    official_id,
    open_eval_dataset,
    resolve_features,
    texts_from_features,
)
from blip2.infer.decoding import GenerationOptions

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

CAPTION_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")  # BLEU-1..4, METEOR, ROUGE-L, CIDEr


def evaluate_captioning(
    pipe: "Blip2Pipeline",
    data: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    prompt: str | None = None,
    features: FeaturesArg = None,
    *,
    metrics: Sequence[str] = CAPTION_METRICS,
    image_root: str | Path | None = None,
    progress: bool = True,
    **gen,
) -> dict[str, Any]:
    """Caption every image of ``data`` (the first ``limit``) and score against its reference captions.

    Stage-2 models caption through the LLM (``prompt``, e.g. "a photo of", is a prefix the caption continues
    and is not part of it); stage-1 models with the Q-Former's own head. ``**gen``: ``GenerationOptions``.
    Returns ``metrics`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr; fractions), counts, and ``predictions``
    (COCO results format ``[{"image_id", "caption"}]``). Images without reference captions are captioned
    but not scored.
    """
    options = GenerationOptions.from_kwargs(gen)
    model = pipe.model
    cache = resolve_features(pipe, features)
    dataset = open_eval_dataset(pipe, data, CAPTION, cache, image_root)
    references = {record.image_id: list(record.captions) for record in dataset.records}
    counter = BadImageCounter()
    predictions: dict[str, str] = {}
    with eval_mode(model):
        for batch in batches(dataset, limit, batch_size, "captioning", progress, counter):
            feats = batch_features(model, batch, cache is not None)  # [B, N, D]
            prompts = [prompt] * len(feats) if prompt else None
            predictions.update(zip(batch["image_id"], texts_from_features(pipe, feats, prompts, options)))
    scored = {image_id: references[image_id] for image_id in predictions if references[image_id]}
    scores = evaluate_captions({i: predictions[i] for i in scored}, scored, metrics=metrics) if scored else {}
    return {
        "task": "caption",
        "data": str(data),
        "prompt": prompt,
        "num_images": len(predictions),
        "num_scored": len(scored),
        "skipped_images": counter.bad,
        "metrics": scores,
        "predictions": [{"image_id": official_id(i), "caption": text} for i, text in predictions.items()],
    }
