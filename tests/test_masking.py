"""Masking strategies: exact counts, tube structure, reproducibility, following the scores, straight-through."""

import subprocess
import sys

import pytest
import torch

from stmvl.models.masking import STRATEGIES, make_mask, num_masked

B, T, N = 3, 4, 49


def scores(b=B, t=T, n=N):
    return torch.rand(b * t, n), torch.rand(b, t, n) + 1.0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.8])
def test_exactly_k_masked_per_frame(strategy, ratio):
    spatial, temporal = scores()
    mask = make_mask(strategy, ratio, B, T, N, spatial=spatial, temporal=temporal, lam=0.5, seed=3, step=7)
    assert mask.dtype == torch.bool and mask.shape == (B, T * N)
    assert (mask.view(B, T, N).sum(-1) == int(N * ratio)).all()


def test_attention_masked_count_is_int_n_ratio_not_n_minus_visible():
    # N=10, ratio 0.75: int(N*ratio)=7 masked; UMT's N - int(N*(1-ratio)) would give 8.
    spatial = torch.rand(2, 10)
    assert num_masked(10, 0.75) == 7
    mask = make_mask("attention", 0.75, 1, 2, 10, spatial=spatial)
    assert mask.view(2, 10).sum(-1).tolist() == [7, 7]


def test_tube_is_identical_across_frames():
    mask = make_mask("tube", 0.6, B, T, N, seed=1).view(B, T, N)
    assert (mask == mask[:, :1]).all()
    assert not torch.equal(mask[0], mask[1])  # different samples, different tubes


def test_mask_depends_only_on_seed_step_and_sample_id():
    spatial, temporal = scores(b=4)
    ids = torch.tensor([10, 11, 12, 13])
    full = make_mask("stm", 0.7, 4, T, N, spatial=spatial, temporal=temporal, lam=0.5, seed=5, step=2, sample_ids=ids)
    # the same samples in another batch composition (as on another rank or worker) get the same masks
    part = make_mask("stm", 0.7, 2, T, N, spatial=spatial.view(4, T, N)[[3, 1]], temporal=temporal[[3, 1]],
                     lam=0.5, seed=5, step=2, sample_ids=ids[[3, 1]])
    assert torch.equal(part, full[[3, 1]])
    other_step = make_mask("stm", 0.7, 4, T, N, spatial=spatial, temporal=temporal, lam=0.5, seed=5, step=3, sample_ids=ids)
    assert not torch.equal(other_step, full)


CHILD = """
import torch
from stmvl.models.masking import make_mask
m = make_mask("random", 0.7, 3, 2, 16, seed=11, step=4, sample_ids=[5, 6, 7])
print("".join("1" if v else "0" for v in m.flatten().tolist()))
"""


def test_same_mask_in_two_processes():
    import os
    env = dict(os.environ, PYTHONPATH="src")
    runs = [subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True).stdout
            for _ in range(2)]
    here = "".join("1" if v else "0" for v in make_mask("random", 0.7, 3, 2, 16, seed=11, step=4,
                                                         sample_ids=[5, 6, 7]).flatten().tolist())
    assert runs[0].strip() == runs[1].strip() == here


def region_rates(strategy, logits="log", trials=200):
    """Fraction of masked tokens inside an 8-token hot region of a 64-token frame whose scores are concentrated."""
    n, t, b = 64, 2, trials
    hot = torch.zeros(n, dtype=torch.bool)
    hot[:8] = True
    spatial = torch.where(hot, 1.0, 0.002).repeat(b * t, 1)  # class attention on the region
    temporal = torch.where(hot, 2.0, 1.0).repeat(b, t, 1)  # heatmap peaks on the region too
    mask = make_mask(strategy, 0.25, b, t, n, spatial=spatial, temporal=temporal, lam=0.5, logits=logits,
                     seed=0, step=0, sample_ids=range(b)).view(b, t, n)
    return mask[..., hot].float().sum().item() / mask.float().sum().item()


def test_stm_log_masks_high_score_region_far_more_than_random_reference_does_not():
    k = int(64 * 0.25)
    chance = 8 / 64  # share of masked tokens in the region under uniform masking
    random_rate = region_rates("random")
    log_rate = region_rates("stm", "log")
    reference_rate = region_rates("stm", "reference")
    # measured (seed 0, 200 clips x 2 frames, k=16 of 64): random 0.124, stm/log 0.440, stm/reference 0.126
    assert abs(random_rate - chance) < 0.02
    assert log_rate > 3 * random_rate
    assert log_rate > 0.40  # every frame masks on average > 6 of its 8 hot tokens (k = 16)
    assert abs(reference_rate - chance) < 0.02
    assert k == 16


def test_straight_through_mask_gives_gradients_to_scores_and_lam():
    spatial = torch.rand(B * T, N)
    temporal = (torch.rand(B, T, N) + 1).requires_grad_()
    lam = torch.tensor(0.5, requires_grad=True)
    mask, st = make_mask("stm", 0.7, B, T, N, spatial=spatial, temporal=temporal, lam=lam, return_st=True)
    torch.testing.assert_close(st.detach(), mask.float())
    (st * torch.randn(B, T * N)).sum().backward()
    assert temporal.grad.abs().sum() > 0 and lam.grad.abs() > 0


def test_noise_is_a_function_of_seed_step_and_sample_id_only():
    from stmvl.models.randomness import hash_uniform

    both = hash_uniform(0, 3, torch.tensor([1, 1, 2]), (4, 5))
    assert torch.equal(both[0], both[1]) and not torch.equal(both[0], both[2])
    alone = hash_uniform(0, 3, torch.tensor([2]), (4, 5))
    assert torch.equal(alone[0], both[2])  # batch composition does not matter
    assert not torch.equal(hash_uniform(0, 4, torch.tensor([2]), (4, 5)), alone)  # the step does
    assert not torch.equal(hash_uniform(1, 3, torch.tensor([2]), (4, 5)), alone)  # so does the seed
    u = hash_uniform(7, 0, torch.arange(256), (64,))
    assert 0.0 < u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.01
    # integer arithmetic: equal to SplitMix64 computed with Python's unbounded ints, on any device or CPU kind
    from stmvl.models.randomness import stream_key

    def mix(z: int) -> int:
        z &= 2**64 - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        return z ^ (z >> 31)

    golden = 0x9E3779B97F4A7C15
    key = mix(5 * golden + stream_key(9, 2, 1))
    expected = [((mix(key + i * golden) >> 41) + 0.5) / 2**23 for i in range(1, 4)]
    assert hash_uniform(9, 2, torch.tensor([5]), (3,), stream=1)[0].tolist() == pytest.approx(expected, abs=0)
