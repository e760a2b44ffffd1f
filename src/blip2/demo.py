"""`make demo`: the whole system on a 2-core CPU, offline, from nothing.

1. generate the shapes world (train / test / compositional splits);
2. cache the frozen EfficientNet-Lite0 features once;
3. stage 1 (ITC + ITM + ITG) and stage 2 (soft prompt into SmolLM2-135M-Instruct) from the recipes in ``recipes/``;
4. evaluate retrieval, VQA and captioning on the test and compositional splits, and the untrained baseline;
5. write a report folder: metrics (JSON + Markdown), training curves, a grid of test images with their captions.

A trained demo model is reused on the next run unless ``retrain``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from blip2.api import build_model, load
from blip2.data.shapes import ShapesConfig, generate
from blip2.eval.report import write_report
from blip2.eval.tasks import evaluate_captioning, evaluate_retrieval, evaluate_vqa_task
from blip2.train.features import cache_features
from blip2.train.plot import plot_run
from blip2.train.recipe import Recipe, run_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SPECIFIC_CAPTION = 2  # the shapes world's most specific paraphrase (with sizes and positions): the retrieval query


@dataclass
class DemoConfig:
    data_root: str = "data/shapes"
    runs: str = "runs/demo"
    report: str = "reports/demo"
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 4000, "val": 100, "test": 1000, "compositional": 300})
    stage1_steps: int | None = None  # None: the recipe's
    stage2_steps: int | None = None
    eval_limit: int = 300  # questions / captions generated per split (generation is the slow part on CPU)
    retrieval_k: int = 8  # ITM re-rank depth (the paper's 128 costs 128 Q-Former passes per query)
    baseline_limit: int = 100
    retrain: bool = False


class Clock:
    """Prints each phase with the time it took and the total so far."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self.last, 1)
        print(f"[demo] {phase}: {now - self.last:.0f} s (total {(now - self.start) / 60:.1f} min)", flush=True)
        self.last = now


def recipe(name: str, cfg: DemoConfig, steps: int | None) -> Recipe:
    overrides = [f"data.captions=[{cfg.data_root}/train]", f"data.feature_cache={cfg.data_root}/features",
                 f"train.out_dir={cfg.runs}/{name}"]
    if name == "stage2":
        overrides += [f"data.vqa=[{cfg.data_root}/train]", f"init={cfg.runs}/stage1/final"]
    if steps:
        overrides.append(f"train.steps={steps}")
    return Recipe.load(RECIPES / f"shapes_{name}.yaml", overrides)


def train_stage(name: str, cfg: DemoConfig, steps: int | None) -> Path:
    final = Path(cfg.runs) / name / "final"
    if final.is_dir() and not cfg.retrain:
        print(f"[demo] reusing {final} (pass --retrain to train again)")
        return final
    return run_recipe(recipe(name, cfg, steps))


def evaluate_model(stage1, stage2, cfg: DemoConfig, features, limit: int) -> dict:
    """Retrieval (stage-1 heads) on the test split; VQA and captions (stage 2) on test and compositional."""
    root = Path(cfg.data_root)
    results = {"retrieval": evaluate_retrieval(stage1, root / "test", k=cfg.retrieval_k, caption_index=SPECIFIC_CAPTION,
                                               features=features)}
    for split in ("test", "compositional"):
        results[f"vqa_{split}"] = evaluate_vqa_task(stage2, root / split, limit=limit, features=features)
        results[f"caption_{split}"] = evaluate_captioning(stage2, root / split, limit=limit, features=features)
    return results


def run_demo(cfg: DemoConfig) -> dict:
    clock = Clock()
    report = Path(cfg.report)
    report.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data_root)
    generate(root, cfg.sizes, ShapesConfig())
    clock.done("shapes world")

    stage1_recipe = recipe("stage1", cfg, cfg.stage1_steps)
    features_dir = root / "features"
    if not (features_dir / "meta.json").is_file():
        encoder_only = build_model(stage1_recipe.model, init_qformer=False)
        cache_features(encoder_only, [str(root / s) for s in ("train", "test", "compositional")], features_dir)
    clock.done("frozen-feature cache")

    stage1_dir = train_stage("stage1", cfg, cfg.stage1_steps)
    clock.done("stage 1")
    stage2_dir = train_stage("stage2", cfg, cfg.stage2_steps)
    clock.done("stage 2")

    from blip2.data.feature_cache import FeatureCache

    features = FeatureCache(features_dir)
    trained = evaluate_model(load(stage1_dir), load(stage2_dir), cfg, features, cfg.eval_limit)
    clock.done("evaluation")
    untrained = build_model(recipe("stage2", cfg, None).model)  # MiniLM-initialised Q-Former, random projection
    baseline = evaluate_model(untrained, untrained, cfg, features, cfg.baseline_limit)
    clock.done("untrained baseline")

    metrics = {"trained": trained, "untrained": baseline, "seconds": clock.phases,
               "total_minutes": round((time.perf_counter() - clock.start) / 60, 2)}
    write_report(metrics, report, "metrics")
    for stage in ("stage1", "stage2"):
        if (Path(cfg.runs) / stage / "metrics.jsonl").is_file():
            plot_run(Path(cfg.runs) / stage, report / f"{stage}_curves.png")
    (report / "metrics_full.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics
