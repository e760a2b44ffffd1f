"""One training loop for both BLIP-2 stages (and any model): data-parallel, mixed precision, resumable.

The trainer knows nothing about the model. It is given ``loss_fn(model, batch) -> {"loss": total, **components}``,
trains the parameters that have ``requires_grad`` with AdamW, and saves what ``state_fn(model)`` returns (by default
``model.trainable_state_dict()``). Launch with ``python`` for one process or ``torchrun --nproc_per_node=N`` for DDP
(or FSDP with ``fsdp: true``). ``cfg.batch_size`` is per process: one optimizer step sees
``batch_size * world_size * grad_accum`` examples.

A run killed at any point continues with ``resume: auto`` and ends with exactly the weights of an uninterrupted run:
model, optimizer, grad scaler, every rank's python/numpy/torch/CUDA generator states and the data position
(epoch, batches taken in it) are saved together in each checkpoint (see ``checkpointing``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from blip2.config import ConfigError, read_yaml_mapping
from blip2.train.checkpointing import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    TrainingCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    optimizer_from_files,
    optimizer_to_files,
    prune_checkpoints,
    remove_partial_saves,
    rng_from_files,
    rng_state,
    rng_to_files,
    save_training_checkpoint,
    set_rng_state,
    step_dir,
)
from blip2.train.distributed import (
    all_gather_json,
    all_reduce,
    average_gradients,
    barrier,
    clip_grad_norm,
    full_tensor,
    gradient_sync,
    is_distributed,
    is_main,
    setup_distributed,
    shard_like,
    wrap_ddp,
    wrap_fsdp,
)
from blip2.train.logging import RunLogger
from blip2.weights.checkpoint import check_state

log = logging.getLogger("blip2.train")

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
LossFn = Callable[[nn.Module, Any], dict[str, Tensor]]


# ---- configuration ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train; saved as YAML in the run folder and in every checkpoint.

    ``batch_size`` is per process; ``precision`` "bf16"/"fp16" autocasts on GPUs (fp16 with a GradScaler); on CPU
    "bf16" autocasts too (1.4-1.8x faster where the CPU has native bf16) and "fp16" falls back to fp32; "auto" is
    bf16 where the GPU or CPU computes bf16 natively and fp32 elsewhere; ``save_every`` 0 saves only at the end;
    ``resume`` is None, "auto" (the newest complete checkpoint in ``out_dir``, if any) or a checkpoint folder;
    ``fsdp`` shards the model across torchrun processes; ``lr_scales`` maps parameter-name prefixes to multipliers
    of ``lr`` (the longest matching prefix wins; 0 freezes), e.g. ``{qformer: 0, vision_norm: 0}`` trains only
    the LLM projection in stage 2 (``scaled_param_groups``).
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
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown train keys: {unknown} (known: {sorted(known)})")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"train config lacks required keys {missing}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml_mapping(path, "train config"))


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped before the bad step touched the weights."""


