"""Dataset-level evaluation on a tiny random model: the plumbing is real, the numbers are not (except with oracles)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.data.collate import Stage2Collate
from blip2.data.datasets import open_dataset
from blip2.data.feature_cache import (
    FeatureCache,
    cache_features,
    encoder_identity,
    write_feature_cache,
)
from blip2.data.records import DatasetFormatError
from blip2.demo.shapes import ShapesConfig, generate
from blip2.errors import InputError
from blip2.eval import run_vqa
from blip2.eval.caption_metrics import evaluate_captions
from blip2.eval.evaluate import evaluate
from blip2.eval.retrieval_metrics import recall_at_k
from blip2.eval.run_caption import evaluate_captioning
from blip2.eval.run_grounding import evaluate_grounding
from blip2.eval.run_retrieval import (
    evaluate_retrieval,
    recall_ceiling,
    retrieval_scores,
)
from blip2.eval.run_vqa import evaluate_vqa_task, question_types
from blip2.eval.vqa_metrics import evaluate_vqa
from blip2.factory import build
from blip2.models.losses import prompt_spread, text_losses
from blip2.pipeline import Blip2Pipeline

CHEAP_METRICS = ("Bleu", "ROUGE_L", "CIDEr")  # METEOR starts a JVM with a 60 MB table (~10 s): tested in test_captioning



@pytest.fixture
def make_model(tiny_parts, randomize):
    """``make_model(stage2=True)``: a pipeline on tiny random parts (OPT LLM; stage 1: none)."""

    def make(stage2: bool = True, seed: int = 0):
        vision_dir, llm_dir = tiny_parts("opt" if stage2 else None)
        qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
                                num_query_tokens=4, embed_dim=16, init_from=None)
        llm = LLMConfig(kind="hf", path=str(llm_dir)) if stage2 else None
        torch.manual_seed(seed)
        pipe = Blip2Pipeline.from_parts(
            build(Blip2Config(VisionConfig(kind="hf", path=str(vision_dir)), qformer, llm), init_qformer=False))
        model = pipe.model
        for offset, part in enumerate([model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head]):
            randomize(part, seed + 2 + offset)
        if model.llm_proj is not None:
            randomize(model.llm_proj, seed + 9)
        model.eval()
        return pipe

    return make


@pytest.fixture
def split(tmp_path):
    """A 12-image shapes-world test split (48 px images)."""
    return generate(tmp_path / "shapes", {"test": 12}, ShapesConfig(image_size=48), progress=False)["test"]


def records_of(split, task="caption"):
    return open_dataset(split, task=task).records


def count_encoded_images(model, monkeypatch) -> list[int]:
    """Record how many images each call of the frozen encoder gets."""
    calls: list[int] = []
    encode = model.model.image_features

    def counting(pixel_values):
        calls.append(len(pixel_values))
        return encode(pixel_values)

    monkeypatch.setattr(model.model, "image_features", counting)
    return calls


# --------------------------------------------------------------------------------------------- captioning


def test_captioning_scores_the_models_captions_and_writes_a_report(make_model, split, tmp_path):
    model = make_model()
    out = tmp_path / "out"
    results = evaluate("caption", model, split, out_dir=out, limit=7, batch_size=3, metrics=CHEAP_METRICS, progress=False)

    records = records_of(split)[:7]
    expected = model.caption([r.image for r in records])  # the public API, image by image from the files
    assert [p["caption"] for p in results["predictions"]] == expected
    assert [p["image_id"] for p in results["predictions"]] == [r.image_id for r in records]
    assert results["num_images"] == results["num_scored"] == 7 and results["skipped_images"] == 0
    references = {r.image_id: list(r.captions) for r in records}
    assert results["metrics"] == evaluate_captions(dict(zip(references, expected)), references, metrics=CHEAP_METRICS)
    assert set(results["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}

    written = json.loads((out / "caption_predictions.json").read_text())
    assert written == results["predictions"]
    report = json.loads((out / "caption.json").read_text())
    assert "predictions" not in report and report["metrics"]["CIDEr"] == pytest.approx(results["metrics"]["CIDEr"])
    assert "| metrics/Bleu_4 |" in (out / "caption.md").read_text()


def test_captioning_with_a_prompt_and_with_a_stage1_model(make_model, split):
    model = make_model()
    images = [r.image for r in records_of(split)[:2]]
    prompted = evaluate_captioning(model, split, limit=2, prompt="w1 w2", metrics=CHEAP_METRICS, progress=False)
    assert [p["caption"] for p in prompted["predictions"]] == model.caption(images, prompt="w1 w2", max_new_tokens=30)

    stage1 = make_model(stage2=False)
    results = evaluate_captioning(stage1, split, limit=3, batch_size=2, metrics=CHEAP_METRICS, max_new_tokens=5,
                                  progress=False)
    images = [r.image for r in records_of(split)[:3]]
    assert [p["caption"] for p in results["predictions"]] == stage1.qformer_caption(images, max_new_tokens=5)
    with pytest.raises(ValueError, match="stage-1 model captions with its Q-Former, which takes no prompt"):
        evaluate_captioning(stage1, split, limit=1, prompt="a photo of", progress=False)


def test_unreadable_images_are_skipped_and_counted(make_model, split, tmp_path):
    manifest = tmp_path / "captions.jsonl"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = [{"image": str(r.image), "captions": list(r.captions), "image_id": r.image_id} for r in records_of(split)[:3]]
    rows.insert(1, {"image": str(broken), "captions": ["a red circle"], "image_id": "broken"})
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = evaluate_captioning(make_model(), manifest, metrics=CHEAP_METRICS, progress=False)
    assert results["skipped_images"] == 1 and results["num_images"] == 3
    assert "broken" not in [p["image_id"] for p in results["predictions"]]


# ---------------------------------------------------------------------------------------------------- VQA


def test_vqa_answers_every_question_with_the_papers_prompt_and_scores_per_type(make_model, split, monkeypatch, tmp_path):
    model = make_model()
    records = records_of(split, "vqa")[:9]
    expected = model.answer([r.image for r in records], [r.question for r in records], max_new_tokens=10)
    calls = count_encoded_images(model, monkeypatch)
    results = evaluate("vqa", model, split, out_dir=tmp_path, limit=9, batch_size=4, progress=False)

    assert results["prompt_template"] == "Question: {} Answer:"
    assert [p["answer"] for p in results["predictions"]] == expected
    assert [p["question_id"] for p in results["predictions"]] == [r.question_id for r in records]
    # each batch encodes each of its distinct images once (questions about one image sit together)
    batches = [records[start:start + 4] for start in range(0, 9, 4)]
    assert calls == [len({r.image_id for r in batch}) for batch in batches]
    raw = {row["question_id"]: row for row in json.loads((split / "vqa.json").read_text())}
    references = {r.question_id: {"answers": raw[r.question_id]["answers"], "question_type": raw[r.question_id]["question_type"]}
                  for r in records}
    assert results["metrics"] == evaluate_vqa(dict(zip(references, expected)), references)
    assert set(results["metrics"]["per_question_type"]) <= {"count", "color", "shape", "position", "exists"}
    assert json.loads((tmp_path / "vqa_predictions.json").read_text()) == results["predictions"]


def test_vqa_oracle_scores_one_and_questions_without_answers_get_predictions_only(make_model, tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 20, 20)).save(image)
    questions = [{"image": "a.png", "question": "what color is it?", "answers": ["red"] * 10, "question_id": 7},
                 {"image": "a.png", "question": "how many?", "answers": ["two"] * 9 + ["3"], "question_id": 8}]
    data = tmp_path / "vqa.json"
    data.write_text(json.dumps(questions))
    oracle = {"Question: what color is it? Answer:": "Red.", "Question: how many? Answer:": "2"}
    monkeypatch.setattr(run_vqa, "texts_from_features", lambda model, features, prompts, options: [oracle[p] for p in prompts])
    results = evaluate_vqa_task(make_model(), data, progress=False, normalize="always")
    assert results["metrics"]["overall"] == 1.0
    # the official default leaves ten unanimous "red" unnormalised: "Red." misses them
    assert evaluate_vqa_task(make_model(), data, progress=False)["metrics"]["overall"] == 0.5
    assert results["predictions"] == [{"question_id": 7, "answer": "Red."}, {"question_id": 8, "answer": "2"}]

    data.write_text(json.dumps([{k: v for k, v in q.items() if k != "answers"} for q in questions]))
    unanswered = evaluate_vqa_task(make_model(), data, progress=False)
    assert unanswered["metrics"] == {} and len(unanswered["predictions"]) == 2


def test_the_vqa_blind_prior_answers_each_type_with_its_most_common_training_answer(make_model, tmp_path, monkeypatch):
    for name, rows in (("train", [("what color is it?", "red", "color"), ("what color is this?", "blue", "color"),
                                  ("what color is that?", "red", "color"), ("how many shapes?", "two", None)]),
                       ("test", [("what color is the cat?", "red", "color"), ("what color is the dog?", "blue", "color"),
                                 ("how many shapes?", "two", "count"), ("how many cats?", "one", "count")])):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 40)).save(tmp_path / name / "a.png")
        (tmp_path / name / "vqa.json").write_text(json.dumps([
            {"image": "a.png", "question": q, "answers": [a] * 10, "question_id": i,
             **({"question_type": t} if t else {})} for i, (q, a, t) in enumerate(rows)]))
    assert run_vqa.blind_prior(tmp_path / "train") == {"color": "red", "how many shapes?": "two"}  # no type: the opening
    monkeypatch.setattr(run_vqa, "texts_from_features", lambda model, features, prompts, options: ["no"] * len(prompts))
    results = evaluate_vqa_task(make_model(), tmp_path / "test", prior=tmp_path / "train", progress=False)
    assert results["blind_prior"]["overall"] == 0.25  # "red" for both colours; no training answer for "count"
    assert results["metrics"]["overall"] == 0.0


def test_question_types_come_from_the_raw_file(split, tmp_path):
    types = question_types(split)
    raw = json.loads((split / "vqa.json").read_text())
    assert types == {row["question_id"]: {"question_type": row["question_type"]} for row in raw}
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": 5, "answers": [], "question_type": "what color", "answer_type": "other"}]}))
    expected = {"5": {"question_type": "what color", "answer_type": "other"}}
    assert question_types(tmp_path / "questions.json", annotations) == expected


# ---------------------------------------------------------------------------------------------- retrieval


def test_recall_ceiling_of_hand_made_duplicate_captions():
    # image 0: "x", "y"; image 1: "x"; image 2: "x", "z"
    texts, txt2img = ["x", "y", "x", "x", "z"], [0, 0, 1, 2, 2]
    ceiling = recall_ceiling(texts, txt2img, 3, ks=(1, 2, 5))
    # t2i: the three copies of "x" share one ranking, so at R@1 one of them is right; "y" and "z" always can be
    assert ceiling["t2i_r1"] == pytest.approx(3 / 5)
    assert ceiling["t2i_r2"] == pytest.approx(4 / 5)
    assert ceiling["t2i_r5"] == 1.0
    # i2t: images 0 and 2 have a string of their own; image 1's "x" ties with two copies owned elsewhere
    assert ceiling["i2t_r1"] == pytest.approx(2 / 3) and ceiling["i2t_r2"] == pytest.approx(2 / 3)
    assert ceiling["i2t_r5"] == 1.0
    assert ceiling["mean"] == pytest.approx((ceiling["i2t_mean"] + ceiling["t2i_mean"]) / 2)
    assert set(ceiling) == set(recall_at_k(torch.eye(3)[:, txt2img], txt2img, [[0, 1], [2], [3, 4]], ks=(1, 2, 5)))
    # a string twice on one image: both copies can be right at once
    assert recall_ceiling(["x", "x", "x"], [0, 0, 1], 2, ks=(1,))["t2i_r1"] == pytest.approx(2 / 3)
    assert recall_ceiling(["a", "b", "c"], [0, 1, 2], 3)["mean"] == 1.0


def test_rerank_score_is_itm_plus_itc_on_the_itc_top_k(make_model):
    model = make_model(stage2=False)
    texts = ["a red circle", "two blue squares", "a green star on the left", "an image of a cross", "yellow", "purple"]
    with torch.no_grad():
        features = model.model.image_features(torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)))  # [5, N, D]
        itc, i2t, t2i = retrieval_scores(model, features, texts, k=2, batch_size=4)
        image_embeds = model.model.image_embeds_itc(model.model.query_states(features).queries)  # [5, Q, E]
        text_embeds = model.model.text_embeds_itc(*model.tokenize_text(texts))  # [6, E]
        torch.testing.assert_close(itc, torch.einsum("iqe,te->iqt", image_embeds, text_embeds).amax(1))
        for image in range(5):
            top = itc[image].topk(2).indices
            ids, mask = model.tokenize_text([texts[t] for t in top])
            itm = model.model.itm_logits(features[image].expand(2, -1, -1), ids, mask)[:, 1]
            torch.testing.assert_close(i2t[image, top], itm + itc[image, top], atol=1e-5, rtol=1e-5)
            rest = [t for t in range(6) if t not in top]
            assert i2t[image, rest].max() < i2t[image, top].min()  # re-ranked candidates come first
            assert i2t[image, rest].argsort().tolist() == itc[image, rest].argsort().tolist()  # the rest keep ITC order
        for text in range(6):
            top = itc[:, text].topk(2).indices
            ids, mask = model.tokenize_text([texts[text]] * 2)
            itm = model.model.itm_logits(features[top], ids, mask)[:, 1]
            torch.testing.assert_close(t2i[text, top], itm + itc[top, text], atol=1e-5, rtol=1e-5)


def test_retrieval_encodes_each_image_once_and_reports_itc_itm_and_ceiling(make_model, split, monkeypatch, tmp_path):
    model = make_model(stage2=False)
    calls = count_encoded_images(model, monkeypatch)
    results = evaluate("retrieval", model, split, out_dir=tmp_path, k=4, limit=10, batch_size=4, progress=False)
    assert calls == [4, 4, 2]  # the frozen encoder ran once per image; ITM re-used the features
    assert results["num_images"] == 10 and results["num_texts"] == 50  # 5 captions per shapes image
    assert results["num_distinct_texts"] == len({c for r in records_of(split)[:10] for c in r.captions})
    keys = {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"i2t_mean", "t2i_mean", "mean"}
    for name in ("itc", "itc_itm", "ceiling"):
        assert set(results[name]) == keys
        assert all(0.0 <= value <= 1.0 for value in results[name].values())
    for key in keys:  # nothing beats the ceiling
        assert results["itc"][key] <= results["ceiling"][key] + 1e-6
        assert results["itc_itm"][key] <= results["ceiling"][key] + 1e-6
    predictions = json.loads((tmp_path / "retrieval_predictions.json").read_text())
    assert len(predictions["image_to_text"]) == 10 and len(predictions["text_to_image"]) == 50
    assert len(predictions["image_to_text"][0]["retrieved"]) == 5

    one = evaluate_retrieval(model, split, k=4, limit=10, caption_index=2, progress=False)
    assert one["num_texts"] == 10
    with pytest.raises(DatasetFormatError, match="caption_index=7 does not exist"):
        evaluate_retrieval(model, split, limit=2, caption_index=7, progress=False)


def test_retrieval_from_a_feature_cache_matches_and_never_runs_the_encoder(make_model, split, tmp_path, monkeypatch):
    model = make_model(stage2=False)
    direct = evaluate_retrieval(model, split, k=3, limit=6, progress=False)
    identity = encoder_identity(model.cfg.vision, model.preprocess, model.model.vision)
    cache = cache_features(model.model.image_features, identity, model.preprocess, [str(split)], tmp_path / "cache",
                           dtype="float32")

    def refuse(pixel_values):
        raise AssertionError("the encoder ran although features were cached")

    monkeypatch.setattr(model.model, "image_features", refuse)
    cached = evaluate_retrieval(model, split, k=3, limit=6, features=cache, progress=False)
    for name in ("itc", "itc_itm"):
        assert cached[name] == pytest.approx(direct[name])


def oracle_manifest(tmp_path, captions: list[list[str]]):
    """Noise images with the given captions, and a feature cache whose features are one-hot image identities [1, n]."""
    rows = []
    for index, texts in enumerate(captions):
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(tmp_path / f"{index}.png")
        rows.append({"image": f"{index}.png", "captions": texts, "image_id": f"img{index}"})
    manifest = tmp_path / "oracle.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    n = len(captions)
    batch = {"image": torch.eye(n)[:, None, :], "image_id": [row["image_id"] for row in rows]}  # [n, 1, n]
    write_feature_cache(lambda x: x, [batch], tmp_path / "oracle-cache", identity={}, dtype="float32")
    return manifest, FeatureCache(tmp_path / "oracle-cache")


def install_oracle(model, monkeypatch, captions: list[list[str]]):
    """Scorers that know the answer: a text's embedding weights its owners (most copies first) 1, 0.9, 0.8, ..."""
    n = len(captions)
    weights: dict[str, torch.Tensor] = {}
    for text in {t for texts in captions for t in texts}:
        owners = sorted(range(n), key=lambda i: -captions[i].count(text))
        owners = [i for i in owners if text in captions[i]]
        weights[text] = torch.zeros(n).index_put_((torch.tensor(owners),), 1.0 - 0.1 * torch.arange(len(owners)))

    def text_weights(ids, mask):
        texts = [model.qformer_tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True) for row, row_mask in zip(ids, mask)]
        return torch.stack([weights[text] for text in texts])  # [B, n]

    monkeypatch.setattr(model.model, "query_states", lambda features: SimpleNamespace(queries=features))  # [B, 1, n]
    monkeypatch.setattr(model.model, "image_embeds_itc", lambda queries: queries)
    monkeypatch.setattr(model.model, "text_embeds_itc", lambda ids, mask: F.normalize(text_weights(ids, mask), dim=-1))
    monkeypatch.setattr(model.model, "itm_logits", lambda features, ids, mask: torch.stack(
        [torch.zeros(len(ids)), (features[:, 0] * text_weights(ids, mask)).sum(-1)], dim=1))  # [B, 2]


