"""Two gloo processes on CPU, launched once for the module as torchrun would (env:// on a free 127.0.0.1 port).

- The trainer's DDP path (and its FSDP2 path) ends with the same weights on both ranks, equal to one process
  training on the same global batches; an FSDP checkpoint resumes exactly; a batch left empty on one rank is
  skipped by both.
- BLIP-2's ITC loss gathers features across ranks WITH gradient: the gradients of two processes holding half the
  batch each equal those of one process holding all of it (LAVIS's gather without gradient does not).
- The whole stage-1 loss runs across ranks whose texts differ in length (ITM pairs each rank's texts with
  gathered ones, padded to the longest rank's); its ITC loss equals one process's on the global batch, and so does
  its ITG loss (token-weighted over the ranks).
- ITM with hard negatives on the other rank (drawn from similarities that decide the draw) equals one process on
  the global batch: the loss (mean over ranks) and every parameter gradient (averaged over ranks, as DDP does).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import default_collate

from blip2.config import Blip2Config
from blip2.distributed import get_rank, setup_distributed, teardown_distributed
from blip2.factory import build
from blip2.models import losses
from blip2.train.config import TrainConfig
from blip2.train.parallel import full_tensor
from blip2.train.trainer import Trainer
from blip2.weights.bert import load_tokenizer

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # test_trainer's tiny world, tests/tiny.py
from test_trainer import Regression, TinyNet, mean_loss, trained_weights  # noqa: E402
from tiny import TINY_QFORMER  # noqa: E402

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path) -> None:
    """Run ``rank_main(out)`` in WORLD processes with torchrun's environment variables; fail if any rank fails."""
    port, here = free_port(), str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_ddp; test_ddp.rank_main({str(out)!r})"
    procs, logs = [], [out / f"rank{r}.log" for r in range(WORLD)]
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env))
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):  # one rank died: the other would wait forever
            for p in procs:
                p.kill()
        time.sleep(0.05)
    assert [p.returncode for p in procs] == [0] * WORLD, "\n".join(log.read_text()[-3000:] for log in logs)


# ---- what each of the two ranks runs ----------------------------------------------------------------------------


def trainer_config(out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 2, "lr": 1e-2, "clip_grad_norm": 0.5, "save_every": 2,
                          "log_every": 1, "out_dir": str(out_dir), **overrides})


RUNS = ("ddp", "fsdp", "fsdp-resumed", "ddp-skipping")


class EmptySecondBatch:
    """Default collation, except that the second batch (of one rank, or of the single process) loses every example."""

    def __init__(self, rank: int = 1):
        self.rank, self.calls = rank, 0

    def __call__(self, examples):
        self.calls += 1
        return None if self.calls == 2 and get_rank() == self.rank else default_collate(examples)


def rank_main(out: str) -> None:
    """Each rank: train with DDP, FSDP, FSDP resumed from its step-2 checkpoint, and DDP with one rank's batch empty
    (final weights to files); then the ITC gradients with each way of gathering."""
    rank, world, _, _ = setup_distributed()
    torch.set_num_threads(1)
    out = Path(out)
    configs = {
        "ddp": trainer_config(out / "ddp"),
        "fsdp": trainer_config(out / "fsdp", fsdp=True),
        "fsdp-resumed": trainer_config(out / "fsdp-resumed", fsdp=True,
                                       resume=str(out / "fsdp" / "checkpoints" / "step-000002")),
        "ddp-skipping": trainer_config(out / "ddp-skipping"),  # rank 1's second batch is empty: both ranks skip it
    }
    for name, cfg in configs.items():
        model = TinyNet(dropout=0.0)
        collate = EmptySecondBatch() if name == "ddp-skipping" else None
        Trainer(model, mean_loss, Regression(16), cfg, collate_fn=collate).fit()
        weights = {k: full_tensor(v).clone() for k, v in model.trainable_state_dict().items()}  # gathered under FSDP
        save_file(weights, out / f"{name}-rank{rank}.safetensors")
    for gather in GATHERS:
        save_file(itc_gradients(rank, world, gather), out / f"itc-{gather}-rank{rank}.safetensors")
    save_file(stage1_on_share(out / "vision", rank, world), out / f"stage1-rank{rank}.safetensors")
    save_file(itm_on_share(out / "vision", rank, world), out / f"itm-rank{rank}.safetensors")
    teardown_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks")
    vision = transformers.Blip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=8)
    transformers.Blip2VisionModel(vision).save_pretrained(out / "vision")
    launch(out)
    return out


