"""LAVIS BLIP-2 checkpoints (``.pth``) <-> this project, through explicit key maps.

LAVIS saves only what trained, under ``{"model": state_dict}``; two layouts (``{}`` is a layer index)::

    stage 1 (blip2_pretrained.pth, Blip2Qformer)          stage 2 (blip2_pretrained_opt2.7b.pth, Blip2OPT / Blip2T5)
    ln_vision, query_tokens                               ln_vision, query_tokens
    Qformer.bert.embeddings.LayerNorm, position_ids       (the same)
    Qformer.bert.embeddings.{word,position}_embeddings    -- (LAVIS deletes the text side)
    Qformer.bert.encoder.layer.{}.attention / crossattention / *_query   (the same)
    Qformer.bert.encoder.layer.{}.intermediate / output   -- (the text FFN)
    Qformer.cls.predictions.* (the LM head)               --
    vision_proj, text_proj, itm_head, temp                opt_proj | t5_proj
    [visual_encoder.*: the EVA ViT, only when it was trained or saved on purpose]

The frozen LLM is never in a LAVIS checkpoint and the image encoder rarely is: ``load_lavis`` builds them from the
named ``vision`` / ``llm`` parts. EVA's attention keeps separate ``q_bias`` and ``v_bias`` beside a fused
``qkv.weight``; transformers' Blip2VisionModel (our encoder for EVA weights) holds one ``qkv.bias`` =
``[q_bias ; 0 ; v_bias]`` (keys carry no bias).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from torch import Tensor

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.errors import InputError
from blip2.io import read_torch_file
from blip2.models.blip2 import Blip2Model
from blip2.weights.keymap import (
    KeyMapError,
    copy_query_ffn_to_text_ffn,
    expand_layers,
    load_mapped,
    qformer_layer_map,
    with_params,
)

# ---- key maps: LAVIS module name -> our module name; each entry covers its .weight and .bias ---------------------

NORMS = {"ln_vision": "vision_norm", "Qformer.bert.embeddings.LayerNorm": "qformer.embed_norm"}
QFORMER_LAYER = {  # every layer
    "Qformer.bert.encoder.layer.{}.attention.self.query": "qformer.layers.{}.self_attn.query",
    "Qformer.bert.encoder.layer.{}.attention.self.key": "qformer.layers.{}.self_attn.key",
    "Qformer.bert.encoder.layer.{}.attention.self.value": "qformer.layers.{}.self_attn.value",
    "Qformer.bert.encoder.layer.{}.attention.output.dense": "qformer.layers.{}.self_attn.out",
    "Qformer.bert.encoder.layer.{}.attention.output.LayerNorm": "qformer.layers.{}.self_attn.norm",
    "Qformer.bert.encoder.layer.{}.intermediate_query.dense": "qformer.layers.{}.query_ffn.up",
    "Qformer.bert.encoder.layer.{}.output_query.dense": "qformer.layers.{}.query_ffn.down",
    "Qformer.bert.encoder.layer.{}.output_query.LayerNorm": "qformer.layers.{}.query_ffn.norm",
}
QFORMER_CROSS = {  # layers i % cross_attention_freq == 0
    "Qformer.bert.encoder.layer.{}.crossattention.self.query": "qformer.layers.{}.cross_attn.query",
    "Qformer.bert.encoder.layer.{}.crossattention.self.key": "qformer.layers.{}.cross_attn.key",
    "Qformer.bert.encoder.layer.{}.crossattention.self.value": "qformer.layers.{}.cross_attn.value",
    "Qformer.bert.encoder.layer.{}.crossattention.output.dense": "qformer.layers.{}.cross_attn.out",
    "Qformer.bert.encoder.layer.{}.crossattention.output.LayerNorm": "qformer.layers.{}.cross_attn.norm",
}
QFORMER_TEXT_FFN = {  # every layer, stage 1 only
    "Qformer.bert.encoder.layer.{}.intermediate.dense": "qformer.layers.{}.text_ffn.up",
    "Qformer.bert.encoder.layer.{}.output.dense": "qformer.layers.{}.text_ffn.down",
    "Qformer.bert.encoder.layer.{}.output.LayerNorm": "qformer.layers.{}.text_ffn.norm",
}
STAGE1_HEADS = {
    "Qformer.cls.predictions.transform.dense": "qformer.lm_head.dense",
    "Qformer.cls.predictions.transform.LayerNorm": "qformer.lm_head.norm",
    "vision_proj": "vision_proj",
    "text_proj": "text_proj",
    "itm_head": "itm_head",
}
PROJECTIONS = {"opt_proj": "llm_proj", "t5_proj": "llm_proj"}  # stage 2: one of them

# single tensors
QUERY_TOKENS = {"query_tokens": "qformer.query_tokens"}
STAGE1_TENSORS = {
    "Qformer.bert.embeddings.word_embeddings.weight": "qformer.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "qformer.position_embeddings.weight",
    "Qformer.cls.predictions.bias": "qformer.lm_head.bias",
    "temp": "temp",
}
# stage 1: tensors LAVIS ties to another key (decoder = word embeddings, decoder.bias = predictions.bias)
TIED = {
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}
POSITION_IDS = "Qformer.bert.embeddings.position_ids"  # a saved buffer (arange), recomputed here

# EVA ViT (LAVIS eva_vit.py) -> transformers Blip2VisionModel, under our "vision.backbone."
VISION_PREFIX = "vision.backbone."
EVA_MODULES = {"visual_encoder.patch_embed.proj": "embeddings.patch_embedding"}
EVA_TENSORS = {
    "visual_encoder.cls_token": "embeddings.class_embedding",
    "visual_encoder.pos_embed": "embeddings.position_embedding",
}
EVA_BLOCK_MODULES = {  # every block
    "visual_encoder.blocks.{}.norm1": "encoder.layers.{}.layer_norm1",
    "visual_encoder.blocks.{}.attn.proj": "encoder.layers.{}.self_attn.projection",
    "visual_encoder.blocks.{}.norm2": "encoder.layers.{}.layer_norm2",
    "visual_encoder.blocks.{}.mlp.fc1": "encoder.layers.{}.mlp.fc1",
    "visual_encoder.blocks.{}.mlp.fc2": "encoder.layers.{}.mlp.fc2",
}
EVA_BLOCK_TENSORS = {"visual_encoder.blocks.{}.attn.qkv.weight": "encoder.layers.{}.self_attn.qkv.weight"}
EVA_QKV_BIAS = (
    "visual_encoder.blocks.{}.attn.q_bias",
    "visual_encoder.blocks.{}.attn.v_bias",
    "encoder.layers.{}.self_attn.qkv.bias",
)

LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is a default nn.LayerNorm
BERT_BASE_HEADS = 12  # every released LAVIS Q-Former is bert-base: head count is not in the tensors' shapes
LAYER_KEY = re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.")
CROSS_KEY = re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.")
EVA_BLOCK_KEY = re.compile(r"visual_encoder\.blocks\.(\d+)\.")


def lavis_key_map(qformer: QFormerConfig, stage1: bool, projection: str | None) -> dict[str, str]:
    """LAVIS key -> our key for the Q-Former, ln_vision and heads (``projection``: "opt_proj", "t5_proj" or None)."""
    modules = NORMS | qformer_layer_map(
        qformer.num_layers,
        qformer.cross_attention_freq,
        QFORMER_LAYER,
        QFORMER_CROSS,
        QFORMER_TEXT_FFN if stage1 else None,
    )
    if stage1:
        modules |= STAGE1_HEADS
    if projection:
        modules |= {projection: PROJECTIONS[projection]}
    return QUERY_TOKENS | (STAGE1_TENSORS if stage1 else {}) | with_params(modules)


def eva_key_map(num_blocks: int) -> dict[str, str]:
    """EVA key -> our key (``vision.backbone.`` + transformers name), q/v biases excluded (see ``eva_qkv_bias``)."""
    table = (
        EVA_TENSORS
        | with_params(EVA_MODULES)
        | expand_layers(EVA_BLOCK_TENSORS | with_params(EVA_BLOCK_MODULES), range(num_blocks))
    )
    return {src: VISION_PREFIX + dst for src, dst in table.items()}


def eva_qkv_bias(q_bias: Tensor, v_bias: Tensor) -> Tensor:
    """[q_bias ; zeros ; v_bias]: transformers' fused bias, keys unbiased as in EVA. [D], [D] -> [3D]."""
    return torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])


