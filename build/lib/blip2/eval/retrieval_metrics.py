"""Image-text retrieval: Recall@K from score matrices, and the paper's ITM re-rank of the ITC top k.

Conventions: N_img images, N_txt texts; an image may have several captions. Text t belongs to
image ``txt2img[t]``; image i has the captions ``img2txt[i]``. Image-to-text (i2t) scores are
[N_img, N_txt] (one row per image query); text-to-image (t2i) scores are [N_txt, N_img].
An image query is a hit at K when any of its captions ranks in the top K; a text query when its
image does. Ties are counted against the query: a candidate scoring the same as the best correct
one ranks above it, so a constant score matrix gets no hits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from blip2.errors import InputError

ItmScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _positive_mask(txt2img: Sequence[int] | torch.Tensor, img2txt: Sequence[Sequence[int]],
                   n_img: int, n_txt: int) -> torch.Tensor:
    """[N_img, N_txt] bool: True where the text is a caption of the image; checks the two maps agree."""
    owners = torch.as_tensor(txt2img, dtype=torch.long)  # [N_txt]
    if owners.shape != (n_txt,):
        raise InputError(f"txt2img has shape {tuple(owners.shape)}, expected ({n_txt},): one image index per text")
    if len(img2txt) != n_img:
        raise InputError(f"img2txt has {len(img2txt)} entries, expected {n_img}: one caption list per image")
    if n_txt and (owners.min() < 0 or owners.max() >= n_img):
        raise InputError(f"txt2img holds image indices outside [0, {n_img}): min {owners.min()}, max {owners.max()}")
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positives[owners, torch.arange(n_txt)] = True
    for image, captions in enumerate(img2txt):
        if len(captions) == 0:
            raise InputError(f"img2txt[{image}] is empty: every image needs at least one caption")
        listed = torch.zeros(n_txt, dtype=torch.bool)
        listed[torch.as_tensor(list(captions), dtype=torch.long)] = True
        if not torch.equal(listed, positives[image]):
            expected = positives[image].nonzero().flatten().tolist()
            raise InputError(f"img2txt[{image}] = {list(captions)} disagrees with txt2img, which gives image "
                             f"{image} the texts {expected}")
    return positives


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive, ties counted against it. -> [N_query]."""
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # [N_query, 1]
    return ((scores >= best) & ~positives).sum(dim=1)  # [N_query]


