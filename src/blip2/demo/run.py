"""`make demo` and `blip2 demo --full`: the whole system on a 2-core CPU, offline, from nothing.

1. generate the shapes world (train / test / compositional splits, with captions, questions and conversations);
2. cache the frozen EfficientNet-Lite0 features once;
3. train the plan's phases from the packaged recipes (``demo/recipes/``), each starting from the run it names:
   the quick plan (``QUICK``, about 20 minutes) trains stage 1 (ITC + ITM + ITG), its retrieval fine-tune, and
   stage 2 (soft prompt into SmolLM2-135M-Instruct: the projection alone, then with the Q-Former) on captions,
   questions and conversations, the Q-Former reading each question and each user message into a visual prompt of
   its own; the full plan (``FULL``) is the longer chain that aims at every quality bar;
4. evaluate retrieval (the retrieval model), VQA, captioning and chat (the last phase's model) on the test and
   compositional splits, how much the captions depend on the image (``eval/run_grounding.py``), the untrained
   model and the blind prior (each question type's most common training answer);
5. write a report folder: metrics (JSON + Markdown), training curves, a grid of test images with their captions
   and answers, a chat transcript.

Every phase resumes where it stopped (kill the demo, run it again: it continues) and a trained phase is reused
on the next run unless ``retrain``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import yaml
from PIL import Image

from blip2.config import read_yaml_mapping
from blip2.data.feature_cache import FeatureCache, cache_features, encoder_identity
from blip2.demo.shapes import ShapesConfig, generate, image_id
from blip2.eval.report import write_report
from blip2.eval.run_caption import evaluate_captioning
from blip2.eval.run_chat import evaluate_chat, read_conversations
from blip2.eval.run_grounding import evaluate_grounding
from blip2.eval.run_retrieval import evaluate_retrieval
from blip2.eval.run_vqa import evaluate_vqa_task
from blip2.factory import build
from blip2.infer.chat import ChatSession
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
GROUNDING_CAPTION = 1  # "a red star on a grainy gray background": colours, shapes and background, what stage 1 learns
CAPTION_METRICS = ("Bleu", "ROUGE_L", "CIDEr")  # the report's; METEOR (a JVM start per call) is `blip2 eval caption`'s
SPLITS = ("test", "compositional")  # what the demo evaluates on
CACHED_SPLITS = ("train", "val", *SPLITS)  # val too, so `blip2 eval ... --features` reads every split from the cache
TRAINED_ON = "shapes_world.json"  # beside a phase's recipe.yaml: how many training scenes it was trained on


@dataclass(frozen=True)
class Phase:
    """One training run of a plan: a packaged recipe started from the final model of phase ``init``; ``steps``
    names the demo option that sets its length ("stage1", "retrieval" or "stage2"); ``set``: recipe overrides."""

    name: str
    recipe: str
    init: str | None
    steps: str
    set: tuple[str, ...] = ()


# The 20-minute plan: stage 1 on the captions that name sizes and positions with the position code lifted, its
# retrieval fine-tune on ITC alone at batch 64 (5.2x the pairs per second of the three losses at one batch, so 6x
# the pairs in about the same minutes: R@1 0.435 against 0.091, docs/training.md, "ITC alone"), and stage 2 from
# there (from stage 1 it chatted better and answered worse, one bar met against two: "Stage 2 from stage 1"; from
# the average of stage 1 and the fine-tune, chat steadier over two draws and no bar more: "Two more starts") in
# two phases (the projection alone, then with the Q-Former), both on captions, questions and
# conversations, the Q-Former reading each question and each user message of a conversation into a visual prompt
# of its own (chat 0.380 against 0.200 with one visual prompt read with no text: "A visual prompt per turn"), every
# position question twice per epoch, as the full plan (one draw: chat 0.233 -> 0.467, CIDEr 0.347 -> 0.540, VQA 0.517
# -> 0.500: "Position questions twice in the quick plan").
PER_TURN = ("model.llm.prompt_to_qformer=true", "model.llm.visual_prompt_per_turn=true")
POSITION_TWICE = "data.question_type_repeats={position: 2}"  # every position question twice per epoch in stage 2
QUICK = (
    Phase("stage1", "shapes_stage1", None, "stage1", ("data.caption_index=2", "model.vision_norm_position_gain=4")),
    Phase("retrieval", "shapes_retrieval", "stage1", "retrieval",
          ("losses=[itc]", "train.steps=300", "train.batch_size=64", "train.lr=6e-4", "train.warmup_steps=10")),
    Phase("stage2_warmup", "shapes_stage2_warmup", "retrieval", "stage2",
          (*PER_TURN, POSITION_TWICE, "data.captions_per_image=1")),
    Phase("stage2", "shapes_vqa", "stage2_warmup", "stage2", (*PER_TURN, POSITION_TWICE, "train.steps=300")),
)
# The full plan (docs/training.md, "The demo's two plans"; before position questions were weighed, 120.7 minutes cold
# on a 2-core AMD EPYC with native bf16, whose steps run 1.3-1.5x slower than the 2-core Xeon's, where the plan before
# per-turn prompts took 90.7; about 119 minutes there now, by the phases' times): one stage 1 on the captions that
# name sizes and positions, with the position code lifted, feeding two chains: a retrieval fine-tune at a larger batch
# (lr 6e-4: R@1 0.589 / 0.580 against 0.516 / 0.487 at 1e-4 and 0.593 / 0.568 at 1e-3, the same steps; on ITC alone,
# the quick plan's lever, 0.508 / 0.331: "The full plan's fine-tune on ITC alone"), 400 steps (0.616 / 0.628 against
# 0.570 / 0.593 in 300; without ITG or at batch 128, lower: "The full plan's fine-tune: ITC + ITM, batch 128, 400
# steps"), and stage 2 with the Q-Former reading each question and each user message of a conversation into a visual
# prompt of its own (chat 0.419 -> 0.646: "The full plan with a visual prompt per turn"), every position question
# twice per epoch (VQA 0.655 -> 0.740, chat 0.646 -> 0.707, CIDEr 1.395 -> 1.531: "Why position is the weak type"),
# its attention through the math backend (torch's CPU flash-attention backward is slow at these short sequences).
FULL = (
    Phase("stage1", "shapes_stage1", None, "stage1",
          ("data.caption_index=2", "model.vision_norm_position_gain=4", "train.steps=1000")),
    Phase("retrieval", "shapes_retrieval", "stage1", "retrieval",
          ("train.steps=400", "train.batch_size=64", "train.lr=6e-4", "train.warmup_steps=10")),
    Phase("stage2_warmup", "shapes_stage2_warmup", "stage1", "stage2",
          (*PER_TURN, POSITION_TWICE, "data.captions_per_image=1", "train.steps=600", "train.math_attention=true")),
    Phase("stage2", "shapes_vqa", "stage2_warmup", "stage2",
          (*PER_TURN, POSITION_TWICE, "train.steps=2500", "train.math_attention=true")),
)
RETRIEVAL_PHASE = "retrieval"  # its model is evaluated for retrieval; the last phase's for everything else


@dataclass
class DemoConfig:
    data_root: str = "data/shapes"
    runs: str = "runs/demo"
    report: str = "reports/demo"
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 1000, "val": 50, "test": 1000, "compositional": 200})
    stage1_steps: int | None = None  # None: the plan's
    retrieval_steps: int | None = None
    stage2_steps: int | None = None  # each of stage 2's phases
    eval_limit: int = 60  # questions / captions generated per split (generation is the slow part on CPU)
    retrieval_k: int = 4  # ITM re-rank depth (the paper's 128 costs 128 Q-Former passes per query)
    baseline_limit: int = 10  # the untrained model generates to the token limit: its items are the slow ones
    retrain: bool = False
    full: bool = False

    @classmethod
    def full_plan(cls, **given) -> "DemoConfig":
        """The full plan's defaults: its own data (6,000 training scenes), runs and report; 200 items per split."""
        sizes = {"train": 6000, "val": 200, "test": 1000, "compositional": 300}
        return cls(**{"data_root": "data/shapes-full", "runs": "runs/full", "report": "reports/full", "sizes": sizes,
                      "eval_limit": 200, "full": True, **given})

    @property
    def phases(self) -> tuple[Phase, ...]:
        return FULL if self.full else QUICK

    @property
    def bars(self) -> dict[str, float]:
        return FULL_BARS if self.full else QUICK_BARS


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


