"""Run reports: loss curves, recall plots, comparison tables, mask pictures, report.md + report.json.

Every figure is drawn with a fixed size in pixels (figure inches x DPI, no tight bounding box) so callers and tests
know the PNG size in advance. Every number in report.md / report.json sits in a section together with the protocol
that produced it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DPI = 100
RECALL_KEYS = ("r1", "r5", "r10")
MASK_SHADE = np.array([40.0, 40.0, 40.0])
MASK_SHADE_ALPHA = 0.7
LABEL_WIDTH_PX = 90


def _figure(width_px: int, height_px: int) -> plt.Figure:
    return plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (one JSON object per line; blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def loss_series(records: Iterable[Mapping[str, Any]], step_key: str = "step") -> dict[str, tuple[list, list]]:
    """Per loss name (every numeric key containing "loss"), the (steps, values) of the records that have it."""
    series: dict[str, tuple[list, list]] = {}
    for record in records:
        if step_key not in record:
            continue
        for key, value in record.items():
            if "loss" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record[step_key])
                values.append(float(value))
    return series


def plot_loss_curves(
    metrics: str | Path | Sequence[Mapping[str, Any]], out_png: str | Path, *, step_key: str = "step",
    panel_px: tuple[int, int] = (320, 240), columns: int = 3,
) -> Path:
    """One subplot per loss name against the step.

    Args:
        metrics: a metrics.jsonl path or its records.
        out_png: output path.
        panel_px: (width, height) of one subplot in pixels.
        columns: subplots per row.

    Returns:
        the PNG path; its size is ``(min(columns, L) * panel_w, ceil(L / columns) * panel_h)`` for L losses.
    """
    records = read_metrics_jsonl(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    series = loss_series(records, step_key)
    if not series:
        raise ValueError(f"no loss values with a {step_key!r} key in the metrics")
    cols = min(columns, len(series))
    rows = math.ceil(len(series) / cols)
    fig = _figure(cols * panel_px[0], rows * panel_px[1])
    for slot, (name, (steps, values)) in enumerate(sorted(series.items())):
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(step_key, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.35, hspace=0.5)
    return _save(fig, out_png)


def plot_recalls(
    tables: Mapping[str, Mapping[str, float]], out_png: str | Path, *, title: str = "",
    size_px: tuple[int, int] = (640, 300),
) -> Path:
    """Grouped R@1/5/10 bars per table (e.g. ``itc`` and ``itm``), one panel per direction (t2v, v2t).

    Args:
        tables: table name -> retrieval metrics (keys ``t2v_r1`` ...), as returned by ``evaluate_retrieval``;
            non-metric entries such as ``protocol`` are ignored.
        out_png: output path; the PNG is ``size_px`` (width, height).
    """
    names = [name for name, table in tables.items() if isinstance(table, Mapping) and "t2v_r1" in table]
    if not names:
        raise ValueError("no retrieval table with t2v_r1 among " + ", ".join(tables))
    fig = _figure(*size_px)
    width = 0.8 / len(names)
    positions = np.arange(len(RECALL_KEYS))
    for panel, direction in enumerate(("t2v", "v2t")):
        ax = fig.add_subplot(1, 2, panel + 1)
        for slot, name in enumerate(names):
            values = [tables[name][f"{direction}_{key}"] for key in RECALL_KEYS]
            bars = ax.bar(positions + slot * width, values, width, label=name)
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks(positions + width * (len(names) - 1) / 2, [k.upper().replace("R", "R@") for k in RECALL_KEYS])
        ax.set_ylim(0, 105)
        ax.set_title(f"{title} {direction}".strip(), fontsize=9)
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.88, wspace=0.25)
    return _save(fig, out_png)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table: one row per entry of ``rows`` (row name -> {column: value}); columns default to the union."""
    if columns is None:
        columns = []
        for row in rows.values():
            columns.extend(key for key in row if key not in columns and not isinstance(row[key], Mapping))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_format(row.get(col, "")) for col in columns) + " |")
    return "\n".join(lines)


