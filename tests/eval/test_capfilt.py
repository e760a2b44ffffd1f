"""CapFilt on a tiny random model: synthetic captions, scores from the model's heads, the selection rule, the manifest."""

from __future__ import annotations

import json

import pytest
import torch

from blip2.data.datasets import open_dataset
from blip2.demo.shapes import ShapesConfig, generate
from blip2.eval.capfilt import Candidate, capfilt, select

SAMPLING = dict(do_sample=True, top_p=0.9)


@pytest.fixture
def split(tmp_path):
    """A 6-image shapes-world split (48 px images, 5 captions each)."""
    return generate(tmp_path / "shapes", {"test": 6}, ShapesConfig(image_size=48), progress=False)["test"]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def everything(model, split, out, **kw):
    """CapFilt with no threshold and no cap: every candidate with its scores."""
    summary = capfilt(model, split, out, threshold=None, keep=None, batch_size=4, progress=False, **kw)
    return summary, read_rows(out)


def test_manifest_is_readable_and_scores_are_the_models_itc_and_itm(tiny_model, split, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "clean" / "capfilt.jsonl"
    summary, rows = everything(model, split, out, num_captions=2, max_new_tokens=8)
    originals = {r.image_id: r for r in open_dataset(split).records}
    reread = open_dataset(out).records
    assert [r.image_id for r in reread] == [row["image_id"] for row in rows] == list(originals)
    for record, row in zip(reread, rows):
        assert record.image == str(out.parent / row["image"]) and row["image"].startswith("../")
        assert list(record.captions) == row["captions"]
        assert len(row["captions"]) == len(row["sources"]) == len(row["itc"]) == len(row["itm"])
        assert row["itm"] == sorted(row["itm"], reverse=True)  # best first
        kept_originals = {c for c, s in zip(row["captions"], row["sources"]) if s == "original"}
        assert kept_originals == set(originals[row["image_id"]].captions)
        assert sum(s == "synthetic" for s in row["sources"]) <= 2
    row = rows[0]
    image = originals[row["image_id"]].image
    torch.testing.assert_close(model.itm(image, row["captions"]), torch.tensor(row["itm"]), atol=1e-5, rtol=1e-5)
    itc = torch.einsum("qe,te->qt", model.image_embeddings(image)[0], model.text_embeddings(row["captions"])).amax(0)
    torch.testing.assert_close(itc, torch.tensor(row["itc"]), atol=1e-5, rtol=1e-5)
    assert summary["images"] == summary["images_written"] == 6 and summary["captions_in"] == 30
    assert summary["kept"] == summary["captions_in"] + summary["synthetic"] and summary["dropped_originals"] == 0


def test_threshold_and_keep_are_respected_and_low_scoring_originals_dropped(tiny_model, split, tmp_path, capsys):
    model = tiny_model("opt")
    _, rows = everything(model, split, tmp_path / "all.jsonl", num_captions=3, max_new_tokens=8)
    original_scores = sorted(s for row in rows for s, src in zip(row["itm"], row["sources"]) if src == "original")
    threshold = original_scores[len(original_scores) // 2]  # half the originals fall below it

    summary = capfilt(model, split, tmp_path / "half.jsonl", num_captions=3, threshold=threshold, keep=None,
                      batch_size=4, progress=False, max_new_tokens=8)
    filtered = {row["image_id"]: row for row in read_rows(tmp_path / "half.jsonl")}
    low = 0
    for row in rows:  # the unfiltered candidates decide what must survive
        expected = [c for c, s in zip(row["captions"], row["itm"]) if s >= threshold]
        kept = filtered[row["image_id"]]["captions"] if row["image_id"] in filtered else []
        assert kept == expected
        low += sum(s < threshold for s, src in zip(row["itm"], row["sources"]) if src == "original")
    assert low == len(original_scores) // 2 == summary["dropped_originals"] > 0
    assert all(s >= threshold for row in filtered.values() for s in row["itm"])
    assert summary["images_dropped"] == 6 - len(filtered)
    assert "originals dropped" in capsys.readouterr().out

    capfilt(model, split, tmp_path / "top1.jsonl", num_captions=3, threshold=None, keep=1, batch_size=4,
            progress=False, max_new_tokens=8)
    best = {row["image_id"]: row["captions"][0] for row in rows}
    top1 = {row["image_id"]: row["captions"] for row in read_rows(tmp_path / "top1.jsonl")}
    assert top1 == {image_id: [caption] for image_id, caption in best.items()}


def test_selection_rule_by_itc_or_itm():
    candidates = [Candidate("a", "original", itc=0.9, itm=0.2), Candidate("b", "synthetic", itc=0.1, itm=0.8),
                  Candidate("c", "synthetic", itc=0.5, itm=0.6)]
    assert [c.text for c in select(candidates, "itm", 0.5, None)] == ["b", "c"]
    assert [c.text for c in select(candidates, "itc", None, 2)] == ["a", "c"]
    assert [c.text for c in select(candidates, "itc", 0.95, 2)] == []


def test_same_seed_same_manifest_other_seed_other_captions(tiny_model, split, tmp_path):
    model = tiny_model("opt")
    runs = {}
    for name, seed in (("first", 1), ("again", 1), ("other", 2)):
        everything(model, split, tmp_path / f"{name}.jsonl", num_captions=2, max_new_tokens=6, seed=seed, limit=3)
        runs[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert runs["first"] == runs["again"]
    assert runs["first"] != runs["other"]


def test_a_stage1_model_samples_with_its_qformer(tiny_model, split, tmp_path):
    model = tiny_model(None)
    summary, rows = everything(model, split, tmp_path / "s1.jsonl", num_captions=2, max_new_tokens=5, limit=2)
    images = [r.image for r in open_dataset(split).records[:2]]
    sampled = model.qformer_caption([image for image in images for _ in range(2)], batch_size=4, max_new_tokens=5,
                                    seed=0, **SAMPLING)
    for index, row in enumerate(rows):
        synthetic = {c for c, s in zip(row["captions"], row["sources"]) if s == "synthetic"}
        assert synthetic == {c for c in sampled[2 * index:2 * index + 2] if c}
    assert summary["synthetic"] > 0
    with pytest.raises(ValueError, match="takes no prompt"):
        capfilt(model, split, tmp_path / "x.jsonl", prompt="a photo of", progress=False)


def test_bad_rules_are_refused(tiny_model, split, tmp_path):
    model = tiny_model(None)
    with pytest.raises(ValueError, match="score must be one of"):
        capfilt(model, split, tmp_path / "x.jsonl", score="clip", progress=False)
    with pytest.raises(ValueError, match=r"threshold on itm must lie in \[0.0, 1.0\]"):
        capfilt(model, split, tmp_path / "x.jsonl", threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        capfilt(model, split, tmp_path / "x.jsonl", keep=0, progress=False)
    assert not (tmp_path / "x.jsonl").exists()