# ---- optimizer and learning-rate schedule -------------------------------------------------------------------------


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
        raise ValueError("the model has no parameter with requires_grad=True: there is nothing to train")
    groups = param_groups(model) if param_groups is not None else [{"params": trainable}]
    built, seen = [], set()
    for i, group in enumerate(groups):
        params = list(group["params"])
        for p in params:
            if not p.requires_grad:
                raise ValueError(f"param group {i} holds the frozen parameter {names.get(id(p), '?')!r}: "
                                 "leave frozen parameters out of param_groups")
            if id(p) in seen:
                raise ValueError(f"parameter {names.get(id(p), '?')!r} is in more than one param group")
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
        raise ValueError(f"trainable parameters in no param group: {missing[:8]} ({len(missing)} in all); "
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


# ---- data ------------------------------------------------------------------------------------------------------


def epoch_batches(num_examples: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's index batches for one epoch, as DistributedSampler + drop_last would deal them.

    One seeded permutation of the whole dataset per epoch, padded by wrapping around to a multiple of ``world``,
    dealt round-robin to the ranks, cut into full batches (the partial last one is dropped).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    order += order[: -len(order) % world]
    mine = order[rank::world]
    return [mine[i: i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


EPOCH_END = object()  # what BatchStream.next returns when the epoch has no more batches


class BatchStream:
    """This rank's collated batches, epoch after epoch; its position (epoch, batches taken) resumes exactly.

    Every epoch starts with ``dataset.set_epoch(epoch)`` when the dataset has one. A map-style dataset is read in the
    order of ``epoch_batches``. An IterableDataset must yield this rank's share itself (e.g. webdataset's
    ``split_by_node``); it is re-iterated every epoch, and resuming mid-epoch reads and drops the batches taken.
    The loader never draws from the global generators, so the training randomness does not depend on it.
    """

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn: Callable | None, num_workers: int,
                 seed: int, rank: int, world: int, pin_memory: bool = False):
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.num_workers, self.seed, self.rank, self.world, self.pin_memory = num_workers, seed, rank, world, pin_memory
        self.iterable = isinstance(dataset, IterableDataset)
        if not self.iterable and not epoch_batches(len(dataset), batch_size, 0, seed, rank, world):
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one batch per process "
                             f"(batch_size {batch_size} x {world} processes): lower batch_size or add data")
        self.epoch, self.taken = 0, 0
        self._iterator = None

    def seek(self, epoch: int, batches: int) -> None:
        """Continue at batch ``batches`` of ``epoch``."""
        self.epoch, self.taken = epoch, batches
        self._iterator = self._open()

    def next_epoch(self) -> None:
        self.epoch, self.taken = self.epoch + 1, 0
        self._iterator = None

    def next(self) -> Any:
        """The next collated batch (possibly None or empty when the collate dropped every example), or EPOCH_END."""
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator, EPOCH_END)
        if batch is not EPOCH_END:
            self.taken += 1
        return batch

    def _open(self):
        options = dict(
            collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch),  # workers' seeds
        )
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if not self.iterable:
            batches = epoch_batches(len(self.dataset), self.batch_size, self.epoch, self.seed, self.rank, self.world)
            return iter(DataLoader(self.dataset, batch_sampler=batches[self.taken:], **options))
        iterator = iter(DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True, **options))
        skipped = sum(1 for _ in itertools.islice(iterator, self.taken))
        self.taken = skipped  # a position past the end of a shorter epoch means: at its end
        return iterator


def batch_size_of(batch: Any) -> int:
    """Examples in a collated batch: the leading size of the first tensor in it (depth-first through mappings, lists
    and tuples); 0 when it holds no tensor at all (None, or a collate that dropped every example and kept only a
    list of what was bad)."""
    size = _first_tensor_rows(batch)
    return 0 if size is None else size


def _first_tensor_rows(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    children = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for child in children:
        rows = _first_tensor_rows(child)
        if rows is not None:
            return rows
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested) batch moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---- model plumbing -------------------------------------------------------------------------------------------


