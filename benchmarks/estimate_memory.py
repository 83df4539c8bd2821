"""Estimated GPU memory per rank of the paper recipes, from a CPU forward at batch 1 (an estimate until a GPU
measures it; `stmvl pretrain RECIPE --dry-run` on the GPU prints the real peak).

For each recipe and media type: the bytes autograd saves for the backward during one training forward of one
sample in bf16 autocast (summed over distinct storages with saved-tensor hooks), times the recipe's per-rank batch,
plus the model state (trainable weights, gradients and AdamW's two moments in fp32; the frozen teacher's weights).
The saved activations of CPU attention (the math path) include the attention matrices that GPU flash kernels do not
keep, so the activation part is an upper bound for SDPA flash / memory-efficient attention. Writes
benchmarks/results/memory.json.

    python benchmarks/estimate_memory.py [--recipes pretrain/stm_b16_5m,pretrain/stm_l16_25m]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

RESULTS = Path(__file__).parent / "results" / "memory.json"
RANDOM_WEIGHTS = ["model.teacher.weights=null", "model.text.weights=null", "model.vision.init=null",
                  "model.text.vocab=null"]


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` executes."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def estimate(recipe: str) -> dict:
    from stmvl.models.stm import STMModel
    from stmvl.tasks.pretrain import load_run_config

    cfg = load_run_config(recipe, RANDOM_WEIGHTS)
    torch.manual_seed(0)
    model = STMModel(cfg.model).train()
    tok = model.tokenizer
    text = tok(["a person is slicing a tomato on a wooden board in a kitchen"])
    trainable = sum(p.numel() for _, p in model.pretrain_parameters())
    frozen = sum(p.numel() for p in model.teacher.parameters()) if model.teacher is not None else 0
    state = trainable * 16 + frozen * 4  # fp32 weight + grad + 2 AdamW moments; frozen teacher weights in fp32
    row = {"recipe": recipe, "trainable_params_m": round(trainable / 1e6, 1), "teacher_params_m": round(frozen / 1e6, 1),
           "state_gib": round(state / 2**30, 2)}
    px = cfg.data.img_size
    for media, frames, batch in (("video", cfg.data.num_frames, cfg.data.video_batch_size),
                                 ("image", 1, cfg.data.image_batch_size)):
        sample = {"video": torch.rand(1, frames, 3, px, px), **text, "sample_id": torch.arange(1), "media": media}

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(sample, step=0)["loss"]

        per_sample = saved_bytes(forward)
        row[f"{media}_batch"] = batch
        row[f"{media}_activation_gib_per_sample"] = round(per_sample / 2**30, 3)
        row[f"{media}_total_gib"] = round((state + per_sample * batch) / 2**30, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="pretrain/stm_b16_5m,pretrain/stm_l16_25m")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for recipe in args.recipes.split(","):
        rows.append(estimate(recipe))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "command": "python benchmarks/estimate_memory.py " + " ".join(sys.argv[1:]),
            "method": "CPU forward at batch 1 in bf16 autocast; saved-for-backward bytes x per-rank batch + fp32 "
                      "weights/grads/AdamW + frozen teacher; an upper bound for flash attention"}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
