"""Typed run configuration: schema, YAML recipes with `extends:`, dotted overrides, interpolation, validation.

A run is described by a `RunConfig` (task, model, data, optim, eval, runtime, paths). Recipes are YAML files that
mirror the dataclasses key for key. They are resolved in this order:

1. `extends:` (a string or a list) names parent recipes: a path relative to the extending file, or a packaged recipe
   name such as `pretrain/_base`. Parents are deep-merged in order, then the file itself on top (mappings merge key by
   key, lists and scalars replace).
2. Command-line overrides `key.sub=value` are applied on top; the value is parsed with `yaml.safe_load` (so `2e-5`,
   `true`, `[1, 2]` and `null` work) and never evaluated as code. List items are addressed by index:
   `data.corpora.0.weight=2`.
3. `${a.b}` inside a string is replaced by the (string form of the) config value at `a.b`; `${env:NAME}` by the
   environment variable NAME. This is the path convention of the packaged recipes: every dataset path is written as
   `${paths.data}/...` and every weight file as `${paths.models}/...`, so a user points a recipe at their storage
   with `paths.data=/datasets paths.models=/checkpoints` (and `stmvl check-data` validates the resolved paths).
4. The merged mapping is converted to dataclasses by `from_dict`, which rejects unknown keys (naming the dotted key,
   the allowed keys and the closest match), wrong types (naming the key, the expected type and the value) and values
   outside a field's declared choices or range.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from stmvl.errors import UserError
from stmvl.models.config import (
    MAX_PARAMETERS,
    LossConfig,
    MaskConfig,
    ModelConfig,
    PredictorConfig,
    TeacherConfig,
    TextConfig,
    VisionConfig,
    estimated_parameters,
)

__all__ = [
    "ConfigError",
    "CorpusConfig",
    "SyntheticConfig",
    "DataConfig",
    "OptimConfig",
    "EvalConfig",
    "RuntimeConfig",
    "PathsConfig",
    "FinetuneConfig",
    "RunConfig",
    "TASKS",
    "from_dict",
    "config_to_dict",
    "load_config",
    "load_recipe_dict",
    "apply_overrides",
    "save_config",
    "recipe_dir",
    "list_recipes",
    "validate",
    "validate_model",
]

TASKS = (
    "pretrain",
    "train_teacher",
    "finetune_retrieval",
    "finetune_qa",
    "finetune_mc",
    "zeroshot_retrieval",
)


class ConfigError(UserError):
    """A recipe, override or config value is invalid; the message names the offending key (a ValueError)."""


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": tuple(values)}


def _range(lo: float | None, hi: float | None, *, open_lo: bool = False, open_hi: bool = False) -> dict[str, Any]:
    """Allowed numeric range; bounds are inclusive unless open (e.g. a mask ratio must stay below 1)."""
    return {"range": (lo, hi), "open": (open_lo, open_hi)}


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CorpusConfig:
    """One annotation file and its media (README.md, Recipes). Relative paths are relative to the working directory; the
    packaged recipes write them as `${paths.data}/...`."""

    name: str = ""
    annotation: str = ""  # JSON list or JSONL of records
    media_root: str = ""  # folder the records' `video` / `image` paths are relative to
    media_type: str = field(default="video", metadata=_choices("video", "image"))
    kind: str = field(default="pretrain", metadata=_choices("pretrain", "retrieval", "probe", "qa", "mc"))
    weight: float = field(default=1.0, metadata=_range(0.0, None, open_lo=True))  # sampling weight within its media type
    caption_mode: str = field(default="multi", metadata=_choices("single", "multi", "paragraph"))  # list captions: first | expand | join
    shards: str | None = None  # webdataset shard pattern used instead of annotation + media_root
    answer_list: str | None = None  # QA: JSON list of candidate answers


@dataclass
class SyntheticConfig:
    """The embedded synthetic temporal corpus (docs/synthetic_corpus.md), generated on demand when `enabled`."""

    enabled: bool = False
    dir: str = "${paths.data}/synthetic"
    num_train: int = field(default=6000, metadata=_range(1, None))
    num_images: int = field(default=2000, metadata=_range(0, None))
    num_test: int = field(default=500, metadata=_range(1, None))
    num_probe: int = field(default=500, metadata=_range(1, None))
    frames: int = field(default=16, metadata=_range(2, None))
    size: int = field(default=64, metadata=_range(16, None))
    seed: int = 0


@dataclass
class DataConfig:
    """Training data: corpora, frame sampling, transforms and loader settings."""

    corpora: list[CorpusConfig] = field(default_factory=list)
    num_frames: int = field(default=4, metadata=_range(1, None))
    img_size: int = field(default=224, metadata=_range(8, None))
    sampling: str = field(default="rand", metadata=_choices("rand", "middle", "fps"))
    fps: float | None = None  # only for sampling: fps
    flip: bool = True  # off for corpora whose captions say "left"/"right" (the synthetic one)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    video_batch_size: int = field(default=32, metadata=_range(1, None))  # per rank
    image_batch_size: int = field(default=128, metadata=_range(1, None))  # per rank
    num_workers: int = field(default=4, metadata=_range(0, None))
    decoder: str = field(default="pyav", metadata=_choices("pyav", "decord"))
    # decoding threads per clip (0: the decoder's choice, about one per core); each loader worker holds a core
    decode_threads: int = field(default=1, metadata=_range(0, None))
    # training clips kept decoded in each loader worker's memory (MiB, 0 = off; pyav): for small corpora read for
    # many epochs, whose files then decode once (docs/data.md)
    decoded_cache_mib: int = field(default=0, metadata=_range(0, None))
    # processes that decode the training clips into that cache before the first step (0 = off: the first epoch
    # decodes each clip as it reads it, in the loader's process)
    decoded_cache_prefill: int = field(default=0, metadata=_range(0, None))
    max_bad_fraction: float = field(default=0.01, metadata=_range(0.0, 1.0))  # stop when more media fail
    # media over these caps are quarantined (reason too_large) before their pixels are allocated (docs/data.md)
    max_image_pixels: int = field(default=8192 * 8192, metadata=_range(1, None))  # width x height of an image
    max_video_pixels: int = field(default=7680 * 4320, metadata=_range(1, None))  # width x height of a frame
    max_video_seconds: float = field(default=6 * 3600.0, metadata=_range(0.0, None, open_lo=True))
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    """AdamW, cosine schedule with linear warmup and a floor, mixed precision and step guards (docs/internals.md)."""

    lr: float = field(default=1e-4, metadata=_range(0.0, None))
    weight_decay: float = field(default=0.02, metadata=_range(0.0, None))
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata=_range(0.0, 1.0, open_lo=True))
    epochs: int | None = field(default=10, metadata=_range(1, None))
    max_steps: int | None = field(default=None, metadata=_range(1, None))  # optimizer steps; wins over epochs
    warmup_epochs: float = field(default=1.0, metadata=_range(0.0, None))
    warmup_steps: int | None = field(default=None, metadata=_range(0, None))  # wins over warmup_epochs
    schedule: str = field(default="cosine", metadata=_choices("cosine", "constant"))
    min_lr_ratio: float = field(default=0.01, metadata=_range(0.0, 1.0))
    grad_accum: int = field(default=1, metadata=_range(1, None))
    clip_grad: float | None = field(default=None, metadata=_range(0.0, None))  # max global grad norm; None = off
    precision: str = field(default="auto", metadata=_choices("auto", "bf16", "fp16", "fp32"))  # train/precision.py
    max_nonfinite_steps: int = field(default=20, metadata=_range(0, None))  # skipped steps before giving up
    # fp16: optimizer steps in a row the grad scaler may skip (non-finite gradients) before the run stops; the
    # scale halves on each, so 30 in a row means the gradients are non-finite at any scale
    max_consecutive_skips: int = field(default=30, metadata=_range(1, None))
    no_decay_names: list[str] = field(default_factory=lambda: ["temp", "pos"])  # name components without decay


@dataclass
class EvalConfig:
    """Evaluation protocol (README.md, Evaluation protocol) and the corpora it runs on."""

    corpora: list[CorpusConfig] = field(default_factory=list)  # kind: retrieval | probe | qa | mc
    num_frames: int = field(default=4, metadata=_range(1, None))
    sampling: str = field(default="middle", metadata=_choices("middle", "rand", "fps"))
    img_size: int | None = None  # None = data.img_size
    text_max_length: int = field(default=32, metadata=_range(4, None))
    k_test: int = field(default=128, metadata=_range(1, None))  # ITM re-ranks this many ITC candidates per query
    # which evaluations of a run also score with the VTM head (retrieval re-ranking, the probe's ITM accuracy): every
    # one, only the run's final one (intermediate learning-curve points report ITC alone, at 0.38x the cost on the
    # demo corpus), or never. Multiple choice always uses both scores; `stmvl evaluate` counts as a final evaluation
    itm: str = field(default="every", metadata=_choices("every", "final", "never"))
    batch_size: int = field(default=32, metadata=_range(1, None))
    num_workers: int = field(default=2, metadata=_range(0, None))
    every_epochs: int = field(default=1, metadata=_range(0, None))  # 0 = only at the end
    best_key: str | None = None  # metric whose maximum marks the best checkpoint, e.g. "ret/itm/t2v_r1"
    qa_topk: int = field(default=128, metadata=_range(1, None))
    shuffled_frames_control: bool = False  # also evaluate with shuffled frames (the probe must fall to chance)


@dataclass
class RuntimeConfig:
    """Where and how the run executes."""

    out_dir: str = "runs/default"
    seed: int = 42
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    threads: int | None = field(default=None, metadata=_range(1, None))  # torch intra-op threads; None = torch's
    log_every: int = field(default=20, metadata=_range(1, None))
    ckpt_every_steps: int = field(default=0, metadata=_range(0, None))  # 0 = at the end of every epoch only
    keep_last: int = field(default=2, metadata=_range(1, None))
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the checkpoints and metrics of another run in out_dir
    init_from: str | None = None  # checkpoint folder whose weights initialise the model (finetune / evaluate)
    compile: bool = False
    grad_checkpointing: bool = False
    backend: str = field(default="auto", metadata=_choices("auto", "gloo", "nccl"))
    # seconds a collective may wait for the other ranks before this rank fails (a hung or dead rank ends the job)
    dist_timeout_s: float = field(default=900.0, metadata=_range(1.0, None))
    find_unused_parameters: bool = False
    # DDP gradient all-reduce in a 16-bit format (halves inter-node traffic; the optimizer still sees fp32 grads)
    grad_compression: str = field(default="none", metadata=_choices("none", "bf16", "fp16"))
    count_flops: bool = True  # count each step kind's FLOPs once; log clips_per_s, tflops_per_s and mfu
    tensorboard: bool = True
    progress: bool = True


@dataclass
class PathsConfig:
    """Roots the packaged recipes interpolate (`${paths.data}`, `${paths.models}`); override them per machine."""

    data: str = "data"
    models: str = "models"


@dataclass
class FinetuneConfig:
    """Downstream finetuning (`stmvl finetune RECIPE --checkpoint DIR`): where the pretrained weights come from and
    the VideoQA answer decoder's settings. The architecture is the checkpoint's; finetune recipes set only
    `model.loss` (VTC + VTM; MLM and MVM must be 0)."""

    checkpoint: str | None = None  # model folder (model.safetensors + config.json) or a run folder with model/
    answer_max_length: int = field(default=10, metadata=_range(3, None))  # QA answer tokens incl. [CLS] / [SEP]


@dataclass
class RunConfig:
    """Everything a command needs to run: a recipe after `extends:`, overrides and interpolation."""

    task: str = field(default="pretrain", metadata={"choices": TASKS})
    description: str = ""
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# Upper bounds of model sizes: far above every published video-language model (ViT-g is 1408 wide and 40 deep,
# BERT-large 1024 x 24), low enough that no single size can ask for an absurd allocation.
_MAX_WIDTH = 8192
_MAX_LAYERS = 256
_MAX_HEADS = 256
_MAX_IMG_SIZE = 4096
_MAX_PATCH = 1024
_MAX_FRAMES = 4096
_MAX_VOCAB = 1_000_000
_MAX_POSITIONS = 65536

# Choices and ranges of the model dataclasses (owned by stmvl.models.config) are declared here, next to the rest of
# the validation rules, so that the model files stay plain data.
_EXTERNAL_METADATA: dict[type, dict[str, dict[str, Any]]] = {
    # Sizes have upper bounds too: a recipe or a model folder's config.json asking for a width of 10^6 is refused
    # by name before anything is allocated (MAX_PARAMETERS bounds their product, see validate_model).
    ModelConfig: {
        "preset": _choices("stm", "umt"),
        "pass2_tokens": _choices("masked", "visible", "all"),
        "decoder": _choices("st", "linear"),
        "mvm_tokens": _choices("all", "visible"),
        "embed_dim": _range(1, _MAX_WIDTH),
        "temp_init": _range(0.0, None),
    },
    VisionConfig: {
        "size": _choices("tiny", "demo", "b16", "l16", "custom"),  # custom: converted with other sizes
        "stem": _choices("rgb", "diff", "tubelet2"),
        "warm_start": _choices("none", "teacher"),
        "pos_embed": _choices("1d", "3d", "learned"),
        "max_frames": _range(1, _MAX_FRAMES),
        "lr_scale": _range(0.0, None),
        "drop_path": _range(0.0, 1.0),
        "img_size": _range(1, _MAX_IMG_SIZE),
        "patch_size": _range(1, _MAX_PATCH),
        "width": _range(1, _MAX_WIDTH),
        "depth": _range(1, _MAX_LAYERS),
        "heads": _range(1, _MAX_HEADS),
        "mlp_ratio": _range(0.0, 16.0, open_lo=True),
        "norm_eps": _range(0.0, 1.0, open_lo=True),
    },
    TeacherConfig: {
        "input_norm": _choices("clip", "imagenet", "none"),
        "act": _choices("quick_gelu", "gelu"),
        "img_size": _range(1, _MAX_IMG_SIZE),
        "patch_size": _range(1, _MAX_PATCH),
        "width": _range(1, _MAX_WIDTH),
        "layers": _range(1, _MAX_LAYERS),
        "heads": _range(1, _MAX_HEADS),
        "embed_dim": _range(1, _MAX_WIDTH),
        "return_layers": _range(1, _MAX_LAYERS),
        "temporal_fusion_layers": _range(0, _MAX_LAYERS),
        "max_frames": _range(1, _MAX_FRAMES),
        "mlp_width": _range(1, 16 * _MAX_WIDTH),
        "norm_eps": _range(0.0, 1.0, open_lo=True),
        "temporal_fusion_norm_eps": _range(0.0, 1.0, open_lo=True),
    },
    TextConfig: {
        "vocab_size": _range(1, _MAX_VOCAB),
        "hidden": _range(1, _MAX_WIDTH),
        "layers": _range(1, _MAX_LAYERS),
        "heads": _range(1, _MAX_HEADS),
        "intermediate": _range(1, 16 * _MAX_WIDTH),
        "max_position": _range(1, _MAX_POSITIONS),
        "type_vocab": _range(1, 1024),
        "layer_norm_eps": _range(0.0, 1.0, open_lo=True),
        "fusion_start": _range(0, _MAX_LAYERS),
        "max_length": _range(4, _MAX_POSITIONS),
        "dropout": _range(0.0, 1.0, open_hi=True),
        "freeze_below": _range(0, _MAX_LAYERS),
        "pooling": _choices("cls", "mean"),
    },
    MaskConfig: {
        "video_strategy": _choices("random", "tube", "attention", "attention_inverse", "stm"),
        "image_strategy": _choices("random", "attention", "attention_inverse"),
        "logits": _choices("log", "reference"),
        "video_ratio": _range(0.0, 1.0, open_hi=True),  # at least one token per frame must stay visible
        "image_ratio": _range(0.0, 1.0, open_hi=True),
        "tau": _range(0.0, None),
    },
    PredictorConfig: {
        "dim": _range(1, _MAX_WIDTH),
        "hidden": _range(1, _MAX_WIDTH),
        "head_hidden": _range(1, _MAX_WIDTH),
        "jitter_halve_at": _range(0.0, 1.0),
    },
    LossConfig: {
        "vtc": _range(0.0, None),
        "vtm": _range(0.0, None),
        "mlm": _range(0.0, None),
        "mvm": _range(0.0, None),
        "mlm_prob": _range(0.0, 1.0),
        "fusion_samples": _range(0, None),
        "temporal_pair_weight": _range(0.0, None),
    },
}


# ----------------------------------------------------------------------------------------------------------------
# dict -> dataclass with validation
# ----------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _field_metadata(cls: type, f: dataclasses.Field) -> Mapping[str, Any]:
    return f.metadata or _EXTERNAL_METADATA.get(cls, {}).get(f.name, {})


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursively; `path` is the dotted prefix used in error messages.

    Missing keys take the dataclass defaults. Raises ConfigError for unknown keys, wrong types, values outside the
    declared `choices` and numbers outside the declared `range` (field metadata, or the table for model configs).
    """
    where = path or "<config>"
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        allowed = sorted(fields)
        raise ConfigError(
            f"unknown key {_join(path, key)!r}{_suggest(key, allowed)}; "
            f"allowed keys under {where}: {', '.join(allowed)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = _join(path, name)
        converted = _convert(hints[name], value, key)
        _check_metadata(_field_metadata(cls, fields[name]), converted, key)
        kwargs[name] = converted
    return cls(**kwargs)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, args, value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is tuple:
        return _convert_tuple(tp, args, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        return [_convert(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        return {_convert(args[0], k, key): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(tp, value, key)


def _convert_union(tp: Any, args: tuple, value: Any, key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _type_error(key, tp, value)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, key)
        except ConfigError:
            continue
    raise _type_error(key, tp, value)


def _convert_tuple(tp: Any, args: tuple, value: Any, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, tp, value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{key}.{i}") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {len(value)}: {value!r}")
    return tuple(_convert(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    # bool is an int subclass: never let `true` pass as a number or 1 as a flag.
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, tp, value)
        if isinstance(value, int):
            return value
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, tp, value)
        # YAML 1.1 reads `2e-5` (no dot) as a string; accept plain numeric strings for float fields.
        number = float(value) if isinstance(value, (int, float)) else _as_number(value)
        if number is None:
            raise _type_error(key, tp, value)
        if not math.isfinite(number):  # NaN compares False with every bound: it would pass any range check
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)} in the config schema")


def _as_number(value: Any) -> float | None:
    if isinstance(value, float):
        return value
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return None


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _check_metadata(meta: Mapping[str, Any], value: Any, key: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        hint = _suggest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{key}: {value!r} is not allowed{hint}; allowed values: {', '.join(map(str, choices))}")
    bounds = meta.get("range")
    if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = bounds
        open_lo, open_hi = meta.get("open", (False, False))
        below = lo is not None and (value <= lo if open_lo else value < lo)
        above = hi is not None and (value >= hi if open_hi else value > hi)
        if below or above:
            lo_s = f"{'(' if open_lo else '['}{'-inf' if lo is None else lo}"
            hi_s = f"{'inf' if hi is None else hi}{')' if open_hi else ']'}"
            raise ConfigError(f"{key}: {value!r} is outside the allowed range {lo_s}, {hi_s}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------
# Recipes: files, `extends:`, merging, overrides, interpolation
# ----------------------------------------------------------------------------------------------------------------


def recipe_dir() -> Path:
    """The folder of the packaged recipes."""
    return Path(str(resources.files("stmvl") / "recipes"))


def list_recipes() -> list[str]:
    """Names of the packaged, runnable recipes (files whose name starts with `_` are bases and are left out)."""
    root = recipe_dir()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")]
    return sorted(n for n in names if not Path(n).name.startswith("_"))


def _find_recipe(ref: str, relative_to: Path | None) -> Path:
    candidates: list[Path] = []
    ref_path = Path(os.path.expanduser(ref))
    if relative_to is not None and not ref_path.is_absolute():
        candidates.append(relative_to / ref_path)
    candidates.append(ref_path)
    packaged = recipe_dir() / ref
    candidates.append(packaged if packaged.suffix in (".yaml", ".yml") else packaged.with_suffix(".yaml"))
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(
        f"recipe {ref!r} not found (looked at {', '.join(str(c) for c in candidates)}); "
        f"packaged recipes: {', '.join(list_recipes())}"
    )


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: recipes have no use for them, and nested aliases can make a tiny
    file expand into an enormous tree (a "billion laughs") before any key is checked."""

    def compose_node(self, parent, index):  # noqa: D102 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"{self.name}: line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                              "supported in recipes; write the value out or use `extends:` / ${...} references")
        return super().compose_node(parent, index)


def _read_yaml(path: Path) -> Any:
    """A recipe file as Python data; a malformed file is a ConfigError naming the file, line and problem."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_NoAliasLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}malformed YAML ({problem})") from None


def load_recipe_dict(recipe: str, _relative_to: Path | None = None, _stack: tuple[Path, ...] = ()) -> dict:
    """The raw merged mapping of a recipe after resolving `extends:` (no defaults, overrides or interpolation)."""
    path = _find_recipe(recipe, _relative_to)
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"recipe `extends:` cycle: {chain}")
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    parents = raw.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: `extends` must be a recipe name/path or a list of them, got {parents!r}")
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, load_recipe_dict(parent, path.parent, (*_stack, path)))
    return deep_merge(merged, raw)


def deep_merge(base: Mapping, top: Mapping) -> dict:
    """Mappings merge key by key (recursively); any other value in `top` replaces the one in `base`."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed by yaml.safe_load) to a nested mapping; returns a new mapping."""
    out = copy.deepcopy(tree)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. optim.lr=2e-5)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {exc}") from exc
        _set_dotted(out, key, value)
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, prefix)]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override {key}: {prefix} is a value ({nxt!r}), not a section")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