# ---- reading -----------------------------------------------------------------------------------------------------


def read_lavis(path: Path) -> dict[str, Tensor]:
    """The ``"model"`` state dict of a LAVIS ``.pth`` (plain tensors only: ``weights_only=True``)."""
    checkpoint = read_torch_file(path)
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise KeyMapError(f"{path} is not a LAVIS checkpoint: expected a dict with a 'model' state dict, found {found}")
    return state


def _need(state: dict[str, Tensor], key: str, where: Path) -> Tensor:
    if key not in state:
        raise KeyMapError(f"{where} has no {key}: not a LAVIS BLIP-2 checkpoint (keys start {sorted(state)[:5]})")
    return state[key]


def _layer_indices(state: dict[str, Tensor], pattern: re.Pattern) -> list[int]:
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def qformer_config_from_lavis(
    state: dict[str, Tensor], where: Path, num_heads: int, vocab_size: int, tokenizer: str
) -> QFormerConfig:
    """The Q-Former architecture read off the tensors' shapes (the head count cannot be, so it is given)."""
    queries = _need(state, "query_tokens", where)  # [1, Q, H]
    layers = _layer_indices(state, LAYER_KEY)
    cross = _layer_indices(state, CROSS_KEY)
    if not layers or layers != list(range(len(layers))) or not cross:
        raise KeyMapError(
            f"{where}: Q-Former layers {layers} with cross-attention on {cross} do not form a BLIP-2 Q-Former"
        )
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise KeyMapError(f"{where}: cross-attention on layers {cross} is not every k-th layer from layer 0")
    layer0 = "Qformer.bert.encoder.layer.0."
    words = state.get("Qformer.bert.embeddings.word_embeddings.weight")
    positions = state.get("Qformer.bert.embeddings.position_embeddings.weight")
    vision_proj = state.get("vision_proj.weight")
    defaults = QFormerConfig()
    return QFormerConfig(
        hidden_size=queries.shape[-1],
        num_layers=len(layers),
        num_heads=num_heads,
        intermediate_size=_need(state, layer0 + "intermediate_query.dense.weight", where).shape[0],
        vocab_size=words.shape[0] if words is not None else vocab_size,
        max_position_embeddings=positions.shape[0] if positions is not None else defaults.max_position_embeddings,
        cross_attention_freq=freq,
        num_query_tokens=queries.shape[1],
        encoder_width=_need(state, layer0 + "crossattention.self.key.weight", where).shape[1],
        embed_dim=vision_proj.shape[0] if vision_proj is not None else defaults.embed_dim,
        init_from=None,
        tokenizer=tokenizer,
    )


