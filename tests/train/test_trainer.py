"""The training loop on a tiny model: schedule, parameter groups, data order, logging, checkpoints, failures.

The small world defined at the top (``TinyNet``, ``Regression``, the losses) is shared with
test_resume.py and test_ddp.py.
"""

import json
import logging
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from blip2.config import ConfigError
from blip2.data.bad_images import BadImage, BadImageCounter, collate_skip_bad
from blip2.errors import InputError
from blip2.train.checkpointing import latest_checkpoint, list_checkpoints
from blip2.train.config import TrainConfig
from blip2.train.optim import build_param_groups, lr_factor, set_learning_rates
from blip2.train.stream import batch_size_of, epoch_batches, to_device
from blip2.train.trainer import (
    FrozenWeightCopies,
    NonFiniteLossError,
    Trainer,
    cpu_has_native_bf16,
)

# ---- the tiny world ---------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """A frozen "encoder" (with dropout that must stay off) feeding a small trainable head with dropout."""

    def __init__(self, dropout: float = 0.2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
        self.encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(16), nn.Linear(16, 2))
        self.temp = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.head(self.encoder(x)) * self.temp

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


class Regression(Dataset):
    """``n`` examples {"x": [8], "y": [2], "index": int} of a fixed random linear map."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "index": i}


class RegressionStream(IterableDataset):
    """The same examples as ``Regression``, streamed in an order reshuffled by ``set_epoch``."""

    def __init__(self, n: int = 24):
        self.data = Regression(n)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.epochs[-1]))
        return (self.data[i] for i in order.tolist())


def mean_loss(model, batch):
    """Deterministic: the mean squared error over the batch."""
    mse = (model(batch["x"]) - batch["y"]).pow(2).mean()
    return {"loss": mse, "mse": mse}


def noisy_loss(model, batch):
    """Uses every generator the trainer must restore: torch (dropout, row sampling), numpy and python."""
    errors = (model(batch["x"]) - batch["y"]).pow(2).mean(dim=1)  # [B]
    keep = torch.rand(len(errors)) < 0.8
    keep[0] = True
    jitter = 1e-2 * float(np.random.standard_normal()) + 1e-2 * random.random()
    mse = errors[keep].mean()
    return {"loss": mse + jitter * model.temp, "mse": mse}


def trained_weights(model):
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}



def config(tmp_path, **overrides):
    settings = dict(steps=6, batch_size=4, lr=1e-2, out_dir=str(tmp_path / "run"), log_every=2)
    settings.update(overrides)
    return TrainConfig(**settings)


# ---- configuration, schedule, groups, data order ---------------------------------------------------------------------


def test_config_validates_and_round_trips(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=2, precision="bf16", clip_grad_norm=1.0, resume="auto")
    cfg.save(tmp_path / "train.yaml")
    assert TrainConfig.load(tmp_path / "train.yaml") == cfg
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(steps=1, batch_size=1, precision="fp8")
    with pytest.raises(ConfigError, match="train.grad_accum must be >= 1"):
        TrainConfig(steps=1, batch_size=1, grad_accum=0)
    with pytest.raises(ConfigError, match=r"unknown train keys: \['epochs'\]"):
        TrainConfig.from_dict({"steps": 1, "batch_size": 1, "epochs": 3})
    with pytest.raises(ConfigError, match=r"lacks required keys \['batch_size'\]"):
        TrainConfig.from_dict({"steps": 1})


def test_lr_warms_up_linearly_then_decays_by_cosine():
    cfg = TrainConfig(steps=10, batch_size=1, warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] > 0.1 and lr_factor(10, cfg) == pytest.approx(0.1)


def test_each_group_follows_the_schedule_times_its_lr_scale():
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 10.0}, {"params": [b]}], lr=1.0)
    cfg = TrainConfig(steps=4, batch_size=1, lr=1e-3, warmup_steps=4)
    assert set_learning_rates(opt, cfg, 1) == pytest.approx(5e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-3, 5e-4])


def test_param_groups_keep_decay_off_biases_norms_and_scalars():
    model, cfg = TinyNet(), TrainConfig(steps=1, batch_size=1, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in build_param_groups(model, cfg)}
    assert groups == {
        0.05: ["head.0.weight", "head.4.weight"],
        0.0: ["head.0.bias", "head.3.bias", "head.3.weight", "head.4.bias", "temp"],
    }  # the frozen encoder is in no group

    def head_faster(m):
        return [{"params": m.head.parameters(), "lr_scale": 10.0}, {"params": [m.temp], "weight_decay": 0.5}]

    built = build_param_groups(model, cfg, head_faster)
    summary = [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in built]
    assert summary == [(10.0, 0.05, 2), (10.0, 0.0, 4), (1.0, 0.5, 1)]
    with pytest.raises(ValueError, match="frozen parameter 'encoder.0.weight'"):
        build_param_groups(model, cfg, lambda m: [{"params": m.parameters()}])
    with pytest.raises(ValueError, match=r"in no param group: \['temp'\]"):
        build_param_groups(model, cfg, lambda m: [{"params": m.head.parameters()}])


def test_lr_scales_slow_freeze_and_leave_alone_by_name_prefix(tmp_path):
    model = TinyNet(dropout=0.0)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, out_dir=str(tmp_path / "run"),
                      lr_scales={"head": 0.5, "head.4": 0.0})  # the longest prefix wins: head.4 frozen
    trainer = Trainer(model, mean_loss, Regression(), cfg)
    scales = {trainer._param_names[i]: g["lr_scale"] for g in trainer.optimizer.param_groups
              for i, p in enumerate(trainer._trainable) if any(p is q for q in g["params"])}
    assert scales == {"head.0.weight": 0.5, "head.0.bias": 0.5, "head.3.weight": 0.5, "head.3.bias": 0.5, "temp": 1.0}
    trainer.fit()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, start[name])}
    assert moved == {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias", "temp"}
    assert not model.head[4].weight.requires_grad  # frozen: saved with the model, never stepped
    assert "head.4.weight" in load_file(tmp_path / "run" / "checkpoints" / "step-000003" / "model.safetensors")

    with pytest.raises(ConfigError, match=r"prefixes \['haed'\] match no parameter; names start with \['encoder', 'head', 'temp'\]"):
        Trainer(TinyNet(), mean_loss, Regression(), TrainConfig(steps=1, batch_size=4, out_dir=str(tmp_path / "r2"),
                                                               lr_scales={"haed": 0.1}))
    for bad in (-1.0, "fast", None):
        with pytest.raises(ConfigError, match="scales >= 0"):
            TrainConfig(steps=1, batch_size=1, lr_scales={"head": bad})


def test_epoch_batches_deal_one_seeded_permutation_to_the_ranks():
    ranks = [epoch_batches(10, 2, epoch=0, seed=3, rank=r, world=2) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]  # 5 examples each, the partial batch dropped
    single = epoch_batches(10, 4, epoch=0, seed=3, rank=0, world=1)
    for step in range(2):  # one global batch = the union of the ranks' batches
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(single[step])
    assert epoch_batches(10, 2, 0, 3, 0, 2) == ranks[0]
    assert epoch_batches(10, 2, 1, 3, 0, 2) != ranks[0]
    padded = [epoch_batches(7, 1, epoch=0, seed=0, rank=r, world=3) for r in range(3)]  # 7 -> 9 by wrapping around
    assert [len(p) for p in padded] == [3, 3, 3] and {i for p in padded for [i] in p} == set(range(7))


def test_grouped_epoch_batches_never_mix_the_datasets_of_a_mixture():
    groups = (6, 9, 4)  # index ranges [0, 6), [6, 15), [15, 19)
    ranges = [range(0, 6), range(6, 15), range(15, 19)]
    for world in (1, 2):
        ranks = [epoch_batches(19, 2, epoch=1, seed=5, rank=r, world=world, groups=groups) for r in range(world)]
        for batches in ranks:
            assert all(any(set(b) <= set(r) for r in ranges) for b in batches)  # one dataset per batch
            assert len(batches) == sum((size + -size % world) // world // 2 for size in groups)
        dealt = {i for batches in ranks for b in batches for i in b}
        assert dealt <= set(range(19)) and len(dealt) >= 19 - 3 * world  # partial batches dropped per dataset
    first = epoch_batches(19, 2, 0, 5, 0, 1, groups)
    assert [sorted(b) for b in first] != sorted(sorted(b) for b in first)  # the datasets' batches are shuffled together
    assert epoch_batches(19, 2, 0, 5, 0, 1, groups) == first and epoch_batches(19, 2, 1, 5, 0, 1, groups) != first
    with pytest.raises(InputError, match="batch groups"):
        epoch_batches(20, 2, 0, 5, 0, 1, groups)


def test_batch_size_counts_examples_and_sees_batches_with_no_tensor_as_empty():
    bad = [("a.jpg", "unreadable")]
    assert batch_size_of({"bad_images": bad, "image": torch.zeros(3, 2), "text": ["x"] * 3}) == 3
    assert batch_size_of({"bad_images": bad * 4}) == 0  # every example dropped
    assert batch_size_of([torch.zeros(5, 1), torch.zeros(5)]) == 5
    assert batch_size_of({"x": torch.zeros(0, 8)}) == 0
    assert batch_size_of(None) == 0


# ---- a run ----------------------------------------------------------------------------------------------------------


def test_fit_logs_checkpoints_and_keeps_frozen_parts_in_eval(tmp_path):
    modes = []

    def loss_recording_modes(model, batch):
        modes.append((model.head.training, model.encoder.training))
        return noisy_loss(model, batch)

    cfg = config(tmp_path, save_every=2, keep_last=2, clip_grad_norm=1.0)
    result = Trainer(TinyNet(), loss_recording_modes, Regression(n=20), cfg).fit()
    run = tmp_path / "run"
    assert set(modes) == {(True, False)}
    assert [p.name for p in list_checkpoints(run)] == ["step-000004", "step-000006"]
    assert result["step"] == 6 and result["checkpoint"] == str(run / "checkpoints" / "step-000006")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert set(records[0]) == {"step", "epoch", "lr", "losses", "samples_per_s", "elapsed_s", "grad_norm"}
    assert set(records[0]["losses"]) == {"loss", "mse"} and records[-1]["epoch"] == 1  # 5 batches per epoch
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert TrainConfig.load(run / "train_config.yaml") == cfg
    weights = load_file(run / "checkpoints" / "step-000006" / "model.safetensors")
    assert sorted(weights) == sorted(TinyNet().trainable_state_dict())  # no frozen encoder weights
    optimizer = load_file(run / "checkpoints" / "step-000006" / "optimizer.safetensors")
    assert {"head.0.weight/exp_avg", "head.0.weight/exp_avg_sq", "temp/step"} <= set(optimizer)


def test_loss_goes_down(tmp_path):
    cfg = config(tmp_path, steps=60, lr=2e-2, warmup_steps=5, log_every=10)
    Trainer(TinyNet(dropout=0.0), mean_loss, Regression(), cfg).fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["losses"]["loss"] for line in lines]
    assert losses[-1] < 0.2 * losses[0]


def test_group_lr_scales_reach_the_optimizer(tmp_path):
    cfg = config(tmp_path, steps=3, warmup_steps=10)
    trainer = Trainer(TinyNet(), noisy_loss, Regression(), cfg,
                      param_groups=lambda m: [{"params": m.head.parameters(), "lr_scale": 0.1}, {"params": [m.temp]}])
    trainer.fit()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([3e-4, 3e-4, 3e-3])


def test_the_fused_optimizer_trains_what_the_loop_trains_up_to_rounding(tmp_path):
    models = {}
    for fused in (False, True):
        models[fused] = TinyNet(dropout=0.0)
        trainer = Trainer(models[fused], mean_loss, Regression(), config(tmp_path / str(fused), fused_optimizer=fused))
        trainer.fit()
        assert [bool(g["fused"]) for g in trainer.optimizer.param_groups] == [fused] * 2
        if not fused:  # torch's own choice (foreach on GPUs), not fused=False, which would turn foreach off too
            assert trainer.optimizer.defaults["fused"] is None and trainer.optimizer.defaults["foreach"] is None
    untrained = trained_weights(TinyNet(dropout=0.0))
    assert all(not torch.equal(w, untrained[k]) for k, w in trained_weights(models[True]).items())  # every part trained
    torch.testing.assert_close(trained_weights(models[True]), trained_weights(models[False]), rtol=1e-5, atol=1e-6)


def backward_nodes(fn, seen=None) -> set[str]:
    """The names of the autograd nodes ``fn`` reaches."""
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return set()
    seen.add(fn)
    return {type(fn).__name__}.union(*(backward_nodes(nxt, seen) for nxt, _ in fn.next_functions))


def test_math_attention_sends_the_forwards_attention_and_its_backward_through_the_math_backend(tmp_path):
    graphs = {False: [], True: []}  # every forward's backward nodes, by setting

    def attention_loss(seen: list):
        def loss_fn(model, batch):
            q = model(batch["x"])[:, None, None, :].expand(-1, 1, 3, 2)  # [B, heads 1, L 3, d 2]
            attended = torch.nn.functional.scaled_dot_product_attention(q, q, q * batch["y"][:, None, None, :1])
            loss = (attended.mean(dim=(1, 2)) - batch["y"]).pow(2).mean()
            seen.append(backward_nodes(loss.grad_fn))
            return {"loss": loss}
        return loss_fn

    models = {}
    for math in (False, True):
        models[math] = TinyNet(dropout=0.0)
        cfg = config(tmp_path / str(math), math_attention=math, batch_size=2, grad_accum=2)
        Trainer(models[math], attention_loss(graphs[math]), Regression(), cfg).fit()
    assert len(graphs[False]) == len(graphs[True]) == 12  # 6 steps of 2 micro-batches
    flash = "ScaledDotProductFlashAttentionForCpuBackward0"
    assert all(flash in nodes for nodes in graphs[False])  # torch's own pick on CPU
    # the math backend (autograd's backward) in every micro-batch of every step
    assert all(flash not in nodes and {"BmmBackward0", "SafeSoftmaxBackward0"} <= nodes for nodes in graphs[True])
    untrained = trained_weights(TinyNet(dropout=0.0))
    assert all(not torch.equal(w, untrained[k]) for k, w in trained_weights(models[True]).items())  # every part trained
    torch.testing.assert_close(trained_weights(models[True]), trained_weights(models[False]), rtol=1e-5, atol=1e-6)
    q = torch.randn(2, 1, 3, 2, requires_grad=True)
    after = backward_nodes(torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().grad_fn)
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in after  # torch's choice is back once the step is done


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = TinyNet(dropout=0.0)
    Trainer(big, mean_loss, Regression(), config(tmp_path / "big", batch_size=8)).fit()
    small = TinyNet(dropout=0.0)
    Trainer(small, mean_loss, Regression(), config(tmp_path / "small", batch_size=4, grad_accum=2)).fit()
    torch.testing.assert_close(trained_weights(small), trained_weights(big))


def test_empty_batches_are_skipped(tmp_path):
    calls, seen = [], []

    def flaky_collate(examples):  # every third batch loses all its examples, the others lose their first
        calls.append(len(examples))
        if len(calls) % 3 == 0:
            return None
        kept = examples[1:]
        return {"x": torch.stack([e["x"] for e in kept]), "y": torch.stack([e["y"] for e in kept])}

    def loss_counting(model, batch):
        seen.append(len(batch["x"]))
        return mean_loss(model, batch)

    Trainer(TinyNet(), loss_counting, Regression(), config(tmp_path, steps=5), collate_fn=flaky_collate).fit()
    assert seen == [3] * 5 and len(calls) == 7  # batches 3 and 6 were empty
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]

    with pytest.raises(RuntimeError, match="had no non-empty batch"):
        Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path / "dead"), collate_fn=lambda examples: None).fit()


def test_iterable_dataset_rolls_over_epochs(tmp_path):
    stream = RegressionStream(n=10)  # two batches of 4 per epoch
    result = Trainer(TinyNet(), noisy_loss, stream, config(tmp_path, steps=5)).fit()
    assert stream.epochs == [0, 1, 2] and result["epoch"] == 2


def test_non_finite_loss_stops_at_the_step_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    def explodes_at_step_5(model, batch):
        calls.append(1)
        out = noisy_loss(model, batch)
        if len(calls) == 5:
            out["mse"] = out["mse"] * float("nan")
            out["loss"] = out["loss"] + out["mse"]
        return out

    model = TinyNet()
    with pytest.raises(NonFiniteLossError, match=r"step 5: the loss is not finite \(loss=nan, mse=nan\).*step-000004"):
        Trainer(model, explodes_at_step_5, Regression(), config(tmp_path, steps=8, save_every=2)).fit()
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step-000004"
    saved = load_file(last / "model.safetensors")
    torch.testing.assert_close(trained_weights(model), saved, rtol=0, atol=0)  # the bad step changed nothing


def test_precision_and_fsdp_need_the_right_hardware(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="blip2.train"):
        trainer = Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path, precision="fp16"))
    assert trainer.autocast_dtype is None and "training in fp32 on cpu" in caplog.text
    auto = Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path, precision="auto", out_dir=str(tmp_path / "a")))
    assert auto.autocast_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(InputError, match="torchrun"):
        Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path, fsdp=True, out_dir=str(tmp_path / "b")))


def test_bf16_autocast_on_cpu_trains_fp32_weights(tmp_path):
    model = TinyNet()
    trainer = Trainer(model, mean_loss, Regression(), config(tmp_path, precision="bf16", steps=30, log_every=1))
    assert trainer.autocast_dtype == torch.bfloat16
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["losses"]["loss"] for line in lines]
    assert losses[-1] < 0.5 * losses[0]  # learns under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_frozen_linear_weights_held_in_bf16_train_bit_for_bit_as_autocast_casting_them(tmp_path, monkeypatch):
    """On CPU under bf16 autocast the frozen Linear's weight and bias are copied to bf16 once and swapped in for each
    step's forward: the run equals one where autocast casts them at every forward, bit for bit, and the model holds
    its own fp32 tensors again between steps and after."""
    model, seen = TinyNet(dropout=0.0), []
    frozen = dict(model.encoder.named_parameters())

    def loss_seeing_dtypes(model, batch):
        seen.append((model.encoder[0].weight.dtype, model.encoder[0].bias.dtype, model.head[0].weight.dtype))
        return mean_loss(model, batch)

    trainer = Trainer(model, loss_seeing_dtypes, Regression(), config(tmp_path / "copies", precision="bf16"))
    trainer.fit()
    assert [(module, name) for module, name, *_ in trainer.frozen_copies.copies] == [
        (model.encoder[0], "weight"), (model.encoder[0], "bias")]  # fmt: skip
    assert set(seen) == {(torch.bfloat16, torch.bfloat16, torch.float32)}  # trainable weights stay fp32 masters
    assert all(param is frozen[name] and param.dtype == torch.float32 for name, param in model.encoder.named_parameters())
    casting = TinyNet(dropout=0.0)
    with monkeypatch.context() as patch:  # no copies: autocast casts them at every forward, as before
        patch.setattr(FrozenWeightCopies, "__init__", lambda self, *args: setattr(self, "copies", []))
        Trainer(casting, mean_loss, Regression(), config(tmp_path / "casting", precision="bf16")).fit()
    for name, weight in trained_weights(model).items():
        assert torch.equal(weight, trained_weights(casting)[name]), name
    fp32 = Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path / "fp32", precision="fp32", steps=1))
    fp32.fit()
    assert fp32.frozen_copies.copies == []


def test_frozen_weights_are_copied_as_a_resumed_checkpoint_left_them_and_put_back_after_a_failing_step(tmp_path):
    """A checkpoint that holds frozen weights (a frozen Q-Former in stage 2's first phase) is loaded before the
    copies are made, so the steps read what it holds; a step that raises still puts the fp32 originals back."""
    whole = {"state_fn": lambda model: model.state_dict()}  # the frozen encoder is saved too
    cfg = config(tmp_path, precision="bf16", steps=2, save_every=2)
    Trainer(TinyNet(seed=0), mean_loss, Regression(), cfg, **whole).fit()
    seen = []

    def loss_seeing_the_encoder(model, batch):
        seen.append(model.encoder[0].weight.detach().clone())
        return mean_loss(model, batch)

    other = TinyNet(seed=1)  # another frozen encoder, replaced by the checkpoint's
    resumed = config(tmp_path, precision="bf16", steps=3, resume="auto")
    Trainer(other, loss_seeing_the_encoder, Regression(), resumed, **whole).fit()
    assert torch.equal(other.encoder[0].weight, TinyNet(seed=0).encoder[0].weight)
    assert len(seen) == 1 and torch.equal(seen[0], other.encoder[0].weight.to(torch.bfloat16))

    def failing(model, batch):
        raise RuntimeError("the step fell over")

    model = TinyNet()
    originals = list(model.parameters())
    with pytest.raises(RuntimeError, match="fell over"):
        Trainer(model, failing, Regression(), config(tmp_path / "failing", precision="bf16")).fit()
    assert all(a is b for a, b in zip(model.parameters(), originals)) and len(list(model.parameters())) == len(originals)


def test_a_frozen_tied_head_gets_its_own_bf16_copy_and_stays_tied(tmp_path):
    """An LLM's head shares the input embedding's tensor: only the head (a Linear) reads a bf16 copy in a step; the
    embedding's lookups stay fp32, and afterwards the two share one tensor again. Linears sharing a weight share
    its copy."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.table.weight
            self.twin = nn.Linear(8, 10, bias=False)
            self.twin.weight = self.table.weight
            self.requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, x):
            ids = x.abs().mul(3).long().clamp(max=9)  # [B, 8]
            dtypes.append((self.table.weight.dtype, self.head.weight.dtype, self.head.weight is self.twin.weight))
            hidden = self.table(ids).mean(dim=1) * self.scale  # [B, 8]
            return (self.head(hidden) + self.twin(hidden))[:, :2]  # [B, 2]

    dtypes = []
    model = TiedLM()
    Trainer(model, mean_loss, Regression(), config(tmp_path, precision="bf16", steps=2)).fit()
    assert set(dtypes) == {(torch.float32, torch.bfloat16, True)}
    assert model.head.weight is model.table.weight is model.twin.weight and model.table.weight.dtype == torch.float32


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch per process"):
        Trainer(TinyNet(), mean_loss, Regression(n=3), config(tmp_path))
    with pytest.raises(KeyError, match="'loss' entry"):
        Trainer(TinyNet(), lambda m, b: {"mse": mean_loss(m, b)["mse"]}, Regression(), config(tmp_path)).fit()
    frozen = TinyNet().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(frozen, mean_loss, Regression(), config(tmp_path))


