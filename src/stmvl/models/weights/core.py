"""The strict-loading core every importer shares: reading files, key renaming rules, loading with a report.

Everything is strict: every source key is either placed, deliberately ignored (listed with a reason, e.g. BERT's
unused pooler), or reported as unplaced; target keys that stay missing fail the load unless the caller names
their group in ``allow_missing``. Pickle files are read with ``torch.load(weights_only=True)``; stmvl writes
safetensors (``model.safetensors`` + ``config.json``).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from stmvl.errors import UserError

StateDict = dict[str, torch.Tensor]


class WeightLoadError(UserError, RuntimeError):
    """A checkpoint does not fit the model (the message lists the offending keys by group), or a weights or config
    file cannot be read as one (the message names it). The user's file to fix: a UserError, kept a RuntimeError."""


# --------------------------------------------------------------------------------------------------- reading files

_WRAPPERS = ("model", "state_dict", "module")


def _unwrap(obj: object, source: str) -> StateDict:
    """Accept a plain state dict or one wrapped in {"model": ...} / {"state_dict": ...} / {"module": ...}."""
    for wrapper in _WRAPPERS:
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{source}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightLoadError(f"{source}: entries that are not tensors: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return dict(obj)


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a ``torch.jit.save`` archive (a zip holding ``<name>/code/``), e.g. OpenAI's CLIP ``.pt`` files.

    ``torch.save`` zips hold ``data.pkl`` and tensor records but never a ``code/`` folder, so the test is exact.
    """
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_pickle_object(path: str | Path) -> object:
    """The object of a pickle checkpoint, read with ``weights_only=True`` (tensors, dicts, numbers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_torchscript_archive(path):
        raise WeightLoadError(f"{path}: a TorchScript archive (code, not only tensors) is not read here; only a CLIP "
                              "teacher's weights may be one (model.teacher.weights)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        # e.g. a training checkpoint that also pickles its argparse / EasyDict settings
        hint = (" (if it also pickles objects such as training arguments, save its tensors alone, e.g. "
                "torch.save(ckpt['model'], 'weights.pth'), in an environment you trust)")
        raise WeightLoadError(f"{path}: cannot be read as a weights-only torch checkpoint{hint}: {error}") from error


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a ``.safetensors`` file or a pickle checkpoint (``weights_only=True``), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from stmvl.errors import CorruptWeightsError

        try:
            return load_file(str(path))
        except SafetensorError as exc:  # truncated or not safetensors at all: the user's file to replace
            raise CorruptWeightsError(f"{path}: not a readable safetensors file ({exc}); re-export or re-download "
                                      "it") from None
    return _unwrap(read_pickle_object(path), str(path))


def _folder_weights(folder: Path, names: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> StateDict:
    for name in names:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise FileNotFoundError(f"{folder}: none of {', '.join(names)} (sharded checkpoints unsupported)")


MAX_JSON_BYTES = 64 * 2**20  # a model's config.json is a few KiB; a bigger one is not a config


def _read_json(path: Path) -> dict:
    """A JSON object file; anything else (missing, huge, not UTF-8, malformed, nested without end, not an
    object) is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise WeightLoadError(f"{path}: {path.stat().st_size} bytes, too large for a config file "
                              f"(at most {MAX_JSON_BYTES} bytes)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise WeightLoadError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise WeightLoadError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: "
                              f"{error.msg})") from None
    except RecursionError:
        raise WeightLoadError(f"{path}: JSON nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise WeightLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------- strict loading


def _group(key: str) -> str:
    return key.split(".", 1)[0]


def _grouped(keys: Iterable) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for item in keys:
        out[_group(item[0] if isinstance(item, tuple) else item)].append(item)
    return dict(out)


def _has_prefix(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in prefixes)


@dataclass
class LoadReport:
    """Outcome of a strict load. Keys are grouped by their top-level prefix (``vision``, ``text``, ...).

    missing: target keys with no source value; unexpected: source keys the target lacks; mismatched:
    ``(key, target_shape, source_shape)``; ignored: source keys dropped on purpose, with the reason.
    """

    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    mismatched: dict[str, list[tuple[str, tuple, tuple]]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    allowed_missing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.mismatched or self._disallowed_missing())

    def _disallowed_missing(self) -> list[str]:
        return [k for keys in self.missing.values() for k in keys if not _has_prefix(k, self.allowed_missing)]

    def summary(self) -> str:
        """One line per problem group, plus the deliberately ignored keys."""
        lines = []
        for title, groups in (("missing", self.missing), ("unexpected", self.unexpected)):
            for group, keys in sorted(groups.items()):
                lines.append(f"{title} [{group}] ({len(keys)}): {_shorten(keys)}")
        for group, items in sorted(self.mismatched.items()):
            shown = [f"{k} (model {list(a)} vs checkpoint {list(b)})" for k, a, b in items]
            lines.append(f"mismatched [{group}] ({len(items)}): {_shorten(shown)}")
        if self.ignored:
            lines.append(f"ignored ({len(self.ignored)}): " + _shorten([f"{k} ({why})" for k, why in self.ignored.items()]))
        return "\n".join(lines) if lines else "all keys matched"


def _shorten(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f" ... (+{len(items) - limit})" if len(items) > limit else "")


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    allow_missing: Iterable[str] = (),
    ignored: Mapping[str, str] | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``module``; raise :class:`WeightLoadError` listing keys by group unless the only
    problems are missing keys under the ``allow_missing`` prefixes (e.g. ``("teacher", "text.layers.9.cross_attn")``).
    """
    allow_missing = tuple(allow_missing)
    target = module.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [
        (k, tuple(target[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in target and tuple(target[k].shape) != tuple(v.shape)
    ]
    report = LoadReport(_grouped(missing), _grouped(unexpected), _grouped(mismatched), dict(ignored or {}), allow_missing)
    if not report.ok:
        raise WeightLoadError(f"cannot load weights into {type(module).__name__}:\n{report.summary()}")
    usable = {k: v for k, v in state_dict.items() if k in target}
    # every difference was reported and allowed above; torch's strict mode cannot express "these groups may miss"
    result = module.load_state_dict(usable, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(missing)
    return report


# --------------------------------------------------------------------------------------------------- key renaming

Transform = Callable[[torch.Tensor], torch.Tensor]


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


@dataclass(frozen=True)
class _Rule:
    """Rename ``src`` -> ``dst`` (``{i}`` = a layer index; a trailing ``.weight``/``.bias``/... is carried)."""

    src: str
    dst: str
    transform: Transform | None = None
    inverse: Transform | None = None

    def pattern(self, text: str) -> re.Pattern:
        head, _, tail = text.partition("{i}")
        core = re.escape(head) + (r"(?P<i>\d+)" + re.escape(tail) if "{i}" in text else "")
        return re.compile("^" + core + r"(?P<rest>\.[A-Za-z_]+)?$")


class _Renamer:
    """Ordered rename rules usable in both directions."""

    def __init__(self, rules: list[_Rule]) -> None:
        self.rules = rules
        self._forward = [(r.pattern(r.src), r.dst, r.transform) for r in rules]
        self._backward = [(r.pattern(r.dst), r.src, r.inverse) for r in rules]

    @staticmethod
    def _apply(table, key: str) -> tuple[str, Transform | None] | None:
        for pattern, template, transform in table:
            match = pattern.match(key)
            if match:
                name = template.replace("{i}", match.group("i")) if "{i}" in template else template
                return name + (match.group("rest") or ""), transform
        return None

    def forward(self, key: str):
        return self._apply(self._forward, key)

    def backward(self, key: str):
        return self._apply(self._backward, key)


def _rename_all(sd: Mapping[str, torch.Tensor], renamer: _Renamer, prefix_in: str, prefix_out: str, backward=False):
    """Rename every key under ``prefix_in``; returns (renamed, keys that matched no rule)."""
    out, unplaced = {}, []
    for key, value in sd.items():
        if not key.startswith(prefix_in):
            continue
        hit = (renamer.backward if backward else renamer.forward)(key[len(prefix_in):])
        if hit is None:
            unplaced.append(key)
            continue
        name, transform = hit
        out[prefix_out + name] = transform(value) if transform else value
    return out, unplaced


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count_indices(keys: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise WeightLoadError(f"layer indices are not contiguous: {sorted(found)}")
    return len(found)
