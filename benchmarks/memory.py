"""Peak memory (resident set size) of the demo's stages, each measured in a fresh subprocess:

- stage-1 training (recipes/shapes_stage1.yaml: EfficientNet-Lite0, MiniLM Q-Former, the recipe's batch size, from
  cached features as the demo trains): two AdamW steps, so the optimizer state is counted;
- stage-2 training (recipes/shapes_stage2.yaml: + SmolLM2-135M-Instruct, its batch size): two AdamW steps;
- generation with the stage-2 model: captioning 16 images at batch 8, then a 3-turn chat.

Peak RSS comes from ``getrusage`` (the kernel's high-water mark for the process), so nothing else running in the
parent leaks into a figure. ``python benchmarks/memory.py [--quick]``; ``--quick`` uses batch 2 and a tiny LLM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import common
import demo
import model_pair
import torch

from blip2.data.collate import Stage1Collate, Stage2Collate
from blip2.demo.shapes import ShapesConfig, captions, make_scene, text_rng
from blip2.pipeline import Blip2Pipeline
from blip2.train.recipe import build_stage_model
from blip2.train.stages import stage1_step, stage2_step

BUDGET_BYTES = 6e9  # the "< 6 GB" (decimal gigabytes)
STAGES = {
    "stage-1 step": "stage1",
    "stage-2 step": "stage2",
    "generation": "generation",
}
CHILD_FLAG = "--child"


def current_rss_mb() -> float:
    """Resident set size now, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- what each child runs ---------------------------------------------------------------------------------------


def load_model(stage: str, quick: bool):
    """The demo recipe's model for the stage (stage 2 without its stage-1 init); quick: stage 1 as it is, the tiny
    pair model for the rest."""
    if stage not in STAGES.values():
        raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGES.values())}")
    if stage == "stage1":
        return Blip2Pipeline.from_parts(build_stage_model(demo.recipe(1)))
    return model_pair.ours(quick=True) if quick else Blip2Pipeline.from_parts(build_stage_model(demo.recipe(2)))


def caption_items(pipe, batch: int) -> list[dict]:
    """Shapes-world captions with frozen features of the encoder's shape (random values, as from a cache)."""
    cfg = ShapesConfig()
    shape = pipe.model.image_features(torch.zeros(1, 3, *pipe.preprocess.size)).shape[1:]  # [N, D]
    items = []
    for index in range(batch):
        scene = make_scene("train", index, cfg)
        text = random.Random(index).choice(captions(scene, text_rng("train", index, cfg)))
        items.append({"image": torch.randn(shape), "image_id": f"train_{index}", "text": text})
    return items


def train_steps(pipe, stage: str, batch_size: int, steps: int = 2) -> None:
    """``steps`` AdamW steps of the stage's loss on one collated batch (the optimizer state exists from step 1 on)."""
    items = caption_items(pipe, batch_size)
    model = pipe.model
    if stage == "stage1":
        batch, step_fn = Stage1Collate(pipe.qformer_tokenizer, model.cfg.qformer.max_text_len)(items), stage1_step
    else:
        batch, step_fn = Stage2Collate(pipe.llm_tokenizer, model.cfg.llm.max_text_len)(items), stage2_step
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(steps):
        step_fn(model, batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def generate(model, images: int, batch_size: int) -> None:
    """Caption ``images`` pictures, then a 3-turn chat about the first."""
    pictures = model_pair.scene_images(images)
    model.model.eval()
    model.caption(pictures, batch_size=batch_size, max_new_tokens=30)
    session = model.chat(pictures[0])
    for question in ("What is in the picture?", "What colour is it?", "Where is it?"):
        session.ask(question, max_new_tokens=30)


def run_stage(stage: str, quick: bool) -> dict:
    """Load the stage's model and run its workload; RSS (MiB) after the imports, before the workload and at peak."""
    imported = current_rss_mb()
    model = load_model(stage, quick)
    loaded = current_rss_mb()
    if stage == "generation":
        images, batch_size = (4, 2) if quick else (16, 8)
        generate(model, images, batch_size)
        what = f"caption {images} images (batch {batch_size}), 3-turn chat"
    else:
        batch_size = 2 if quick else demo.recipe(int(stage[-1])).train.batch_size
        train_steps(model, stage, batch_size)
        what = f"2 training steps, batch {batch_size}"
    return {"imported_mb": imported, "loaded_mb": loaded, "peak_mb": common.peak_rss_mb(), "what": what}


# ---- the parent: one subprocess per stage --------------------------------------------------------------------------


def measure_in_subprocess(stage: str, quick: bool, threads: int) -> dict:
    command = [sys.executable, __file__, CHILD_FLAG, stage, "--threads", str(threads)] + (["--quick"] if quick else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])  # the child's last line
    return result | {"seconds": time.perf_counter() - start}


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument(CHILD_FLAG, choices=sorted(STAGES.values()), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_stage(args.child, args.quick)))
        return
    common.setup(args, default_repeats=1)
    results = {name: measure_in_subprocess(stage, args.quick, args.threads) for name, stage in STAGES.items()}
    budget_mb = BUDGET_BYTES / 2**20
    print(f"\npeak resident memory per stage, each in a fresh process (budget {BUDGET_BYTES / 1e9:.0f} GB = "
          f"{budget_mb:.0f} MiB)\n")  # fmt: skip
    common.table(
        ["stage", "workload", "RSS after imports", "RSS before the workload", "peak RSS", "wall time"],
        [(name, r["what"], f"{r['imported_mb']:.0f} MiB", f"{r['loaded_mb']:.0f} MiB", f"{r['peak_mb']:.0f} MiB",
          f"{r['seconds']:.0f} s") for name, r in results.items()],
    )  # fmt: skip
    print("RSS counts weights only once touched: safetensors files are memory-mapped, so the LLM's pages arrive with\n"
          "its first forward, not at loading.\n")
    for name, r in results.items():
        common.ratio_line(f"peak RSS, {name}: {r['peak_mb']:.0f} MiB", budget_mb / r["peak_mb"], 1.0,
                          how="6 GB budget / peak, higher is better")  # fmt: skip


if __name__ == "__main__":
    main()
