"""Losses: VTC by hand, VTM negatives, MLM statistics, MVM/UTA values, DDP gradient scaling."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stmvl.models.losses import (
    IGNORE_INDEX,
    mlm_loss,
    mlm_mask,
    mvm_loss,
    sample_hard_negatives,
    uta_loss,
    vtc_loss,
    vtm_loss,
)


def test_vtc_equals_hand_computation_with_duplicate_ids():
    # Unit vectors chosen so that the cosines are easy: t0.v0 = 1, t0.v1 = 0, ...
    video = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # clip 0: two frames
                          [[0.0, 1.0], [0.0, 1.0]],
                          [[1.0, 0.0], [1.0, 0.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    ids = torch.tensor([7, 9, 7])  # samples 0 and 2 are positives of each other
    temp = 0.5
    # frame-averaged cosines, rows = texts, cols = videos
    sim = [[0.5, 0.0, 1.0],
           [0.5, 1.0, 0.0],
           [0.5, 0.0, 1.0]]
    targets = [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]

    def direction(rows):
        total = 0.0
        for i in range(3):
            logz = math.log(sum(math.exp(rows[i][j] / temp) for j in range(3)))
            total += -sum(targets[i][j] * (rows[i][j] / temp - logz) for j in range(3))
        return total / 3

    cols = [[sim[j][i] for j in range(3)] for i in range(3)]
    expected = 0.5 * (direction(sim) + direction(cols))
    got = vtc_loss(video, text, ids, temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_vtc_temporal_and_foil_negatives_add_one_column_each():
    video = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    text = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    ids = torch.tensor([0, 1])
    reversed_video = video.flip(1)
    base = vtc_loss(video, text, ids, 1.0)
    with_rev = vtc_loss(video, text, ids, 1.0, reversed_video=reversed_video)
    sim = torch.tensor([[1.0, 1.0], [0.0, 0.0]]) / math.sqrt(2)  # frame-averaged cosines
    rev = torch.tensor([1.0, 0.0]) / math.sqrt(2)  # reversed clip vs its own caption
    t2v = F.cross_entropy(torch.cat([sim, rev[:, None]], 1), ids)
    v2t = F.cross_entropy(sim.t(), ids)
    assert with_rev.item() == pytest.approx(0.5 * (t2v + v2t).item(), rel=1e-6)
    assert with_rev > base
    foil = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    with_foil = vtc_loss(video, text, ids, 1.0, foil_text=foil)
    foil_sim = F.cosine_similarity(foil[:, None], video, dim=-1).mean(1)
    v2t_foil = F.cross_entropy(torch.cat([sim.t(), foil_sim[:, None]], 1), ids)
    assert with_foil.item() == pytest.approx(0.5 * (F.cross_entropy(sim, ids) + v2t_foil).item(), rel=1e-6)


def test_vtm_never_picks_a_positive_as_negative():
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positive = ids[:, None] == ids[None, :]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        sim = torch.randn(8, 8) * 5 + 20 * positive.float()  # positives have by far the highest similarity
        neg_video, neg_text = sample_hard_negatives(sim, ids, g)
        assert (neg_video >= 0).all() and (neg_text >= 0).all()
        assert not positive[torch.arange(8), neg_video].any()
        assert not positive[neg_text, torch.arange(8)].any()


def test_vtm_negatives_follow_similarity_and_rows_without_negatives_are_dropped():
    ids = torch.tensor([0, 1, 2])
    sim = torch.tensor([[0.0, 9.0, -9.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    picks = [sample_hard_negatives(sim, ids, torch.Generator().manual_seed(s))[0][0].item() for s in range(50)]
    assert picks.count(1) >= 48  # exp(9) vs exp(-9)
    all_same = sample_hard_negatives(torch.randn(3, 3), torch.tensor([5, 5, 5]))
    assert (all_same[0] == -1).all() and (all_same[1] == -1).all()


def test_vtm_negatives_with_the_contrastive_temperature_are_hard():
    # 8 pairs; for text i the video i+1 has cosine 0.9, every other non-positive video 0.1.
    # UMT/STM draw from softmax(cos / temp): at temp 0.07 the 0.9 video has weight 1 / (1 + 6 exp(-0.8 / 0.07))
    # = 0.99993; without the temperature it has 1 / (1 + 6 exp(-0.8)) = 0.27.
    b = 8
    ids = torch.arange(b)
    sim = torch.full((b, b), 0.1)
    sim[torch.arange(b), (torch.arange(b) + 1) % b] = 0.9
    sim.fill_diagonal_(1.0)
    g = torch.Generator().manual_seed(0)

    def hard_share(temp):
        hits = total = 0
        for _ in range(250):
            neg_video, neg_text = sample_hard_negatives(sim, ids, g, temp)
            hits += (neg_video == (ids + 1) % b).sum().item() + (neg_text == (ids - 1) % b).sum().item()
            total += 2 * b
        return hits / total

    with_temp, without = hard_share(torch.tensor(0.07)), hard_share(1.0)
    assert with_temp > 0.9, with_temp
    assert 0.2 < without < 0.35, without  # the near-uniform draw stmvl made before


def test_vtm_loss_scores_3b_pairs_with_labels():
    seen = {}

    def fuse(states, mask, video, video_index, first_token_only=False):
        video = video[video_index]
        seen["pairs"] = states.shape[0]
        # fused CLS = text CLS + mean video token, so matching depends on the pair
        return states + video.mean(1, keepdim=True)

    head = torch.nn.Linear(4, 2)
    b = 5
    loss = vtm_loss(fuse, head, torch.randn(b, 3, 4), torch.randn(b, 2, 4), torch.ones(b, 2, dtype=torch.long),
                    torch.randn(b, b), torch.arange(b), reversed_tokens=torch.randn(b, 3, 4))
    assert seen["pairs"] == 4 * b
    assert loss.item() > 0 and loss.requires_grad


def test_vtm_on_the_first_rows_scores_their_pairs_with_negatives_from_the_whole_batch():
    """loss.fusion_samples: the first `rows` samples' pairs only, the same pairs the full loss scores for them."""
    pairs = {}

    def fuse(states, mask, video, video_index, first_token_only=False):
        pairs["distinct_videos"] = video.shape[0]
        video = video[video_index]
        pairs["text"], pairs["video"] = states[:, 0, 0].tolist(), video[:, 0, 0].tolist()
        return states + video.mean(1, keepdim=True)

    b, rows = 6, 2
    torch.manual_seed(0)
    video = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, 3, 4).clone()  # video i: all i
    text = (10 + torch.arange(b, dtype=torch.float32)).view(b, 1, 1).expand(b, 2, 4).clone()  # text i: all 10 + i
    foil = text + 100
    sim = torch.zeros(b, b)
    sim[0, 5] = sim[1, 4] = 9.0  # texts 0 and 1: hardest video in the other half of the batch
    sim[3, 0] = sim[5, 1] = 9.0  # videos 0 and 1: hardest texts 3 and 5
    head = torch.nn.Linear(4, 2)
    mask = torch.ones(b, 2, dtype=torch.long)
    args = dict(foil_states=foil, foil_mask=mask, temp=0.01, reversed_tokens=-video)
    sub = vtm_loss(fuse, head, video, text, mask, sim, torch.arange(b), rows=rows, **args)
    # positives, the drawn negatives (from the whole batch), reversed clips, foils: of samples 0 and 1 only
    assert pairs["text"] == [10, 11, 10, 11, 13, 15, 10, 11, 110, 111]
    assert pairs["video"] == [0, 1, 5, 4, 0, 1, -0.0, -1, 0, 1]
    assert pairs["distinct_videos"] == 3 * rows  # own clips, drawn negatives, reversed clips: each passed once
    fused = torch.tensor(pairs["text"]).view(-1, 1) + torch.tensor(pairs["video"]).view(-1, 1)
    labels = torch.tensor([1, 1] + [0] * 8)
    expected = torch.nn.functional.cross_entropy(head(fused.expand(-1, 4)), labels)
    assert torch.allclose(sub, expected)
    vtm_loss(fuse, head, video, text, mask, sim, torch.arange(b), **args)
    assert len(pairs["text"]) == 5 * b  # without rows: every sample


