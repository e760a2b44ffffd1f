"""CapFilt (BLIP; BLIP-2 cleans its web data with it): caption each image a few more times, then keep the
captions, original or synthetic, that the model's image-text heads judge best.

For every image, ``num_captions`` synthetic captions are sampled (nucleus sampling, top_p 0.9, as BLIP)
from the LLM of a stage-2 model, or from the Q-Former's own captioning head for a stage-1 model. Each
candidate (the original captions and the distinct, non-empty synthetic ones) is scored against its image
by ITC (cosine of the best query with the text, in [-1, 1]) and ITM (P(match), in [0, 1]); both use the
stage-1 heads, so a stage-2 model must carry trained ones (stage 2 initialised from stage 1).

Selection rule, per image: rank the candidates by ``score`` ("itm" or "itc"), drop those below
``threshold``, keep at most the ``keep`` best. An image left with no caption is not written. BLIP's filter
is ``score="itm", threshold=0.5`` (no cap); BLIP-2 ranks the original and the synthetic captions and keeps
the top two (``keep=2``). The output is the project's JSONL manifest, best caption first, with per-caption
``sources`` ("original" / "synthetic"), ``itc`` and ``itm``; ``open_dataset`` reads it as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from blip2.data.bad_images import BadImageCounter
from blip2.data.records import CAPTION
from blip2.errors import InputError
from blip2.eval.runs import (
    FeaturesArg,
    batch_features,
    batches,
    eval_mode,
    open_eval_dataset,
    resolve_features,
    texts_from_features,
)
from blip2.infer.batching import batch_slices
from blip2.infer.decoding import GenerationOptions
from blip2.io import write_text_atomically

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

SCORES = ("itm", "itc")
CAPFILT_GENERATION = {"do_sample": True, "top_p": 0.9, "seed": 0}  # BLIP's nucleus sampling; reproducible by default
ORIGINAL, SYNTHETIC = "original", "synthetic"


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str  # ORIGINAL or SYNTHETIC
    itc: float
    itm: float

    def score(self, kind: str) -> float:
        return self.itm if kind == "itm" else self.itc


def pair_scores(
    pipe: "Blip2Pipeline", features: Tensor, rows: list[int], texts: list[str], batch_size: int
) -> tuple[Tensor, Tensor]:
    """ITC cosine and ITM P(match), each [P] float32 on the CPU, of the pairs (image ``rows[p]`` of ``features``
    [B, N, D], ``texts[p]``), ``batch_size`` pairs at a time."""
    model = pipe.model
    image_embeds = model.image_embeds_itc(model.query_states(features).queries)  # [B, Q, E]
    itc, itm = [torch.empty(0)], [torch.empty(0)]
    for where in batch_slices(len(texts), batch_size):
        index = torch.tensor(rows[where], device=features.device)  # [p]
        ids, mask = pipe.tokenize_text(texts[where])  # [p, T]
        text_embeds = model.text_embeds_itc(ids, mask)  # [p, E]
        itc.append(torch.einsum("pqe,pe->pq", image_embeds[index], text_embeds).amax(dim=1).float().cpu())  # [p]
        itm.append(model.itm_logits(features[index], ids, mask).softmax(dim=-1)[:, 1].float().cpu())  # [p]
    return torch.cat(itc), torch.cat(itm)


def synthetic_captions(pipe: "Blip2Pipeline", features: Tensor, num_captions: int, prompt: str | None,
                       options: GenerationOptions) -> list[list[str]]:
    """``num_captions`` sampled captions for each image of ``features`` [B, N, D], all in one generation call."""
    if not num_captions:
        return [[] for _ in features]
    prompts = [prompt] * (len(features) * num_captions) if prompt else None
    texts = texts_from_features(pipe, features.repeat_interleave(num_captions, 0), prompts, options)  # image-major
    return [texts[i * num_captions:(i + 1) * num_captions] for i in range(len(features))]


def score_candidates(
    pipe: "Blip2Pipeline", features: Tensor, listed: list[list[tuple[str, str]]], batch_size: int
) -> list[list[Candidate]]:
    """Each image's (text, source) pairs scored against that image (row of ``features`` [B, N, D])."""
    rows = [image for image, pairs in enumerate(listed) for _ in pairs]
    itc, itm = pair_scores(pipe, features, rows, [text for pairs in listed for text, _ in pairs], batch_size)
    scores = iter(zip(itc.tolist(), itm.tolist()))
    return [[Candidate(text, source, *next(scores)) for text, source in pairs] for pairs in listed]


def select(candidates: list[Candidate], score: str, threshold: float | None, keep: int | None) -> list[Candidate]:
    """The selection rule: best ``score`` first, those at or above ``threshold`` (None: all), at most ``keep``."""
    ranked = sorted(candidates, key=lambda c: c.score(score), reverse=True)
    passing = [c for c in ranked if threshold is None or c.score(score) >= threshold]
    return passing[:keep] if keep is not None else passing


def _check_rule(score: str, threshold: float | None, keep: int | None, num_captions: int) -> None:
    if score not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    low, high = (0.0, 1.0) if score == "itm" else (-1.0, 1.0)
    if threshold is not None and not low <= threshold <= high:
        raise InputError(f"a threshold on {score} must lie in [{low}, {high}], got {threshold}")
    if keep is not None and keep < 1:
        raise InputError(f"keep must be >= 1 (or None: no cap), got {keep}")
    if num_captions < 0:
        raise InputError(f"num_captions must be >= 0, got {num_captions}")


