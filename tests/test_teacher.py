"""stmvl.models.teacher: the frozen CLIP teacher (parity with transformers lives in test_weights.py)."""

import math

import pytest
import torch

from stmvl.models.config import TeacherConfig
from stmvl.models.teacher import CLIPTeacher

CFG = dict(img_size=32, patch_size=8, width=64, layers=3, heads=4, embed_dim=24, return_layers=2)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return CLIPTeacher(TeacherConfig(**CFG, input_norm="none"))


def _reference_forward(t: CLIPTeacher, frames: torch.Tensor):
    """Explicit-softmax CLIP forward on frames [F, 3, H, W] (no SDPA), for checking the module."""
    tokens, gh, gw = t.patch_tokens(frames)
    x = torch.cat([t.class_embedding.expand(len(frames), 1, -1), tokens], 1) + t.position_embedding(gh, gw)
    x = t.ln_pre(x)
    outs, attn = [], None
    for block in t.blocks:
        q, k, v = block.attn.project_qkv(block.ln_1(x))
        p = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        attn = p[:, :, 0, 1:].mean(1)
        x = x + block.attn.proj((p @ v).transpose(1, 2).flatten(2))
        x = x + block.mlp(block.ln_2(x))
        outs.append(t.proj(t.ln_post(x[:, 1:])))
    return torch.stack(outs), attn, tokens


def test_outputs_match_explicit_reference(teacher):
    video = torch.rand(2, 3, 3, 32, 32)
    out = teacher(video)
    assert out.targets.shape == (2, 2, 3 * 16, 24)
    assert out.attn.shape == (6, 16) and out.tokens.shape == (2, 3, 16, 64)
    layers, attn, tokens = _reference_forward(teacher, video.flatten(0, 1))
    assert torch.allclose(out.targets, layers[-2:].reshape(2, 2, 48, 24), atol=1e-5)
    assert torch.allclose(out.attn, attn, atol=1e-6)
    assert torch.allclose(out.tokens, tokens.view(2, 3, 16, 64), atol=1e-6)


def test_frozen_eval_and_no_grads(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    video = torch.rand(1, 2, 3, 32, 32, requires_grad=True)
    out = teacher(video)
    assert not out.targets.requires_grad
    student = torch.nn.Linear(24, 24)
    (student(out.targets) - 1).square().mean().backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_position_embedding_interpolation(teacher):
    same = teacher.position_embedding(4, 4)
    assert same is teacher.positional_embedding
    bigger = teacher.position_embedding(6, 5)
    assert bigger.shape == (31, 64)
    assert torch.equal(bigger[0], teacher.positional_embedding[0])
    # Bicubic resampling of a constant grid is that constant.
    flat = CLIPTeacher(TeacherConfig(**CFG))
    with torch.no_grad():
        flat.positional_embedding[1:] = 0.25
    assert torch.allclose(flat.position_embedding(6, 5)[1:], torch.full((30, 64), 0.25), atol=1e-6)
    out = teacher(torch.rand(1, 2, 3, 48, 40))
    assert out.targets.shape == (2, 1, 2 * 30, 24) and out.attn.shape == (2, 30)


def test_input_norm_and_temporal_fusion():
    torch.manual_seed(0)
    clip = CLIPTeacher(TeacherConfig(**CFG, input_norm="clip"))
    raw = CLIPTeacher(TeacherConfig(**CFG, input_norm="none"))
    raw.load_state_dict(clip.state_dict())
    video = torch.rand(1, 2, 3, 32, 32)
    normalised = (video - clip.mean[None]) / clip.std[None]
    assert torch.allclose(clip(video).targets, raw(normalised).targets, atol=1e-5)
    fused = CLIPTeacher(TeacherConfig(**CFG, input_norm="clip", temporal_fusion=True))
    assert not any(p.requires_grad for p in fused.parameters())
    fused.load_state_dict({**clip.state_dict(), **{k: v for k, v in fused.state_dict().items() if k.startswith("temporal.")}})
    base, out = clip(video), fused(video)
    assert not torch.allclose(base.targets, out.targets)
    assert torch.equal(base.attn, out.attn)
    # Fusion = blocks(x + frame_pos) + x over T at each position: with the blocks' residual branches zeroed,
    # every target becomes 2 * target + its frame's position embedding.
    with torch.no_grad():
        for block in fused.temporal.blocks:
            block.attn.proj.weight.zero_(), block.attn.proj.bias.zero_()
            block.mlp.fc2.weight.zero_(), block.mlp.fc2.bias.zero_()
    pos = fused.temporal.frame_position_embeddings.weight[:2].repeat_interleave(16, dim=0)
    assert torch.allclose(fused(video).targets, 2 * base.targets + pos, atol=1e-5)
    with pytest.raises(ValueError, match="input_norm"):
        CLIPTeacher(TeacherConfig(**CFG, input_norm="zscore"))
