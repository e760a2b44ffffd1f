"""Datasets: every format from tiny files, bad images skipped and counted, shard splitting."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2.data.bad_images import (
    BadImage,
    BadImageCounter,
    BadImageLimitError,
    collate_skip_bad,
)
from blip2.data.datasets import CaptionDataset, VQADataset, open_dataset
from blip2.data.records import DatasetFormatError, detect_kind
from blip2.data.shards import ShardDataset, expand_shards
from blip2.demo.shapes import ShapesConfig, write_split

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A stand-in for an encoder's preprocessing: 8x8, [3, H, W] in 0..1."""
    array = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0  # [8, 8, 3]
    return torch.from_numpy(array).permute(2, 0, 1)  # [3, 8, 8]


def _png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path):
    """red.png, green.png, blue.png and a corrupt bad.png under tmp_path/img."""
    folder = tmp_path / "img"
    folder.mkdir()
    for name, colour in COLOURS.items():
        (folder / f"{name}.png").write_bytes(_png_bytes(colour))
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return folder


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _colour_of(item) -> tuple:
    return tuple(int(round(v * 255)) for v in item["image"][:, 0, 0].tolist())


# ----------------------------------------------------------------------------------- manifests


def test_jsonl_manifest_relative_absolute_caption_and_captions(tmp_path, images):
    manifest = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "img/red.png", "captions": ["a red square", "red"]},
            {"image": str(images / "green.png"), "caption": "a green square", "image_id": "g1"},
        ],
    )
    dataset = open_dataset(manifest, transform=to_tensor)
    assert isinstance(dataset, CaptionDataset) and len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first["image"].shape == (3, 8, 8) and _colour_of(first) == COLOURS["red"]
    assert first["text"] == "a red square" and first["image_id"] == "img/red.png"
    assert second["text"] == "a green square" and second["image_id"] == "g1"
    assert _colour_of(second) == COLOURS["green"]


def test_training_samples_a_caption_per_epoch(tmp_path, images):
    options = [f"caption {k}" for k in range(6)]
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"image": "img/red.png", "captions": options}])
    dataset = open_dataset(manifest, transform=to_tensor, train=True, seed=3)
    drawn = []
    for epoch in range(12):
        dataset.set_epoch(epoch)
        drawn.append(dataset[0]["text"])
        assert dataset[0]["text"] == drawn[-1], "the same epoch must give the same caption"
    assert set(drawn) <= set(options) and len(set(drawn)) >= 3
    assert open_dataset(manifest, transform=to_tensor)[0]["text"] == "caption 0"  # eval: first


def test_several_distinct_captions_per_image_per_epoch(tmp_path, images):
    rows = [{"image": "img/red.png", "captions": [f"red {k}" for k in range(5)]},
            {"image": "img/green.png", "captions": ["green 0", "green 1"]}]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    dataset = open_dataset(manifest, transform=to_tensor, train=True, seed=3, captions_per_image=3)
    assert len(dataset) == 6  # 2 images x 3
    red = [dataset[i]["text"] for i in range(3)]
    assert len(set(red)) == 3 and all(t.startswith("red") for t in red)  # distinct, without replacement
    green = [dataset[i]["text"] for i in range(3, 6)]
    assert set(green) == {"green 0", "green 1"}  # fewer captions than slots: each used, then reused
    seen = set()
    for epoch in range(8):  # a new draw every epoch: over a few epochs every caption comes up
        dataset.set_epoch(epoch)
        seen |= {dataset[i]["text"] for i in range(3)}
    assert seen == {f"red {k}" for k in range(5)}
    assert len(open_dataset(manifest, transform=to_tensor, captions_per_image=3)) == 2  # evaluation: one per image
    with pytest.raises(ValueError, match="captions_per_image"):
        open_dataset(manifest, train=True, captions_per_image=0)


def test_caption_index_keeps_one_caption_of_every_image(tmp_path, images, shards):
    rows = [{"image": "img/red.png", "captions": ["red", "a red thing at the top"]},
            {"image": "img/green.png", "captions": ["green", "a green thing on the left", "green again"]}]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    dataset = open_dataset(manifest, transform=to_tensor, train=True, captions_per_image=2, caption_index=1)
    assert [dataset[i]["text"] for i in range(len(dataset))] == ["a red thing at the top"] * 2 + ["a green thing on the left"] * 2
    assert [open_dataset(manifest, caption_index=-1)[i]["text"] for i in range(2)] == ["a red thing at the top", "green again"]
    with pytest.raises(DatasetFormatError, match="caption_index=2 does not exist"):
        open_dataset(manifest, train=True, caption_index=2)
    with pytest.raises(ValueError, match="leave caption_index unset"):
        open_dataset(str(shards / "shards-{000000..000003}.tar"), train=True, caption_index=0)


