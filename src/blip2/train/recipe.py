"""Recipes: one YAML file says which stage, which model, which data and how to train; ``run_recipe`` does it.

```yaml
stage: 1                      # 1: Q-Former + frozen encoder (ITC/ITM/ITG); 2: + projection + frozen LLM
model: {vision: {...}, qformer: {...}, llm: null}   # a Blip2Config (see blip2/config.py)
init: null                    # stage 2: the stage-1 checkpoint to start from; stage 1: a stage-1 run to train on
losses: null                  # stage 1: the losses trained, e.g. [itc] (null: BLIP-2's itc, itm and itg)
data: {captions: [path, ...], vqa: [path, ...], chat: [path, ...], feature_cache: null, captions_per_image: 1, caption_index: null,
       question_type_repeats: {}, one_source_per_batch: false, augment: true}
train: {steps: 1000, batch_size: 64, lr: 1e-4, out_dir: runs/stage1, ...}   # a TrainConfig
```
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from torch.utils.data import ConcatDataset

from blip2.config import (
    Blip2Config,
    ConfigError,
    from_mapping,
    parse_yaml,
    read_yaml_mapping,
)
from blip2.data.bad_images import BadImageCounter
from blip2.data.collate import Stage1Collate, Stage2Collate
from blip2.data.datasets import open_dataset
from blip2.data.feature_cache import FeatureCache, encoder_identity
from blip2.data.records import check_question_type_repeats
from blip2.distributed import is_main
from blip2.factory import Parts, build
from blip2.io import check_writable, read_safetensors, write_atomically
from blip2.train.config import TrainConfig
from blip2.train.stages import stage1_step, stage2_step
from blip2.train.trainer import Trainer
from blip2.weights.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from blip2.weights.keymap import check_state

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Training data. Any format ``open_dataset`` reads: a manifest (.jsonl/.csv), COCO or VQA JSON, WebDataset
    shards, or a shapes-world split folder."""

    captions: list[str] = field(default_factory=list)
    vqa: list[str] = field(default_factory=list)  # stage 2 only: question/answer pairs mixed with the captions
    chat: list[str] = field(default_factory=list)  # stage 2 only: conversations, trained as chat renders them
    image_root: str | None = None
    feature_cache: str | None = None  # a folder from `blip2 cache-features`: no image decoding, no augmentation
    captions_per_image: int = 1  # captions of each image per epoch (more weighs captions up against data.vqa)
    caption_index: int | None = None  # train on only this caption of every image (e.g. the form retrieval asks in)
    question_type_repeats: dict[str, int] = field(default_factory=dict)  # {question_type: n}: n copies per epoch
    one_source_per_batch: bool = False  # each batch from one of captions / vqa / chat: no row padded to another's length
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
    losses: list[Literal["itc", "itm", "itg"]] | None = None  # stage 1's trained losses; None: all three

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if self.losses is not None and self.stage == 2:
            raise ConfigError("losses chooses among stage 1's (itc, itm, itg); stage 2 trains language modelling: "
                              "remove losses from this stage-2 recipe")
        if self.losses is not None and (not self.losses or len(set(self.losses)) < len(self.losses)):
            raise ConfigError(f"losses must name each trained loss once, e.g. [itc] or [itc, itm]; got {self.losses}")
        if self.stage == 2 and self.model.llm is None:
            raise ConfigError("a stage-2 recipe needs model.llm (the frozen LLM the Q-Former learns to prompt)")
        if self.stage == 1 and (self.data.vqa or self.data.chat):
            raise ConfigError("stage 1 trains on captions only: move data.vqa and data.chat to a stage-2 recipe")
        if not self.data.captions and not self.data.vqa and not self.data.chat:
            raise ConfigError("the recipe names no training data: set data.captions (and/or data.vqa, data.chat for "
                              "stage 2)")
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
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        """A recipe from its YAML mapping: every section and value type-checked, errors naming the key."""
        try:
            return from_mapping(cls, data, "")
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "Recipe":
        data = read_yaml_mapping(path, "recipe")
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "init": self.init, "losses": self.losses, "model": self.model.to_dict(),
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
    node[leaf] = parse_yaml(value, f"override {item!r}")


