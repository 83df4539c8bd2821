"""The demo teacher: locked-text contrastive training of a CLIP image tower against frozen MiniLM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stmvl.data.text import Tokenizer, minilm_folder
from stmvl.models.config import TeacherConfig
from stmvl.models.teacher import CLIPTeacher
from stmvl.models.weights import load_bert
from stmvl.tasks.teacher import LockedTextCLIP, same_text_targets


def test_same_text_targets_spread_over_identical_captions():
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 5, 2]])
    expected = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    assert torch.equal(same_text_targets(ids), expected)


def test_locked_text_training_learns_and_caches_exact_text_embeddings():
    torch.manual_seed(0)
    text = load_bert(minilm_folder())
    teacher = CLIPTeacher(TeacherConfig(img_size=16, patch_size=8, width=32, layers=2, heads=2, embed_dim=text.hidden,
                                        return_layers=1))
    model = LockedTextCLIP(teacher, text).train()
    tok = Tokenizer(None, 16)
    captions = ["a small red circle", "a large blue square", "a green star", "a yellow triangle"]
    tokens = tok(captions * 2)
    # each caption gets its own constant colour image: learnable, and exact for the cache check below
    colours = torch.rand(4, 3, 1, 1).repeat(2, 1, 16, 16)
    batch = {"video": colours.unsqueeze(1), "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    direct = text(tokens["input_ids"], tokens["attention_mask"])
    m = tokens["attention_mask"].unsqueeze(-1).float()
    direct = F.normalize((direct * m).sum(1) / m.sum(1), dim=-1)
    assert torch.allclose(model.text_embedding(tokens["input_ids"], tokens["attention_mask"]), direct, atol=1e-6)
    assert len(model._cache) == 4  # duplicates encoded once

    params = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in model.text.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    # 2 copies of each caption: the floor of the soft-target loss is log(2)
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 0.9
