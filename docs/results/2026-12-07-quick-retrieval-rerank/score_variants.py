"""t2i R@1 on the test split with the ITM re-rank's score as LAVIS takes it (the match logit) and as the log-odds
(match logit minus no-match logit), a diagnostic of the ITM head's common-mode drift.
usage: python score_variants.py DATA_ROOT MODEL..."""
import sys, torch, blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_retrieval import evaluate_retrieval
root, models = sys.argv[1], sys.argv[2:]
for model in models:
    pipe = blip2.load(model)
    original = pipe.model.itm_logits
    def log_odds(*args):
        logits = original(*args)  # [P, 2]
        return torch.stack([logits[:, 0], logits[:, 1] - logits[:, 0]], dim=1)
    for name, fn in (("log-odds", log_odds),):
        pipe.model.itm_logits = fn
        r = evaluate_retrieval(pipe, f"{root}/test", k=4, caption_index=2, features=FeatureCache(f"{root}/features"), progress=False)
        print(model, name, {m: round(r[m]["t2i_r1"], 3) for m in ("itc", "itc_itm")}, flush=True)
