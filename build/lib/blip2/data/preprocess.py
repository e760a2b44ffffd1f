"""How an image encoder wants its pixels: resize, scale to [0, 1], normalise (evaluation), or BLIP-2's random
resized crop (training). The spec travels with the encoder a model is built with (``blip2.weights.encoders``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms
from transformers import BaseImageProcessor

from blip2.config import ConfigError

INTERPOLATIONS = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR}
TRAIN_CROP_SCALE = (0.5, 1.0)  # BLIP-2's RandomResizedCrop scale range


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its pixels: resize to ``size`` (H, W), scale to [0, 1], normalise.

    The eval transform resizes straight to (H, W) without cropping, as BLIP-2 does (nothing near the
    border is lost, which matters for captions about position).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"Preprocess.size must be (H, W) with positive sides, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"Preprocess.mean and .std need 3 values (RGB), got {self.mean!r} and {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"Preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def identity(self) -> dict:
        """What a feature cache records of the preprocessing its features were made with."""
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        transform = self.eval_transform()
        return torch.stack([transform(image) for image in images])  # [B, 3, H, W]

    def eval_transform(self) -> Callable[[Image.Image], Tensor]:
        """One image -> [3, H, W] float32: resize to ``size``, normalise."""
        return transforms.Compose(
            [_to_rgb, transforms.Resize(self.size, INTERPOLATIONS[self.interpolation]), *self._to_normalised_tensor()]
        )

    def train_transform(self, hflip: bool = False) -> Callable[[Image.Image], Tensor]:
        """BLIP-2's train-time augmentation: a random crop of 50-100% of the area resized to ``size``,
        optionally a horizontal flip (off by default: a flip contradicts captions about left and right)."""
        crop = transforms.RandomResizedCrop(self.size, scale=TRAIN_CROP_SCALE, interpolation=INTERPOLATIONS[self.interpolation])
        flip = [transforms.RandomHorizontalFlip()] if hflip else []
        return transforms.Compose([_to_rgb, crop, *flip, *self._to_normalised_tensor()])

    def _to_normalised_tensor(self) -> list[Callable]:
        return [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]


class ProcessorPreprocess:
    """A transformers image processor (e.g. the ``BlipImageProcessor`` a Blip2 directory ships) as this project's
    preprocessing: evaluation pixels are exactly the processor's; training augmentation and the feature cache's
    identity use ``spec``, the same resize, mean and std."""

    def __init__(self, processor: BaseImageProcessor, spec: Preprocess) -> None:
        self.processor = processor
        self.spec = spec
        self.size, self.mean, self.std, self.interpolation = spec.size, spec.mean, spec.std, spec.interpolation

    def identity(self) -> dict:
        return {**self.spec.identity(), "image_processor": type(self.processor).__name__}

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        """[B, 3, H, W] float32, as ``processor(images=...)`` gives them."""
        return self.processor(images=list(images), return_tensors="pt").pixel_values.float()

    def eval_transform(self) -> Callable[[Image.Image], Tensor]:
        return lambda image: self([image])[0]

    def train_transform(self, hflip: bool = False) -> Callable[[Image.Image], Tensor]:
        return self.spec.train_transform(hflip)
