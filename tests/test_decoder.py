"""Spatio-temporal decoder and UMT's linear decoder."""

import math

import pytest
import torch

from stmvl.models.config import PredictorConfig
from stmvl.models.decoder import LinearDecoder, STDecoder, scatter_to_grid, split_pair_channels
from stmvl.models.masking import make_mask

SMALL = PredictorConfig(dim=8, hidden=8, head_hidden=8)


def reference_position_table(positions: int, width: int) -> torch.Tensor:
    """The reference decoder's position table, written out from its formula: angle(p, j) = p / 10000^(2*(j//2)/width),
    sin on even channels, cos on odd ones, one row per token of the frame-major T*N sequence."""
    table = torch.empty(positions, width, dtype=torch.float64)
    for p in range(positions):
        for j in range(width):
            angle = p / math.pow(10000, 2 * (j // 2) / width)
            table[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table.float()


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
    expected = dec.head(filled + reference_position_table(T * gh * gw, D))
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


def test_st_decoder_on_an_image_reads_the_zero_filled_grid_without_text():
    torch.manual_seed(0)
    B, gh, gw, D = 2, 2, 3, 8
    dec = STDecoder(D, D, 5, SMALL).eval()
    keep = ~make_mask("random", 0.5, B, 1, gh * gw, seed=1)
    visible = torch.randn(B, int(keep[0].sum()), D)
    out = dec(visible, keep, 1, gh, gw, torch.randn(B, D))
    torch.testing.assert_close(out, dec.head(scatter_to_grid(visible, keep) + reference_position_table(gh * gw, D)))


def test_pair_alignment_reads_zero_filled_grid_plus_position_at_student_width():
    torch.manual_seed(0)
    B, T, gh, gw, D = 2, 3, 2, 2, 8
    dec = STDecoder(D, D, 4, SMALL).eval()
    # no projection in front of the pair CNN: it takes the two frames' D-wide maps stacked (2D channels)
    assert isinstance(dec.alignment.predictor.proj, torch.nn.Identity)
    assert dec.alignment.predictor.interaction.depthwise[0].in_channels == 2 * D
    assert dec.alignment.temporal_mix.in_channels == dec.alignment.temporal_mix.out_channels == SMALL.hidden // 2
    assert dec.alignment.interaction_proj.in_features == SMALL.hidden // 2
    seen = {}

    def record_input(module, args, output):
        seen["grid"] = args[0]

    dec.alignment.register_forward_hook(record_input)
    keep = ~make_mask("random", 0.5, B, T, gh * gw, seed=2)
    visible = torch.randn(B, int(keep[0].sum()), D)
    dec(visible, keep, T, gh, gw, torch.randn(B, D))
    expected = scatter_to_grid(visible, keep) + reference_position_table(T * gh * gw, D)
    torch.testing.assert_close(seen["grid"], expected.view(B, T, gh * gw, D))


def test_pair_channels_split_between_the_earlier_and_the_later_frame():
    torch.manual_seed(0)
    B, P, hidden, gh, gw = 2, 3, 8, 2, 2  # T = 4 frames
    half = hidden // 2
    features = torch.randn(B, P, hidden, gh, gw)
    frames = split_pair_channels(features)
    assert frames.shape == (B, P + 1, half, gh, gw)
    torch.testing.assert_close(frames[:, 0], features[:, 0, :half])  # first frame: earlier half of pair 0
    torch.testing.assert_close(frames[:, 1], (features[:, 0, half:] + features[:, 1, :half]) / 2)
    torch.testing.assert_close(frames[:, 3], features[:, 2, half:])  # last frame: later half of the last pair
    # the later half of pair 0 (its later frame's channels) never reaches frame 0
    changed = features.clone()
    changed[:, 0, half:] += 10.0
    moved = split_pair_channels(changed)
    torch.testing.assert_close(moved[:, 0], frames[:, 0])
    assert not torch.allclose(moved[:, 1], frames[:, 1])
    # and the earlier half of the last pair never reaches the last frame
    changed = features.clone()
    changed[:, 2, :half] += 10.0
    torch.testing.assert_close(split_pair_channels(changed)[:, 3], frames[:, 3])


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


def test_linear_decoder_is_linear_plus_layernorm_after_the_position_table():
    dec = LinearDecoder(8, 5)

    def expected(tokens):
        return torch.nn.functional.layer_norm(tokens @ dec.head.weight.t() + dec.head.bias, (5,), dec.norm.weight,
                                              dec.norm.bias)

    # UMT adds its 1-D position table (clip_pos_embed) once more in front of the linear decoder
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(dec(x), expected(x + reference_position_table(3, 8)))
    keep = torch.tensor([[True, False, True, False], [False, True, True, False]])
    table = reference_position_table(4, 8)
    torch.testing.assert_close(dec(x[:, :2], keep), expected(x[:, :2] + torch.stack([table[[0, 2]], table[[1, 2]]])))
    assert set(dict(dec.named_parameters())) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
