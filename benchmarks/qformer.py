"""Q-Former forward + backward: ours against transformers' ``Blip2QFormerModel``, same config, weights and inputs.

Our Q-Former's weights are copied into transformers' through the production key map (``hf_key_map``), the
outputs are checked equal (eval mode), then training steps are timed (train mode: dropout on, as in
training), the two sides alternating. Two workloads:

- ``queries``: the learned queries attend to the image features (ITC's image side, stage 2, inference);
- ``queries+text``: queries and a padded caption in one bidirectional pass (ITM, stage 1's costliest loss).

``python benchmarks/qformer.py [--quick] [--profile]``; ``--profile`` prints the top operators of each side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import common
import demo
import torch
import transformers
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from blip2.config import QFormerConfig
from blip2.models.qformer import QFormer
from blip2.weights.hf import hf_key_map, hf_qformer_config

TARGET = 1.3
TEXT_LEN = 24  # caption tokens in the queries+text workload (the demo's captions are ~10-20 tokens)
WORKLOADS = ("queries", "queries+text")


@dataclass(frozen=True)
class Setting:
    name: str
    qformer: QFormerConfig
    image_tokens: int
    batch: int
    workloads: tuple[str, ...] = WORKLOADS


def settings(quick: bool) -> list[Setting]:
    """The paper's BERT-base Q-Former on ViT-g features, and the demo's (its recipe, its encoder's features)."""
    if quick:
        tiny = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=4,
                             encoder_width=16, max_position_embeddings=64, init_from=None, tokenizer=None)  # fmt: skip
        return [Setting("tiny", tiny, image_tokens=10, batch=2)]
    paper = QFormerConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, num_query_tokens=32,
                          encoder_width=1408, init_from=None, tokenizer=None)  # fmt: skip
    tokens, width = demo.image_tokens()
    demo_cfg = dataclasses.replace(demo.recipe(1).model.qformer, encoder_width=width, init_from=None, tokenizer=None)
    return [
        # ~250 GFLOP a step: the queries workload alone keeps the full run within minutes on 2 shared cores
        Setting("BERT-base (paper), ViT-g features", paper, image_tokens=257, batch=8, workloads=("queries",)),
        Setting("demo (shapes_stage1.yaml), EfficientNet-Lite0 features", demo_cfg, image_tokens=tokens, batch=16),
    ]


class HFSide(nn.Module):
    """transformers' Q-Former plus the query tokens and text embeddings that its parent model holds."""

    def __init__(self, ours: QFormer):
        super().__init__()
        cfg = ours.cfg
        self.qformer = transformers.Blip2QFormerModel(hf_qformer_config(cfg, text_input=True)).to(torch.float32)
        self.query_tokens = nn.Parameter(ours.query_tokens.detach().clone())
        self.word_embeddings = nn.Embedding.from_pretrained(ours.word_embeddings.weight.detach().clone(), freeze=False)
        self.position_embeddings = nn.Embedding.from_pretrained(
            ours.position_embeddings.weight.detach().clone(), freeze=False
        )
        self.qformer.load_state_dict(qformer_state_in_hf_names(ours), strict=True)

    def forward(self, image_embeds: Tensor, input_ids: Tensor | None, text_mask: Tensor | None) -> Tensor:
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, Q, H]
        if input_ids is None:
            return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
        positions = torch.arange(input_ids.shape[1])
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # [B, T, H]
        mask = torch.cat([torch.ones(batch, queries.shape[1], dtype=text_mask.dtype), text_mask], dim=1)  # [B, Q + T]
        out = self.qformer(
            query_embeds=torch.cat([queries, text], dim=1), query_length=queries.shape[1], attention_mask=mask,
            encoder_hidden_states=image_embeds,
        )  # fmt: skip
        return out.last_hidden_state  # [B, Q + T, H]


def qformer_state_in_hf_names(ours: QFormer) -> dict[str, Tensor]:
    """Our Q-Former's tensors under ``Blip2QFormerModel``'s names, through the production key map (text FFN kept)."""
    table = hf_key_map(ours.cfg, retrieval=True, text_ffn=True)
    state = {f"qformer.{k}": v for k, v in ours.state_dict().items()}
    return {
        hf.removeprefix("qformer."): state[mine].detach().clone()
        for hf, mine in table.items()
        if hf.startswith("qformer.") and mine in state
    }


