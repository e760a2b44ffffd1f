"""Dataset files in the formats people already have, read into records (image path + captions, or a question).

Kinds (``detect_kind`` tells them from the name; ``read_records`` reads the non-streaming ones):

- ``jsonl``: the project's manifest, one {"image": path, "captions": [...]} (or "caption": "...") per
  line; for VQA one {"image", "question", "answers"} per line (optional "question_id", "question_type").
- ``csv``: columns ``image`` and ``caption``; several rows may share an image.
- ``json``: a list of the same objects (Karpathy-style COCO splits, VQA-style lists).
- ``coco``: the official COCO caption layout {"images": [...], "annotations": [...]}.
- ``vqav2``: the official VQAv2 questions file, with its annotations file passed as ``annotations``.
- ``webdataset``: tar shards in the img2dataset layout (``blip2.data.shards``).

Relative image paths resolve against ``image_root`` (default: the manifest's folder). URLs are refused.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2.data.images import is_url
from blip2.errors import InputError

CAPTION, VQA, CHAT = "caption", "vqa", "chat"
TASKS = (CAPTION, VQA, CHAT)
KINDS = ("jsonl", "csv", "json", "coco", "vqav2", "webdataset")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VQAV2_IMAGE_TEMPLATE = "COCO_{subtype}_{image_id:012d}.jpg"  # the COCO file naming VQAv2 refers to
MANIFEST_IN_FOLDER = {CAPTION: "captions.jsonl", VQA: "vqa.json", CHAT: "chat.json"}  # a shapes-world split's files


class DatasetFormatError(InputError):
    """A dataset file is missing, malformed or does not match the requested task."""


@dataclass(frozen=True)
class CaptionRecord:
    image: str
    captions: tuple[str, ...]
    image_id: str

    def captions_at(self, index: int | None) -> tuple[str, ...]:
        """Every caption (``index`` None) or only caption ``index`` (negative counts from the end)."""
        if index is None:
            return self.captions
        if not -len(self.captions) <= index < len(self.captions):
            raise DatasetFormatError(f"image {self.image_id!r} has {len(self.captions)} captions, so "
                                     f"caption_index={index} does not exist; pick a smaller index or None (all)")
        return (self.captions[index],)


@dataclass(frozen=True)
class ChatRecord:
    """A conversation about an image: ``messages`` [{"role": "user" | "assistant" | "system", "content"}]; the
    assistant's turns are what a model learns to answer."""

    image: str
    messages: tuple[dict, ...]
    image_id: str


@dataclass(frozen=True)
class VQARecord:
    image: str
    question: str
    answers: tuple[str, ...]
    image_id: str
    question_id: str
    question_type: str | None = None  # e.g. "color" (shapes) or "what color is the" (VQAv2); None when unlabelled


def check_task(task: str) -> None:
    if task not in TASKS:
        raise DatasetFormatError(f"task must be one of {TASKS}, got {task!r}")


def _image_path(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetFormatError(f"{where}: 'image' must be a non-empty path string, got {value!r}")
    if is_url(value):
        raise DatasetFormatError(
            f"{where}: image {value!r} is a URL; remote fetching is disabled in blip2. Download the images "
            "first (e.g. with img2dataset into tar shards) and point the dataset at the local files"
        )
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _caption_list(obj: dict, where: str) -> list[str]:
    value = obj.get("captions", obj.get("caption"))
    if value is None:
        raise DatasetFormatError(
            f"{where}: no 'captions' or 'caption' key (keys: {sorted(obj)}); "
            "for question/answer data open the dataset with task='vqa'"
        )
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise DatasetFormatError(f"{where}: captions must be a string or a list of strings, got {value!r}")
    return texts


def answer_list(obj: dict, where: str) -> list[str]:
    """'answers' as strings or VQAv2 {"answer": ...} dicts, or a single 'answer'; none is allowed (inference)."""
    if "answers" in obj:
        answers = obj["answers"]
        if not isinstance(answers, list):
            raise DatasetFormatError(f"{where}: 'answers' must be a list, got {answers!r}")
        if any(isinstance(a, dict) and "answer" not in a for a in answers):
            raise DatasetFormatError(f"{where}: an entry of 'answers' is a dict without an 'answer' key")
        return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]
    if "answer" in obj:
        return [str(obj["answer"])]
    return []


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def check_question_type_repeats(repeats: dict) -> None:
    """Raise ValueError unless ``repeats`` maps question-type names to whole numbers >= 1."""
    for kind, times in repeats.items():
        if not isinstance(kind, str):
            raise InputError(f"question_type_repeats keys are question-type names, got {kind!r}")
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise InputError(f"question_type_repeats[{kind!r}] must be a whole number >= 1, got {times!r}")


