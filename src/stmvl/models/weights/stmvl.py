"""stmvl's own model folders: ``model.safetensors`` + ``config.json`` ({stmvl_config_type, config, kwargs, ...})."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from stmvl.config import ConfigError, from_dict, validate_model
from stmvl.models.config import ModelConfig, TeacherConfig, TextConfig, VisionConfig
from stmvl.models.weights.core import WeightLoadError, _read_json, load_state_dict_strict, read_state_dict

def _build_kwargs(module: nn.Module) -> dict:
    from stmvl.models.text import BertEncoder

    return {"cross_width": module.cross_width} if isinstance(module, BertEncoder) else {}


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors as safetensors (contiguous CPU copies, so shared storage is never a problem)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    _atomic_write(Path(path), lambda p: save_file(tensors, p))


def save_model(module: nn.Module, cfg, directory: str | Path, extra: Mapping | None = None) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/config.json`` ({config_type, config, kwargs})."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"cfg must be a config dataclass, got {type(cfg).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(module.state_dict(), directory / "model.safetensors")
    cfg, initialised_from = _without_student_init(cfg)
    cfg = _with_built_teacher(module, cfg)
    if initialised_from:
        extra = {"initialised_from": initialised_from, **(dict(extra) if extra else {})}
    meta = {"stmvl_config_type": type(cfg).__name__, "config": dataclasses.asdict(cfg),
            "kwargs": _build_kwargs(module), **(dict(extra) if extra else {})}
    text = json.dumps(meta, indent=2)
    _atomic_write(directory / "config.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    return directory


def _without_student_init(cfg):
    """``(cfg with vision.init and vision.warm_start cleared, what was cleared or None)``: the saved tensors already
    hold the student, so rebuilding the folder's model must not read (and need) what it was first initialised
    from."""
    vision = cfg.vision if isinstance(cfg, ModelConfig) else cfg if isinstance(cfg, VisionConfig) else None
    if vision is None or (not vision.init and vision.warm_start == "none"):
        return cfg, None
    # a warm start from the teacher is an initialisation too: rebuilding must not need the teacher's weights
    source = vision.init or f"{vision.warm_start} (model.vision.warm_start)"
    cleared = dataclasses.replace(vision, init=None, warm_start="none")
    return (dataclasses.replace(cfg, vision=cleared) if isinstance(cfg, ModelConfig) else cleared), source


def _with_built_teacher(module: nn.Module, cfg):
    """The config with the teacher as built: a teacher loaded from weights takes its sizes from the file (an
    ActionCLIP fusion's depth and frame table, MLP width, ...), which the recipe's teacher section need not spell
    out; the folder must describe the tensors it holds."""
    teacher = getattr(module, "teacher", None)
    if isinstance(cfg, ModelConfig) and teacher is not None and isinstance(getattr(teacher, "cfg", None), TeacherConfig):
        return dataclasses.replace(cfg, teacher=teacher.cfg)
    return cfg


def _is_stmvl_dir(directory: Path) -> bool:
    path = directory / "config.json"
    return path.is_file() and "stmvl_config_type" in _read_json(path)


class FolderConfigError(ConfigError, WeightLoadError):
    """The config.json of a weights folder is invalid: a ConfigError (it names the file and key) that is also a
    WeightLoadError (the folder cannot be loaded), for callers that catch either."""


def config_from_dict(cls, data: Mapping, where: str = "config"):
    """Rebuild a config dataclass from the ``config`` mapping of a folder's config.json, with the typed validation
    recipes get (stmvl.config.from_dict: unknown keys, types, choices, ranges, upper bounds on sizes) and, for a
    ModelConfig, the cross-field rules and the parameter budget; all before anything is allocated.

    Raises:
        stmvl.config.ConfigError (also a WeightLoadError): one line naming ``where`` (the file) and the key, e.g.
            ``m/config.json: config.vision.width: 1000000 is outside the allowed range [1, 8192]``.
    """
    try:
        cfg = from_dict(cls, data, "config")
        if isinstance(cfg, ModelConfig):
            validate_model(cfg, "config")
    except ConfigError as error:
        raise FolderConfigError(f"{where}: {error}") from None
    return cfg


# Constructor arguments a folder's "kwargs" may pass, per module: the text tower's cross-attention width is the only
# one, and it is a size like any other (the same bound as config widths).
_BUILD_KWARGS = {"TextConfig": {"cross_width"}}
_MAX_CROSS_WIDTH = 8192


def _checked_kwargs(config_type: str, kwargs, where: str) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise FolderConfigError(f"{where}: kwargs must be a mapping, got {type(kwargs).__name__}")
    allowed = _BUILD_KWARGS.get(config_type, set())
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise FolderConfigError(f"{where}: unknown kwargs {unknown} for a {config_type} "
                                f"(allowed: {sorted(allowed)})")
    width = kwargs.get("cross_width")
    if width is not None and (type(width) is not int or not 1 <= width <= _MAX_CROSS_WIDTH):
        raise FolderConfigError(f"{where}: kwargs.cross_width must be null or an integer in "
                                f"[1, {_MAX_CROSS_WIDTH}], got {width!r}")
    return dict(kwargs)


def _builder(config_type: str):
    from stmvl.models.teacher import CLIPTeacher
    from stmvl.models.text import BertEncoder
    from stmvl.models.vit import VideoViT

    builders = {"VisionConfig": (VisionConfig, VideoViT), "TeacherConfig": (TeacherConfig, CLIPTeacher),
                "TextConfig": (TextConfig, BertEncoder)}
    if config_type == "ModelConfig":
        from stmvl.models.stm import STMModel

        return ModelConfig, STMModel
    if config_type not in builders:
        raise WeightLoadError(f"unknown stmvl_config_type {config_type!r}")
    return builders[config_type]


def load_model_dir(directory: str | Path, allow_missing: Iterable[str] = ()) -> nn.Module:
    """Rebuild the module saved by :func:`save_model` and load its weights strictly."""
    directory = Path(directory)
    meta = _read_json(directory / "config.json")
    if "stmvl_config_type" not in meta:
        raise WeightLoadError(f"{directory / 'config.json'} was not written by stmvl (no 'stmvl_config_type')")
    where = str(directory / "config.json")
    cfg_cls, module_cls = _builder(meta["stmvl_config_type"])
    cfg = config_from_dict(cfg_cls, meta.get("config"), where)
    module = module_cls(cfg, **_checked_kwargs(meta["stmvl_config_type"], meta.get("kwargs"), where))
    module.load_report = load_state_dict_strict(module, read_state_dict(directory / "model.safetensors"), allow_missing)
    return module

