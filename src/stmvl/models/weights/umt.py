"""UMT checkpoints <-> stmvl: import, export, the folders ``stmvl convert`` writes, and student initialisation.

UMT's layouts (OpenGVLab/unmasked_teacher):

* stage 1 (``single_modality/models/modeling_pretrain_umt.py``, also the ``b16_ptk710_f8_res224.pth`` files the
  stage-2 recipes start from), bare or under ``model`` / ``module``: ``encoder.patch_embed.proj.*``,
  ``encoder.blocks.i.{norm1, attn.{qkv.weight, q_bias, v_bias, proj}, norm2, mlp.{fc1, fc2}}.*``,
  ``encoder.norm.*``, ``clip_decoder.i.{head, norm}.*`` (and ``pool_norm.*`` when saved from the stage-2 class);
* stage 2 (``multi_modality/models/umt.py``): the ``PretrainVisionTransformer`` above under ``vision_encoder.``
  (``vision_encoder.encoder.*``, ``vision_encoder.pool_norm.*``, ``vision_encoder.clip_decoder.i.*``), the CLIP
  teacher ``clip_teacher.*`` (OpenAI names, ``conv1.weight`` a Conv3d ``[W, 3, 1, p, p]``, ``proj [W, C]``),
  ``text_encoder.bert.*`` + ``text_encoder.cls.predictions.*`` (BertForMaskedLM), ``vision_proj``,
  ``text_proj``, ``itm_head`` and ``temp``.

The position tables (``pos_embed``, ``clip_pos_embed``) are plain tensors in UMT, never in a state dict; stmvl
recomputes the same sincos tables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from stmvl.models.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, TextConfig, VisionConfig
from stmvl.models.weights.bert import bert_to_stmvl, stmvl_to_bert
from stmvl.models.weights.clip import openai_clip_to_stmvl, stmvl_to_openai_clip, teacher_config_from_state
from stmvl.models.weights.core import (
    StateDict,
    LoadReport,
    WeightLoadError,
    _count_indices,
    _grouped,
    _read_json,
    _rename_all,
    _Renamer,
    _Rule,
    _shorten,
    _strip,
    _unwrap,
    load_state_dict_strict,
    read_state_dict,
)
from stmvl.models.weights.stmvl import _atomic_write, save_state_dict

log = logging.getLogger(__name__)

# UMT's PretrainVisionTransformerEncoder (the ``encoder`` submodule) <-> VideoViT
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
])
# UMT's Linear_Decoder list <-> LinearDecoder list
_DECODER = _Renamer([
    _Rule("{i}.head", "{i}.head"),
    _Rule("{i}.norm", "{i}.norm"),
])
_TOP_LEVEL = ("vision_proj", "text_proj", "itm_head", "temp")


@dataclass(frozen=True)
class _Layout:
    """Where a UMT stage keeps the encoder, the pool norm and the decoders."""

    encoder: str
    pool_norm: str
    decoders: str


_LAYOUTS = {
    1: _Layout("encoder.", "pool_norm.", "clip_decoder."),
    2: _Layout("vision_encoder.encoder.", "vision_encoder.pool_norm.", "vision_encoder.clip_decoder."),
}


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
    if any(k.startswith(("encoder.", "clip_decoder.")) for k in sd):
        return 1
    raise WeightLoadError(f"not a UMT checkpoint: no 'encoder.*' (stage 1) or 'vision_encoder.*' (stage 2) keys; "
                          f"first keys: {sorted(sd)[:6]}")


def _unwrap_umt(sd: Mapping) -> StateDict:
    """Bare, ``{"model": ...}`` or ``{"module": ...}``; a ``module.`` key prefix (DDP) is dropped too."""
    sd = _unwrap(sd, "UMT checkpoint")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def umt_to_stmvl(sd: Mapping[str, torch.Tensor]) -> UmtMapping:
    """Map a UMT stage-1 or stage-2 state dict (layouts in the module docstring) to STMModel names: ``vision.*``,
    ``decoders.i.{head, norm}``, ``text.*``, ``teacher.*``, ``vision_proj``, ... Unknown keys are listed in
    ``unplaced``, never dropped silently.
    """
    sd = _unwrap_umt(sd)
    stage = _umt_stage(sd)
    layout = _LAYOUTS[stage]
    out, ignored, unplaced = {}, {}, []
    decoders, u = _rename_all(sd, _DECODER, layout.decoders, "decoders.")
    out.update(decoders)
    unplaced += u
    vision, u = _rename_all(sd, _VIT, layout.encoder, "vision.")
    out.update(vision)
    unplaced += u
    out.update({"vision.pool_norm." + k: v for k, v in _strip(sd, layout.pool_norm).items()})
    handled = (layout.encoder, layout.pool_norm, layout.decoders)
    if stage == 2:
        text_sd = _strip(sd, "text_encoder.")
        if text_sd:
            text, text_ignored, text_unplaced = bert_to_stmvl(text_sd, prefix="text.")
            out.update(text)
            ignored.update({"text_encoder." + k: why for k, why in text_ignored.items()})
            unplaced += ["text_encoder." + k for k in text_unplaced]
        teacher, u = openai_clip_to_stmvl(sd, prefix="clip_teacher.", include_fusion=False)
        out.update({"teacher." + k: v for k, v in teacher.items()})
        unplaced += u
        handled += ("text_encoder.", "clip_teacher.")
    for key, value in sd.items():
        if key.startswith(handled):
            continue
        if stage == 2 and key.split(".")[0] in _TOP_LEVEL:
            out[key] = value
        else:
            unplaced.append(key)
    return UmtMapping(out, ignored, sorted(set(unplaced)), stage)


def stmvl_to_umt(sd: Mapping[str, torch.Tensor], stage: int = 2) -> tuple[StateDict, list[str]]:
    """Export stmvl (STMModel-named) tensors to UMT's layout of ``stage``; returns ``(umt_state_dict, unplaced
    stmvl keys)``. Stage 1 is UMT's single-modality ``PretrainVisionTransformer``, which has no pool norm, so
    ``vision.pool_norm.*`` is reported unplaced there; the teacher's ``conv1`` is written as UMT's 5-D Conv3d.
    """
    if stage not in _LAYOUTS:
        raise ValueError(f"UMT stage must be 1 or 2, got {stage}")
    layout = _LAYOUTS[stage]
    body = {k: v for k, v in sd.items() if not k.startswith("vision.pool_norm.")}
    out, unplaced = {}, []
    vision, u = _rename_all(body, _VIT, "vision.", layout.encoder, backward=True)
    out.update(vision)
    unplaced += u
    decoders, u = _rename_all(sd, _DECODER, "decoders.", layout.decoders, backward=True)
    out.update(decoders)
    unplaced += u
    pool = {k: v for k, v in sd.items() if k.startswith("vision.pool_norm.")}
    if stage == 2:
        out.update({layout.pool_norm + k[len("vision.pool_norm."):]: v for k, v in pool.items()})
        text, u = stmvl_to_bert(sd, prefix="text.", bert_prefix="text_encoder.bert.",
                                cls_prefix="text_encoder.cls.predictions.")
        if "text_encoder.bert.embeddings.position_embeddings.weight" in text:
            # UMT's xbert registers position_ids as a persistent buffer: a strict load of the export needs it
            rows = text["text_encoder.bert.embeddings.position_embeddings.weight"].shape[0]
            text["text_encoder.bert.embeddings.position_ids"] = torch.arange(rows).unsqueeze(0)
        out.update(text)
        unplaced += u
        teacher, u = stmvl_to_openai_clip(sd, prefix="teacher.", out_prefix="clip_teacher.")
        if "clip_teacher.conv1.weight" in teacher:
            # UMT's teacher embeds patches with Conv3d(kernel (1, p, p)): the same weights with a temporal axis
            teacher["clip_teacher.conv1.weight"] = teacher["clip_teacher.conv1.weight"].unsqueeze(2)
        out.update(teacher)
        unplaced += u
        out.update({k: v for k, v in sd.items() if k.split(".")[0] in _TOP_LEVEL})
    else:
        unplaced += list(pool)
    handled = ("vision.", "decoders.") + (("text.", "teacher.") if stage == 2 else ())
    unplaced += [k for k in sd if not k.startswith(handled) and (stage == 1 or k.split(".")[0] not in _TOP_LEVEL)]
    return out, sorted(set(unplaced))


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio VideoViT turns back into exactly ``hidden`` (``int(width * ratio)``), even when hidden/width is not
    a float that multiplies back exactly."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _vision_config_from_state(sd: Mapping[str, torch.Tensor], img_size: int) -> VisionConfig:
    width, in_ch, tubelet, patch, _ = sd["vision.patch_embed.proj.weight"].shape
    stem = "tubelet2" if tubelet == 2 else ("diff" if in_ch == 6 else "rgb")
    depth = _count_indices(sd, r"^vision\.blocks\.(\d+)\.")
    size = next((name for name, (w, d) in {"b16": (768, 12), "l16": (1024, 24)}.items() if (w, d) == (width, depth)), "custom")
    hidden = sd["vision.blocks.0.mlp.fc1.weight"].shape[0]
    return VisionConfig(size=size, img_size=img_size, patch_size=patch, width=width, depth=depth,
                        heads=max(width // 64, 1), mlp_ratio=_mlp_ratio(hidden, width), stem=stem)


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


# --------------------------------------------------------------------------------------------------- student init


@dataclass
class StudentInit:
    """What :func:`init_student` loaded: the source, its kind, the student's report and the decoder outcome."""

    source: str
    kind: str  # "umt-stage1" | "umt-stage2" | "stmvl"
    vision: LoadReport  # the student's strict load
    decoders: str  # "loaded" | why not


