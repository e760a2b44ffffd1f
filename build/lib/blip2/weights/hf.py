"""transformers' Blip2 <-> this project, both directions, through explicit key maps.

transformers keeps the same parts under other names (``{}`` is a Q-Former layer index)::

    transformers                                      here
    vision_model.* (a Blip2VisionModel)               vision.backbone.*     (the frozen encoder, taken whole)
    vision_model.post_layernorm                       vision_norm           (BLIP-2's trainable "ln_vision")
    query_tokens                                      qformer.query_tokens
    qformer.layernorm                                 qformer.embed_norm
    qformer.encoder.layer.{}.attention.attention.*    qformer.layers.{}.self_attn.{query,key,value}
    qformer.encoder.layer.{}.attention.output.*       qformer.layers.{}.self_attn.{out,norm}
    qformer.encoder.layer.{}.crossattention.*         qformer.layers.{}.cross_attn.*   (layers i % freq == 0)
    qformer.encoder.layer.{}.{intermediate,output}_query   qformer.layers.{}.query_ffn.{up,down,norm}
    qformer.encoder.layer.{}.{intermediate,output}    qformer.layers.{}.text_ffn.*     (use_qformer_text_input only)
    embeddings.{word,position}_embeddings             qformer.{word,position}_embeddings (retrieval model only)
    vision_projection, text_projection, itm_head      vision_proj, text_proj, itm_head  (retrieval model only)
    language_projection                               llm_proj              (generation model only)
    language_model.*                                  llm.model.*           (the frozen LLM, taken whole)

What transformers does not have starts as documented in ``docs/weights.md``: the text FFN is copied from the
query FFN, everything else keeps this project's initialisation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from torch import Tensor
from transformers.image_utils import PILImageResampling

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.data.preprocess import Preprocess
from blip2.io import write_atomically
from blip2.models.blip2 import Blip2Model
from blip2.weights.encoders import has_image_processor
from blip2.weights.keymap import (
    KeyMapError,
    copy_query_ffn_to_text_ffn,
    load_mapped,
    qformer_layer_map,
    with_params,
)

# ---- key maps: transformers module name -> our module name; each entry covers its .weight and .bias --------------

QFORMER_EMBED_NORM = {"qformer.layernorm": "qformer.embed_norm"}
VISION_NORM = {"vision_model.post_layernorm": "vision_norm"}

QFORMER_LAYER = {  # every layer
    "qformer.encoder.layer.{}.attention.attention.query": "qformer.layers.{}.self_attn.query",
    "qformer.encoder.layer.{}.attention.attention.key": "qformer.layers.{}.self_attn.key",
    "qformer.encoder.layer.{}.attention.attention.value": "qformer.layers.{}.self_attn.value",
    "qformer.encoder.layer.{}.attention.output.dense": "qformer.layers.{}.self_attn.out",
    "qformer.encoder.layer.{}.attention.output.LayerNorm": "qformer.layers.{}.self_attn.norm",
    "qformer.encoder.layer.{}.intermediate_query.dense": "qformer.layers.{}.query_ffn.up",
    "qformer.encoder.layer.{}.output_query.dense": "qformer.layers.{}.query_ffn.down",
    "qformer.encoder.layer.{}.output_query.LayerNorm": "qformer.layers.{}.query_ffn.norm",
}
QFORMER_CROSS = {  # layers i % cross_attention_frequency == 0
    "qformer.encoder.layer.{}.crossattention.attention.query": "qformer.layers.{}.cross_attn.query",
    "qformer.encoder.layer.{}.crossattention.attention.key": "qformer.layers.{}.cross_attn.key",
    "qformer.encoder.layer.{}.crossattention.attention.value": "qformer.layers.{}.cross_attn.value",
    "qformer.encoder.layer.{}.crossattention.output.dense": "qformer.layers.{}.cross_attn.out",
    "qformer.encoder.layer.{}.crossattention.output.LayerNorm": "qformer.layers.{}.cross_attn.norm",
}
QFORMER_TEXT_FFN = {  # every layer, only when qformer_config.use_qformer_text_input
    "qformer.encoder.layer.{}.intermediate.dense": "qformer.layers.{}.text_ffn.up",
    "qformer.encoder.layer.{}.output.dense": "qformer.layers.{}.text_ffn.down",
    "qformer.encoder.layer.{}.output.LayerNorm": "qformer.layers.{}.text_ffn.norm",
}
RETRIEVAL_HEADS = {  # Blip2ForImageTextRetrieval
    "vision_projection": "vision_proj",
    "text_projection": "text_proj",
    "itm_head": "itm_head",
}
GENERATION_HEAD = {"language_projection": "llm_proj"}  # Blip2ForConditionalGeneration

# single tensors, mapped as they are
QUERY_TOKENS = {"query_tokens": "qformer.query_tokens"}
TEXT_EMBEDDINGS = {  # Blip2ForImageTextRetrieval's Q-Former text embeddings
    "embeddings.word_embeddings.weight": "qformer.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "qformer.position_embeddings.weight",
}

# the frozen parts move whole, by prefix (transformers prefix, our prefix)
VISION_PREFIX = ("vision_model.", "vision.backbone.")
LLM_PREFIX = ("language_model.", "llm.model.")
# the encoder keeps its own copy of post_layernorm, which forward never applies (vision_norm does that job)
UNUSED_VISION_KEYS = ("vision.backbone.post_layernorm.weight", "vision.backbone.post_layernorm.bias")

GENERATION_ARCHITECTURES = ("Blip2ForConditionalGeneration", Blip2Model)
RETRIEVAL_ARCHITECTURES = ("Blip2ForImageTextRetrieval",)
IMAGE_TOKEN = "<image>"
RESAMPLE = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}


def hf_key_map(qformer: QFormerConfig, retrieval: bool, text_ffn: bool) -> dict[str, str]:
    """transformers key -> our key, for everything but the two frozen modules (those move by prefix).

    ``retrieval``: a Blip2ForImageTextRetrieval (text embeddings + ITC/ITM heads) rather than a
    Blip2ForConditionalGeneration (language projection). ``text_ffn``: ``use_qformer_text_input``.
    """
    modules = QFORMER_EMBED_NORM | VISION_NORM
    modules |= qformer_layer_map(
        qformer.num_layers,
        qformer.cross_attention_freq,
        QFORMER_LAYER,
        QFORMER_CROSS,
        QFORMER_TEXT_FFN if text_ffn else None,
    )
    modules |= RETRIEVAL_HEADS if retrieval else GENERATION_HEAD
    return QUERY_TOKENS | (TEXT_EMBEDDINGS if retrieval else {}) | with_params(modules)


# ---- configs -----------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def qformer_config_from_hf(config: transformers.Blip2Config, vocab_size: int, tokenizer: str) -> QFormerConfig:
    """Our Q-Former config from a transformers Blip2Config (architecture only; weights are loaded separately)."""
    q = config.qformer_config
    if q.hidden_act != "gelu":
        raise KeyMapError(
            f"qformer_config.hidden_act is {q.hidden_act!r}; this Q-Former implements BERT's exact 'gelu' only"
        )
    return QFormerConfig(
        hidden_size=q.hidden_size,
        num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        hidden_dropout=q.hidden_dropout_prob,
        attention_dropout=q.attention_probs_dropout_prob,
        cross_attention_freq=q.cross_attention_frequency,
        num_query_tokens=config.num_query_tokens,
        encoder_width=config.vision_config.hidden_size,
        embed_dim=config.image_text_hidden_size,
        init_from=None,
        tokenizer=tokenizer,
    )


def hf_qformer_config(cfg: QFormerConfig, text_input: bool) -> transformers.Blip2QFormerConfig:
    return transformers.Blip2QFormerConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=0,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.encoder_width,
        use_qformer_text_input=text_input,
    )


# ---- load --------------------------------------------------------------------------------------------------------


def _architecture(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory: {config_file} is missing")
    data = json.loads(config_file.read_text())
    if data.get("model_type") != "blip-2":
        raise KeyMapError(f"{config_file}: model_type is {data.get('model_type')!r}, not 'blip-2'")
    architecture = (data.get("architectures") or ["Blip2ForConditionalGeneration"])[0]
    known = GENERATION_ARCHITECTURES + RETRIEVAL_ARCHITECTURES
    if architecture not in known:
        raise KeyMapError(f"{config_file}: architecture {architecture!r} is not supported; supported: {known}")
    if architecture in RETRIEVAL_ARCHITECTURES and not data.get("qformer_config", {}).get("use_qformer_text_input"):
        raise KeyMapError(
            f"{config_file}: a Blip2ForImageTextRetrieval needs qformer_config.use_qformer_text_input=true "
            "(its text passes through the Q-Former's text FFN)"
        )
    return architecture


def _weight_files(path: Path) -> str:
    files = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return ", ".join(files) or "no weight files"


def _mismatch(entry) -> str:
    """transformers reports a shape mismatch as (key, checkpoint shape, model shape)."""
    key, found, expected = entry
    return f"{key}: file {tuple(found)} vs model {tuple(expected)}"


def _read_hf_model(path: Path, retrieval: bool) -> transformers.PreTrainedModel:
    """transformers reads the directory (shards, tied weights, dtype); a layout that does not fit raises KeyMapError."""
    cls = transformers.Blip2ForImageTextRetrieval if retrieval else transformers.Blip2ForConditionalGeneration
    hf_model, info = cls.from_pretrained(
        path,
        local_files_only=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below, by name
    )
    problems = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "wrong shape": sorted(_mismatch(entry) for entry in info["mismatched_keys"]),
    }
    listed = [
        f"{name} keys {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)} in all)"
        for name, keys in problems.items()
        if keys
    ]
    if listed:
        raise KeyMapError(
            f"{path} ({_weight_files(path)}) is not a complete {cls.__name__} checkpoint: {'; '.join(listed)}"
        )
    return hf_model.eval()


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def _trainable_state(hf_model: transformers.PreTrainedModel, table: dict[str, str], where: Path) -> dict[str, Tensor]:
    """Everything but the two frozen modules (plus vision_model.post_layernorm), renamed through ``table``."""
    frozen = (VISION_PREFIX[0], LLM_PREFIX[0])
    hf_state = {k: v for k, v in hf_model.state_dict().items() if not k.startswith(frozen) or k in table}
    missing, unmapped = sorted(set(table) - set(hf_state)), sorted(set(hf_state) - set(table))
    if missing or unmapped:
        raise KeyMapError(
            f"{where}: the key map and {type(hf_model).__name__} disagree: "
            f"missing {missing[:8]}, unmapped {unmapped[:8]}"
        )
    return {table[k]: v for k, v in hf_state.items()}


def read_hf(path: Path) -> tuple[transformers.PreTrainedModel, bool]:
    """The transformers model in a Blip2 directory, and whether it is a retrieval (stage-1) model."""
    retrieval = _architecture(path) in RETRIEVAL_ARCHITECTURES
    return _read_hf_model(path, retrieval), retrieval


def qformer_tokenizer_name(path: Path, retrieval: bool) -> str:
    """A retrieval model's Q-Former text side is in the checkpoint, with its own tokenizer when the directory ships
    one; a generation model's directory tokenizer is the LLM's, so its Q-Former text side starts with MiniLM's."""
    return str(path) if retrieval and _has_tokenizer(path) else "minilm"