# ---- the trainer across processes ------------------------------------------------------------------------------


def test_ddp_and_fsdp_match_one_process_on_the_global_batch(two_ranks, tmp_path):
    references = {}
    for skipping in (False, True):
        single = TinyNet(dropout=0.0)
        cfg = trainer_config(tmp_path / f"single-{skipping}", batch_size=2 * WORLD)
        Trainer(single, mean_loss, Regression(16), cfg, collate_fn=EmptySecondBatch(rank=0) if skipping else None).fit()
        references[skipping] = trained_weights(single)
    for name in RUNS:
        rank0, rank1 = (load_file(two_ranks / f"{name}-rank{r}.safetensors") for r in range(WORLD))
        torch.testing.assert_close(rank1, rank0, rtol=0, atol=0, msg=f"{name}: ranks disagree")
        torch.testing.assert_close(rank0, references["skipping" in name],
                                   msg=f"{name} differs from one process on the same global batches")
    torch.testing.assert_close(load_file(two_ranks / "fsdp-resumed-rank0.safetensors"),
                               load_file(two_ranks / "fsdp-rank0.safetensors"), rtol=0, atol=0)
    assert len((two_ranks / "ddp" / "metrics.jsonl").read_text().splitlines()) == 4  # rank 0 alone logs
    rng = load_file(two_ranks / "ddp" / "checkpoints" / "step-000004" / "rng.safetensors")
    assert set(rng) == {"rank0/torch", "rank1/torch"}
    assert not torch.equal(rng["rank0/torch"], rng["rank1/torch"])  # each rank has its own dropout stream


# ---- ITC with gradient through the all-gather ----------------------------------------------------------------------

GLOBAL_BATCH, QUERIES, WIDTH, EMBED = 6, 4, 6, 8


class ReferenceGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows: (dist.get_rank() + 1) * rows]


def gather_without_gradient(x):
    """LAVIS's concat_all_gather: the gathered features are constants."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach())
    return torch.cat(parts)


GATHERS = {  # each takes (x, sizes) like losses.gather_with_grad; the batch is split evenly here
    "blip2": losses.gather_with_grad,
    "reference": lambda x, sizes=None: ReferenceGather.apply(x),
    "lavis": lambda x, sizes=None: gather_without_gradient(x),
}


def itc_setup(rank: int, world: int):
    """This rank's share of the global batch's raw inputs, and the two projections (and temp) producing the logits."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, QUERIES, WIDTH, generator=g)  # [G, Q, W]
    texts = torch.randn(GLOBAL_BATCH, WIDTH, generator=g)  # [G, W]
    torch.manual_seed(1)
    heads = nn.ModuleDict({"image": nn.Linear(WIDTH, EMBED), "text": nn.Linear(WIDTH, EMBED)})
    heads.temp = nn.Parameter(torch.tensor(0.07))
    share = GLOBAL_BATCH // world
    return images[rank * share: (rank + 1) * share], texts[rank * share: (rank + 1) * share], heads


def itc_gradients(rank: int, world: int, gather: str = "blip2") -> dict[str, torch.Tensor]:
    """Backward through ``losses.itc_loss`` with the named gather; parameter gradients averaged over ranks as DDP
    does, feature gradients this rank's."""
    images, texts, heads = itc_setup(rank, world)
    image_feats = F.normalize(heads["image"](images), dim=-1)  # [B, Q, E]
    text_feat = F.normalize(heads["text"](texts), dim=-1)  # [B, E]
    image_feats.retain_grad()
    text_feat.retain_grad()
    with mock.patch.object(losses, "gather_with_grad", GATHERS[gather]):
        losses.itc_loss(image_feats, text_feat, heads.temp)[0].backward()
    grads = {name: p.grad for name, p in heads.named_parameters()}
    if world > 1:
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
    return {**grads, "image_feats": image_feats.grad, "text_feat": text_feat.grad}


