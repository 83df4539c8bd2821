"""Hugging Face BERT (``BertModel`` / ``BertForMaskedLM``, also UMT's ``text_encoder.bert.*``) <-> stmvl BertEncoder."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping

import torch

from stmvl.models.config import TextConfig
from stmvl.models.weights.core import (
    StateDict,
    WeightLoadError,
    _folder_weights,
    _read_json,
    _Renamer,
    _Rule,
    load_state_dict_strict,
)

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


def load_bert(folder: str | Path, fusion_start: int | None = None, cross_width: int | None = None,
              dropout: float | None = None):
    """Load a HF BERT folder (config.json + model.safetensors | pytorch_model.bin) into a BertEncoder.

    ``fusion_start=None`` gives no fusion layers (``module(ids, mask)`` runs every layer); otherwise layers
    ``[fusion_start, L)`` get new, randomly initialised cross-attention of width ``cross_width``. ``dropout=None``
    keeps the file's ``hidden_dropout_prob``; a value replaces it (dropout is a setting of the run, not of the
    weights: a run config's ``text.dropout`` must reach the model). A checkpoint
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
    if dropout is not None:
        cfg = dataclasses.replace(cfg, dropout=float(dropout))
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


