"""Project checkpoints: ``config.yaml`` + ``model.safetensors`` holding only what trains (never pickle)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blip2.weights.keymap import KeyMapError

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def write_atomically(directory: Path, write) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` onto ``directory``: readers never see a half-written folder."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model, directory: str | Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s config and trainable weights (plus optional extra tensors) into ``directory`` atomically."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    state.update(extra or {})

    def write(tmp: Path) -> None:
        model.cfg.save(tmp / CONFIG_NAME)
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "blip2-trainable"})

    write_atomically(directory, write)
    return directory


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning low-level errors into one that names the file."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise KeyMapError(f"{file} is not a readable safetensors file ({err}); re-save or re-download it") from err


def load_trainable(model, file: str | Path) -> None:
    """Load trainable weights strictly: every expected key present with the right shape, nothing unexpected."""
    state = read_weights(file)
    check_state(state, model.trainable_state_dict(), str(file))
    model.load_state_dict(state, strict=False)  # strict on the trainable part (checked above); frozen parts are built


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Raise a KeyMapError naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs expected {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    if shapes:
        problems.append(f"wrong shapes: {shapes[:8]}")
    if problems:
        raise KeyMapError(f"{where} does not fit this model: " + "; ".join(problems))