def test_manifest_lines_naming_the_same_image_are_merged(tmp_path, images):
    manifest = _write_jsonl(
        tmp_path / "m.jsonl", [{"image": "img/red.png", "caption": "one"}, {"image": "img/red.png", "caption": "two"}]
    )
    dataset = open_dataset(manifest)
    assert len(dataset) == 1 and dataset.records[0].captions == ("one", "two")
    assert isinstance(dataset[0]["image"], Image.Image)  # no transform: PIL images


def test_csv_manifest_groups_rows(tmp_path, images):
    path = tmp_path / "captions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows([["img/red.png", "red one"], ["img/blue.png", "blue one"], ["img/red.png", "red two"]])
    dataset = open_dataset(path, transform=to_tensor)
    assert [r.captions for r in dataset.records] == [("red one", "red two"), ("blue one",)]
    assert _colour_of(dataset[1]) == COLOURS["blue"]


def test_csv_without_caption_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("path,text\na.png,hello\n")
    with pytest.raises(DatasetFormatError, match=r"bad.csv: CSV header lacks column\(s\) \['caption', 'image'\]"):
        open_dataset(path)


def test_urls_in_manifests_are_refused(tmp_path):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"image": "https://example.com/a.jpg", "caption": "x"}])
    with pytest.raises(DatasetFormatError, match="m.jsonl line 1: .*is a URL; remote fetching is disabled"):
        open_dataset(manifest)


def test_malformed_manifests_name_the_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "a.png", "caption": "x"}\n{not json\n')
    with pytest.raises(DatasetFormatError, match="broken.jsonl line 2: not valid JSON"):
        open_dataset(broken)
    no_caption = _write_jsonl(tmp_path / "q.jsonl", [{"image": "a.png", "question": "what?"}])
    with pytest.raises(DatasetFormatError, match="q.jsonl line 1: no 'captions' or 'caption' key.*task='vqa'"):
        open_dataset(no_caption)
    with pytest.raises(DatasetFormatError, match="dataset file not found"):
        open_dataset(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------------------------- COCO, VQA


def test_coco_karpathy_list(tmp_path, images):
    path = tmp_path / "karpathy.json"
    path.write_text(json.dumps([
        {"image": "red.png", "caption": "a red image", "image_id": "r"},
        {"image": "red.png", "caption": "all red", "image_id": "r"},
        {"image": "blue.png", "caption": ["a blue image", "blue"], "image_id": "b"},
    ]))  # fmt: skip
    dataset = open_dataset(path, transform=to_tensor, image_root=images)
    assert detect_kind(path) == "json"
    expected = [("r", ("a red image", "all red")), ("b", ("a blue image", "blue"))]
    assert [(r.image_id, r.captions) for r in dataset.records] == expected
    assert _colour_of(dataset[1]) == COLOURS["blue"]


def test_coco_official_layout(tmp_path, images):
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "green.png"}, {"id": 9, "file_name": "red.png"}],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "red thing"},
            {"id": 2, "image_id": 7, "caption": "green thing"},
            {"id": 3, "image_id": 7, "caption": "a green thing"},
        ],
    }))  # fmt: skip
    dataset = open_dataset(path, transform=to_tensor, image_root=images)
    items = [dataset[0], dataset[1]]
    assert [(i["image_id"], i["text"]) for i in items] == [("7", "green thing"), ("9", "red thing")]
    assert _colour_of(items[0]) == COLOURS["green"]
    with pytest.raises(DatasetFormatError, match="open it with task='caption'"):
        open_dataset(path, task="vqa")
    with pytest.raises(DatasetFormatError, match="kind 'vqav2' expects"):
        open_dataset(path, kind="vqav2", task="vqa")


