"""Project checkpoints: ``config.yaml`` + ``model.safetensors`` holding only what trains (never pickle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from blip2.io import read_safetensors, write_atomically
from blip2.weights.keymap import check_state

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


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


def load_trainable(model, file: str | Path) -> None:
    """Load trainable weights strictly: every expected key present with the right shape, nothing unexpected."""
    state = read_safetensors(file)
    check_state(state, model.trainable_state_dict(), str(file))
    model.load_state_dict(state, strict=False)  # strict on the trainable part (checked above); frozen parts are built