def test_a_perfect_oracle_reaches_recall_one(make_model, tmp_path, monkeypatch):
    model = make_model(stage2=False)
    captions = [["a red circle", "a round red shape"], ["two blue squares"], ["a green star", "one star"], ["a cross"]]
    manifest, cache = oracle_manifest(tmp_path, captions)
    install_oracle(model, monkeypatch, captions)
    results = evaluate_retrieval(model, manifest, k=2, features=cache, progress=False)
    assert results["itc"] == pytest.approx({key: 1.0 for key in results["itc"]})
    assert results["itc_itm"] == pytest.approx({key: 1.0 for key in results["itc_itm"]})
    assert results["ceiling"]["mean"] == 1.0


def test_a_perfect_oracle_on_duplicate_captions_reaches_exactly_the_ceiling(make_model, tmp_path, monkeypatch):
    model = make_model(stage2=False)
    captions = [["a red circle", "one shape"], ["a red circle"], ["a red circle", "a green star"], ["a cross"]]
    manifest, cache = oracle_manifest(tmp_path, captions)
    install_oracle(model, monkeypatch, captions)
    results = evaluate_retrieval(model, manifest, k=3, features=cache, progress=False)
    assert results["ceiling"]["t2i_r1"] == pytest.approx(4 / 6) and results["ceiling"]["i2t_r1"] == pytest.approx(3 / 4)
    assert results["itc"] == pytest.approx(results["ceiling"])
    assert results["itc_itm"] == pytest.approx(results["ceiling"])


