"""Token masking strategies (docs/method.md, "Masking"). Every strategy returns bool [B, T*N], True = masked, with
exactly k = int(N * ratio) masked tokens in every frame (token index = t * N + n).

Strategies:
    random             uniform per frame.
    tube               one uniform spatial mask repeated over all frames.
    attention          UMT: N - k tokens are drawn in proportion to the teacher's class attention s_sp, without
                       replacement, and stay visible; the other k are masked.
    attention_inverse  STM's image rule: k tokens drawn in proportion to s_sp are masked.
    stm                spatial attention and the temporal heatmap mixed with a learnable lambda; k tokens drawn by
                       hard Gumbel-top-k with a straight-through estimator so the predictor and lambda get gradients.

STM scores. The reference code computes s = softmax(lam * softmax(s_tp) + (1 - lam) * s_sp). Both terms inside the
softmax are probabilities of size ~1/N, so that outer softmax is flat (all s within ~1/N of each other in log space)
and log s = mix - const is flat too: using either as Gumbel logits draws tokens almost uniformly. The reference code
uses s itself as the Gumbel logits (`logits: reference`, reproduced as written). The default
`logits: log` draws tokens in proportion to the mixture distribution itself,
s = lam * softmax(s_tp) + (1 - lam) * s_sp / sum(s_sp), i.e. Gumbel logits = log s: the standard Gumbel-top-k
sampler of "k tokens without replacement, in proportion to s", which is what the method intends.

Randomness: the noise of every sample is a counter-based hash of (seed, step, sample id) computed on the device
(stmvl.models.randomness), so a sample's mask does not depend on the batch it is in, on the number of DataLoader
workers, on the rank or on the device, and drawing it never waits for the host.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from stmvl.models.randomness import MASK, hash_gumbel, hash_uniform

STRATEGIES = ("random", "tube", "attention", "attention_inverse", "stm")
LOGIT_MODES = ("log", "reference")
_EPS = 1e-12


def num_masked(n: int, ratio: float) -> int:
    """k = int(N * ratio), the number of masked tokens per frame."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return int(n * ratio)


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """bool mask of the k largest entries along the last dimension."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return mask


def normalise_scores(scores: Tensor) -> Tensor:
    """Scores [..., N] (non-negative) -> a distribution over the last dimension."""
    scores = scores.clamp_min(0)
    return scores / scores.sum(-1, keepdim=True).clamp_min(_EPS)


def proportional_keys(scores: Tensor, gumbel: Tensor) -> Tensor:
    """Gumbel-perturbed log scores [B, T, N]: their top k are k tokens drawn without replacement in proportion to
    the scores (the Gumbel-top-k trick, equivalent to torch.multinomial without replacement)."""
    return torch.log(normalise_scores(scores) + _EPS) + gumbel


def stm_logits(spatial: Tensor, temporal: Tensor | None, lam: Tensor | float, mode: str) -> Tensor:
    """Gumbel logits of the STM strategy.

    Args:
        spatial: [B, T, N] teacher class attention s_sp.
        temporal: [B, T, N] temporal maps s_tp (None for images: lambda has no temporal term to weigh).
        lam: scalar mixing weight (clamped to [0, 1] so the mixture stays a distribution).
        mode: "log" (log of the mixture distribution) or "reference" (softmax of the mixture used as logits).

    Returns:
        [B, T, N] logits.
    """
    if mode not in LOGIT_MODES:
        raise ValueError(f"mask logits mode must be one of {LOGIT_MODES}, got {mode!r}")
    if temporal is None:
        if mode == "log":
            return torch.log(normalise_scores(spatial) + _EPS)
        return torch.softmax(spatial, -1)
    lam = torch.as_tensor(lam, dtype=spatial.dtype, device=spatial.device).clamp(0.0, 1.0)
    temporal_prob = torch.softmax(temporal, -1)
    if mode == "log":
        return torch.log(lam * temporal_prob + (1 - lam) * normalise_scores(spatial) + _EPS)
    return torch.softmax(lam * temporal_prob + (1 - lam) * spatial, -1)


def gumbel_top_k_straight_through(logits: Tensor, k: int, tau: float, gumbel: Tensor) -> tuple[Tensor, Tensor]:
    """Hard Gumbel-top-k with a straight-through estimator.

    Forward value: exactly 1 at the k largest (logits + gumbel), else 0. Backward: the gradient of the relaxed
    softmax((logits + gumbel) / tau), so that whatever produced the logits learns through the mask.

    Returns:
        (hard bool [..., N], straight-through float [..., N]).
    """
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)
    hard = top_k_mask((logits + gumbel).detach(), k)
    return hard, hard.to(soft.dtype) - soft.detach() + soft


def make_mask(
    strategy: str,
    ratio: float,
    B: int,
    T: int,
    N: int,
    *,
    spatial: Tensor | None = None,
    temporal: Tensor | None = None,
    lam: Tensor | float | None = None,
    seed: int = 0,
    step: int = 0,
    sample_ids: Sequence[int] | Tensor | None = None,
    logits: str = "log",
    tau: float = 0.05,
    device=None,
    return_st: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mask a batch of clips: bool [B, T*N], True = masked, exactly int(N * ratio) per frame.

    Args:
        strategy: one of STRATEGIES.
        ratio: fraction of tokens masked per frame.
        spatial: [B*T, N] or [B, T, N] teacher class attention (attention, attention_inverse, stm).
        temporal: [B, T, N] temporal maps from the predictor (stm on clips with T >= 2; None for images).
        lam: mixing weight of the temporal scores (stm).
        seed, step, sample_ids: the noise of sample b is a function of (seed, step, sample_ids[b]) only (a
            counter-based hash computed on the device, stmvl.models.randomness); sample_ids default 0..B-1.
        logits: "log" or "reference" (stm only, see the module docstring).
        tau: Gumbel-softmax temperature of the straight-through relaxation (stm only).
        return_st: also return a float [B, T*N] copy of the mask that carries the straight-through gradient
            (equal to the bool mask in value; constant for strategies other than stm).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; choose from {STRATEGIES}")
    k = num_masked(N, ratio)
    if device is None:
        device = spatial.device if spatial is not None else torch.device("cpu")
    ids = torch.arange(B) if sample_ids is None else torch.as_tensor(sample_ids)
    ids = ids.to(device)
    if ids.numel() != B:
        raise ValueError(f"need one sample id per sample: {ids.numel()} for B={B}")

    def uniform(shape: tuple[int, ...]) -> Tensor:
        return hash_uniform(seed, step, ids, shape, MASK)

    def gumbel(shape: tuple[int, ...]) -> Tensor:
        return hash_gumbel(seed, step, ids, shape, MASK)
    if strategy in ("attention", "attention_inverse", "stm"):
        if spatial is None:
            raise ValueError(f"mask strategy {strategy!r} needs the teacher's spatial attention scores")
        spatial = spatial.reshape(B, T, N).float()

    st = None
    if strategy == "random":
        mask = top_k_mask(uniform((T, N)), k)
    elif strategy == "tube":
        mask = top_k_mask(uniform((1, N)), k).expand(B, T, N)
    elif strategy == "attention":
        # Tokens drawn in proportion to s_sp stay visible: draw N - k of them, mask the rest.
        mask = ~top_k_mask(proportional_keys(spatial, gumbel((T, N))), N - k)
    elif strategy == "attention_inverse":
        mask = top_k_mask(proportional_keys(spatial, gumbel((T, N))), k)
    else:
        if temporal is not None and lam is None:
            raise ValueError("the stm strategy needs lam when temporal scores are given")
        scores = stm_logits(spatial, None if temporal is None else temporal.float(), lam, logits)
        mask, st = gumbel_top_k_straight_through(scores, k, tau, gumbel((T, N)))

    mask = mask.reshape(B, T * N)
    if not return_st:
        return mask
    st = mask.float() if st is None else st.reshape(B, T * N)
    return mask, st


def kept_index(keep: Tensor, count: int) -> Tensor:
    """Positions of the True entries of ``keep [B, n_all]``, in increasing order: long ``[B, count]``.

    ``count`` (the same for every sample) comes from the caller, who knows it from the mask ratio, so that no value
    is read back from the device; a stable sort puts the True positions first in their original order.
    """
    return torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :count]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x [..., B, n_all, C]`` at ``index [B, n]`` -> ``[..., B, n, C]`` (differentiable)."""
    lead = x.shape[:-3]
    b, n = index.shape
    idx = index.view(*(1,) * len(lead), b, n, 1).expand(*lead, b, n, x.shape[-1])
    return torch.gather(x, -2, idx)
