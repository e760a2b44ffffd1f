"""VQA accuracy of one model, greedy against the paper's beam search (5 beams, length_penalty -1), and captions'
CIDEr greedy against 5 beams (docs/training.md, "Stage 2 from stage 1 in the quick plan, and beam-search captions").
usage: python decoding_probe.py MODEL DATA_ROOT LIMIT OUT.json"""
import json, sys, time
import torch
import blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_vqa import evaluate_vqa_task
from blip2.eval.run_caption import evaluate_captioning

model, root, limit, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
pipe = blip2.load(model)
features = FeatureCache(f"{root}/features")
results = {}
for split in ("test", "compositional"):
    for name, gen in {"greedy": {}, "beam5_lp-1": {"num_beams": 5, "length_penalty": -1.0}}.items():
        t = time.time()
        m = evaluate_vqa_task(pipe, f"{root}/{split}", limit=limit, features=features, progress=False, **gen)["metrics"]
        results[f"vqa_{name}_{split}"] = {"overall": m["overall"], "per_type": m.get("per_question_type"),
                                          "seconds": round(time.time() - t, 1)}
        print(f"vqa_{name}_{split}", results[f"vqa_{name}_{split}"], flush=True)
    for name, gen in {"greedy": {}, "beam5": {"num_beams": 5}}.items():
        r = evaluate_captioning(pipe, f"{root}/{split}", limit=limit, features=features, progress=False, **gen)
        results[f"caption_{name}_{split}"] = r["metrics"]["CIDEr"]
        print(f"caption_{name}_{split}", r["metrics"]["CIDEr"], flush=True)
json.dump(results, open(out, "w"), indent=1)
