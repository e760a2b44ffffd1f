"""Initialise the Q-Former from a BERT-family checkpoint, and build its tokenizer with the [DEC] token."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from blip2.io import read_state_dict
from blip2.models.qformer import QFormer
from blip2.weights.keymap import KeyMapError, expand_layers
from blip2.weights.offline import minilm_dir

DEC_TOKEN = "[DEC]"

# BERT key -> Q-Former key; "{}" is the layer index. The query FFN is copied from the text FFN at init.
BERT_TO_QFORMER = {
    "embeddings.word_embeddings.weight": "word_embeddings.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
    "encoder.layer.{}.attention.self.query.weight": "layers.{}.self_attn.query.weight",
    "encoder.layer.{}.attention.self.query.bias": "layers.{}.self_attn.query.bias",
    "encoder.layer.{}.attention.self.key.weight": "layers.{}.self_attn.key.weight",
    "encoder.layer.{}.attention.self.key.bias": "layers.{}.self_attn.key.bias",
    "encoder.layer.{}.attention.self.value.weight": "layers.{}.self_attn.value.weight",
    "encoder.layer.{}.attention.self.value.bias": "layers.{}.self_attn.value.bias",
    "encoder.layer.{}.attention.output.dense.weight": "layers.{}.self_attn.out.weight",
    "encoder.layer.{}.attention.output.dense.bias": "layers.{}.self_attn.out.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "layers.{}.self_attn.norm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "layers.{}.self_attn.norm.bias",
    "encoder.layer.{}.intermediate.dense.weight": "layers.{}.text_ffn.up.weight",
    "encoder.layer.{}.intermediate.dense.bias": "layers.{}.text_ffn.up.bias",
    "encoder.layer.{}.output.dense.weight": "layers.{}.text_ffn.down.weight",
    "encoder.layer.{}.output.dense.bias": "layers.{}.text_ffn.down.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "layers.{}.text_ffn.norm.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "layers.{}.text_ffn.norm.bias",
}
# Parts of a BERT checkpoint the Q-Former has no use for.
BERT_UNUSED = ("embeddings.token_type_embeddings.weight", "embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def resolve_bert_dir(name: str) -> Path:
    """'minilm' -> the packaged MiniLM-L6-H384; anything else is a local BERT directory."""
    path = minilm_dir() if name == "minilm" else Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a BERT model directory (no config.json)")
    return path


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The BERT tokenizer of ``name`` with ``[DEC]`` added as the BOS token for generation."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_bert_dir(name))
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def bert_state_dict(path: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        file = path / name
        if file.is_file():
            return {k.removeprefix("bert."): v for k, v in read_state_dict(file).items()}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")


def init_qformer_from_bert(qformer: QFormer, name: str) -> None:
    """Copy a BERT's embeddings and (first ``num_layers``) layers into ``qformer`` (query FFN = text FFN);
    cross-attention stays random."""
    path = resolve_bert_dir(name)
    state = bert_state_dict(path)
    bert_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    num_layers = qformer.cfg.num_layers
    if num_layers > bert_layers:
        raise KeyMapError(f"{path} has {bert_layers} layers but the Q-Former config asks for {num_layers}")
    mapping = expand_layers(BERT_TO_QFORMER, range(num_layers))  # a shallower Q-Former takes the first num_layers layers
    skipped = set(expand_layers(BERT_TO_QFORMER, range(bert_layers))) - set(mapping)
    unknown = sorted(set(state) - set(mapping) - skipped - set(BERT_UNUSED))
    if unknown:
        raise KeyMapError(f"{path}: unexpected keys for a BERT checkpoint: {unknown[:8]}")
    target = qformer.state_dict()
    converted = {}
    for src, dst in mapping.items():
        if src not in state:
            raise KeyMapError(f"{path}: missing key {src}")
        tensor = state[src]
        if dst == "word_embeddings.weight":  # the vocabulary grows by [DEC]; its row keeps the random init
            extra = target[dst][tensor.shape[0]:]
            tensor = torch.cat([tensor, extra])
        if tensor.shape != target[dst].shape:
            raise KeyMapError(f"{path}: {src} has shape {tuple(tensor.shape)}, the Q-Former expects {tuple(target[dst].shape)}")
        converted[dst] = tensor
    for i in range(num_layers):
        for part in ("up", "down", "norm"):
            for p in ("weight", "bias"):
                converted[f"layers.{i}.query_ffn.{part}.{p}"] = converted[f"layers.{i}.text_ffn.{part}.{p}"].clone()
    target.update(converted)  # the rest (queries, cross-attention, LM head) keeps its init
    qformer.load_state_dict(target)
