"""`blip2 eval|capfilt`: measuring a model, cleaning a dataset with it."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Literal

from blip2.errors import InputError
from blip2.eval.capfilt import capfilt as run_capfilt
from blip2.eval.evaluate import evaluate
from blip2.infer.decoding import GenerationOptions
from blip2.io import check_writable
from blip2.pipeline import load


def eval_(task: Literal["caption", "vqa", "retrieval", "grounding", "chat"], data: str, model: str = "default",
          out: Annotated[str | None, "a folder for the results (JSON and a Markdown table)"] = None,
          limit: Annotated[int | None, "score only the first N (default: all)"] = None, k: int = 128,
          caption_index: Annotated[int | None, "retrieval, grounding: only this caption of each image"] = None,
          features: Annotated[str | None, "a `blip2 cache-features` folder to read instead of images (not chat)"] = None,
          annotations: Annotated[str | None, "vqa: the VQAv2 annotations file beside DATA's questions"] = None,
          batch_size: int = 16,
          normalize: Annotated[Literal["official", "always"] | None, "vqa: answer normalisation (default: official)"]
          = None,
          prior: Annotated[str | None, "vqa, chat: a training set whose blind prior is scored beside the model's"] = None,
          gen: GenerationOptions = GenerationOptions()) -> None:
    """Evaluate a model on a dataset: caption (BLEU-4, METEOR, ROUGE-L, CIDEr), vqa (VQAv2 accuracy),
    retrieval (R@1/5/10 both directions, ITC alone and ITC+ITM re-rank of the top --k; the paper uses 128),
    grounding (a stage-2 model's caption loss with each image's own visual prompt vs another image's: 0 gap
    and own_better 0.5 mean the text ignores the image) or chat (scripted conversations through `blip2 chat`'s
    session, each reply scored as a VQA answer). --prior TRAIN (vqa, chat) scores the blind baseline beside the
    model: each question type's most common answer in the training data TRAIN.

    DATA is any caption/VQA dataset (COCO/Flickr Karpathy JSON, VQAv2 questions + --annotations, a manifest,
    a shapes split; for chat a chat.json with scripted turns or a shapes split). --features reads cached encoder
    outputs instead of images. Results go to --out as JSON and a Markdown table. --limit N scores only the first N
    images (N questions for vqa, N conversations for chat): quick, but a VQA type over 200 questions can be off by
    0.1 or more. --caption-index scores only that caption of each image (retrieval, grounding). --normalize (vqa):
    "official" (default; as the official VQA script, answers are normalised only where the ten human answers
    differ) or "always" (both sides of every question; chat always). The generation options (caption, vqa, chat;
    default greedy, 10 new tokens for answers and replies) are those of `blip2 caption`.
    """
    task_only = {"--caption-index": (caption_index, ("retrieval", "grounding")), "--annotations": (annotations, ("vqa",)),
                 "--normalize": (normalize, ("vqa",)), "--prior": (prior, ("vqa", "chat")),
                 "--features": (features, ("caption", "vqa", "retrieval", "grounding"))}
    misplaced = [flag for flag, (value, tasks) in task_only.items() if value is not None and task not in tasks]
    if misplaced:
        raise InputError(f"{', '.join(misplaced)} does not apply to eval {task}; leave it out")
    kw = {"limit": limit} if task == "chat" else {"limit": limit, "batch_size": batch_size, "features": features}
    if task == "retrieval":
        kw["k"] = k
    optional = {"caption_index": caption_index, "annotations": annotations, "normalize": normalize, "prior": prior}
    kw.update({name: value for name, value in optional.items() if value is not None})
    chosen = {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)
              if getattr(gen, f.name) != getattr(GenerationOptions(), f.name)}
    if chosen and task not in ("caption", "vqa", "chat"):
        raise InputError(f"generation options ({', '.join(chosen)}) do not apply to eval {task}; leave them out")
    kw.update(chosen)
    if out is not None:
        check_writable(out, "--out")  # before any image is read
    results = evaluate(task, load(model), data, out_dir=out, **kw)
    print(json.dumps({k: v for k, v in results.items() if k != "predictions"}, indent=2, default=str))


def capfilt(data: str, out: str, model: str = "default", num_captions: int = 3, threshold: float = 0.5, keep: int = 2,
            score: Literal["itm", "itc"] = "itm", limit: Annotated[int | None, "only the first N images"] = None,
            batch_size: int = 16) -> None:
    """CapFilt (BLIP): caption every image of DATA with nucleus sampling, score original and synthetic captions
    with ITM (or ITC), and write a cleaned manifest OUT keeping the --keep best captions scoring >= --threshold."""
    run_capfilt(load(model), data, out, num_captions=num_captions, threshold=threshold, keep=keep, score=score,
                limit=limit, batch_size=batch_size)
