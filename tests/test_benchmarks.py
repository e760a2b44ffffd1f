"""Smoke tests of the benchmark scripts: each runs on tiny models with ``--quick`` and prints its table and
``ratio: X.XXx`` lines (the scripts themselves assert that both sides agree: same Q-Former outputs, identical
greedy captions and chat replies). The scripts run in this process (imports are the slow part of a run);
the end-to-end ``run_all.py --quick`` in subprocesses is marked slow."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RATIO = re.compile(r"^ratio: (\d+\.\d\d)x  \S.*\(.*\)$", re.MULTILINE)
TABLE_RULE = re.compile(r"^\| --- \|", re.MULTILINE)
SCRIPT_MODULES = ("common", "demo", "model_pair", "qformer", "generation", "chat", "feature_cache", "memory", "run_all",
                  "stage1_step", "train_step")


@pytest.fixture
def run_script(monkeypatch, capsys):
    """``run_script(name, *args)`` -> stdout of ``benchmarks/<name>.py --quick *args`` run in this process."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()

    def run(name: str, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [f"{name}.py", "--quick", *args])
        with torch.random.fork_rng():
            runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="__main__")
        return capsys.readouterr().out

    yield run
    torch.set_num_threads(threads)  # the scripts set these process-wide
    if progress_bars:
        transformers.utils.logging.enable_progress_bar()
    for module in SCRIPT_MODULES:  # plain names like "chat" must not linger in sys.modules
        sys.modules.pop(module, None)


def ratios(output: str) -> list[float]:
    return [float(value) for value in RATIO.findall(output)]


def test_qformer_prints_a_table_and_a_ratio_per_workload(run_script):
    out = run_script("qformer")
    assert out.startswith("machine: ")
    assert TABLE_RULE.search(out)
    assert len(ratios(out)) == 2  # queries, queries+text on the tiny config
    assert all(value > 0 for value in ratios(out))
    assert "target >= 1.30x" in out


def test_generation_compares_identical_captions_at_batch_1_and_16(run_script):
    out = run_script("generation")
    assert len(ratios(out)) == 2
    assert "batch 1 (identical greedy captions)" in out and "batch 16 (identical greedy captions)" in out


def test_chat_reports_turn_five(run_script):
    out = run_script("chat")
    assert len(ratios(out)) == 1
    assert "chat turn 5 latency" in out
    turn_rows = re.findall(r"^\| (\d) \| (\d+) / (\d+) \|", out, re.MULTILINE)
    assert [int(turn) for turn, _, _ in turn_rows] == [1, 2, 3, 4, 5]
    for turn, ours, theirs in turn_rows[1:]:  # after turn 1 the cache saves recomputing the history
        assert int(ours) < int(theirs)
    assert [int(theirs) for _, _, theirs in turn_rows] == sorted(int(theirs) for _, _, theirs in turn_rows)


def test_stage1_step_checks_equal_losses_and_reports_the_projection_share(run_script):
    out = run_script("stage1_step")
    assert "| tiny | 4 |" in out and "loss " in out and "itm " in out
    assert len(ratios(out)) == 1 and "target >= 1.30x" in out


def test_train_step_times_a_demo_phase_both_ways_through_the_real_trainer(run_script):
    out = run_script("train_step")
    assert "| stage 2, projection alone (shapes_stage2_warmup) |" in out and " / " in out
    assert len(ratios(out)) == 1 and "before / this" in out


def test_train_step_times_the_fused_optimizer_against_the_loop_on_the_full_plan(run_script, monkeypatch):
    built, adamw = [], torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        built.append(kwargs.get("fused"))
        return adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    out = run_script("train_step", "--against", "loop")
    assert built == [True, None]  # this side fused, the other torch's default
    assert "fused AdamW (this) against AdamW's per-tensor loop (before)" in out
    assert "| full plan, stage1 (shapes_stage1) |" in out
    assert len(ratios(out)) == 1


