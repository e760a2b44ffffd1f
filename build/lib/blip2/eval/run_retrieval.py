"""Retrieval evaluation: image-text retrieval over a dataset's images and captions, ITC and the paper's ITM
re-rank (``retrieval_metrics``: Recall@K both ways)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from blip2.data.bad_images import BadImageCounter
from blip2.data.records import CAPTION, DatasetFormatError
from blip2.errors import InputError
from blip2.eval.retrieval_metrics import recall_at_k, rerank_topk
from blip2.eval.runs import (
    FeaturesArg,
    batch_features,
    batches,
    eval_mode,
    open_eval_dataset,
    resolve_features,
)
from blip2.infer.batching import batch_slices

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

RECALL_KS = (1, 5, 10)
TOP_RETRIEVED = 5  # how many retrieved items the retrieval predictions file lists per query


def recall_ceiling(texts: Sequence[str], txt2img: Sequence[int], num_images: int,
                   ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """The best Recall@K any model can reach when some caption strings belong to several images.

    A model sees only the text, so every copy of a string gets the same scores. Text to image: the copies of a
    string owned by m images share one ranking, and only the copies whose image is among its top K can be hits
    (a string on m images, once each, is right at R@1 for at most 1/m of its copies). Image to text (ties count
    against the query, as in ``recall_at_k``): an image's best caption ties with every other image's copy of
    that string, so the image is a hit at K only if one of its strings has fewer than K copies elsewhere.
    Same keys as ``recall_at_k``; all 1.0 when no string repeats across images.
    """
    if len(texts) != len(txt2img):
        raise InputError(f"{len(texts)} texts but {len(txt2img)} entries in txt2img: one image index per text")
    copies: dict[str, Counter] = {}  # string -> image index -> copies of the string owned by that image
    strings_of: list[set[str]] = [set() for _ in range(num_images)]
    for text, image in zip(texts, txt2img):
        copies.setdefault(text, Counter())[image] += 1
        strings_of[image].add(text)
    empty = [image for image, strings in enumerate(strings_of) if not strings]
    if empty:
        raise InputError(f"images {empty[:5]} have no caption: every image needs at least one")
    # for each image, the fewest copies owned by other images among its strings
    elsewhere = [min(sum(copies[text].values()) - copies[text][image] for text in strings)
                 for image, strings in enumerate(strings_of)]
    results: dict[str, float] = {}
    for direction in ("i2t", "t2i"):
        for k in ks:
            if direction == "i2t":
                results[f"i2t_r{k}"] = sum(count < k for count in elsewhere) / num_images
            else:
                hits = sum(sum(sorted(owners.values(), reverse=True)[:k]) for owners in copies.values())
                results[f"t2i_r{k}"] = hits / len(texts)
        results[f"{direction}_mean"] = sum(results[f"{direction}_r{k}"] for k in ks) / len(ks)
    results["mean"] = (results["i2t_mean"] + results["t2i_mean"]) / 2
    return results


def itc_scores(image_embeds: Tensor, text_embeds: Tensor, batch_size: int) -> Tensor:
    """ITC similarity [N_img, N_txt] float32 on the CPU: the best query's cosine with the text, in image batches.

    image_embeds: [N_img, Q, E] normalised; text_embeds: [N_txt, E] normalised.
    """
    rows = [torch.einsum("iqe,te->iqt", image_embeds[where], text_embeds).amax(dim=1).float().cpu()  # [b, N_txt]
            for where in batch_slices(len(image_embeds), batch_size)]
    return torch.cat(rows) if rows else torch.empty(0, len(text_embeds))


def retrieval_scores(
    pipe: "Blip2Pipeline", features: Tensor, texts: Sequence[str], k: int = 128, batch_size: int = 64, progress: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's retrieval scores for images with frozen ``features`` [N_img, N, D] against distinct ``texts``.

    ITC for every pair (image embeddings computed once per image, text embeddings once per text); then each
    query's top ``k`` re-scored as ITM + ITC, where ITM is the "match" logit averaged over queries (LAVIS's
    ``compute_itm``) and ITC the cosine similarity above, both directions, ``batch_size`` pairs per ITM call.
    Returns float32 CPU tensors (itc [N_img, N_txt], i2t [N_img, N_txt], t2i [N_txt, N_img]).
    """
    model = pipe.model
    device = model.device
    image_embeds = torch.cat([model.image_embeds_itc(model.query_states(features[where].to(device)).queries)
                              for where in batch_slices(len(features), batch_size)])  # [N_img, Q, E]
    text_embeds = torch.cat([model.text_embeds_itc(*pipe.tokenize_text(texts[where]))
                             for where in tqdm(batch_slices(len(texts), batch_size), desc="text embeddings",
                                               disable=not progress)])  # [N_txt, E]
    itc = itc_scores(image_embeds, text_embeds, batch_size)  # [N_img, N_txt]

    def itm_match_logit(image_index: Tensor, text_index: Tensor) -> Tensor:
        pair_features = features[image_index].to(device)  # [P, N, D]
        ids, mask = pipe.tokenize_text([texts[t] for t in text_index.tolist()])  # [P, T]
        return model.itm_logits(pair_features, ids, mask)[:, 1].float().cpu()  # [P]

    i2t, t2i = rerank_topk(itc, itm_match_logit, k=k, batch_size=batch_size, progress=progress)
    return itc, i2t, t2i


