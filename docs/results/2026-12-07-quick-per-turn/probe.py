"""VQA as trained and chat through ChatSession on one model: LIMIT questions and LIMIT / 3 conversations per split
(docs/training.md, "A visual prompt per turn"; its numbers in probe.json beside this file).

usage: python docs/results/2026-12-07-quick-per-turn/probe.py MODEL DATA_ROOT LIMIT OUT.json"""
import json
import sys

import torch

import blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_chat import evaluate_chat
from blip2.eval.run_vqa import evaluate_vqa_task

model, root, limit, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
pipe = blip2.load(model)
print("per turn:", pipe.cfg.llm.visual_prompt_per_turn, flush=True)
features = FeatureCache(f"{root}/features")
results = {}
keep = ("overall", "per_question_type", "per_turn")
for split in ("test", "compositional"):
    m = evaluate_vqa_task(pipe, f"{root}/{split}", limit=limit, features=features, progress=False)["metrics"]
    results[f"vqa_{split}"] = {k: m[k] for k in keep if k in m}
    m = evaluate_chat(pipe, f"{root}/{split}", limit=limit // 3, progress=False)["metrics"]
    results[f"chat_{split}"] = {k: m[k] for k in keep if k in m}
    print(split, {k: v.get("overall") for k, v in results.items()}, flush=True)
json.dump(results, open(out, "w"), indent=1)