def comparison_table(runs: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> str:
    """Side-by-side markdown table of several runs.

    Args:
        runs: run name -> nested results, e.g. ``{"stm": {"retrieval": {"itm": {...}}, "probe": {...}}}``.
        keys: dotted paths into each run's results, e.g. ``"retrieval.itm.t2v_r1"``; missing ones show as "-".
    """
    rows = {name: {key: _lookup(results, key) for key in keys} for name, results in runs.items()}
    return markdown_table(rows, list(keys))


def plot_learning_curve(evals: Sequence[Mapping[str, Any]], out_png: str | Path, *, clips_per_step: int,
                        keys: Sequence[str], size_px: tuple[int, int] = (640, 280)) -> Path:
    """Evaluation numbers against clips seen (step x clips per step), one line per key (fractions become %).

    Args:
        evals: metrics.jsonl records of split "eval" (each with "step" and the flattened result keys).
    """
    fig = _figure(*size_px)
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        points = [(r["step"] * clips_per_step, float(r[key])) for r in evals if key in r]
        if points:
            scale = 100.0 if all(v <= 1.0 for _, v in points) and "acc" in key else 1.0
            ax.plot([p for p, _ in points], [v * scale for _, v in points], marker="o", label=key)
    ax.set_xlabel("video clips seen")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(bottom=0.18)
    return _save(fig, out_png)


def seed_statistics(runs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str]
                    ) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Mean, sample standard deviation and count over seeds: variant -> key -> (mean, std, n).

    Args:
        runs: variant name -> one nested result per seed (as for `comparison_table`); missing values are skipped.
    """
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name, per_seed in runs.items():
        out[name] = {}
        for key in keys:
            values = [float(v) for v in (_lookup(r, key) for r in per_seed) if isinstance(v, (int, float))]
            if not values:
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            out[name][key] = (mean, math.sqrt(var), len(values))
    return out


def seed_table(stats: Mapping[str, Mapping[str, tuple[float, float, int]]], keys: Sequence[str]) -> str:
    """Markdown table of `seed_statistics`: "mean +/- std (n)" per variant and key."""
    def cell(row: Mapping[str, tuple[float, float, int]], key: str) -> str:
        if key not in row:
            return "-"
        mean, std, n = row[key]
        return f"{mean:.1f} +/- {std:.1f} ({n})"

    rows = {name: {key: cell(row, key) for key in keys} for name, row in stats.items()}
    return markdown_table(rows, list(keys))


def plot_seed_comparison(stats: Mapping[str, Mapping[str, tuple[float, float, int]]], keys: Sequence[str],
                         out_png: str | Path, *, size_px: tuple[int, int] = (720, 320)) -> Path:
    """Bars of the mean per variant (one group per key) with the standard deviation over seeds as error bars."""
    fig = _figure(*size_px)
    ax = fig.add_subplot(1, 1, 1)
    names = list(stats)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        means = [stats[name].get(k, (float("nan"), 0.0, 0))[0] for k in keys]
        stds = [stats[name].get(k, (0.0, 0.0, 0))[1] for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([k.replace("synth_", "") for k in keys], fontsize=7)
    ax.set_ylabel("% (mean +/- std over seeds)")
    ax.legend(fontsize=8)
    fig.subplots_adjust(bottom=0.2)
    return _save(fig, out_png)


def _lookup(results: Mapping[str, Any], dotted: str) -> Any:
    node: Any = results
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return "-"
        node = node[part]
    return node


@dataclass
class Section:
    """One part of a report: numbers and the protocol that produced them, optional text and images.

    ``numbers`` is flat (name -> value) or one level nested (table name -> {metric: value}), e.g. the ``itc`` and
    ``itm`` tables of ``evaluate_retrieval``; ``images`` are paths (copied as relative links when under out_dir).
    """

    title: str
    numbers: Mapping[str, Any] = field(default_factory=dict)
    protocol: Mapping[str, Any] = field(default_factory=dict)
    text: str = ""
    images: Sequence[str | Path] = ()

    @classmethod
    def from_result(cls, title: str, result: Mapping[str, Any], **kwargs: Any) -> "Section":
        """A section from an evaluator's result dict (its ``protocol`` entry goes next to the numbers)."""
        numbers = {key: value for key, value in result.items() if key != "protocol"}
        return cls(title=title, numbers=numbers, protocol=result.get("protocol", {}), **kwargs)


def _numbers_markdown(numbers: Mapping[str, Any]) -> str:
    nested = {k: v for k, v in numbers.items() if isinstance(v, Mapping)}
    flat = {k: v for k, v in numbers.items() if not isinstance(v, Mapping)}
    parts = []
    if flat:
        parts.append(markdown_table({"value": flat}))
    if nested:
        parts.append(markdown_table(nested))
    return "\n\n".join(parts)


