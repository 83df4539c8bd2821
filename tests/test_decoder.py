"""Spatio-temporal decoder and UMT's linear decoder."""

import pytest
import torch

from stmvl.models.config import PredictorConfig
from stmvl.models.decoder import LinearDecoder, STDecoder, scatter_to_grid
from stmvl.models.layers import sincos_3d
from stmvl.models.masking import make_mask

SMALL = PredictorConfig(dim=8, hidden=8, head_hidden=8)


def test_scatter_to_grid_places_tokens_and_zero_fills():
    keep = torch.tensor([[True, False, True, False], [False, False, True, True]])
    visible = torch.arange(2 * 2 * 3, dtype=torch.float).view(2, 2, 3)
    grid = scatter_to_grid(visible, keep)
    torch.testing.assert_close(grid[0, 0], visible[0, 0])
    torch.testing.assert_close(grid[0, 2], visible[0, 1])
    torch.testing.assert_close(grid[1, 3], visible[1, 1])
    assert grid[~keep].abs().sum() == 0


def test_st_decoder_at_init_is_head_of_text_filled_grid():
    torch.manual_seed(0)
    B, T, gh, gw, D, Dt, C = 2, 3, 2, 3, 16, 12, 10
    dec = STDecoder(D, Dt, C, SMALL).eval()
    mask = make_mask("random", 0.5, B, T, gh * gw, seed=0)
    keep = ~mask
    visible = torch.randn(B, int(keep[0].sum()), D)
    text = torch.randn(B, Dt)
    out = dec(visible, keep, T, gh, gw, text)
    assert out.shape == (B, T * gh * gw, C)
    filled = scatter_to_grid(visible, keep) + mask.unsqueeze(-1) * dec.text_proj(text).unsqueeze(1)
    expected = dec.head(filled + sincos_3d(T, gh, gw, D))
    # zero-initialised FC_a / FC_i: the alignment branches add nothing yet
    torch.testing.assert_close(out, expected)


def test_st_decoder_alignment_branches_contribute_after_training_starts():
    torch.manual_seed(0)
    B, T, gh, gw, D = 2, 4, 3, 3, 8
    dec = STDecoder(D, D, 6, SMALL).train()
    keep = ~make_mask("tube", 0.5, B, T, gh * gw)
    visible = torch.randn(B, int(keep[0].sum()), D)
    text = torch.randn(B, D)
    base = dec(visible, keep, T, gh, gw, text)
    base.square().sum().backward()
    # zero-init FCs still receive gradients, so training can open the branches
    assert dec.fc_aligned.weight.grad.abs().sum() > 0 and dec.fc_interaction.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.nn.init.normal_(dec.fc_aligned.weight, std=0.1)
        torch.nn.init.normal_(dec.fc_interaction.weight, std=0.1)
    assert not torch.allclose(dec(visible, keep, T, gh, gw, text), base)


@pytest.mark.parametrize("T", [1, 2, 8])
def test_st_decoder_any_T(T):
    dec = STDecoder(8, 8, 4, SMALL)
    keep = ~make_mask("random", 0.5, 2, T, 4)
    out = dec(torch.randn(2, 2 * T, 8), keep, T, 2, 2, torch.randn(2, 8))
    assert out.shape == (2, T * 4, 4) and torch.isfinite(out).all()


def test_st_decoder_mask_weight_carries_gradient():
    dec = STDecoder(8, 8, 4, SMALL)
    mask = make_mask("random", 0.5, 2, 2, 4)
    weight = mask.float().requires_grad_()
    out = dec(torch.randn(2, 4, 8), ~mask, 2, 2, 2, torch.randn(2, 8), mask_weight=weight)
    out.sum().backward()
    assert weight.grad[mask].abs().sum() > 0


def test_linear_decoder_is_linear_plus_layernorm():
    dec = LinearDecoder(8, 5)
    x = torch.randn(2, 3, 8)
    expected = torch.nn.functional.layer_norm(x @ dec.head.weight.t() + dec.head.bias, (5,), dec.norm.weight, dec.norm.bias)
    torch.testing.assert_close(dec(x), expected)
    assert set(dict(dec.named_parameters())) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
