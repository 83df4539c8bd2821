"""`stmvl demo`: the embedded end-to-end run on a 2-core CPU, with nothing to download.

synthetic temporal corpus -> tiny CLIP teacher (locked-text on frames) -> STM pretraining (demo size, frame-difference
stem, temporal + foil negatives) -> zero-shot retrieval, temporal probe and a shuffled-frames control -> report.md
with the numbers, loss curves, recall plots, a picture of the masks and the compute of every stage (seconds and
FLOPs counted by torch's FlopCounterMode).

Two tiers: the quick one (recipe `demo`, `make demo`) and `--full` (recipe `demo_full`, `make demo-full`).
`--compare` also pretrains the `umt` preset and `random` masking with the same stem over `--seeds` seeds (default 3)
at equal training compute: each variant's step count is set so that its training FLOPs match STM's (one counted
step per media type and variant, then the run's media schedule); `--compare-at steps` holds the steps equal
instead. It reports mean and spread of each number with each variant's steps and pretraining FLOPs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

# Variants for --compare: the same recipe, only the masking method changes (and, at equal compute, the steps).
COMPARE_VARIANTS: dict[str, list[str]] = {
    "stm": [],
    "umt": ["model.preset=umt", "model.mask.video_strategy=attention", "model.mask.video_ratio=0.8",
            "model.mask.image_strategy=attention", "model.pass2_tokens=visible", "model.decoder=linear",
            "model.mvm_tokens=visible"],
    "random": ["model.mask.video_strategy=random", "model.mask.image_strategy=random"],
}
COMPARE_AT = ("flops", "steps")  # what --compare holds equal between the variants
TIERS = {"quick": "demo", "full": "demo_full"}
# each tier's teacher is trained at the tier's image size (tests/test_demo.py checks that every size agrees)
TEACHER_RECIPES = {"quick": "teacher/demo", "full": "teacher/demo_full"}
COMPARE_KEYS = ("synth_test.itm.t2v_r1", "synth_test.itc.t2v_r1", "synth_test.itc.v2t_r1", "synth_probe.itc_acc",
                "synth_probe.itm_acc", "synth_probe_shuffled.itc_acc")


# Overrides that apply to every stage of the demo (teacher and pretraining); all others are the pretraining
# recipe's (the teacher has its own schedule and model, which `stmvl train-teacher` overrides).
SHARED_PREFIXES = ("optim.precision=", "runtime.threads=", "runtime.device=", "paths.", "data.synthetic.")


TEACHER_ONLY = "teacher:"  # e.g. teacher:optim.max_steps=50 reaches the teacher stage only


def teacher_overrides(overrides: list[str]) -> list[str]:
    """The demo overrides that reach the teacher stage: the shared ones (SHARED_PREFIXES) and those written
    `teacher:KEY=VALUE` (without the prefix)."""
    return [o[len(TEACHER_ONLY):] if o.startswith(TEACHER_ONLY) else o
            for o in overrides if o.startswith(SHARED_PREFIXES) or o.startswith(TEACHER_ONLY)]


def pretrain_overrides(overrides: list[str]) -> list[str]:
    """The demo overrides of the pretraining stage (all but the teacher-only ones)."""
    return [o for o in overrides if not o.startswith(TEACHER_ONLY)]


def _paths(out: Path) -> list[str]:
    return [f"paths.data={out / 'data'}", f"paths.models={out}"]


logger = logging.getLogger(__name__)


def _log(message: str) -> None:
    logger.info("[demo] %s", message)


# Sizes of a trained demo teacher that must match the tier's teacher recipe for the teacher to be reused.
TEACHER_SIZES = ("img_size", "patch_size", "width", "layers", "heads", "embed_dim")


def teacher_mismatch(folder: Path, wanted) -> list[str]:
    """The TEACHER_SIZES where the teacher saved in `folder` (config.json) differs from `wanted` (a TeacherConfig),
    as "key saved -> wanted" strings; empty when it matches."""
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("config", {})
    return [f"{key} {saved.get(key)} -> {getattr(wanted, key)}" for key in TEACHER_SIZES
            if saved.get(key) != getattr(wanted, key)]


def run_teacher(out: Path, overrides: list[str], recipe: str = TEACHER_RECIPES["quick"]) -> dict[str, float]:
    """Train the tiny teacher of `recipe` unless <out>/teacher holds one of its sizes; returns {"seconds", "flops"}
    spent. A teacher of other sizes (the other tier's, or one an earlier version of the demo trained at 64 px) is
    trained again in its place: reused, its position table would be resized to the new grid without a word."""
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import train_teacher

    # a demo run starts afresh: a teacher run killed earlier leaves a folder the engine would otherwise refuse
    cfg = load_run_config(recipe, _paths(out) + ["runtime.overwrite=true"] + overrides)
    found = out / "teacher"
    if (found / "model.safetensors").exists():
        differ = teacher_mismatch(found, cfg.model.teacher)
        if not differ:
            _log(f"teacher found at {found}: reusing it (its compute is not counted again)")
            return {"seconds": 0.0, "flops": 0}
        _log(f"teacher at {found} has other sizes than {recipe} ({', '.join(differ)}): training it again")
    started = time.perf_counter()
    result = train_teacher(cfg)
    return {"seconds": time.perf_counter() - started, "flops": sum(result["flops"].values())}


RUN_RECORD = "demo_run.json"  # written into a pretraining run's folder once it has finished (see run_pretrain)


def run_pretrain(out: Path, name: str, overrides: list[str], recipe: str = "demo", reuse: bool = False,
                 threads: int | None = None) -> dict[str, Any]:
    """Pretrain one variant into <out>/<name>; returns the engine result with nested eval results and timing.

    With `reuse` (``stmvl demo --resume``), a run that finished earlier with the same recipe and overrides is not
    trained again: its record (numbers, steps, FLOPs, seconds) is read back. A run that was cut short, or that ran
    with other settings, starts afresh (a resumed engine run would count only the FLOPs of its second part).
    `threads` (runtime.threads of this run only, for runs side by side) is not part of the settings compared.
    """
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import pretrain

    # rerunning the demo replaces its earlier pretraining run (the corpus and teacher are reused, see run_demo)
    cfg = load_run_config(recipe, _paths(out) + [f"runtime.out_dir={out / name}", "runtime.overwrite=true"]
                          + overrides + ([f"runtime.threads={threads}"] if threads else []))
    record = out / name / RUN_RECORD
    if reuse:
        earlier = finished_run(record, recipe, overrides)
        if earlier is not None:
            _log(f"{name!r} finished earlier ({earlier['global_step']} steps, {earlier['seconds'] / 60:.1f} min): "
                 f"reusing its record {record}")
            return {**earlier, "cfg": cfg}
    record.unlink(missing_ok=True)  # the folder is about to hold another run
    started = time.perf_counter()
    result = pretrain(cfg)
    result["seconds"] = time.perf_counter() - started
    keep = {"recipe": recipe, "overrides": list(overrides), "seconds": result["seconds"],
            "precision": str(result["precision"]), "results": result["results"], "flops": dict(result["flops"]),
            **{key: result[key] for key in ("global_step", "run_dir", "model_dir")}}
    record.write_text(json.dumps(keep, indent=2, default=float), encoding="utf-8")
    result["cfg"] = cfg
    return result


def finished_run(record: Path, recipe: str, overrides: list[str]) -> dict[str, Any] | None:
    """The record of a pretraining run that finished with this recipe and these overrides, or None (no record, an
    unreadable one, other settings, or its exported model is gone)."""
    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(earlier, dict) or earlier.get("recipe") != recipe or earlier.get("overrides") != list(overrides):
        if record.exists():
            _log(f"{record.parent.name!r} ran with other settings: training it again")
        return None
    if not (Path(earlier.get("model_dir", "")) / "config.json").is_file():
        return None
    return earlier


def media_step_flops(recipe: str, overrides: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """FLOPs of one optimizer step of each media type of a pretraining config, counted by FlopCounterMode on a dry
    run (one step each, as a training run counts its steps), and the stream's steps per epoch of each media type.
    The teacher must exist (the dry run builds everything)."""
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import dry_run, pretrain_task

    cfg = load_run_config(recipe, overrides + ["runtime.count_flops=true"])
    rows, trainer = dry_run(cfg, pretrain_task)
    return {row["media"]: int(row["flops"]) for row in rows}, dict(trainer.task.stream.counts)


def media_steps(counts: Mapping[str, int], seed: int) -> Iterator[str]:
    """The media type of every training step, epoch after epoch, as the pretraining stream orders them."""
    from stmvl.data.mixing import media_schedule

    for epoch in itertools.count():
        yield from media_schedule(counts, seed, epoch)


def equal_compute_steps(counts: Mapping[str, int], seed: int, ref_flops: Mapping[str, int],
                        flops: Mapping[str, int], ref_steps: int) -> int:
    """Steps of a variant whose training FLOPs come closest to those of `ref_steps` steps of the reference, both
    following the same media schedule (`media_steps(counts, seed)`); `*flops`: FLOPs of one step per media type."""
    budget = sum(ref_flops[m] for m in itertools.islice(media_steps(counts, seed), ref_steps))
    spent, steps = 0, 0
    for media in media_steps(counts, seed):
        if spent + flops[media] / 2 > budget:  # the next step would overshoot by more than it falls short
            break
        spent += flops[media]
        steps += 1
    return max(1, steps)


def seed_overrides(seed: int) -> list[str]:
    """What changes between the seeds of --compare: the run's seed (data order, media schedule) and the mask's."""
    return [f"runtime.seed={seed}", f"model.mask.seed={seed}"]


def compare_steps(out: Path, recipe: str, overrides: list[str], seeds: int
                  ) -> tuple[dict[tuple[str, int], int], dict[str, float]]:
    """optim.max_steps of every (variant, seed) of --compare at STM's training compute, and this stage's seconds and
    FLOPs (the counted dry-run steps).

    The engine counts the first step of each media type and reuses that count; captions are padded to the longest
    of their batch, so that first batch (which depends on the seed) sets the count. Each (variant, seed) is therefore
    dry-run on its own first batches, and the variants' counted training FLOPs match STM's to within half a step."""
    from stmvl.tasks.pretrain import load_run_config

    started = time.perf_counter()
    optim = load_run_config(recipe, _paths(out) + overrides).optim
    steps: dict[tuple[str, int], int] = {}
    spent = 0
    for seed in range(seeds):
        per_media: dict[str, dict[str, int]] = {}
        counts: dict[str, int] = {}
        for name, variant in COMPARE_VARIANTS.items():
            per_media[name], counts = media_step_flops(recipe, _paths(out) + variant + overrides
                                                       + seed_overrides(seed))
            spent += sum(per_media[name].values())
        ref_steps = optim.max_steps or optim.epochs * sum(counts.values())
        for name, flops in per_media.items():
            steps[name, seed] = equal_compute_steps(counts, seed, per_media["stm"], flops, ref_steps)
            _log(f"--compare at equal compute, seed {seed}: {name} " + ", ".join(
                f"{m} {f / 1e9:.1f} GFLOP/step" for m, f in sorted(flops.items())) + f" -> {steps[name, seed]} steps")
    return steps, {"seconds": time.perf_counter() - started, "flops": spent}


def _pretrain_flops(run: dict[str, Any]) -> int:
    """FLOPs one pretraining run spent (all step kinds and evaluations, as the engine counted them)."""
    return sum(run["flops"].values())


def _lookup(results: dict, dotted: str) -> Any:
    node: Any = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _as_percent(results: dict) -> dict:
    """Probe accuracies in percent, like the recalls."""
    out = json.loads(json.dumps(results, default=float))
    for res in out.values():
        for key in ("itc_acc", "itm_acc"):
            if key in res:
                res[key] = 100.0 * res[key]
    return out


def mask_figure(model_dir: Path, cfg, out_png: Path) -> Path | None:
    """Masks of every strategy on the first probe clip, with the temporal heatmap."""
    from stmvl.api import load_model, read_clip
    from stmvl.data.annotations import load_annotations
    from stmvl.report import draw_masks, mask_picture

    probe = next((c for c in cfg.eval.corpora if c.kind == "probe"), None)
    if probe is None:
        return None
    record = load_annotations(probe.annotation, "probe")[0]
    model = load_model(model_dir)
    frames = read_clip(model, Path(probe.media_root) / record["video"])
    picture = mask_picture(model, frames, seed=cfg.runtime.seed)
    return draw_masks(picture.frames, picture.masks, picture.grid, out_png, heatmap=picture.heatmap, cell_px=96)


ATTRIBUTES = ("color", "shape", "motion")


def attribute_accuracy(sim: torch.Tensor, caption_attrs: list[dict], clip_attrs: list[dict]) -> dict[str, float]:
    """Which attributes the top-ranked clip of each one-object caption has right, in percent.

    Args:
        sim: text-to-clip similarities ``[Q, C]``.
        caption_attrs: the generating attributes of each caption's clip (``{"objects": [...]}``), Q of them.
        clip_attrs: the attributes of the C ranked clips.

    Returns ``{"captions": n, "color": %, "shape": %, "motion": %, "all three": %}`` over the n one-object captions:
    R@1 alone cannot say whether a miss confused the colour, the shape or the motion.
    """
    if sim.shape != (len(caption_attrs), len(clip_attrs)):
        raise ValueError(f"sim must be [{len(caption_attrs)}, {len(clip_attrs)}], got {list(sim.shape)}")
    top = sim.argmax(dim=1).tolist()
    hits = {name: 0 for name in (*ATTRIBUTES, "all three")}
    count = 0
    for query, best in zip(caption_attrs, top):
        if len(query["objects"]) != 1:
            continue
        count += 1
        wanted, got = query["objects"][0], clip_attrs[best]["objects"][0]
        right = [wanted[name] == got[name] for name in ATTRIBUTES]
        for name, ok in zip(ATTRIBUTES, right):
            hits[name] += ok
        hits["all three"] += all(right)
    return {"captions": count, **{name: 100.0 * n / max(count, 1) for name, n in hits.items()}}


def attribute_section(model_dir: Path, cfg, run_dir: Path | None = None) -> tuple["Section", dict[str, float]] | None:
    """The attribute check of the final model on the synthetic test clips, with the seconds and FLOPs it cost; None
    without the synthetic corpus' test annotations.

    It ranks by the similarity the final evaluation saved (``<run_dir>/similarity``, the ranking the retrieval table
    reports, at no cost); a run without it (an older run reused) is scored again by pooled ITC embeddings."""
    from stmvl.data.annotations import read_records
    from stmvl.report import Section

    root = Path(cfg.data.synthetic.dir)
    clips_file, captions_file = root / "annotations" / "test_video.json", root / "annotations" / "retrieval_test.json"
    if not (clips_file.is_file() and captions_file.is_file()):
        return None
    clips, captions = read_records(clips_file), read_records(captions_file)
    started = time.perf_counter()
    saved = saved_test_similarity(run_dir, cfg, captions_file, captions, clips) if run_dir is not None else None
    if saved is not None:
        sim, clip_attrs, flops = saved[0], saved[1], 0.0
        how = "the final evaluation's ITC similarity (the ranking of the retrieval table)"
    else:
        sim, flops = pooled_similarity(model_dir, root, captions, clips)
        clip_attrs, how = [c["attributes"] for c in clips], "ITC similarity of pooled embeddings"
    # a caption's own attributes are those of the clip it was written from (the same "video" in both files)
    by_video = {c["video"]: c["attributes"] for c in clips}
    numbers = attribute_accuracy(sim, [by_video[c["video"]] for c in captions], clip_attrs)
    text = (f"For each one-object test caption, whether the clip ranked first ({how}) has the caption's colour, "
            "shape and motion (chance: 1/8, 1/6 and 1/7). R@1 alone does not say which attribute a miss got wrong.")
    section = Section("What the top-ranked clip gets right (one-object captions, %)", numbers, text=text)
    return section, {"seconds": time.perf_counter() - started, "flops": flops}


def saved_test_similarity(run_dir: Path, cfg, captions_file: Path, captions: list[dict],
                          clips: list[dict]) -> tuple[torch.Tensor, list[dict]] | None:
    """(similarity [captions, clips], each column's attributes) saved by the final evaluation of the retrieval corpus
    read from ``captions_file``; None when there is none or it holds other texts or clips."""
    name = next((c.name for c in cfg.eval.corpora if c.kind == "retrieval"
                 and Path(c.annotation).resolve() == captions_file.resolve()), None)
    path = Path(run_dir) / "similarity" / f"{name}.pt" if name is not None else None
    if path is None or not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    root = Path(cfg.data.synthetic.dir)
    by_path = {str((root / c["video"]).resolve()): c["attributes"] for c in clips}
    columns = [by_path.get(str(Path(v).resolve())) for v in saved["videos"]]
    if saved["texts"] != [c["caption"] for c in captions] or any(a is None for a in columns):
        return None
    return saved["itc"], columns


def pooled_similarity(model_dir: Path, root: Path, captions: list[dict],
                      clips: list[dict]) -> tuple[torch.Tensor, float]:
    """ITC similarity [captions, clips] of the model's pooled embeddings, and the FLOPs it cost."""
    from stmvl.api import encode_text, encode_video, load_model, read_clip
    from stmvl.train.flops import count_flops

    model = load_model(model_dir).eval()
    box: dict[str, torch.Tensor] = {}

    def embed() -> None:
        videos = [encode_video(model, torch.stack([read_clip(model, root / c["video"]) for c in clips[i:i + 64]]))
                  for i in range(0, len(clips), 64)]
        texts = [encode_text(model, [c["caption"] for c in captions[i:i + 64]]) for i in range(0, len(captions), 64)]
        box["sim"] = torch.cat(texts) @ torch.cat(videos).t()

    flops = count_flops(embed)
    return box["sim"], flops


def compute_section(stages: dict[str, dict[str, float]], precision: str) -> "Section":
    """Seconds and FLOPs (counted by FlopCounterMode: matmuls, convolutions, attention) of every stage, with this
    machine's CPU capability and measured matmul peak, so the budget can be compared across machines."""
    from stmvl.report import Section
    from stmvl.train.flops import matmul_peak

    peak = matmul_peak("fp32", "cpu", None, 2048) / 1e9
    rows = {name: {"seconds": round(v["seconds"], 1), "TFLOP": round(v["flops"] / 1e12, 2)} for name, v in stages.items()}
    total_flops = sum(v["flops"] for v in stages.values())
    rows["total"] = {"seconds": round(sum(v["seconds"] for v in stages.values()), 1),
                     "TFLOP": round(total_flops / 1e12, 2)}
    text = (f"Machine: {os.cpu_count()} CPUs, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads, fp32 2048^3 matmul peak {peak:.0f} GFLOP/s measured now; training "
            f"precision {precision} (optim.precision auto picks bf16 only where the CPU computes it natively). "
            "FLOPs are counted once per step kind and per evaluation; the corpus stage renders and encodes with "
            "numpy and PyAV and is timed only.")
    return Section("Compute", rows, {"flop_counter": "torch.utils.flop_counter.FlopCounterMode"}, text=text)


def learning_curve(run_dir: Path, out_png: Path, clips_per_step: int) -> Path | None:
    """R@1 and probe accuracy against clips seen, from the run's evaluations (None with fewer than two)."""
    from stmvl.report import plot_learning_curve

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("split") == "eval"]
    if len(evals) < 2:
        return None
    return plot_learning_curve(evals, out_png, clips_per_step=clips_per_step,
                               keys=("synth_test/itc/t2v_r1", "synth_probe/itc_acc"))


def write_demo_report(out: Path, runs: dict[str, dict], stages: dict[str, dict[str, float]],
                      compare: dict[str, list[dict]] | None = None, compare_at: str = "flops") -> Path:
    from stmvl.report import (Section, plot_loss_curves, plot_recalls, plot_seed_comparison, seed_statistics,
                              seed_table, write_report)

    main = runs["stm"]
    results = _as_percent(main["results"])
    images_dir = out / "figures"
    images_dir.mkdir(parents=True, exist_ok=True)
    losses = plot_loss_curves(Path(main["run_dir"]) / "metrics.jsonl", images_dir / "losses.png")
    sections = []
    retrieval = results.get("synth_test", {})
    cfg = main["cfg"]
    intro = (f"Pretraining: {main['global_step']} optimizer steps ({main['seconds'] / 60:.1f} min), each a batch of "
             f"{cfg.data.video_batch_size} clips or of {cfg.data.image_batch_size} images. Ground truth of a text: "
             "every test clip whose generating attributes match it. Chance on the probe is 50%: a caption and its "
             "foil describe the same frames in opposite orders.")
    if retrieval and "itm" not in retrieval:
        intro += (f" ITC only: this run does not score the VTM head (eval.itm: {cfg.eval.itm}); the full tier "
                  "(`stmvl demo --full`) scores ITM at its last evaluation.")
    if retrieval:
        recalls = plot_recalls({k: v for k, v in retrieval.items() if k in ("itc", "itm")}, images_dir / "recall.png",
                               title="zero-shot retrieval")
        sections.append(Section("Zero-shot text-video retrieval (held-out synthetic test clips)",
                                {k: v for k, v in retrieval.items() if k in ("itc", "itm")},
                                retrieval.get("protocol", {}), text=intro, images=[recalls]))
    for name, title in (("synth_probe", "Temporal probe (true caption vs reversed-motion foil), accuracy %"),
                        ("synth_probe_shuffled", "Control: the same probe with the frames shuffled (should be ~50%)")):
        if name in results:
            sections.append(Section.from_result(title, results[name]))
    attributes = attribute_section(Path(main["model_dir"]), cfg, Path(main["run_dir"]))
    if attributes is not None:
        sections.append(attributes[0])
        stages["attribute check"] = attributes[1]  # the caller's dict: its total includes this stage
    masks = mask_figure(Path(main["model_dir"]), cfg, images_dir / "masks.png")
    curve = learning_curve(Path(main["run_dir"]), images_dir / "learning_curve.png", cfg.data.video_batch_size)
    sections.append(Section("Training", {}, images=[losses] + ([curve] if curve else []) + ([masks] if masks else []),
                            text="Loss curves per media type"
                                 + (", the learning curve (R@1 and probe accuracy against clips seen)" if curve else "")
                                 + " and the masks of every strategy on a probe clip (shaded = masked; top row: the "
                                   "STM temporal heatmap). Demo-only choices (image size, patch size, model widths, "
                                   "loss weights, schedule) are the recipe's: " + str(cfg.description or "demo") + "."))
    sections.append(compute_section(stages, main.get("precision", "?")))
    if compare:
        stats = seed_statistics({name: [_as_percent(r["results"]) for r in per_seed]
                                 for name, per_seed in compare.items()}, COMPARE_KEYS)
        keys = [k for k in COMPARE_KEYS if any(k in row for row in stats.values())]  # ITM only where scored
        plot = plot_seed_comparison(stats, keys, images_dir / "compare.png")
        seeds = max(len(v) for v in compare.values())
        # the work of each variant is stated beside the table: at equal steps UMT (no second student pass) spends
        # less; at equal FLOPs it takes more steps
        spent = ", ".join(f"{name} {sum(r['global_step'] for r in rs) / len(rs):.0f} steps / "
                          f"{sum(r['flops']['train'] for r in rs) / len(rs) / 1e12:.1f} training TFLOP"
                          for name, rs in compare.items())
        held = ("the training FLOPs equal (each variant's steps set from one counted step per media type and the "
                "run's media schedule)" if compare_at == "flops" else "the steps equal")
        text = (f"Every variant runs the same batches, stem and seeds, with {held}; per run (mean): {spent}.\n\n"
                + seed_table(stats, keys))
        title = "equal training FLOPs" if compare_at == "flops" else "same steps"
        sections.append(Section(f"Masking strategies compared: {title}, {seeds} seed(s)", text=text, images=[plot]))
    md, _ = write_report(out, *sections, title="stmvl demo report")
    return md


def recipe_threads(recipe: str, overrides: list[str]) -> int:
    """runtime.threads of a run (0: torch's default, one per core)."""
    from stmvl.tasks.pretrain import load_run_config

    return load_run_config(recipe, overrides).runtime.threads or (os.cpu_count() or 1)


def run_side_by_side(out: Path, runs: list[tuple[str, list[str]]], recipe: str, jobs: int, reuse: bool,
                     threads: int) -> None:
    """Train `runs` ([(folder name, overrides)]) `jobs` at a time, each in a child process with `threads // jobs`
    intra-op threads (at least 1), in the order given; each leaves its record (`run_pretrain`).

    The demo's small matmuls keep a second thread of one run only partly busy: on 2 cores, two one-thread runs side
    by side train 1.26x the clips per second of one two-thread run (BENCHMARKS.md). After a failure no further run
    starts; the error is raised here once the runs under way have ended."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    per_run = max(1, threads // jobs)
    show = any(getattr(h, "_stmvl_console", False) for h in logging.getLogger("stmvl").handlers)
    _log(f"{len(runs)} runs, {jobs} at a time with {per_run} thread(s) each")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent) as pool:
        futures = [pool.submit(_train_in_child, out, name, overrides, recipe, reuse, per_run, show)
                   for name, overrides in runs]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()
    # each run's record holds its own seconds; side by side they overlap, so the report's total overstates the wall
    _log(f"{len(runs)} runs side by side: {(time.perf_counter() - started) / 60:.1f} min wall")


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """Make this process end soon after the process that started it has gone (it is then re-parented).

    The initializer of `run_side_by_side`'s children: a `kill` of `stmvl demo --compare --jobs 2` (SIGTERM, as a
    scheduler's time limit sends) ends the demo process at once, and its children would otherwise go on training
    on the cores, unseen (seen in stop 33: two orphaned runs kept both cores busy). A watcher thread, not
    PR_SET_PDEATHSIG, so that it works on macOS too."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)  # the run is abandoned like its parent; its loader workers watch this process in turn

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _train_in_child(out: Path, name: str, overrides: list[str], recipe: str, reuse: bool, threads: int,
                    show: bool) -> None:
    """One run of `run_side_by_side`, in its own process: its log lines carry its folder name."""
    if show:
        from stmvl.train.logging import console_logging

        console_logging().setFormatter(logging.Formatter(f"[{name}] %(message)s"))
    run_pretrain(out, name, overrides, recipe, reuse=reuse, threads=threads)


def run_demo(out: Path, compare: bool = False, overrides: list[str] | None = None, full: bool = False,
             seeds: int = 3, compare_at: str = "flops", resume: bool = False, jobs: int = 1) -> dict[str, Any]:
    """The demo end to end; returns {report, stages (seconds, flops), results per variant}. With `compare`, every
    variant runs `seeds` seeds at equal training FLOPs (`compare_at="flops"`) or equal steps (`"steps"`). With
    `resume`, pretraining runs of `out` that finished with the same settings are reused (`run_pretrain`): a
    comparison cut short continues with the first run it had not finished. `jobs` > 1 trains that many of the
    comparison's runs at once, in child processes that share the recipe's runtime.threads."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if compare_at not in COMPARE_AT:
        raise ValueError(f"compare_at must be one of {', '.join(COMPARE_AT)}, got {compare_at!r}")
    from stmvl.tasks.data import ensure_synthetic_corpus
    from stmvl.tasks.pretrain import load_run_config

    tier = "full" if full else "quick"
    recipe = TIERS[tier]
    shared = teacher_overrides(list(overrides or []))
    overrides = pretrain_overrides(list(overrides or []))
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    ensure_synthetic_corpus(load_run_config(recipe, _paths(out) + overrides), log=_log)
    stages["corpus"] = {"seconds": time.perf_counter() - started, "flops": 0}
    only_pretrain = [o for o in overrides if not o.startswith(SHARED_PREFIXES)]
    if only_pretrain:
        _log("overrides for the pretraining stage only: " + " ".join(only_pretrain))
    stages["teacher"] = run_teacher(out, shared, TEACHER_RECIPES[tier])
    steps_of: dict[tuple[str, int], int] = {}
    if compare and compare_at == "flops":
        steps_of, stages["equal-compute steps"] = compare_steps(out, recipe, overrides, seeds)
    runs: dict[str, dict] = {}
    per_seed: dict[str, list[dict]] = {}
    # seed-major, so that a comparison cut short still holds every variant for the seeds it finished
    plan = [(name, seed, name if not compare else f"{name}_seed{seed}")
            for seed in range(seeds if compare else 1) for name in (COMPARE_VARIANTS if compare else ["stm"])]

    def run_overrides(name: str, seed: int) -> list[str]:
        seeded = seed_overrides(seed) if compare else []
        steps = [f"optim.max_steps={steps_of[name, seed]}"] if (name, seed) in steps_of else []
        return COMPARE_VARIANTS[name] + seeded + overrides + steps

    folder = {tag: tag if compare else "pretrain" for _, _, tag in plan}
    if jobs > 1 and len(plan) > 1:
        # side by side in child processes; each leaves its record, which the loop below reads back
        run_side_by_side(out, [(folder[tag], run_overrides(name, seed)) for name, seed, tag in plan], recipe, jobs,
                         resume, recipe_threads(recipe, _paths(out) + overrides))
        resume = True
    for name, seed, tag in plan:
        _log(f"pretraining {tag!r} ({recipe})")
        run = run_pretrain(out, folder[tag], run_overrides(name, seed), recipe, reuse=resume)
        stages[f"pretrain {tag}"] = {"seconds": run["seconds"], "flops": _pretrain_flops(run)}
        per_seed.setdefault(name, []).append(run)
        runs.setdefault(name, run)
    report = write_demo_report(out, runs, stages, per_seed if compare else None, compare_at)
    total = {"seconds": sum(v["seconds"] for v in stages.values()), "flops": sum(v["flops"] for v in stages.values())}
    summary = {"report": str(report), "tier": tier, "stages": stages, "total": total,
               "results": {name: {k: _lookup(_as_percent(r["results"]), k) for k in COMPARE_KEYS}
                           for name, r in runs.items()}}
    if compare:
        summary["compare_at"] = compare_at
        summary["seeds"] = {name: [{**{k: _lookup(_as_percent(r["results"]), k) for k in COMPARE_KEYS},
                                    "steps": r["global_step"], "pretrain_tflop": _pretrain_flops(r) / 1e12,
                                    "train_tflop": r["flops"]["train"] / 1e12} for r in rs]
                            for name, rs in per_seed.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
