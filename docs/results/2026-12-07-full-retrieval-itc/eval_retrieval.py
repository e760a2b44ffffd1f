"""t2i / i2t R@1 (ITC, ITC + ITM top 4) of one or more models on the test and compositional splits, as the demo
evaluates retrieval (docs/training.md, "The full plan's fine-tune on ITC alone").
usage: python eval_retrieval.py DATA_ROOT OUT.json MODEL..."""
import json, sys, time
import blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_retrieval import evaluate_retrieval

root, out, models = sys.argv[1], sys.argv[2], sys.argv[3:]
features = FeatureCache(f"{root}/features")
results = {}
for model in models:
    pipe = blip2.load(model)
    for split in ("test", "compositional"):
        t = time.time()
        r = evaluate_retrieval(pipe, f"{root}/{split}", k=4, caption_index=2, features=features, progress=False)
        results[f"{model} {split}"] = {m: {d: round(r[m][d], 4) for d in ("t2i_r1", "t2i_r5", "i2t_r1")}
                                       for m in ("itc", "itc_itm")} | {"seconds": round(time.time() - t, 1)}
        print(model, split, results[f"{model} {split}"], flush=True)
json.dump(results, open(out, "w"), indent=1)
