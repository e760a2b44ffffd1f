"""Training curves of a run: one panel per loss component, plus the learning rate, drawn from ``metrics.jsonl``."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from blip2.errors import InputError
from blip2.train.logging import read_metrics  # noqa: E402

COLUMNS = 3


def plot_run(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw ``<run_dir>/metrics.jsonl`` into a PNG (default ``<run_dir>/curves.png``); returns its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise InputError(f"{run_dir}/metrics.jsonl has no records yet: train for at least log_every steps")
    components = list(dict.fromkeys(name for r in records for name in r["losses"]))  # first-seen order
    panels = components + ["lr"]
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        points = [(r["step"], r["lr"] if name == "lr" else r["losses"][name])
                  for r in records if name == "lr" or name in r["losses"]]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None,
                color="tab:orange" if name == "lr" else "tab:blue")
        ax.set_title({"lr": "learning rate", "loss": "loss (total)"}.get(name, name))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out_png) if out_png is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
