"""t2i R@1 on the test split with the ITM re-rank scored by the ITM log-odds (match logit minus no-match logit)
instead of the match logit LAVIS takes (`compute_itm`): a diagnostic of the ITM head's common-mode drift.
usage: python score_variants.py DATA_ROOT MODEL..."""
import sys, torch, blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_retrieval import evaluate_retrieval

root, models = sys.argv[1], sys.argv[2:]
for model in models:
    pipe = blip2.load(model)
    match_logits = pipe.model.itm_logits  # [P, 2]; the re-rank reads column 1
    pipe.model.itm_logits = lambda *args: match_logits(*args) @ torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    r = evaluate_retrieval(pipe, f"{root}/test", k=4, caption_index=2, features=FeatureCache(f"{root}/features"),
                           progress=False)
    print(model, "log-odds", {m: round(r[m]["t2i_r1"], 3) for m in ("itc", "itc_itm")}, flush=True)
