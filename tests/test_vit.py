"""stmvl.models.vit: the student video ViT."""

import pytest
import torch

from stmvl.models.layers import sincos_1d
from stmvl.models.vit import PatchEmbed, VideoViT, count_parameters, vit_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VideoViT(vit_config("tiny", drop_path=0.0)).eval()


def test_presets_and_parameter_counts():
    assert vit_config("demo").width == 192 and vit_config("demo").depth == 6
    # ViT-B/16 and ViT-L/16 encoders without class token / head: ~86M and ~303M.
    # Built on the meta device: the shapes are real, no memory or init time is spent.
    with torch.device("meta"):
        b16, l16 = VideoViT(vit_config("b16")), VideoViT(vit_config("l16"))
    assert count_parameters(b16) == pytest.approx(86e6, rel=0.01)
    assert count_parameters(l16) == pytest.approx(303e6, rel=0.01)
    with pytest.raises(ValueError, match="unknown ViT size"):
        vit_config("h14")


def test_keep_all_equals_keep_none_and_keep_selects_tokens(tiny):
    video = torch.rand(2, 4, 3, 32, 32)
    full = tiny(video, return_layers=2)
    assert full.tokens.shape == (2, 64, 64) and full.layers.shape == (2, 2, 64, 64)
    assert torch.equal(full.layers[-1], full.tokens)
    keep_all = tiny(video, keep=torch.ones(2, 64, dtype=torch.bool), return_layers=2)
    assert torch.allclose(keep_all.tokens, full.tokens, atol=1e-6)
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[0, :10] = True
    keep[1, 30:40] = True
    part = tiny(video, keep=keep)
    # Running only the kept tokens equals running the embedded subset through the blocks by hand.
    x = tiny.embed(video)[keep].view(2, 10, 64)
    for block in tiny.blocks:
        x = block(x)
    assert torch.allclose(part.tokens, tiny.norm(x), atol=1e-6)
    bad = keep.clone()
    bad[1, 40] = True
    with pytest.raises(ValueError, match="same number"):
        tiny(video, keep=bad)


def test_keep_weight_keeps_values_and_passes_gradient(tiny):
    video = torch.rand(2, 4, 3, 32, 32)
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[:, ::4] = True
    # a straight-through-like weight: exactly 1 on kept tokens (and 0 elsewhere) in value, with a gradient
    scores = torch.zeros(2, 64, requires_grad=True)
    weight = keep.float() + scores - scores.detach()
    out = tiny(video, keep=keep, keep_weight=weight)
    torch.testing.assert_close(out.tokens, tiny(video, keep=keep).tokens)
    out.tokens.sum().backward()
    # the weight multiplies the embedded tokens before the gather: only kept tokens pass gradient to it
    assert scores.grad[keep].abs().sum() > 0 and scores.grad[~keep].abs().sum() == 0
    with pytest.raises(ValueError, match="needs keep"):
        tiny(video, keep_weight=weight)
    with pytest.raises(ValueError, match="keep_weight must be"):
        tiny(video, keep=keep, keep_weight=weight[:, :10])


def test_position_embedding_follows_input_frames(tiny):
    for T in (1, 4, 12):
        out = tiny(torch.rand(1, T, 3, 32, 32))
        assert out.tokens.shape == (1, T * 16, 64)
    x = tiny.embed(torch.full((1, 3, 3, 32, 32), 0.5))
    patches = tiny.patch_embed(tiny._stem_input(torch.full((1, 3, 3, 32, 32), 0.5)))
    assert torch.allclose(x - patches, sincos_1d(torch.arange(48), 64)[None], atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(1)
    plain = VideoViT(vit_config("tiny", drop_path=0.2))
    ckpt = VideoViT(vit_config("tiny", drop_path=0.2, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    video = torch.rand(2, 2, 3, 32, 32)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        model.train()
        out = model(video, return_layers=2)
        (out.layers.square().mean() + model.pool(out.tokens).sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_stems_and_pooling():
    torch.manual_seed(0)
    diff = VideoViT(vit_config("tiny", stem="diff", drop_path=0.0)).eval()
    assert diff.patch_embed.proj.weight.shape[1] == 6
    video = torch.rand(1, 3, 3, 32, 32)
    # Frame 1's difference channels are frame 1 - frame 0 (normalised), frame 0's are zero.
    x = diff._stem_input(video)
    normalised = (video - diff.mean) / diff.std
    assert torch.allclose(x[:, 3:, 1], normalised[:, 1] - normalised[:, 0], atol=1e-6)
    assert torch.equal(x[:, 3:, 0], torch.zeros_like(x[:, 3:, 0]))
    still = torch.rand(1, 1, 3, 32, 32).expand(1, 3, 3, 32, 32)
    x = diff._stem_input(still)
    assert torch.equal(x[:, 3:], torch.zeros_like(x[:, 3:]))
    tub = VideoViT(vit_config("tiny", stem="tubelet2", drop_path=0.0)).eval()
    assert tub.grid(4, 32, 32) == (2, 16)
    out = tub(torch.rand(2, 4, 3, 32, 32))
    assert out.tokens.shape == (2, 32, 64)
    with pytest.raises(ValueError, match="even number of frames"):
        tub(torch.rand(1, 3, 3, 32, 32))
    frames = tub.pool_frames(out.tokens, 2)
    expected = tub.pool_norm(out.tokens[:, 16:].mean(1))
    assert torch.allclose(frames[:, 1], expected, atol=1e-6)
    assert torch.allclose(tub.pool(out.tokens), tub.pool_norm(out.tokens.mean(1)), atol=1e-6)


def test_bad_input_is_rejected(tiny):
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        tiny(torch.rand(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        tiny(torch.rand(1, 1, 3, 30, 32))


@pytest.mark.parametrize("channels, tubelet, patch, frames, size",
                         [(6, 1, 8, 3, 40), (3, 2, 16, 4, 32), (3, 1, 16, 1, 48)])
def test_patch_embedding_is_the_convolution_it_stores(channels, tubelet, patch, frames, size):
    # the forward is a reshape + linear; the stored Conv3d (what checkpoints and the UMT importer hold) must give
    # the same tokens, frame-major, and the same weight gradient
    torch.manual_seed(0)
    embed = PatchEmbed(channels, 32, patch, tubelet)
    x = torch.randn(2, channels, frames, size, size)
    tokens = embed(x)
    expected = embed.proj(x).flatten(2).transpose(1, 2)
    assert tokens.shape == expected.shape
    assert torch.allclose(tokens, expected, atol=1e-5)
    (grad,) = torch.autograd.grad(tokens.square().sum(), embed.proj.weight)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), embed.proj.weight)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not split"):
        embed(torch.randn(1, channels, frames, size + 1, size))
