"""`blip2 demo` end to end on a tiny shapes world with the real offline parts (a few steps, a few images)."""

import json
import shutil

from blip2.data.feature_cache import FeatureCache
from blip2.demo.run import (
    FULL,
    QUICK,
    QUICK_BARS,
    DemoConfig,
    cache_covers,
    recipe,
    run_demo,
)


def tiny_demo(tmp_path, train: int = 16, **overrides) -> DemoConfig:
    settings = dict(
        data_root=str(tmp_path / "shapes"), runs=str(tmp_path / "runs"), report=str(tmp_path / "report"),
        sizes={"train": train, "val": 2, "test": 6, "compositional": 4}, stage1_steps=2,
        retrieval_steps=2, stage2_steps=2, eval_limit=2, retrieval_k=2, baseline_limit=2,
    )  # fmt: skip
    settings.update(overrides)
    return DemoConfig(**settings)


def test_the_demo_trains_evaluates_reports_and_then_reuses_its_model(tmp_path, capsys):
    metrics = run_demo(tiny_demo(tmp_path))
    report = tmp_path / "report"
    for name in ("metrics.json", "metrics.md", "metrics_full.json", "examples.png", "chat.md", "stage1_curves.png",
                 "retrieval_curves.png", "stage2_warmup_curves.png", "stage2_curves.png"):
        assert (report / name).is_file(), name
    summary = metrics["summary"]
    trained = summary["trained"]
    assert summary["bars"] == QUICK_BARS and set(QUICK_BARS) <= set(trained) and all(trained[name] >= 0.0 for name in QUICK_BARS)
    for split in ("", " (compositional)"):  # every bar's number on both splits; the blind prior beside VQA and chat
        assert {f"VQA accuracy{split}", f"chat accuracy{split}", f"CIDEr{split}", f"t2i R@1 (ITC+ITM){split}"} <= set(trained)
        assert 0.0 <= summary["blind prior"][f"VQA accuracy{split}"] <= 1.0
        assert 0.0 <= summary["blind prior"][f"chat accuracy{split}"] <= 1.0
    assert set(metrics["trained"]["caption_test"]["metrics"]) >= {"Bleu_4", "CIDEr"}
    assert "METEOR" not in metrics["trained"]["caption_test"]["metrics"]  # a JVM start per call: not for the demo
    chat = metrics["trained"]["chat_test"]
    assert trained["chat accuracy"] == chat["metrics"]["overall"] and chat["num_conversations"] == 1  # eval_limit 2 // 3
    assert len(metrics["chat"]) == 4 and all(turn["assistant"] is not None for turn in metrics["chat"])
    assert "**assistant:**" in (report / "chat.md").read_text()
    grounding = metrics["trained"]["grounding"]["metrics"]
    assert trained["caption loss gap, own vs other image"] == grounding["gap"] == grounding["loss_other"] - grounding["loss_own"]
    assert trained["visual prompt spread"] == grounding["prompt_spread"] > 0
    assert trained["t2i R@1 ceiling"] > 0
    assert len(metrics["examples"]) == 4 and all(example["caption"] is not None for example in metrics["examples"])
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(metrics["summary"]))
    weights = (tmp_path / "runs" / "stage2" / "final" / "model.safetensors").read_bytes()
    features, sizes = tmp_path / "shapes" / "features", tiny_demo(tmp_path).sizes
    identity = FeatureCache(features).meta["encoder"]
    assert cache_covers(features, sizes, identity)
    assert not cache_covers(features, {**sizes, "train": sizes["train"] + 1}, identity)  # one scene more: not covered
    assert not cache_covers(features, sizes, {**identity, "weights_sha256": "another encoder"})
    cached = (features / "meta.json").stat().st_mtime_ns
    capsys.readouterr()

    run_demo(tiny_demo(tmp_path, stage2_steps=3))  # a second run reuses every phase, even one the plan now trains longer
    out = capsys.readouterr().out
    assert out.count("reusing") == 4  # stage 1, its retrieval fine-tune and both phases of stage 2
    warned = [line for line in out.splitlines() if "trained with other settings" in line]
    assert len(warned) == 2 and all("{'train.steps': (2, 3)}" in line for line in warned), warned  # stage 2's phases
    assert (tmp_path / "runs" / "stage2" / "final" / "model.safetensors").read_bytes() == weights
    assert (features / "meta.json").stat().st_mtime_ns == cached  # the cache covered the world: not encoded again

    shutil.rmtree(tmp_path / "runs" / "stage2" / "final")  # as if killed after its last checkpoint
    (tmp_path / "runs" / "stage2" / "kept").touch()
    run_demo(tiny_demo(tmp_path))  # the phase continues from its checkpoint: nothing before it is retrained
    out = capsys.readouterr().out
    assert out.count("reusing") == 3 and "trained with other settings" not in out  # the plan as they were trained
    assert (tmp_path / "runs" / "stage2" / "final" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "runs" / "stage2" / "kept").is_file()  # continued in its folder, not replaced

    shutil.rmtree(tmp_path / "runs" / "stage2_warmup")
    run_demo(tiny_demo(tmp_path))  # the first phase is trained again, so the second (built on it) is too
    assert capsys.readouterr().out.count("reusing") == 2  # stage 1 and its retrieval fine-tune
    assert not (tmp_path / "runs" / "stage2" / "kept").exists()  # built on a retrained phase: replaced

    run_demo(tiny_demo(tmp_path, train=20))  # more training scenes: every phase reused, and each says so
    warned = [line for line in capsys.readouterr().out.splitlines() if "trained with other settings" in line]
    assert len(warned) == 4 and all("'training scenes': (16, 20)" in line for line in warned), warned
    run_demo(tiny_demo(tmp_path, train=20, retrain=True))  # re-cached, retrained
    cache = FeatureCache(tmp_path / "shapes" / "features")
    assert "train_000019" in cache and "val_000001" in cache  # val too, for `blip2 eval ... --features`
    assert "reusing" not in capsys.readouterr().out