def repeat_question_types(records: list[VQARecord], repeats: dict[str, int], source: str) -> list[VQARecord]:
    """Each record ``repeats[its question_type]`` times (once when its type is not named): weighs question types
    up in a training epoch. Every named type must occur in ``records`` (``source`` names them in the error)."""
    check_question_type_repeats(repeats)
    present = {r.question_type for r in records}
    missing = sorted(set(repeats) - present)
    if missing:
        found = sorted(t for t in present if t is not None)
        raise DatasetFormatError(f"{source}: no question of type {', '.join(map(repr, missing))} to repeat; "
                                 f"types present: {found or 'none (no question_type field; VQAv2 reads it from annotations=)'}")
    return [r for r in records for _ in range(repeats.get(r.question_type, 1))]


def _records_from_objects(
    objects: Iterable[tuple[str, Any]], base: Path, task: str
) -> list[CaptionRecord] | list[VQARecord]:
    """Records from manifest objects, each given with its location (for error messages).
    For captions, objects that name the same image are merged into one record."""
    if task == CHAT:
        return [_chat_record(obj, base, where) for where, obj in objects]
    if task == VQA:
        records = []
        for number, (where, obj) in enumerate(objects):
            hint = "for caption data open the dataset with task='caption'"
            _require_keys(obj, ("image", "question"), where, hint=hint)
            image = _image_path(obj["image"], base, where)
            image_id = str(obj.get("image_id", obj["image"]))
            records.append(VQARecord(
                image=image,
                question=str(obj["question"]),
                answers=tuple(answer_list(obj, where)),
                image_id=image_id,
                question_id=str(obj.get("question_id", number)),
                question_type=_optional_str(obj.get("question_type")),
            ))  # fmt: skip
        return records
    grouped: dict[str, tuple[str, list[str]]] = {}  # image path -> (image id, captions); keeps first-seen order
    for where, obj in objects:
        _require_keys(obj, ("image",), where)
        image = _image_path(obj["image"], base, where)
        image_id, texts = grouped.setdefault(image, (str(obj.get("image_id", obj["image"])), []))
        texts.extend(_caption_list(obj, where))
    return [CaptionRecord(image, tuple(texts), image_id) for image, (image_id, texts) in grouped.items()]