def _relative(path: str | Path, out_dir: Path) -> str:
    path = Path(path)
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def write_report(out_dir: str | Path, *sections: Section, title: str = "stmvl report") -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into ``out_dir``.

    Each section's numbers are followed by its protocol (markdown) or stored beside it (JSON:
    ``{"title", "sections": [{"title", "numbers", "protocol", "text", "images"}]}``).

    Returns:
        (report.md path, report.json path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    payload: dict[str, Any] = {"title": title, "sections": []}
    for section in sections:
        images = [_relative(image, out_dir) for image in section.images]
        md += [f"## {section.title}", ""]
        if section.text:
            md += [section.text, ""]
        if section.numbers:
            md += [_numbers_markdown(section.numbers), ""]
        if section.protocol:
            md += ["Protocol: " + ", ".join(f"{k}={_format(v)}" for k, v in section.protocol.items()), ""]
        md += [f"![{Path(image).stem}]({image})" for image in images] + ([""] if images else [])
        payload["sections"].append(
            {"title": section.title, "numbers": section.numbers, "protocol": dict(section.protocol),
             "text": section.text, "images": images}
        )
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    md_path.write_text("\n".join(md), encoding="utf-8")
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default), encoding="utf-8")
    return md_path, json_path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"cannot write {type(value).__name__} to report.json")


def _token_frame(frame: int, num_frames: int, token_frames: int) -> int:
    # Masks and heatmaps may live on a coarser time grid (tubelet stems give T' = T / 2): frame t uses token frame
    # floor(t * T' / T).
    return frame * token_frames // num_frames


