"""Recipes: one YAML file says which stage, which model, which data and how to train; ``run_recipe`` does it.

```yaml
stage: 1                      # 1: Q-Former + frozen encoder (ITC/ITM/ITG); 2: + projection + frozen LLM
model: {vision: {...}, qformer: {...}, llm: null}   # a Blip2Config (see blip2/config.py)
init: null                    # stage 2: the stage-1 checkpoint to start from; stage 1: a stage-1 run to train on
data: {captions: [path, ...], vqa: [path, ...], feature_cache: null, captions_per_image: 1, caption_index: null,
       question_type_repeats: {}, augment: true}
train: {steps: 1000, batch_size: 64, lr: 1e-4, out_dir: runs/stage1, ...}   # a TrainConfig
```
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import ConcatDataset

from blip2.api import build_model
from blip2.config import Blip2Config, ConfigError, parse_yaml, read_yaml_mapping
from blip2.data.datasets import BadImageCounter, check_question_type_repeats, open_dataset
from blip2.data.feature_cache import FeatureCache, encoder_identity
from blip2.train.distributed import is_main
from blip2.train.stages import Stage1Collate, Stage2Collate, stage1_step, stage2_step
from blip2.train.trainer import TrainConfig, Trainer
from blip2.weights.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_state, read_weights, write_atomically

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Training data. Any format ``open_dataset`` reads: a manifest (.jsonl/.csv), COCO or VQA JSON, WebDataset
    shards, or a shapes-world split folder."""

    captions: list[str] = field(default_factory=list)
    vqa: list[str] = field(default_factory=list)  # stage 2 only: question/answer pairs mixed with the captions
    image_root: str | None = None
    feature_cache: str | None = None  # a folder from `blip2 cache-features`: no image decoding, no augmentation
    captions_per_image: int = 1  # captions of each image per epoch (more weighs captions up against data.vqa)
    caption_index: int | None = None  # train on only this caption of every image (e.g. the form retrieval asks in)
    question_type_repeats: dict[str, int] = field(default_factory=dict)  # {question_type: n}: n copies per epoch
    augment: bool = True  # BLIP-2's random resized crop (ignored with a feature cache)
    hflip: bool = False  # off by default: flipping breaks "left"/"right" in captions
    max_bad_images: float | int | None = 0.01


@dataclass
class Recipe:
    stage: int
    model: Blip2Config
    data: DataConfig
    train: TrainConfig
    init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = Blip2Config.from_dict(self.model)
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and self.model.llm is None:
            raise ConfigError("a stage-2 recipe needs model.llm (the frozen LLM the Q-Former learns to prompt)")
        if self.stage == 1 and self.data.vqa:
            raise ConfigError("stage 1 trains on captions only: move data.vqa to a stage-2 recipe")
        if not self.data.captions and not self.data.vqa:
            raise ConfigError("the recipe names no training data: set data.captions (and/or data.vqa for stage 2)")
        if not isinstance(self.data.question_type_repeats, dict):
            raise ConfigError("data.question_type_repeats must be a mapping {question_type: n}, e.g. {position: 3}; "
                              f"got {self.data.question_type_repeats!r}")
        try:
            check_question_type_repeats(self.data.question_type_repeats)
        except ValueError as error:
            raise ConfigError(f"data.{error}") from None
        if self.data.question_type_repeats and not self.data.vqa:
            raise ConfigError("data.question_type_repeats weighs the questions of data.vqa, which is empty: "
                              "set data.vqa or remove data.question_type_repeats")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "Recipe":
        data = read_yaml_mapping(path, "recipe")
        for item in overrides or []:
            apply_override(data, item)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{path}: unknown recipe keys {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "init": self.init, "model": self.model.to_dict(),
                "data": dataclasses.asdict(self.data), "train": self.train.to_dict()}


def apply_override(data: dict, item: str) -> None:
    """``train.steps=200`` -> data["train"]["steps"] = 200 (the value is parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=200)")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[leaf] = parse_yaml(value)


class MixedDataset(ConcatDataset):
    """Several datasets as one (e.g. captions + VQA), passing ``set_epoch`` on."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


def build_stage_model(recipe: Recipe):
    """Without ``init``: a fresh (BERT-initialised) Q-Former. With it: the Q-Former of ``init`` (a stage-1 run to
    train on, e.g. a retrieval fine-tune); in stage 2 plus a new LLM projection, or ``init``'s own projection when
    ``init`` is a stage-2 run (e.g. a projection-only first phase)."""
    if recipe.init is None:
        if recipe.stage == 2:
            logger.warning("stage 2 without init: the Q-Former starts from BERT, not from stage-1 representation learning")
        return build_model(recipe.model)
    model = build_model(recipe.model, init_qformer=False)
    state = read_weights(Path(recipe.init) / WEIGHTS_NAME)
    expected = {k: v for k, v in model.trainable_state_dict().items() if not k.startswith("llm_proj.")}
    check_state({k: v for k, v in state.items() if not k.startswith("llm_proj.")}, expected, str(recipe.init))
    model.load_state_dict(state, strict=False)  # every stage-1 key checked above; llm_proj too when init has one
    return model


def build_dataset(recipe: Recipe, model):
    data = recipe.data
    if data.feature_cache:
        transform = FeatureCache(data.feature_cache, expect=encoder_identity(model.cfg.vision, model.vision.preprocess))
    elif data.augment:
        transform = model.vision.preprocess.train_transform(hflip=data.hflip)
    else:
        transform = model.vision.preprocess.eval_transform()
    parts = [open_dataset(p, transform=transform, task="caption", train=True, image_root=data.image_root,
                          seed=recipe.train.seed, captions_per_image=data.captions_per_image,
                          caption_index=data.caption_index) for p in data.captions]
    parts += [open_dataset(p, transform=transform, task="vqa", image_root=data.image_root,
                           question_type_repeats=data.question_type_repeats) for p in data.vqa]
    return parts[0] if len(parts) == 1 else MixedDataset(parts)


def run_recipe(recipe: Recipe) -> Path:
    """Train as the recipe says; returns the final model folder (``out_dir/final``), loadable by ``blip2.load``."""
    model = build_stage_model(recipe)
    dataset = build_dataset(recipe, model)
    if recipe.stage == 1:
        collate, step = Stage1Collate(model.tokenizer, recipe.model.qformer.max_text_len), stage1_step
    else:
        collate, step = Stage2Collate(model.llm, recipe.model.llm.max_text_len, seed=recipe.train.seed), stage2_step
    out_dir = Path(recipe.train.out_dir)
    bad_images = BadImageCounter(recipe.data.max_bad_images)
    trainer = Trainer(model, step, dataset, recipe.train, collate_fn=collate, batch_hook=bad_images.update)
    if is_main():  # after the Trainer accepted out_dir (it refuses another run's checkpoints)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    result = trainer.fit()
    if bad_images.bad:
        logger.warning(bad_images.summary())
    final = out_dir / "final"

    def write_final(tmp: Path) -> None:  # the last step checkpoint already holds the (gathered) trainable weights
        model.cfg.save(tmp / CONFIG_NAME)
        shutil.copy(Path(result["checkpoint"]) / WEIGHTS_NAME, tmp / WEIGHTS_NAME)

    if is_main():
        write_atomically(final, write_final)
    return final