def our_forward(model: QFormer, image_embeds: Tensor, input_ids: Tensor | None, text_mask: Tensor | None) -> Tensor:
    if input_ids is None:
        return model(image_embeds=image_embeds).queries  # [B, Q, H]
    out = model(image_embeds, input_ids, text_mask, mode="bidirectional")
    return torch.cat([out.queries, out.text], dim=1)  # [B, Q + T, H]


def make_inputs(setting: Setting, cfg: QFormerConfig) -> dict[str, tuple]:
    """Per workload: (image_embeds [B, N, D], input_ids [B, T] or None, text_mask [B, T] or None)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(setting.batch, setting.image_tokens, cfg.encoder_width, generator=g)
    text_len = min(TEXT_LEN, cfg.max_position_embeddings)
    ids = torch.randint(1000, cfg.vocab_size, (setting.batch, text_len), generator=g)  # past BERT's special ids
    mask = torch.ones_like(ids)
    mask[1::2, text_len // 2 :] = 0  # every other caption is half padding
    return {"queries": (image, None, None), "queries+text": (image, ids, mask)}  # keys: WORKLOADS


def training_step(model: nn.Module, forward, inputs: tuple):
    """One forward + backward (a scalar of the outputs as the loss); the caller's model is in train mode."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = forward(*inputs)
        out.pow(2).mean().backward()

    return step


def step_flops(step) -> float:
    """Floating-point operations of one call of ``step`` (which also serves as a warm-up)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def print_profile(name: str, step, rows: int = 12) -> None:
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\nprofile, {name} (one step, top operators by self CPU time):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run_setting(setting: Setting, repeats: int, profile_ops: bool) -> list[tuple]:
    cfg = setting.qformer
    torch.manual_seed(0)
    ours = QFormer(cfg)
    theirs = HFSide(ours)
    print(f"{setting.name}: transformers attention implementation {theirs.qformer.config._attn_implementation!r}")
    rows = []
    all_inputs = make_inputs(setting, cfg)
    for workload in setting.workloads:
        inputs = all_inputs[workload]
        with torch.no_grad():  # same weights, same function: check before timing
            torch.testing.assert_close(our_forward(ours.eval(), *inputs), theirs.eval()(*inputs), rtol=1e-4, atol=1e-4)
        ours.train()
        theirs.train()
        sides = {"ours": training_step(ours, lambda *a: our_forward(ours, *a), inputs),
                 "transformers": training_step(theirs, theirs, inputs)}  # fmt: skip
        gflop = step_flops(sides["ours"]) / 1e9  # ours' warm-up
        sides["transformers"]()  # theirs'
        seconds = common.interleaved(sides, repeats, warmup=0)
        ratio = common.median(seconds["transformers"]) / common.median(seconds["ours"])
        rows.append((setting, workload, seconds, gflop, ratio))
        if profile_ops:
            for name, step in sides.items():
                print_profile(f"{name}, {setting.name}, {workload}", step)
    return rows


def shape(setting: Setting) -> str:
    cfg = setting.qformer
    return (f"{cfg.hidden_size} wide, {cfg.num_layers} layers, {cfg.num_query_tokens} queries, cross-attention every "
            f"{cfg.cross_attention_freq}, image {setting.image_tokens} x {cfg.encoder_width}")  # fmt: skip


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print each side's top operators (torch.profiler)")
    args = parser.parse_args()
    repeats = common.setup(args, default_repeats=5)
    results = []
    for setting in settings(args.quick):
        results += run_setting(setting, repeats, args.profile)
    print(f"\nQ-Former forward + backward, fp32, train mode; median (min-max) of {repeats} interleaved steps\n")
    common.table(
        ["config", "shape", "batch", "workload", "GFLOP/step", "ours", "transformers", "ours GFLOP/s",
         "ours / transformers"],
        [(s.name, shape(s), s.batch, w, f"{g:.1f}", common.spread(sec["ours"]), common.spread(sec["transformers"]),
          f"{g / common.median(sec['ours']):.1f}", f"{r:.2f}x") for s, w, sec, g, r in results],
    )  # fmt: skip
    for setting, workload, _, _, ratio in results:
        common.ratio_line(f"qformer fwd+bwd, {setting.name}, {workload}, batch {setting.batch}", ratio, TARGET)


if __name__ == "__main__":
    main()
