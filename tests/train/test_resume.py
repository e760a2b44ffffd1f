"""A killed run continued with ``resume: auto`` ends with exactly the weights of an uninterrupted run."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from blip2.train.checkpointing import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
)
from blip2.train.config import TrainConfig
from blip2.train.trainer import Trainer
from blip2.weights.keymap import KeyMapError

sys.path.insert(0, str(Path(__file__).parent))  # the tiny world of test_trainer.py
from test_trainer import (  # noqa: E402
    Regression,
    RegressionStream,
    TinyNet,
    noisy_loss,
    trained_weights,
)

RANDOM_RUN = dict(steps=12, batch_size=3, grad_accum=2, lr=1e-2, warmup_steps=2, clip_grad_norm=0.5,
                  save_every=4, keep_last=2, log_every=1)  # 20 examples: 3 steps per epoch, step 4 is mid-epoch


class Crash(Exception):
    pass


def train(out_dir, data, loss_fn=noisy_loss, **overrides):
    model = TinyNet()
    result = Trainer(model, loss_fn, data, TrainConfig(**{**RANDOM_RUN, "out_dir": str(out_dir), **overrides})).fit()
    return model, result


def logged(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["epoch"], r["lr"], r["losses"], r["grad_norm"]) for r in map(json.loads, lines)]


def assert_same_run(run_a, model_a, run_b, model_b):
    torch.testing.assert_close(trained_weights(model_b), trained_weights(model_a), rtol=0, atol=0)
    last_a, last_b = latest_checkpoint(run_a), latest_checkpoint(run_b)
    torch.testing.assert_close(load_file(last_b / "optimizer.safetensors"), load_file(last_a / "optimizer.safetensors"),
                               rtol=0, atol=0)
    assert logged(run_b) == logged(run_a)


def crashing_in_step_7():
    """``noisy_loss`` that raises ``Crash`` in step 7 of a ``RANDOM_RUN`` (after the step-4 checkpoint)."""
    calls = []

    def loss(model, batch):
        calls.append(batch)
        if len(calls) == 13:  # two micro-batches per step
            raise Crash
        return noisy_loss(model, batch)

    return loss


@pytest.mark.parametrize("stream", [False, True], ids=["map-style", "iterable"])
def test_a_crashed_run_resumes_to_identical_weights(tmp_path, stream):
    data = RegressionStream if stream else Regression
    model_a, _ = train(tmp_path / "a", data(20))

    with pytest.raises(Crash):
        train(tmp_path / "b", data(20), crashing_in_step_7())
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"
    model_b, result = train(tmp_path / "b", data(20), resume="auto")
    assert result["step"] == 12
    assert_same_run(tmp_path / "a", model_a, tmp_path / "b", model_b)


def train_until_killed_in_the_step_6_save(out_dir: str, marker: str) -> None:
    """Run in a child process: train, and hang inside the step-6 save once its first file is written."""
    import blip2.train.checkpointing as checkpointing

    write_safetensors = checkpointing.save_file

    def write_then_hang(tensors, path, metadata=None):
        write_safetensors(tensors, path, metadata=metadata)
        if Path(path).parent.name.startswith(".step-000006"):  # the temporary folder of the step-6 save
            Path(marker).write_text("killing me now leaves a half-written checkpoint")
            time.sleep(3600)

    checkpointing.save_file = write_then_hang
    torch.set_num_threads(1)
    train(out_dir, Regression(20), save_every=2)


def test_sigkill_during_a_save_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path):
    marker = tmp_path / "saving-step-6"
    child = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_resume; "
             f"test_resume.train_until_killed_in_the_step_6_save({str(tmp_path / 'killed')!r}, {str(marker)!r})")
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = list((tmp_path / "killed" / "checkpoints").glob(".step-000006.*"))
    assert partial and (partial[0] / "model.safetensors").is_file()  # killed in the middle of writing step 6
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-000002", "step-000004"]

    model_a, _ = train(tmp_path / "a", Regression(20), save_every=2)
    model_b, _ = train(tmp_path / "killed", Regression(20), save_every=2, resume="auto")
    assert not partial[0].exists()  # the resumed run cleared the leftover
    assert_same_run(tmp_path / "a", model_a, tmp_path / "killed", model_b)


def test_resume_from_a_named_checkpoint_a_finished_run_or_nothing(tmp_path):
    model_a, _ = train(tmp_path / "a", Regression(20), steps=6, save_every=3)
    named = tmp_path / "a" / "checkpoints" / "step-000003"
    model_b, _ = train(tmp_path / "b", Regression(20), steps=6, resume=str(named))
    torch.testing.assert_close(trained_weights(model_b), trained_weights(model_a), rtol=0, atol=0)

    model_c, result = train(tmp_path / "a", Regression(20), steps=6, resume="auto")  # already finished: nothing to do
    assert result["step"] == 6
    torch.testing.assert_close(trained_weights(model_c), trained_weights(model_a), rtol=0, atol=0)

    model_d, _ = train(tmp_path / "fresh", Regression(20), steps=6, resume="auto")  # no checkpoint: from step 0
    torch.testing.assert_close(trained_weights(model_d), trained_weights(model_a), rtol=0, atol=0)


def test_resume_refuses_what_does_not_fit(tmp_path):
    train(tmp_path / "a", Regression(20), steps=3)
    with pytest.raises(CheckpointError, match=r"nowhere is not a complete training checkpoint \(missing \['model"):
        train(tmp_path / "b", Regression(20), steps=3, resume=str(tmp_path / "nowhere"))

    grown = TinyNet()
    grown.extra = nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(**{**RANDOM_RUN, "steps": 3, "out_dir": str(tmp_path / "a"), "resume": "auto"})
    message = r"step-000003/model.safetensors does not fit this model: missing keys \['extra'\]"
    with pytest.raises(KeyMapError, match=message):
        Trainer(grown, noisy_loss, Regression(20), cfg).fit()


def test_a_resumed_run_with_lr_scales_freezes_the_same_and_takes_the_new_scales(tmp_path):
    scales = {"head.0": 0.5, "head.4": 0.0}
    model_a, _ = train(tmp_path / "a", Regression(20), steps=6, save_every=3, lr_scales=scales)
    frozen = model_a.head[4].weight.detach().clone()
    model_b, _ = train(tmp_path / "b", Regression(20), steps=3, save_every=3, lr_scales=scales)
    model_b, _ = train(tmp_path / "b", Regression(20), steps=6, save_every=3, lr_scales=scales, resume="auto")
    torch.testing.assert_close(trained_weights(model_b), trained_weights(model_a), rtol=0, atol=0)
    assert torch.equal(model_b.head[4].weight, frozen)  # frozen in both halves: the initial weights throughout

    named = tmp_path / "b" / "checkpoints" / "step-000003"
    cfg = TrainConfig(**{**RANDOM_RUN, "steps": 6, "out_dir": str(tmp_path / "c"), "resume": str(named),
                         "lr_scales": {**scales, "head.0": 2.0}})  # the same split, a new scale
    trainer = Trainer(TinyNet(), noisy_loss, Regression(20), cfg)
    trainer.fit()
    assert sorted(g["lr_scale"] for g in trainer.optimizer.param_groups) == [1.0, 2.0, 2.0]  # the new config's


def test_a_fused_optimizer_run_resumes_exactly_and_a_resume_takes_the_setting_it_is_given(tmp_path):
    model_a, _ = train(tmp_path / "a", Regression(20), fused_optimizer=True)
    with pytest.raises(Crash):
        train(tmp_path / "b", Regression(20), crashing_in_step_7(), fused_optimizer=True)
    model_b, _ = train(tmp_path / "b", Regression(20), fused_optimizer=True, resume="auto")
    assert_same_run(tmp_path / "a", model_a, tmp_path / "b", model_b)

    train(tmp_path / "a-loop", Regression(20), steps=4)
    checkpoints = {False: tmp_path / "a-loop" / "checkpoints" / "step-000004",
                   True: tmp_path / "a" / "checkpoints" / "step-000008"}
    for saved, fused in ((False, True), (False, False), (True, False)):  # the checkpoint's setting must not win
        cfg = TrainConfig(**{**RANDOM_RUN, "out_dir": str(tmp_path / f"resumed-{saved}-{fused}"),
                             "resume": str(checkpoints[saved]), "fused_optimizer": fused})
        trainer = Trainer(TinyNet(), noisy_loss, Regression(20), cfg)
        trainer.fit()
        assert [bool(g["fused"]) for g in trainer.optimizer.param_groups] == [fused] * 2


def test_a_checkpoint_saved_before_a_setting_existed_warns_when_resumed_with_it_changed(tmp_path, caplog):
    train(tmp_path / "a", Regression(20), steps=4)
    saved = tmp_path / "a" / "checkpoints" / "step-000004" / "train_config.yaml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines()
                               if not line.startswith("math_attention:")) + "\n")  # as saved before the field
    for math, warned in ((False, False), (True, True)):  # the missing field meant its default, false
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="blip2.train"):
            train(tmp_path / f"resumed-{math}", Regression(20), resume=str(saved.parent), math_attention=math)
        assert ("'math_attention': (False, True)" in caplog.text) is warned, caplog.text