def test_vqa_list(tmp_path, images):
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps([
        {"image": "img/red.png", "question": "what color?", "answers": ["red", "red", "crimson"], "question_id": 5},
        {"image": "img/blue.png", "question": "what color?", "answer": "blue"},
    ]))  # fmt: skip
    dataset = open_dataset(path, transform=to_tensor, task="vqa")
    assert isinstance(dataset, VQADataset)
    first, second = dataset[0], dataset[1]
    assert first["question"] == "what color?" and first["answers"] == ["red", "red", "crimson"]
    assert first["question_id"] == "5" and first["image_id"] == "img/red.png"
    assert second["answers"] == ["blue"] and _colour_of(second) == COLOURS["blue"]


def test_vqav2_questions_and_annotations(tmp_path, images):
    for image_id, colour in ((1, "red"), (2, "blue")):
        (images / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(_png_bytes(COLOURS[colour]))
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 1, "question": "Is it red?", "question_id": 10},
            {"image_id": 2, "question": "Is it red?", "question_id": 20},
        ],
    }))  # fmt: skip
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({
        "annotations": [
            {"question_id": 20, "image_id": 2, "answers": [{"answer": "no", "answer_id": k} for k in range(10)]},
            {"question_id": 10, "image_id": 1, "answers": [{"answer": "yes", "answer_id": k} for k in range(10)],
             "question_type": "is it"},
        ]
    }))  # fmt: skip
    dataset = open_dataset(questions, transform=to_tensor, task="vqa", image_root=images, annotations=annotations)
    assert detect_kind(questions) == "json"
    first, second = dataset[0], dataset[1]
    assert (first["question_id"], first["answers"]) == ("10", ["yes"] * 10)
    assert (second["image_id"], second["answers"][0]) == ("2", "no")
    assert _colour_of(second) == COLOURS["blue"]
    test_dev = open_dataset(questions, task="vqa", image_root=images)  # no annotations: inference only
    assert test_dev[0]["answers"] == []
    weighted = open_dataset(questions, task="vqa", image_root=images, annotations=annotations,
                            question_type_repeats={"is it": 3})  # VQAv2 types come from the annotations
    assert [item["question_id"] for item in weighted] == ["10", "10", "10", "20"]


def test_unknown_file_kind(tmp_path):
    with pytest.raises(DatasetFormatError, match="cannot tell the dataset kind of .*data.parquet"):
        open_dataset(tmp_path / "data.parquet")
    odd = tmp_path / "odd.json"
    odd.write_text('{"something": 1}')
    with pytest.raises(DatasetFormatError, match="odd.json: JSON is none of"):
        open_dataset(odd)


# ------------------------------------------------------------------------------- shapes folders


def test_shapes_split_folder_opens_for_both_tasks(tmp_path):
    folder = write_split(tmp_path, "test", 4, ShapesConfig(image_size=32), progress=False)
    captions = open_dataset(folder, transform=to_tensor)
    assert len(captions) == 4 and captions[0]["image_id"] == "test_000000"
    vqa = open_dataset(folder, transform=to_tensor, task="vqa")
    assert len(vqa) >= 12 and len(vqa[0]["answers"]) == 10
    assert detect_kind(folder / "coco_captions.json") == "json"
    assert len(open_dataset(folder / "coco_captions.json")) == 4


def test_question_type_repeats_weigh_a_type_up(tmp_path):
    folder = write_split(tmp_path, "test", 12, ShapesConfig(image_size=32), progress=False)
    plain = open_dataset(folder, task="vqa")
    kinds = [r.question_type for r in plain.records]
    assert set(kinds) == {"count", "color", "shape", "position", "exists"}
    weighted = open_dataset(folder, task="vqa", question_type_repeats={"position": 3, "color": 2})
    expected = len(kinds) + 2 * kinds.count("position") + kinds.count("color")
    assert len(weighted) == expected
    ids = [r.question_id for r in weighted.records]
    for record in plain.records:  # every question kept; position ones three times, colour twice
        assert ids.count(record.question_id) == {"position": 3, "color": 2}.get(record.question_type, 1)
    with pytest.raises(DatasetFormatError, match=r"no question of type 'postion' to repeat; types present: \['color',"):
        open_dataset(folder, task="vqa", question_type_repeats={"postion": 2})
    with pytest.raises(ValueError, match=r"question_type_repeats\['position'\] must be a whole number >= 1, got 0"):
        open_dataset(folder, task="vqa", question_type_repeats={"position": 0})
    with pytest.raises(ValueError, match="caption dataset has no question types to weigh"):
        open_dataset(folder, question_type_repeats={"position": 2})


