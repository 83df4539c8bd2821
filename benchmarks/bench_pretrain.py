"""Pretraining step throughput (clips/s) and peak memory of the STM model on this machine.

Also FLOPs per step (torch's FlopCounterMode on the warm-up step) and MFU against an fp32/bf16 2048^3 matmul peak
measured in the same process; `auto` is the precision the engine would pick on this CPU.

Sizes: tiny (tests), demo (the embedded demo: 48 px, 3 frames, MiniLM text) and B/16 (the paper: 224 px, 4 frames,
CLIP-B/16-shaped teacher, BERT-base-shaped text, random weights). Each (size, precision) runs in its own process so
that its peak resident memory is its own. Writes benchmarks/results/pretrain.json and prints a table.

    python benchmarks/bench_pretrain.py [--sizes tiny,demo,b16] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

RESULTS = Path(__file__).parent / "results" / "pretrain.json"
SIZES = {
    # name: (overrides of the demo recipe, video batch or None for the recipe's own)
    "tiny": (["model.vision.img_size=32", "model.vision.patch_size=8", "model.vision.width=64", "model.vision.depth=2",
              "model.vision.heads=2", "model.teacher.weights=null", "model.teacher.img_size=32",
              "model.teacher.patch_size=8", "model.teacher.width=64", "model.teacher.layers=2",
              "model.teacher.heads=2", "model.teacher.embed_dim=64", "model.teacher.return_layers=1",
              "model.predictor.dim=32", "model.predictor.hidden=32", "model.predictor.head_hidden=16",
              "data.num_frames=4"], 8, 32),
    "demo": (["model.teacher.weights=null"], None, None),  # the recipe's own batch and image size
    "b16": (["model.vision.size=b16", "model.vision.img_size=224", "model.vision.patch_size=16",
             "model.vision.width=768", "model.vision.depth=12", "model.vision.heads=12", "model.vision.stem=rgb",
             "model.teacher.weights=null", "model.teacher.img_size=224", "model.teacher.patch_size=16",
             "model.teacher.width=768", "model.teacher.layers=12", "model.teacher.heads=12",
             "model.teacher.embed_dim=512", "model.teacher.return_layers=6", "model.text.weights=null",
             "model.text.hidden=768", "model.text.layers=12", "model.text.heads=12", "model.text.intermediate=3072",
             "model.text.fusion_start=9", "model.text.freeze_below=0", "model.predictor.dim=512",
             "model.predictor.hidden=256", "model.predictor.head_hidden=128", "model.embed_dim=512",
             "model.loss.temporal_negatives=false", "model.loss.foil_negatives=false",
             # its text trains whole: nothing fixed to cache
             "model.text.cache_states=false", "data.num_frames=4"], 2, 224),
}


def run_one(size: str, precision: str, steps: int, threads: int) -> dict:
    """Time `steps` optimizer steps (after one warm-up step) of one size on random clips and fixed captions."""
    import torch

    from stmvl.models.stm import STMModel
    from stmvl.tasks.data import tokenizer_for
    from stmvl.tasks.pretrain import load_run_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    overrides, batch_size, px = SIZES[size]
    # random weights: no teacher file to warm-start from (the warm start is initialisation, no cost per step)
    cfg = load_run_config("demo", overrides + ["model.vision.warm_start=none"])
    batch_size = batch_size or cfg.data.video_batch_size
    px = px or cfg.data.img_size
    model = STMModel(cfg.model).train()
    tok = tokenizer_for(cfg.model.text)
    caption = "a small red circle moves to the left then a large blue square grows"
    foil = "a large blue square shrinks then a small red circle moves to the right"
    tokens = tok([caption] * batch_size + [foil] * batch_size)
    b = batch_size
    frames = cfg.data.num_frames  # the demo trains on 3 frames per clip, the paper's sizes on 4
    batch = {"video": torch.rand(b, frames, 3, px, px), "input_ids": tokens["input_ids"][:b],
             "attention_mask": tokens["attention_mask"][:b], "foil_input_ids": tokens["input_ids"][b:],
             "foil_attention_mask": tokens["attention_mask"][b:], "sample_id": torch.arange(b), "media": "video"}
    if model.text_cache is not None:  # as the pretraining task's prepare hook does before step 1
        model.cache_captions([caption, foil])
    # the engine's optimizer (fused AdamW: this benchmark runs no fp16 grad scaler), so a step costs what a training
    # step costs
    from stmvl.train.optim import build_optimizer

    params = [p for _, p in model.pretrain_parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params}], 1e-4, 0.05, (0.9, 0.999), 1e-8)
    from stmvl.train.flops import count_flops, matmul_peak
    from stmvl.train.precision import resolve

    chosen = resolve(precision, torch.device("cpu"))  # "auto" -> what the engine would pick on this CPU
    use_bf16 = chosen.name == "bf16"

    def step(i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(batch, step=i)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = count_flops(lambda: step(0))  # the warm-up step, counted
    started = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    seconds = (time.perf_counter() - started) / steps
    peak = matmul_peak(chosen.name, "cpu", None, 2048)  # the reference machine's peak: fp32 2048^3
    params = sum(p.numel() for _, p in model.pretrain_parameters())
    return {"size": size, "precision": precision, "resolved": chosen.name, "reason": chosen.reason,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "batch": batch_size, "frames": frames,
            "img_size": px, "trainable_params_m": round(params / 1e6, 2), "seconds_per_step": round(seconds, 3),
            "clips_per_s": round(batch_size / seconds, 2), "gflop_per_step": round(flops / 1e9, 1),
            "matmul_peak_gflops": round(peak / 1e9, 1), "mfu": round(flops / seconds / peak, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,demo,b16")
    parser.add_argument("--precisions", default="auto,fp32,bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child, args.steps, args.threads)))
        return 0
    rows = []
    for size in args.sizes.split(","):
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, "--child", size, precision, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['size']:>5} {r['precision']:>5}->{r['resolved']:<5} batch {r['batch']:>3}  "
                  f"{r['seconds_per_step']:7.3f} s/step  {r['clips_per_s']:7.2f} clips/s  "
                  f"{r['gflop_per_step']:8.1f} GFLOP/step  MFU {r['mfu']:.3f}  peak {r['peak_rss_mb']:8.1f} MB",
                  flush=True)
    for r in rows:  # ratio against fp32 of the same size, measured in the same run
        base = next((b for b in rows if b["size"] == r["size"] and b["precision"] == "fp32"), None)
        if base is not None:
            r["speedup_vs_fp32"] = round(base["seconds_per_step"] / r["seconds_per_step"], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "command": "python benchmarks/bench_pretrain.py " + " ".join(
                sys.argv[1:]), "threads": args.threads, "steps": args.steps}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
