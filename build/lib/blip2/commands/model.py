"""`blip2 info`: what a model is made of."""

from __future__ import annotations

import json

from blip2.pipeline import Blip2Pipeline, load


def describe(pipe: Blip2Pipeline) -> dict:
    """Components, parameter counts, preprocessing and dtypes of a loaded model."""
    model, cfg, pre = pipe.model, pipe.cfg, pipe.preprocess
    return {
        "vision": {**cfg.vision.__dict__, "tokens": model.vision.num_tokens(), "width": model.vision.out_dim,
                   "dtype": str(model.vision_dtype).removeprefix("torch.")},
        "preprocess": {"size": list(pre.size), "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation},
        "qformer": {k: getattr(cfg.qformer, k) for k in ("hidden_size", "num_layers", "num_heads", "num_query_tokens",
                                                        "cross_attention_freq", "encoder_width", "init_from")},
        "llm": None if model.llm is None else {
            **cfg.llm.__dict__, "family": "encoder-decoder" if model.llm.is_encoder_decoder else "decoder-only",
            "hidden_size": model.llm.hidden_size, "dtype": str(model.llm.dtype).removeprefix("torch."),
        },
        "parameters": model.parameter_counts(),
    }


def info(source: str = "default", /, json_output: bool = False) -> None:
    """Show a model's components, parameter counts (trainable / frozen), preprocessing and dtype.

    SOURCE is a preset ("default": EfficientNet-Lite0 + MiniLM Q-Former + SmolLM2-135M-Instruct), a directory saved
    by blip2, a transformers Blip2 directory, or a LAVIS .pth file.
    """
    summary = describe(load(source))
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    counts = summary["parameters"]
    print(f"model: {source}")
    v = summary["vision"]
    print(f"  image encoder : {v['kind']}{' ' + v['name'] if v['name'] else ''} -> {v['tokens']} tokens x {v['width']} ({v['dtype']}, frozen)")
    p = summary["preprocess"]
    print(f"  preprocess    : {p['size'][0]}x{p['size'][1]} {p['interpolation']}, mean {p['mean']}, std {p['std']}")
    q = summary["qformer"]
    print(f"  Q-Former      : {q['num_layers']} layers x {q['hidden_size']} ({q['num_heads']} heads), {q['num_query_tokens']} queries, "
          f"cross-attention every {q['cross_attention_freq']} layer(s), init {q['init_from']}")
    if summary["llm"]:
        llm = summary["llm"]
        print(f"  LLM           : {llm['kind']}{' ' + llm['path'] if llm['path'] else ''} ({llm['family']}, hidden {llm['hidden_size']}, {llm['dtype']}, frozen)")
    else:
        print("  LLM           : none (stage-1 model)")
    print(f"  parameters    : {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")


# ---- inference commands -------------------------------------------------------------------------------------------