def _student_tensors(path: Path) -> tuple[StateDict, str]:
    """stmvl-named ``vision.*`` / ``decoders.*`` tensors of a UMT checkpoint or an stmvl model folder."""
    if path.is_dir():
        meta = _read_json(path / "config.json")
        kind = meta.get("stmvl_config_type")
        if kind not in ("ModelConfig", "VisionConfig"):
            raise WeightLoadError(f"{path}: model.vision.init needs a UMT checkpoint or an stmvl model folder "
                                  f"(config.json stmvl_config_type ModelConfig or VisionConfig), got {kind!r}")
        sd = read_state_dict(path / "model.safetensors")
        if kind == "VisionConfig":
            sd = {"vision." + k: v for k, v in sd.items()}
        return {k: v for k, v in sd.items() if k.startswith(("vision.", "decoders."))}, "stmvl"
    mapping = umt_to_stmvl(read_state_dict(path))
    if mapping.unplaced:
        raise WeightLoadError(f"{path}: UMT keys with no place in stmvl: {_shorten(mapping.unplaced)}")
    return {k: v for k, v in mapping.state_dict.items() if k.startswith(("vision.", "decoders."))}, \
        f"umt-stage{mapping.stage}"


def _head_tensors(sd: Mapping[str, torch.Tensor]) -> StateDict | None:
    """``{i}.{head, norm}.*`` of each decoder's prediction head, from linear (``decoders.i.head``) or ST
    (``decoders.i.head.head``) layouts; None when the source has no decoders."""
    heads = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] != "decoders" or len(parts) < 4:
            continue
        if parts[2] in ("head", "norm") and len(parts) == 4:  # linear: decoders.i.head.weight
            heads[".".join(parts[1:])] = value
        elif parts[2] == "head" and parts[3] in ("head", "norm") and len(parts) == 5:  # ST: decoders.i.head.head.weight
            heads[".".join([parts[1]] + parts[3:])] = value
    return heads or None


