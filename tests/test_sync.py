"""Host-device synchronisations of a pretraining step, counted with a patched tensor class (tests/sync_counter.py).

Before the GPU-resident step (masks from per-sample CPU generators, VTM negatives drawn on the CPU, MLM masking on
the CPU, boolean-mask token gathers) one video step of a demo-shaped model made 25 such calls; now the model makes one (the
MLM head's selection of the masked positions) and the engine one more (the step-skip decision)."""

from __future__ import annotations

from collections import Counter

import torch

from stmvl.models.config import LossConfig, MaskConfig, ModelConfig, PredictorConfig, TeacherConfig, TextConfig
from stmvl.models.stm import STMModel
from stmvl.models.vit import vit_config
from sync_counter import count_syncs


def _model(mlm: float = 1.0) -> STMModel:
    cfg = ModelConfig(
        vision=vit_config("tiny", img_size=32, patch_size=8, width=32, depth=2, heads=2, drop_path=0.0, stem="diff"),
        teacher=TeacherConfig(img_size=32, patch_size=8, width=32, layers=2, heads=2, embed_dim=16, return_layers=1),
        text=TextConfig(hidden=32, layers=2, heads=2, intermediate=64, fusion_start=1, max_length=12, dropout=0.0),
        predictor=PredictorConfig(dim=16, hidden=16, head_hidden=8),
        mask=MaskConfig(video_strategy="stm", image_strategy="attention_inverse"),
        loss=LossConfig(mlm=mlm, temporal_negatives=True, foil_negatives=True),
        embed_dim=16,
    )
    torch.manual_seed(0)
    return STMModel(cfg).train()


def _batch(model: STMModel, frames: int) -> dict:
    b = 4
    tokens = model.tokenizer(["a red circle moves left"] * b)
    foil = model.tokenizer(["a red circle moves right"] * b)
    return {"video": torch.rand(b, frames, 3, 32, 32), **tokens, "foil_input_ids": foil["input_ids"],
            "foil_attention_mask": foil["attention_mask"], "sample_id": torch.arange(b),
            "media": "video" if frames > 1 else "image"}


def _count(model: STMModel, batch: dict) -> tuple[int, Counter]:
    model(batch, step=0)["loss"].backward()  # first call: lazy set-up (tokenizer, caches) is not a step's cost
    where: Counter = Counter()
    with count_syncs(where) as counts:
        model(batch, step=1)["loss"].backward()
    return sum(counts.values()), where


def test_a_video_step_reads_back_only_the_mlm_selection():
    model = _model()
    total, where = _count(model, _batch(model, 4))
    assert total == 1 and list(where) == [next(k for k in where if k.startswith("nonzero @ stm.py"))], where


def test_without_mlm_and_on_images_nothing_is_read_back():
    model = _model(mlm=0.0)
    assert _count(model, _batch(model, 4)) == (0, Counter())
    assert _count(model, _batch(model, 1))[0] == 0
