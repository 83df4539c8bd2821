"""Counted FLOPs (FlopCounterMode) and the MFU the engine logs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stmvl.models.layers import explicit_attention
from stmvl.train.flops import count_flops, matmul_peak, mfu


def test_a_linear_training_step_counts_forward_and_both_backward_matmuls():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    flops = count_flops(lambda: layer(x).sum().backward())
    forward = 2 * 16 * 64 * 32
    assert flops == 3 * forward  # forward, grad of the input, grad of the weight


def test_matmul_peak_leaves_the_global_rng_alone_and_mfu_is_a_ratio():
    state = torch.get_rng_state()
    peak = matmul_peak("fp32", "cpu", None, 128, 1)
    assert torch.equal(state, torch.get_rng_state()) and peak > 1e6
    assert mfu(flops=5e9, seconds=0.5, peak=2e10) == 0.5


def test_cpu_attention_is_counted_like_the_matmuls_it_replaces():
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    k = torch.randn(2, 3, 7, 8, requires_grad=True)
    matmuls = 2 * (2 * 2 * 3 * 5 * 7 * 8)  # q k^T and p v, 2 FLOPs per multiply-add
    with torch.no_grad():
        assert count_flops(lambda: F.scaled_dot_product_attention(q, k, k)) == matmuls  # not 0 (CPU flash kernel)
        assert count_flops(lambda: explicit_attention(q, k, k)) == matmuls
    # backward: the flash kernel recomputes the scores (5 matmuls), the explicit path keeps them (4)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, k).sum().backward()) == matmuls * 7 // 2
    assert count_flops(lambda: explicit_attention(q, k, k).sum().backward()) == matmuls * 3


class _ModeAndThreads(torch.utils.data.Dataset):
    """Each item reports the dispatch modes and intra-op threads of the process that loads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"video": torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
                "modes": torch._C._len_torch_dispatch_stack(), "threads": torch.get_num_threads()}


def test_evaluation_workers_leave_the_flop_counter_of_the_process_that_forked_them():
    # a forked worker inherits the mode: every torch call of its loading would run through Python, counted for nothing
    from stmvl.eval.features import map_clips

    seen = []

    def record(batch):
        seen.extend(zip(batch["modes"], batch["threads"]))
        return (batch["video"].flatten(1).sum(1),)

    flops = count_flops(lambda: map_clips(_ModeAndThreads(), record, batch_size=2, num_workers=1))
    assert seen == [(0, 1)] * 4 and flops == 0
