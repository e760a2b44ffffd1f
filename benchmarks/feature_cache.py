"""Stage-1 training throughput (samples/s) from the frozen-feature cache against from images (decode, BLIP-2's
random resized crop, the frozen EfficientNet-Lite0), on a shapes-world split generated into a temporary folder.

Both sides run the demo's stage-1 recipe (``recipes/shapes_stage1.yaml``) through the production code: the
recipe's model and datasets (``build_stage_model``, ``build_dataset``), the feature cache written by
``cache_features`` (what ``blip2 cache-features`` runs), ``Stage1Collate`` and ``stage1_step`` (ITC + ITM + ITG),
then backward and an AdamW step; one process, no data-loader workers.
``python benchmarks/feature_cache.py [--quick]``.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import common
import demo
import torch
from torch.utils.data import DataLoader

from blip2.data.collate import Stage1Collate
from blip2.data.feature_cache import cache_features, encoder_identity
from blip2.demo.shapes import generate
from blip2.train.recipe import Recipe, build_dataset, build_stage_model
from blip2.train.stages import stage1_step

TARGET = None  # the issue sets none; the cache must simply not be slower
STEPS = 2  # per timed run; the split holds exactly the images they take


def recipe(train_dir: Path, cache_dir: Path | None, batch_size: int) -> Recipe:
    overrides = [f"data.captions=['{train_dir}']", f"train.batch_size={batch_size}",
                 f"data.feature_cache={'null' if cache_dir is None else repr(str(cache_dir))}"]  # fmt: skip
    return demo.recipe(1, overrides)


def training_run(model, optimizer, dataset, collate, batch_size: int):
    """A callable that trains ``STEPS`` steps on the first batches of ``dataset``, data loading included."""

    def run() -> None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
        for batch in itertools.islice(loader, STEPS):
            stage1_step(model, batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    repeats = common.setup(args, default_repeats=3)
    batch_size = 2 if args.quick else demo.recipe(1).train.batch_size
    images = batch_size * STEPS
    with tempfile.TemporaryDirectory() as workdir:
        train_dir = generate(Path(workdir) / "shapes", {"train": images}, progress=False)["train"]
        cache_dir = Path(workdir) / "features"
        from_images = recipe(train_dir, None, batch_size)
        parts = build_stage_model(from_images)
        model = parts.model.train()
        identity = encoder_identity(model.cfg.vision, parts.preprocess, model.vision)
        start = time.perf_counter()
        cache_features(model.image_features, identity, parts.preprocess, [str(train_dir)], cache_dir,
                       batch_size=batch_size)
        cache_seconds = time.perf_counter() - start
        datasets = {"feature cache": build_dataset(recipe(train_dir, cache_dir, batch_size), parts),
                    "images": build_dataset(from_images, parts)}  # fmt: skip
        collate = Stage1Collate(parts.qformer_tokenizer, from_images.model.qformer.max_text_len)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        runs = {name: training_run(model, optimizer, data, collate, batch_size) for name, data in datasets.items()}
        seconds = common.interleaved(runs, repeats)

    per_second = {name: images / common.median(values) for name, values in seconds.items()}
    q = from_images.model.qformer
    print(f"\nstage-1 training, demo recipe (EfficientNet-Lite0, Q-Former {q.num_layers} layers x {q.hidden_size}, "
          f"{q.num_query_tokens} queries), fp32, batch {batch_size}, {STEPS} steps per run; median (min-max) of "
          f"{repeats} interleaved runs\n")  # fmt: skip
    common.table(
        ["input", "seconds per run", "samples/s"],
        [(name, common.spread(values), f"{per_second[name]:.2f}") for name, values in seconds.items()],
    )
    print(f"writing the cache (`blip2 cache-features`) took {cache_seconds:.1f} s for {images} images "
          f"({images / cache_seconds:.1f} images/s), paid once per dataset and encoder\n")
    ratio = per_second["feature cache"] / per_second["images"]
    common.ratio_line("stage-1 training samples/s, feature cache vs images", ratio, TARGET,
                      how="cache / images, higher is better")  # fmt: skip


if __name__ == "__main__":
    main()