class LossForward(nn.Module):
    """``loss_fn(model, batch)`` as one module call, so DDP and FSDP see the whole loss as a single forward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> dict[str, Tensor]:
        return self.loss_fn(self.model, batch)


def refuse_to_overwrite(cfg: TrainConfig) -> None:
    """A fresh run (no ``resume``) must not write over the checkpoints of an earlier run in the same ``out_dir``."""
    if cfg.resume is None and list_checkpoints(cfg.out_dir):
        raise ConfigError(
            f"{cfg.out_dir} already holds checkpoints of an earlier run (newest: {list_checkpoints(cfg.out_dir)[-1].name}): "
            "continue it with resume: auto (--resume auto), or start over in another train.out_dir (or delete this one)"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust oneDNN's own check
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_train_mode(module: nn.Module) -> None:
    """``module.train()``, then every sub-tree whose parameters are all frozen back to ``eval()``: a frozen encoder or
    LLM keeps dropout off and its norms on their running statistics."""
    module.train()
    _frozen_subtrees_to_eval(module)


def _frozen_subtrees_to_eval(module: nn.Module) -> None:
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _frozen_subtrees_to_eval(child)


def default_state_fn(model: nn.Module) -> dict[str, Tensor]:
    """What to save: ``model.trainable_state_dict()`` when the model has it, else its whole state_dict."""
    trainable = getattr(model, "trainable_state_dict", None)
    return trainable() if callable(trainable) else model.state_dict()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CUDA generators too


# ---- the trainer ---------------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` on ``dataset`` by minimising ``loss_fn(model, batch)["loss"]``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        dataset: Dataset,
        cfg: TrainConfig,
        collate_fn: Callable | None = None,
        param_groups: Callable[[nn.Module], list[dict]] | None = None,
        state_fn: Callable[[nn.Module], dict[str, Tensor]] | None = None,
        batch_hook: Callable[[Any], None] | None = None,
    ):
        self.cfg = cfg
        refuse_to_overwrite(cfg)
        self.batch_hook = batch_hook  # sees every collated batch in the main process (e.g. to count bad images)
        self.rank, self.world, _, self.device = setup_distributed()
        self.model = model.to(self.device)
        self.state_fn = state_fn or default_state_fn
        self.autocast_dtype = self._autocast_dtype()
        if cfg.lr_scales:
            if param_groups is not None:
                raise ConfigError("give either train.lr_scales or param_groups, not both")
            param_groups = partial(scaled_param_groups, lr_scales=cfg.lr_scales)
            param_groups(self.model)  # freezes the 0-scaled parameters before a DDP/FSDP wrapper registers them
        self.engine: nn.Module = LossForward(self.model, loss_fn)
        self._replicated: list[nn.Parameter] = []  # trainable parameters whose gradients no wrapper averages
        if cfg.fsdp:
            self.engine, self._replicated = wrap_fsdp(self.engine)  # new parameters: build the optimizer after this
        elif self.world > 1:
            self.engine = wrap_ddp(self.engine, self.device)
        groups = build_param_groups(self.model, cfg, param_groups)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        names = {id(p): name for name, p in self.model.named_parameters()}
        self._trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._param_names = [names[id(p)] for p in self._trainable]
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.data = BatchStream(dataset, cfg.batch_size, collate_fn, cfg.num_workers, cfg.seed, self.rank,
                                self.world, pin_memory=self.device.type == "cuda")
        self.step = 0

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.cfg.precision
        if precision == "auto":  # bf16 where the hardware computes it natively, else fp32
            native = torch.cuda.is_bf16_supported() if self.device.type == "cuda" else cpu_has_native_bf16()
            precision = "bf16" if native else "fp32"
        if precision == "fp32":
            return None
        if self.device.type != "cuda":
            if precision == "bf16":  # CPU autocast: fast where the CPU has native bf16 (AVX512-BF16, AMX)
                if not cpu_has_native_bf16():
                    _info("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 will be slower than fp32", logging.WARNING)
                return torch.bfloat16
            _info(f"precision {precision} needs a GPU; training in fp32 on {self.device}", logging.WARNING)
            return None
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision bf16 is not supported by this GPU: use fp16 or fp32")
        return torch.bfloat16 if precision == "bf16" else torch.float16

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train up to ``cfg.steps`` optimizer steps (continuing a checkpoint when ``cfg.resume`` says so); returns the
        last logged metrics plus the final checkpoint's path."""
        cfg = self.cfg
        checkpoint, where = self._checkpoint_to_resume()
        position, elapsed, record = {"epoch": 0, "batches": 0}, 0.0, None
        if checkpoint is not None:
            position, elapsed, record = self._restore(checkpoint, where)
        if is_main():
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            cfg.save(Path(cfg.out_dir) / CONFIG_FILE)
            for leftover in remove_partial_saves(cfg.out_dir):
                _info(f"removed {leftover}, left behind by an interrupted save")
            _info(self._parameter_summary())
        logger = RunLogger(cfg.out_dir, cfg.steps, self.step, cfg.log_every, elapsed, enabled=is_main())
        try:
            self.data.seek(position["epoch"], position["batches"])  # an iterable dataset may read here: before RNG
            self._set_random_state(checkpoint)
            set_train_mode(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            while self.step < cfg.steps:
                losses, samples = self._accumulate_gradients()
                if not all(math.isfinite(v) for v in losses.values()):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(self._non_finite_message(losses))
                grad_norm = self._clip_gradients()
                lr = set_learning_rates(self.optimizer, cfg, self.step)
                self._optimizer_step()
                self.step += 1
                record = logger.step(self.step, self.data.epoch, lr, losses, samples, grad_norm) or record
                if self.step == cfg.steps or (cfg.save_every and self.step % cfg.save_every == 0):
                    self._save(logger.elapsed(), record)
            barrier()
        finally:
            logger.close()
        return {**(record or {}), "checkpoint": str(step_dir(cfg.out_dir, self.step))}

    def _next_batch(self) -> tuple[Any, int]:
        """The next batch every rank can use, and its local size.

        Ranks agree on each batch: when any rank's is empty (its collate dropped everything) all skip it, and when
        any rank's epoch ends all start the next one, so DDP's collectives stay in step and one data position
        describes every rank.
        """
        epochs_started = 0
        while True:
            batch = self.data.next()
            if self.batch_hook is not None and batch is not EPOCH_END:
                self.batch_hook(batch)
            local = -1 if batch is EPOCH_END else batch_size_of(batch)
            agreed = local
            if self.world > 1:
                agreed = int(all_reduce(torch.tensor([local], device=self.device), "min").item())
            if agreed > 0:
                return batch, local
            if agreed < 0:
                if epochs_started:
                    raise RuntimeError(f"epoch {self.data.epoch} had no non-empty batch: collate_fn dropped every "
                                       "example (are the images readable? is the dataset empty?)")
                epochs_started += 1
                self.data.next_epoch()

    def _accumulate_gradients(self) -> tuple[dict[str, float], int]:
        """Forward and backward over ``grad_accum`` micro-batches -> (loss components averaged over micro-batches and
        ranks, examples seen by all ranks)."""
        accum = self.cfg.grad_accum
        totals, samples, names = None, 0, []
        for micro in range(accum):
            batch, size = self._next_batch()
            with gradient_sync(self.engine, enabled=micro == accum - 1):
                with torch.autocast(self.device.type, self.autocast_dtype) if self.autocast_dtype else nullcontext():
                    out = self.engine(to_device(batch, self.device))
                if "loss" not in out:
                    raise KeyError(f"loss_fn must return a dict with a 'loss' entry (the total to minimise); "
                                   f"it returned {sorted(out)}")
                loss = out["loss"] / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            names = list(out)
            values = torch.stack([torch.as_tensor(v, device=self.device).detach().double() for v in out.values()])
            totals = values / accum if totals is None else totals + values / accum
            samples += size
        average_gradients(self._replicated)
        reduced = all_reduce(torch.cat([totals, torch.tensor([samples], dtype=torch.float64, device=self.device)]))
        means = (reduced[:-1] / self.world).tolist()
        return dict(zip(names, means)), int(reduced[-1].item())

    def _clip_gradients(self) -> float | None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm is None:
            return None
        return clip_grad_norm(self._trainable, self.cfg.clip_grad_norm)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _non_finite_message(self, losses: dict[str, float]) -> str:
        parts = ", ".join(f"{name}={value:.6g}" for name, value in losses.items())
        last = latest_checkpoint(self.cfg.out_dir)
        return (f"step {self.step + 1}: the loss is not finite ({parts}); the run stopped before this step changed "
                f"the weights. Last good checkpoint: {last or 'none (nothing saved yet)'}. Lower lr, set "
                "clip_grad_norm, prefer bf16 to fp16, or check the data, then continue with resume: auto")

    def _parameter_summary(self) -> str:
        trainable = sum(p.numel() for p in self._trainable)
        total = sum(p.numel() for p in self.model.parameters())
        return (f"{self.world} process(es) on {self.device}; trainable parameters {trainable:,}, "
                f"frozen {total - trainable:,}; {len(self.optimizer.param_groups)} optimizer groups")

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def _save(self, elapsed: float, record: dict[str, Any] | None) -> None:
        """Every rank gathers (model and optimizer shards under FSDP, its generator states); rank 0 writes."""
        model_state = {k: full_tensor(v) for k, v in self.state_fn(self.model).items()}
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {
            index: {field: full_tensor(v) if isinstance(v, Tensor) else v for field, v in fields.items()}
            for index, fields in optimizer_state["state"].items()
        }
        optimizer_tensors, optimizer_meta = optimizer_to_files(optimizer_state, self._param_names)
        rng_tensors, rng_json = rng_to_files(all_gather_json(rng_state(), self.device))
        if not is_main():
            return
        state = {
            "step": self.step,
            "epoch": self.data.epoch,
            "batches": self.data.taken,
            "world_size": self.world,
            "batch_size": self.cfg.batch_size,
            "elapsed_s": elapsed,
            "optimizer": optimizer_meta,
            "schedule": {"kind": "linear warm-up, cosine decay", "lr": self.cfg.lr,
                         "warmup_steps": self.cfg.warmup_steps, "steps": self.cfg.steps,
                         "min_lr_ratio": self.cfg.min_lr_ratio, "factor": lr_factor(self.step - 1, self.cfg)},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "metrics": record,
            "rng": rng_json,  # long: last
        }
        checkpoint = TrainingCheckpoint(model_state, optimizer_tensors, rng_tensors, state, self.cfg.to_dict())
        directory = save_training_checkpoint(checkpoint, step_dir(self.cfg.out_dir, self.step))
        prune_checkpoints(self.cfg.out_dir, self.cfg.keep_last)
        _info(f"saved {directory}")

    def _checkpoint_to_resume(self) -> tuple[TrainingCheckpoint | None, Path | None]:
        resume = self.cfg.resume
        if resume is None:
            return None, None
        directory = latest_checkpoint(self.cfg.out_dir) if resume == "auto" else Path(resume)
        if directory is None:
            _info(f"resume: auto found no checkpoint in {self.cfg.out_dir}; starting at step 0")
            return None, None
        return load_training_checkpoint(directory), directory

    def _restore(self, ckpt: TrainingCheckpoint, where: Path) -> tuple[dict[str, int], float, dict | None]:
        """Load weights, optimizer and scaler; returns (data position, elapsed seconds, last metrics)."""
        expected = self.state_fn(self.model)
        check_state(ckpt.model, expected, str(where / MODEL_FILE))
        current = self.model.state_dict()
        foreign = sorted(set(ckpt.model) - set(current))
        if foreign:
            raise CheckpointError(f"state_fn returns keys that are not in model.state_dict(): {foreign[:8]}; "
                                  "a custom state_fn must keep the model's own key names")
        self.model.load_state_dict({k: shard_like(v, current[k]) for k, v in ckpt.model.items()}, strict=False)
        optimizer_state = optimizer_from_files(
            ckpt.optimizer, ckpt.state["optimizer"], self.optimizer.state_dict(), self._param_names, str(where))
        for index, fields in optimizer_state["state"].items():  # laid out like their parameter (sharded under FSDP)
            for field, value in fields.items():
                if isinstance(value, Tensor):
                    fields[field] = shard_like(value, self._trainable[index])
        self.optimizer.load_state_dict(optimizer_state)
        if self.scaler is not None and ckpt.state["scaler"]:
            self.scaler.load_state_dict(ckpt.state["scaler"])
        self.step = ckpt.step
        self._warn_about_changes(ckpt, where)
        position = {"epoch": ckpt.state["epoch"], "batches": ckpt.state["batches"]}
        old_global = ckpt.state["world_size"] * ckpt.state["batch_size"]
        new_global = self.world * self.cfg.batch_size
        if old_global != new_global and not self.data.iterable:  # same examples taken, counted in the new batch size
            position["batches"] = position["batches"] * old_global // new_global
        _info(f"resumed from {where} at step {self.step} (epoch {position['epoch']}, batch {position['batches']})")
        return position, ckpt.state["elapsed_s"], ckpt.state["metrics"]

    def _warn_about_changes(self, ckpt: TrainingCheckpoint, where: Path) -> None:
        now = self.cfg.to_dict()
        changed = {k: (v, now.get(k)) for k, v in ckpt.config.items()
                   if k not in ("resume", "out_dir") and now.get(k) != v}
        if changed:
            _info(f"resuming {where} with changed settings {changed} (checkpoint, now): the run will not match an "
                  "uninterrupted one", logging.WARNING)
        if ckpt.state["world_size"] != self.world:
            _info(f"resuming a {ckpt.state['world_size']}-process checkpoint with {self.world} processes: the data "
                  "order and randomness continue approximately, not exactly", logging.WARNING)
        newer = [p.name for p in list_checkpoints(self.cfg.out_dir) if int(p.name.split("-")[1]) > ckpt.step]
        if newer:
            _info(f"{self.cfg.out_dir} holds checkpoints newer than the one resumed ({newer}); "
                  "this run will replace them as it reaches their steps", logging.WARNING)

    def _set_random_state(self, ckpt: TrainingCheckpoint | None) -> None:
        """Resumed runs restore this rank's saved generator states; fresh runs (and ranks a checkpoint lacks) seed every
        generator with ``seed + rank + step``."""
        if ckpt is not None:
            state = rng_from_files(ckpt.rng, ckpt.state["rng"], self.rank)
            if state is not None:
                set_rng_state(state)
                return
        seed_everything(self.cfg.seed + self.rank + self.step)


def _info(message: str, level: int = logging.INFO) -> None:
    """Log on rank 0 only."""
    if is_main():
        log.log(level, message)
