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


def test_teacher_resizes_frames_to_the_students_grid_as_umt(teacher):
    """A 224 px student with patch 16 has a 14x14 grid; a patch-14 teacher must see 196 px (UMT's clip_img_size)."""
    import torch.nn.functional as F

    video = torch.rand(1, 2, 3, 40, 40)
    out = teacher(video, grid=(4, 4))  # this teacher's patch is 8: 4x4 tokens means 32 px frames
    resized = F.interpolate(video.reshape(2, 3, 40, 40), size=(32, 32), mode="bicubic", align_corners=False)
    expected = teacher(resized.reshape(1, 2, 3, 32, 32))
    assert out.attn.shape == (2, 16) and torch.equal(out.targets, expected.targets)
    assert torch.equal(teacher(video, grid=(5, 5)).targets, teacher(video).targets)  # already that size


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


# --------------------------------------------------------------------------------------------------- ActionCLIP


class _TFLayerNorm(torch.nn.Module):
    """STM actionclip.py LayerNorm: TF style, eps inside the square root, 1e-12."""

    def __init__(self, hidden_size, eps=1e-12):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + self.variance_epsilon)) + self.bias


class _FusionBlock(torch.nn.Module):
    """actionclip.py ResidualAttentionBlock (QuickGELU MLP 4x, nn.MultiheadAttention)."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = _TFLayerNorm(d_model)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(d_model, d_model * 4))
        self.mlp.add_module("c_proj", torch.nn.Linear(d_model * 4, d_model))
        self.ln_2 = _TFLayerNorm(d_model)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class _VisualPrompt(torch.nn.Module):
    """actionclip.py visual_prompt("Transf"): frame table of context_length rows, 6 blocks at the CLIP embed width,
    text_width // 64 heads, residual around the stack."""

    def __init__(self, embed_dim=512, context_length=77, text_width=512):
        super().__init__()
        self.frame_position_embeddings = torch.nn.Embedding(context_length, embed_dim)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.Sequential(*[_FusionBlock(embed_dim, text_width // 64) for _ in range(6)])
        for p in self.parameters():  # visual_prompt.init_weights: normal(0, 0.02) on Linear/Embedding, then trained
            torch.nn.init.normal_(p, std=0.02)
        for block in self.transformer.resblocks:
            for ln in (block.ln_1, block.ln_2):
                torch.nn.init.normal_(ln.weight, 1.0, 0.1)

    def forward(self, x):  # x [b, t, c]
        original = x
        x = x + self.frame_position_embeddings(torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1))
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return x + original


def _write_actionclip(path):
    """An ActionCLIP checkpoint as ActionCLIP saves it (STM's actionclip.py reads these two entries): a small CLIP
    image tower (embed 512) in OpenAI names plus text-tower keys, and a DataParallel-saved visual_prompt."""
    from stmvl.models.weights import stmvl_to_openai_clip

    torch.manual_seed(0)
    cfg = TeacherConfig(img_size=32, patch_size=8, width=128, layers=2, heads=2, embed_dim=512, return_layers=2,
                        input_norm="none")
    tower = CLIPTeacher(cfg)  # its forward is checked against explicit CLIP above; its weights in OpenAI names:
    visual, unplaced = stmvl_to_openai_clip(tower.state_dict())
    assert unplaced == []
    fusion = _VisualPrompt().eval()
    text = {"text_projection": torch.randn(512, 512), "positional_embedding": torch.randn(77, 512),
            "token_embedding.weight": torch.randn(100, 512), "ln_final.weight": torch.ones(512),
            "transformer.resblocks.0.ln_1.weight": torch.ones(512), "logit_scale": torch.tensor(4.6)}
    torch.save({"epoch": 3, "model_state_dict": {**visual, **text},
                "fusion_model_state_dict": {"module." + k: v for k, v in fusion.state_dict().items()}}, path)
    return tower, fusion


def test_actionclip_checkpoint_loads_as_teacher_with_its_temporal_fusion(tmp_path):
    """STM's teacher: ActionCLIP's visual tower, then visual_prompt over T at each position of each returned layer
    (stm.py: rearrange 'k b (t n) d -> (k b n) t d', fusion_model, back)."""
    from stmvl.models.weights import load_clip_vision

    tower, fusion = _write_actionclip(tmp_path / "actionclip_vit-b-16-8f.pt")
    teacher = load_clip_vision(tmp_path / "actionclip_vit-b-16-8f.pt", temporal_fusion=True, return_layers=2,
                               input_norm="none")
    c = teacher.cfg
    assert (c.temporal_fusion, c.temporal_fusion_layers, c.max_frames, c.temporal_fusion_norm_eps) == (True, 6, 77, 1e-12)
    assert teacher.temporal.blocks[0].attn.heads == 8  # ActionCLIP: text width 512 // 64
    video = torch.rand(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = tower(video).targets  # [K, B, T*N, C]
    k, b, tn, ch = plain.shape
    per_position = plain.view(k, b, 4, tn // 4, ch).permute(0, 1, 3, 2, 4).reshape(-1, 4, ch)
    with torch.no_grad():
        expected = fusion(per_position).view(k, b, tn // 4, 4, ch).permute(0, 1, 3, 2, 4).reshape(k, b, tn, ch)
    got = teacher(video).targets
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)
    image = video[:, :1]  # images are not fused (STM's fusion_model runs on video batches only)
    torch.testing.assert_close(teacher(image).targets, tower(image).targets)
    with pytest.raises(Exception, match="temporal_fusion: true"):
        load_clip_vision(tmp_path / "actionclip_vit-b-16-8f.pt", temporal_fusion=False)


def test_a_model_built_on_the_actionclip_teacher_saves_and_loads(tmp_path):
    """The recipe names only the file and temporal_fusion: true; the saved folder records the teacher as built
    (6 fusion layers, 77-row table, eps 1e-12), so stmvl.load_model rebuilds it and loads every tensor."""
    from stmvl.api import load_model
    from stmvl.models.config import ModelConfig, TextConfig, VisionConfig
    from stmvl.models.stm import STMModel, apply_preset
    from stmvl.models.weights import save_model

    _write_actionclip(tmp_path / "actionclip.pt")
    cfg = apply_preset(ModelConfig(
        vision=VisionConfig(size="custom", img_size=32, patch_size=8, width=64, depth=2, heads=1, drop_path=0.0),
        teacher=TeacherConfig(weights=str(tmp_path / "actionclip.pt"), img_size=32, patch_size=8, width=128, layers=2,
                              heads=2, embed_dim=512, return_layers=2, temporal_fusion=True),
        text=TextConfig(hidden=64, layers=2, heads=1, intermediate=96, fusion_start=1, max_length=16, dropout=0.0),
        embed_dim=32), "umt")
    model = STMModel(cfg)
    assert model.teacher.cfg.temporal_fusion_layers == 6 and cfg.teacher.temporal_fusion_layers == 1
    save_model(model, cfg, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.teacher_loaded and loaded.load_report.missing == {}
    video = torch.rand(1, 3, 3, 32, 32)
    torch.testing.assert_close(loaded.teacher(video).targets, model.teacher(video).targets)
