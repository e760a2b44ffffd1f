"""The demo's shapes world and feature cache in ./data/shapes with N training scenes (as `blip2 demo --train-images N`
makes them; every scene depends only on its split and index, so the first 1,000 and the test splits are the plan's).
usage: python world.py N"""
import sys, time
from pathlib import Path
from blip2.demo.run import DemoConfig, recipe, CACHED_SPLITS, cache_covers
from blip2.demo.shapes import ShapesConfig, generate
from blip2.data.feature_cache import cache_features, encoder_identity
from blip2.factory import build
n = int(sys.argv[1]); root = Path("data/shapes")
cfg = DemoConfig(data_root=str(root)); cfg.sizes["train"] = n
t = time.time(); generate(root, cfg.sizes, ShapesConfig()); print("world", round(time.time() - t), "s", flush=True)
enc = build(recipe(cfg.phases[0], cfg).model, init_qformer=False)
identity = encoder_identity(enc.model.cfg.vision, enc.preprocess, enc.model.vision)
t = time.time()
if not cache_covers(root / "features", cfg.sizes, identity):
    cache_features(enc.model.image_features, identity, enc.preprocess, [str(root / s) for s in CACHED_SPLITS], root / "features")
print("cache", round(time.time() - t), "s")