class MixedDataset(ConcatDataset):
    """Several datasets as one (e.g. captions + VQA), passing ``set_epoch`` on."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


def build_stage_model(recipe: Recipe) -> Parts:
    """Without ``init``: a fresh (BERT-initialised) Q-Former. With it: the Q-Former of ``init`` (a stage-1 run to
    train on, e.g. a retrieval fine-tune); in stage 2 plus a new LLM projection, or ``init``'s own projection when
    ``init`` is a stage-2 run (e.g. a projection-only first phase)."""
    if recipe.init is None:
        if recipe.stage == 2:
            logger.warning("stage 2 without init: the Q-Former starts from BERT, not from stage-1 representation learning")
        return build(recipe.model)
    parts = build(recipe.model, init_qformer=False)
    model = parts.model
    state = read_safetensors(Path(recipe.init) / WEIGHTS_NAME)
    expected = {k: v for k, v in model.trainable_state_dict().items() if not k.startswith("llm_proj.")}
    check_state({k: v for k, v in state.items() if not k.startswith("llm_proj.")}, expected, str(recipe.init))
    model.load_state_dict(state, strict=False)  # every stage-1 key checked above; llm_proj too when init has one
    return parts


def build_dataset(recipe: Recipe, parts: Parts):
    data = recipe.data
    model, preprocess = parts.model, parts.preprocess
    if data.feature_cache:
        transform = FeatureCache(data.feature_cache, expect=encoder_identity(model.cfg.vision, preprocess, model.vision))
    elif data.augment:
        transform = preprocess.train_transform(hflip=data.hflip)
    else:
        transform = preprocess.eval_transform()
    parts = [open_dataset(p, transform=transform, task="caption", train=True, image_root=data.image_root,
                          seed=recipe.train.seed, captions_per_image=data.captions_per_image,
                          caption_index=data.caption_index) for p in data.captions]
    parts += [open_dataset(p, transform=transform, task="vqa", image_root=data.image_root,
                           question_type_repeats=data.question_type_repeats) for p in data.vqa]
    parts += [open_dataset(p, transform=transform, task="chat", image_root=data.image_root) for p in data.chat]
    return parts[0] if len(parts) == 1 else MixedDataset(parts)


def stage2_collate(recipe: Recipe, parts: Parts) -> Stage2Collate:
    llm = parts.model.llm
    return Stage2Collate(
        parts.llm_tokenizer, recipe.model.llm.max_text_len, seed=recipe.train.seed,
        decoder_start_token_id=llm.model.config.decoder_start_token_id if llm.is_encoder_decoder else None,
        qformer_tokenizer=parts.qformer_tokenizer if recipe.model.llm.prompt_to_qformer else None,
        qformer_max_len=recipe.model.qformer.max_text_len,
        num_visual=parts.model.num_visual, per_turn=recipe.model.llm.visual_prompt_per_turn,
    )  # fmt: skip


def run_recipe(recipe: Recipe) -> Path:
    """Train as the recipe says; returns the final model folder (``out_dir/final``), loadable by ``blip2.load``."""
    check_writable(recipe.train.out_dir, "train.out_dir")  # before the model is built
    parts = build_stage_model(recipe)
    model = parts.model
    dataset = build_dataset(recipe, parts)
    if recipe.stage == 1:
        collate = Stage1Collate(parts.qformer_tokenizer, recipe.model.qformer.max_text_len)
        step = functools.partial(stage1_step, losses=tuple(recipe.losses)) if recipe.losses else stage1_step
    else:
        collate, step = stage2_collate(recipe, parts), stage2_step
    out_dir = Path(recipe.train.out_dir)
    bad_images = BadImageCounter(recipe.data.max_bad_images)
    mixture = dataset.datasets if recipe.data.one_source_per_batch and isinstance(dataset, MixedDataset) else None
    trainer = Trainer(model, step, dataset, recipe.train, collate_fn=collate, batch_hook=bad_images.update,
                      batch_groups=[len(d) for d in mixture] if mixture else None)
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