def config_from_hf(hf_model: transformers.PreTrainedModel, path: Path, retrieval: bool, qformer_tokenizer,
                   qformer_tokenizer_name: str) -> Blip2Config:
    """Our config for a transformers Blip2 model (architecture only; weights are loaded separately)."""
    config = hf_model.config
    vocab_size = config.qformer_config.vocab_size
    if not retrieval:
        vocab_size = max(vocab_size, len(qformer_tokenizer))
    llm = None if retrieval else LLMConfig(kind="hf", path=str(path), dtype=_dtype_name(hf_model.language_model.dtype),
                                            tokenizer_specials=True)
    return Blip2Config(
        vision=VisionConfig(kind="hf", path=str(path), image_processor=has_image_processor(path)),
        qformer=qformer_config_from_hf(config, vocab_size, qformer_tokenizer_name),
        llm=llm,
        vision_norm_eps=config.vision_config.layer_norm_eps,
    )


def load_trainable_from_hf(model: Blip2Model, hf_model: transformers.PreTrainedModel, path: Path) -> None:
    """Copy the Q-Former and heads of ``hf_model`` into ``model`` through ``hf_key_map``."""
    text_ffn = bool(hf_model.config.qformer_config.use_qformer_text_input)  # always for retrieval, rarely otherwise
    retrieval = model.llm is None
    state = _trainable_state(hf_model, hf_key_map(model.cfg.qformer, retrieval, text_ffn), path)
    if not text_ffn:
        state |= copy_query_ffn_to_text_ffn(state, model.cfg.qformer.num_layers)
    load_mapped(model, state, str(path))


