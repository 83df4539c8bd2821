"""stmvl.models.layers: attention against an explicit softmax, sincos tables, drop path."""

import math

import pytest
import torch
import torch.nn.functional as F

from stmvl.models import layers
from stmvl.models.layers import (
    Attention,
    CrossAttention,
    DropPath,
    Mlp,
    attend,
    explicit_attention,
    quick_gelu,
    sincos_1d,
    sincos_2d,
    sincos_3d,
)


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


def _qkv_and_mask(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, 3, 7, 8, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, 3, 7, 8, generator=g).to(dtype).requires_grad_()
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, :, 5:] = False  # key padding
    mask[1, :, 2] = False  # one query row may attend to no key: SDPA gives it zeros
    return q, k, v, mask


@pytest.mark.parametrize("masked", [False, True])
def test_explicit_attention_equals_sdpa_with_its_gradients(masked):
    q, k, v, mask = _qkv_and_mask()
    mask = mask if masked else None
    grad = torch.randn(2, 3, 5, 8)
    ours = explicit_attention(q, k, v, mask)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    assert torch.allclose(ours, ref, atol=1e-6)
    if masked:
        assert torch.equal(ours[1, :, 2], torch.zeros(3, 8))  # zeros, not NaN, for the row with no key
    for a, b in zip(ours_grads, ref_grads):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)
    additive = torch.zeros(2, 1, 5, 7).masked_fill(~_qkv_and_mask()[3], -1e4)[:1]  # float masks add
    assert torch.allclose(explicit_attention(q[:1], k[:1], v[:1], additive),
                          F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=additive), atol=1e-6)


def test_attend_takes_the_matmul_path_only_for_16_bit_cpu_training(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    q, k, v, mask = _qkv_and_mask(torch.bfloat16)
    out = attend(q, k, v, mask)
    assert calls == []  # bf16 with autograd: the matmul path
    ref = sdpa(q.float(), k.float(), v.float(), attn_mask=mask)
    assert (out.float() - ref).abs().max() < 0.05  # bf16 rounding
    with torch.no_grad():
        attend(q, k, v, mask)  # inference: SDPA (its CPU forward is the faster one)
    attend(*(t.float() for t in (q, k, v)), mask)  # fp32 training: SDPA
    assert len(calls) == 2


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


def test_cross_attention_context_index_equals_repeating_the_context_in_value_and_gradient():
    # a context row shared by several queries: its gradient is the sum over them, as if each had its own copy
    torch.manual_seed(0)
    attention = layers.CrossAttention(16, 4, context_dim=8)
    x = torch.randn(5, 3, 16)
    context = torch.randn(2, 7, 8, requires_grad=True)
    index = torch.tensor([1, 0, 1, 1, 0])
    out = attention(x, context, context_index=index)
    (grad,) = torch.autograd.grad(out.square().sum(), context)
    expected = attention(x, context[index])
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), context)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-5)
