"""`make demo`: the whole system on a 2-core CPU, offline, from nothing.

1. generate the shapes world (train / test / compositional splits);
2. cache the frozen EfficientNet-Lite0 features once;
3. stage 1 (ITC + ITM + ITG), its retrieval fine-tune (the same losses on the captions with sizes and positions)
   and stage 2 (soft prompt into SmolLM2-135M-Instruct: the projection alone, then with the Q-Former) from the
   recipes in ``recipes/``, each phase starting from the one before;
4. evaluate retrieval, VQA and captioning on the test and compositional splits, how much stage 2's captions
   depend on the image (``eval/run_grounding.py``), and the untrained baseline;
5. write a report folder: metrics (JSON + Markdown), training curves, a grid of test images with their captions.

A trained demo model is reused on the next run unless ``retrain``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

from blip2.data.feature_cache import FeatureCache, cache_features, encoder_identity
from blip2.demo.shapes import ShapesConfig, generate, image_id
from blip2.eval.report import write_report
from blip2.eval.run_caption import evaluate_captioning
from blip2.eval.run_grounding import evaluate_grounding
from blip2.eval.run_retrieval import evaluate_retrieval
from blip2.eval.run_vqa import evaluate_vqa_task
from blip2.factory import build
from blip2.pipeline import Blip2Pipeline, load
from blip2.train.plot import plot_run  # also selects matplotlib's file-only backend
from blip2.train.recipe import Recipe, run_recipe

RECIPES = Path(__file__).resolve().parent / "recipes"  # package data


def recipe_file(spec: str | Path) -> Path:
    """A recipe file: ``spec`` itself when it exists, else the packaged demo recipe of that name ("shapes_stage1" or
    "shapes_stage1.yaml"), so `blip2 train shapes_stage1` works from any folder."""
    path = Path(spec)
    if path.exists():
        return path
    packaged = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise FileNotFoundError(f"recipe {spec} not found: give a recipe file, or one of the packaged recipes: {names}")
SPECIFIC_CAPTION = 2  # the shapes world's most specific paraphrase (with sizes and positions): the retrieval query
# the training phases in order, each started from the one before (recipes/shapes_<phase>.yaml): stage 1, its retrieval
# fine-tune, then stage 2 with the projection alone and with the whole Q-Former
PHASES = ("stage1", "retrieval", "stage2_warmup", "stage2")
STAGE2_PHASES = PHASES[2:]
GROUNDING_CAPTION = 1  # "a red star on a grainy gray background": colours, shapes and background, what stage 1 learns


@dataclass
class DemoConfig:
    data_root: str = "data/shapes"
    runs: str = "runs/demo"
    report: str = "reports/demo"
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 1000, "val": 50, "test": 1000, "compositional": 200})
    stage1_steps: int | None = None  # None: the recipe's
    retrieval_steps: int | None = None
    stage2_steps: int | None = None  # each of stage 2's two phases
    eval_limit: int = 60  # questions / captions generated per split (generation is the slow part on CPU)
    retrieval_k: int = 4  # ITM re-rank depth (the paper's 128 costs 128 Q-Former passes per query)
    baseline_limit: int = 30
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
                 f"train.out_dir={cfg.runs}/{name}", "train.resume=auto"]  # an interrupted demo continues
    position = PHASES.index(name)
    if position > 0:
        overrides.append(f"init={cfg.runs}/{PHASES[position - 1]}/final")
    if name in STAGE2_PHASES:
        overrides.append(f"data.vqa=[{cfg.data_root}/train]")
    if steps:
        overrides.append(f"train.steps={steps}")
    return Recipe.load(RECIPES / f"shapes_{name}.yaml", overrides)


def cache_covers(features_dir: Path, sizes: dict[str, int], identity: dict) -> bool:
    """Whether a feature cache of this encoder (``identity``) holds every image of the splits the demo trains and
    evaluates on."""
    if not (features_dir / "meta.json").is_file():
        return False
    cache = FeatureCache(features_dir)
    return cache.meta["encoder"] == identity and all(
        image_id(split, index) in cache for split in ("train", "test", "compositional") for index in range(sizes[split])
    )


def train_stage(name: str, cfg: DemoConfig, steps: int | None, retrain: bool) -> tuple[Path, bool]:
    """(the stage's final model, whether it was trained now). ``retrain``: asked for, or an earlier stage it
    starts from was just trained, so a kept run would build on an older model."""
    run = Path(cfg.runs) / name
    if (run / "final").is_dir() and not retrain:
        print(f"[demo] reusing {run / 'final'} (pass --retrain to train again)")
        return run / "final", False
    if retrain and run.is_dir():
        shutil.rmtree(run)  # a new run replaces the old one
    return run_recipe(recipe(name, cfg, steps)), True


def evaluate_model(stage1, stage2, cfg: DemoConfig, features, limit: int) -> dict:
    """Retrieval (stage-1 heads) on the test split; VQA and captions (stage 2) on test and compositional."""
    root = Path(cfg.data_root)
    results = {"retrieval": evaluate_retrieval(stage1, root / "test", k=cfg.retrieval_k, caption_index=SPECIFIC_CAPTION,
                                               features=features)}
    for split in ("test", "compositional"):
        results[f"vqa_{split}"] = evaluate_vqa_task(stage2, root / split, limit=limit, features=features)
        results[f"caption_{split}"] = evaluate_captioning(stage2, root / split, limit=limit, features=features)
    results["grounding"] = evaluate_grounding(stage2, root / "test", limit=limit, caption_index=GROUNDING_CAPTION,
                                              features=features)
    return results


def showcase(model, split_dir: Path, out_png: Path, count: int = 8) -> list[dict]:
    """Caption a few held-out images and answer one question each; print them and draw a captioned grid."""
    questions = json.loads((split_dir / "vqa.json").read_text())
    first_question = {}
    for q in questions:
        first_question.setdefault(q["image_id"], q)
    rows = [json.loads(line) for line in (split_dir / "captions.jsonl").read_text().splitlines()[:count]]
    images = [str(split_dir / row["image"]) for row in rows]
    captions = model.caption(images)
    asked = [first_question[row["image_id"]] for row in rows]
    answers = model.answer(images, [q["question"] for q in asked])
    shown = []
    for row, path, caption, q, answer in zip(rows, images, captions, asked, answers):
        shown.append({"image": path, "caption": caption, "reference": row["captions"][0], "question": q["question"],
                      "answer": answer, "expected": q["answers"][0]})
        print(f"  {Path(path).name}: {caption!r} (reference {row['captions'][0]!r})")
        print(f"      Q: {q['question']}  A: {answer!r} (expected {q['answers'][0]!r})")
    draw_grid(shown, out_png)
    return shown


def draw_grid(shown: list[dict], out_png: Path, columns: int = 4) -> None:
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.6 * rows), squeeze=False)
    for ax, item in zip(axes.flat, shown):
        ax.imshow(Image.open(item["image"]))
        ax.set_title(f"{item['caption']}\nQ: {item['question']}\nA: {item['answer']} (truth: {item['expected']})",
                     fontsize=8, wrap=True)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


BARS = {  # the quality bars on the shapes test split
    "t2i R@1 (ITC)": 0.60, "t2i R@1 (ITC+ITM)": 0.60, "VQA accuracy": 0.70, "CIDEr": 1.5,
}


def headline(results: dict) -> dict[str, float]:
    """The numbers the bars are about, and whether stage 2 reads the image, from ``evaluate_model``'s results."""
    return {
        "t2i R@1 (ITC)": results["retrieval"]["itc"]["t2i_r1"],
        "t2i R@1 (ITC+ITM)": results["retrieval"]["itc_itm"]["t2i_r1"],
        "t2i R@1 ceiling": results["retrieval"]["ceiling"]["t2i_r1"],
        "VQA accuracy": results["vqa_test"]["metrics"].get("overall", 0.0),
        "VQA accuracy (compositional)": results["vqa_compositional"]["metrics"].get("overall", 0.0),
        "CIDEr": results["caption_test"]["metrics"].get("CIDEr", 0.0),
        "CIDEr (compositional)": results["caption_compositional"]["metrics"].get("CIDEr", 0.0),
        "BLEU-4": results["caption_test"]["metrics"].get("Bleu_4", 0.0),
        "caption loss gap, own vs other image": results["grounding"]["metrics"]["gap"],
        "visual prompt spread": results["grounding"]["metrics"]["prompt_spread"],
    }


def print_table(trained: dict[str, float], untrained: dict[str, float]) -> None:
    print(f"[demo] {'metric':32s} {'trained':>8s} {'untrained':>9s} {'bar':>6s}")
    for name, value in trained.items():
        bar = BARS.get(name)
        mark = "" if bar is None else ("  meets the bar" if value >= bar else "  below the bar")
        print(f"[demo] {name:32s} {value:8.3f} {untrained.get(name, float('nan')):9.3f} "
              f"{'' if bar is None else f'{bar:6.2f}'}{mark}")


def run_demo(cfg: DemoConfig) -> dict:
    clock = Clock()
    report = Path(cfg.report)
    report.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data_root)
    generate(root, cfg.sizes, ShapesConfig())
    clock.done("shapes world")

    stage1_recipe = recipe("stage1", cfg, cfg.stage1_steps)
    features_dir = root / "features"
    encoder_only = build(stage1_recipe.model, init_qformer=False)
    identity = encoder_identity(encoder_only.model.cfg.vision, encoder_only.preprocess, encoder_only.model.vision)
    if not cache_covers(features_dir, cfg.sizes, identity):
        cache_features(encoder_only.model.image_features, identity, encoder_only.preprocess,
                       [str(root / s) for s in ("train", "test", "compositional")], features_dir)
    clock.done("frozen-feature cache")

    steps = {"stage1": cfg.stage1_steps, "retrieval": cfg.retrieval_steps}
    finals, trained = {}, False
    for phase in PHASES:
        finals[phase], trained = train_stage(phase, cfg, steps.get(phase, cfg.stage2_steps), cfg.retrain or trained)
        clock.done(phase)
    stage1_dir, stage2_dir = finals["retrieval"], finals["stage2"]

    features = FeatureCache(features_dir)
    trained = evaluate_model(load(stage1_dir), load(stage2_dir), cfg, features, cfg.eval_limit)
    clock.done("evaluation")
    untrained = Blip2Pipeline.from_parts(build(recipe("stage2", cfg, None).model))  # MiniLM Q-Former, random projection
    baseline = evaluate_model(untrained, untrained, cfg, features, cfg.baseline_limit)
    clock.done("untrained baseline")

    print("[demo] held-out (compositional) images:")
    examples = showcase(load(stage2_dir), root / "compositional", report / "examples.png")
    clock.done("examples")

    summary = {"trained": headline(trained), "untrained": headline(baseline)}
    print_table(summary["trained"], summary["untrained"])
    metrics = {"summary": summary, "trained": trained, "untrained": baseline, "examples": examples, "seconds": clock.phases,
               "total_minutes": round((time.perf_counter() - clock.start) / 60, 2)}
    write_report({"summary": summary, "seconds": clock.phases, "total_minutes": metrics["total_minutes"]}, report, "metrics")
    for stage in PHASES:
        if (Path(cfg.runs) / stage / "metrics.jsonl").is_file():
            plot_run(Path(cfg.runs) / stage, report / f"{stage}_curves.png")
    (report / "metrics_full.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics
