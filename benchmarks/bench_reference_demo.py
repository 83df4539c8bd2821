"""The demo as it would run on the reference slow machine, emulated on one or two cores of this one.

Issue 13's reference machine has 2 cores without native bf16 and an fp32 2048^3 matmul peak of about 70 GFLOP/s
(2 threads), so `auto` picks fp32 there. This script runs `stmvl demo` (or `--full`) pinned to `--cores` of this
machine with one thread per core (its data-loader worker shares them), measures the fp32 2048^3 matmul peak of those
cores with as many threads before and after, and projects every stage's time to the reference machine by the ratio
of the peaks:

    reference seconds = measured seconds * (these cores' peak / --reference-gflops)

`--isa avx2` (the default) also hides this CPU's AVX-512 from torch: ATEN_CPU_CAPABILITY=avx2 makes ATen run its
AVX2 kernels and ONEDNN_MAX_CPU_ISA=AVX2 stops oneDNN at AVX2, so a bf16 matmul is emulated as on an AVX2 laptop
(about 40x slower than fp32) and the demo runs with `optim.precision=auto`, which has to find fp32 by itself; the
precision each training stage resolved to is read back from its config.yaml. `--isa native` keeps this CPU's
kernels and forces `optim.precision=fp32`.

An estimate, not a measurement: it assumes the demo's non-matmul work scales like its matmuls; with one core, two
cores of the reference machine lose a little to threading that one core here does not pay (so the projection leans
optimistic there), while the loader worker here takes time from the one core (pessimistic). `--cores 0,1` runs with
two threads, as the reference machine would. Linux only (`os.sched_setaffinity`). The install is not part of the
run; add it (about half a minute) for `make demo`'s target.

A second projection needs no assumption about what scales with the peak: calibrate_reference.py times a pretraining
step that the reference machine itself ran (issue 13) on the same cores, and each stage's seconds are multiplied by
that step ratio (the `calibrated_seconds` column; only when the calibration used this run's threads and kernels).
A shared machine's speed drifts (the ratio moved by a fifth within seven minutes on one): `--bracket` runs the
calibration just before and just after the demo and projects with the mean of the two ratios (both recorded).
`--training-run` adds a third projection, bracketed the same way, by the ratio of a second workload the reference
machine ran: the same commit's small pretraining run of its test suite (`calibrate_reference.py --workload
training-run`; the `training_run_seconds` column). On one machine it came out 1.4-1.6x the step ratio measured in
the same minutes: the reference machine ran the two workloads at speeds no single ratio reconciles (BENCHMARKS.md).
`--demo-run` adds a fourth the same way, by the ratio of that commit's demo run end to end in two of the issue's
configurations (`calibrate_reference.py --workload demo-run`, about 11 minutes each time; the `demo_run_seconds`
column; 0.8x the step ratio on that machine): the issue's round "about 10 minutes" makes it coarse, but it times a
whole demo. With a finished demo run, a `whole command` row projects the `stmvl demo` process as timed around it.

    python benchmarks/bench_reference_demo.py [--full] [--cores 0[,1]] [--isa avx2|native] [--bracket
                                              [--training-run] [--demo-run]] [--out DIR] [overrides]
    python benchmarks/bench_reference_demo.py --from-run runs/ref-demo --peak-gflops 87.5   # project a finished run

Writes benchmarks/results/reference_demo[_full][_two_cores].json (one file per tier and core count) and prints a
markdown table.
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
# what torch sees on a CPU with AVX2 and no AVX-512: both variables are read when torch / oneDNN first load
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CALIBRATION = RESULTS / "reference_calibration.json"  # written by calibrate_reference.py
TRAINING_RUN_CALIBRATION = RESULTS / "reference_calibration_training_run.json"  # its --workload training-run
DEMO_RUN_CALIBRATION = RESULTS / "reference_calibration_demo_run.json"  # its --workload demo-run
# the workloads a bracket can calibrate besides the step: the module constant naming the results file (looked up at
# call time, so tests can point it elsewhere) and the prefix of the keys and column the ratio goes to
EXTRA_WORKLOADS = {"training-run": ("TRAINING_RUN_CALIBRATION", "training_run"),
                   "demo-run": ("DEMO_RUN_CALIBRATION", "demo_run")}
TRAINING_STAGES = ("teacher_run", "pretrain")  # the demo's folders whose config.yaml records a resolved precision


def project_seconds(seconds: float, peak_gflops: float, reference_gflops: float = REFERENCE_GFLOPS) -> float:
    """Seconds measured at `peak_gflops` scaled to a machine whose matmul peak is `reference_gflops`."""
    if peak_gflops <= 0 or reference_gflops <= 0:
        raise ValueError(f"peaks must be positive, got {peak_gflops} and {reference_gflops}")
    return seconds * peak_gflops / reference_gflops


def projection(
    summary: dict, peak_gflops: float, reference_gflops: float = REFERENCE_GFLOPS, step_ratio: float | None = None,
    wall_seconds: float | None = None,
) -> dict:
    """Per-stage measured and projected seconds and TFLOP of a demo's summary.json (`stages`, `total`, `results`).

    step_ratio: the calibration of calibrate_reference.py (reference s/step over s/step on these cores); when given,
    each row also has `calibrated_seconds` = seconds * step_ratio. wall_seconds: the whole `stmvl demo` command as
    timed around it, which adds a `whole command` row: the stages' total leaves out the interpreter's start, the
    imports and the report, which the reference machine pays too."""
    rows = {}
    whole = [("whole command", {"seconds": wall_seconds, "flops": summary["total"]["flops"]})] if wall_seconds else []
    for name, stage in list(summary["stages"].items()) + [("total", summary["total"])] + whole:
        rows[name] = {"seconds": round(stage["seconds"], 1), "tflop": round(stage["flops"] / 1e12, 2),
                      "reference_seconds": round(project_seconds(stage["seconds"], peak_gflops, reference_gflops), 1)}
        if step_ratio is not None:
            rows[name]["calibrated_seconds"] = round(stage["seconds"] * step_ratio, 1)
    return {"tier": summary.get("tier"), "peak_gflops": round(peak_gflops, 1), "reference_gflops": reference_gflops,
            "step_ratio": step_ratio, "stages": rows, "results": summary.get("results", {})}


def load_calibration(path: Path | None, threads: int, isa: str) -> tuple[float | None, str]:
    """The step ratio of calibrate_reference.py's result file, if it was measured with this run's threads and
    kernels; else None and why not."""
    if path is None or not path.exists():
        return None, f"no calibration file ({path}); run benchmarks/calibrate_reference.py"
    calibration = json.loads(path.read_text())
    if calibration.get("threads") != threads or calibration.get("isa") != isa:
        return None, (f"{path} was measured with {calibration.get('threads')} threads and {calibration.get('isa')} "
                      f"kernels, this run uses {threads} and {isa}")
    return float(calibration["step_ratio"]), f"step ratio {calibration['step_ratio']} from {path.name}"


def fp32_peak(threads: int) -> float:
    """fp32 2048^3 matmul GFLOP/s with `threads` threads on the cores this process is pinned to."""
    import torch

    from stmvl.train.flops import matmul_peak

    torch.set_num_threads(threads)
    return matmul_peak("fp32", "cpu", None, 2048) / 1e9


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def run_demo(out: Path, full: bool, overrides: list[str], threads: int, isa: str) -> int:
    """`stmvl demo` on `threads` threads; its exit code. It runs on the cores main() pinned this process to (a child
    inherits the CPU affinity and the environment, its data-loader worker too). With isa "native" the precision is
    forced to fp32; with "avx2" `auto` chooses."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    precision = ["optim.precision=fp32"] if isa == "native" else []
    command = [sys.executable, "-m", "stmvl.cli", "demo", "--out", str(out), *precision,
               f"runtime.threads={threads}", *overrides] + (["--full"] if full else [])
    return subprocess.run(command, env=env).returncode


