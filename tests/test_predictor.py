"""Temporal point predictor: heatmap formula (values from the reference code's formula), pairs -> frames, any T >= 2
and any grid."""

import pytest
import torch

from stmvl.models.config import PredictorConfig
from stmvl.models.predictor import TemporalPointPredictor, grid_coordinates, heatmap, pairs_to_frames

SMALL = PredictorConfig(dim=16, hidden=16, head_hidden=8)


def reference_axis(d, plateau=0.25, slope=1.5):
    """One axis of the reference code's heatmap: 1 on the plateau, a linear ramp to 0 after it, plus the constant 1
    its second block adds on every cell (the [0.25, 0.35] band it tests for sums with its complement to 1)."""
    d = abs(d)
    profile = 1.0 if d <= plateau else max(0.0, 1.0 - slope * (d - plateau))
    return 1.0 + profile


def reference_formula(x, y, px, py):
    """The reference heatmap value: the product of the two axes, in [1, 4]."""
    return reference_axis(x - px) * reference_axis(y - py)


def bump_formula(x, y, px, py, plateau=0.25, slope=1.5, floor=1.0):
    def axis(d):
        d = abs(d)
        return 1.0 if d <= plateau else max(0.0, 1.0 - slope * (d - plateau))

    return floor + axis(x - px) * axis(y - py)


def test_heatmap_matches_reference_formula_at_chosen_points():
    gh, gw = 5, 9  # coordinates: rows -1,-0.5,...,1; cols -1,-0.75,...,1
    point = torch.tensor([0.1, -0.3])
    hm = heatmap(point, gh, gw).view(gh, gw)
    ys, xs = grid_coordinates(gh), grid_coordinates(gw)
    for r in range(gh):
        for c in range(gw):
            expected = reference_formula(xs[c].item(), ys[r].item(), 0.1, -0.3)
            assert hm[r, c].item() == pytest.approx(expected, abs=1e-6), (r, c)
    # (x=0, y=-0.5) is on the plateau of both axes: 2 * 2
    assert hm[1, 4].item() == pytest.approx(4.0)
    # x=0.5 is 0.4 away: 1 + (1 - 1.5*0.15) = 1.775 on x, y=-0.5 on the plateau: 2 -> 3.55
    assert hm[1, 6].item() == pytest.approx(3.55)
    # (x=-1, y=1) is far on both axes: 1 * 1
    assert hm[4, 0].item() == pytest.approx(1.0)
    assert hm.min() >= 1.0 and hm.max() <= 4.0


def test_heatmap_of_a_point_at_the_grid_centre():
    hm = heatmap(torch.tensor([0.0, 0.0]), 7, 7).view(7, 7)
    assert hm[3, 3].item() == pytest.approx(4.0)  # the centre: plateau on both axes
    assert hm[3, 0].item() == pytest.approx(2.0)  # edge of the centre row: plateau on y only
    assert hm[0, 3].item() == pytest.approx(2.0)  # edge of the centre column
    assert hm[0, 0].item() == pytest.approx(1.0)  # far corner: neither axis
    assert hm[6, 6].item() == pytest.approx(1.0)


def test_bump_form_keeps_the_old_flat_map():
    gh, gw = 5, 9
    point = torch.tensor([0.1, -0.3])
    hm = heatmap(point, gh, gw, form="bump").view(gh, gw)
    ys, xs = grid_coordinates(gh), grid_coordinates(gw)
    for r, c in [(0, 0), (1, 4), (1, 6), (4, 0)]:
        assert hm[r, c].item() == pytest.approx(bump_formula(xs[c].item(), ys[r].item(), 0.1, -0.3), abs=1e-6)
    assert hm.max() <= 2.0
    with pytest.raises(ValueError, match="product"):
        heatmap(point, gh, gw, form="gauss")


def test_heatmap_jitter_is_mean_of_nine_shifted_copies():
    point = torch.tensor([[0.2, 0.4]])
    jittered = heatmap(point, 7, 7, jitter=0.2)
    copies = [heatmap(point + torch.tensor([dx, dy]), 7, 7) for dx in (-0.2, 0, 0.2) for dy in (-0.2, 0, 0.2)]
    torch.testing.assert_close(jittered, torch.stack(copies).mean(0))
    assert not torch.allclose(jittered, heatmap(point, 7, 7))


