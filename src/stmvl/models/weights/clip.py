"""CLIP image towers -> stmvl CLIPTeacher: OpenAI (TorchScript ``.pt`` archives or state dicts), open_clip (state
dicts and hub folders), Hugging Face CLIP folders, UMT's extracted visual encoders and ActionCLIP checkpoints
(visual tower + temporal ``visual_prompt`` fusion).

Security note: OpenAI publishes CLIP as TorchScript archives, which ``torch.load(weights_only=True)`` refuses.
Reading one with ``torch.jit.load`` deserialises TorchScript code, so stmvl does that only for the file a user named
as teacher weights (``model.teacher.weights`` / :func:`load_clip_vision`), never for files it finds by itself;
every other checkpoint is read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import torch

from stmvl.models.config import TeacherConfig
from stmvl.models.weights.core import (
    StateDict,
    WeightLoadError,
    _count_indices,
    _folder_weights,
    _read_json,
    _rename_all,
    _Renamer,
    _Rule,
    _transpose,
    _unwrap,
    is_torchscript_archive,
    load_state_dict_strict,
    read_pickle_object,
    read_state_dict,
)
from stmvl.models.weights.stmvl import _is_stmvl_dir, load_model_dir

log = logging.getLogger(__name__)

# ActionCLIP's temporal transformer normalises with its own TF-style LayerNorm (eps inside the sqrt, 1e-12).
ACTIONCLIP_FUSION_EPS = 1e-12


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


def conv1_as_2d(weight: torch.Tensor, key: str = "conv1.weight") -> torch.Tensor:
    """CLIP's patch embedding as the Conv2d weight ``[W, 3, p, p]``; UMT's teacher stores a Conv3d ``[W, 3, 1, p, p]``
    (temporal kernel 1 = the same per-frame convolution), any other temporal kernel is refused."""
    if weight.dim() == 4:
        return weight
    if weight.dim() == 5 and weight.shape[2] == 1:
        return weight[:, :, 0]
    raise WeightLoadError(f"{key} {list(weight.shape)}: expected a Conv2d [W, 3, p, p] or a Conv3d [W, 3, 1, p, p] "
                          "(the teacher embeds each frame on its own)")


def openai_clip_to_stmvl(
    sd: Mapping[str, torch.Tensor], prefix: str = "visual.", include_fusion: bool = True
) -> tuple[StateDict, list[str]]:
    """Map OpenAI/open_clip ``visual.*`` keys (and ActionCLIP ``fusion_model.*`` when ``include_fusion``) to
    CLIPTeacher names. Returns ``(mapped, unplaced keys)``; other keys (the text tower) are not looked at.
    A 5-D ``conv1.weight`` (UMT's Conv3d teacher) becomes the 4-D Conv2d weight.
    """
    mapped, unplaced = _rename_all(sd, _OPENAI_CLIP, prefix, "")
    stray = [k for k in mapped if k.startswith("temporal.")]
    if stray:
        raise WeightLoadError(f"fusion weights found under {prefix!r}: {stray[:5]}")
    if "conv1.weight" in mapped:
        mapped["conv1.weight"] = conv1_as_2d(mapped["conv1.weight"], prefix + "conv1.weight")
    if include_fusion:
        fusion = {k: v for k, v in sd.items() if k.startswith("fusion_model.")}
        fused, fusion_unplaced = _rename_all(fusion, _OPENAI_CLIP, "", "")
        mapped.update(fused)
        unplaced += fusion_unplaced
    return mapped, unplaced


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


# --------------------------------------------------------------------------------------------------- CLIP loader


def teacher_config_from_state(sd: Mapping[str, torch.Tensor], heads: int | None = None, **extra) -> TeacherConfig:
    """Infer a TeacherConfig from CLIPTeacher-named tensors: width, patch, grid, depth, MLP width, projection width
    and the temporal fusion's size all come from shapes (heads default to width / 64, the CLIP rule)."""
    for needed in ("conv1.weight", "positional_embedding", "proj.weight"):
        if needed not in sd:
            raise WeightLoadError(f"CLIP vision weights lack {needed!r}; found e.g. {sorted(sd)[:8]}")
    conv = sd["conv1.weight"]
    if conv.dim() != 4:
        raise WeightLoadError(f"conv1.weight {list(conv.shape)}: expected a Conv2d weight [W, 3, p, p]")
    width, _, patch, _ = conv.shape
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
    if "blocks.0.mlp.fc1.weight" in sd:
        hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
        values["mlp_width"] = None if hidden == 4 * width else hidden
    if fusion_layers:
        values.update(temporal_fusion=True, temporal_fusion_layers=fusion_layers,
                      max_frames=sd["temporal.frame_position_embeddings.weight"].shape[0])
    values.update(extra)
    return TeacherConfig(**values)


def read_torchscript_state_dict(path: str | Path) -> StateDict:
    """Tensors of a TorchScript archive (OpenAI's CLIP ``.pt`` files), loaded on the CPU.

    TorchScript archives are code, not only data: call this only for a file the user named (see the module note).
    """
    module = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _strip_module(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop the ``module.`` prefix DataParallel/DDP training adds."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _actionclip_state(obj: Mapping, source: Path) -> StateDict:
    """ActionCLIP checkpoint {model_state_dict: CLIP (``visual.*`` + text tower), fusion_model_state_dict:
    ``visual_prompt`` (``frame_position_embeddings``, ``transformer.resblocks.i.*``)} -> one flat dict with the
    fusion under ``fusion_model.`` (the OpenAI-side name the renamer knows)."""
    for part in ("model_state_dict", "fusion_model_state_dict"):
        if not isinstance(obj.get(part), Mapping):
            raise WeightLoadError(f"{source}: ActionCLIP checkpoint without a {part!r} mapping")
    flat = _strip_module(_unwrap(obj["model_state_dict"], f"{source}:model_state_dict"))
    fusion = _strip_module(_unwrap(obj["fusion_model_state_dict"], f"{source}:fusion_model_state_dict"))
    flat.update({"fusion_model." + k: v for k, v in fusion.items()})
    return flat


def _file_state(source: Path) -> tuple[StateDict, dict]:
    """A CLIP file's tensors in the OpenAI layout and config hints (TorchScript, ActionCLIP or a state dict)."""
    if is_torchscript_archive(source):
        log.info("%s: OpenAI TorchScript archive, read with torch.jit.load (a file the user named)", source)
        return read_torchscript_state_dict(source), {}
    if source.suffix == ".safetensors":
        return _strip_module(read_state_dict(source)), {}
    obj = read_pickle_object(source)
    if isinstance(obj, Mapping) and "fusion_model_state_dict" in obj:
        return _actionclip_state(obj, source), {"temporal_fusion_norm_eps": ACTIONCLIP_FUSION_EPS}
    return _strip_module(_unwrap(obj, str(source))), {}


def _open_clip_folder(source: Path) -> tuple[StateDict, dict]:
    """An open_clip hub folder: ``open_clip_config.json`` + ``open_clip_model.safetensors`` | ``..._pytorch_model.bin``."""
    model_cfg = _read_json(source / "open_clip_config.json").get("model_cfg", {})
    sd = _folder_weights(source, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    # open_clip builds nn.GELU unless the model config asks for QuickGELU (OpenAI-trained weights)
    return sd, {"act": "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"}


def _openai_prefix(sd: Mapping[str, torch.Tensor], source: Path) -> str:
    """``visual.`` for full CLIP state dicts; ``""`` for a bare visual tower (UMT's extract.ipynb ``vit_b16.pth``)."""
    if any(k.startswith("visual.") for k in sd):
        return "visual."
    if "conv1.weight" in sd and any(k.startswith("transformer.resblocks.") for k in sd):
        return ""
    raise WeightLoadError(f"{source}: no 'visual.*' (or bare conv1/transformer.resblocks) keys; is this a CLIP "
                          f"image tower? first keys: {sorted(sd)[:6]}")


def _clip_state_from_source(source: Path) -> tuple[StateDict, dict[str, str], dict]:
    """CLIPTeacher-named tensors, ignored keys and config hints from a HF / open_clip folder or a CLIP file."""
    if not source.exists():
        raise FileNotFoundError(f"CLIP teacher weights not found: {source} (an OpenAI .pt, a CLIP state dict, an "
                                "ActionCLIP checkpoint, a HF CLIP folder or an open_clip folder)")
    if source.is_dir() and (source / "open_clip_config.json").is_file():
        sd, hints = _open_clip_folder(source)
    elif source.is_dir():
        config = _read_json(source / "config.json")
        vision = config.get("vision_config", config)
        hints = dict(heads=vision.get("num_attention_heads"), act=vision.get("hidden_act", "quick_gelu"),
                     norm_eps=vision.get("layer_norm_eps", 1e-5))
        mapped, ignored, unplaced = hf_clip_to_stmvl(_folder_weights(source))
        if unplaced:
            raise WeightLoadError(f"{source}: CLIP keys with no place in the teacher: {unplaced}")
        return mapped, ignored, {k: v for k, v in hints.items() if v is not None}
    else:
        sd, hints = _file_state(source)
    prefix = _openai_prefix(sd, source)
    mapped, unplaced = openai_clip_to_stmvl(sd, prefix=prefix)
    # with a bare tower (prefix "") every key is renamed, so anything foreign is already in `unplaced`
    ignored = {k: "not part of the vision tower" for k in sd
               if prefix and not k.startswith(prefix) and not k.startswith("fusion_model.")}
    if unplaced:
        raise WeightLoadError(f"{source}: CLIP keys with no place in the teacher: {unplaced}")
    return mapped, ignored, {"act": "quick_gelu", **hints}


_FUSION_SIZES = ("temporal_fusion_layers", "max_frames", "temporal_fusion_norm_eps")


def load_clip_vision(source: str | Path, allow_missing: Iterable[str] = (), **cfg_overrides):
    """A frozen CLIPTeacher from OpenAI's TorchScript ``.pt``, an OpenAI/open_clip state dict (``visual.*``), UMT's
    extracted visual tower (bare keys), an ActionCLIP checkpoint (with its temporal fusion), a HF CLIP folder
    (``vision_model.*`` + ``visual_projection``), an open_clip hub folder, or an stmvl teacher folder written by
    :func:`save_model`.

    Sizes are inferred from the tensor shapes; ``cfg_overrides`` set the rest (``return_layers``,
    ``input_norm``, ``temporal_fusion``, ...). With ``temporal_fusion=True`` and no fusion weights in the
    source, pass ``allow_missing=("temporal",)`` to accept a randomly initialised fusion; a source with fusion
    weights and ``temporal_fusion=False`` is an error (the weights would be dropped).
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
    has_fusion = any(k.startswith("temporal.") for k in mapped)
    if has_fusion and cfg_overrides.get("temporal_fusion") is False:
        raise WeightLoadError(f"{source} holds ActionCLIP temporal fusion weights (fusion_model.*); set "
                              "teacher.temporal_fusion: true to use them")
    if has_fusion:
        # the fusion's sizes are the file's; only its eps (not stored in any checkpoint) may be set by the caller
        clash = {k: v for k, v in cfg_overrides.items() if k in _FUSION_SIZES[:2]}
        if clash:
            raise WeightLoadError(f"{source}: the temporal fusion's size comes from its weights; drop {sorted(clash)}")
    hints.update(cfg_overrides)
    cfg = teacher_config_from_state(mapped, weights=str(source), **hints)
    model = CLIPTeacher(cfg)
    model.load_report = load_state_dict_strict(model, mapped, allow_missing=allow_missing, ignored=ignored)
    log.info("CLIP teacher from %s: width %d, %d layers, patch %d, embed %d%s", source, cfg.width, cfg.layers,
             cfg.patch_size, cfg.embed_dim, f", temporal fusion {cfg.temporal_fusion_layers} layers" if has_fusion else "")
    return model
