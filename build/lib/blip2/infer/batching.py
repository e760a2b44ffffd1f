"""Turning what users pass (one image or many, one text or many) into checked lists and fixed-size batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch import Tensor

from blip2.errors import InputError

ImageInput = Image.Image | str | Path
Images = ImageInput | Sequence[ImageInput] | Tensor  # a Tensor is already-preprocessed pixel values [B, 3, H, W]


def as_image_list(images: Images) -> list[ImageInput] | Tensor:
    """One image or a sequence of them -> a list (pixel-value tensors pass through unchanged)."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise InputError(f"pixel values must be [B, 3, H, W], got a tensor of shape {tuple(images.shape)}")
        return images
    if isinstance(images, (Image.Image, str, Path)):
        return [images]
    if isinstance(images, (bytes, bytearray)):
        raise TypeError("pass images as PIL images or file paths, not raw bytes (load_image decodes bytes)")
    return list(images)


def as_text_list(texts: str | Sequence[str], what: str) -> list[str]:
    """One text or a sequence of them -> a list of non-empty strings; ``what`` names them in errors ("question")."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what} {index} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InputError(f"{what} {index} is empty: give some text")
    return texts


def pair_up(count_a: int, name_a: str, count_b: int, name_b: str) -> tuple[list[int], list[int]]:
    """Indices pairing two collections element-wise; a collection of one pairs with every item of the other."""
    if count_a == count_b:
        return list(range(count_a)), list(range(count_b))
    if count_a == 1:
        return [0] * count_b, list(range(count_b))
    if count_b == 1:
        return list(range(count_a)), [0] * count_a
    raise InputError(f"{count_a} {name_a} but {count_b} {name_b}: give as many of each, or one of either for all")


def batch_slices(total: int, batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(total)``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [slice(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def pixel_batch(pipe, images: list[ImageInput] | Tensor, where: slice) -> Tensor:
    """``images[where]`` as pixel values [b, 3, H, W] on the model's device (files are read here, a batch at a time)."""
    if isinstance(images, Tensor):
        return images[where].to(pipe.device)
    return pipe.pixel_values(images[where])


def select(images: list[ImageInput] | Tensor, indices: list[int]) -> list[ImageInput] | Tensor:
    """The images at ``indices`` (repeats allowed), for lists and pixel-value tensors alike."""
    return images[indices] if isinstance(images, Tensor) else [images[i] for i in indices]