def _part(value, cls, name: str):
    """A named part as its config dataclass (a dict is accepted, as in YAML)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{name}= takes a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def _eva_state(state: dict[str, Tensor], model: Blip2Model, where: Path) -> dict[str, Tensor]:
    """The checkpoint's ``visual_encoder.*`` in our names, for a Blip2VisionModel encoder."""
    backbone = getattr(model.vision, "backbone", None)
    if not isinstance(backbone, transformers.Blip2VisionModel):
        raise KeyMapError(
            f"{where} carries EVA ViT weights (visual_encoder.*), which load into a Blip2VisionModel encoder only; "
            f"name one with vision=VisionConfig(kind='hf', path=<a Blip2 or blip_2_vision_model directory>)"
        )
    blocks = _layer_indices(state, EVA_BLOCK_KEY)
    if len(blocks) != backbone.config.num_hidden_layers:
        raise KeyMapError(
            f"{where}: visual_encoder has {len(blocks)} blocks, the named encoder {backbone.config.num_hidden_layers}"
        )
    table = eva_key_map(len(blocks))
    q_key, v_key, qkv_key = EVA_QKV_BIAS
    bias_keys = {k.format(i) for i in blocks for k in (q_key, v_key)}
    missing = sorted((set(table) | bias_keys) - set(state))
    unexpected = sorted(set(state) - set(table) - bias_keys)
    if missing or unexpected:
        raise KeyMapError(
            f"{where}: visual_encoder.* is not the EVA ViT layout: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    ours = {dst: state[src] for src, dst in table.items()}
    for i in blocks:
        ours[VISION_PREFIX + qkv_key.format(i)] = eva_qkv_bias(state[q_key.format(i)], state[v_key.format(i)])
    return ours


def lavis_config(
    state: dict[str, Tensor],
    path: Path,
    vision: VisionConfig | dict | None,
    llm: LLMConfig | dict | None,
    qformer_heads: int,
    tokenizer: str,
    vocab_size: int,
) -> Blip2Config:
    """The config of a LAVIS BLIP-2 checkpoint (``state``, from ``read_lavis``) with its frozen parts named.

    ``vision`` names the image encoder (for the official checkpoints: ``VisionConfig(kind="hf", path=<a Blip2
    directory>)``, EVA ViT-g); when the checkpoint carries ``visual_encoder.*`` those weights replace the encoder's.
    ``llm`` is required for a stage-2 checkpoint (``opt_proj`` / ``t5_proj``); given with a stage-1 checkpoint it
    starts stage 2 from it, the projection freshly initialised as in LAVIS. ``qformer_heads``: the Q-Former's head
    count (12 for every released checkpoint). ``tokenizer``: the Q-Former's BERT tokenizer ("minilm" has
    bert-base-uncased's vocabulary) and ``vocab_size`` its size (with [DEC]).
    """
    vision_cfg, llm_cfg = _part(vision, VisionConfig, "vision"), _part(llm, LLMConfig, "llm")
    stage1, projection = _layout(state, path)
    if vision_cfg is None:
        raise InputError(
            f"{path}: name the frozen image encoder with vision=VisionConfig(...) (for the official checkpoints, "
            "kind='hf' with a Blip2 directory: EVA ViT-g)"
        )
    if projection and llm_cfg is None:
        raise InputError(
            f"{path} is a stage-2 checkpoint ({projection}.*): "
            "name its frozen LLM with llm=LLMConfig(kind='hf', path=...)"
        )
    qformer = qformer_config_from_lavis(_without_encoder(state), path, qformer_heads, vocab_size, tokenizer)
    return Blip2Config(vision=vision_cfg, qformer=qformer, llm=llm_cfg, vision_norm_eps=LN_VISION_EPS)


def _without_encoder(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}


def _layout(state: dict[str, Tensor], path: Path) -> tuple[bool, str | None]:
    """(stage 1?, the stage-2 projection's name or None) of a LAVIS checkpoint."""
    stage1 = "Qformer.bert.embeddings.word_embeddings.weight" in state
    projection = next((name for name in PROJECTIONS if f"{name}.weight" in state), None)
    if not stage1 and projection is None:
        raise KeyMapError(
            f"{path} has neither the stage-1 text side (Qformer.bert.embeddings.word_embeddings) nor a stage-2 "
            f"projection ({' / '.join(PROJECTIONS)}): not a LAVIS BLIP-2 checkpoint (keys start {sorted(state)[:5]})"
        )
    return stage1, projection


def load_lavis_state(model: Blip2Model, state: dict[str, Tensor], path: Path) -> None:
    """Load a LAVIS checkpoint's tensors into ``model`` (built from ``lavis_config``), checking every key."""
    encoder_state = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    state = _without_encoder(state)
    stage1, projection = _layout(state, path)
    qformer = model.cfg.qformer
    expected_width = state["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape[1]
    if qformer.encoder_width != expected_width:
        raise KeyMapError(
            f"{path}: the Q-Former's cross-attention reads {expected_width}-wide image features, but the named "
            f"encoder gives {qformer.encoder_width}: name the encoder it was trained with"
        )
    table = lavis_key_map(qformer, stage1, projection)
    tied = TIED if stage1 else {}
    missing = sorted(set(table) - set(state))
    unexpected = sorted(set(state) - set(table) - set(tied) - {POSITION_IDS})
    if missing or unexpected:
        raise KeyMapError(
            f"{path} is not a LAVIS BLIP-2 {'stage-1' if stage1 else 'stage-2'} checkpoint: "
            f"missing keys {missing[:8]} ({len(missing)} in all), "
            f"unexpected keys {unexpected[:8]} ({len(unexpected)} in all)"
        )
    for alias, source in tied.items():
        if alias in state and not torch.equal(state[alias], state[source]):
            raise KeyMapError(f"{path}: {alias} differs from {source}, which LAVIS ties it to")

    ours = {dst: state[src] for src, dst in table.items()}
    if not stage1:
        ours |= copy_query_ffn_to_text_ffn(ours, qformer.num_layers)
    if encoder_state:
        ours |= _eva_state(encoder_state, model, path)
    load_mapped(model, ours, str(path))
    model.eval()


# ---- writing -----------------------------------------------------------------------------------------------------


def lavis_state_dict(model: Blip2Model, include_vision: bool = False) -> dict[str, Tensor]:
    """Our model in LAVIS's names: stage 1 (Blip2Qformer) without an LLM, else stage 2 (opt_proj / t5_proj).

    ``include_vision`` adds ``visual_encoder.*`` (a Blip2VisionModel encoder only; its key bias must be zero).
    """
    stage1 = model.llm is None
    projection = None if stage1 else ("t5_proj" if model.llm.is_encoder_decoder else "opt_proj")
    ours = model.state_dict()
    state = {src: ours[dst] for src, dst in lavis_key_map(model.cfg.qformer, stage1, projection).items()}
    if stage1:
        state |= {alias: state[source] for alias, source in TIED.items()}
    state[POSITION_IDS] = torch.arange(model.cfg.qformer.max_position_embeddings)[None]  # [1, P]
    if include_vision:
        state |= _eva_from_ours(model)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _eva_from_ours(model: Blip2Model) -> dict[str, Tensor]:
    backbone = getattr(model.vision, "backbone", None)
    if not isinstance(backbone, transformers.Blip2VisionModel):
        raise TypeError(
            "only a Blip2VisionModel encoder has a LAVIS (EVA) layout; "
            f"this model's is {type(backbone or model.vision).__name__}"
        )
    ours = model.state_dict()
    blocks = range(backbone.config.num_hidden_layers)
    state = {src: ours[dst] for src, dst in eva_key_map(len(blocks)).items()}
    q_key, v_key, qkv_key = EVA_QKV_BIAS
    for i in blocks:
        q, k, v = ours[VISION_PREFIX + qkv_key.format(i)].chunk(3)  # [3D] -> 3 x [D]
        if k.any():
            raise InputError(f"vision layer {i} has a non-zero key bias, which EVA's attention cannot hold")
        state[q_key.format(i)], state[v_key.format(i)] = q, v
    return state


def save_lavis(model: Blip2Model, path: str | Path, include_vision: bool = False) -> Path:
    """Write ``{"model": lavis_state_dict(model)}`` with torch.save (tensors only, loadable with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": lavis_state_dict(model, include_vision)}, path)
    return path