def test_plot_run_draws_every_loss_component_and_the_lr(tmp_path):
    from blip2.train.plot import plot_run  # matplotlib: imported here only

    Trainer(TinyNet(), noisy_loss, Regression(), config(tmp_path, steps=12, warmup_steps=3, log_every=1)).fit()
    png = plot_run(tmp_path / "run")
    assert png == tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_run(tmp_path / "run", tmp_path / "elsewhere" / "c.png").is_file()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)


def test_a_fresh_run_refuses_to_overwrite_an_earlier_runs_checkpoints(tmp_path):
    Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path, save_every=3)).fit()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume: auto"):
        Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path, save_every=3))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before  # nothing touched
    resumed = Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path, steps=9, resume="auto")).fit()
    assert resumed["step"] == 9


class WithBadImages(Regression):
    """``Regression`` whose examples 3 and 10 cannot be read (``BadImage``, as a dataset yields one)."""

    def __getitem__(self, i):
        return BadImage(f"image{i}.png", "corrupt or truncated image data") if i in (3, 10) else super().__getitem__(i)


def test_batches_holding_unreadable_images_train_and_count_them(tmp_path):
    """An unreadable image is dropped from its batch and counted, on every path a batch travels (the move to the
    device took a ``BadImage`` record apart: ``BadImage.__new__() missing 'reason'``)."""
    counter = BadImageCounter()
    trainer = Trainer(TinyNet(), mean_loss, WithBadImages(), config(tmp_path, steps=8), collate_fn=collate_skip_bad,
                      batch_hook=counter.update)
    trainer.fit()
    assert trainer.step == 8 and counter.bad >= 2  # both seen in the first epoch (24 examples, 6 batches)
    assert to_device(BadImage("a.png", "why"), torch.device("cpu")) == BadImage("a.png", "why")


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_trains(tmp_path):
    first = Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path))
    with pytest.raises(InputError, match=r"run is in use by another training run \(pid \d+ .*\): wait for it"):
        Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path))
    first.fit()  # the first run trains on; when it is done the folder is free
    Trainer(TinyNet(), mean_loss, Regression(), config(tmp_path, resume="auto")).fit()
