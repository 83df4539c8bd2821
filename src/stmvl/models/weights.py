"""Weight import/export: Hugging Face BERT, OpenAI/open_clip and HF CLIP vision, UMT checkpoints (DESIGN 7).

Everything is strict: every source key is either placed, deliberately ignored (listed with a reason, e.g. BERT's
unused pooler), or reported as unplaced; target keys that stay missing fail the load unless the caller names
their group in ``allow_missing``. Pickle files are read with ``torch.load(weights_only=True)``; stmvl writes
safetensors (``model.safetensors`` + ``config.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from stmvl.models.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, TeacherConfig, TextConfig, VisionConfig

StateDict = dict[str, torch.Tensor]


class WeightLoadError(RuntimeError):
    """A checkpoint does not fit the model: the message lists the offending keys by group."""


# --------------------------------------------------------------------------------------------------- reading files


def _unwrap(obj: object, source: str) -> StateDict:
    """Accept a plain state dict or one wrapped in {"model": ...} / {"state_dict": ...}."""
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{source}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightLoadError(f"{source}: entries that are not tensors: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return dict(obj)


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a ``.safetensors`` file or a pickle checkpoint (``weights_only=True``), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise WeightLoadError(f"{path}: cannot be read as a weights-only torch checkpoint: {error}") from error
    return _unwrap(obj, str(path))


def _folder_weights(folder: Path) -> StateDict:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded checkpoints unsupported)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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


# BERT (Hugging Face) <-> stmvl BertEncoder
_BERT = _Renamer([
    _Rule("embeddings.word_embeddings", "embeddings.word"),
    _Rule("embeddings.position_embeddings", "embeddings.position"),
    _Rule("embeddings.token_type_embeddings", "embeddings.token_type"),
    _Rule("embeddings.LayerNorm", "embeddings.norm"),
    _Rule("encoder.layer.{i}.attention.self.query", "layers.{i}.self_attn.q"),
    _Rule("encoder.layer.{i}.attention.self.key", "layers.{i}.self_attn.k"),
    _Rule("encoder.layer.{i}.attention.self.value", "layers.{i}.self_attn.v"),
    _Rule("encoder.layer.{i}.attention.output.dense", "layers.{i}.self_attn.out"),
    _Rule("encoder.layer.{i}.attention.output.LayerNorm", "layers.{i}.self_norm"),
    _Rule("encoder.layer.{i}.crossattention.self.query", "layers.{i}.cross_attn.q"),
    _Rule("encoder.layer.{i}.crossattention.self.key", "layers.{i}.cross_attn.k"),
    _Rule("encoder.layer.{i}.crossattention.self.value", "layers.{i}.cross_attn.v"),
    _Rule("encoder.layer.{i}.crossattention.output.dense", "layers.{i}.cross_attn.out"),
    _Rule("encoder.layer.{i}.crossattention.output.LayerNorm", "layers.{i}.cross_norm"),
    _Rule("encoder.layer.{i}.intermediate.dense", "layers.{i}.ffn.fc1"),
    _Rule("encoder.layer.{i}.output.dense", "layers.{i}.ffn.fc2"),
    _Rule("encoder.layer.{i}.output.LayerNorm", "layers.{i}.ffn_norm"),
])
_BERT_MLM = _Renamer([
    _Rule("transform.dense", "mlm.dense"),
    _Rule("transform.LayerNorm", "mlm.norm"),
    _Rule("bias", "mlm.bias"),
])
_BERT_UNUSED = {"pooler": "BERT pooler is unused (UMT/STM pool the [CLS] state)",
                "embeddings.position_ids": "buffer recomputed at run time"}


def _legacy_layer_norm_names(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Old TF-converted BERT checkpoints call LayerNorm parameters gamma/beta."""
    fixed = {}
    for key, value in sd.items():
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        fixed[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)] = value
    return fixed


