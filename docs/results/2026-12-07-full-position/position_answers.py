"""What a stage-2 model answers to a split's position questions ("where is the red star?"): VQA accuracy and each
true answer's replies. Writes the questions it asks to posdata/SPLIT/ (vqa.json, a link to the images) in the
current folder (docs/training.md, "Why position is the weak type").

usage: python position_answers.py MODEL DATA_ROOT SPLIT LIMIT"""
import collections
import json
import os
import sys

import torch

import blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_vqa import evaluate_vqa_task

model_dir, root, split, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
asked = f"posdata/{split}"
os.makedirs(asked, exist_ok=True)
questions = [q for q in json.load(open(f"{root}/{split}/vqa.json")) if q["question_type"] == "position"][:limit]
json.dump(questions, open(f"{asked}/vqa.json", "w"))
if not os.path.exists(f"{asked}/images"):
    os.symlink(os.path.abspath(f"{root}/{split}/images"), f"{asked}/images")
torch.manual_seed(0)
result = evaluate_vqa_task(blip2.load(model_dir), asked, features=FeatureCache(f"{root}/features"), progress=False)
print("position questions:", len(questions), "accuracy:", result["metrics"]["overall"])
replies = {p["question_id"]: p["answer"] for p in result["predictions"]}
table = collections.Counter((q["answers"][0], replies[q["question_id"]]) for q in questions)
for truth in sorted({t for t, _ in table}):
    row = sorted(((reply, n) for (t, reply), n in table.items() if t == truth), key=lambda kv: -kv[1])
    print(f"{truth:>8}:", ", ".join(f"{reply} {n}" for reply, n in row))
