"""Checks made before step 1: every path a recipe names exists (so a missing evaluation annotation is not found
after an epoch of training), listed all at once."""

from __future__ import annotations

from pathlib import Path

from stmvl.config import RunConfig
from stmvl.data.stream import is_single_local_path


def _under(path: str, root: str | None) -> bool:
    if not root:
        return False
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def named_paths(cfg: RunConfig, needs_teacher: bool = True) -> list[tuple[str, str]]:
    """(config key, path) for every file or folder the run will read."""
    out: list[tuple[str, str]] = []
    for section, corpora in (("data.corpora", cfg.data.corpora), ("eval.corpora", cfg.eval.corpora)):
        for i, c in enumerate(corpora):
            if c.shards and is_single_local_path(c.shards):
                out.append((f"{section}.{i}.shards ({c.name})", c.shards))
            if c.annotation:
                out.append((f"{section}.{i}.annotation ({c.name})", c.annotation))
            if c.media_root and not c.shards:
                out.append((f"{section}.{i}.media_root ({c.name})", c.media_root))
    m = cfg.model
    if needs_teacher and m.teacher.weights:
        out.append(("model.teacher.weights", m.teacher.weights))
    if m.text.weights and m.text.weights != "minilm":
        out.append(("model.text.weights", m.text.weights))
    if m.text.vocab:
        out.append(("model.text.vocab", m.text.vocab))
    student_init = getattr(m.vision, "init", None)
    if student_init:
        out.append(("model.vision.init", student_init))
    if cfg.runtime.init_from:
        out.append(("runtime.init_from", cfg.runtime.init_from))
    return out


def missing_paths(cfg: RunConfig, needs_teacher: bool = True) -> list[tuple[str, str]]:
    """The named paths that do not exist. Paths inside an enabled synthetic corpus are written at set-up, so they
    count as present."""
    synthetic = cfg.data.synthetic.dir if cfg.data.synthetic.enabled else None
    return [(key, path) for key, path in named_paths(cfg, needs_teacher)
            if not _under(path, synthetic) and not Path(path).exists()]


def describe_missing(missing: list[tuple[str, str]], prefix: str = "") -> str:
    """One line naming every missing path and its config key."""
    listed = "; ".join(f"{key}: {path}" for key, path in missing)
    return (f"{prefix}{len(missing)} path(s) named by the recipe do not exist: {listed} (fix them in the recipe or "
            "with overrides, e.g. paths.data=/your/data paths.models=/your/weights)")