def recall_at_k(scores: torch.Tensor, txt2img: Sequence[int] | torch.Tensor, img2txt: Sequence[Sequence[int]],
                ks: Sequence[int] = (1, 5, 10), *, scores_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@K (fractions in [0, 1]) for both directions.

    scores: [N_img, N_txt] image-to-text scores; scores_t2i: [N_txt, N_img] text-to-image scores,
    ``scores.T`` when not given (pass it for the re-ranked matrices of :func:`rerank_topk`).
    Returns ``i2t_r{k}``, ``t2i_r{k}`` for each k, their means ``i2t_mean``, ``t2i_mean``, and ``mean``.
    """
    if scores.dim() != 2:
        raise InputError(f"scores must be [N_img, N_txt], got shape {tuple(scores.shape)}")
    n_img, n_txt = scores.shape
    scores_t2i = scores.t() if scores_t2i is None else scores_t2i
    if scores_t2i.shape != (n_txt, n_img):
        raise InputError(f"scores_t2i must be [N_txt, N_img] = [{n_txt}, {n_img}], got {tuple(scores_t2i.shape)}")
    if not ks or min(ks) < 1:
        raise InputError(f"ks must be positive integers, got {tuple(ks)}")
    for name, matrix in (("scores", scores), ("scores_t2i", scores_t2i)):
        if torch.isnan(matrix).any():
            raise InputError(f"{name} holds NaN; recall is undefined")
    positives = _positive_mask(txt2img, img2txt, n_img, n_txt)  # [N_img, N_txt]
    ranks = {"i2t": best_positive_rank(scores.detach().float().cpu(), positives),
             "t2i": best_positive_rank(scores_t2i.detach().float().cpu(), positives.t())}
    results: dict[str, float] = {}
    for direction, rank in ranks.items():
        for k in ks:
            results[f"{direction}_r{k}"] = (rank < k).float().mean().item()
        results[f"{direction}_mean"] = sum(results[f"{direction}_r{k}"] for k in ks) / len(ks)
    results["mean"] = (results["i2t_mean"] + results["t2i_mean"]) / 2
    return results


def _score_pairs(itm_score: ItmScorer, images: torch.Tensor, texts: torch.Tensor, batch_size: int,
                 progress: bool) -> torch.Tensor:
    """ITM scores of the pairs (images[p], texts[p]), at most batch_size pairs per call. -> [P] float32."""
    chunks = []
    starts = range(0, images.numel(), batch_size)
    for start in tqdm(starts, desc="ITM re-rank", disable=not progress):
        image_batch, text_batch = images[start:start + batch_size], texts[start:start + batch_size]  # [b], [b]
        scores = torch.as_tensor(itm_score(image_batch, text_batch))
        if scores.shape != image_batch.shape:
            raise InputError(f"itm_score returned shape {tuple(scores.shape)} for {image_batch.numel()} pairs; "
                             f"it must return one score per pair, shape ({image_batch.numel()},)")
        chunks.append(scores.detach().float().to(images.device))
    return torch.cat(chunks) if chunks else torch.empty(0, device=images.device)


def _merge_reranked(itc: torch.Tensor, top: torch.Tensor, itm: torch.Tensor) -> torch.Tensor:
    """Final scores for one direction: ITM + ITC on the top k, shifted ITC below them elsewhere.

    itc: [N_query, N_cand]; top: [N_query, k] candidate indices; itm: [N_query, k].
    Outside the top k, each row's ITC scores are moved down by one constant so the best of them
    lies exactly 1 below the worst re-ranked score: every re-ranked candidate ranks first, and the
    rest keep their ITC order.
    """
    reranked = itm + itc.gather(1, top)  # [N_query, k]
    if top.shape[1] == itc.shape[1]:
        return torch.empty_like(itc).scatter_(1, top, reranked)
    in_top = torch.zeros_like(itc, dtype=torch.bool).scatter_(1, top, True)  # [N_query, N_cand]
    best_outside = itc.masked_fill(in_top, float("-inf")).amax(dim=1, keepdim=True)  # [N_query, 1]
    worst_reranked = reranked.amin(dim=1, keepdim=True)  # [N_query, 1]
    return (itc - best_outside + worst_reranked - 1.0).scatter_(1, top, reranked)


def rerank_topk(itc_scores: torch.Tensor, itm_score: ItmScorer, k: int = 128, batch_size: int = 256,
                *, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank each query's ITC top k by ITM + ITC, both directions (BLIP-2 retrieval, paper k = 128).

    itc_scores: [N_img, N_txt] ITC similarities. itm_score(image_indices [P], text_indices [P]) -> [P]
    returns the ITM match score of each (image, text) pair; it is called with at most batch_size
    pairs at a time, pairs sorted by image index, and each distinct pair scored once even when it
    is in the top k of both directions.
    Returns float32 (i2t [N_img, N_txt], t2i [N_txt, N_img]): ITM + ITC on the top k; elsewhere the
    ITC score shifted so it ranks below every re-ranked candidate, keeping its ITC order.
    """
    if itc_scores.dim() != 2:
        raise InputError(f"itc_scores must be [N_img, N_txt], got shape {tuple(itc_scores.shape)}")
    if itc_scores.numel() == 0:
        raise InputError(f"itc_scores is empty (shape {tuple(itc_scores.shape)}); nothing to re-rank")
    if k < 1 or batch_size < 1:
        raise InputError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    if not torch.isfinite(itc_scores).all():
        raise InputError("itc_scores holds inf or NaN; re-ranking needs finite ITC scores")
    itc = itc_scores.detach().float()  # [N_img, N_txt]
    n_img, n_txt = itc.shape
    i2t_top = itc.topk(min(k, n_txt), dim=1).indices  # [N_img, k_txt]
    t2i_top = itc.t().topk(min(k, n_img), dim=1).indices  # [N_txt, k_img]
    image_rows = torch.arange(n_img, device=itc.device)[:, None]  # [N_img, 1]
    text_rows = torch.arange(n_txt, device=itc.device)[:, None]  # [N_txt, 1]
    pair_ids = torch.cat([(image_rows * n_txt + i2t_top).flatten(),  # [N_img * k_txt]
                          (t2i_top * n_txt + text_rows).flatten()])  # [N_txt * k_img]
    unique_pairs, position = pair_ids.unique(return_inverse=True)  # sorted: grouped by image
    itm = _score_pairs(itm_score, unique_pairs // n_txt, unique_pairs % n_txt, batch_size, progress)[position]
    if not torch.isfinite(itm).all():
        raise InputError("itm_score returned inf or NaN for some pairs")
    split = i2t_top.numel()
    i2t = _merge_reranked(itc, i2t_top, itm[:split].view_as(i2t_top))  # [N_img, N_txt]
    t2i = _merge_reranked(itc.t().contiguous(), t2i_top, itm[split:].view_as(t2i_top))  # [N_txt, N_img]
    return i2t, t2i