def _load_decoders(decoders: nn.ModuleList, sd: Mapping[str, torch.Tensor]) -> str:
    """Load the checkpoint's decoders when they fit exactly (the whole decoders, or their prediction heads);
    returns "loaded ..." or the reason nothing was loaded. Never a partial set of decoders."""
    from stmvl.models.decoder import LinearDecoder

    if len(decoders) == 0:
        return "the model has no decoders"
    source = _strip(sd, "decoders.")
    target = decoders.state_dict()
    if source and set(source) == set(target) and all(source[k].shape == target[k].shape for k in target):
        decoders.load_state_dict(source, strict=True)
        return f"loaded all {len(decoders)} decoders"
    heads = _head_tensors(sd)
    if heads is None:
        return "the checkpoint has no decoders"
    count = _count_indices(heads, r"^(\d+)\.")
    if count != len(decoders):
        return f"the checkpoint has {count} decoders, the model {len(decoders)} (teacher.return_layers)"
    if isinstance(decoders[0], LinearDecoder):
        wanted = dict(target)
        named = heads
    else:  # STDecoder: only its prediction head (Linear + LayerNorm, UMT's Linear_Decoder) has a counterpart
        named = {f"{k.split('.', 1)[0]}.head.{k.split('.', 1)[1]}": v for k, v in heads.items()}
        wanted = {k: target[k] for k in named if k in target}
    problems = [k for k in named if k not in wanted or wanted[k].shape != named[k].shape]
    if problems or len(named) != len(wanted):
        return f"decoder heads do not fit: {_shorten(problems)}"
    linear = isinstance(decoders[0], LinearDecoder)
    # ST decoders: every prediction head was checked above; their other parts have no UMT counterpart and keep
    # their initialisation (reported by the caller's log line)
    result = decoders.load_state_dict(named, strict=linear)
    assert not result.unexpected_keys and not set(result.missing_keys) & set(named)
    return f"loaded the prediction heads of {len(decoders)} decoders"