# ---- export ------------------------------------------------------------------------------------------------------


def _vision_backbone(model: Blip2Model) -> transformers.Blip2VisionModel:
    backbone = getattr(model.vision, "backbone", None)
    if not isinstance(backbone, transformers.Blip2VisionModel):
        raise TypeError(
            f"export_hf needs a Blip2VisionModel image encoder (transformers' Blip2 has no other vision tower); this "
            f"model's encoder is {type(backbone or model.vision).__name__}. Save it with model.save() instead."
        )
    return backbone


def hf_state_dict(model: Blip2Model) -> dict[str, Tensor]:
    """Our state dict in transformers' names (the inverse of ``hf_key_map`` plus the frozen prefixes)."""
    retrieval = model.llm is None
    table = hf_key_map(model.cfg.qformer, retrieval, text_ffn=retrieval)
    ours = model.state_dict()
    state = {hf: ours[k] for hf, k in table.items()}
    for hf_prefix, our_prefix in (VISION_PREFIX, LLM_PREFIX):
        for k, v in ours.items():
            if k.startswith(our_prefix) and k not in UNUSED_VISION_KEYS:
                state[hf_prefix + k.removeprefix(our_prefix)] = v
    return state


def hf_config(model: Blip2Model, image_token_index: int | None) -> transformers.Blip2Config:
    """The transformers config of ``model``. The parts' ``dtype`` entries follow their tensors (configs do not track
    ``.to()``); save_pretrained sets the top-level one from the first tensor (the fp32 query tokens)."""
    retrieval = model.llm is None
    q = model.cfg.qformer
    vision = _vision_backbone(model).config.to_dict() | {"dtype": _dtype_name(model.vision_dtype)}
    kwargs = {}
    if not retrieval:  # a retrieval model keeps transformers' default (unused) text config
        kwargs["text_config"] = model.llm.model.config.to_dict() | {"dtype": _dtype_name(model.llm.dtype)}
    return transformers.Blip2Config(
        vision_config=vision,
        qformer_config=hf_qformer_config(q, text_input=retrieval).to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_text_hidden_size=q.embed_dim,
        image_token_index=image_token_index,
        architectures=["Blip2ForImageTextRetrieval" if retrieval else "Blip2ForConditionalGeneration"],
        **kwargs,
    )