def _chat_record(obj: Any, base: Path, where: str) -> ChatRecord:
    _require_keys(obj, ("image", "messages"), where, hint="a conversation is {\"image\", \"messages\": [...]}")
    messages = obj["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise DatasetFormatError(f"{where}: 'messages' must be a list of {{\"role\": system|user|assistant, "
                                 f"\"content\": text}}")
    spoken = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in spoken:
        raise DatasetFormatError(f"{where}: the conversation has no assistant message to learn")
    if spoken[0] != "user":
        raise DatasetFormatError(f"{where}: the conversation must open with a user message (the image comes with it)")
    return ChatRecord(_image_path(obj["image"], base, where), tuple(dict(m) for m in messages),
                      str(obj.get("image_id", obj["image"])))


def _require_keys(obj: Any, keys: tuple[str, ...], where: str, hint: str = "") -> None:
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in keys if key not in obj]
    if missing:
        advice = f"; {hint}" if hint else ""
        raise DatasetFormatError(f"{where}: missing key(s) {missing} (keys: {sorted(obj)}){advice}")


def _jsonl_objects(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(f"{path} line {number}: not valid JSON ({error})") from error


def _csv_records(path: Path, base: Path, task: str) -> list[CaptionRecord]:
    if task != CAPTION:
        raise DatasetFormatError(
            f"{path}: CSV manifests hold captions (columns image, caption); for VQA use JSON or JSONL"
        )
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetFormatError(
                f"{path}: CSV header lacks column(s) {sorted(missing)} (header: {reader.fieldnames})"
            )
        rows = [(f"{path} row {number}", row) for number, row in enumerate(reader, start=2)]
    return _records_from_objects(rows, base, task)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}: not valid JSON ({error})") from error


def _json_layout(data: Any) -> str | None:
    """Which JSON kind ``data`` is: 'json' (a list of objects), 'coco', 'vqav2', or None."""
    if isinstance(data, list):
        return "json"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and "questions" in data:
        return "vqav2"
    return None


def _coco_records(data: dict, base: Path, path: Path) -> list[CaptionRecord]:
    """Official COCO captions; images without annotations are kept (captions empty) for evaluation."""
    texts: dict[Any, list[str]] = {}
    for number, annotation in enumerate(data["annotations"]):
        _require_keys(annotation, ("image_id", "caption"), f"{path} annotations[{number}]")
        texts.setdefault(annotation["image_id"], []).append(annotation["caption"])
    records = []
    for number, image in enumerate(data["images"]):
        where = f"{path} images[{number}]"
        _require_keys(image, ("id", "file_name"), where)
        path_on_disk = _image_path(image["file_name"], base, where)
        records.append(CaptionRecord(path_on_disk, tuple(texts.get(image["id"], ())), str(image["id"])))
    if texts and not any(record.captions for record in records):
        annotated, listed = next(iter(texts)), data["images"][0]["id"] if data["images"] else None
        raise DatasetFormatError(
            f"{path}: none of the {len(data['annotations'])} annotations' image_id matches an image id (annotations "
            f"say {annotated!r} ({type(annotated).__name__}), images {listed!r} ({type(listed).__name__})): "
            "make them the same values, of the same type"
        )
    return records


def _vqav2_records(questions: dict, base: Path, path: Path, annotations: Path | None) -> list[VQARecord]:
    """Official VQAv2: questions file + (optional, absent for test-dev) annotations file."""
    subtype = questions.get("data_subtype")
    if subtype is None:
        raise DatasetFormatError(f"{path}: no 'data_subtype' (e.g. 'val2014'), needed to name the COCO image files")
    answers: dict[Any, list[str]] = {}
    question_types: dict[Any, str | None] = {}
    if annotations is not None:
        annotation_data = _load_json(_existing(annotations, "VQAv2 annotations file"))
        if not isinstance(annotation_data, dict) or "annotations" not in annotation_data:
            raise DatasetFormatError(f"{annotations}: not a VQAv2 annotations file (no 'annotations' key)")
        for number, annotation in enumerate(annotation_data["annotations"]):
            where = f"{annotations} annotations[{number}]"
            _require_keys(annotation, ("question_id", "answers"), where)
            answers[annotation["question_id"]] = answer_list(annotation, where)
            question_types[annotation["question_id"]] = _optional_str(annotation.get("question_type"))
    records = []
    for number, question in enumerate(questions["questions"]):
        where = f"{path} questions[{number}]"
        _require_keys(question, ("image_id", "question", "question_id"), where)
        if annotations is not None and question["question_id"] not in answers:
            raise DatasetFormatError(f"{where}: question_id {question['question_id']} has no entry in {annotations}")
        file_name = VQAV2_IMAGE_TEMPLATE.format(subtype=subtype, image_id=int(question["image_id"]))
        records.append(VQARecord(
            image=str(base / file_name),
            question=question["question"],
            answers=tuple(answers.get(question["question_id"], ())),
            image_id=str(question["image_id"]),
            question_id=str(question["question_id"]),
            question_type=question_types.get(question["question_id"]),
        ))  # fmt: skip
    return records


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetFormatError(f"{what} not found: {path}")
    return path


def read_records(
    path: str | Path,
    kind: str,
    task: str = CAPTION,
    image_root: str | Path | None = None,
    annotations: str | Path | None = None,
) -> list[CaptionRecord] | list[VQARecord]:
    """Read a non-streaming dataset file of ``kind`` into records (image paths resolved)."""
    check_task(task)
    path = _existing(path, "dataset file")
    base = Path(image_root).expanduser() if image_root is not None else path.parent
    if kind == "jsonl":
        return _records_from_objects(_jsonl_objects(path), base, task)
    if kind == "csv":
        return _csv_records(path, base, task)
    if kind not in ("json", "coco", "vqav2"):
        raise DatasetFormatError(f"unknown dataset kind {kind!r}; kinds: {list(KINDS)}")
    data = _load_json(path)
    layout = _json_layout(data)  # kind "json" accepts any of the three layouts
    if layout is None:
        raise DatasetFormatError(f"{path}: JSON is none of: {'; '.join(_LAYOUT_HELP.values())}")
    if kind != "json" and layout != kind:
        raise DatasetFormatError(
            f"{path}: kind {kind!r} expects {_LAYOUT_HELP[kind]}, but the file holds {_LAYOUT_HELP[layout]}"
        )
    if layout == "json":
        return _records_from_objects(((f"{path} entry {i}", obj) for i, obj in enumerate(data)), base, task)
    if layout == "coco":
        if task != CAPTION:
            raise DatasetFormatError(f"{path}: a COCO caption file holds captions; open it with task='caption'")
        return _coco_records(data, base, path)
    if task != VQA:
        raise DatasetFormatError(f"{path}: a VQAv2 questions file holds questions; open it with task='vqa'")
    return _vqav2_records(data, base, path, Path(annotations) if annotations is not None else None)


_LAYOUT_HELP = {
    "json": "a JSON list of objects",
    "coco": 'a COCO caption object {"images": [...], "annotations": [...]}',
    "vqav2": 'a VQAv2 questions object {"questions": [...]}',
}


def detect_kind(path_or_spec: str | Path) -> str:
    """The dataset kind of a file or shard spec, from its name alone."""
    text = str(path_or_spec)
    path = Path(text).expanduser()
    if text.endswith(".tar") or ("{" in text and ".." in text) or (path.is_dir() and any(path.glob("*.tar"))):
        return "webdataset"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv", ".json"):
        return suffix[1:]  # for .json the layout (list, COCO, VQAv2) is read from the content
    raise DatasetFormatError(
        f"cannot tell the dataset kind of {text!r}: expected .jsonl, .csv, .json, .tar, a shard pattern "
        f"like 'shards-{{000000..000009}}.tar', or a folder; or pass kind= one of {list(KINDS)}"
    )


def resolve_folder(path_or_spec: str | Path, task: str) -> str | Path:
    """A folder with a manifest for ``task`` (e.g. a shapes-world split) stands for that manifest."""
    folder = Path(str(path_or_spec)).expanduser()
    if not folder.is_dir():
        return path_or_spec
    manifest = folder / MANIFEST_IN_FOLDER[task]
    if manifest.is_file():
        return manifest
    if any(folder.glob("*.tar")):
        return folder
    raise DatasetFormatError(f"folder {folder} holds neither {MANIFEST_IN_FOLDER[task]} nor .tar shards")
