"""`blip2 shapes|cache-features|train|plot|demo`: making data and training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

from blip2.data.feature_cache import cache_features as cache_dataset_features
from blip2.data.feature_cache import encoder_identity
from blip2.demo.run import DemoConfig, recipe_file, run_demo
from blip2.demo.shapes import ShapesConfig, generate
from blip2.factory import Parts, build, load_parts
from blip2.train.plot import plot_run
from blip2.train.recipe import Recipe, run_recipe


def shapes(out: str = "data/shapes", train: int = 4000, val: int = 100, test: int = 1000, compositional: int = 300,
           seed: int = 0, image_size: int = 224) -> None:
    """Generate the shapes world: synthetic scenes with paraphrased captions and question/answer pairs.

    Writes OUT/SPLIT/{images/, captions.jsonl, vqa.json, coco_captions.json}; the compositional split holds
    colour-shape pairs that never appear in training. Splits already complete are kept.
    """
    sizes = {"train": train, "val": val, "test": test, "compositional": compositional}
    for split, path in generate(Path(out), sizes, ShapesConfig(image_size=image_size, seed=seed)).items():
        print(f"{split}: {path}")


def encoder_of(source: str) -> Parts:
    """A model with the image encoder that ``source`` (a model source or a recipe .yaml) names."""
    if source.endswith((".yaml", ".yml")):
        cfg = Recipe.load(recipe_file(source)).model
        return build(dataclasses.replace(cfg, llm=None), init_qformer=False)
    return load_parts(source)


def cache_features(data: list[str], out: str = "features", model: str = "default",
                   image_root: Annotated[str | None, "where relative image paths start (default: each data file's folder)"] = None,
                   batch_size: int = 64, workers: int = 0, dtype: str = "float16") -> None:
    """Run the frozen image encoder once over DATA and store its features in OUT (memory-mapped .npy shards).

    DATA: manifests (.jsonl/.csv), COCO or VQA JSON, WebDataset shards or shapes-world split folders; each distinct
    image is encoded once (eval preprocessing, no augmentation). MODEL is a model source or a recipe .yaml (a file or
    a packaged recipe such as shapes_stage1.yaml) whose model section names the encoder. Train from the cache with `data.feature_cache=OUT` in the recipe.
    """
    parts = encoder_of(model)
    identity = encoder_identity(parts.model.cfg.vision, parts.preprocess, parts.model.vision)
    cache_dataset_features(parts.model.image_features, identity, parts.preprocess, data, out, image_root=image_root,
                           batch_size=batch_size, num_workers=workers, dtype=dtype)
    print(f"features written to {out}")


def train(recipe: str, set: Annotated[list[str] | None, "KEY=VALUE recipe overrides"] = None,
          resume: Annotated[str | None, "auto (the newest complete checkpoint) or a step folder"] = None) -> None:
    """Train the stage a RECIPE describes (a YAML file, or a packaged recipe by name: shapes_stage1,
    shapes_retrieval, shapes_stage2_warmup, shapes_stage2, shapes_vqa); under torchrun this runs data-parallel.

    --set KEY=VALUE overrides recipe entries (e.g. --set train.steps=200 data.captions=[my.jsonl]).
    --resume auto continues the newest complete checkpoint in train.out_dir (or give a step folder).
    The final model is written to train.out_dir/final (load it with blip2.load or --model).
    """
    overrides = list(set or []) + ([f"train.resume={resume}"] if resume else [])
    final = run_recipe(Recipe.load(recipe_file(recipe), overrides))
    print(f"model written to {final}")


def plot(run: str, out: Annotated[str | None, "the PNG to write (default: RUN/curves.png)"] = None) -> None:
    """Draw a run's training curves (one panel per loss component, plus the learning rate) to a PNG."""
    print(plot_run(run, out))


def demo(
    full: Annotated[bool, "the longer plan aimed at every bar (above)"] = False,
    retrain: Annotated[bool, "train every phase again instead of reusing a finished one"] = False,
    data_root: Annotated[str | None, "the shapes world's folder (default: the plan's, above)"] = None,
    runs: Annotated[str | None, "where each phase's run goes (default: the plan's, above)"] = None,
    report: Annotated[str | None, "the report's folder (default: the plan's, above)"] = None,
    stage1_steps: Annotated[int | None, "stage-1 steps (default: the plan's)"] = None,
    retrieval_steps: Annotated[int | None, "retrieval fine-tune steps (default: the plan's)"] = None,
    stage2_steps: Annotated[int | None, "steps of each stage-2 phase (default: the plan's)"] = None,
    eval_limit: Annotated[int | None, "items evaluated per split (default: the plan's)"] = None,
    train_images: Annotated[int | None, "training scenes (default: the plan's)"] = None,
    test_images: Annotated[int | None, "test scenes (default: the plan's)"] = None,
    compositional_images: Annotated[int | None, "compositional scenes (default: the plan's)"] = None,
) -> None:
    """The main job: generate the shapes world, train stage 1 (then fine-tune it for retrieval) and stage 2 from the
    offline parts, evaluate retrieval, VQA, captions and chat against the untrained model and the blind prior, and
    write a report (metrics, training curves, captioned test images, a chat transcript). 18-28 minutes measured on
    2-core CPUs with native bf16, about 40 without (data/shapes, runs/demo, reports/demo). --full runs the longer
    plan that aims at every quality bar (6,000 training scenes; data/shapes-full, runs/full, reports/full; about 119
    minutes on a 2-core AMD EPYC with native bf16, by its phases' measured times). Kill it and run it again: it
    continues where it stopped; a trained phase is reused unless --retrain. A quick try: a few steps of each phase and
    a few images of each split (the options below)."""
    given = {name: value for name, value in (("data_root", data_root), ("runs", runs), ("report", report),
                                             ("eval_limit", eval_limit)) if value is not None}
    config = (DemoConfig.full_plan if full else DemoConfig)(
        stage1_steps=stage1_steps, retrieval_steps=retrieval_steps, stage2_steps=stage2_steps, retrain=retrain,
        **given)  # fmt: skip
    for split, count in (("train", train_images), ("test", test_images), ("compositional", compositional_images)):
        if count is not None:
            config.sizes[split] = count
    run_demo(config)