_INTERP = re.compile(r"\$\{([^}]+)\}")


def interpolate(tree: dict) -> dict:
    """Replace `${a.b}` with the value at a.b and `${env:NAME}` with an environment variable, in every string."""
    return _interp_node(tree, tree, "", 0)


def _interp_node(node: Any, root: dict, key: str, depth: int) -> Any:
    if isinstance(node, Mapping):
        return {k: _interp_node(v, root, _join(key, k), depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_interp_node(v, root, f"{key}.{i}", depth) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        return _interp_string(node, root, key, depth)
    return node


def _interp_string(text: str, root: dict, key: str, depth: int) -> Any:
    if depth > 10:
        raise ConfigError(f"{key}: interpolation nests too deeply (a `${{...}}` cycle?): {text!r}")

    def lookup(match: re.Match) -> str:
        ref = match.group(1).strip()
        if ref.startswith("env:"):
            name = ref[4:]
            if name not in os.environ:
                raise ConfigError(f"{key}: environment variable {name!r} used in {text!r} is not set")
            return os.environ[name]
        value = _get_dotted(root, ref, key)
        if isinstance(value, (Mapping, list)):
            raise ConfigError(f"{key}: ${{{ref}}} is a section, only values can be interpolated")
        return str(_interp_node(value, root, ref, depth + 1))

    return _INTERP.sub(lookup, text)


def _get_dotted(root: Any, ref: str, key: str) -> Any:
    node = root
    for part in ref.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ConfigError(f"{key}: interpolation ${{{ref}}} does not name a config value")
    return node


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def load_config(recipe: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a packaged recipe name ('demo', 'pretrain/stm_b16_5m') or a YAML path, apply overrides, validate.

    `recipe=None` starts from the schema defaults.
    """
    raw = load_recipe_dict(recipe) if recipe else {}
    if "extends" in raw:
        raise ConfigError("`extends` is only allowed at the top of a recipe file")
    merged = deep_merge(config_to_dict(RunConfig()), raw)
    merged = apply_overrides(merged, list(overrides))
    cfg = from_dict(RunConfig, interpolate(merged))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field rules that single-field checks cannot express; raises ConfigError naming the keys."""
    o = cfg.optim
    if o.epochs is None and o.max_steps is None:
        raise ConfigError("optim.epochs and optim.max_steps are both null: set one of them")
    for key, betas in (("optim.betas", o.betas),):
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{key}: each beta must lie in [0, 1), got {list(betas)}")
    lo, hi = cfg.data.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"data.crop_scale: need 0 < min <= max <= 1, got {[lo, hi]}")
    if cfg.data.sampling == "fps" and cfg.data.fps is None:
        raise ConfigError("data.sampling is 'fps' but data.fps is null: set data.fps")
    if cfg.data.decoded_cache_mib and cfg.data.decoder != "pyav":
        raise ConfigError(f"data.decoded_cache_mib={cfg.data.decoded_cache_mib} needs data.decoder: pyav "
                          f"(got {cfg.data.decoder!r}); set data.decoded_cache_mib=0 or data.decoder=pyav")
    if cfg.data.decoded_cache_prefill and not cfg.data.decoded_cache_mib:
        raise ConfigError(f"data.decoded_cache_prefill={cfg.data.decoded_cache_prefill} fills the decoded-clip cache, "
                          f"but data.decoded_cache_mib is 0; set data.decoded_cache_mib or "
                          f"data.decoded_cache_prefill=0")
    syn = cfg.data.synthetic
    if syn.num_images > syn.num_train:
        raise ConfigError(f"data.synthetic.num_images ({syn.num_images}) exceeds data.synthetic.num_train "
                          f"({syn.num_train}): each image is a frame of a training clip")
    best = cfg.eval.best_key or ""
    if cfg.eval.itm != "every" and ("/itm/" in best or best.endswith("itm_acc")):
        raise ConfigError(f"eval.best_key {best!r} is an ITM number, but eval.itm is {cfg.eval.itm!r}: the "
                          "evaluations that pick the best checkpoint would not have it; use eval.itm=every or an "
                          "ITC key")
    validate_model(cfg.model, "model")
    for section, corpora in (("data.corpora", cfg.data.corpora), ("eval.corpora", cfg.eval.corpora)):
        names = [c.name for c in corpora]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{section}: corpus names must be unique, repeated: {', '.join(dupes)}")
        for i, c in enumerate(corpora):
            if not c.name:
                raise ConfigError(f"{section}.{i}.name: every corpus needs a name")
            if not c.annotation and not c.shards:
                raise ConfigError(f"{section}.{i} ({c.name}): set annotation (with media_root) or shards")


def validate_model(model: ModelConfig, prefix: str = "model") -> None:
    """Cross-field rules of a ModelConfig (a recipe's `model:` or a model folder's config.json, whose keys start
    with `prefix`) and the parameter budget (MAX_PARAMETERS), checked before anything is built."""
    t, v, teacher = model.text, model.vision, model.teacher
    if t.fusion_start > t.layers:
        raise ConfigError(f"{prefix}.text.fusion_start ({t.fusion_start}) exceeds {prefix}.text.layers ({t.layers})")
    if t.hidden % t.heads:
        raise ConfigError(f"{prefix}.text.hidden ({t.hidden}) must be divisible by {prefix}.text.heads ({t.heads})")
    if v.width % v.heads:
        raise ConfigError(f"{prefix}.vision.width ({v.width}) must be divisible by {prefix}.vision.heads ({v.heads})")
    if v.img_size % v.patch_size:
        raise ConfigError(f"{prefix}.vision.img_size ({v.img_size}) must be a multiple of patch_size "
                          f"({v.patch_size})")
    if teacher.width % teacher.heads:
        raise ConfigError(f"{prefix}.teacher.width ({teacher.width}) must be divisible by {prefix}.teacher.heads "
                          f"({teacher.heads})")
    if teacher.return_layers > teacher.layers:
        raise ConfigError(f"{prefix}.teacher.return_layers ({teacher.return_layers}) exceeds {prefix}.teacher.layers "
                          f"({teacher.layers})")
    # a teacher (and one decoder per returned layer, on the student's blocks) is built for MVM and for the masks
    # that need its attention (stmvl.models.stm.needs_teacher)
    score_masks = ("attention", "attention_inverse", "stm")
    builds_teacher = (model.loss.mvm > 0 or model.mask.video_strategy in score_masks
                      or model.mask.image_strategy in score_masks)
    if builds_teacher and teacher.return_layers > v.depth:
        raise ConfigError(f"{prefix}.teacher.return_layers ({teacher.return_layers}) exceeds the student depth "
                          f"{prefix}.vision.depth ({v.depth}): one decoder per returned layer sits on a student block")
    if model.decoder == "linear" and model.mvm_tokens == "all":
        raise ConfigError(f"{prefix}.decoder 'linear' only predicts visible tokens: set {prefix}.mvm_tokens=visible or "
                          f"{prefix}.decoder=st")
    if t.cache_states and t.freeze_below < t.fusion_start:
        raise ConfigError(f"{prefix}.text.cache_states needs every text-only layer frozen: set {prefix}.text.freeze_below "
                          f"({t.freeze_below}) to at least {prefix}.text.fusion_start ({t.fusion_start}), or "
                          f"{prefix}.text.cache_states=false")
    if t.cache_states and t.dropout > 0:
        raise ConfigError(f"{prefix}.text.cache_states needs {prefix}.text.dropout 0 (got {t.dropout}; with dropout "
                          f"the frozen layers' states change at every step), or {prefix}.text.cache_states=false")
    # with text weights the layer count comes from the weights folder, checked when it is loaded
    if t.weights is None and (model.loss.vtm > 0 or model.loss.mlm > 0) and t.fusion_start >= t.layers:
        raise ConfigError(f"{prefix}.loss: VTM and MLM need fusion layers: set {prefix}.text.fusion_start below "
                          f"{prefix}.text.layers ({t.layers}), or {prefix}.loss.vtm=0 and {prefix}.loss.mlm=0")
    counts = estimated_parameters(model)
    total = sum(counts.values())
    if total > MAX_PARAMETERS:
        towers = ", ".join(f"{name} {count:.2g}" for name, count in counts.items())
        raise ConfigError(f"{prefix}: the sizes ask for about {total:.2g} parameters ({towers}), more than the "
                          f"{MAX_PARAMETERS:.0e} stmvl builds; check {prefix}.vision / teacher / text sizes")
    if v.warm_start == "teacher":
        from stmvl.models.warm_start import check_shapes  # imports torch: only when asked for

        if not (builds_teacher and teacher.weights):
            raise ConfigError(f"{prefix}.vision.warm_start=teacher copies the trained teacher into the student: set "
                              f"{prefix}.teacher.weights (in a run that builds the teacher), or "
                              f"{prefix}.vision.warm_start=none")
        check_shapes(v, teacher, prefix)


def save_config(cfg: RunConfig, path: str | os.PathLike, header: str | None = None) -> None:
    """Write the resolved config as YAML (loadable again with `load_config(path)`), atomically.

    `header`: an optional note written as a leading YAML comment (e.g. what `optim.precision: auto` resolved to).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        if header:
            fh.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
