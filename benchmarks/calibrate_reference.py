"""How much slower the reference machine runs this project's pretraining step than these cores, measured on a step
the reference machine itself ran.

Issue 13's reference machine (2 cores, AVX2, no native bf16) ran `benchmarks/bench_pretrain.py --sizes demo
--precisions fp32` of the commit the issue was filed against and took 8.75 s per step (2 threads; batch 32, 64 px,
width 192 x 6 student, MiniLM with fusion layers). This script runs the same benchmark of the same commit here, from a
temporary `git worktree` with this checkout's Python, pinned to `--cores` with one thread per core and torch's AVX2
kernels (`--isa avx2`, as bench_reference_demo.py), and writes

    step ratio = reference s/step / s/step here

to benchmarks/results/reference_calibration.json. `bench_reference_demo.py` multiplies a demo's seconds on the same
cores by it: unlike the ratio of matmul peaks it also carries what the step spends outside matmuls (elementwise
kernels, the second thread's poor use on small tensors, Python), as the reference machine paid it. Needs the git
history (a full clone) and Linux (`os.sched_setaffinity`).

`--workload training-run` times a second thing the reference machine ran, closer to the demo's training loop: the
same commit's test fixture that writes a small synthetic corpus and pretrains a small STM model (MiniLM text tower,
fusion layers, batches of 16 clips) for 150 steps, `tests/downstream.py`, which took 407 s there (issue 13: "the
downstream fixture alone 407 s", inside its pytest run on a machine it calls shared). It writes its own file,
reference_calibration_training_run.json, with `training_run_ratio`. The two ratios need not agree (on one machine the
fixture's came out 1.5-1.6x the step's, BENCHMARKS.md); a projection by each shows how much the yardstick decides.

`--workload demo-run` times the third thing: that commit's demo itself, end to end (`stmvl demo`: corpus, teacher,
pretraining, evaluation), in the two of the issue's "five runs of about 10 minutes end to end" that overrides
reproduce: 64 px with 48 steps of 32, and 32 px (patch 8) with 110 steps of 32, both in fp32. That commit's
`stmvl demo` passes no `optim.*` override to its teacher, so the worktree's demo recipe is set to fp32 instead (the
issue's runs trained in fp32, teacher included). It writes reference_calibration_demo_run.json with each run's
seconds and stages and `demo_run_ratio`, the mean of 600 s over each run's wall seconds here. "About 10 minutes" is
the issue's round figure for five runs, so this ratio is coarse and likely leans low (the 64 px run's 48 steps alone
take 420 s at the issue's 8.75 s per step), but it is the only one of the three taken on a whole demo.

    python benchmarks/calibrate_reference.py [--cores 0,1] [--steps 5] [--repeats 2]
                                             [--workload step|training-run|demo-run]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_reference_demo import AVX2_ENV, cpu_capability, parse_cores

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "reference_calibration.json"
# the commit issue 13 was filed against, and what its benchmark's demo step took on the reference machine
REFERENCE_COMMIT = "4996a8d"
REFERENCE_STEP_SECONDS = 8.75
# what that commit's downstream test fixture (corpus + 150 pretraining steps) took there, and where its ratio goes
REFERENCE_TRAINING_RUN_SECONDS = 407.0
TRAINING_RUN_RESULT = ROOT / "benchmarks" / "results" / "reference_calibration_training_run.json"
# the end-to-end demo runs of that commit ("about 10 minutes" each) that overrides of its demo reproduce
REFERENCE_DEMO_RUN_SECONDS = 600.0
DEMO_RUNS = {
    "64px_48x32": ["optim.max_steps=48"],
    "32px_110x32": ["data.img_size=32", "model.vision.img_size=32", "model.teacher.img_size=32",
                    "optim.max_steps=110"],
}
DEMO_RUN_RESULT = ROOT / "benchmarks" / "results" / "reference_calibration_demo_run.json"


def step_ratio(reference_seconds: float, here_seconds: list[float]) -> float:
    """Reference s/step over the median s/step measured here: how many times longer a second here takes there."""
    if reference_seconds <= 0 or not here_seconds or min(here_seconds) <= 0:
        raise ValueError(f"step times must be positive, got {reference_seconds} and {here_seconds}")
    return reference_seconds / statistics.median(here_seconds)


def worktree_env(worktree: Path, threads: int, *folders: str) -> dict[str, str]:
    """The environment of a run of the old commit: its `src` (and `folders`) first on the path, AVX2 kernels,
    `threads` threads, offline."""
    path = os.pathsep.join(str(worktree / folder) for folder in ("src", *folders))
    return {**os.environ, **AVX2_ENV, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def benchmark_step(worktree: Path, threads: int, steps: int) -> float:
    """s/step of the old commit's demo fp32 benchmark, run from `worktree` with this interpreter."""
    env = worktree_env(worktree, threads)
    command = [sys.executable, "benchmarks/bench_pretrain.py", "--sizes", "demo", "--precisions", "fp32",
               "--steps", str(steps), "--threads", str(threads)]
    subprocess.run(command, cwd=worktree, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads((worktree / "benchmarks" / "results" / "pretrain.json").read_text())["rows"]
    return float(rows[0]["seconds_per_step"])


def benchmark_training_run(worktree: Path, threads: int) -> float:
    """Seconds of the old commit's downstream fixture (tests/downstream.py: corpus + 150 pretraining steps), run
    from `worktree` with this interpreter in a fresh folder."""
    env = worktree_env(worktree, threads, "tests")
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys, time; from pathlib import Path; from downstream import make_pretrained_corpus; "
                "t = time.perf_counter(); make_pretrained_corpus(Path(sys.argv[1])); "
                "print(time.perf_counter() - t)")
        done = subprocess.run([sys.executable, "-c", code, tmp], cwd=worktree, env=env, check=True,
                              capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def train_in_fp32(worktree: Path) -> None:
    """Set the old commit's demo recipe (which its teacher recipe extends) to fp32, as the issue's demo runs were."""
    recipe = worktree / "src" / "stmvl" / "recipes" / "demo.yaml"
    text = recipe.read_text()
    if text.count("  precision: bf16\n") != 1:
        raise RuntimeError(f"{recipe}: expected one 'precision: bf16' line to set to fp32")
    recipe.write_text(text.replace("  precision: bf16\n", "  precision: fp32\n"))


def benchmark_demo_run(worktree: Path, threads: int, overrides: list[str]) -> dict[str, float]:
    """Wall seconds of the old commit's `stmvl demo` with `overrides`, run from `worktree` with this interpreter
    into a fresh folder, and the stage seconds its summary.json recorded (corpus, teacher, pretrain_stm, total)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stmvl.cli", "demo", "--out", tmp, *overrides], cwd=worktree,
                       env=worktree_env(worktree, threads), check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        timings = json.loads((Path(tmp) / "summary.json").read_text())["timings"]
    return {"seconds": round(wall, 1), **{name: round(seconds, 1) for name, seconds in timings.items()}}


def demo_run_ratio(runs: dict[str, dict[str, float]]) -> float:
    """The mean over the runs of REFERENCE_DEMO_RUN_SECONDS / wall seconds here."""
    return statistics.mean(step_ratio(REFERENCE_DEMO_RUN_SECONDS, [run["seconds"]]) for run in runs.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=parse_cores, default={0, 1}, help="cores to pin to, one thread each")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of the step or training-run benchmark; the median counts (demo-run: one of each)")
    parser.add_argument("--commit", default=REFERENCE_COMMIT)
    parser.add_argument("--reference-step-seconds", type=float, default=REFERENCE_STEP_SECONDS)
    parser.add_argument("--workload", choices=("step", "training-run", "demo-run"), default="step",
                        help="the old commit's benchmark step (default), its downstream test fixture, or its demo "
                             "end to end in two of the issue's configurations (about 11 minutes here)")
    args = parser.parse_args()
    if not hasattr(os, "sched_setaffinity"):
        print("calibrate_reference: needs os.sched_setaffinity (Linux) to pin the run to its cores", file=sys.stderr)
        return 2
    os.environ.update(AVX2_ENV)  # before torch loads, for cpu_capability() below
    os.sched_setaffinity(0, args.cores)
    threads = len(args.cores)
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "reference-commit"
        added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(worktree),
                                args.commit], capture_output=True, text=True)
        if added.returncode:
            print(f"calibrate_reference: cannot check out {args.commit} (a full clone is needed): "
                  f"{added.stderr.strip()}", file=sys.stderr)
            return 2
        try:
            if args.workload == "training-run":
                here = [benchmark_training_run(worktree, threads) for _ in range(args.repeats)]
            elif args.workload == "demo-run":
                train_in_fp32(worktree)
                here = {name: benchmark_demo_run(worktree, threads, overrides) for name, overrides in DEMO_RUNS.items()}
            else:
                here = [benchmark_step(worktree, threads, args.steps) for _ in range(args.repeats)]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    if args.workload == "training-run":
        return write_training_run(args.commit, here, sorted(args.cores), threads)
    if args.workload == "demo-run":
        return write_demo_run(args.commit, here, sorted(args.cores), threads)
    ratio = step_ratio(args.reference_step_seconds, here)
    write_result(RESULT, {"commit": args.commit, "reference_step_seconds": args.reference_step_seconds,
                          "step_seconds_here": here, "step_ratio": round(ratio, 3)}, sorted(args.cores), threads)
    print(f"demo step of {args.commit} (fp32, {threads} threads): {statistics.median(here):.3f} s here against "
          f"{args.reference_step_seconds} s on the reference machine: step ratio {ratio:.2f}")
    return 0


def write_result(path: Path, fields: dict, cores: list[int], threads: int) -> None:
    """Write a calibration's `fields` to `path` with the set-up it was measured on (cores, threads, kernels,
    machine, date)."""
    result = {**fields, "cores": cores, "threads": threads, "isa": "avx2", "cpu_capability": cpu_capability(),
              "machine": platform.processor() or platform.machine(), "date": datetime.date.today().isoformat()}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def write_training_run(commit: str, here: list[float], cores: list[int], threads: int) -> int:
    """Write and print the training-run calibration (TRAINING_RUN_RESULT)."""
    ratio = step_ratio(REFERENCE_TRAINING_RUN_SECONDS, here)
    write_result(TRAINING_RUN_RESULT, {
        "commit": commit, "workload": "tests/downstream.py make_pretrained_corpus (corpus + 150 steps)",
        "reference_seconds": REFERENCE_TRAINING_RUN_SECONDS, "seconds_here": [round(t, 1) for t in here],
        "training_run_ratio": round(ratio, 3)}, cores, threads)
    print(f"downstream fixture of {commit} ({threads} threads): {statistics.median(here):.1f} s here against "
          f"{REFERENCE_TRAINING_RUN_SECONDS:.0f} s on the reference machine: training-run ratio {ratio:.2f}")
    return 0


def write_demo_run(commit: str, runs: dict[str, dict[str, float]], cores: list[int], threads: int) -> int:
    """Write and print the demo-run calibration (DEMO_RUN_RESULT)."""
    ratio = demo_run_ratio(runs)
    write_result(DEMO_RUN_RESULT, {
        "commit": commit, "workload": "stmvl demo, fp32, end to end: " + "; ".join(
            f"{name}: {' '.join(overrides)}" for name, overrides in DEMO_RUNS.items()),
        "reference_seconds": REFERENCE_DEMO_RUN_SECONDS, "runs": runs, "demo_run_ratio": round(ratio, 3)},
        cores, threads)
    seconds = ", ".join(f"{name} {run['seconds']:.0f} s" for name, run in runs.items())
    print(f"demo runs of {commit} (fp32, {threads} threads): {seconds} here against about "
          f"{REFERENCE_DEMO_RUN_SECONDS:.0f} s each on the reference machine: demo-run ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
