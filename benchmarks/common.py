"""What every benchmark shares: the command line, the machine report, interleaved timing, tables and ratio lines.

Timings on a shared machine are noisy, so the two sides of a comparison are always run alternately
(A B B A A B ...) after a warm-up, and medians are reported. Every script prints one or more lines
``ratio: X.XXx  <what> (<how>; target ...)``, which ``run_all.py`` and the smoke test collect.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import transformers

RATIO_PREFIX = "ratio: "


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` (tiny models, one repeat: the smoke test), threads, repeats."""
    options = argparse.ArgumentParser(description=description)
    options.add_argument("--quick", action="store_true", help="tiny models and one repeat: checks the script runs")
    options.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a busy shared machine a second thread waits for a busy core)",
    )
    options.add_argument("--repeats", type=int, default=None, help="timed runs per side (default: per script)")
    return options


def setup(args: argparse.Namespace, default_repeats: int) -> int:
    """Apply the thread count, seed torch, print the machine; returns the number of timed repeats."""
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    print(machine_line())
    if args.repeats is not None:
        return max(args.repeats, 1)
    return 1 if args.quick else default_repeats


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """CPU, cores, library versions, threads and the load average (other jobs share the machine)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} thread(s), load average {load:.1f}"
    )


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each side, the sides alternating (order reversed every round), after ``warmup`` calls."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    names = list(sides)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            seconds[name].append(time_once(sides[name]))
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` in seconds, for tables."""
    return f"{median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a markdown table."""
    print("| " + " | ".join(headers) + " |")
    print("| " + " | ".join("---" for _ in headers) + " |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def ratio_line(
    what: str, ratio: float, target: float | None, how: str = "ours / transformers, higher is better"
) -> str:
    """Print and return ``ratio: X.XXx  what (how; target >= T: met|missed)``."""
    verdict = "" if target is None else f"; target >= {target:.2f}x: {'met' if ratio >= target else 'missed'}"
    line = f"{RATIO_PREFIX}{ratio:.2f}x  {what} ({how}{verdict})"
    print(line, flush=True)
    return line


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