def assert_itc_matches_one_process(two_ranks: Path, gather: str) -> None:
    single = itc_gradients(rank=0, world=1)  # the whole global batch in one process
    ranks = [load_file(two_ranks / f"itc-{gather}-rank{r}.safetensors") for r in range(WORLD)]
    params = ("image.weight", "image.bias", "text.weight", "text.bias", "temp")
    torch.testing.assert_close({k: ranks[0][k] for k in params}, {k: single[k] for k in params})
    for feature in ("image_feats", "text_feat"):  # each rank's loss is a mean over its own half: / world
        torch.testing.assert_close(torch.cat([r[feature] for r in ranks]) / WORLD, single[feature])


def test_itc_with_a_gradient_carrying_gather_matches_one_process_and_lavis_gather_does_not(two_ranks):
    assert_itc_matches_one_process(two_ranks, "reference")
    with pytest.raises(AssertionError, match="not close"):
        assert_itc_matches_one_process(two_ranks, "lavis")


def test_blip2_itc_gradients_across_two_processes_equal_one_process(two_ranks):
    assert_itc_matches_one_process(two_ranks, "blip2")


# ---- the whole stage-1 loss across processes ---------------------------------------------------------------------

STAGE1_TEXTS = ["a red star", "two crosses", "two blue circles on a gray background", "a small green cross at the top"]


def tiny_stage1_model(vision_dir: Path):
    """The same tiny stage-1 model in every process, in eval mode (no dropout), its trainable weights drawn from
    normal(0, 0.1) (norm scales around 1): at BERT's 0.02 initialisation ITM and ITG barely see their inputs, and a
    wrong negative or target would change the losses by less than the tolerance."""
    vision = {"kind": "hf", "path": str(vision_dir)}
    model = build(Blip2Config.from_dict({"vision": vision, "qformer": TINY_QFORMER})).model
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():  # temp (on the model itself) keeps its value
            for name, p in module.named_parameters(recurse=False) if module is not model else ():
                if p.requires_grad:
                    scale = float(isinstance(module, nn.LayerNorm) and name == "weight")
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + scale)
    return model.eval()


