"""What a run reports: a tqdm progress bar, ``metrics.jsonl`` and TensorBoard scalars (rank 0 alone writes).

One ``metrics.jsonl`` line per logged step::

    {"step": 20, "epoch": 1, "lr": 9.8e-05, "losses": {"loss": 3.1, "itc": 1.2, ...},
     "samples_per_s": 412.5, "elapsed_s": 61.0, "grad_norm": 0.7}

``losses`` and ``grad_norm`` (present when clipping is on) are means over the steps since the previous line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl``, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a training run's out_dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run rewrites what the killed run logged after its checkpoint: keep only records up to ``step``."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


class RunLogger:
    """Averages the metrics of every step over a window of ``log_every`` steps and reports them.

    On non-main ranks (``enabled=False``) it only keeps the averages, so every rank can return the final metrics.
    """

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int, log_every: int,
                 elapsed_before: float = 0.0, enabled: bool = True):
        self.log_every = log_every
        self.total_steps = total_steps
        self.enabled = enabled
        self._elapsed_before = elapsed_before
        self._started = time.perf_counter()
        self._reset_window()
        self._jsonl = None
        self._writer = None
        self._bar = None
        if enabled:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            _drop_records_after(out_dir / METRICS_FILE, start_step)
            self._jsonl = (out_dir / METRICS_FILE).open("a")
            from torch.utils.tensorboard import (
                SummaryWriter,  # slow import: only where it is used
            )

            purge = start_step + 1 if start_step else None  # a resumed run replaces what the killed one logged later
            self._writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=purge)
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _reset_window(self) -> None:
        self._sums: dict[str, float] = {}
        self._grad_norms: list[float] = []
        self._steps = 0
        self._samples = 0
        self._window_start = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds, including those of the runs this one resumed."""
        return self._elapsed_before + time.perf_counter() - self._started

    def step(self, step: int, epoch: int, lr: float, losses: dict[str, float], samples: int,
             grad_norm: float | None = None) -> dict[str, Any] | None:
        """Record one finished optimizer step; returns the record when this step closes a logging window."""
        for name, value in losses.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        if grad_norm is not None:
            self._grad_norms.append(grad_norm)
        self._steps += 1
        self._samples += samples
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{self._sums['loss'] / self._steps:.4f}",
                                  samples_per_s=f"{self._samples / seconds:.1f}")
            self._bar.update(1)
        if step % self.log_every and step != self.total_steps:
            return None
        record = {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "losses": {name: total / self._steps for name, total in self._sums.items()},
            "samples_per_s": self._samples / seconds,
            "elapsed_s": self.elapsed(),
        }
        if self._grad_norms:
            record["grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
        self._write(record)
        self._reset_window()
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for name, value in record["losses"].items():
            self._writer.add_scalar(f"loss/{name}", value, step)
        for name in ("lr", "samples_per_s", "grad_norm"):
            if name in record:
                self._writer.add_scalar(f"train/{name}", record[name], step)
        self._writer.flush()

    def close(self) -> None:
        for handle in (self._bar, self._jsonl, self._writer):
            if handle is not None:
                handle.close()