def recipe(phase: Phase, cfg: DemoConfig) -> Recipe:
    """The phase's packaged recipe on the demo's data, runs and step options; an interrupted run continues."""
    path = RECIPES / f"{phase.recipe}.yaml"
    data = read_yaml_mapping(path, "recipe").get("data", {})
    train = f"{cfg.data_root}/train"
    overrides = [*phase.set, *(f"data.{key}=[{train}]" for key in ("captions", "vqa", "chat") if data.get(key)),
                 f"data.feature_cache={cfg.data_root}/features", f"train.out_dir={cfg.runs}/{phase.name}",
                 "train.resume=auto"]
    if phase.init is not None:
        overrides.append(f"init={cfg.runs}/{phase.init}/final")
    steps = {"stage1": cfg.stage1_steps, "retrieval": cfg.retrieval_steps, "stage2": cfg.stage2_steps}[phase.steps]
    if steps:
        overrides.append(f"train.steps={steps}")
    loaded = Recipe.load(path, overrides)
    scenes = cfg.sizes["train"]
    if loaded.train.batch_size > scenes:  # a quick try on a few scenes (--train-images): one batch holds them all
        loaded = Recipe.load(path, [*overrides, f"train.batch_size={scenes}"])
    return loaded


def cache_covers(features_dir: Path, sizes: dict[str, int], identity: dict) -> bool:
    """Whether a feature cache of this encoder (``identity``) holds every image of the demo's splits."""
    if not (features_dir / "meta.json").is_file():
        return False
    cache = FeatureCache(features_dir)
    return cache.meta["encoder"] == identity and all(
        image_id(split, index) in cache for split in CACHED_SPLITS for index in range(sizes[split])
    )