def test_mlm_masking_statistics_over_10000_tokens():
    g = torch.Generator().manual_seed(0)
    vocab, special = 1000, {0, 101, 102, 103}
    ids = torch.randint(200, vocab, (100, 120), generator=g)
    ids[:, 0], ids[:, 99] = 101, 102
    ids[:, 100:] = 0  # padding
    attn = (ids != 0).long()
    masked, labels = mlm_mask(ids, attn, vocab_size=vocab, mask_token_id=103, special_ids=special, prob=0.5, generator=g)
    eligible = attn.bool() & (ids != 101) & (ids != 102)
    chosen = labels != IGNORE_INDEX
    assert eligible.sum() == 9800
    assert not (chosen & ~eligible).any()  # specials and pad never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum().item() / eligible.sum().item()
    assert abs(rate - 0.5) < 0.02
    n = chosen.sum().item()
    to_mask = (masked[chosen] == 103).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    replaced = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.015 and abs(replaced - 0.1) < 0.015, n
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_mlm_loss_values_and_no_masked_case():
    logits = torch.randn(2, 3, 10, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    labels[0, 1], labels[1, 2] = 4, 7
    expected = 0.5 * (F.cross_entropy(logits[0, 1:2], torch.tensor([4])) + F.cross_entropy(logits[1, 2:3], torch.tensor([7])))
    assert mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    zero = mlm_loss(logits, torch.full((2, 3), IGNORE_INDEX))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mvm_and_uta_values():
    target = torch.randn(2, 3, 4, 5)
    assert mvm_loss(target * 3.0, target).item() == pytest.approx(0.0, abs=1e-6)
    assert mvm_loss(-target, target).item() == pytest.approx(4.0, abs=1e-6)
    pred = torch.randn(2, 3, 4, 5)
    cos = F.cosine_similarity(pred, target, dim=-1)
    assert mvm_loss(pred, target).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    keep = torch.tensor([[True, False, True, False], [False, True, True, False], [True, True, False, False]])
    visible_pred = torch.stack([target[:, b][:, keep[b]] for b in range(3)], 1)
    full = torch.randn(2, 3, 4, 5)
    full[:, keep] = target[:, keep]
    assert uta_loss(visible_pred, full, keep).item() == pytest.approx(0.0, abs=1e-6)


def test_mvm_gradient_equals_that_of_normalising_both_sides():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 7, 16)
    pred = torch.randn(2, 3, 7, 16, requires_grad=True)
    mvm_loss(pred, target).backward()
    reference = pred.detach().clone().requires_grad_(True)
    (2 - 2 * (F.normalize(reference, dim=-1) * F.normalize(target, dim=-1)).sum(-1)).mean().backward()
    torch.testing.assert_close(pred.grad, reference.grad, rtol=1e-5, atol=1e-8)


