"""`stmvl demo`: the embedded end-to-end run on a 2-core CPU, with nothing to download.

synthetic temporal corpus -> tiny CLIP teacher (locked-text on frames) -> STM pretraining (demo size, frame-difference
stem, temporal + foil negatives) -> zero-shot retrieval, temporal probe and a shuffled-frames control -> report.md
with the numbers, loss curves, recall plots and a picture of the masks. `--compare` also pretrains the `umt` preset and
`random` masking with the same budget, stem and seed and adds a side-by-side table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

# Variants for --compare: the same recipe and budget, only the masking method changes.
COMPARE_VARIANTS: dict[str, list[str]] = {
    "stm": [],
    "umt": ["model.preset=umt", "model.mask.video_strategy=attention", "model.mask.video_ratio=0.8",
            "model.mask.image_strategy=attention", "model.pass2_tokens=visible", "model.decoder=linear",
            "model.mvm_tokens=visible"],
    "random": ["model.mask.video_strategy=random", "model.mask.image_strategy=random"],
}
COMPARE_KEYS = ("synth_test.itm.t2v_r1", "synth_test.itc.t2v_r1", "synth_test.itc.v2t_r1", "synth_probe.itc_acc",
                "synth_probe.itm_acc", "synth_probe_shuffled.itc_acc")


# Overrides that apply to every stage of the demo (teacher and pretraining); all others are the pretraining
# recipe's (the teacher has its own schedule and model, which `stmvl train-teacher` overrides).
SHARED_PREFIXES = ("optim.precision=", "runtime.threads=", "runtime.device=", "paths.", "data.synthetic.")


def teacher_overrides(overrides: list[str]) -> list[str]:
    """The demo overrides that reach the teacher stage (see SHARED_PREFIXES)."""
    return [o for o in overrides if o.startswith(SHARED_PREFIXES)]


def _paths(out: Path) -> list[str]:
    return [f"paths.data={out / 'data'}", f"paths.models={out}"]


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_teacher(out: Path, overrides: list[str]) -> float:
    """Train the tiny teacher unless <out>/teacher exists; returns seconds spent."""
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.train.commands import train_teacher

    if (out / "teacher" / "model.safetensors").exists():
        _log(f"teacher found at {out / 'teacher'}: reusing it")
        return 0.0
    started = time.perf_counter()
    cfg = load_run_config("teacher/demo", _paths(out) + overrides)
    train_teacher(cfg)
    return time.perf_counter() - started


def run_pretrain(out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """Pretrain one variant into <out>/<name>; returns the engine result with nested eval results and timing."""
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.train.commands import pretrain

    cfg = load_run_config("demo", _paths(out) + [f"runtime.out_dir={out / name}"] + overrides)
    started = time.perf_counter()
    result = pretrain(cfg)
    result["seconds"] = time.perf_counter() - started
    result["cfg"] = cfg
    return result


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


def write_demo_report(out: Path, runs: dict[str, dict], timings: dict[str, float]) -> Path:
    from stmvl.report import Section, comparison_table, plot_loss_curves, plot_recalls, write_report

    main = runs["stm"]
    results = _as_percent(main["results"])
    images_dir = out / "figures"
    images_dir.mkdir(parents=True, exist_ok=True)
    losses = plot_loss_curves(Path(main["run_dir"]) / "metrics.jsonl", images_dir / "losses.png")
    sections = []
    retrieval = results.get("synth_test", {})
    intro = (f"Pretraining: {main['global_step']} steps ({main['seconds'] / 60:.1f} min). Ground truth of a text: every "
             "test clip whose generating attributes match it. Chance on the probe is 50%: a caption and its foil "
             "describe the same frames in opposite orders.")
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
    masks = mask_figure(Path(main["model_dir"]), main["cfg"], images_dir / "masks.png")
    sections.append(Section("Training", {"seconds": timings}, images=[losses] + ([masks] if masks else []),
                            text="Loss curves per media type, and the masks of every strategy on a probe clip "
                                 "(shaded = masked; top row: the STM temporal heatmap)."))
    if len(runs) > 1:
        table = comparison_table({name: _as_percent(run["results"]) for name, run in runs.items()}, COMPARE_KEYS)
        sections.append(Section("Masking strategies compared (same budget, stem and seed)", text=table))
    md, _ = write_report(out, *sections, title="stmvl demo report")
    return md


def run_demo(out: Path, compare: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    from stmvl.tasks.data import ensure_synthetic_corpus
    from stmvl.tasks.pretrain import load_run_config

    overrides = list(overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    ensure_synthetic_corpus(load_run_config("demo", _paths(out) + overrides), log=_log)
    timings["corpus"] = time.perf_counter() - started
    shared = teacher_overrides(overrides)
    if len(shared) < len(overrides):
        _log("overrides for the pretraining stage only: " + " ".join(o for o in overrides if o not in shared))
    timings["teacher"] = run_teacher(out, shared)
    runs = {}
    for name in (COMPARE_VARIANTS if compare else ["stm"]):
        _log(f"pretraining variant {name!r}")
        runs[name] = run_pretrain(out, name if compare else "pretrain", COMPARE_VARIANTS[name] + overrides)
        timings[f"pretrain_{name}"] = runs[name]["seconds"]
    timings["total"] = time.perf_counter() - started
    report = write_demo_report(out, runs, timings)
    summary = {"report": str(report), "timings": timings,
               "results": {name: {k: _lookup(_as_percent(r["results"]), k) for k in COMPARE_KEYS}
                           for name, r in runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stmvl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (corpus, teacher, runs, report)")
    parser.add_argument("--compare", action="store_true", help="also pretrain umt and random masking, same budget")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo recipe, e.g. optim.max_steps=50")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    summary = run_demo(Path(args.out), compare=args.compare, overrides=args.overrides)
    _log(f"report: {summary['report']}")
    for name, numbers in summary["results"].items():
        _log(f"{name}: " + ", ".join(f"{k}={v:.1f}" for k, v in numbers.items() if v is not None))
    _log("timings (s): " + ", ".join(f"{k}={v:.0f}" for k, v in summary["timings"].items()))
    return 0
