"""Attention on a CPU: torch's SDPA against the explicit matmul-softmax-matmul path of `stmvl.models.layers`.

Why `attend` trains with the explicit path in bf16/fp16 on a CPU: SDPA picks its CPU flash kernel there, whose
backward is several times slower than two batched matmuls and a softmax at the demo's sizes. Measures forward and
forward+backward milliseconds of both at the demo's attention shapes, fp32 and bf16, and writes
benchmarks/results/attention.json.

    python benchmarks/bench_attention.py [--threads 2] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stmvl.models.layers import explicit_attention  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "attention.json"
# name: (batch x heads, query tokens, key tokens, head dim, padded keys) of one attention call of the demo step
SHAPES = {
    "student pass (16 clips, 176 tokens)": (16, 4, 176, 176, 32, 0),
    "teacher frame (64 frames, 65 tokens)": (64, 4, 65, 65, 32, 0),
    "text self-attention (36 captions, padded)": (36, 12, 20, 20, 32, 4),
    "fusion cross-attention (8 pairs -> 176 tokens)": (8, 12, 20, 176, 32, 0),
}


def inputs(shape: tuple, dtype: torch.dtype, grad: bool):
    b, h, n, m, d, padded = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(b, h, m, d, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(b, h, m, d, generator=g).to(dtype).requires_grad_(grad)
    mask = None
    if padded:
        mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
        mask[::2, ..., m - padded:] = False
    return q, k, v, mask


def milliseconds(fn, shape: tuple, dtype: torch.dtype, backward: bool, reps: int) -> float:
    q, k, v, mask = inputs(shape, dtype, backward)
    grad = torch.randn(q.shape).to(dtype)

    def once() -> None:
        out = fn(q, k, v, mask)
        if backward:
            out.backward(grad)

    with torch.set_grad_enabled(backward):
        for _ in range(3):
            once()
        started = time.perf_counter()
        for _ in range(reps):
            once()
    return (time.perf_counter() - started) / reps * 1e3


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                row = {"shape": name, "dtype": str(dtype).replace("torch.", ""),
                       "pass": "forward+backward" if backward else "forward",
                       "sdpa_ms": round(milliseconds(sdpa, shape, dtype, backward, args.reps), 2),
                       "explicit_ms": round(milliseconds(explicit_attention, shape, dtype, backward, args.reps), 2)}
                row["sdpa_over_explicit"] = round(row["sdpa_ms"] / row["explicit_ms"], 2)
                rows.append(row)
                print(f"{name:48s} {row['dtype']:8s} {row['pass']:16s} SDPA {row['sdpa_ms']:7.2f} ms  "
                      f"explicit {row['explicit_ms']:7.2f} ms  ratio {row['sdpa_over_explicit']:5.2f}", flush=True)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "command": "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:]), "threads": args.threads,
            "reps": args.reps}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