def changed_settings(saved: Path, now: Recipe) -> dict[str, tuple]:
    """{dotted setting: (then, now)} where a run's saved ``recipe.yaml`` differs from ``now``; {} without one."""
    if not saved.is_file():
        return {}

    def flat(value, name: str = "") -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{name}{key}.").items()}
        return {name.rstrip("."): value}

    then, current = flat(yaml.safe_load(saved.read_text())), flat(yaml.safe_load(yaml.safe_dump(now.to_dict())))
    return {k: (then.get(k), current.get(k)) for k in sorted(then.keys() | current.keys()) if then.get(k) != current.get(k)}


def changed_world(run: Path, scenes: int) -> dict[str, tuple]:
    """{"training scenes": (then, now)} where the phase was trained on another number of scenes; {} if unknown."""
    record = run / TRAINED_ON
    then = json.loads(record.read_text())["training scenes"] if record.is_file() else scenes
    return {} if then == scenes else {"training scenes": (then, scenes)}


def train_phase(phase: Phase, cfg: DemoConfig, retrain: bool) -> tuple[Path, bool]:
    """(the phase's final model, whether it was trained now). ``retrain``: asked for, or the phase it starts from
    was just trained, so a kept run would build on an older model."""
    run = Path(cfg.runs) / phase.name
    if (run / "final").is_dir() and not retrain:
        print(f"[demo] reusing {run / 'final'} (pass --retrain to train again)")
        changed = changed_settings(run / "recipe.yaml", recipe(phase, cfg)) | changed_world(run, cfg.sizes["train"])
        if changed:
            print(f"[demo] warning: {run} was trained with other settings than the plan's now {changed} (then, now):"
                  " its numbers are the older settings'; pass --retrain to train it as the plan says")
        return run / "final", False
    if retrain and run.is_dir():
        shutil.rmtree(run)  # a new run replaces the old one
    final = run_recipe(recipe(phase, cfg))
    (run / TRAINED_ON).write_text(json.dumps({"training scenes": cfg.sizes["train"]}))
    return final, True


