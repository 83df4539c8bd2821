"""The pretraining task (STM or UMT by preset) for the one engine: mixed video/image batches -> STMModel losses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from stmvl.config import RunConfig, config_to_dict, load_config, load_recipe_dict, apply_overrides
from stmvl.models.stm import LOSS_NAMES, STMModel, apply_preset, needs_teacher
from stmvl.train.engine import TrainContext, unwrap_model

from .data import StreamTask, corpus_texts, pretrain_stream, tokenizer_for
from .evaluation import evaluate_corpora

logger = logging.getLogger(__name__)


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    keys = []
    for k, v in tree.items():
        keys += _dotted_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def explicit_model_keys(recipe: str | None, overrides: Sequence[str]) -> list[str]:
    """Dotted keys under `model.` that the recipe or the overrides set (they win over the preset's values)."""
    tree = load_recipe_dict(recipe) if recipe else {}
    tree = apply_overrides(tree, list(overrides))
    return [k for k in _dotted_keys(tree.get("model", {})) if k != "preset"]


def load_run_config(recipe: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """load_config + the model preset (stm | umt) applied under the keys the user set explicitly."""
    cfg = load_config(recipe, list(overrides))
    cfg.model = apply_preset(cfg.model, cfg.model.preset, explicit=explicit_model_keys(recipe, overrides))
    return cfg


class PretrainTask(StreamTask):
    """STM / UMT pretraining. Batches come from a MixedBatchStream (one media type per step, resumable)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.reads_teacher_weights = needs_teacher(cfg.model)
        self.ctx: TrainContext | None = None
        self.stream = None
        self.total_steps = 0
        self.last_results: dict[str, Any] = {}

    # engine hooks ------------------------------------------------------------------------------------------

    def frozen_submodules(self) -> tuple[str, ...]:
        # a run without MVM and without attention-based masks (VTC + VTM + MLM only) builds no teacher
        return ("teacher",) if needs_teacher(self.cfg.model) else ()

    def build_model(self) -> nn.Module:
        cfg = self.cfg.model
        if self.ctx is not None and self.ctx.grad_checkpointing:
            cfg.vision.grad_checkpointing = True
        model = STMModel(cfg)
        init = self.cfg.runtime.init_from
        if init:
            from stmvl.models.weights import load_state_dict_strict
            from stmvl.train.checkpoint import load_weights, latest_checkpoint

            path = Path(init)
            weights = path / "model.safetensors" if (path / "model.safetensors").exists() else latest_checkpoint(path)
            state = load_weights(weights if weights.name == "model.safetensors" else weights / "model.safetensors")
            load_state_dict_strict(model, state, allow_missing=("teacher",))
        return model

    def build_stream(self):
        ctx = self.ctx
        return pretrain_stream(self.cfg, ctx.run_dir, tokenizer_for(self.cfg.model.text), ctx.rank, ctx.world_size)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return unwrap_model(model).param_groups(self.cfg.optim.lr, self.cfg.optim.weight_decay)

    def train_step(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        total = max(1, self.ctx.total_steps)
        out = model(batch, step=step, progress=step / total)
        media = batch["media"]
        # per-media names so video and image losses are not averaged together in the logs; non-losses (the mask
        # lambda) keep a name without "loss" so reports do not plot them as losses
        named = {(f"loss_{media}_{k}" if k in LOSS_NAMES else f"{media}_{k}"): v.detach()
                 for k, v in out.items() if k != "loss"}
        return {"loss": out["loss"], **named}

    def prepare(self, model: nn.Module) -> None:
        """With model.text.cache_states, encode every distinct caption (and foil, when foil negatives are on) of
        the annotation-file corpora once, before the first step, so that every step costs the same and the engine's
        one counted step per kind gives exact FLOPs. Captions of shard corpora are encoded when first seen."""
        model = unwrap_model(model)
        if getattr(model, "text_cache", None) is None:
            return
        fields = ("caption", "foil") if self.cfg.model.loss.foil_negatives else ("caption",)
        added = model.cache_captions(corpus_texts(self.cfg, fields), tokenizer_for(self.cfg.model.text))
        logger.info("pretrain: text-only states of %d distinct captions cached (text.cache_states, %.0f MiB)", added,
                    model.text_cache.nbytes / 2**20)

    def checkpoint_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # the teacher is frozen and reloaded from its own weights; keeping it out halves the checkpoint
        return {k: v for k, v in unwrap_model(model).state_dict().items() if not k.startswith("teacher.")}

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        # kept nested (the engine logs a flattened copy) for reports
        # the final evaluation also keeps each retrieval corpus' similarity matrix (<run>/similarity/<name>.pt)
        keep = self.ctx.finished and self.ctx.rank == 0
        self.last_results = evaluate_corpora(unwrap_model(model), self.cfg, self.ctx.device,
                                             autocast=self.ctx.precision == "bf16", final=self.ctx.finished,
                                             similarity_dir=Path(self.ctx.run_dir) / "similarity" if keep else None)
        return self.last_results


def export_model(model: nn.Module, cfg: RunConfig, out_dir: Path) -> Path:
    """Write the trained model as a model dir (model.safetensors + config.json) loadable by stmvl.load_model."""
    from stmvl.models.weights import save_model

    model = unwrap_model(model)
    extra = {"run_config": config_to_dict(cfg), "inference": {"num_frames": cfg.eval.num_frames,
             "img_size": cfg.eval.img_size or cfg.data.img_size, "sampling": cfg.eval.sampling}}
    return save_model(model, cfg.model, out_dir, extra=extra)