# ------------------------------------------------------------------------- bad images, counting


def test_bad_images_are_skipped_and_counted(tmp_path, images):
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "img/red.png", "caption": "r"},
            {"image": "img/bad.png", "caption": "corrupt"},
            {"image": "img/missing.png", "caption": "missing"},
            {"image": "img/blue.png", "caption": "b"},
        ],
    )
    dataset = open_dataset(manifest, transform=to_tensor)
    assert isinstance(dataset[1], BadImage) and "bad.png" in dataset[1].source
    counter = BadImageCounter()
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_skip_bad)
    batches = list(counter.track(loader))
    assert [b["text"] for b in batches] == [["r"], ["b"]]
    assert batches[0]["image"].shape == (1, 3, 8, 8)
    assert (counter.bad, counter.seen) == (2, 4)
    summary = counter.summary()
    assert summary.startswith("skipped 2 of 4 images (50.00%)") and "missing.png (file not found)" in summary


def test_bad_images_counted_from_dataloader_workers(tmp_path, images):
    rows = [{"image": f"img/{name}.png", "caption": name} for name in ("red", "bad", "green", "missing", "blue")]
    dataset = open_dataset(_write_jsonl(tmp_path / "m.jsonl", rows), transform=to_tensor)
    counter = BadImageCounter()
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    texts = [t for batch in counter.track(loader) for t in batch["text"]]
    assert texts == ["red", "green", "blue"]
    assert (counter.bad, counter.seen) == (2, 5)


def test_count_limit_stops_with_the_bad_files_named(tmp_path, images):
    rows = [{"image": "img/bad.png", "caption": "x"}, {"image": "img/red.png", "caption": "y"}]
    dataset = open_dataset(_write_jsonl(tmp_path / "m.jsonl", rows), transform=to_tensor)
    counter = BadImageCounter(max_bad_images=0)
    expected = r"1 of 2 images were unreadable, above max_bad_images=0. Last bad files: .*bad.png"
    with pytest.raises(BadImageLimitError, match=expected):
        list(counter.track(DataLoader(dataset, batch_size=2, collate_fn=collate_skip_bad)))


def test_fraction_limit_waits_for_min_seen():
    def batch(good, bad):
        bad_images = [BadImage(f"f{k}.png", "corrupt") for k in range(bad)]
        return {"image_id": [str(k) for k in range(good)], "bad_images": bad_images}

    counter = BadImageCounter(max_bad_images=0.1, min_seen=20)
    counter.update(batch(good=5, bad=5))  # 50% bad, but only 10 seen: keep going
    counter.update(batch(good=40, bad=0))  # 5 of 50 = 10%: not above
    with pytest.raises(BadImageLimitError, match="6 of 51 images"):
        counter.update(batch(good=0, bad=1))