def test_frame_map_is_mean_of_its_pairs():
    per_pair = torch.arange(3 * 2 * 4, dtype=torch.float).view(1, 3, 2, 4)  # T=4, 3 pairs
    frames = pairs_to_frames(per_pair)
    torch.testing.assert_close(frames[0, 0], per_pair[0, 0, 0])
    torch.testing.assert_close(frames[0, 1], (per_pair[0, 0, 1] + per_pair[0, 1, 0]) / 2)
    torch.testing.assert_close(frames[0, 2], (per_pair[0, 1, 1] + per_pair[0, 2, 0]) / 2)
    torch.testing.assert_close(frames[0, 3], per_pair[0, 2, 1])


def test_last_frame_can_take_the_first_point_of_the_last_pair():
    per_pair = torch.arange(3 * 2 * 4, dtype=torch.float).view(1, 3, 2, 4)
    frames = pairs_to_frames(per_pair, last="first")
    torch.testing.assert_close(frames[0, 3], per_pair[0, 2, 0])  # the reference masking branch's choice
    torch.testing.assert_close(frames[0, :3], pairs_to_frames(per_pair)[0, :3])
    with pytest.raises(ValueError, match="second"):
        pairs_to_frames(per_pair, last="middle")


def test_predictor_last_frame_option_and_unprojected_copy():
    torch.manual_seed(0)
    cfg = PredictorConfig(dim=16, hidden=16, head_hidden=8, last_frame_point="first")
    pred = TemporalPointPredictor(12, cfg).eval()
    torch.nn.init.normal_(pred.head.fc2.weight, std=0.5)
    out = pred(torch.randn(2, 4, 9, 12), 3, 3)
    torch.testing.assert_close(out.frame_map, pairs_to_frames(out.pair_maps, "first"))
    # the decoder's copy: no projection in front of the pair CNN, which then reads the 12-wide maps
    bare = TemporalPointPredictor(12, cfg, project=False, last_frame="second")
    assert isinstance(bare.proj, torch.nn.Identity) and bare.interaction.depthwise[0].in_channels == 24
    assert bare.last_frame == "second"


@pytest.mark.parametrize("T,gh,gw", [(2, 4, 4), (4, 3, 5), (8, 2, 2), (2, 1, 1), (3, 7, 6)])
def test_predictor_any_T_and_grid(T, gh, gw):
    torch.manual_seed(0)
    pred = TemporalPointPredictor(12, SMALL)
    # non-zero last layer so the points move away from the centre
    torch.nn.init.normal_(pred.head.fc2.weight, std=0.5)
    x = torch.randn(2, T, gh * gw, 12)
    for training in (True, False):
        pred.train(training)
        out = pred(x, gh, gw)
        assert out.points.shape == (2, T - 1, 2, 2)
        assert out.points.abs().max() <= 0.75
        assert out.pair_maps.shape == (2, T - 1, 2, gh * gw)
        assert out.frame_map.shape == (2, T, gh * gw)
        assert out.features.shape == (2, T - 1, SMALL.hidden, gh, gw)
        jitter = SMALL.jitter if training else 0.0
        torch.testing.assert_close(out.pair_maps, heatmap(out.points, gh, gw, jitter=jitter))
        torch.testing.assert_close(out.frame_map, pairs_to_frames(out.pair_maps))


def test_predictor_image_has_no_temporal_map():
    assert TemporalPointPredictor(8, SMALL)(torch.randn(2, 1, 9, 8), 3, 3) is None


def test_zero_init_points_start_at_centre_and_halved_jitter():
    pred = TemporalPointPredictor(8, SMALL).train()
    out = pred(torch.randn(3, 4, 16, 8), 4, 4)
    assert torch.equal(out.points, torch.zeros_like(out.points))
    half = pred(torch.randn(3, 4, 16, 8), 4, 4, halve_jitter=True)
    torch.testing.assert_close(half.pair_maps, heatmap(half.points, 4, 4, jitter=0.1))
