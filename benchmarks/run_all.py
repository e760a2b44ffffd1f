"""Run every benchmark (each in its own process, one after another) and summarise their ratio lines.

``python benchmarks/run_all.py [--quick] [--only qformer,chat] [--threads 1] [--record]``; ``make bench`` runs it.
``--record`` writes the outputs into benchmarks/README.md between the ``results`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("qformer", "stage1_step", "train_step", "feature_cache", "memory", "generation", "chat")
README = HERE / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
RATIO_PREFIX = "ratio: "  # as common.RATIO_PREFIX; not imported, so this parent stays free of torch


def run_script(name: str, extra: list[str]) -> tuple[str, float]:
    """Run ``benchmarks/<name>.py``, echoing its output as it comes; (its stdout, seconds)."""
    command = [sys.executable, str(HERE / f"{name}.py"), *extra]
    print(f"\n## {name}\n\n$ python benchmarks/{name}.py {' '.join(extra)}", flush=True)
    start = time.perf_counter()
    lines = []
    env = os.environ | {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}  # no progress bars in the output; no model hub
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    if process.returncode != 0:
        raise SystemExit(f"benchmarks/{name}.py failed with exit status {process.returncode}")
    return "".join(lines), time.perf_counter() - start


def ratio_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(RATIO_PREFIX)]


def record(outputs: dict[str, str], seconds: dict[str, float]) -> None:
    """Replace the text between the results markers of the README with these outputs."""
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} section to write the results into")
    body = [f"Recorded {datetime.date.today().isoformat()} by `python benchmarks/run_all.py --record`."]
    for name, output in outputs.items():
        body.append(f"### {name} ({seconds[name]:.0f} s)\n\n```\n{output.strip()}\n```")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    README.write_text(f"{before}{START}\n" + "\n\n".join(body) + f"\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each script's --quick (tiny models): checks they run")
    parser.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {','.join(SCRIPTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each benchmark")
    parser.add_argument("--record", action="store_true", help="write the outputs into benchmarks/README.md")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(SCRIPTS)}")
    extra = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])

    outputs, seconds = {}, {}
    for name in chosen:
        outputs[name], seconds[name] = run_script(name, extra)
    print(f"\n## summary ({sum(seconds.values()) / 60:.1f} min)\n")
    for name in chosen:
        for line in ratio_lines(outputs[name]):
            print(f"{name:>14}  {line}")
    if args.record:
        record(outputs, seconds)
        print(f"\nwritten into {README}")


if __name__ == "__main__":
    main()