def trainer_calls(monkeypatch, method: str, setting: str) -> list[tuple[str, object]]:
    """Filled with (the side's run, its ``setting``) each time ``Trainer.<method>`` runs."""
    from blip2.train.trainer import Trainer

    calls, original = [], getattr(Trainer, method)

    def recording(self):
        calls.append((Path(self.cfg.out_dir).parent.name, getattr(self.cfg, setting)))
        return original(self)

    monkeypatch.setattr(Trainer, method, recording)
    return calls


def test_train_step_times_math_attention_against_torchs_pick_on_the_full_plans_stage_2(run_script, monkeypatch):
    steps = trainer_calls(monkeypatch, "_attention", "math_attention")
    out = run_script("train_step", "--against", "flash")
    assert steps == [("this-0", True)] * 4 + [("before-0", False)] * 4  # --quick: 4 steps a side, this side first
    assert "math attention (this) against torch's attention pick (flash on CPU) (before)" in out
    assert "| full plan, stage2_warmup (shapes_stage2_warmup) |" in out
    assert len(ratios(out)) == 1


def test_train_step_times_bf16_autocast_against_fp32_on_the_quick_plans_stage_1(run_script, monkeypatch):
    sides = trainer_calls(monkeypatch, "_autocast_dtype", "precision")
    out = run_script("train_step", "--against", "fp32")
    assert sides == [("this-0", "bf16"), ("before-0", "fp32")]
    assert "bf16 autocast (this) against fp32 (before)" in out and "| stage 1 (shapes_stage1) |" in out
    assert len(ratios(out)) == 1


def test_train_step_times_itc_alone_against_the_three_losses_on_the_quick_plans_fine_tune(run_script, monkeypatch):
    from blip2.train import stages

    trained, original = [], stages.stage1_losses

    def recording(model, features, ids, mask, losses):
        trained.append((tuple(losses), ids.shape[0]))
        return original(model, features, ids, mask, losses)

    monkeypatch.setattr(stages, "stage1_losses", recording)
    out = run_script("train_step", "--against", "losses")
    assert trained == [(("itc",), 2)] * 4 + [(("itc", "itm", "itg"), 2)] * 4  # --quick: batch 2 on both sides
    assert "ITC alone (this) against ITC + ITM + ITG (before)" in out
    assert "| quick plan, retrieval (shapes_retrieval) |" in out
    assert len(ratios(out)) == 1


def test_feature_cache_compares_cache_and_images(run_script):
    out = run_script("feature_cache")
    assert "| feature cache |" in out and "| images |" in out
    assert len(ratios(out)) == 1


def test_memory_stage_measures_a_peak_above_what_was_loaded(monkeypatch):
    """The per-stage measurement a memory.py subprocess runs, here in this process on the tiny model."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    memory = runpy.run_path(str(BENCHMARKS / "memory.py"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script's children run (a second thread only waits on a busy machine)
    try:
        result = memory["run_stage"]("generation", quick=True)
    finally:
        torch.set_num_threads(threads)
        for module in SCRIPT_MODULES:
            sys.modules.pop(module, None)
    assert 0 < result["loaded_mb"] <= result["peak_mb"]
    assert "3-turn chat" in result["what"]


def test_ratio_line_says_whether_the_target_is_met(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    common = runpy.run_path(str(BENCHMARKS / "common.py"))
    assert common["ratio_line"]("x", 1.5, 1.3).startswith("ratio: 1.50x  x (")
    assert common["ratio_line"]("x", 1.5, 1.3).endswith("target >= 1.30x: met)")
    assert common["ratio_line"]("x", 0.999, 1.0).endswith("target >= 1.00x: missed)")
    calls = []
    seconds = common["interleaved"]({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert [len(v) for v in seconds.values()] == [3, 3]


@pytest.mark.slow
def test_run_all_quick_end_to_end(tmp_path):
    """Every script in its own process (memory.py's stages in theirs), then the summary of ratio lines."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.split("## summary", 1)[1]
    assert len(ratios(done.stdout)) == 2 + 1 + 3 + 2 + 1 + 1 + 1
    for name in ("qformer", "feature_cache", "memory", "generation", "chat", "stage1_step", "train_step"):
        assert re.search(rf"^\s*{name}  ratio: \d+\.\d\dx", summary, re.MULTILINE), name