def resolved_precisions(out: Path) -> dict[str, str]:
    """The first line of each training stage's config.yaml, where the engine writes what `optim.precision` resolved
    to and why, e.g. {"pretrain": "optim.precision auto -> fp32: auto: CPU without ..."}."""
    found = {}
    for stage in TRAINING_STAGES:
        config = out / stage / "config.yaml"
        if config.exists():
            first = config.read_text().splitlines()[0]
            found[stage] = first.lstrip("# ").strip()
    return found


def parse_cores(text: str) -> set[int]:
    """"0" or "0,1" -> {0} or {0, 1}."""
    try:
        cores = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cores: expected core numbers like 0 or 0,1, got {text!r}") from None
    if not cores:
        raise argparse.ArgumentTypeError("--cores: name at least one core")
    return cores


def result_name(tier: str, cores: int) -> str:
    """The results file of a run: one per tier and core count, so a two-core run keeps the one-core result."""
    count = "" if cores == 1 else "_two_cores" if cores == 2 else f"_{cores}_cores"
    return "reference_demo" + ("_full" if tier == "full" else "") + count + ".json"


def bracket_calibration(cores: set[int], isa: str, workload: str = "step") -> float:
    """calibrate_reference.py on `cores` now (it writes CALIBRATION, or the file EXTRA_WORKLOADS names for another
    workload); its ratio."""
    if isa != "avx2":
        raise SystemExit("bench_reference_demo: --bracket needs --isa avx2, the calibration's kernels")
    command = [sys.executable, str(Path(__file__).with_name("calibrate_reference.py")),
               "--cores", ",".join(map(str, sorted(cores)))]
    if workload != "step":
        command += ["--workload", workload, "--repeats", "1"]
    if subprocess.run(command).returncode:
        raise SystemExit("bench_reference_demo: calibrate_reference.py failed; nothing projected")
    if workload != "step":
        constant, key = EXTRA_WORKLOADS[workload]
        return float(json.loads(globals()[constant].read_text())[f"{key}_ratio"])
    return float(json.loads(CALIBRATION.read_text())["step_ratio"])