def free_port() -> int:
    # other test files may run torchrun at the same time: never hard-code the rendezvous port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_vtc_ddp_gradients_equal_single_process():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(root / "tests" / "ddp_vtc_worker.py")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("max |grad diff|") == 2


def test_vtc_temporal_pair_terms_add_a_two_way_loss_per_sample():
    """pair_weight: the batch-wide loss plus w x the mean of the (positive vs reversed clip) and (positive vs foil)
    two-way cross entropies, computed here by hand."""
    torch.manual_seed(0)
    b, e, temp = 4, 8, 0.1
    video, text, rev, foil = (torch.randn(b, e) for _ in range(4))
    ids = torch.arange(b)
    kwargs = dict(reversed_video=rev, foil_text=foil, gather=False)
    base = vtc_loss(video, text, ids, temp, **kwargs)
    with_pairs = vtc_loss(video, text, ids, temp, pair_weight=0.5, **kwargs)
    cos = lambda a, c: (F.normalize(a, dim=-1) * F.normalize(c, dim=-1)).sum(-1) / temp  # noqa: E731
    pos = cos(text, video)
    t2v = -F.log_softmax(torch.stack([pos, cos(text, rev)], 1), 1)[:, 0].mean()
    v2t = -F.log_softmax(torch.stack([pos, cos(foil, video)], 1), 1)[:, 0].mean()
    torch.testing.assert_close(with_pairs, base + 0.5 * (t2v + v2t) / 2)
    assert torch.equal(vtc_loss(video, text, ids, temp, pair_weight=0.0, **kwargs), base)