def _candidates(originals: tuple[str, ...], synthetic: list[str]) -> list[tuple[str, str]]:
    """(text, source) for the original captions and the synthetic ones that are neither empty nor a repeat."""
    seen: set[str] = set()
    listed = []
    for text, source in [(t, ORIGINAL) for t in originals] + [(t, SYNTHETIC) for t in synthetic]:
        if text.strip() and text not in seen:
            seen.add(text)
            listed.append((text, source))
    return listed


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def capfilt(
    pipe: "Blip2Pipeline",
    data: str | Path,
    out_manifest: str | Path,
    num_captions: int = 3,
    threshold: float | None = 0.5,
    keep: int | None = 2,
    batch_size: int = 16,
    limit: int | None = None,
    *,
    score: str = "itm",
    prompt: str | None = None,
    features: FeaturesArg = None,
    image_root: str | Path | None = None,
    progress: bool = True,
    **gen,
) -> dict[str, Any]:
    """Clean the caption dataset ``data`` (first ``limit`` images) into the JSONL manifest ``out_manifest``.

    ``num_captions`` synthetic captions per image, sampled with ``**gen`` (``GenerationOptions``; default
    ``do_sample=True, top_p=0.9, seed=0``: the same seed and batch size give the same manifest) after
    ``prompt`` (stage-2 models only; the caption is what follows it). Selection rule: see the module doc.
    ``features``: a feature cache of the model's encoder, instead of running it. The manifest is written
    atomically, image paths relative to its folder. Returns (and prints) a summary.
    """
    _check_rule(score, threshold, keep, num_captions)
    options = GenerationOptions.from_kwargs({**CAPFILT_GENERATION, **gen})
    out_manifest = Path(out_manifest)
    model = pipe.model
    cache = resolve_features(pipe, features)
    dataset = open_eval_dataset(pipe, data, CAPTION, cache, image_root)
    records = {record.image_id: record for record in dataset.records}
    counter = BadImageCounter()
    rows: list[dict[str, Any]] = []
    scored: list[Candidate] = []
    kept: list[Candidate] = []
    images = 0
    with eval_mode(model):
        for batch in batches(dataset, limit, batch_size, "capfilt", progress, counter):
            feats = batch_features(model, batch, cache is not None)  # [B, N, D]
            synthetic = synthetic_captions(pipe, feats, num_captions, prompt, options)
            listed = [_candidates(records[image_id].captions, texts)
                      for image_id, texts in zip(batch["image_id"], synthetic)]
            images += len(listed)
            for image_id, candidates in zip(batch["image_id"], score_candidates(pipe, feats, listed, batch_size)):
                chosen = select(candidates, score, threshold, keep)
                scored += candidates
                kept += chosen
                if chosen:
                    rows.append(_manifest_row(records[image_id], chosen, out_manifest))
    write_text_atomically(out_manifest, "".join(json.dumps(row) + "\n" for row in rows))
    summary = _summary(images, len(rows), scored, kept, score, counter.bad)
    summary.update(score=score, threshold=threshold, keep=keep, num_captions=num_captions, manifest=str(out_manifest))
    print(_summary_text(summary))
    return summary


def _manifest_row(record, chosen: list[Candidate], out_manifest: Path) -> dict[str, Any]:
    image = os.path.relpath(os.path.abspath(record.image), os.path.abspath(out_manifest.parent))
    return {
        "image": image,
        "image_id": record.image_id,
        "captions": [c.text for c in chosen],
        "sources": [c.source for c in chosen],
        "itc": [c.itc for c in chosen],
        "itm": [c.itm for c in chosen],
    }


def _summary(images: int, written: int, scored: list[Candidate], kept: list[Candidate], score: str,
             bad: int) -> dict[str, Any]:
    """Counts and mean scores (of the selection ``score``) over what was scored and what was kept."""
    def scores(candidates: list[Candidate], source: str | None = None) -> list[float]:
        return [c.score(score) for c in candidates if source is None or c.source == source]

    originals_in, originals_kept = len(scores(scored, ORIGINAL)), len(scores(kept, ORIGINAL))
    return {
        "images": images,
        "images_written": written,
        "images_dropped": images - written,
        "skipped_images": bad,
        "captions_in": originals_in,
        "synthetic": len(scores(scored, SYNTHETIC)),
        "kept": len(kept),
        "kept_original": originals_kept,
        "kept_synthetic": len(kept) - originals_kept,
        "dropped_originals": originals_in - originals_kept,
        "mean_score_original": _mean(scores(scored, ORIGINAL)),
        "mean_score_synthetic": _mean(scores(scored, SYNTHETIC)),
        "mean_score_kept": _mean(scores(kept)),
    }


def _summary_text(summary: dict[str, Any]) -> str:
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return (
        f"capfilt: {summary['images']} images ({summary['skipped_images']} unreadable skipped), "
        f"{summary['images_written']} written to {summary['manifest']}, "
        f"{summary['images_dropped']} left without a caption\n"
        f"  captions: {summary['captions_in']} original + {summary['synthetic']} synthetic in, {summary['kept']} kept "
        f"({summary['kept_original']} original, {summary['kept_synthetic']} synthetic), "
        f"{summary['dropped_originals']} originals dropped\n"
        f"  mean {summary['score']}: original {number(summary['mean_score_original'])}, "
        f"synthetic {number(summary['mean_score_synthetic'])}, kept {number(summary['mean_score_kept'])}"
    )