def stage1_on_share(vision_dir: Path, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Stage-1 losses on this rank's share of STAGE1_TEXTS (rank 0's texts are shorter than rank 1's)."""
    model = tiny_stage1_model(vision_dir)
    features = torch.randn(len(STAGE1_TEXTS), model.vision.num_tokens(), model.vision.out_dim,
                           generator=torch.Generator().manual_seed(1))  # [G, N, D]
    share = len(STAGE1_TEXTS) // world
    rows = slice(rank * share, (rank + 1) * share)
    tok = load_tokenizer("minilm")(STAGE1_TEXTS[rows], padding="longest", return_tensors="pt")
    found = losses.stage1_losses(model, features[rows], tok.input_ids, tok.attention_mask)
    return {**{name: value.detach() for name, value in found.items()},
            "width": torch.tensor(tok.input_ids.shape[1]), "itg_tokens": tok.attention_mask[:, 1:].sum()}


def test_stage1_losses_across_ranks_with_texts_of_different_lengths(two_ranks):
    """Catches (in losses.py): ITC's ``start = row_offset(sizes)`` -> ``0``; ITG scoring padding (the ``mask[:, 1:]
    == 0`` fill dropped: the ranks pad to different widths). Bugs that are the same on every rank (ITG targets
    shifted) are left to tests/models/test_losses.py."""
    single = stage1_on_share(two_ranks / "vision", rank=0, world=1)
    ranks = [load_file(two_ranks / f"stage1-rank{r}.safetensors") for r in range(WORLD)]
    assert ranks[0]["width"] < ranks[1]["width"]  # what used to break ITM's concatenation
    torch.testing.assert_close(sum(r["itc"] for r in ranks) / WORLD, single["itc"])  # each rank: mean of its half
    tokens = sum(r["itg_tokens"] for r in ranks)  # each rank: mean over its own tokens
    torch.testing.assert_close(sum(r["itg"] * r["itg_tokens"] for r in ranks) / tokens, single["itg"])
    assert all(torch.isfinite(r[name]) for r in ranks for name in ("itm", "loss"))


# ---- ITM across processes, hard negatives on the other rank ----------------------------------------------------------

NEG_IMAGE = [2, 3, 0, 1]  # each text's hard negative image: on the other rank
NEG_TEXT = [3, 2, 1, 0]  # each image's hard negative text: on the other rank, not the same pair as NEG_IMAGE


def peaked_similarities(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ITC similarities [G, G] that decide the draw: the positive far above all (it must be masked), the chosen
    negative next (probability 1 - 1e-13 once the positive is out)."""
    sim_i2t, sim_t2i = torch.zeros(batch, batch), torch.zeros(batch, batch)
    rows = torch.arange(batch)
    sim_i2t[rows, rows] = sim_t2i[rows, rows] = 60.0
    sim_i2t[rows, torch.tensor(NEG_TEXT)] = 30.0
    sim_t2i[rows, torch.tensor(NEG_IMAGE)] = 30.0
    return sim_i2t, sim_t2i


def itm_on_share(vision_dir: Path, rank: int, world: int) -> dict[str, torch.Tensor]:
    """``losses.itm_loss`` on this rank's share of STAGE1_TEXTS (rank 1's texts are longer) with its rows of the
    global similarities: the loss, and every parameter gradient averaged over ranks as DDP averages them."""
    model = tiny_stage1_model(vision_dir)
    features = torch.randn(len(STAGE1_TEXTS), model.vision.num_tokens(), model.vision.out_dim,
                           generator=torch.Generator().manual_seed(1))  # [G, N, D]
    share = len(STAGE1_TEXTS) // world
    rows = slice(rank * share, (rank + 1) * share)
    tok = load_tokenizer("minilm")(STAGE1_TEXTS[rows], padding="longest", return_tensors="pt")
    sim_i2t, sim_t2i = peaked_similarities(len(STAGE1_TEXTS))
    embeds = model.vision_norm(features[rows])  # [B, N, D]
    loss = losses.itm_loss(model, embeds, tok.input_ids, tok.attention_mask, sim_i2t[rows], sim_t2i[rows],
                           losses.batch_sizes(share, embeds.device))
    loss.backward()
    grads = {f"grad/{name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    if world > 1:
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
    return {"itm": loss.detach(), **grads}


def test_itm_across_ranks_equals_one_process(two_ranks):
    """Catches (in losses.py): ITM's ``start = row_offset(sizes)`` -> ``0`` (rank 1 masks rank 0's pairs and draws
    its own positive); the positive masked at ``own`` instead of ``start + own``; the negative images, or the
    negative texts, taken from the local batch instead of the gathered one; ``_GatherWithGrad.backward`` without its
    ``all_reduce`` (the other rank's gradient for this rank's rows lost)."""
    single = itm_on_share(two_ranks / "vision", rank=0, world=1)
    ranks = [load_file(two_ranks / f"itm-rank{r}.safetensors") for r in range(WORLD)]
    torch.testing.assert_close(sum(r["itm"] for r in ranks) / WORLD, single["itm"])  # each rank: mean of its 3B pairs
    grads = {name: value for name, value in single.items() if name.startswith("grad/")}
    assert {"grad/vision_norm.weight", "grad/itm_head.weight", "grad/qformer.query_tokens"} <= set(grads)
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    torch.testing.assert_close({k: ranks[1][k] for k in grads}, {k: ranks[0][k] for k in grads}, rtol=0, atol=0)
    torch.testing.assert_close({k: ranks[0][k] for k in grads}, grads)
