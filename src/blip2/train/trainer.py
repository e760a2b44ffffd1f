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

import fcntl
import logging
import math
import os
import random
import socket
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

from blip2.config import ConfigError
from blip2.distributed import (
    all_gather_json,
    all_reduce,
    barrier,
    is_main,
    rank_and_world,
    setup_distributed,
)
from blip2.errors import InputError
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
from blip2.train.config import TrainConfig
from blip2.train.logging import RunLogger
from blip2.train.optim import (
    build_param_groups,
    lr_factor,
    scaled_param_groups,
    set_learning_rates,
)
from blip2.train.parallel import (
    average_gradients,
    clip_grad_norm,
    full_tensor,
    gradient_sync,
    shard_like,
    wrap_ddp,
    wrap_fsdp,
)
from blip2.train.stream import EPOCH_END, BatchStream, batch_size_of, to_device
from blip2.weights.keymap import check_state

log = logging.getLogger("blip2.train")

LossFn = Callable[[nn.Module, Any], dict[str, Tensor]]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped before the bad step touched the weights."""


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
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is far slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust oneDNN's own check
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "avx512_bf16" in flags or "amx_bf16" in flags


class FrozenWeightCopies:
    """On CPU, the frozen ``nn.Linear`` weights and biases held in autocast's dtype for the training steps.

    Autocast casts every fp32 weight to bf16 at every forward, the frozen LLM's included (a fifth of a demo stage-2
    step on a 2-core CPU: 135M weights read and written again each step). These copies hold the same values (the
    cast is the same rounding), made once per ``fit`` after a resumed checkpoint is loaded (one per tensor, however
    many modules share it); ``swapped_in()`` puts them in place for a forward and puts the fp32 originals back
    after, so saving and everything outside a step see the model as it was. GPUs cast fast and their frozen LLMs
    usually load in bf16/fp16 already: nothing is copied there (nor under FSDP).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, device: torch.device, fsdp: bool):
        self.copies: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        if dtype is None or device.type != "cpu" or fsdp:
            return
        made: dict[int, nn.Parameter] = {}
        for module in model.modules():
            if isinstance(module, nn.Linear):
                for name, param in module.named_parameters(recurse=False):
                    if not param.requires_grad and param.dtype != dtype:
                        if id(param) not in made:
                            made[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                        self.copies.append((module, name, param, made[id(param)]))

    @contextmanager
    def swapped_in(self):
        try:
            for module, name, _, copy in self.copies:
                setattr(module, name, copy)
            yield
        finally:
            for module, name, original, _ in self.copies:
                setattr(module, name, original)


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


class RunLock:
    """An exclusive lock on a run folder for as long as a run trains in it: a second run started in the same
    ``out_dir`` is refused at once instead of interleaving its checkpoints, recipe and metrics with the first's."""

    FILE = ".lock"

    def __init__(self, out_dir: str | Path):
        path = Path(out_dir) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise InputError(f"{out_dir} is in use by another training run ({holder}): wait for it to finish, or "
                             "train in another train.out_dir") from None
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            self.handle.close()  # closing drops the lock


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
        batch_groups: Sequence[int] | None = None,
    ):
        """``batch_groups``: sizes of the consecutive index ranges of ``dataset`` whose examples never share a batch
        (``epoch_batches``)."""
        self.cfg = cfg
        self.lock = RunLock(cfg.out_dir) if rank_and_world()[0] == 0 else None  # before anything is written there
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
        fused = True if cfg.fused_optimizer else None  # None: torch's default (fused=False would also turn foreach off)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        names = {id(p): name for name, p in self.model.named_parameters()}
        self._trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._param_names = [names[id(p)] for p in self._trainable]
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.data = BatchStream(dataset, cfg.batch_size, collate_fn, cfg.num_workers, cfg.seed, self.rank,
                                self.world, pin_memory=self.device.type == "cuda", groups=batch_groups)
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
                    _info("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 autocast will be far slower than fp32 "
                          "(22x per demo stage-1 step, measured on AVX2); set train.precision=auto or fp32",
                          logging.WARNING)
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
        self.frozen_copies = FrozenWeightCopies(self.model, self.autocast_dtype, self.device, cfg.fsdp)  # as restored
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
            if self.lock is not None:
                self.lock.release()
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
                    with self.frozen_copies.swapped_in(), self._attention():
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

    def _attention(self):
        """The SDPA backends the forward may use: the math one alone with ``math_attention`` (the backward follows
        the forward's choice), torch's own pick otherwise."""
        return sdpa_kernel(SDPBackend.MATH) if self.cfg.math_attention else nullcontext()

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
        saved = {**TrainConfig.field_defaults(), **ckpt.config}  # a field newer than the checkpoint: its default
        changed = {k: (v, now.get(k)) for k, v in saved.items() if k not in ("resume", "out_dir") and now.get(k) != v}
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
