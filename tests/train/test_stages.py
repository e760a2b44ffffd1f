"""The two stages end to end on tiny parts: recipes, the feature cache, collates, and a run through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY_QFORMER, tiny_recipe

from blip2.config import ConfigError
from blip2.data.collate import Stage1Collate, Stage2Collate
from blip2.data.datasets import open_dataset
from blip2.data.feature_cache import FeatureCache, cache_features, encoder_identity
from blip2.demo.run import RECIPES
from blip2.demo.shapes import generate
from blip2.factory import build
from blip2.io import read_safetensors
from blip2.models.losses import SpreadMeter, prompt_spread
from blip2.train.optim import scaled_param_groups
from blip2.train.recipe import Recipe
from blip2.train.stages import stage1_step, stage2_step

PAPER_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL_RECIPES = sorted([*RECIPES.glob("*.yaml"), *PAPER_RECIPES.glob("*.yaml")])
@pytest.fixture
def shapes_root(tmp_path):
    root = tmp_path / "shapes"
    generate(root, {"train": 16, "val": 0, "test": 6, "compositional": 0}, progress=False)
    return root


def test_training_from_the_cache_equals_training_from_images(tmp_path, tiny_parts, shapes_root):
    vision_dir, _ = tiny_parts(None)
    recipe = Recipe.from_dict(tiny_recipe(tmp_path, vision_dir, None, 1, shapes_root))
    parts = build(recipe.model)
    model = parts.model.train()
    identity = encoder_identity(recipe.model.vision, parts.preprocess, model.vision)
    for dtype, tolerance in (("float32", 1e-5), ("float16", 2e-2)):
        cache_features(model.image_features, identity, parts.preprocess, [str(shapes_root / "train")], tmp_path / dtype,
                       batch_size=5, dtype=dtype)
        collate = Stage1Collate(parts.qformer_tokenizer, 24)
        from_images = open_dataset(shapes_root / "train", transform=parts.preprocess.eval_transform(), train=True)
        from_cache = open_dataset(shapes_root / "train", transform=FeatureCache(tmp_path / dtype), train=True)
        losses = []
        for dataset in (from_images, from_cache):
            torch.manual_seed(0)  # dropout and the ITM negatives draw the same numbers
            losses.append({k: v.item() for k, v in stage1_step(model, collate([dataset[i] for i in range(8)])).items()})
        assert losses[0].keys() == {"loss", "itc", "itm", "itg"}
        for name in losses[0]:
            assert losses[1][name] == pytest.approx(losses[0][name], rel=tolerance, abs=tolerance), (dtype, name)


def test_stage2_reports_how_much_the_visual_prompt_depends_on_the_image(tmp_path, tiny_parts, shapes_root):
    vision_dir, llm_dir = tiny_parts("llama")
    parts = build(Recipe.from_dict(tiny_recipe(tmp_path, vision_dir, llm_dir, 2, shapes_root)).model)
    model = parts.model.eval()
    items = [{**item, "image": parts.preprocess.eval_transform()(item["image"])}
             for item in (open_dataset(shapes_root / "train")[i] for i in range(4))]
    out = stage2_step(model, Stage2Collate(parts.llm_tokenizer, 32)(items))
    assert out.keys() == {"loss", "prompt_spread"}
    assert out["loss"].requires_grad and not out["prompt_spread"].requires_grad  # logged, never minimised
    prompt = model.soft_prompt(model.image_features(torch.stack([item["image"] for item in items])))  # [4, Q, H]
    spread = float(out["prompt_spread"])
    assert spread == pytest.approx(float(prompt_spread(prompt)), rel=1e-5) and spread > 0
    same_image = prompt[:1].expand_as(prompt)  # every row the same: the prompt no longer depends on the image
    assert float(prompt_spread(same_image)) == 0.0
    assert float(prompt_spread(prompt[:1])) == 0.0  # a batch of one: 0, not NaN (the trainer stops on NaN)
    noise = torch.randn(256, 4, 64)  # rows independent of each other: the spread approaches 1
    assert float(prompt_spread(noise)) == pytest.approx(1.0, abs=0.02)
    meter = SpreadMeter()  # the same number over prompts that arrive batch by batch (blip2 eval grounding)
    for piece in (noise[:100] + 3.0, noise[100:101] + 3.0, noise[101:] + 3.0):
        meter.add(piece)
    assert meter.count == 256 and meter.value() == pytest.approx(float(prompt_spread(noise + 3.0)), rel=1e-6)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda path: path.name)
def test_every_recipe_parses_and_builds_with_tiny_stand_ins(path, tiny_parts):
    name = path.name
    recipe = yaml.safe_load(path.read_text())
    vision_dir, llm_dir = tiny_parts("t5" if "t5" in name else "opt")
    overrides = [f"model.vision={{kind: hf, path: {vision_dir}}}", f"model.qformer={json.dumps(TINY_QFORMER)}"]
    if recipe["model"].get("llm"):  # the recipe's own options (bos_before_image) kept
        overrides.append(f"model.llm={json.dumps({**recipe['model']['llm'], 'kind': 'hf', 'path': str(llm_dir)})}")
    loaded = Recipe.load(path, overrides)
    assert loaded.stage == recipe["stage"] and loaded.train.steps == recipe["train"]["steps"]
    model = build(loaded.model).model
    assert (model.llm is None) == (loaded.stage == 1)
    groups = scaled_param_groups(model, loaded.train.lr_scales)  # every lr_scales prefix names real parameters
    assert {g["lr_scale"] for g in groups} <= {1.0, *map(float, loaded.train.lr_scales.values())}


def test_overrides_and_recipes_read_exponent_numbers_as_numbers(tmp_path):
    """PyYAML alone reads ``1e-3`` as the string "1e-3"; a user typing --set train.lr=1e-3 means a number."""
    text = (RECIPES / "shapes_stage1.yaml").read_text().replace("lr: 3.0e-4", "lr: 3e-4")
    (tmp_path / "recipe.yaml").write_text(text)
    recipe = Recipe.load(tmp_path / "recipe.yaml", ["train.lr=1e-3", "train.weight_decay=5E-2", "train.steps=7"])
    assert recipe.train.lr == 1e-3 and recipe.train.weight_decay == 0.05 and recipe.train.steps == 7
    assert Recipe.load(tmp_path / "recipe.yaml").train.lr == 3e-4
    assert Recipe.load(tmp_path / "recipe.yaml", ["train.out_dir=runs/1e3"]).train.out_dir == "runs/1e3"


def test_question_type_repeats_need_questions():
    with pytest.raises(ConfigError, match="data.question_type_repeats weighs the questions of data.vqa, which is empty"):
        Recipe.load(RECIPES / "shapes_stage1.yaml", ["data.question_type_repeats={position: 3}"])
    with pytest.raises(ConfigError, match="data.question_type_repeats must be a mapping, got 'position'"):
        Recipe.load(RECIPES / "shapes_vqa.yaml", ["data.question_type_repeats=position"])
    with pytest.raises(ConfigError, match=r"data.question_type_repeats\['position'\] must be a whole number >= 1, got 0"):
        Recipe.load(RECIPES / "shapes_vqa.yaml", ["data.question_type_repeats={position: 0}"])
    with pytest.raises(ConfigError, match="data.question_type_repeats key 3 must be a string, got 3"):
        Recipe.load(RECIPES / "shapes_vqa.yaml", ["data.question_type_repeats={3: 2}"])
    recipe = Recipe.load(RECIPES / "shapes_vqa.yaml", ["data.question_type_repeats={position: 3}"])
    assert recipe.data.question_type_repeats == {"position": 3}


def test_stage1_recipes_name_the_losses_they_train():
    assert Recipe.load(RECIPES / "shapes_retrieval.yaml").losses is None  # BLIP-2's three
    assert Recipe.load(RECIPES / "shapes_retrieval.yaml", ["losses=[itc, itm]"]).losses == ["itc", "itm"]
    for value, message in (("[itc, itc]", r"losses must name each trained loss once, e.g. \[itc\]"),
                           ("[]", r"losses must name each trained loss once"),
                           ("[itx]", r"losses\[0\] must be one of \['itc', 'itm', 'itg'\], got 'itx'")):
        with pytest.raises(ConfigError, match=message):
            Recipe.load(RECIPES / "shapes_retrieval.yaml", [f"losses={value}"])
    with pytest.raises(ConfigError, match="stage 2 trains language modelling: remove losses"):
        Recipe.load(RECIPES / "shapes_vqa.yaml", ["losses=[itc]"])


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "blip2.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_stages_through_the_cli_learn(tmp_path, tiny_parts):
    """shapes -> cache-features -> train stage 1 (and fine-tune it) -> train stage 2 -> eval, as a user runs them; the
    losses fall."""
    vision_dir, llm_dir = tiny_parts("opt")
    root = tmp_path / "shapes"
    run_cli("shapes", "--out", str(root), "--train", "16", "--val", "0", "--test", "4", "--compositional", "0", cwd=tmp_path)
    for stage, steps in ((1, 40), (2, 6)):
        recipe = tiny_recipe(tmp_path, vision_dir, llm_dir, stage, root, steps=steps, batch_size=8)
        recipe["init"] = str(tmp_path / "run1" / "final") if stage == 2 else None
        (tmp_path / f"stage{stage}.yaml").write_text(yaml.safe_dump(recipe))
    run_cli("cache-features", str(root / "train"), str(root / "test"), "--out", str(root / "features"),
            "--model", str(tmp_path / "stage1.yaml"), cwd=tmp_path)
    run_cli("train", str(tmp_path / "stage1.yaml"), cwd=tmp_path)
    run_cli("train", str(tmp_path / "stage2.yaml"), "--set", "train.lr=0.0005", "data.question_type_repeats={position: 2}",
            cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["losses"], records[-1]["losses"]
    assert last["loss"] < 0.95 * first["loss"], (first, last)  # stage 1 measurably learns (16 images, 40 steps)
    assert last["itc"] < first["itc"] and last["itg"] < first["itg"], (first, last)
    # a stage-1 fine-tune on one caption form starts from run1's Q-Former, not from a fresh one
    run_cli("train", str(tmp_path / "stage1.yaml"), "--set", f"init={tmp_path / 'run1' / 'final'}",
            "data.caption_index=2", "train.steps=2", f"train.out_dir={tmp_path / 'run1-retrieval'}", cwd=tmp_path)
    tuned = json.loads((tmp_path / "run1-retrieval" / "metrics.jsonl").read_text().splitlines()[0])["losses"]
    assert tuned["loss"] < 0.95 * first["loss"], (first, tuned)
    # ... or trains ITC alone: the log holds no other loss and the ITM head and LM head leave unchanged
    run_cli("train", str(tmp_path / "stage1.yaml"), "--set", f"init={tmp_path / 'run1' / 'final'}", "losses=[itc]",
            "train.steps=2", f"train.out_dir={tmp_path / 'run1-itc'}", cwd=tmp_path)
    assert set(json.loads((tmp_path / "run1-itc" / "metrics.jsonl").read_text().splitlines()[0])["losses"]) == {
        "loss", "itc"}
    before, after = (read_safetensors(tmp_path / run / "final" / "model.safetensors") for run in ("run1", "run1-itc"))
    for name in before:
        assert torch.equal(before[name], after[name]) == name.startswith(("itm_head.", "qformer.lm_head.")), name
    done = run_cli("eval", "vqa", str(root / "test"), "--model", str(tmp_path / "run2" / "final"), "--limit", "4",
                   "--features", str(root / "features"), "--out", str(tmp_path / "eval"), cwd=tmp_path)
    assert json.loads((tmp_path / "eval" / "vqa.json").read_text())["num_questions"] == 4, done.stdout
    run_cli("eval", "grounding", str(root / "test"), "--model", str(tmp_path / "run2" / "final"), "--caption-index", "0",
            "--features", str(root / "features"), "--out", str(tmp_path / "eval"), cwd=tmp_path)
    grounding = json.loads((tmp_path / "eval" / "grounding.json").read_text())
    metrics = grounding["metrics"]
    assert grounding["num_images"] == grounding["num_texts"] == 4 and metrics["gap"] == pytest.approx(
        metrics["loss_other"] - metrics["loss_own"]) and metrics["loss_own"] > 0, grounding
    assert metrics["own_better"] * 8 == round(metrics["own_better"] * 8), grounding  # 4 captions, ties count half
    png = run_cli("plot", str(tmp_path / "run1"), cwd=tmp_path).stdout.strip()
    assert Path(png).stat().st_size > 10_000
