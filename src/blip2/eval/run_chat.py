"""Chat evaluation: scripted conversations held through ``ChatSession`` (each image encoded once, each turn read
from the conversation so far, the model's own earlier replies included), every reply scored as a VQA answer.

The conversations are the ``"turns"`` of a ``chat.json`` (the shapes world writes them: a question, another of a
different type, then a follow-up that refers back, "where is it?"): ``[{"image", "image_id", "turns": [{"question",
"answer", "kind", "follow_up"}]}]``. Replies are normalised as VQA answers always are here ("Red." is "red"). The
blind prior (``prior=``, a training ``chat.json``) answers each question with the answer its kind most often has
in training, without looking: what a model that ignores the image can reach.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from blip2.data.bad_images import BadImage, BadImageCounter, load_or_bad
from blip2.data.records import CHAT, MANIFEST_IN_FOLDER, DatasetFormatError
from blip2.eval.runs import eval_mode
from blip2.eval.vqa_metrics import evaluate_vqa, majority_answers
from blip2.infer.chat import ChatSession

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

CHAT_GENERATION = {"max_new_tokens": 10}  # the scripted questions are answered in a word or two
REFERENCE_COPIES = 10  # one reference answer, as the ten of a VQAv2 question: right scores 1, wrong 0


def read_conversations(data: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The scripted conversations of a ``chat.json`` (or a split folder holding one), the first ``limit``."""
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / MANIFEST_IN_FOLDER[CHAT]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no conversations here; give a chat.json or a shapes split folder")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(rows, list):
        raise DatasetFormatError(f"{path}: expected a list of conversations")
    for number, row in enumerate(rows):
        turns = row.get("turns") if isinstance(row, dict) else None
        if "image" not in (row if isinstance(row, dict) else {}) or not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get("question"), str) and isinstance(t.get("answer"), str) for t in turns
        ):
            raise DatasetFormatError(f"{path}, conversation {number}: expected {{\"image\", \"turns\": [{{\"question\", "
                                     "\"answer\"}, ...]}}; scripted conversations come from `blip2 shapes`")
    base = path.parent
    return [{**row, "image": str(base / row["image"]), "image_id": str(row.get("image_id", number))}
            for number, row in enumerate(rows[:limit])]


def blind_prior(train: str | Path) -> dict[str, str]:
    """Question kind -> the answer it most often has in the training conversations (ties: the first seen)."""
    return majority_answers((t.get("kind", ""), t["answer"]) for row in read_conversations(train) for t in row["turns"])


def evaluate_chat(
    pipe: "Blip2Pipeline",
    data: str | Path,
    limit: int | None = None,
    prior: str | Path | None = None,
    *,
    system: str | None = None,
    progress: bool = True,
    **gen,
) -> dict[str, Any]:
    """Hold every scripted conversation of ``data`` (the first ``limit``) through ``ChatSession`` and score each
    reply like a VQA answer -> ``metrics``: ``overall``, ``per_question_type``, ``per_turn`` (1, 2, 3: later turns
    read longer conversations), ``follow_up``; with ``prior`` (a training ``chat.json`` or split) the blind prior's
    ``blind_prior`` metrics beside them; ``predictions``: each conversation as it went. ``**gen``: generation options
    (default greedy, 10 new tokens)."""
    conversations = read_conversations(data, limit)
    guesses = blind_prior(prior) if prior is not None else None  # before any reply is generated
    gen = {**CHAT_GENERATION, **gen}
    counter = BadImageCounter()
    replies, references, turn_of, predictions = {}, {}, {}, []
    with eval_mode(pipe.model):
        for row in tqdm(conversations, desc="chatting", unit="chat", disable=not progress):
            image = load_or_bad(row["image"], None)
            counter.update({"bad_images": [image]} if isinstance(image, BadImage) else {"image_id": [row["image_id"]]})
            if isinstance(image, BadImage):
                continue
            session = ChatSession(pipe, image, system=system)
            said = []
            for number, turn in enumerate(row["turns"], start=1):
                qid = f"{row['image_id']}/{number}"
                replies[qid] = session.ask(turn["question"], **gen)
                references[qid] = {"answers": [turn["answer"]] * REFERENCE_COPIES, "question_type": turn.get("kind", "")}
                turn_of[qid] = (number, bool(turn.get("follow_up")))
                said.append({"question": turn["question"], "reply": replies[qid], "expected": turn["answer"]})
            predictions.append({"image_id": row["image_id"], "turns": said})
    if not references:
        raise DatasetFormatError(f"{data}: no conversation could be held (every image unreadable)")
    metrics = score(replies, references, turn_of)
    results = {"task": "chat", "data": str(data), "num_conversations": len(predictions),
               "skipped_images": counter.bad, "metrics": metrics, "predictions": predictions}
    if guesses is not None:
        blind = {qid: guesses.get(ref["question_type"], "") for qid, ref in references.items()}
        results["blind_prior"] = score(blind, references, turn_of)
    return results


def score(replies: dict[str, str], references: dict[str, dict], turn_of: dict[str, tuple[int, bool]]) -> dict[str, Any]:
    """VQA accuracy of ``replies`` overall and per question type, per turn number and for follow-ups."""
    metrics = evaluate_vqa(replies, references, normalize="always")
    for key, group in (("per_turn", lambda qid: str(turn_of[qid][0])), ("follow_up", lambda qid: str(turn_of[qid][1]))):
        groups: dict[str, list[str]] = defaultdict(list)
        for qid in references:
            groups[group(qid)].append(qid)
        metrics[key] = {name: evaluate_vqa({q: replies[q] for q in ids}, {q: references[q] for q in ids},
                                           normalize="always")["overall"] for name, ids in sorted(groups.items())}
    return metrics