def evaluate_model(retrieval, generative, cfg: DemoConfig, features, limit: int, priors: bool = False) -> dict:
    """Retrieval (the retrieval model's stage-1 heads); VQA, captions and chat (the generative model), and how much
    its captions depend on the image, on the test and compositional splits. ``priors``: score the blind prior too."""
    root = Path(cfg.data_root)
    prior = root / "train" if priors else None
    results = {}
    for split in SPLITS:
        results[f"retrieval_{split}"] = evaluate_retrieval(retrieval, root / split, k=cfg.retrieval_k,
                                                           caption_index=SPECIFIC_CAPTION, features=features)
        results[f"vqa_{split}"] = evaluate_vqa_task(generative, root / split, limit=limit, features=features,
                                                    prior=prior)
        results[f"caption_{split}"] = evaluate_captioning(generative, root / split, limit=limit, features=features,
                                                          metrics=CAPTION_METRICS)
        results[f"chat_{split}"] = evaluate_chat(generative, root / split, limit=max(limit // 3, 1), prior=prior)
    results["grounding"] = evaluate_grounding(generative, root / "test", limit=limit, caption_index=GROUNDING_CAPTION,
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


def chat_transcript(model, split_dir: Path, out_md: Path) -> list[dict]:
    """One scripted conversation about a held-out image, as `blip2 chat` holds it: printed and written as Markdown."""
    (row,) = read_conversations(split_dir, 1)
    session = ChatSession(model, row["image"])
    opener = "describe the picture."
    said = [{"user": opener, "assistant": session.ask(opener, max_new_tokens=30), "expected": None}]
    said += [{"user": t["question"], "assistant": session.ask(t["question"], max_new_tokens=10),
              "expected": t["answer"]} for t in row["turns"]]
    lines = [f"Chat about `{Path(row['image']).name}` ({split_dir.name} split):", ""]
    for turn in said:
        expected = f" *(expected: {turn['expected']})*" if turn["expected"] else ""
        lines += [f"> **user:** {turn['user']}", ">", f"> **assistant:** {turn['assistant']}{expected}", ">"]
    out_md.write_text("\n".join(lines[:-1]) + "\n")
    print("\n".join(f"  {line}" for line in lines))
    return said


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


# the quality bars on the shapes test split: the 20-minute demo's, and the full plan's
QUICK_BARS = {"t2i R@1 (ITC+ITM)": 0.30, "VQA accuracy": 0.55, "CIDEr": 1.2, "chat accuracy": 0.50}
FULL_BARS = {"t2i R@1 (ITC+ITM)": 0.60, "VQA accuracy": 0.70, "CIDEr": 1.5, "chat accuracy": 0.70}


def headline(results: dict) -> dict[str, float]:
    """The numbers the bars are about (test, then compositional), and whether stage 2 reads the image."""
    numbers = {}
    for split in SPLITS:
        tag = "" if split == "test" else " (compositional)"
        retrieval = results[f"retrieval_{split}"]
        numbers.update({
            f"t2i R@1 (ITC){tag}": retrieval["itc"]["t2i_r1"],
            f"t2i R@1 (ITC+ITM){tag}": retrieval["itc_itm"]["t2i_r1"],
            f"t2i R@1 ceiling{tag}": retrieval["ceiling"]["t2i_r1"],
            f"VQA accuracy{tag}": results[f"vqa_{split}"]["metrics"].get("overall", 0.0),
            f"CIDEr{tag}": results[f"caption_{split}"]["metrics"].get("CIDEr", 0.0),
            f"chat accuracy{tag}": results[f"chat_{split}"]["metrics"]["overall"],
        })  # fmt: skip
    numbers["BLEU-4"] = results["caption_test"]["metrics"].get("Bleu_4", 0.0)
    numbers["caption loss gap, own vs other image"] = results["grounding"]["metrics"]["gap"]
    numbers["visual prompt spread"] = results["grounding"]["metrics"]["prompt_spread"]
    return numbers


def blind_headline(results: dict) -> dict[str, float]:
    """The blind prior's VQA and chat accuracy (no model: each question type's most common training answer)."""
    return {f"{task} accuracy{'' if split == 'test' else ' (compositional)'}": results[f"{key}_{split}"]["blind_prior"]["overall"]
            for split in SPLITS for task, key in (("VQA", "vqa"), ("chat", "chat"))}


def print_table(summary: dict[str, dict[str, float]], bars: dict[str, float]) -> None:
    print(f"[demo] {'metric':36s} {'trained':>8s} {'untrained':>9s} {'blind':>6s} {'bar':>5s}")
    for name, value in summary["trained"].items():
        bar, blind = bars.get(name), summary["blind prior"].get(name)
        mark = "" if bar is None else ("  meets the bar" if value >= bar else "  below the bar")
        print(f"[demo] {name:36s} {value:8.3f} {summary['untrained'].get(name, float('nan')):9.3f} "
              f"{'' if blind is None else f'{blind:6.3f}':>6s} {'' if bar is None else f'{bar:5.2f}':>5s}{mark}")


def run_demo(cfg: DemoConfig) -> dict:
    clock = Clock()
    report = Path(cfg.report)
    report.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data_root)
    generate(root, cfg.sizes, ShapesConfig())
    clock.done("shapes world")

    first = recipe(cfg.phases[0], cfg)
    features_dir = root / "features"
    encoder_only = build(first.model, init_qformer=False)
    identity = encoder_identity(encoder_only.model.cfg.vision, encoder_only.preprocess, encoder_only.model.vision)
    if not cache_covers(features_dir, cfg.sizes, identity):
        cache_features(encoder_only.model.image_features, identity, encoder_only.preprocess,
                       [str(root / s) for s in CACHED_SPLITS], features_dir)
    clock.done("frozen-feature cache")

    finals, trained_now = {}, set()
    for phase in cfg.phases:
        finals[phase.name], trained = train_phase(phase, cfg, cfg.retrain or phase.init in trained_now)
        if trained:
            trained_now.add(phase.name)
        clock.done(phase.name)
    generative_dir = finals[cfg.phases[-1].name]

    features = FeatureCache(features_dir)
    trained = evaluate_model(load(finals[RETRIEVAL_PHASE]), load(generative_dir), cfg, features, cfg.eval_limit,
                             priors=True)
    clock.done("evaluation")
    last = recipe(cfg.phases[-1], cfg).model
    untrained = Blip2Pipeline.from_parts(build(last))  # MiniLM Q-Former, random projection
    baseline = evaluate_model(untrained, untrained, cfg, features, cfg.baseline_limit)
    clock.done("untrained baseline")

    print("[demo] held-out (compositional) images:")
    generative = load(generative_dir)
    examples = showcase(generative, root / "compositional", report / "examples.png")
    transcript = chat_transcript(generative, root / "compositional", report / "chat.md")
    clock.done("examples")

    summary = {"trained": headline(trained), "untrained": headline(baseline), "blind prior": blind_headline(trained),
               "bars": cfg.bars}
    print_table(summary, cfg.bars)
    total = round((time.perf_counter() - clock.start) / 60, 2)
    metrics = {"summary": summary, "trained": trained, "untrained": baseline, "examples": examples,
               "chat": transcript, "seconds": clock.phases, "total_minutes": total}
    write_report({"summary": summary, "seconds": clock.phases, "total_minutes": total}, report, "metrics")
    for phase in cfg.phases:
        if (Path(cfg.runs) / phase.name / "metrics.jsonl").is_file():
            plot_run(Path(cfg.runs) / phase.name, report / f"{phase.name}_curves.png")
    (report / "metrics_full.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics
