"""Explicit key maps with ``{}`` layer templates, and the checks every converter runs: one home for expanding a
template over layers, turning module maps into tensor maps, and loading a mapped state strictly."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from blip2.errors import InputError


class KeyMapError(InputError):
    """A checkpoint's keys or shapes do not fit the expected layout."""


def expand_layers(template: dict[str, str], layers: Iterable[int]) -> dict[str, str]:
    """Fill the ``{}`` of every entry with each index in ``layers``."""
    return {src.format(i): dst.format(i) for i in layers for src, dst in template.items()}


def with_params(modules: dict[str, str], params: tuple[str, ...] = ("weight", "bias")) -> dict[str, str]:
    """Module map -> tensor map: one entry per parameter of each (Linear / LayerNorm) module."""
    return {f"{src}.{p}": f"{dst}.{p}" for src, dst in modules.items() for p in params}


def qformer_layer_map(
    num_layers: int, cross_attention_freq: int, layer: dict, cross: dict, text_ffn: dict | None
) -> dict[str, str]:
    """Per-layer tables expanded over the Q-Former's layers (cross-attention only where it exists)."""
    modules = expand_layers(layer, range(num_layers))
    modules |= expand_layers(cross, range(0, num_layers, cross_attention_freq))
    if text_ffn is not None:
        modules |= expand_layers(text_ffn, range(num_layers))
    return modules


def copy_query_ffn_to_text_ffn(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Our Q-Former always has a text FFN; a checkpoint without one gets a copy of the query FFN
    (the two start equal at BLIP-2's BERT initialisation, so this is the closest known starting point)."""
    names = [f"{part}.{p}" for part in ("up", "down", "norm") for p in ("weight", "bias")]
    return {
        f"qformer.layers.{i}.text_ffn.{name}": state[f"qformer.layers.{i}.query_ffn.{name}"].clone()
        for i in range(num_layers)
        for name in names
    }


def check_state(state: dict[str, Tensor], expected: dict[str, Tensor], where: str) -> None:
    """Raise a KeyMapError naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs expected {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    if shapes:
        problems.append(f"wrong shapes: {shapes[:8]}")
    if problems:
        raise KeyMapError(f"{where} does not fit this model: " + "; ".join(problems))


def load_mapped(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load ``state`` (our key names, a subset of the model) after checking every key exists with its shape."""
    target = model.state_dict()
    unknown = sorted(set(state) - set(target))
    if unknown:
        raise KeyMapError(f"{where}: the key map produced names this model does not have: {unknown[:8]}")
    check_state(state, {k: target[k] for k in state}, where)  # shapes
    model.load_state_dict(state, strict=False)
