"""Resumable training checkpoints: step-numbered folders written atomically, tensors in safetensors, the rest JSON/YAML.

Layout of ``<out_dir>/checkpoints/step-000100/``::

    model.safetensors        what the trainer's ``state_fn`` returns (the trainable part)
    optimizer.safetensors    optimizer state tensors, keyed "<parameter name>/<field>" (e.g. "proj.weight/exp_avg")
    rng.safetensors          torch CPU/CUDA generator states per rank, keyed "rank<r>/torch", "rank<r>/cuda<i>"
    trainer_state.json       step, data position, optimizer groups and scalars, scheduler, grad scaler,
                             python/numpy generator states per rank, elapsed time
    train_config.yaml        the TrainConfig of the run

A folder only ever appears under its final name once complete (``write_atomically``), and old ones are renamed
away before they are deleted, so every ``step-*`` folder is whole even after ``kill -9``. Nothing is pickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from blip2.config import parse_yaml
from blip2.errors import InputError
from blip2.io import read_safetensors, write_atomically

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.yaml"
FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, CONFIG_FILE)
STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(InputError):
    """A training checkpoint is missing, incomplete or does not fit the run."""


@dataclass
class TrainingCheckpoint:
    """Everything a run needs to continue exactly where it stopped."""

    model: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    rng: dict[str, Tensor]
    state: dict[str, Any]  # JSON
    config: dict[str, Any]  # the TrainConfig as a mapping

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---- folders ------------------------------------------------------------------------------------------------


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def step_dir(out_dir: str | Path, step: int) -> Path:
    return checkpoints_root(out_dir) / f"step-{step:06d}"


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete step folders of a run, oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (each renamed away first, so none is ever half-deleted)."""
    for old in list_checkpoints(out_dir)[:-keep_last]:
        doomed = old.with_name(f".{old.name}.deleting")
        old.replace(doomed)
        shutil.rmtree(doomed)


def remove_partial_saves(out_dir: str | Path) -> list[Path]:
    """Delete the hidden temporary folders a killed save or prune leaves behind; returns them."""
    root = checkpoints_root(out_dir)
    leftovers = [p for p in root.glob(".step-*") if p.is_dir()] if root.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


# ---- save / load ----------------------------------------------------------------------------------------------


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Own, contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}


def save_training_checkpoint(ckpt: TrainingCheckpoint, directory: Path) -> Path:
    """Write ``ckpt`` into ``directory`` atomically."""
    model, optimizer, rng = _plain(ckpt.model), _plain(ckpt.optimizer), _plain(ckpt.rng)

    def write(tmp: Path) -> None:
        save_file(model, tmp / MODEL_FILE, metadata={"format": "blip2-train-model"})
        save_file(optimizer, tmp / OPTIMIZER_FILE, metadata={"format": "blip2-train-optimizer"})
        save_file(rng, tmp / RNG_FILE, metadata={"format": "blip2-train-rng"})
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(ckpt.config, sort_keys=False))
        (tmp / STATE_FILE).write_text(json.dumps(ckpt.state, indent=1))

    write_atomically(directory, write)
    return directory


def load_training_checkpoint(directory: str | Path) -> TrainingCheckpoint:
    directory = Path(directory)
    if not directory.is_dir() or not is_complete(directory):
        missing = [name for name in FILES if not (directory / name).is_file()]
        raise CheckpointError(
            f"resume: {directory} is not a complete training checkpoint (missing {missing}); "
            f"point resume at a folder like <out_dir>/{CHECKPOINTS_DIR}/step-000100, or use resume: auto"
        )
    return TrainingCheckpoint(
        model=read_safetensors(directory / MODEL_FILE),
        optimizer=read_safetensors(directory / OPTIMIZER_FILE),
        rng=read_safetensors(directory / RNG_FILE),
        state=json.loads((directory / STATE_FILE).read_text()),
        config=parse_yaml((directory / CONFIG_FILE).read_text()),
    )


# ---- optimizer state: torch's index-keyed dict <-> name-keyed tensors + JSON ------------------------------------


def optimizer_to_files(state_dict: dict[str, Any], names: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors "<name>/<field>" and JSON (groups with parameter names, scalars).

    ``names[i]`` is the name of the optimizer's i-th parameter (in param-group order).
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, fields in state_dict["state"].items():
        for field, value in fields.items():
            if isinstance(value, Tensor):
                tensors[f"{names[index]}/{field}"] = value
            else:
                scalars.setdefault(names[index], {})[field] = value
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


CONFIGURED_GROUP_OPTIONS = ("lr_scale", "weight_decay", "fused")  # set from TrainConfig, not state the optimizer learned


def optimizer_from_files(
    tensors: dict[str, Tensor], meta: dict[str, Any], current: dict[str, Any], names: list[str], where: str
) -> dict[str, Any]:
    """The inverse of ``optimizer_to_files``, checked against the optimizer's ``current`` state_dict and ``names``."""
    saved_names = [name for group in meta["param_groups"] for name in group["params"]]
    if saved_names != names:
        missing, unexpected = sorted(set(names) - set(saved_names)), sorted(set(saved_names) - set(names))
        raise CheckpointError(
            f"{where}: the optimizer state was saved for other trainable parameters or groups "
            f"(missing {missing[:8]}, unexpected {unexpected[:8]}, or a different order); "
            "resume with the same model, param_groups and frozen parts"
        )
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(index[name], {})[field] = value
    for name, fields in meta["scalars"].items():
        state.setdefault(index[name], {}).update(fields)
    groups = []
    for saved, now in zip(meta["param_groups"], current["param_groups"]):
        group = {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()}  # JSON lists -> tuples
        configured = {k: now[k] for k in CONFIGURED_GROUP_OPTIONS if k in now}  # the resumed run's config decides these
        groups.append({**group, **configured, "params": now["params"]})
    return {"state": state, "param_groups": groups}


# ---- random generator states --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states, as JSON-serialisable values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    keys = np.array(npy["keys"], dtype=np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def rng_to_files(per_rank: list[dict[str, Any]]) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Every rank's ``rng_state()`` -> torch/CUDA states as uint8 tensors + python/numpy states as JSON."""
    tensors: dict[str, Tensor] = {}
    json_part = []
    for rank, state in enumerate(per_rank):
        tensors[f"rank{rank}/torch"] = torch.tensor(state["torch"], dtype=torch.uint8)
        for i, cuda in enumerate(state.get("cuda", [])):
            tensors[f"rank{rank}/cuda{i}"] = torch.tensor(cuda, dtype=torch.uint8)
        json_part.append({"python": state["python"], "numpy": state["numpy"]})
    return tensors, json_part


def rng_from_files(tensors: dict[str, Tensor], json_part: list[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s state as ``rng_state()`` returned it, or None when the checkpoint has no such rank."""
    if rank >= len(json_part):
        return None
    prefix = f"rank{rank}/cuda"
    cuda_keys = sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
    state = {**json_part[rank], "torch": tensors[f"rank{rank}/torch"].tolist()}
    if cuda_keys:
        state["cuda"] = [tensors[k].tolist() for k in cuda_keys]
    return state
