"""Interpolate two stage-1 checkpoints of one architecture (WiSE-FT, Wortsman et al. 2022): (1-a) * A + a * B.

usage: python interpolate.py A_DIR B_DIR ALPHA OUT_DIR   (each DIR holds model.safetensors and config.yaml)
"""
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

a_dir, b_dir, alpha, out = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
mixed = {k: ((1 - alpha) * a[k].double() + alpha * b[k].double()).to(a[k].dtype) if a[k].is_floating_point() else a[k]
         for k in a}
moved = sum(int(not a[k].equal(b[k])) for k in a)
out.mkdir(parents=True, exist_ok=True)
save_file(mixed, out / "model.safetensors")
shutil.copy(b_dir / "config.yaml", out / "config.yaml")
print(f"{len(a)} tensors, {moved} differ between the two; wrote {out} at alpha {alpha}")