def evaluate_retrieval(
    pipe: "Blip2Pipeline",
    data: str | Path,
    k: int = 128,
    limit: int | None = None,
    caption_index: int | None = None,
    batch_size: int = 64,
    features: FeaturesArg = None,
    *,
    image_root: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Image-text retrieval over the images of ``data`` (the first ``limit``) and their captions.

    Every caption of an image is a text query (``caption_index``: only that one caption per image). Reports
    Recall@1/5/10 both ways with ITC alone (``itc``) and with the ITC top ``k`` re-ranked by ITM + ITC
    (``itc_itm``), and ``ceiling``: the best any model could reach given caption strings shared by several
    images (``recall_ceiling``). Identical strings are scored once, so their copies tie exactly. The frozen
    features of each image are computed once (or read from ``features``, a cache) and kept on the CPU.
    """
    model = pipe.model
    cache = resolve_features(pipe, features)
    dataset = open_eval_dataset(pipe, data, CAPTION, cache, image_root)
    records = {record.image_id: record for record in dataset.records}
    counter = BadImageCounter()
    image_ids: list[str] = []
    stored: list[Tensor] = []
    with eval_mode(model):
        for batch in batches(dataset, limit, batch_size, "encoding images", progress, counter):
            kept = [row for row, image_id in enumerate(batch["image_id"]) if records[image_id].captions]
            if kept:
                batch = {"image": batch["image"][kept], "image_id": [batch["image_id"][row] for row in kept]}
                stored.append(batch_features(model, batch, cache is not None).cpu())  # [b, N, D]
                image_ids += batch["image_id"]
        if not image_ids:
            raise DatasetFormatError(f"{data}: no readable image with captions to retrieve")
        texts, txt2img = _retrieval_texts([records[i] for i in image_ids], caption_index)
        distinct = list(dict.fromkeys(texts))
        itc, i2t, t2i = retrieval_scores(pipe, torch.cat(stored), distinct, k, batch_size, progress)
    position = {text: index for index, text in enumerate(distinct)}
    column = torch.tensor([position[text] for text in texts])  # [N_txt]: each text's distinct string
    img2txt = [[] for _ in image_ids]
    for text_index, image in enumerate(txt2img):
        img2txt[image].append(text_index)
    i2t_full, t2i_full = i2t[:, column], t2i[column]  # every copy of a string gets its scores
    return {
        "task": "retrieval",
        "data": str(data),
        "k": k,
        "caption_index": caption_index,
        "num_images": len(image_ids),
        "num_texts": len(texts),
        "num_distinct_texts": len(distinct),
        "skipped_images": counter.bad,
        "itc": recall_at_k(itc[:, column], txt2img, img2txt),
        "itc_itm": recall_at_k(i2t_full, txt2img, img2txt, scores_t2i=t2i_full),
        "ceiling": recall_ceiling(texts, txt2img, len(image_ids)),
        "predictions": _retrieved(image_ids, texts, txt2img, i2t_full, t2i_full),
    }


def _retrieval_texts(records, caption_index: int | None) -> tuple[list[str], list[int]]:
    """(texts, txt2img): every caption of every image, or caption ``caption_index`` of each."""
    texts, txt2img = [], []
    for image, record in enumerate(records):
        chosen = record.captions_at(caption_index)
        texts += chosen
        txt2img += [image] * len(chosen)
    return texts, txt2img


def _retrieved(image_ids: list[str], texts: list[str], txt2img: list[int], i2t: Tensor, t2i: Tensor) -> dict:
    """The top re-ranked results of every query, for reading what the model retrieves."""
    top_texts = i2t.topk(min(TOP_RETRIEVED, i2t.shape[1]), dim=1).indices.tolist()  # [N_img, top]
    top_images = t2i.topk(min(TOP_RETRIEVED, t2i.shape[1]), dim=1).indices.tolist()  # [N_txt, top]
    return {
        "image_to_text": [{"image_id": image_id, "retrieved": [texts[t] for t in top]}
                          for image_id, top in zip(image_ids, top_texts)],
        "text_to_image": [{"text": text, "image_id": image_ids[owner], "retrieved": [image_ids[i] for i in top]}
                          for text, owner, top in zip(texts, txt2img, top_images)],
    }