def init_student(model: nn.Module, source: str | Path) -> StudentInit:
    """Initialise ``model.vision`` (and ``model.decoders`` where they fit) from a UMT checkpoint (stage 1
    ``encoder.*`` / ``clip_decoder.*``, or stage 2) or an stmvl model folder.

    The student loads strictly: every VideoViT tensor must come from the checkpoint with its shape, except the
    pool norm of a UMT stage-1 file (that class has none; UMT stage 2 starts it fresh too). Anything else missing,
    extra or mis-shaped raises :class:`WeightLoadError` naming the keys. Decoders load only as a whole (every
    decoder, or every decoder's prediction head); otherwise they keep their initialisation and the log says why.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model.vision.init: student initialisation checkpoint not found: {path} "
                                "(a UMT stage-1 .pth such as b16_ptk710_f8_res224.pth, or an stmvl model folder)")
    sd, kind = _student_tensors(path)
    vision = _strip(sd, "vision.")
    allow = ("pool_norm",) if kind.startswith("umt") and not any(k.startswith("pool_norm.") for k in vision) else ()
    try:
        report = load_state_dict_strict(model.vision, vision, allow_missing=allow)
    except WeightLoadError as error:
        raise WeightLoadError(f"model.vision.init {path} does not fit the student: {error}") from None
    decoders = _load_decoders(model.decoders, sd) if hasattr(model, "decoders") else "the model has no decoders"
    fresh = " (pool_norm not in the checkpoint: freshly initialised, as UMT stage 2 does)" if report.missing else ""
    log.info("student initialised from %s (%s): %d tensors%s; decoders: %s", path, kind, len(vision), fresh, decoders)
    return StudentInit(str(path), kind, report, decoders)


# --------------------------------------------------------------------------------------------------- folders


def umt_folder_problems(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """Whether UMT-mapped tensors can be written as the STMModel folder of ``cfg``.

    Returns:
        (one line per problem that blocks the write: a tensor with no place, a shape mismatch, a missing group
        that is not optional; the optional groups that are absent, {group: why} (UMT_OPTIONAL_GROUPS)).
    """
    missing, unexpected, mismatched = check_against_model(cfg, sd)
    problems = [f"no place in STMModel: {k}" for k in unexpected] + [f"shape mismatch: {m}" for m in mismatched]
    problems += [f"missing [{g}] ({len(keys)}): {_shorten(keys)}" for g, keys in missing.items()
                 if g not in UMT_OPTIONAL_GROUPS]
    absent = {group: UMT_OPTIONAL_GROUPS[group] for group in missing if group in UMT_OPTIONAL_GROUPS}
    return problems, absent


def _write_meta(out: Path, meta: dict) -> None:
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2), encoding="utf-8"))


def write_umt_folder(mapping: UmtMapping, cfg: ModelConfig, out: str | Path, *, source: str, img_size: int,
                     num_frames: int, absent: Mapping[str, str]) -> Path:
    """Write a converted stage-2 checkpoint as an stmvl model folder (model.safetensors + config.json with the
    inference settings, the absent optional groups as ``missing_groups`` and where the tensors came from)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(mapping.state_dict, out / "model.safetensors")
    _write_meta(out, {"stmvl_config_type": "ModelConfig", "config": dataclasses.asdict(cfg), "kwargs": {},
                      "inference": {"num_frames": num_frames, "img_size": img_size, "sampling": "middle"},
                      "missing_groups": dict(absent),
                      "source": {"format": "umt", "stage": mapping.stage, "path": str(source),
                                 "ignored": mapping.ignored, "dropped_unplaced": mapping.unplaced}})
    return out


def write_umt_stage1_folder(mapping: UmtMapping, out: str | Path, *, source: str, img_size: int) -> ModelConfig:
    """A stage-1 (video-only) checkpoint has no text tower: write its tensors and the inferred config. The folder
    initialises a student (``model.vision.init``); it is not a full STMModel for load_model."""
    cfg = model_config_from_umt(mapping.state_dict, img_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(mapping.state_dict, out / "model.safetensors")
    _write_meta(out, {"stmvl_config_type": "ModelConfig", "config": dataclasses.asdict(cfg), "kwargs": {},
                      "source": {"format": "umt", "stage": 1, "path": str(source),
                                 "dropped_unplaced": mapping.unplaced},
                      "note": "UMT stage 1 holds only the video encoder and its decoders; it initialises pretraining "
                              "(model.vision.init), it is not loadable as a full STMModel"})
    return cfg


def write_umt_checkpoint(umt_sd: Mapping[str, torch.Tensor], out: str | Path, stage: int) -> Path:
    """Save UMT-named tensors as UMT does: stage 1 bare (as ``b16_ptk710_f8_res224.pth``, which UMT's stage 2
    loads without unwrapping), stage 2 as ``{"model": ...}`` (UMT's own checkpoints)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in umt_sd.items()}
    _atomic_write(out, lambda p: torch.save(tensors if stage == 1 else {"model": tensors}, p))
    return out
