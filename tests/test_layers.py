"""stmvl.models.layers: attention against an explicit softmax, sincos tables, drop path."""

import math

import pytest
import torch

from stmvl.models.layers import Attention, CrossAttention, DropPath, Mlp, quick_gelu, sincos_1d, sincos_2d, sincos_3d


def _explicit_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_qv_bias_has_no_key_bias_and_matches_explicit_softmax():
    attn = Attention(16, 4, qkv_bias="qv")
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.project_qkv(x)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    # The key projection carries no bias, q and v carry their own.
    assert torch.allclose(k, (x @ wk.t()).view(2, 5, 4, 4).transpose(1, 2), atol=1e-6)
    assert torch.allclose(q, (x @ wq.t() + attn.q_bias).view(2, 5, 4, 4).transpose(1, 2), atol=1e-6)
    expected = attn.proj(_explicit_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_cross_attention_respects_key_padding():
    cross = CrossAttention(8, 2, context_dim=6).eval()
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = cross(x, ctx, attn_mask=mask[:, None, None, :])
    # Changing padded keys must not change the output of the padded sample.
    ctx2 = ctx.clone()
    ctx2[1, 2:] = 100.0
    assert torch.allclose(out, cross(x, ctx2, attn_mask=mask[:, None, None, :]), atol=1e-6)
    trimmed = cross(x[1:], ctx[1:, :2])
    assert torch.allclose(out[1:], trimmed, atol=1e-6)


def test_mlp_activations():
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    mlp = Mlp(4, 8, act="quick_gelu")
    y = torch.randn(3, 4)
    assert torch.allclose(mlp(y), mlp.fc2(quick_gelu(mlp.fc1(y))))
    with pytest.raises(ValueError, match="unknown activation"):
        Mlp(4, 8, act="swishy")


def test_sincos_tables_match_umt_formula():
    table = sincos_1d(torch.arange(5), 6)
    for pos in range(5):
        for j in range(6):
            angle = pos / 10000 ** (2 * (j // 2) / 6)
            assert table[pos, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-6)
    two = sincos_2d(2, 3, 8)
    assert two.shape == (6, 8)
    # Tokens in the same row share the row half; tokens in the same column share the column half.
    assert torch.equal(two[0, :4], two[2, :4]) and torch.equal(two[1, 4:], two[4, 4:])
    three = sincos_3d(2, 2, 2, 12)
    assert torch.equal(three[0, :4], three[3, :4]) and not torch.equal(three[0, :4], three[4, :4])
    with pytest.raises(ValueError, match="even"):
        sincos_1d(torch.arange(3), 5)


def test_drop_path_drops_whole_samples_and_keeps_expectation():
    drop = DropPath(0.5).train()
    x = torch.ones(4000, 3)
    y = drop(x)
    per_sample = y[:, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(y, per_sample[:, None].expand_as(y))
    assert abs(y.mean().item() - 1.0) < 0.1
    assert torch.equal(drop.eval()(x), x)


def test_sincos_tables_are_built_once_per_grid_and_device_and_match_the_formula():
    from stmvl.models.layers import sincos_1d, sincos_3d, sincos_table

    first = sincos_table((48,), 64)
    assert sincos_table((48,), 64) is first  # served from the cache, not rebuilt
    assert torch.equal(first, sincos_1d(torch.arange(48), 64))
    assert torch.equal(sincos_table((2, 3, 4), 64), sincos_3d(2, 3, 4, 64))
    assert sincos_table((48,), 64, dtype=torch.bfloat16).dtype == torch.bfloat16
    with torch.inference_mode():
        fresh = sincos_table((50,), 64)
    assert not fresh.is_inference()  # usable in a later training step
