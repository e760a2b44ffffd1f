"""t2i R@1 (ITC, ITC + ITM top 4, and the ceiling) of one model on one split of the demo's world, on caption 2 as the
demo evaluates retrieval; run on the training split it measures how far the fine-tune fits its own scenes.
usage: python eval_split.py DATA_ROOT SPLIT MODEL"""
import sys, blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_retrieval import evaluate_retrieval
root, split, model = sys.argv[1:4]
r = evaluate_retrieval(blip2.load(model), f"{root}/{split}", k=4, caption_index=2, features=FeatureCache(f"{root}/features"), progress=False)
print(split, {m: {d: round(r[m][d], 3) for d in ("t2i_r1", "t2i_r5")} for m in ("itc", "itc_itm", "ceiling") if m in r})