def test_bad_arguments_are_refused(make_model, split):
    model = make_model(stage2=False)
    with pytest.raises(ValueError, match="unknown evaluation task 'captions'"):
        evaluate("captions", model, split)
    with pytest.raises(ValueError, match="limit must be a positive number"):
        evaluate_retrieval(model, split, limit=0, progress=False)
    with pytest.raises(InputError, match="stage-1 model"):
        evaluate_vqa_task(model, split, limit=1, progress=False)


# ---------------------------------------------------------------------------------------------- grounding


def test_grounding_scores_each_caption_under_its_own_and_the_previous_images_prompt(make_model, split, tmp_path):
    model = make_model()
    results = evaluate("grounding", model, split, out_dir=tmp_path / "out", limit=5, batch_size=3, progress=False)
    records = records_of(split)[:5]
    rows = results["predictions"]
    assert [(r["image_id"], r["text"]) for r in rows] == [(rec.image_id, c) for rec in records for c in rec.captions]
    assert results["num_images"] == 5 and results["num_texts"] == 25 and results["skipped_images"] == 0

    with torch.no_grad():
        features = model.model.image_features(model.pixel_values([r.image for r in records]))  # [5, N, D]
        prompts = model.model.soft_prompt(features)  # [5, Q, H]
    collate = Stage2Collate(model.llm_tokenizer, model.cfg.llm.max_text_len)

    def loss(prompt_row: int, text: str) -> float:
        batch = collate([{"image": torch.zeros(1), "image_id": "x", "text": text}])
        with torch.no_grad():
            summed, tokens = text_losses(model.model, prompts[prompt_row:prompt_row + 1], batch)
        return float(summed / tokens)

    # image 3 is first in the second batch (3 images per batch): its "other" is image 2, carried over
    # image 0 is first in the first batch: its "other" is that batch's last, image 2
    for image, other in ((0, 2), (1, 0), (3, 2), (4, 3)):
        row = rows[image * 5 + 1]
        assert row["loss_own"] == pytest.approx(loss(image, row["text"]), rel=1e-4)
        assert row["loss_other"] == pytest.approx(loss(other, row["text"]), rel=1e-4)

    metrics = results["metrics"]
    assert metrics["gap"] == pytest.approx(metrics["loss_other"] - metrics["loss_own"])
    wins = sum((r["loss_own"] < r["loss_other"]) + 0.5 * (r["loss_own"] == r["loss_other"]) for r in rows)
    assert metrics["own_better"] == pytest.approx(wins / 25)
    assert metrics["prompt_spread"] == pytest.approx(float(prompt_spread(prompts)), rel=1e-5) and metrics["prompt_spread"] > 0
    report = json.loads((tmp_path / "out" / "grounding.json").read_text())
    assert report["metrics"] == pytest.approx(metrics) and "predictions" not in report
    assert len(json.loads((tmp_path / "out" / "grounding_predictions.json").read_text())) == 25

    one = evaluate_grounding(model, split, limit=4, caption_index=-1, progress=False)
    assert [r["text"] for r in one["predictions"]] == [rec.captions[-1] for rec in records[:4]]


def test_a_visual_prompt_that_ignores_the_image_has_no_grounding(make_model, split):
    model = make_model()
    with torch.no_grad():
        model.model.llm_proj.weight.zero_()  # the prompt is the projection's bias, the same for every image
    metrics = evaluate_grounding(model, split, limit=6, batch_size=4, progress=False)["metrics"]
    assert metrics["gap"] == 0.0 and metrics["own_better"] == 0.5 and metrics["prompt_spread"] == 0.0
    assert metrics["loss_own"] > 0


def test_grounding_refuses_what_it_cannot_measure(make_model, split):
    with pytest.raises(InputError, match="stage-1 model"):
        evaluate_grounding(make_model(stage2=False), split, limit=2, progress=False)
    with pytest.raises(ValueError, match="needs at least 2 readable images, got 1"):
        evaluate_grounding(make_model(), split, limit=1, progress=False)
    with pytest.raises(ValueError, match="needs batch_size >= 2"):
        evaluate_grounding(make_model(), split, limit=4, batch_size=1, progress=False)
    with pytest.raises(DatasetFormatError, match="caption_index=9 does not exist"):
        evaluate_grounding(make_model(), split, limit=2, caption_index=9, progress=False)
