"""How to train: ``TrainConfig``, saved as YAML in the run folder and in every checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blip2.config import ConfigError, from_mapping, read_yaml_mapping

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass
class TrainConfig:
    """How to train; saved as YAML in the run folder and in every checkpoint.

    ``batch_size`` is per process; ``precision`` "bf16"/"fp16" autocasts on GPUs (fp16 with a GradScaler); on CPU
    "bf16" autocasts too (1.4-1.8x faster where the CPU has native bf16, ~22x slower where not) and "fp16" falls
    back to fp32; "auto" is bf16 where the GPU or CPU computes bf16 natively and fp32 elsewhere; ``save_every`` 0
    saves only at the end; ``resume`` is None, "auto" (the newest complete checkpoint in ``out_dir``, if any) or a
    checkpoint folder; ``fsdp`` shards the model across torchrun processes; ``lr_scales`` maps parameter-name
    prefixes to multipliers of ``lr`` (the longest matching prefix wins; 0 freezes), e.g. ``{qformer: 0,
    vision_norm: 0}`` trains only the LLM projection in stage 2 (``scaled_param_groups``); ``fused_optimizer`` runs
    AdamW as torch's fused kernel (one pass over every parameter: on a 2-core CPU about 5x faster than the
    per-tensor loop, the full demo plan's steps about 1.1x faster); it rounds differently, so a run is a different
    draw than with torch's default (the loop on CPU, foreach on CUDA); ``math_attention`` runs the training
    forward's attention through torch's math SDPA backend, whose backward is autograd's (on CPU, torch's
    flash-attention backward costs about 10x its forward at BLIP-2's short sequences: the demo's stage-2 steps about
    1.2x faster), also a different draw; a CPU option (on GPUs torch's fused kernels are the faster ones).
    """

    steps: int
    batch_size: int
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    precision: str = "fp32"
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    out_dir: str = "runs/run"
    resume: str | None = None
    fsdp: bool = False
    lr_scales: dict[str, float] = field(default_factory=dict)
    fused_optimizer: bool = False
    math_attention: bool = False

    def __post_init__(self) -> None:
        at_least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "keep_last": 1, "log_every": 1,
                    "warmup_steps": 0, "save_every": 0, "num_workers": 0, "seed": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"train.{name} must be >= {low}, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"train.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        bad = {prefix: scale for prefix, scale in self.lr_scales.items() if not prefix or isinstance(scale, bool)
               or not isinstance(scale, (int, float)) or scale < 0}
        if bad:
            raise ConfigError(f"train.lr_scales maps parameter-name prefixes to scales >= 0 (0 freezes), got {bad}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Each field's default (required fields left out): what a config saved before a field existed meant."""
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return from_mapping(cls, data, "train")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml_mapping(path, "train config"))
