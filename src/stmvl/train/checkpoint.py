"""Checkpoints: safetensors weights + a torch state file, written atomically, keep-last-N, find the latest.

Layout of a run folder:

    run_dir/checkpoints/step_00001200/model.safetensors   weights (tied tensors stored once, aliases in metadata)
    run_dir/checkpoints/step_00001200/state.pt            optimizer, schedule, scaler, RNG, data position, step

A checkpoint folder is first written as `.tmp-step_...` and renamed into place with os.replace, so a folder named
`step_*` is always complete; a kill during a save leaves only a temp folder that the next save removes.
The state file holds only tensors and plain Python values and is read with `torch.load(weights_only=True)`.
A checkpoint that does not load (a disk filled up, a file truncated by a copy) raises CorruptCheckpointError naming
the file; `set_aside` renames such a folder to `unreadable-step_...`, which no listing or pruning touches.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from safetensors.torch import save_file

from stmvl.errors import CorruptWeightsError, UserError

__all__ = [
    "MODEL_FILE",
    "CorruptWeightsError",
    "CorruptCheckpointError",
    "STATE_FILE",
    "save_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_train_state",
    "save_weights",
    "load_weights",
    "atomic_torch_save",
    "set_aside",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_ALIASES_KEY = "stmvl_aliases"
UNREADABLE_PREFIX = "unreadable-"

# What torch.load raises on a truncated or overwritten file: the zip reader's RuntimeError, an unpickling error,
# EOFError on an empty file, and the weights-only unpickler's refusals of foreign content.
_STATE_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError)


class CorruptCheckpointError(UserError):
    """A checkpoint's state file does not load (truncated, overwritten, another format); the message names it."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory: store each tied tensor once and remember its aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model state {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and ident in owners:
            aliases[name] = owners[ident]
            continue
        storage = t.untyped_storage().data_ptr()
        # a view into storage another tensor already uses (but not the same view) must be copied out
        t = t.clone() if (storage in storages and t.numel() > 0) or not t.is_contiguous() else t
        owners[ident] = name
        storages.add(storage)
        tensors[name] = t
    return tensors, aliases


def save_weights(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict as safetensors, atomically (temp file + os.replace)."""
    path = Path(path)
    tensors, aliases = _dedupe_shared(state)
    meta = dict(metadata or {})
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata=meta or None)
    _fsync_file(tmp)
    os.replace(tmp, path)


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file written by `save_weights`, restoring tied tensors as shared."""
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
            meta = fh.metadata() or {}
    except SafetensorError as exc:  # a truncated or foreign file: the user's to fix, not a crash
        raise CorruptWeightsError(f"{path}: not a readable safetensors file ({exc}); re-export or re-download "
                                  "it") from None
    for alias, owner in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        out[alias] = out[owner]
    return out


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file and os.replace, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(obj, tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)


def _checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = _checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / MODEL_FILE).is_file() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    keep_last: int = 2,
    protect: tuple[str, ...] = (),
) -> Path:
    """Write `run_dir/checkpoints/step_<step>/` atomically and delete all but the newest `keep_last` checkpoints
    (folders named in `protect`, e.g. the best one, are kept). Returns the checkpoint folder."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = _checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model_state, tmp / MODEL_FILE, metadata={"step": str(step)})
    atomic_torch_save(train_state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep_last, protect, step)
    return final


def _prune(root: Path, keep_last: int, protect: tuple[str, ...], newest_step: int) -> None:
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Only checkpoints up to the one just written count: a folder with a later step cannot belong to this run's
    # history, and must never push the run's own checkpoints out of the keep-last-N window.
    complete = [item for item in list_checkpoints(root.parent) if item[0] <= newest_step]
    for _, folder in complete[:-keep_last]:
        if folder.name not in protect:
            shutil.rmtree(folder)


def set_aside(folder: str | os.PathLike) -> Path:
    """Rename a checkpoint folder that does not load to `unreadable-<name>` (kept for inspection, never listed as a
    checkpoint nor pruned). Returns the new path."""
    folder = Path(folder)
    target = folder.with_name(UNREADABLE_PREFIX + folder.name)
    suffix = 1
    while target.exists():
        target = folder.with_name(f"{UNREADABLE_PREFIX}{folder.name}.{suffix}")
        suffix += 1
    os.replace(folder, target)
    return target


def _one_line(error: BaseException) -> str:
    """The error's type and first sentence on one line (torch's loader messages run to paragraphs)."""
    text = " ".join(str(error).split()).split(". ")[0][:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_train_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state file (weights_only); CorruptCheckpointError naming it when it does not load."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except _STATE_LOAD_ERRORS as exc:
        raise CorruptCheckpointError(f"{path}: not a readable checkpoint state ({_one_line(exc)})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint state dict")
    return state


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model_state, train_state) of a checkpoint folder, or of the latest checkpoint when given a run folder."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint folder ({MODEL_FILE} + {STATE_FILE}) nor a run "
                                    "folder with complete checkpoints under checkpoints/")
        path = latest
    model_state = load_weights(path / MODEL_FILE, device=map_location)
    state_file = path / STATE_FILE
    train_state = load_train_state(state_file, map_location) if state_file.is_file() else {}
    return model_state, train_state
