"""VQA evaluation: answer every question of a dataset and score with VQAv2 accuracy (``vqa_metrics``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip2.data.bad_images import BadImageCounter
from blip2.data.datasets import open_dataset
from blip2.data.records import MANIFEST_IN_FOLDER, VQA, DatasetFormatError, detect_kind
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
from blip2.eval.vqa_metrics import (
    Normalize,
    check_normalize,
    evaluate_vqa,
    majority_answers,
)
from blip2.infer.decoding import GenerationOptions
from blip2.prompts import format_questions, vqa_template

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

VQA_GENERATION = {"max_new_tokens": 10}  # answers are a few words; beam search is the caller's choice (the paper: 5 beams)


def question_types(data: str | Path, annotations: str | Path | None = None) -> dict[str, dict[str, str]]:
    """question id -> {"question_type", "answer_type"} (those present) as the raw file gives them.

    From the objects of a JSON list / JSONL manifest (the shapes world writes "question_type"), or from a
    VQAv2 annotations file. Ids follow ``open_dataset``: "question_id", else the object's position.
    """
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / MANIFEST_IN_FOLDER[VQA]
    if annotations is not None:
        objects = json.loads(Path(annotations).expanduser().read_text(encoding="utf-8")).get("annotations", [])
    elif detect_kind(path) == "jsonl":
        objects = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        objects = json.loads(path.read_text(encoding="utf-8"))
        objects = objects if isinstance(objects, list) else []  # a VQAv2 questions file: types live in annotations
    fields = ("question_type", "answer_type")
    return {
        str(obj.get("question_id", number)): {field: str(obj[field]) for field in fields if field in obj}
        for number, obj in enumerate(objects)
        if isinstance(obj, dict)
    }


def blind_prior(train: str | Path, annotations: str | Path | None = None) -> dict[str, str]:
    """Question type -> the first answer it most often has in ``train`` (ties: the first seen); without types,
    the question's first three words stand for its type, as VQAv2's types are openings ("what color is")."""
    records = open_dataset(train, task=VQA, annotations=annotations).records
    types = question_types(train, annotations)
    return majority_answers((_type_of(r.question_id, r.question, types), r.answers[0]) for r in records if r.answers)


def _type_of(question_id: str, question: str, types: dict[str, dict[str, str]]) -> str:
    return types.get(question_id, {}).get("question_type") or " ".join(question.lower().split()[:3])


def evaluate_vqa_task(
    pipe: "Blip2Pipeline",
    data: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    prompt_template: str | None = None,
    features: FeaturesArg = None,
    *,
    annotations: str | Path | None = None,
    image_root: str | Path | None = None,
    normalize: Normalize = "official",
    prior: str | Path | None = None,
    progress: bool = True,
    **gen,
) -> dict[str, Any]:
    """Answer every question of ``data`` (the first ``limit``) and score with VQAv2 accuracy.

    ``prompt_template`` defaults to the paper's "Question: {} Answer:" ("... Short answer:" for Flan-T5);
    ``annotations`` is the VQAv2 annotations file that goes with a VQAv2 questions file. ``**gen``:
    ``GenerationOptions`` (default here: greedy, ``max_new_tokens=10``). ``normalize``: answer normalisation,
    "official" (as GT-Vision-Lab's script: only questions whose human answers differ) or "always" (see
    ``blip2.eval.vqa_metrics``). Returns ``metrics`` (``overall``,
    per question / answer type when the data has types), counts and ``predictions`` (the VQAv2 results format
    ``[{"question_id", "answer"}]``). Data without answers (test-dev) gets predictions only. ``prior``: a training
    set; its ``blind_prior`` (each question type's most common answer) is scored beside the model as
    ``blind_prior``.
    """
    check_normalize(normalize)  # before any answer is generated
    guesses = blind_prior(prior) if prior is not None else None
    options = GenerationOptions.from_kwargs({**VQA_GENERATION, **gen})
    model = pipe.model
    template = prompt_template or vqa_template(model.require_llm().is_encoder_decoder)
    cache = resolve_features(pipe, features)
    dataset = open_eval_dataset(pipe, data, VQA, cache, image_root, annotations)
    counter = BadImageCounter()
    answers: dict[str, str] = {}
    with eval_mode(model):
        for batch in batches(dataset, limit, batch_size, "answering", progress, counter):
            feats = batch_features(model, batch, cache is not None)  # [B, N, D]
            prompts = format_questions(batch["question"], template)
            answers.update(zip(batch["question_id"], texts_from_features(pipe, feats, prompts, options)))
    records = {record.question_id: record for record in dataset.records if record.question_id in answers}
    with_answers = [qid for qid, record in records.items() if record.answers]
    if with_answers and len(with_answers) < len(records):
        missing = [qid for qid in records if not records[qid].answers]
        raise DatasetFormatError(f"{data}: {len(missing)} of {len(records)} questions have no answers "
                                 f"(e.g. {missing[:3]}): give answers for all questions, or for none")
    types = question_types(data, annotations) if with_answers else {}
    references = {qid: {"answers": list(records[qid].answers), **types.get(qid, {})} for qid in with_answers}
    results = {
        "task": "vqa",
        "data": str(data),
        "prompt_template": template,
        "num_questions": len(answers),
        "skipped_images": counter.bad,
        "normalize": normalize,
        "metrics": evaluate_vqa({qid: answers[qid] for qid in references}, references, normalize) if references else {},
        "predictions": [{"question_id": official_id(qid), "answer": text} for qid, text in answers.items()],
    }
    if guesses is not None and references:
        blind = {qid: guesses.get(_type_of(qid, records[qid].question, types), "") for qid in references}
        results["blind_prior"] = evaluate_vqa(blind, references, normalize)
    return results