def test_counter_validates_its_limit():
    with pytest.raises(ValueError, match="fraction must be in"):
        BadImageCounter(max_bad_images=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        BadImageCounter(max_bad_images=-1)
    assert BadImageCounter().summary() == "no bad images among 0"


def test_collate_stacks_tensors_lists_the_rest_and_handles_all_bad():
    items = [
        {"image": torch.zeros(3, 2, 2), "question": "q1", "answers": ["a"], "image_id": "1"},
        BadImage("x.png", "corrupt"),
        None,
        {"image": torch.ones(3, 2, 2), "question": "q2", "answers": ["b", "c"], "image_id": "2"},
    ]
    batch = collate_skip_bad(items)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["image"][1].sum() == 12
    assert batch["answers"] == [["a"], ["b", "c"]]
    assert [b.source for b in batch["bad_images"]] == ["x.png", "<unknown>"]
    assert collate_skip_bad([BadImage("y.png", "gone")]) == {"bad_images": [BadImage("y.png", "gone")]}


# ------------------------------------------------------------------------------ webdataset shards


def _write_shard(path, samples):
    """samples: (key, {extension: bytes}) in order, like img2dataset writes them."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _caption_sample(key, colour):
    meta = json.dumps({"key": key, "caption": f"{colour} (json)", "status": "success"}).encode()
    return key, {"jpg": _png_bytes(COLOURS[colour]), "txt": f"a {colour} picture".encode(), "json": meta}


@pytest.fixture
def shards(tmp_path):
    """Four shards of three samples each; shard 1 holds a corrupt image."""
    colours = list(COLOURS)
    for shard in range(4):
        samples = [_caption_sample(f"{shard:05d}{k:04d}", colours[k]) for k in range(3)]
        if shard == 1:
            samples[1] = (samples[1][0], {"jpg": b"not a jpeg", "txt": b"broken"})
        _write_shard(tmp_path / f"shards-{shard:06d}.tar", samples)
    return tmp_path


def test_shards_stream_captions_and_skip_bad(shards):
    spec = str(shards / "shards-{000000..000003}.tar")
    assert detect_kind(spec) == "webdataset" and len(expand_shards(spec)) == 4
    dataset = open_dataset(spec, transform=to_tensor)
    assert isinstance(dataset, ShardDataset)
    counter = BadImageCounter()
    batches = list(counter.track(DataLoader(dataset, batch_size=4, collate_fn=collate_skip_bad)))
    items = [(i, t) for b in batches for i, t in zip(b["image_id"], b["text"])]
    assert len(items) == 11 and items[0] == ("000000000", "a red picture")
    assert (counter.bad, counter.seen) == (1, 12)
    assert "shards-000001.tar:000010001.jpg" in counter.summary()


def test_shards_split_across_workers_and_ranks(shards, monkeypatch):
    dataset = open_dataset(shards, transform=to_tensor)  # a folder of shards
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    ids = [i for batch in loader for i in batch["image_id"]]
    assert len(ids) == 11 and len(set(ids)) == 11, "each sample exactly once across workers"
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append({item["image_id"] for item in dataset if isinstance(item, dict)})
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 11
    monkeypatch.setenv("WORLD_SIZE", "5")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DatasetFormatError, match="4 shards cannot be split across 5 ranks"):
        list(dataset)


def test_training_shuffles_per_epoch_reproducibly(shards):
    dataset = open_dataset(shards, train=True, shuffle_buffer=5, seed=1)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append([item["image_id"] for item in dataset if isinstance(item, dict)])
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) == 11


@pytest.mark.parametrize(
    ("keep", "complete_samples", "reason"),
    [
        (5120, 1, "no end-of-archive marker"),  # cut at a member boundary: tarfile alone would not notice
        (9116, 2, "unreadable tar shard"),  # cut inside the end blocks
        (3500, 0, "no end-of-archive marker"),  # cut inside a header: the last complete sample is dropped too
        (3624, 1, "unexpected end of data"),  # cut inside a member's data
    ],
)
def test_truncated_shard_is_counted_not_fatal(tmp_path, keep, complete_samples, reason):
    whole = tmp_path / "whole.tar"
    _write_shard(whole, [_caption_sample(f"{k:09d}", "red") for k in range(3)])
    data = whole.read_bytes()
    assert len(data) == 10240  # one 20-block tar record
    (tmp_path / "cut.tar").write_bytes(data[:keep])
    whole.unlink()
    items = list(open_dataset(tmp_path / "cut.tar"))
    assert isinstance(items[-1], BadImage) and reason in items[-1].reason
    assert len(items) == complete_samples + 1
    assert all(isinstance(item, dict) and item["text"] == "a red picture" for item in items[:-1])


def test_vqa_shards_read_the_json(tmp_path):
    meta = json.dumps({"question": "what color?", "answers": ["green"], "question_id": 4}).encode()
    _write_shard(tmp_path / "vqa-0.tar", [("k0", {"png": _png_bytes(COLOURS["green"]), "json": meta})])
    (item,) = list(open_dataset(tmp_path / "vqa-0.tar", transform=to_tensor, task="vqa"))
    assert (item["question"], item["answers"], item["question_id"]) == ("what color?", ["green"], "4")
    assert _colour_of(item) == COLOURS["green"]
    (missing,) = list(open_dataset(tmp_path / "vqa-0.tar", task="caption"))
    assert isinstance(missing, BadImage) and "no caption" in missing.reason


def test_shards_written_by_webdataset_tarwriter(tmp_path):
    """img2dataset writes its shards with webdataset's TarWriter: read those the same way."""
    import webdataset

    with webdataset.TarWriter(str(tmp_path / "wds-000000.tar")) as writer:
        for k, colour in enumerate(COLOURS):
            key = f"{k:09d}"
            sample = {"__key__": key, "png": _png_bytes(COLOURS[colour]), "txt": f"a {colour} one", "json": {"key": key}}
            writer.write(sample)
    items = list(open_dataset(tmp_path / "wds-000000.tar", transform=to_tensor))
    expected = [("000000000", "a red one"), ("000000001", "a green one"), ("000000002", "a blue one")]
    assert [(i["image_id"], i["text"]) for i in items] == expected
    assert _colour_of(items[2]) == COLOURS["blue"]


def test_missing_shards_are_reported(tmp_path):
    with pytest.raises(DatasetFormatError, match="3 of 3 shards not found"):
        open_dataset(str(tmp_path / "s-{0..2}.tar"))


def test_shard_items_hold_only_our_fields(tmp_path, shards):
    (caption,) = [i for i in open_dataset(shards / "shards-000000.tar") if i["image_id"] == "000000000"]
    assert set(caption) == {"image", "text", "image_id"}  # none of webdataset's "__key__"/"__url__"
    meta = json.dumps({"question": "what color?", "answers": ["red"]}).encode()
    _write_shard(tmp_path / "vqa.tar", [("k0", {"png": _png_bytes(COLOURS["red"]), "json": meta})])
    (vqa,) = list(open_dataset(tmp_path / "vqa.tar", task="vqa"))
    assert set(vqa) == {"image", "question", "answers", "image_id", "question_id"} and vqa["question_id"] == "k0"


def test_damaged_shard_does_not_leak_into_the_next(tmp_path):
    """A damaged shard loses its damaged sample (webdataset alone would pass it on, part-read) and the next shard
    is read whole."""
    _write_shard(tmp_path / "a.tar", [_caption_sample(f"a{k:08d}", "red") for k in range(3)])
    (tmp_path / "a.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:4610])  # in the 2nd sample's .txt data
    _write_shard(tmp_path / "b.tar", [_caption_sample(f"b{k:08d}", "blue") for k in range(2)])
    items = list(ShardDataset([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], transform=to_tensor))
    assert [i["image_id"] if isinstance(i, dict) else "bad" for i in items] == ["a00000000", "bad", "b00000000", "b00000001"]
    assert all(_colour_of(i) == COLOURS["blue"] for i in items[2:])


def test_shards_are_opened_as_local_files_only(tmp_path, monkeypatch):
    """webdataset's own opener runs "pipe:" names as shell commands; ours opens a file of that name or reports it."""
    monkeypatch.chdir(tmp_path)
    (item,) = list(ShardDataset([f"pipe:touch {tmp_path / 'ran'}"]))
    assert isinstance(item, BadImage) and "unreadable tar shard" in item.reason and "No such file" in item.reason
    assert not (tmp_path / "ran").exists()


def test_shard_patterns_use_webdatasets_expansion(shards, monkeypatch):
    both = expand_shards(f"{shards}/shards-{{000000..000001}}.tar::{shards}/shards-000003.tar")
    assert [s[-10:] for s in both] == ["000000.tar", "000001.tar", "000003.tar"]
    monkeypatch.setenv("WDS_SPLIT", "shards-000002")
    assert expand_shards(f"{shards}/${{SPLIT}}.tar") == [f"{shards}/shards-000002.tar"]
    monkeypatch.delenv("WDS_SPLIT")
    with pytest.raises(DatasetFormatError, match=r"environment variable WDS_NAME, which is not set"):
        expand_shards(f"{shards}/${{SPLIT}}.tar")


def test_training_across_workers_is_reproducible(shards):
    dataset = open_dataset(shards, train=True, shuffle_buffer=4, seed=2)

    def epoch_order(epoch):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
        return [i for batch in loader for i in batch.get("image_id", [])]

    first = epoch_order(3)
    assert first == epoch_order(3) and first != epoch_order(4)
    assert len(first) == len(set(first)) == 11


def test_training_shuffle_buffer_mixes_shards(shards):
    def shard_runs(shuffle_buffer):  # how many runs of consecutive samples from one shard
        dataset = open_dataset(shards, train=True, shuffle_buffer=shuffle_buffer, seed=0)
        order = [item["image_id"][:5] for item in dataset if isinstance(item, dict)]  # "00001": shard 1
        return sum(1 for k in range(len(order)) if k == 0 or order[k] != order[k - 1])

    assert shard_runs(1) == 4  # no buffer: shard by shard (in a shuffled shard order)
    assert shard_runs(100) > 4