def add_workload_projection(result: dict, workload: str, ratios: list[float]) -> None:
    """Record a workload's calibrations around the demo (`training_run_ratios_bracket`, ...) and each stage's
    seconds times their mean (`training_run_seconds`, ...), beside the step-ratio projection."""
    key = EXTRA_WORKLOADS[workload][1]
    mean = round(sum(ratios) / len(ratios), 3)
    result[f"{key}_ratios_bracket"], result[f"{key}_ratio"] = ratios, mean
    for row in result["stages"].values():
        row[f"{key}_seconds"] = round(row["seconds"] * mean, 1)


def table(result: dict) -> str:
    calibrated = result.get("step_ratio") is not None
    extra = [(workload, key) for workload, (_, key) in EXTRA_WORKLOADS.items() if f"{key}_ratio" in result]
    header = "| stage | TFLOP | seconds here | by the matmul peaks | by the step ratio |"
    lines = [header + "".join(f" by the {workload} ratio |" for workload, _ in extra),
             "|---|---|---|---|---|" + "---|" * len(extra)]

    def minutes(seconds: float) -> str:
        return f"{seconds} ({seconds / 60:.1f} min)"

    for name, row in result["stages"].items():
        by_step = minutes(row["calibrated_seconds"]) if calibrated else "-"
        lines.append(f"| {name} | {row['tflop']} | {row['seconds']} | {minutes(row['reference_seconds'])} | {by_step} |"
                     + "".join(f" {minutes(row[f'{key}_seconds'])} |" for _, key in extra))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full tier (stmvl demo --full)")
    # --core: the option's name before two cores were possible, kept for the commands in BENCHMARKS.md
    parser.add_argument("--cores", "--core", type=parse_cores, default={1},
                        help="the CPU cores to pin the run to, one thread each: 1 (default) or 0,1")
    parser.add_argument("--isa", choices=("avx2", "native"), default="avx2",
                        help="avx2: torch runs its AVX2 kernels and auto picks the precision (default); "
                             "native: this CPU's kernels, fp32 forced")
    parser.add_argument("--out", type=Path, help="demo output folder (default runs/ref-demo[-full])")
    parser.add_argument("--from-run", type=Path, help="project this finished demo folder instead of running one")
    parser.add_argument("--peak-gflops", type=float, help="with --from-run: the core's peak (default: measure now)")
    parser.add_argument("--reference-gflops", type=float, default=REFERENCE_GFLOPS)
    parser.add_argument("--calibration", type=Path, default=CALIBRATION,
                        help="calibrate_reference.py's result, for the step-ratio projection (default: %(default)s)")
    parser.add_argument("--bracket", action="store_true",
                        help="calibrate just before and just after the demo and project with the mean step ratio")
    parser.add_argument("--training-run", action="store_true",
                        help="with --bracket: also calibrate on the reference commit's training-run fixture before "
                             "and after, and project with the mean of that ratio too (about 4 more minutes)")
    parser.add_argument("--demo-run", action="store_true",
                        help="with --bracket: also calibrate on the reference commit's demo runs before and after, "
                             "and project with the mean of that ratio too (about 22 more minutes)")
    parser.add_argument("overrides", nargs="*", help="passed on to stmvl demo, e.g. optim.max_steps=20 for a check")
    args = parser.parse_args()
    if not hasattr(os, "sched_setaffinity"):
        print("bench_reference_demo: needs os.sched_setaffinity (Linux) to pin the run to its cores", file=sys.stderr)
        return 2
    cores = args.cores
    if args.isa == "avx2":
        os.environ.update(AVX2_ENV)  # before the first torch import, in this process and its children
    os.sched_setaffinity(0, cores)
    threads = len(cores)
    peaks = [args.peak_gflops] if args.peak_gflops else [fp32_peak(threads)]
    out = args.from_run or args.out or Path("runs/ref-demo" + ("-full" if args.full else ""))
    if args.bracket and args.from_run:
        print("bench_reference_demo: --bracket calibrates around a demo it runs, not around --from-run",
              file=sys.stderr)
        return 2
    extra = [workload for workload, wanted in (("training-run", args.training_run), ("demo-run", args.demo_run))
             if wanted]
    if extra and not args.bracket:
        print(f"bench_reference_demo: --{extra[0]} needs --bracket", file=sys.stderr)
        return 2
    extra_brackets = {workload: [bracket_calibration(cores, args.isa, workload)] for workload in extra}
    bracket = [bracket_calibration(cores, args.isa)] if args.bracket else []
    started = time.perf_counter()
    if not args.from_run:
        code = run_demo(out, args.full, args.overrides, threads, args.isa)
        if code:
            print(f"bench_reference_demo: stmvl demo exited with {code}; nothing projected", file=sys.stderr)
            return code
        wall = round(time.perf_counter() - started, 1)
        peaks.append(fp32_peak(threads))
        bracket += [bracket_calibration(cores, args.isa)] if args.bracket else []
        for workload, ratios in extra_brackets.items():
            ratios.append(bracket_calibration(cores, args.isa, workload))
    summary_file = out / "summary.json"
    if not summary_file.exists():
        print(f"bench_reference_demo: {summary_file} not found: not a finished demo folder", file=sys.stderr)
        return 2
    if bracket:
        ratio = round(sum(bracket) / len(bracket), 3)
        calibration_note = f"mean step ratio of calibrations just before and after the demo: {bracket}"
    else:
        ratio, calibration_note = load_calibration(args.calibration, threads, args.isa)
    if ratio is None:
        print(f"bench_reference_demo: no step-ratio projection: {calibration_note}", file=sys.stderr)
    result = projection(json.loads(summary_file.read_text()), sum(peaks) / len(peaks), args.reference_gflops, ratio,
                        None if args.from_run else wall)
    result["calibration"] = calibration_note
    if not args.from_run:
        result["wall_seconds"] = wall
    if bracket:
        result["step_ratios_bracket"] = bracket
    for workload, ratios in extra_brackets.items():
        add_workload_projection(result, workload, ratios)
    precisions = resolved_precisions(out)
    not_fp32 = [stage for stage, line in precisions.items() if "-> fp32" not in line]
    if not_fp32:
        print(f"bench_reference_demo: {', '.join(not_fp32)} did not train in fp32, unlike the reference machine: "
              "the projection does not apply", file=sys.stderr)
    result.update(peaks_gflops=[round(p, 1) for p in peaks], run=str(out), cores=sorted(cores), threads=threads,
                  isa=args.isa, precisions=precisions, machine=platform.processor() or platform.machine(),
                  cpu_capability=cpu_capability(), date=datetime.date.today().isoformat())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / result_name(result["tier"], threads)).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
