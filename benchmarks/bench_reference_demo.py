"""The demo as it would run on the reference slow machine, emulated on one core of this one.

Issue 13's reference machine has 2 cores without native bf16 and an fp32 2048^3 matmul peak of about 70 GFLOP/s
(2 threads), so `auto` picks fp32 there. This script runs `stmvl demo` (or `--full`) pinned to one core of this
machine, in fp32 with one thread (its data-loader worker shares that core), measures that core's fp32 2048^3
matmul peak before and after, and projects every stage's time to the reference machine by the ratio of the peaks:

    reference seconds = measured seconds * (this core's peak / --reference-gflops)

An estimate, not a measurement: it assumes the demo's non-matmul work scales like its matmuls, and two cores of
the reference machine lose a little to threading that one core here does not pay (so the projection leans
optimistic there), while the loader worker here takes time from the one core (pessimistic). Linux only
(`os.sched_setaffinity`). The install is not part of the run; add it (about a minute) for `make demo`'s target.

    python benchmarks/bench_reference_demo.py [--full] [--core 1] [--out runs/ref-demo] [demo overrides]
    python benchmarks/bench_reference_demo.py --from-run runs/ref-demo --peak-gflops 87.5   # project a finished run

Writes benchmarks/results/reference_demo[_full].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REFERENCE_GFLOPS = 70.0  # fp32 2048^3 matmul, 2 threads, on the reference machine (issue 13)


def project_seconds(seconds: float, peak_gflops: float, reference_gflops: float = REFERENCE_GFLOPS) -> float:
    """Seconds measured at `peak_gflops` scaled to a machine whose matmul peak is `reference_gflops`."""
    if peak_gflops <= 0 or reference_gflops <= 0:
        raise ValueError(f"peaks must be positive, got {peak_gflops} and {reference_gflops}")
    return seconds * peak_gflops / reference_gflops


def projection(summary: dict, peak_gflops: float, reference_gflops: float = REFERENCE_GFLOPS) -> dict:
    """Per-stage measured and projected seconds and TFLOP of a demo's summary.json (`stages`, `total`, `results`)."""
    rows = {}
    for name, stage in list(summary["stages"].items()) + [("total", summary["total"])]:
        rows[name] = {"seconds": round(stage["seconds"], 1), "tflop": round(stage["flops"] / 1e12, 2),
                      "reference_seconds": round(project_seconds(stage["seconds"], peak_gflops, reference_gflops), 1)}
    return {"tier": summary.get("tier"), "peak_gflops": round(peak_gflops, 1), "reference_gflops": reference_gflops,
            "stages": rows, "results": summary.get("results", {})}


def one_core_fp32_peak() -> float:
    """fp32 2048^3 matmul GFLOP/s on one thread of the core this process is pinned to."""
    import torch

    from stmvl.train.flops import matmul_peak

    torch.set_num_threads(1)
    return matmul_peak("fp32", "cpu", None, 2048) / 1e9


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def run_demo(out: Path, full: bool, overrides: list[str]) -> int:
    """`stmvl demo` in fp32 on one thread; its exit code. It runs on the core main() pinned this process to (a child
    inherits the CPU affinity, its data-loader worker too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "stmvl.cli", "demo", "--out", str(out), "optim.precision=fp32",
               "runtime.threads=1", *overrides] + (["--full"] if full else [])
    return subprocess.run(command, env=env).returncode


def table(result: dict) -> str:
    lines = ["| stage | TFLOP | seconds here (1 core, fp32) | projected on the reference machine |",
             "|---|---|---|---|"]
    for name, row in result["stages"].items():
        lines.append(f"| {name} | {row['tflop']} | {row['seconds']} | {row['reference_seconds']} "
                     f"({row['reference_seconds'] / 60:.1f} min) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full tier (stmvl demo --full)")
    parser.add_argument("--core", type=int, default=1, help="the CPU core to pin the run to")
    parser.add_argument("--out", type=Path, help="demo output folder (default runs/ref-demo[-full])")
    parser.add_argument("--from-run", type=Path, help="project this finished demo folder instead of running one")
    parser.add_argument("--peak-gflops", type=float, help="with --from-run: the core's peak (default: measure now)")
    parser.add_argument("--reference-gflops", type=float, default=REFERENCE_GFLOPS)
    parser.add_argument("overrides", nargs="*", help="passed on to stmvl demo, e.g. optim.max_steps=20 for a check")
    args = parser.parse_args()
    if not hasattr(os, "sched_setaffinity"):
        print("bench_reference_demo: needs os.sched_setaffinity (Linux) to pin the run to one core", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.core})
    peaks = [args.peak_gflops] if args.peak_gflops else [one_core_fp32_peak()]
    out = args.from_run or args.out or Path("runs/ref-demo" + ("-full" if args.full else ""))
    started = time.perf_counter()
    if not args.from_run:
        code = run_demo(out, args.full, args.overrides)
        if code:
            print(f"bench_reference_demo: stmvl demo exited with {code}; nothing projected", file=sys.stderr)
            return code
        peaks.append(one_core_fp32_peak())
    summary_file = out / "summary.json"
    if not summary_file.exists():
        print(f"bench_reference_demo: {summary_file} not found: not a finished demo folder", file=sys.stderr)
        return 2
    result = projection(json.loads(summary_file.read_text()), sum(peaks) / len(peaks), args.reference_gflops)
    if not args.from_run:
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result.update(peaks_gflops=[round(p, 1) for p in peaks], run=str(out), core=args.core,
                  machine=platform.processor() or platform.machine(), cpu_capability=cpu_capability(),
                  date=datetime.date.today().isoformat())
    RESULTS.mkdir(exist_ok=True)
    name = "reference_demo" + ("_full" if result["tier"] == "full" else "") + ".json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