def _image_processor(preprocess: Preprocess) -> transformers.BlipImageProcessor:
    height, width = preprocess.size
    return transformers.BlipImageProcessor(
        size={"height": height, "width": width},
        image_mean=list(preprocess.mean),
        image_std=list(preprocess.std),
        resample=RESAMPLE[preprocess.interpolation],
    )


def _image_token(tokenizer) -> int:
    """Add transformers' ``<image>`` placeholder to ``tokenizer`` (a copy) when missing; its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True
        )
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _make_room_for(hf_model: transformers.PreTrainedModel, token_id: int) -> None:
    """Grow the LLM's vocabulary to hold ``token_id``; the new rows are zero, so the image placeholder's
    output logit is 0 (its input embedding is always replaced by a query output)."""
    old = hf_model.language_model.get_input_embeddings().num_embeddings
    if token_id < old:
        return
    hf_model.resize_token_embeddings(token_id + 1, mean_resizing=False)  # new tensors: ours stay as they are
    with torch.no_grad():
        for table in (hf_model.get_input_embeddings(), hf_model.get_output_embeddings()):
            table.weight[old:] = 0


def export_hf(model: Blip2Model, tokenizer, preprocess: Preprocess, directory: str | Path) -> Path:
    """A self-contained transformers directory: config.json, model.safetensors, processor and tokenizer files.

    A stage-2 model becomes a Blip2ForConditionalGeneration (the processor expands ``<image>`` into
    ``num_query_tokens`` placeholders, added to the LLM tokenizer when missing); a stage-1 model becomes a
    Blip2ForImageTextRetrieval (its processor holds the Q-Former tokenizer). What transformers has no place for
    is left out: the Q-Former's LM head and ``temp``, and for a stage-2 model its whole text side and ITC/ITM heads.
    ``tokenizer``: the LLM's transformers tokenizer (the Q-Former's for a stage-1 model); ``preprocess``: the
    encoder's, written as the image processor.
    """
    directory = Path(directory)
    _vision_backbone(model)  # refuse another encoder before any work
    if model.cfg.llm is not None and model.cfg.llm.bos_before_image:
        raise KeyMapError("this model reads [BOS ; visual prompt ; BOS ; text] (llm.bos_before_image), but "
                          "transformers' Blip2 puts the visual prompt first: the export would caption differently")
    if model.cfg.llm is not None and model.cfg.llm.prompt_to_qformer:
        raise KeyMapError("this model's Q-Former reads the text prompt (llm.prompt_to_qformer), which transformers' "
                          "Blip2 cannot: the export would answer differently")
    retrieval = model.llm is None
    tokenizer = copy.deepcopy(tokenizer)
    image_token_index = None if retrieval else _image_token(tokenizer)
    config = hf_config(model, image_token_index)
    cls = transformers.Blip2ForImageTextRetrieval if retrieval else transformers.Blip2ForConditionalGeneration
    with torch.device("meta"):
        hf_model = cls(config)
    try:
        hf_model.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    except RuntimeError as err:
        raise KeyMapError(f"the exported state does not fit {cls.__name__}: {err}") from err
    if not retrieval:
        _make_room_for(hf_model, image_token_index)
    processor = transformers.Blip2Processor(
        image_processor=_image_processor(preprocess),
        tokenizer=tokenizer,
        num_query_tokens=None if retrieval else model.cfg.qformer.num_query_tokens,
    )

    def write(tmp: Path) -> None:
        hf_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)  # transformers 5 keeps the image processor inside processor_config.json
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json: older readers, blip2.models.vision

    write_atomically(directory, write)
    return directory
