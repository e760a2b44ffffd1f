"""A stage-1 training step (ITC + ITM + ITG, forward and backward) with each image's cross-attention keys and values
computed once and read by ITC and by ITM's three passes (``ImageContext``), against the step before that change,
in which ITM ran its 3B image rows through the Q-Former and projected every row's features again.

Same model, same inputs, same random draws (the hard negatives): the losses must agree to float tolerance. Two
configs: the demo's (its recipe's Q-Former on EfficientNet-Lite0 features) and the paper's (BERT-base Q-Former, 32
queries, on ViT-g features). Reports step time, GFLOP per step, and the share of the cross-attention projections.
``python benchmarks/stage1_step.py [--quick]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass

import common
import demo
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from blip2.config import Blip2Config, QFormerConfig
from blip2.data.text import qformer_ids
from blip2.demo.shapes import ShapesConfig, captions, make_scene, text_rng
from blip2.models import losses
from blip2.models.blip2 import Blip2Model
from blip2.models.vision import ImageEncoder
from blip2.train.trainer import cpu_has_native_bf16
from blip2.weights.bert import load_tokenizer

TARGET = 1.3


@dataclass(frozen=True)
class Setting:
    name: str
    qformer: QFormerConfig
    image_tokens: int
    image_width: int
    batch: int


def settings(quick: bool) -> list[Setting]:
    if quick:
        tiny = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=4,
                             max_position_embeddings=64, init_from=None)  # fmt: skip
        return [Setting("tiny", tiny, image_tokens=10, image_width=16, batch=4)]
    tokens, width = demo.image_tokens()
    demo_cfg = dataclasses.replace(demo.recipe(1).model.qformer, init_from=None)
    paper = QFormerConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, num_query_tokens=32,
                          cross_attention_freq=2, init_from=None)  # fmt: skip
    return [
        Setting("demo (shapes_stage1), EfficientNet-Lite0 features", demo_cfg, tokens, width,
                demo.recipe(1).train.batch_size),
        Setting("BERT-base (paper), ViT-g features", paper, image_tokens=257, image_width=1408, batch=8),
    ]


def stage1_model(setting: Setting) -> Blip2Model:
    """The stage-1 network on precomputed features (the frozen encoder is not run: a stand-in of its width)."""
    cfg = Blip2Config(qformer=dataclasses.replace(setting.qformer, encoder_width=setting.image_width), llm=None)
    encoder = ImageEncoder(nn.Identity(), (1, 1), setting.image_width)
    torch.manual_seed(0)
    return Blip2Model(cfg, encoder, dec_token_id=load_tokenizer("minilm").bos_token_id).train()


def batch(setting: Setting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random features [B, N, D] and shapes-world captions as Q-Former ids and mask [B, T]."""
    cfg = ShapesConfig()
    texts = [random.Random(i).choice(captions(make_scene("train", i, cfg), text_rng("train", i, cfg)))
             for i in range(setting.batch)]
    ids, mask = qformer_ids(load_tokenizer("minilm"), texts, setting.qformer.max_text_len)
    features = torch.randn(setting.batch, setting.image_tokens, setting.image_width, generator=torch.Generator().manual_seed(1))
    return features, ids, mask


def itm_projecting_every_row(model, image_embeds, ids, mask, sim_i2t, sim_t2i, sizes, context=None):
    """ITM before the change (one process): its (pos, pos, neg) images [3B, N, D] through the Q-Former, whose
    cross-attention projects every row's features again."""
    start = losses.row_offset(sizes)
    neg_image = image_embeds[losses.sample_hard_negatives(sim_t2i, start)]
    neg_text = losses.sample_hard_negatives(sim_i2t, start)
    images = torch.cat([image_embeds, image_embeds, neg_image])  # [3B, N, D]
    out = model.qformer(images, torch.cat([ids, ids[neg_text], ids]), torch.cat([mask, mask[neg_text], mask]),
                        mode="bidirectional")
    logits = model.itm_head(out.queries).mean(dim=1)  # [3B, 2]
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long()
    return F.cross_entropy(logits, labels)


@contextlib.contextmanager
def projecting_every_row():
    original = losses.itm_loss
    losses.itm_loss = itm_projecting_every_row
    try:
        yield
    finally:
        losses.itm_loss = original


def step_of(model, inputs, before: bool, autocast: torch.dtype | None):
    """One stage-1 forward + backward from a fixed random state; returns the losses."""

    def step() -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same hard negatives and dropout on both sides
        with projecting_every_row() if before else contextlib.nullcontext(), \
                torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            found = losses.stage1_losses(model, *inputs)
        found["loss"].backward()
        return {name: float(value.detach()) for name, value in found.items()}

    return step


def gflop(step) -> float:
    """Floating-point operations of one call of ``step``, in GFLOP."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def projection_gflop(setting: Setting, image_rows: int) -> float:
    """The cross-attention key/value projections of ``image_rows`` images, forward and backward (3x the forward's
    multiply-adds): two [N, D] x [D, H] products per cross-attention layer and image."""
    cfg = setting.qformer
    layers = len(range(0, cfg.num_layers, cfg.cross_attention_freq))
    return layers * 2 * 2 * image_rows * setting.image_tokens * setting.image_width * cfg.hidden_size * 3 / 1e9


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    repeats = common.setup(args, default_repeats=5)
    autocast = torch.bfloat16 if cpu_has_native_bf16() else None  # as the demo trains (precision: auto)
    rows = []
    for setting in settings(args.quick):
        model, inputs = stage1_model(setting), batch(setting)
        sides = {"once per step": step_of(model, inputs, False, autocast),
                 "every pass (before)": step_of(model, inputs, True, autocast)}  # fmt: skip
        reused, before = (side() for side in sides.values())
        for name in reused:  # identical losses, to the float tolerance of the precision
            assert abs(reused[name] - before[name]) <= (2e-2 if autocast else 1e-5) * max(1.0, abs(before[name])), name
        total, total_before = (gflop(side) for side in sides.values())
        share = projection_gflop(setting, setting.batch) / total  # ITC's B rows, read by every pass
        share_before = projection_gflop(setting, 4 * setting.batch) / total_before  # ITC's B and ITM's 3B rows
        seconds = common.interleaved(sides, repeats, warmup=0)
        ratio = common.median(seconds["every pass (before)"]) / common.median(seconds["once per step"])
        rows.append((setting, seconds, (total, share), (total_before, share_before), ratio, reused))
    precision = "bf16 autocast" if autocast else "fp32"
    print(f"\nstage-1 step (ITC + ITM + ITG forward and backward), {precision}; median (min-max) of {repeats} "
          "interleaved steps\n")
    common.table(
        ["config", "batch", "keys/values once: s/step", "every pass (before): s/step", "GFLOP once / before",
         "cross K/V share once / before", "losses (once)"],
        [(s.name, s.batch, common.spread(sec["once per step"]), common.spread(sec["every pass (before)"]),
          f"{g[0]:.1f} / {gb[0]:.1f}", f"{g[1]:.0%} / {gb[1]:.0%}",
          ", ".join(f"{k} {v:.4f}" for k, v in found.items())) for s, sec, g, gb, r, found in rows],
    )  # fmt: skip
    for setting, _, _, _, ratio, _ in rows:
        common.ratio_line(f"stage-1 step, {setting.name}, batch {setting.batch}", ratio, TARGET,
                          how="before / keys and values once, higher is better")


if __name__ == "__main__":
    main()