def shade_masked(frame: np.ndarray, mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Darken the patches of one frame whose token is masked.

    Args:
        frame: uint8 [H, W, 3]; mask: bool [N] with N = gh * gw (True = masked); grid: (gh, gw).

    Returns:
        uint8 [H, W, 3].
    """
    gh, gw = grid
    height, width = frame.shape[:2]
    if height % gh or width % gw:
        raise ValueError(f"frame {height}x{width} is not divisible by the token grid {gh}x{gw}")
    pixels = np.kron(mask.reshape(gh, gw), np.ones((height // gh, width // gw), dtype=bool))
    out = frame.astype(np.float64)
    out[pixels] = (1 - MASK_SHADE_ALPHA) * out[pixels] + MASK_SHADE_ALPHA * MASK_SHADE
    return out.round().astype(np.uint8)


def draw_masks(
    frames: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    grid: tuple[int, int],
    out_png: str | Path,
    *,
    heatmap: torch.Tensor | None = None,
    cell_px: int = 128,
) -> Path:
    """Frames with the masked tokens shaded, one row per strategy, and the temporal heatmap overlaid.

    Args:
        frames: uint8 [T, 3, H, W].
        masks: strategy -> bool [T_m * N] (True = masked, token index ``t * N + n``); T_m may be T or a divisor-like
            coarser grid (T' of a tubelet stem).
        grid: (gh, gw) with N = gh * gw.
        out_png: output path.
        heatmap: optional float [T_h, N] temporal heatmap; drawn over the frames in a first row (and over the
            ``stm`` row when present).
        cell_px: pixel size of one frame cell.

    Returns:
        the PNG path; its size is ``(LABEL_WIDTH_PX + T * cell_px, rows * cell_px)`` with rows = number of
        strategies (+1 with a heatmap).
    """
    num_frames = frames.shape[0]
    tokens_per_frame = grid[0] * grid[1]
    images = frames.permute(0, 2, 3, 1).cpu().numpy()
    rows: list[tuple[str, list[np.ndarray], bool]] = []
    if heatmap is not None:
        rows.append(("heatmap", list(images), True))
    for strategy, mask in masks.items():
        flat = mask.reshape(-1).bool().cpu().numpy()
        if flat.size % tokens_per_frame:
            raise ValueError(f"mask of {strategy!r} has {flat.size} tokens, not a multiple of N = {tokens_per_frame}")
        per_frame = flat.reshape(-1, tokens_per_frame)
        shaded = [
            shade_masked(images[t], per_frame[_token_frame(t, num_frames, per_frame.shape[0])], grid)
            for t in range(num_frames)
        ]
        rows.append((strategy, shaded, heatmap is not None and strategy == "stm"))
    width_px, height_px = LABEL_WIDTH_PX + num_frames * cell_px, len(rows) * cell_px
    fig = _figure(width_px, height_px)
    heat = None if heatmap is None else heatmap.float().cpu().numpy().reshape(heatmap.shape[0], *grid)
    for row, (label, row_images, overlay) in enumerate(rows):
        bottom = 1 - (row + 1) / len(rows)
        fig.text(4 / width_px, bottom + 0.5 / len(rows), label, fontsize=9, va="center")
        for t, image in enumerate(row_images):
            ax = fig.add_axes((
                (LABEL_WIDTH_PX + t * cell_px) / width_px, bottom, cell_px / width_px, 1 / len(rows),
            ))
            ax.imshow(image, interpolation="nearest")
            if overlay and heat is not None:
                extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
                ax.imshow(heat[_token_frame(t, num_frames, heat.shape[0])], cmap="jet", alpha=0.45,
                          interpolation="bilinear", extent=extent)
            ax.set_axis_off()
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------------- show-masks

SHOW_MASK_STRATEGIES = ("random", "tube", "attention", "stm")
_TEACHER_STRATEGIES = ("attention", "attention_inverse", "stm")


@dataclass
class MaskPicture:
    """What :func:`mask_picture` computed for one clip.

    frames: uint8 [T, 3, H, W]; masks: strategy -> bool [T' * N] (True = masked); grid: (gh, gw);
    heatmap: float [T', N] temporal map of the predictor (None without teacher/predictor); notes: why strategies
    were left out or changed.
    """

    frames: torch.Tensor
    masks: dict[str, torch.Tensor]
    grid: tuple[int, int]
    heatmap: torch.Tensor | None
    notes: list[str]


def _strategies_with_scores(model, strategies: Sequence[str], notes: list[str]) -> list[str]:
    """Drop the strategies that need the teacher's attention when the model has no trained teacher."""
    if model.teacher is not None and getattr(model, "teacher_loaded", True):
        return list(strategies)
    why = "the model has no teacher" if model.teacher is None else "the checkpoint holds no teacher weights"
    kept = [s for s in strategies if s not in _TEACHER_STRATEGIES]
    for strategy in strategies:
        if strategy in _TEACHER_STRATEGIES:
            notes.append(f"{strategy}: left out, {why} (its mask needs the teacher's attention)")
    return kept


@torch.no_grad()
def mask_picture(model, frames: torch.Tensor, strategies: Sequence[str] = SHOW_MASK_STRATEGIES, seed: int = 0,
                 ratio: float | None = None) -> MaskPicture:
    """Masks of every strategy for one clip, with the same settings (ratio, seed) for all.

    Args:
        model: an STMModel in eval mode.
        frames: uint8 [T, 3, H, W] at the model's input size.
        ratio: masked fraction per frame (default: the model's ``mask.video_ratio``).

    Raises:
        stmvl.errors.UserError (a ValueError): an unknown strategy, or none left to draw (the notes say why).
    """
    from stmvl.models.masking import STRATEGIES, make_mask
    from stmvl.models.stm import merge_tubelets

    from stmvl.errors import UserError

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise UserError(f"unknown mask strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    notes: list[str] = []
    strategies = _strategies_with_scores(model, strategies, notes)
    if not strategies:
        raise UserError("no strategy left to draw: " + "; ".join(notes))
    video = frames.float().div(255.0).unsqueeze(0).to(model.temp.device)  # [1, T, 3, H, W] in [0, 1]
    token_frames, n, gh, gw = model.grid(video)
    spatial = temporal = None
    if any(s in _TEACHER_STRATEGIES for s in strategies):
        scores = merge_tubelets(model.teacher(video), model.vision.tubelet)
        if scores.attn.shape[-1] != n:
            raise ValueError(f"teacher grid has {scores.attn.shape[-1]} tokens per frame, the student {n}")
        spatial = scores.attn
        temporal = _temporal_map(model, scores.tokens, gh, gw, notes)
    cfg = model.cfg.mask
    ratio = cfg.video_ratio if ratio is None else ratio
    lam = model.lam.clamp(0.0, 1.0) if model.lam is not None else cfg.lam_init
    masks = {}
    for strategy in strategies:
        masks[strategy] = make_mask(
            strategy, ratio, 1, token_frames, n, spatial=spatial, temporal=temporal, lam=lam, seed=seed, step=0,
            sample_ids=[0], logits=cfg.logits, tau=cfg.tau, device=video.device,
        )[0].cpu()
    heatmap = None if temporal is None else temporal[0].cpu()
    return MaskPicture(frames.cpu(), masks, (gh, gw), heatmap, notes)


def _temporal_map(model, tokens: torch.Tensor, gh: int, gw: int, notes: list[str]) -> torch.Tensor | None:
    """The predictor's temporal map [1, T', N] (eval: the predicted points without jitter), or None with a note."""
    if model.predictor is None:
        notes.append("stm: the model has no temporal point predictor (not an STM model): spatial scores only, "
                     "no heatmap")
        return None
    if tokens.shape[1] < 2:
        notes.append("stm: a single frame has no temporal map")
        return None
    return model.predictor(tokens, gh, gw).frame_map
