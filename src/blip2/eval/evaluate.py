"""``blip2 eval TASK``: run a model over a caption, VQA, retrieval, grounding or chat dataset, score what it produced and
write the report.

Data is any file or folder that ``open_dataset`` reads (COCO / Karpathy JSON, VQAv2 questions + annotations, JSONL
manifests, a shapes-world split folder). Images are read and encoded in batches, each distinct image once; a
``FeatureCache`` of the model's frozen encoder (``features=``) replaces the encoder altogether. Unreadable images are
skipped and counted (``skipped_images``). The runners are ``run_caption``, ``run_vqa``, ``run_retrieval``,
``run_grounding`` and ``run_chat``; their metrics ``caption_metrics``, ``vqa_metrics`` and ``retrieval_metrics``; see
docs/evaluation.md ("Evaluating a model").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip2.errors import InputError
from blip2.eval.report import write_report
from blip2.eval.run_caption import evaluate_captioning
from blip2.eval.run_chat import evaluate_chat
from blip2.eval.run_grounding import evaluate_grounding
from blip2.eval.run_retrieval import evaluate_retrieval
from blip2.eval.run_vqa import evaluate_vqa_task
from blip2.io import write_text_atomically

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "caption": evaluate_captioning,
    "vqa": evaluate_vqa_task,
    "retrieval": evaluate_retrieval,
    "grounding": evaluate_grounding,
    "chat": evaluate_chat,
}


def evaluate(task: str, pipe: "Blip2Pipeline", data: str | Path, out_dir: str | Path | None = None, **kw) -> dict[str, Any]:
    """Run ``task`` ("caption", "vqa", "retrieval", "grounding" or "chat") on ``data``; ``kw`` go to that task's function.

    With ``out_dir``: ``TASK.json`` and ``TASK.md`` (the report, via ``write_report``) and
    ``TASK_predictions.json`` (the model's outputs) are written there. Returns the results, predictions included.
    """
    if task not in RUNNERS:
        raise InputError(f"unknown evaluation task {task!r}; tasks: {list(RUNNERS)}")
    results = RUNNERS[task](pipe, data, **kw)
    if out_dir is not None:
        report = {key: value for key, value in results.items() if key != "predictions"}
        write_report(report, out_dir, task)
        write_text_atomically(Path(out_dir) / f"{task}_predictions.json", json.dumps(results["predictions"], indent=1))
    return results
