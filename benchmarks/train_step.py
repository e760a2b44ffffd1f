"""Training steps of the demo's phases through the real `blip2 train` path (its recipes, the Trainer, the feature
cache, bf16 autocast where the CPU has it), three comparisons (``--against``):

- ``copies`` (default): the frozen ``nn.Linear`` weights held in bf16 for the steps (``FrozenWeightCopies``)
  against the step before it, in which autocast cast every frozen fp32 weight (the LLM's 135M) at every forward,
  on the demo's two stage-2 phases. Every logged loss must be equal, bit for bit (the copies hold exactly what
  autocast's cast gives).
- ``loop``: AdamW as torch's fused kernel (``train.fused_optimizer``) against its per-tensor loop, on the full
  plan's stage 1 and main stage-2 phase. The two round differently, so the losses agree only to rounding; the
  largest difference of a logged loss is printed.
- ``flash``: attention through torch's math SDPA backend (``train.math_attention``) against torch's own pick
  (flash attention on CPU), on the full plan's two stage-2 phases (the frozen LLM's attention; the Q-Former's,
  with dropout, takes the math path either way). The losses differ by rounding, which a few steps from a fresh
  model at stage 2's learning rates amplify far more than ``loop``'s (the table's largest difference).
- ``fp32``: bf16 autocast (``train.precision=bf16``) against fp32 on the quick plan's stage 1 and stage-2 phases:
  what ``precision: auto`` (the demo recipes') decides by the CPU's native bf16 (AVX512-BF16, AMX), measured.
- ``losses``: the quick plan's retrieval fine-tune on ITC alone (``losses=[itc]``, batch 64) against the same
  phase on ITC + ITM + ITG (BLIP-2's three, the default), at the same batch: the ratio is the pairs per second.
  The losses differ by design (the table prints ITC's sum against all three).

Same data, same seed, same recipe. Step times come from the run's own ``metrics.jsonl`` (``elapsed_s`` logged every
step; the first two steps are left out). ``python benchmarks/train_step.py [--quick] [--against loop|flash|fp32|losses]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import common

from blip2.data.feature_cache import cache_features, encoder_identity
from blip2.demo.run import FULL, QUICK, DemoConfig, Phase, recipe
from blip2.demo.shapes import ShapesConfig, generate
from blip2.factory import build
from blip2.train import trainer
from blip2.train.recipe import run_recipe

TARGET = None  # no target was set; the full demo plan's 90 minutes is what it buys (benchmarks/README.md)
PHASES = (  # the demo's stage-2 phases (stage 1 runs no frozen Linear: its encoder's features are cached), each
    # from a fresh model (`init=null`): timing does not depend on the weights
    Phase("stage 2, projection alone (shapes_stage2_warmup)", "shapes_stage2_warmup", None, "stage2", ("init=null",)),
    Phase("stage 2, Q-Former reading the question (shapes_vqa)", "shapes_vqa", None, "stage2", ("init=null",)),
)


def plan_phases(plan: tuple[Phase, ...], label: str, *names: str) -> tuple[Phase, ...]:
    """These phases of ``plan``, its overrides but a fresh model."""
    return tuple(Phase(f"{label}, {p.name} ({p.recipe})", p.recipe, None, p.steps, (*p.set, "init=null"))
                 for p in plan if p.name in names)


class Comparison(NamedTuple):
    this: str  # what the "this" side runs
    before: str  # what the "before" side runs
    phases: tuple[Phase, ...]
    switch: str | None  # the recipe key that differs between the sides (None: the bf16 copies' patch)
    values: tuple[str, str] = ("true", "false")  # its value on "this" and on "before"


COMPARISONS = {  # --against
    "copies": Comparison("bf16 copies", "autocast casting every step", PHASES, None),
    "loop": Comparison("fused AdamW", "AdamW's per-tensor loop", plan_phases(FULL, "full plan", "stage1", "stage2"),
                       "train.fused_optimizer"),
    "flash": Comparison("math attention", "torch's attention pick (flash on CPU)",
                        plan_phases(FULL, "full plan", "stage2_warmup", "stage2"),
                        "train.math_attention"),  # where the frozen LLM attends
    "fp32": Comparison("bf16 autocast", "fp32", (Phase("stage 1 (shapes_stage1)", "shapes_stage1", None, "stage1",
                                                       ("init=null",)), *PHASES), "train.precision", ("bf16", "fp32")),
    "losses": Comparison("ITC alone", "ITC + ITM + ITG", plan_phases(QUICK, "quick plan", "retrieval"), "losses",
                         ("[itc]", "null")),
}


@contextlib.contextmanager
def step_before():
    """The step before: no bf16 copies, autocast casts the frozen weights at every forward."""
    with mock.patch.object(trainer.FrozenWeightCopies, "__init__", no_copies):
        yield


def no_copies(self, *args) -> None:
    self.copies = []


def world(root: Path, train: int) -> DemoConfig:
    """A small shapes world with its feature cache, laid out as the demo lays out its own."""
    cfg = DemoConfig(data_root=str(root / "shapes"), runs=str(root / "runs"),
                     sizes={"train": train, "val": 1, "test": 1, "compositional": 1})  # fmt: skip
    generate(cfg.data_root, cfg.sizes, ShapesConfig(), progress=False)
    encoder = build(recipe(PHASES[0], cfg).model, init_qformer=False)  # the stage-2 recipes' encoder
    identity = encoder_identity(encoder.model.cfg.vision, encoder.preprocess, encoder.model.vision)
    cache_features(encoder.model.image_features, identity, encoder.preprocess, [f"{cfg.data_root}/train"],
                   f"{cfg.data_root}/features")
    return cfg


def run(phase: Phase, cfg: DemoConfig, out: Path, steps: int, *extra: str) -> tuple[list[float], list[float]]:
    """Train ``steps`` steps of ``phase`` (``extra`` overrides last); (seconds of each step after the first two, the
    loss of every step)."""
    overrides = (*phase.set, f"train.steps={steps}", "train.log_every=1", "train.save_every=0", *extra)
    one = dataclasses.replace(cfg, runs=str(out))
    run_recipe(recipe(Phase(phase.recipe, phase.recipe, None, phase.steps, overrides), one))
    records = [json.loads(line) for line in (out / phase.recipe / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    return [b - a for a, b in zip(elapsed[1:], elapsed[2:])], [r["losses"]["loss"] for r in records]


def side(against: str, name: str) -> tuple[contextlib.AbstractContextManager, tuple[str, ...]]:
    """How one side of a comparison runs: (the context it trains in, its extra overrides)."""
    comparison = COMPARISONS[against]
    if comparison.switch is not None:
        value = comparison.values[0 if name == "this" else 1]
        return contextlib.nullcontext(), (f"{comparison.switch}={value}",)
    return (step_before() if name == "before" else contextlib.nullcontext()), ()


def main() -> None:
    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--against", choices=tuple(COMPARISONS), default="copies",
                         help="copies: the frozen weights' bf16 copies against autocast's casts (stage 2); "
                              "loop: the fused AdamW against its per-tensor loop (the full plan's phases); "
                              "flash: math attention against torch's pick (the full plan's stage-2 phases); "
                              "fp32: bf16 autocast against fp32 (the quick plan's phases); "
                              "losses: ITC alone against all three (the quick plan's retrieval fine-tune)")
    args = options.parse_args()
    repeats = common.setup(args, default_repeats=2)
    steps = 4 if args.quick else 12
    small = ("train.batch_size=2",) if args.quick else ()  # --quick checks the script: bf16 without native bf16 is slow
    this, before, phases, switch, _ = COMPARISONS[args.against]
    phases = phases[:1] if args.quick else phases
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = world(Path(tmp), train=16 if args.quick else 400)
        for phase in phases:
            seconds, losses = {"this": [], "before": []}, {}
            for repeat in range(repeats):  # interleaved: this, before, this, before, ...
                for name in seconds:
                    context, extra = side(args.against, name)
                    with context:
                        times, losses[name] = run(phase, cfg, Path(tmp) / f"{name}-{repeat}", steps, *small, *extra)
                    seconds[name] += times
            if switch is None:  # the copies hold exactly what autocast's cast gives
                assert losses["this"] == losses["before"], (phase.name, losses)  # bit for bit, every step
            ratio = statistics.median(seconds["before"]) / statistics.median(seconds["this"])
            rows.append((phase, seconds, losses, ratio))
    print(f"\ntraining steps, {this} (this) against {before} (before), {steps} steps per run ({steps - 2} timed), "
          f"{repeats} interleaved runs per side; median (min-max) seconds per step\n")
    common.table(
        ["phase", "this: s/step", "before: s/step", "mean, this / before", "losses (this), first / last",
         "largest loss difference"],
        [(p.name, common.spread(s["this"]), common.spread(s["before"]),
          f"{statistics.mean(s['this']):.3f} / {statistics.mean(s['before']):.3f} s",
          f"{loss['this'][0]:.4f} / {loss['this'][-1]:.4f}",
          f"{max(abs(a - b) for a, b in zip(loss['this'], loss['before'])):.2g}")
         for p, s, loss, _ in rows],
    )  # fmt: skip
    for phase, _, _, ratio in rows:
        common.ratio_line(f"training step, {phase.name}", ratio, TARGET, how="before / this, higher is better")


if __name__ == "__main__":
    main()
