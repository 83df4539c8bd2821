"""Train the demo's tiny CLIP image teacher (locked-text contrastive training, as in LiT).

No CLIP weights can be downloaded, so the demo makes its own teacher: a small CLIP image tower (the same
`CLIPTeacher` architecture the real CLIP weights load into) trained on single frames of the synthetic corpus against
the frozen real MiniLM text tower (mean-pooled sentence embeddings). The result is saved as an stmvl teacher folder
that `model.teacher.weights` points to.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stmvl.config import ConfigError, RunConfig
from stmvl.models.teacher import CLIPTeacher
from stmvl.models.text import token_keys
from stmvl.models.weights import load_bert, save_model
from stmvl.models.stm import text_weights_folder
from stmvl.train.engine import TrainContext, unwrap_model

from .data import StreamTask, corpus_texts, pretrain_stream, tokenizer_for

logger = logging.getLogger(__name__)


def same_text_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Soft targets [B, B]: rows spread evenly over the samples with an identical caption (static captions repeat)."""
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1).float()
    return same / same.sum(1, keepdim=True)


CAPTION_BATCH = 256  # captions per frozen-text forward in TeacherTask.prepare


class LockedTextCLIP(nn.Module):
    """A trainable CLIPTeacher image tower + a frozen BERT text tower + a learnable logit scale."""

    def __init__(self, teacher: CLIPTeacher, text: nn.Module):
        super().__init__()
        self.image = teacher.requires_grad_(True)
        self.text = text.requires_grad_(False)
        if teacher.cfg.embed_dim != text.hidden:
            raise ConfigError(f"model.teacher.embed_dim ({teacher.cfg.embed_dim}) must equal the text width "
                              f"({text.hidden}) for locked-text training")
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
        self._cache: dict[bytes, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "LockedTextCLIP":
        nn.Module.train(self, mode)
        nn.Module.train(self.image, mode)  # CLIPTeacher.train() pins eval mode; here it is the student
        self.text.eval()
        return self

    @torch.no_grad()
    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled frozen sentence embedding [B, H] (how MiniLM sentence embeddings are made).

        The tower is frozen and dropout-free here, so each distinct caption is encoded once and cached: the static
        image captions repeat a lot, and the text tower would otherwise cost more than the image tower.
        """
        keys = token_keys(ids, mask)
        missing = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in self._cache]
        if missing:
            unique = list(dict.fromkeys(keys))
            rows = [keys.index(unique[i]) for i in missing]
            states = self.text(ids[rows], mask[rows]).float()
            m = mask[rows].unsqueeze(-1).float()
            pooled = F.normalize((states * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)
            for i, vector in zip(missing, pooled):
                self._cache[unique[i]] = vector
        return torch.stack([self._cache[k] for k in keys])

    def forward(self, batch: dict) -> torch.Tensor:
        """Symmetric contrastive loss of the frames (first frame of each item) against their captions."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image = F.normalize(self.image.image_embedding(batch["video"][:, 0]).float(), dim=-1)
        text = self.text_embedding(ids, mask)
        logits = self.logit_scale.clamp(max=4.6052).exp() * image @ text.t()
        targets = same_text_targets(ids)
        return 0.5 * (torch.sum(-targets * logits.log_softmax(1), 1).mean()
                      + torch.sum(-targets * logits.t().log_softmax(1), 1).mean())


def teacher_data_config(cfg: RunConfig) -> RunConfig:
    """The run config restricted to the image-text corpora (the teacher is an image tower)."""
    images = [c for c in cfg.data.corpora if c.kind == "pretrain" and c.media_type == "image"]
    if not images:
        raise ConfigError("train-teacher needs at least one image corpus (media_type: image) in data.corpora")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpora=images))


class TeacherTask(StreamTask):
    """Engine task: locked-text training of the teacher image tower; `export` writes the teacher folder."""

    frozen_submodules = ("text",)

    def __init__(self, cfg: RunConfig):
        self.cfg = teacher_data_config(cfg)
        self.ctx: TrainContext | None = None
        self.stream = None

    def build_model(self) -> nn.Module:
        tcfg = dataclasses.replace(self.cfg.model.teacher, weights=None)
        folder = text_weights_folder(self.cfg.model.text)
        if folder is None:
            raise ConfigError("train-teacher needs pretrained text weights (model.text.weights, e.g. 'minilm')")
        return LockedTextCLIP(CLIPTeacher(tcfg), load_bert(folder))

    def build_stream(self):
        ctx = self.ctx
        return pretrain_stream(self.cfg, ctx.run_dir, tokenizer_for(self.cfg.model.text), ctx.rank, ctx.world_size)

    def train_step(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return {"loss": model(batch)}

    def prepare(self, model: nn.Module) -> None:
        """Encode every distinct caption of the image corpora once, before the first step.

        The text tower is frozen, so this is the same work the cache would do lazily; done up front, every step
        costs the same and the engine's one counted step per kind gives exact FLOPs (a lazily filled cache makes
        the first step, the one counted, many times dearer than the rest). Shard corpora, which have no annotation
        file to read, keep the lazy cache."""
        texts = sorted(corpus_texts(self.cfg), key=len)  # batches of similar lengths pad little
        tokenizer = tokenizer_for(self.cfg.model.text)
        device = next(model.parameters()).device
        for start in range(0, len(texts), CAPTION_BATCH):
            tokens = tokenizer(texts[start:start + CAPTION_BATCH])
            model.text_embedding(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        logger.info("teacher: %d distinct captions encoded by the frozen text tower", len(texts))

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        return {}


def export_teacher(model: nn.Module, out_dir: str | Path) -> Path:
    """Save the trained image tower as an stmvl teacher folder (frozen again when loaded)."""
    teacher = unwrap_model(model).image
    return save_model(teacher, teacher.cfg, out_dir)