def bert_to_stmvl(sd: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[StateDict, dict[str, str], list[str]]:
    """Map a HF BERT / BertForMaskedLM state dict (keys with or without ``bert.``) to BertEncoder names.

    Returns ``(mapped, ignored {key: reason}, unplaced keys)``. ``prefix`` is prepended to the mapped names.
    """
    sd = _legacy_layer_norm_names(sd)
    mapped, ignored, unplaced = {}, {}, []
    word_key = None
    for key, value in sd.items():
        body = key[len("bert."):] if key.startswith("bert.") else key
        if body.startswith("cls.predictions."):
            leaf = body[len("cls.predictions."):]
            if leaf == "decoder.weight":
                continue  # tied to the word embeddings; checked below
            if leaf == "decoder.bias":
                if "cls.predictions.bias" not in sd and "bert.cls.predictions.bias" not in sd:
                    mapped[prefix + "mlm.bias"] = value
                else:
                    ignored[key] = "tied to cls.predictions.bias"
                continue
            hit = _BERT_MLM.forward(leaf)
        elif body.startswith("cls.seq_relationship"):
            ignored[key] = "next-sentence head is unused"
            continue
        elif any(body == u or body.startswith(u + ".") for u in _BERT_UNUSED):
            ignored[key] = next(why for u, why in _BERT_UNUSED.items() if body == u or body.startswith(u + "."))
            continue
        else:
            hit = _BERT.forward(body)
            if body == "embeddings.word_embeddings.weight":
                word_key = key
        if hit is None:
            unplaced.append(key)
            continue
        mapped[prefix + hit[0]] = value
    for key in sd:
        if key.endswith("cls.predictions.decoder.weight"):
            if word_key is None or not torch.equal(sd[key], sd[word_key]):
                raise WeightLoadError(
                    f"{key} differs from the word embeddings; stmvl ties the MLM decoder to them and cannot load it"
                )
            ignored[key] = "tied to the word embeddings"
    return mapped, ignored, unplaced


def stmvl_to_bert(sd: Mapping[str, torch.Tensor], prefix: str = "", bert_prefix: str = "bert.",
                  cls_prefix: str = "cls.predictions.") -> tuple[StateDict, list[str]]:
    """Inverse of :func:`bert_to_stmvl` for keys under ``prefix``; also writes the tied decoder weight/bias."""
    body = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out, unplaced = {}, []
    for key, value in body.items():
        if key.startswith("mlm."):
            hit = _BERT_MLM.backward(key)
            name = cls_prefix + hit[0] if hit else None
        else:
            hit = _BERT.backward(key)
            name = bert_prefix + hit[0] if hit else None
        if name is None:
            unplaced.append(prefix + key)
            continue
        out[name] = value
    if "mlm.bias" in body and "embeddings.word.weight" in body:
        out[cls_prefix + "decoder.weight"] = body["embeddings.word.weight"]
        out[cls_prefix + "decoder.bias"] = body["mlm.bias"]
    return out, unplaced


# OpenAI CLIP visual (also UMT clip_teacher and ActionCLIP fusion blocks) <-> stmvl CLIPTeacher
def _clip_block_rules(src: str, dst: str) -> list[_Rule]:
    return [
        _Rule(f"{src}.ln_1", f"{dst}.ln_1"),
        _Rule(f"{src}.attn.in_proj_weight", f"{dst}.attn.qkv.weight"),
        _Rule(f"{src}.attn.in_proj_bias", f"{dst}.attn.qkv.bias"),
        _Rule(f"{src}.attn.out_proj", f"{dst}.attn.proj"),
        _Rule(f"{src}.ln_2", f"{dst}.ln_2"),
        _Rule(f"{src}.mlp.c_fc", f"{dst}.mlp.fc1"),
        _Rule(f"{src}.mlp.c_proj", f"{dst}.mlp.fc2"),
    ]


_OPENAI_CLIP = _Renamer([
    _Rule("conv1", "conv1"),
    _Rule("class_embedding", "class_embedding"),
    _Rule("positional_embedding", "positional_embedding"),
    _Rule("ln_pre", "ln_pre"),
    *_clip_block_rules("transformer.resblocks.{i}", "blocks.{i}"),
    _Rule("ln_post", "ln_post"),
    _Rule("proj", "proj.weight", _transpose, _transpose),  # OpenAI: x @ proj with proj [W, C]
    _Rule("fusion_model.frame_position_embeddings", "temporal.frame_position_embeddings"),
    *_clip_block_rules("fusion_model.transformer.resblocks.{i}", "temporal.blocks.{i}"),
])


def openai_clip_to_stmvl(
    sd: Mapping[str, torch.Tensor], prefix: str = "visual.", include_fusion: bool = True
) -> tuple[StateDict, list[str]]:
    """Map OpenAI/open_clip ``visual.*`` keys (and ActionCLIP ``fusion_model.*`` when ``include_fusion``) to
    CLIPTeacher names. Returns ``(mapped, unplaced keys)``; other keys (the text tower) are not looked at.
    """
    mapped, unplaced = _rename_all(sd, _OPENAI_CLIP, prefix, "")
    stray = [k for k in mapped if k.startswith("temporal.")]
    if stray:
        raise WeightLoadError(f"fusion weights found under {prefix!r}: {stray[:5]}")
    if include_fusion:
        fusion = {k: v for k, v in sd.items() if k.startswith("fusion_model.")}
        fused, fusion_unplaced = _rename_all(fusion, _OPENAI_CLIP, "", "")
        mapped.update(fused)
        unplaced += fusion_unplaced
    return mapped, unplaced


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def stmvl_to_openai_clip(sd: Mapping[str, torch.Tensor], prefix: str = "", out_prefix: str = "visual.") -> tuple[StateDict, list[str]]:
    """CLIPTeacher names under ``prefix`` -> OpenAI layout under ``out_prefix`` (temporal fusion -> ``fusion_model.``)."""
    renamed, unplaced = _rename_all(sd, _OPENAI_CLIP, prefix, "", backward=True)
    # the temporal fusion lives beside the image tower in the OpenAI layout, not under it
    out = {(name if name.startswith("fusion_model.") else out_prefix + name): v for name, v in renamed.items()}
    return out, unplaced


_HF_CLIP = _Renamer([
    _Rule("embeddings.patch_embedding", "conv1"),
    _Rule("embeddings.class_embedding", "class_embedding"),
    _Rule("embeddings.position_embedding.weight", "positional_embedding"),
    _Rule("pre_layrnorm", "ln_pre"),
    _Rule("encoder.layers.{i}.layer_norm1", "blocks.{i}.ln_1"),
    _Rule("encoder.layers.{i}.self_attn.out_proj", "blocks.{i}.attn.proj"),
    _Rule("encoder.layers.{i}.layer_norm2", "blocks.{i}.ln_2"),
    _Rule("encoder.layers.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
    _Rule("encoder.layers.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    _Rule("post_layernorm", "ln_post"),
])
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def hf_clip_to_stmvl(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, dict[str, str], list[str]]:
    """Map a HF ``CLIPVisionModelWithProjection`` / ``CLIPModel`` state dict to CLIPTeacher names.

    q/k/v projections are concatenated into the fused ``qkv`` (the OpenAI in_proj layout).
    Returns ``(mapped, ignored, unplaced)``.
    """
    mapped, ignored, unplaced = {}, {}, []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        if key == "visual_projection.weight":
            mapped["proj.weight"] = value
            continue
        if not key.startswith("vision_model."):
            ignored[key] = "not part of the vision tower"
            continue
        body = key[len("vision_model."):]
        if body == "embeddings.position_ids":
            ignored[key] = "buffer recomputed at run time"
            continue
        match = _HF_QKV.match(body)
        if match:
            qkv[(match.group(1), match.group(3))][match.group(2)] = value
            continue
        hit = _HF_CLIP.forward(body)
        if hit is None:
            unplaced.append(key)
        else:
            mapped[hit[0]] = value
    for (layer, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightLoadError(f"vision_model.encoder.layers.{layer}.self_attn: q/k/v {leaf} incomplete ({sorted(parts)})")
        mapped[f"blocks.{layer}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return mapped, ignored, unplaced


# --------------------------------------------------------------------------------------------------- BERT loader


def text_config_from_hf(config: Mapping, fusion_start: int | None = None, source: str = "config.json") -> TextConfig:
    """TextConfig from a HF BERT ``config.json`` (no fusion layers unless ``fusion_start`` is given)."""
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise WeightLoadError(f"{source}: hidden_act {act!r} is not supported (stmvl's BERT uses exact GELU)")
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise WeightLoadError(f"{source}: position_embedding_type {kind!r} is not supported (absolute only)")
    try:
        layers = int(config["num_hidden_layers"])
        return TextConfig(
            vocab_size=int(config["vocab_size"]),
            hidden=int(config["hidden_size"]),
            layers=layers,
            heads=int(config["num_attention_heads"]),
            intermediate=int(config["intermediate_size"]),
            max_position=int(config.get("max_position_embeddings", 512)),
            type_vocab=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            dropout=float(config.get("hidden_dropout_prob", 0.1)),
            fusion_start=layers if fusion_start is None else fusion_start,
        )
    except KeyError as error:
        raise WeightLoadError(f"{source}: missing BERT config key {error}") from error


def load_bert(folder: str | Path, fusion_start: int | None = None, cross_width: int | None = None):
    """Load a HF BERT folder (config.json + model.safetensors | pytorch_model.bin) into a BertEncoder.

    ``fusion_start=None`` gives no fusion layers (``module(ids, mask)`` runs every layer); otherwise layers
    ``[fusion_start, L)`` get new, randomly initialised cross-attention of width ``cross_width``. A checkpoint
    without ``cls.predictions`` (BertModel) leaves the MLM head's transform freshly initialised.
    The :class:`LoadReport` is attached as ``module.load_report``.
    """
    from stmvl.models.text import BertEncoder

    folder = Path(folder)
    if str(folder) == "minilm":
        from stmvl.data.text import minilm_folder

        folder = minilm_folder()
    cfg = text_config_from_hf(_read_json(folder / "config.json"), fusion_start, str(folder / "config.json"))
    cfg = dataclasses.replace(cfg, weights=str(folder))
    model = BertEncoder(cfg, cross_width)
    mapped, ignored, unplaced = bert_to_stmvl(_folder_weights(folder))
    if unplaced:
        raise WeightLoadError(f"{folder}: BERT keys with no place in stmvl: {unplaced}")
    allow = [f"layers.{i}.cross_attn" for i in range(cfg.fusion_start, cfg.layers)]
    allow += [f"layers.{i}.cross_norm" for i in range(cfg.fusion_start, cfg.layers)]
    if not any(k.startswith("mlm.") for k in mapped):
        allow.append("mlm")
    model.load_report = load_state_dict_strict(model, mapped, allow_missing=allow, ignored=ignored)
    return model


# --------------------------------------------------------------------------------------------------- CLIP loader


def _count_indices(keys: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise WeightLoadError(f"layer indices are not contiguous: {sorted(found)}")
    return len(found)


def teacher_config_from_state(sd: Mapping[str, torch.Tensor], heads: int | None = None, **extra) -> TeacherConfig:
    """Infer a TeacherConfig from CLIPTeacher-named tensors (heads default to width / 64, the CLIP rule)."""
    for needed in ("conv1.weight", "positional_embedding", "proj.weight"):
        if needed not in sd:
            raise WeightLoadError(f"CLIP vision weights lack {needed!r}; found e.g. {sorted(sd)[:8]}")
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    if grid * grid + 1 != sd["positional_embedding"].shape[0]:
        raise WeightLoadError(f"positional_embedding {tuple(sd['positional_embedding'].shape)} is not 1 + a square grid")
    layers = _count_indices(sd, r"^blocks\.(\d+)\.")
    fusion_layers = _count_indices(sd, r"^temporal\.blocks\.(\d+)\.")
    values = dict(
        img_size=grid * patch, patch_size=patch, width=width, layers=layers,
        heads=heads or max(width // 64, 1), embed_dim=sd["proj.weight"].shape[0],
        return_layers=min(TeacherConfig.return_layers, layers),
    )
    if fusion_layers:
        values.update(temporal_fusion=True, temporal_fusion_layers=fusion_layers,
                      max_frames=sd["temporal.frame_position_embeddings.weight"].shape[0])
    values.update(extra)
    return TeacherConfig(**values)


def _clip_state_from_source(source: Path) -> tuple[StateDict, dict[str, str], dict]:
    """CLIPTeacher-named tensors, ignored keys and config hints from a HF folder or an OpenAI-style file."""
    if source.is_dir():
        config = _read_json(source / "config.json")
        vision = config.get("vision_config", config)
        hints = dict(heads=vision.get("num_attention_heads"), act=vision.get("hidden_act", "quick_gelu"),
                     norm_eps=vision.get("layer_norm_eps", 1e-5))
        mapped, ignored, unplaced = hf_clip_to_stmvl(_folder_weights(source))
    else:
        sd = read_state_dict(source)
        if any(k.startswith("module.") for k in sd):
            sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        if not any(k.startswith("visual.") for k in sd):
            raise WeightLoadError(f"{source}: no 'visual.*' keys; is this an OpenAI/open_clip CLIP state dict?")
        mapped, unplaced = openai_clip_to_stmvl(sd)
        ignored = {k: "not part of the vision tower" for k in sd
                   if not k.startswith("visual.") and not k.startswith("fusion_model.")}
        hints = {"act": "quick_gelu"}
    if unplaced:
        raise WeightLoadError(f"{source}: CLIP keys with no place in the teacher: {unplaced}")
    return mapped, ignored, {k: v for k, v in hints.items() if v is not None}


def load_clip_vision(source: str | Path, allow_missing: Iterable[str] = (), **cfg_overrides):
    """A frozen CLIPTeacher from an OpenAI/open_clip state dict file (``visual.*``), a HF CLIP folder
    (``vision_model.*`` + ``visual_projection``) or an stmvl teacher folder written by :func:`save_model`.

    Sizes are inferred from the tensor shapes; ``cfg_overrides`` set the rest (``return_layers``,
    ``input_norm``, ``temporal_fusion``, ...). With ``temporal_fusion=True`` and no fusion weights in the
    source, pass ``allow_missing=("temporal",)`` to accept a randomly initialised fusion.
    """
    from stmvl.models.teacher import CLIPTeacher

    source = Path(source)
    if source.is_dir() and _is_stmvl_dir(source):
        model = load_model_dir(source, allow_missing=allow_missing)
        if not isinstance(model, CLIPTeacher):
            raise WeightLoadError(f"{source} holds a {type(model).__name__}, not a CLIP teacher")
        if not cfg_overrides:
            return model
        # run options (return_layers, input_norm, temporal fusion) are the caller's, sizes are the file's
        tuned = CLIPTeacher(dataclasses.replace(model.cfg, **cfg_overrides))
        tuned.load_report = load_state_dict_strict(tuned, model.state_dict(), allow_missing=allow_missing)
        return tuned
    mapped, ignored, hints = _clip_state_from_source(source)
    hints.update(cfg_overrides)
    cfg = teacher_config_from_state(mapped, weights=str(source), **hints)
    model = CLIPTeacher(cfg)
    model.load_report = load_state_dict_strict(model, mapped, allow_missing=allow_missing, ignored=ignored)
    return model


# --------------------------------------------------------------------------------------------------- UMT


_VIT = _Renamer([
    _Rule("patch_embed.proj", "patch_embed.proj"),
    _Rule("blocks.{i}.norm1", "blocks.{i}.norm1"),
    _Rule("blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv"),
    _Rule("blocks.{i}.attn.q_bias", "blocks.{i}.attn.q_bias"),
    _Rule("blocks.{i}.attn.v_bias", "blocks.{i}.attn.v_bias"),
    _Rule("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
    _Rule("blocks.{i}.norm2", "blocks.{i}.norm2"),
    _Rule("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
    _Rule("blocks.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    _Rule("norm", "norm"),
    _Rule("pool_norm", "pool_norm"),
])
_DECODER = _Renamer([
    _Rule("{i}.head", "{i}.head"),
    _Rule("{i}.norm", "{i}.norm"),
])
_TOP_LEVEL = ("vision_proj", "text_proj", "itm_head", "temp")


@dataclass
class UmtMapping:
    """Result of mapping a UMT checkpoint: stmvl-named tensors, deliberately ignored keys, unplaced keys."""

    state_dict: StateDict
    ignored: dict[str, str]
    unplaced: list[str]
    stage: int


def _umt_stage(sd: Mapping[str, torch.Tensor]) -> int:
    if any(k.startswith("vision_encoder.") for k in sd):
        return 2
    if any(k.startswith("encoder.") for k in sd):
        return 1
    raise WeightLoadError(f"not a UMT checkpoint: no 'encoder.*' (stage 1) or 'vision_encoder.*' (stage 2) keys; "
                          f"first keys: {sorted(sd)[:6]}")


def umt_to_stmvl(sd: Mapping[str, torch.Tensor]) -> UmtMapping:
    """Map UMT stage-1 (``encoder.*``, ``clip_decoder.*``) or stage-2 (``vision_encoder.*``, ``text_encoder.*``,
    ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, ``clip_teacher.*``) keys to STMModel names
    (``vision.*``, ``decoders.i.{head, norm}``, ``text.*``, ``teacher.*``, ...). Unknown keys are listed in
    ``unplaced``, never dropped silently.
    """
    sd = _unwrap(sd, "UMT checkpoint")
    stage = _umt_stage(sd)
    vit_prefix = "vision_encoder." if stage == 2 else "encoder."
    dec_prefix = "vision_encoder.clip_decoder." if stage == 2 else "clip_decoder."
    out, ignored, unplaced = {}, {}, []
    decoders, dec_unplaced = _rename_all(sd, _DECODER, dec_prefix, "decoders.")
    out.update(decoders)
    unplaced += dec_unplaced
    vit_sd = {k: v for k, v in sd.items() if k.startswith(vit_prefix) and not k.startswith(dec_prefix)}
    vision, vit_unplaced = _rename_all(vit_sd, _VIT, vit_prefix, "vision.")
    out.update(vision)
    unplaced += vit_unplaced
    text_sd = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    if text_sd:
        text, text_ignored, text_unplaced = bert_to_stmvl(text_sd, prefix="text.")
        out.update(text)
        ignored.update({"text_encoder." + k: why for k, why in text_ignored.items()})
        unplaced += ["text_encoder." + k for k in text_unplaced]
    teacher, teacher_unplaced = openai_clip_to_stmvl(sd, prefix="clip_teacher.", include_fusion=False)
    out.update({"teacher." + k: v for k, v in teacher.items()})
    unplaced += teacher_unplaced
    handled = (vit_prefix, dec_prefix, "text_encoder.", "clip_teacher.")
    for key, value in sd.items():
        if key.startswith(handled):
            continue
        if key.split(".")[0] in _TOP_LEVEL:
            out[key] = value
        else:
            unplaced.append(key)
    return UmtMapping(out, ignored, sorted(set(unplaced)), stage)


def stmvl_to_umt(sd: Mapping[str, torch.Tensor], stage: int = 2) -> tuple[StateDict, list[str]]:
    """Export stmvl (STMModel-named) tensors to UMT's layout; returns ``(umt_state_dict, unplaced stmvl keys)``."""
    if stage not in (1, 2):
        raise ValueError(f"UMT stage must be 1 or 2, got {stage}")
    vit_prefix = "vision_encoder." if stage == 2 else "encoder."
    dec_prefix = "vision_encoder.clip_decoder." if stage == 2 else "clip_decoder."
    out, unplaced = {}, []
    vision, u = _rename_all(sd, _VIT, "vision.", vit_prefix, backward=True)
    out.update(vision)
    unplaced += u
    decoders, u = _rename_all(sd, _DECODER, "decoders.", dec_prefix, backward=True)
    out.update(decoders)
    unplaced += u
    if stage == 2:
        text, u = stmvl_to_bert(sd, prefix="text.", bert_prefix="text_encoder.bert.",
                                cls_prefix="text_encoder.cls.predictions.")
        out.update(text)
        unplaced += u
        teacher, u = stmvl_to_openai_clip(sd, prefix="teacher.", out_prefix="clip_teacher.")
        out.update(teacher)
        unplaced += u
        out.update({k: v for k, v in sd.items() if k.split(".")[0] in _TOP_LEVEL})
    handled = ("vision.", "decoders.") + (("text.", "teacher.") if stage == 2 else ())
    unplaced += [k for k in sd if not k.startswith(handled) and (stage == 1 or k.split(".")[0] not in _TOP_LEVEL)]
    return out, sorted(set(unplaced))


def _vision_config_from_state(sd: Mapping[str, torch.Tensor], img_size: int) -> VisionConfig:
    width, in_ch, tubelet, patch, _ = sd["vision.patch_embed.proj.weight"].shape
    stem = "tubelet2" if tubelet == 2 else ("diff" if in_ch == 6 else "rgb")
    depth = _count_indices(sd, r"^vision\.blocks\.(\d+)\.")
    size = next((name for name, (w, d) in {"b16": (768, 12), "l16": (1024, 24)}.items() if (w, d) == (width, depth)), "custom")
    hidden = sd["vision.blocks.0.mlp.fc1.weight"].shape[0]
    return VisionConfig(size=size, img_size=img_size, patch_size=patch, width=width, depth=depth,
                        heads=max(width // 64, 1), mlp_ratio=hidden / width, stem=stem)


def _text_config_from_state(sd: Mapping[str, torch.Tensor]) -> TextConfig:
    vocab, hidden = sd["text.embeddings.word.weight"].shape
    layers = _count_indices(sd, r"^text\.layers\.(\d+)\.")
    fusion = [i for i in range(layers) if f"text.layers.{i}.cross_attn.q.weight" in sd]
    return TextConfig(
        vocab_size=vocab, hidden=hidden, layers=layers, heads=max(hidden // 64, 1),
        intermediate=sd["text.layers.0.ffn.fc1.weight"].shape[0],
        max_position=sd["text.embeddings.position.weight"].shape[0],
        type_vocab=sd["text.embeddings.token_type.weight"].shape[0],
        fusion_start=fusion[0] if fusion else layers,
    )


def model_config_from_umt(sd: Mapping[str, torch.Tensor], img_size: int = 224) -> ModelConfig:
    """A ModelConfig (preset ``umt``) inferred from the shapes of UMT-mapped (stmvl-named) tensors.

    UMT parity: the student normalises with ImageNet mean/std and the teacher is fed ImageNet-normalised input
    (``teacher.input_norm = "imagenet"``); the teacher returns as many layers as the checkpoint has decoders.
    """
    from stmvl.models.stm import apply_preset

    cfg = apply_preset(ModelConfig(), "umt")
    vision = _vision_config_from_state(sd, img_size)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(vision, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    if "text.embeddings.word.weight" in sd:
        cfg.text = _text_config_from_state(sd)
    decoders = _count_indices(sd, r"^decoders\.(\d+)\.")
    teacher = _strip(sd, "teacher.")
    if teacher:
        cfg.teacher = teacher_config_from_state(teacher, input_norm="imagenet")
        if decoders:
            cfg.teacher = dataclasses.replace(cfg.teacher, return_layers=decoders)
    else:
        # No teacher weights (inference-only checkpoint): keep UMT's teacher shape so that the decoders the
        # checkpoint may hold still fit; the teacher itself is loaded as missing (stmvl.api.load_model allows it).
        cfg.teacher = dataclasses.replace(cfg.teacher, input_norm="imagenet", return_layers=max(decoders, 1))
        if decoders:
            head = sd["decoders.0.head.weight"]
            cfg.teacher = dataclasses.replace(cfg.teacher, embed_dim=head.shape[0])
    if "vision_proj.weight" in sd:
        cfg.embed_dim = sd["vision_proj.weight"].shape[0]
    return cfg


def check_against_model(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Compare mapped tensors with the STMModel ``cfg`` builds (on the meta device: no memory, no init time).

    Returns:
        (missing keys by group, unexpected keys, shape mismatches as "key (model [..] vs checkpoint [..])").
    """
    from stmvl.models.stm import STMModel

    with torch.device("meta"):
        target = {k: tuple(v.shape) for k, v in STMModel(cfg).state_dict().items()}
    missing = _grouped(k for k in target if k not in sd)
    unexpected = sorted(k for k in sd if k not in target)
    mismatched = [f"{k} (model {list(target[k])} vs checkpoint {list(sd[k].shape)})"
                  for k in sd if k in target and tuple(sd[k].shape) != target[k]]
    return missing, unexpected, mismatched


# Groups a UMT checkpoint may lack without harm to inference, and why (recorded in config.json "missing_groups").
UMT_OPTIONAL_GROUPS = {
    "teacher": "no clip_teacher weights in the UMT checkpoint; the teacher is only used in pretraining",
    "decoders": "no clip_decoder weights in the UMT checkpoint; the decoders are only used in pretraining",
}


# --------------------------------------------------------------------------------------------------- save / load


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
    meta = {"stmvl_config_type": type(cfg).__name__, "config": dataclasses.asdict(cfg),
            "kwargs": _build_kwargs(module), **(dict(extra) if extra else {})}
    text = json.dumps(meta, indent=2)
    _atomic_write(directory / "config.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    return directory


def _is_stmvl_dir(directory: Path) -> bool:
    path = directory / "config.json"
    return path.is_file() and "stmvl_config_type" in _read_json(path)


def config_from_dict(cls, data: Mapping, where: str = "config"):
    """Rebuild a (nested) config dataclass from a dict; unknown keys are an error naming them."""
    if not isinstance(data, Mapping):
        raise WeightLoadError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WeightLoadError(f"{where}: unknown {cls.__name__} keys {unknown}")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            value = config_from_dict(kind, value, f"{where}.{key}")
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


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
    cfg_cls, module_cls = _builder(meta["stmvl_config_type"])
    cfg = config_from_dict(cfg_cls, meta["config"], str(directory / "config.json"))
    module = module_cls(cfg, **meta.get("kwargs", {}))
    module.load_report = load_state_dict_strict(module, read_state_dict(directory / "model.safetensors"), allow_missing)
    return module


# --------------------------------------------------------------------------------------------------- CLI


def convert_main(argv: list[str] | None = None) -> int:
    """``stmvl convert umt SRC OUT``: map a UMT checkpoint to stmvl names and write an stmvl model folder
    (model.safetensors + config.json) that :func:`stmvl.api.load_model` loads strictly into an STMModel."""
    parser = argparse.ArgumentParser(prog="stmvl convert", description=convert_main.__doc__)
    parser.add_argument("format", choices=["umt"], help="source checkpoint format")
    parser.add_argument("src", help="UMT checkpoint (.pth / .bin / .safetensors, plain or {'model': ...})")
    parser.add_argument("out", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--img-size", type=int, default=224, help="input size the student was trained at")
    parser.add_argument("--num-frames", type=int, default=4, help="frames per clip at inference (zero-shot: 4)")
    parser.add_argument("--allow-unplaced", action="store_true", help="write the output even if keys are unplaced")
    args = parser.parse_args(argv)
    try:
        mapping = umt_to_stmvl(read_state_dict(args.src))
    except (FileNotFoundError, WeightLoadError) as error:
        print(f"stmvl convert: {error}", file=sys.stderr)
        return 2
    print(f"UMT stage {mapping.stage}: {len(mapping.state_dict)} tensors placed, "
          f"{len(mapping.ignored)} ignored, {len(mapping.unplaced)} unplaced")
    for key, why in mapping.ignored.items():
        print(f"  ignored {key}: {why}")
    for key in mapping.unplaced:
        print(f"  UNPLACED {key}" + (" (dropped)" if args.allow_unplaced else ""))
    if mapping.unplaced and not args.allow_unplaced:
        print("refusing to write: unplaced keys (pass --allow-unplaced to drop them)", file=sys.stderr)
        return 1
    if mapping.stage == 1:
        return _write_stage1(mapping, args)
    cfg = model_config_from_umt(mapping.state_dict, args.img_size)
    missing, unexpected, mismatched = check_against_model(cfg, mapping.state_dict)
    problems = [f"  no place in STMModel: {k}" for k in unexpected] + [f"  shape mismatch: {m}" for m in mismatched]
    problems += [f"  missing [{g}] ({len(keys)}): {_shorten(keys)}" for g, keys in missing.items()
                 if g not in UMT_OPTIONAL_GROUPS]
    if problems:
        print("refusing to write: the checkpoint does not fit the inferred STMModel:\n" + "\n".join(problems),
              file=sys.stderr)
        return 1
    absent = {group: UMT_OPTIONAL_GROUPS[group] for group in missing}
    for group, why in absent.items():
        print(f"  absent group {group!r}: {why}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(mapping.state_dict, out / "model.safetensors")
    meta = {"stmvl_config_type": "ModelConfig", "config": dataclasses.asdict(cfg), "kwargs": {},
            "inference": {"num_frames": args.num_frames, "img_size": args.img_size, "sampling": "middle"},
            "missing_groups": absent,
            "source": {"format": "umt", "stage": mapping.stage, "path": str(args.src),
                       "ignored": mapping.ignored, "dropped_unplaced": mapping.unplaced}}
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2), encoding="utf-8"))
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} "
          f"(ViT {cfg.vision.size}, text {cfg.text.layers} layers fusion from {cfg.text.fusion_start})")
    return 0


def _write_stage1(mapping: UmtMapping, args) -> int:
    """A stage-1 (video-only) checkpoint has no text tower: write its tensors and the inferred vision config."""
    cfg = model_config_from_umt(mapping.state_dict, args.img_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(mapping.state_dict, out / "model.safetensors")
    meta = {"stmvl_config_type": "ModelConfig", "config": dataclasses.asdict(cfg), "kwargs": {},
            "source": {"format": "umt", "stage": 1, "path": str(args.src), "dropped_unplaced": mapping.unplaced},
            "note": "UMT stage 1 holds only the video encoder and its decoders; it initialises pretraining "
                    "(not loadable as a full STMModel)"}
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2), encoding="utf-8"))
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} (stage 1: video encoder only)")
    return 0
