"""`blip2 demo` end to end on a tiny shapes world with the real offline parts (a few steps, a few images)."""

import json
import shutil

from blip2.data.feature_cache import FeatureCache
from blip2.demo.run import BARS, DemoConfig, run_demo


def tiny_demo(tmp_path, train: int = 16, **overrides) -> DemoConfig:
    settings = dict(
        data_root=str(tmp_path / "shapes"), runs=str(tmp_path / "runs"), report=str(tmp_path / "report"),
        sizes={"train": train, "val": 0, "test": 6, "compositional": 4}, stage1_steps=2,
        retrieval_steps=2, stage2_steps=2, eval_limit=2, retrieval_k=2, baseline_limit=2,
    )  # fmt: skip
    settings.update(overrides)
    return DemoConfig(**settings)


def test_the_demo_trains_evaluates_reports_and_then_reuses_its_model(tmp_path, capsys):
    metrics = run_demo(tiny_demo(tmp_path))
    report = tmp_path / "report"
    for name in ("metrics.json", "metrics.md", "metrics_full.json", "examples.png", "stage1_curves.png",
                 "retrieval_curves.png", "stage2_warmup_curves.png", "stage2_curves.png"):
        assert (report / name).is_file(), name
    trained = metrics["summary"]["trained"]
    assert set(BARS) <= set(trained) and all(trained[name] >= 0.0 for name in BARS)  # CIDEr may pass 1
    grounding = metrics["trained"]["grounding"]["metrics"]
    assert trained["caption loss gap, own vs other image"] == grounding["gap"] == grounding["loss_other"] - grounding["loss_own"]
    assert trained["visual prompt spread"] == grounding["prompt_spread"] > 0
    assert trained["t2i R@1 ceiling"] > 0
    assert len(metrics["examples"]) == 4 and all(example["caption"] is not None for example in metrics["examples"])
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(metrics["summary"]))
    weights = (tmp_path / "runs" / "stage2" / "final" / "model.safetensors").read_bytes()
    capsys.readouterr()

    run_demo(tiny_demo(tmp_path))  # a second run reuses every phase
    out = capsys.readouterr().out
    assert out.count("reusing") == 4  # stage 1, its retrieval fine-tune and both phases of stage 2
    assert (tmp_path / "runs" / "stage2" / "final" / "model.safetensors").read_bytes() == weights

    shutil.rmtree(tmp_path / "runs" / "stage2_warmup")
    run_demo(tiny_demo(tmp_path))  # the first phase is trained again, so the second (built on it) is too
    assert capsys.readouterr().out.count("reusing") == 2  # stage 1 and its retrieval fine-tune

    run_demo(tiny_demo(tmp_path, train=20, retrain=True))  # more training scenes: re-cached, retrained
    assert "train_000019" in FeatureCache(tmp_path / "shapes" / "features")
    assert "reusing" not in capsys.readouterr().out
