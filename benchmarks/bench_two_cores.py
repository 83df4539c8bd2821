"""How to spend two cores on the demo: one run with two threads, two one-thread runs side by side (what
``stmvl demo --compare --jobs 2`` does), or two DDP ranks of one thread each.

    python benchmarks/bench_two_cores.py --data runs/demo [--steps 60]

``--data`` is a demo output folder that holds the corpus (``data/``) and the teacher (``teacher/``), e.g. after
``make demo``. Each set-up runs ``stmvl pretrain demo`` for ``--steps`` steps on them, one set-up after another; the
rates are the engine's own (``step_s`` and ``clips_per_s`` of metrics.jsonl, logging windows after the first 10
steps, video and image steps together), the wall time includes start-up and the final evaluation. Writes
benchmarks/results/two_cores.json and prints a markdown table. Keep ``--steps`` at 60 or more: an image step
counts 32 images as clips and a video step 16 clips, and with fewer windows their mix differs between set-ups (a
30-step check gave DDP 1.9x, the 60-step table 1.21x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STMVL = [sys.executable, "-m", "stmvl.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stmvl.cli"]


def pretrain_command(prefix: list[str], data: Path, steps: int, threads: int, out: Path) -> list[str]:
    return prefix + ["pretrain", "demo", f"paths.data={data / 'data'}", f"paths.models={data}",
                     f"optim.max_steps={steps}", "runtime.log_every=10", f"runtime.threads={threads}", "--out", str(out)]


def window_rates(run_dir: Path) -> dict[str, float]:
    """Mean step seconds and clips/s of the training log windows after step 10."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train" and "step_s" in r and r.get("step", 0) > 10]
    if not train:
        raise SystemExit(f"{run_dir}: no training window after step 10; use --steps 30 or more")
    return {"step_s": sum(r["step_s"] for r in train) / len(train),
            "clips_per_s": sum(r.get("clips_per_s", 0.0) for r in train) / len(train)}


def run_together(commands: list[list[str]], env: dict[str, str]) -> float:
    """Start every command at once; wall seconds until the last ends (a failure stops the benchmark)."""
    started = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for command, proc in zip(commands, procs):
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a demo output folder with data/ and teacher/")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    data = args.data.resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="two-cores-") as tmp:
        tmp = Path(tmp)
        setups = [("1 process, 2 threads", [pretrain_command(STMVL, data, args.steps, 2, tmp / "t2")]),
                  ("1 process, 1 thread", [pretrain_command(STMVL, data, args.steps, 1, tmp / "t1")]),
                  ("2 processes side by side, 1 thread each",
                   [pretrain_command(STMVL, data, args.steps, 1, tmp / f"p{i}") for i in (1, 2)]),
                  ("DDP, 2 gloo ranks x 1 thread", [pretrain_command(TORCHRUN, data, args.steps, 1, tmp / "ddp")])]
        for name, commands in setups:
            wall = run_together(commands, env)
            rates = [window_rates(Path(c[c.index("--out") + 1])) for c in commands]
            rows.append({"setup": name, "runs": len(commands), "wall_s": wall,
                         "step_s": [r["step_s"] for r in rates],
                         "clips_per_s": sum(r["clips_per_s"] for r in rates)})
            print(f"{name}: {rows[-1]}", flush=True)
    base = rows[0]["clips_per_s"]
    for row in rows:
        row["vs_one_2_thread_run"] = row["clips_per_s"] / base
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "steps": args.steps, "rows": rows}
    out = ROOT / "benchmarks" / "results" / "two_cores.json"
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("| set-up | s/step | clips/s (all runs) | vs one 2-thread run | wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {' / '.join(f'{s:.2f}' for s in r['step_s'])} | {r['clips_per_s']:.1f} | "
              f"{r['vs_one_2_thread_run']:.2f}x | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
