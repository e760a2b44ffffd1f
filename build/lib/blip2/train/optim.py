"""The optimiser's parameter groups (weight decay, per-prefix learning-rate scales) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from blip2.config import ConfigError
from blip2.errors import InputError
from blip2.train.config import TrainConfig


def build_param_groups(model: nn.Module, cfg: TrainConfig,
                       param_groups: Callable[[nn.Module], list[dict]] | None = None) -> list[dict]:
    """AdamW groups over the trainable parameters, each with an ``lr_scale`` (default 1).

    ``param_groups(model)`` may split the trainable parameters into groups (e.g. ``{"params": ..., "lr_scale": 10}``);
    by default there is one. A group that does not set ``weight_decay`` is split in two: parameters with 2+ dims
    decay by ``cfg.weight_decay``; biases, norm weights and scalars such as ``temp`` (fewer than 2 dims) do not.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise InputError("the model has no parameter with requires_grad=True: there is nothing to train")
    groups = param_groups(model) if param_groups is not None else [{"params": trainable}]
    built, seen = [], set()
    for i, group in enumerate(groups):
        params = list(group["params"])
        for p in params:
            if not p.requires_grad:
                raise InputError(f"param group {i} holds the frozen parameter {names.get(id(p), '?')!r}: "
                                 "leave frozen parameters out of param_groups")
            if id(p) in seen:
                raise InputError(f"parameter {names.get(id(p), '?')!r} is in more than one param group")
            seen.add(id(p))
        options = {"lr_scale": 1.0, **{k: v for k, v in group.items() if k != "params"}}
        if "weight_decay" in group:
            built.append({**options, "params": params})
            continue
        for decay, members in ((cfg.weight_decay, [p for p in params if p.ndim >= 2]),
                               (0.0, [p for p in params if p.ndim < 2])):
            if members:
                built.append({**options, "weight_decay": decay, "params": members})
    missing = [names[id(p)] for p in trainable if id(p) not in seen]
    if missing:
        raise InputError(f"trainable parameters in no param group: {missing[:8]} ({len(missing)} in all); "
                         "add them to param_groups or set requires_grad=False")
    return built


def scaled_param_groups(model: nn.Module, lr_scales: Mapping[str, float]) -> list[dict]:
    """``TrainConfig.lr_scales`` applied: each trainable parameter takes the scale of the longest prefix of its name
    (whole dotted parts: "qformer" matches "qformer.layers.0...", not "qformer_x"), 1 if none; a scale of 0 freezes
    it (``requires_grad=False``, out of the optimizer). Returns param groups for ``build_param_groups``."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [prefix for prefix in lr_scales if not any(_under(name, prefix) for name in names)]
    if unmatched:
        tops = sorted({name.split(".")[0] for name in names})
        raise ConfigError(f"train.lr_scales prefixes {unmatched} match no parameter; names start with {tops}")
    by_scale: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefixes = [prefix for prefix in lr_scales if _under(name, prefix)]
        scale = float(lr_scales[max(prefixes, key=len)]) if prefixes else 1.0
        if scale == 0:
            param.requires_grad_(False)
        else:
            by_scale.setdefault(scale, []).append(param)
    return [{"params": params, "lr_scale": scale} for scale, params in by_scale.items()]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of ``cfg.lr`` for 0-based optimizer step ``step``: linear warm-up to 1 over ``warmup_steps``,
    then a cosine decay towards ``min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Every group's lr = ``cfg.lr * group["lr_scale"] * lr_factor(step)``; returns the unscaled lr."""
    lr = cfg.lr * lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