def test_each_plan_chains_packaged_recipes_and_the_step_options_reach_them(tmp_path):
    for phases, config in ((QUICK, DemoConfig(runs=str(tmp_path))), (FULL, DemoConfig.full_plan(runs=str(tmp_path)))):
        names = [phase.name for phase in phases]
        assert "retrieval" in names and len(set(names)) == len(names)
        for index, phase in enumerate(phases):
            assert phase.init is None or phase.init in names[:index]  # each starts from an earlier phase
            loaded = recipe(phase, config)
            assert loaded.train.out_dir == f"{tmp_path}/{phase.name}" and loaded.train.resume == "auto"
            assert loaded.init == (None if phase.init is None else f"{tmp_path}/{phase.init}/final")
            if loaded.stage == 2:  # conversations in every stage-2 phase, so the final model chats
                assert loaded.data.chat == [f"{config.data_root}/train"] and loaded.data.one_source_per_batch
            steps = {"stage1": "stage1_steps", "retrieval": "retrieval_steps", "stage2": "stage2_steps"}[phase.steps]
            assert recipe(phase, DemoConfig(**{**vars(config), steps: 7})).train.steps == 7
    quick = {phase.name: recipe(phase, DemoConfig()) for phase in QUICK}
    assert all(quick[name].model.llm.visual_prompt_per_turn for name in ("stage2_warmup", "stage2"))
    assert quick["stage2"].train.steps == 300 and quick["stage2_warmup"].data.captions_per_image == 1
    assert all(quick[name].data.question_type_repeats == {"position": 2} for name in ("stage2_warmup", "stage2"))
    assert quick["stage1"].data.caption_index == 2 and quick["stage1"].model.vision_norm_position_gain == 4
    assert quick["retrieval"].losses == ["itc"] and quick["retrieval"].train.batch_size == 64
    assert quick["stage1"].losses is None  # stage 1 trains BLIP-2's three losses; only the fine-tune drops two
    few = DemoConfig(sizes={"train": 20, "val": 1, "test": 2, "compositional": 1})  # a quick try: one batch of all
    assert recipe(QUICK[1], few).train.batch_size == 20 and recipe(QUICK[0], few).train.batch_size == 16
    full = {phase.name: recipe(phase, DemoConfig.full_plan()) for phase in FULL}
    assert full["stage1"].data.caption_index == 2 and full["stage1"].model.vision_norm_position_gain == 4
    assert all(full[name].model.llm.visual_prompt_per_turn for name in ("stage2_warmup", "stage2"))
    assert full["retrieval"].train.batch_size == 64 and full["retrieval"].train.lr == 6e-4
    assert full["retrieval"].train.steps == 400 and full["retrieval"].losses is None  # 0.628 against 0.593 in 300
    assert all(full[name].data.question_type_repeats == {"position": 2} for name in ("stage2_warmup", "stage2"))
