"""File I/O shared by every layer: atomic writes of folders and files, and safe reading of weight files.

Writes go to a temporary sibling first and are moved into place with one ``os.replace``, so a reader (or a run
killed mid-write) never sees half a folder or half a file. What is written is readable by others as the umask
allows (``mkdtemp``/``mkstemp`` alone would leave 0700/0600). Weight files are read without pickle: safetensors,
or ``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.bin``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from blip2.errors import InputError


class WeightsFileError(InputError):
    """A weights file is unreadable or is not a plain state dict of tensors."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_permissions(root: Path) -> None:
    """Give ``root`` (a temporary folder or file) and everything under it the modes the umask allows."""
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomically(directory: str | Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Call ``write(tmp_dir)``, then move ``tmp_dir`` onto ``directory``: readers never see a half-written folder.

    ``replace=False`` keeps a ``directory`` that another process put in place meanwhile (ours is dropped).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        _open_permissions(tmp)
        if directory.exists() and not replace:
            shutil.rmtree(tmp)
        elif directory.exists():
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
    return directory


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_file)``, then move it onto ``path``: readers never see half a file, and an earlier file at
    ``path`` stays whole until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        _open_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (``write_file_atomically``)."""
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable(path: str | Path, what: str) -> Path:
    """Raise a one-line ``OSError`` now, before any work, if ``path`` (a file or folder to be written) cannot be."""
    path = Path(path)
    folder = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if folder == path and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} is not writable: choose another location")
    if folder != path and (not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK)):
        raise PermissionError(f"{what} {path} cannot be created: {folder} is not a writable folder")
    if path.is_file() and not os.access(path, os.W_OK):
        raise PermissionError(f"{what} {path} is not writable: choose another location")
    return path


def read_safetensors(file: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file, turning low-level errors into one that names the file."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsFileError(f"{file} is not a readable safetensors file ({err}); re-save or re-download it") from err


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat {name: tensor} from .safetensors, or from .pth/.pt/.bin with ``torch.load(weights_only=True)``
    (a {"state_dict": ...} or {"model": ...} wrapper is opened)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_torch_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise WeightsFileError(f"{path}: entries that are not tensors: {not_tensors[:5]}")
    return state


def read_torch_file(path: str | Path):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled objects other than tensors are refused by weights_only
        raise WeightsFileError(
            f"{path} is not a plain tensor file (torch.load(weights_only=True) refused it: {error})"
        ) from error
