"""Pretraining losses (docs/method.md, "Losses"): VTC, VTM, MLM, MVM and UMT's UTA.

Distributed contrastive learning: `gather_with_grad` all-gathers embeddings across ranks; its backward all-reduces
(sums) the gradient of the gathered tensor before taking this rank's slice. Every rank computes the same global-batch
loss, so the summed slice gradient is world_size times d(loss)/d(local embeddings), and DDP's averaging over ranks
then yields exactly the gradient of the global-batch loss (UMT keeps only the local slice and under-weights VTC by the
world size).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from stmvl.models.masking import gather_tokens, kept_index

IGNORE_INDEX = -100


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather [B, ...] from every rank -> [world*B, ...] (rank-major), differentiable (see module docstring).

    Identity when torch.distributed is not initialised or has one process. Every rank must pass the same B.
    """
    if distributed_world() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather without gradient (ids, masks)."""
    if distributed_world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


# ----------------------------------------------------------------------------------------------------------- VTC


def frame_similarity(text: Tensor, video: Tensor) -> Tensor:
    """Cosine similarity averaged over frames.

    Args:
        text: [Bt, E] text embeddings.
        video: [Bv, E] or [Bv, T', E] video embeddings (one per frame, or pooled).

    Returns:
        [Bt, Bv] mean over frames of cos(text_i, video_j,f).
    """
    text = F.normalize(text, dim=-1)
    video = F.normalize(video if video.dim() == 3 else video.unsqueeze(1), dim=-1)
    return torch.einsum("ie,jfe->ijf", text, video).mean(-1)


def paired_similarity(text: Tensor, video: Tensor) -> Tensor:
    """Row-wise frame-averaged cosine of text_i with video_i: [B]."""
    text = F.normalize(text, dim=-1)
    video = F.normalize(video if video.dim() == 3 else video.unsqueeze(1), dim=-1)
    return torch.einsum("ie,ife->if", text, video).mean(-1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij; targets rows sum to 1."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def positive_targets(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Multi-positive targets: uniform over the columns whose sample id equals the row's id. [R, C]."""
    pos = (row_ids.view(-1, 1) == col_ids.view(1, -1)).float()
    return pos / pos.sum(1, keepdim=True).clamp_min(1.0)


def with_negative_column(logits: Tensor, targets: Tensor, extra: Tensor) -> tuple[Tensor, Tensor]:
    """Append one negative logit per row (extra: [R]) with target 0."""
    return torch.cat([logits, extra.unsqueeze(1)], 1), torch.cat([targets, targets.new_zeros(targets.shape[0], 1)], 1)


def vtc_loss(
    video: Tensor,
    text: Tensor,
    sample_ids: Tensor,
    temp: Tensor | float,
    *,
    reversed_video: Tensor | None = None,
    foil_text: Tensor | None = None,
    gather: bool = True,
    pair_weight: float = 0.0,
) -> Tensor:
    """Video-text contrastive loss over the global batch with multi-positive soft targets.

    Args:
        video: [B, E] or [B, T', E] video projections (local batch).
        text: [B, E] text projections.
        sample_ids: [B] global sample ids; equal ids are positives of each other.
        temp: temperature (a tensor keeps it learnable).
        reversed_video: optional [B, (T',) E] time-reversed clips: an extra negative for their own caption.
        foil_text: optional [B, E] foil captions: an extra negative text for their own video.
        gather: gather across ranks (set False to compute the local-batch loss under torch.distributed).
        pair_weight: weight of an extra two-way term per sample between the positive and its own temporal
            negative (caption vs reversed clip, clip vs foil). In the batch-wide softmax these negatives are one
            column among B, and their gradient only dominates once every static difference (colour, shape) is
            learnt; the pair term gives frame order its own share of the loss from the first step. 0 = off.

    Returns:
        scalar: mean of the text-to-video and video-to-text soft-target cross entropies (plus the weighted pair
        terms).
    """
    gather_fn = gather_with_grad if gather else (lambda x: x)
    ids_fn = gather_no_grad if gather else (lambda x: x)
    video_all, text_all, ids_all = gather_fn(video), gather_fn(text), ids_fn(sample_ids)
    t2v = frame_similarity(text_all, video_all) / temp
    targets = positive_targets(ids_all, ids_all)
    t2v_logits, t2v_targets = t2v, targets
    v2t_logits, v2t_targets = t2v.t(), targets.t()
    own_negatives: list[Tensor] = []  # each sample's temporal negative logit(s), for the pair terms
    if reversed_video is not None:
        extra = paired_similarity(text_all, gather_fn(reversed_video)) / temp
        t2v_logits, t2v_targets = with_negative_column(t2v_logits, t2v_targets, extra)
        own_negatives.append(extra)
    if foil_text is not None:
        extra = paired_similarity(gather_fn(foil_text), video_all) / temp
        v2t_logits, v2t_targets = with_negative_column(v2t_logits, v2t_targets, extra)
        own_negatives.append(extra)
    loss = 0.5 * (soft_cross_entropy(t2v_logits, t2v_targets) + soft_cross_entropy(v2t_logits, v2t_targets))
    if pair_weight > 0 and own_negatives:
        positive = t2v.diagonal()  # each caption with its own clip
        zeros = torch.zeros_like(positive, dtype=torch.long)
        pair_losses = [F.cross_entropy(torch.stack([positive, negative], 1), zeros) for negative in own_negatives]
        loss = loss + pair_weight * sum(pair_losses) / len(pair_losses)
    return loss


# ----------------------------------------------------------------------------------------------------------- VTM


def sample_hard_negatives(
    sim: Tensor, sample_ids: Tensor, generator: torch.Generator | None = None, temp: Tensor | float = 1.0,
    gumbel: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per row and per column of a local similarity matrix.

    Each negative is drawn with probability softmax(sim / temp) with every positive (same sample id) set to 0.
    UMT and STM divide the cosine by the contrastive temperature (about 0.07) here, which is what makes the
    negatives hard: at temp 1 the cosines in [-1, 1] give weights within a factor e^2 of each other, so the draw
    is close to uniform. The draw is a Gumbel-max over sim / temp (the same distribution as torch.multinomial of
    the softmax), so it runs on the device without reading anything back.

    Args:
        sim: [B, B] text-to-video cosine similarity (row = text, column = video).
        sample_ids: [B].
        temp: temperature dividing the similarity (a tensor is used detached).
        gumbel: [2, B, B] standard Gumbel noise (text rows, then video rows), e.g. from
            stmvl.models.randomness.hash_gumbel; without it the noise is drawn from `generator` (CPU).

    Returns:
        (video index per text [B], text index per video [B]); -1 where a row has no negative at all (every sample
        of the batch shares its id).
    """
    b = sim.shape[0]
    positive = sample_ids.view(-1, 1) == sample_ids.view(1, -1)
    if gumbel is None:
        u = torch.rand((2, b, b), generator=generator, dtype=torch.float64).clamp(1e-12, 1.0 - 1e-12)
        gumbel = (-torch.log(-torch.log(u))).float().to(sim.device)

    def draw(scores: Tensor, noise: Tensor) -> Tensor:
        logits = scores.float().masked_fill(positive, float("-inf"))
        picks = (logits + noise).argmax(dim=1)
        return torch.where(positive.all(dim=1), torch.full_like(picks, -1), picks)

    temp = temp.detach() if isinstance(temp, Tensor) else temp
    sim = sim.detach() / temp
    return draw(sim, gumbel[0]), draw(sim.t(), gumbel[1])


def vtm_loss(
    fuse: Callable[[Tensor, Tensor, Tensor], Tensor],
    itm_head: Callable[[Tensor], Tensor],
    video_tokens: Tensor,
    text_states: Tensor,
    text_mask: Tensor,
    sim: Tensor,
    sample_ids: Tensor,
    *,
    generator: torch.Generator | None = None,
    reversed_tokens: Tensor | None = None,
    foil_states: Tensor | None = None,
    foil_mask: Tensor | None = None,
    temp: Tensor | float = 1.0,
    gumbel: Tensor | None = None,
    rows: int | None = None,
) -> Tensor:
    """Video-text matching: positives, one hard negative video per text and one hard negative text per video.

    Args:
        fuse: fusion layers, fuse(text_states [P, L, H], text_mask [P, L], video_tokens [U, n, D], video_index=[P],
            first_token_only=True) -> [P, 1, H], pair p scoring video video_index[p] of the U distinct videos
            (BertEncoder.fuse; only the class position is read).
        itm_head: [P, H] -> [P, 2] logits (class 1 = match).
        video_tokens: [B, n, D]; text_states: [B, L, H] text-only states; text_mask: [B, L].
        sim: [B, B] local text-to-video cosine similarity used to draw the negatives.
        temp: the negatives are drawn from softmax(sim / temp) (pass the contrastive temperature for UMT/STM's hard
            negatives; 1 = softmax of the raw cosine).
        reversed_tokens: optional [B, n, D] tokens of the time-reversed clips (extra negative for their caption).
        foil_states, foil_mask: optional [B, L, H] / [B, L] foil captions (extra negative for their video).
        gumbel: optional [2, B, B] noise of the negative draw (see sample_hard_negatives).
        rows: score the pairs of the first `rows` samples only (their negatives are still drawn from the whole
            batch); None = every sample. The fusion layers run on 3-5 pairs per sample, so this is the knob that
            makes VTM cheap (loss.fusion_samples).

    Returns:
        scalar 2-way cross entropy over all pairs (3 per scored sample, one more per option). A row without any
        negative (its sample id fills the batch) keeps a placeholder pair whose label is ignored: fixed shapes,
        nothing read back.
    """
    neg_video, neg_text = sample_hard_negatives(sim, sample_ids, generator, temp, gumbel)
    # the negatives index the whole batch; the scored pairs may be those of the first `rows` samples only
    all_video, all_text, all_mask = video_tokens, text_states, text_mask
    if rows is not None and rows < video_tokens.shape[0]:
        neg_video, neg_text = neg_video[:rows], neg_text[:rows]
        video_tokens, text_states, text_mask = video_tokens[:rows], text_states[:rows], text_mask[:rows]
        reversed_tokens = None if reversed_tokens is None else reversed_tokens[:rows]
        foil_states = None if foil_states is None else foil_states[:rows]
        foil_mask = None if foil_mask is None else foil_mask[:rows]
    video_of_text, text_of_video = neg_video.clamp_min(0), neg_text.clamp_min(0)
    b = video_tokens.shape[0]
    rows_of = torch.arange(b, device=video_tokens.device)
    # the distinct videos (own clips, drawn negatives, reversed clips) and, per pair, which of them it scores: an
    # own clip appears in 3 pairs (its caption, a negative caption, its foil), but the fusion layers project its keys
    # and values once
    videos = [video_tokens, all_video[video_of_text]]
    pair_text = [text_states, text_states, all_text[text_of_video]]
    pair_mask = [text_mask, text_mask, all_mask[text_of_video]]
    pair_video = [rows_of, rows_of + b, rows_of]
    if reversed_tokens is not None:
        videos.append(reversed_tokens)
        pair_text.append(text_states)
        pair_mask.append(text_mask)
        pair_video.append(rows_of + 2 * b)
    if foil_states is not None:
        pair_text.append(foil_states)
        pair_mask.append(foil_mask)
        pair_video.append(rows_of)
    labels = torch.zeros(b * len(pair_video), dtype=torch.long, device=video_tokens.device)
    labels[:b] = 1
    labels[b:2 * b] = torch.where(neg_video >= 0, labels[b:2 * b], IGNORE_INDEX)
    labels[2 * b:3 * b] = torch.where(neg_text >= 0, labels[2 * b:3 * b], IGNORE_INDEX)
    fused = fuse(torch.cat(pair_text), torch.cat(pair_mask), torch.cat(videos), video_index=torch.cat(pair_video),
                 first_token_only=True)
    return F.cross_entropy(itm_head(fused[:, 0]), labels, ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------- MLM


def mlm_mask(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_ids: set[int] | list[int],
    prob: float = 0.5,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: each non-special, non-pad token is chosen with `prob`; chosen tokens become [MASK] (80%),
    a random token (10%) or stay unchanged (10%). Runs on the ids' device.

    Args:
        input_ids, attention_mask: [B, L].
        uniforms: [B, 3, L] uniforms in (0, 1) (choose, kind, random token), e.g. from
            stmvl.models.randomness.hash_uniform; without them they are drawn from `generator` (CPU).

    Returns:
        (masked input ids [B, L], labels [B, L] = original id at chosen positions, IGNORE_INDEX elsewhere).
    """
    b, length = input_ids.shape
    if uniforms is None:
        uniforms = torch.rand((b, 3, length), generator=generator).to(input_ids.device)
    u_choose, u_kind, u_token = uniforms.unbind(1)
    random_tokens = (u_token * vocab_size).long().clamp_max(vocab_size - 1)
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in sorted(special_ids):  # comparisons with Python ints: no host-to-device copy
        special |= input_ids == token
    eligible = (attention_mask > 0) & ~special
    chosen = eligible & (u_choose < prob)
    to_mask = chosen & (u_kind < 0.8)
    to_random = chosen & (u_kind >= 0.8) & (u_kind < 0.9)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_tokens, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy over masked positions. logits [B, L, V], labels [B, L] (IGNORE_INDEX = not masked).

    When no token is masked the loss is 0 but still connected to the graph; the mean is a sum over a clamped count,
    so no value is read back to decide that.
    """
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


# ------------------------------------------------------------------------------------------------------ MVM / UTA


def mvm_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Masked video modelling loss: mean(2 - 2 cos) over every token and layer.

    Args:
        prediction, target: [K, B, n, C] (or any matching shapes with channels last).
    """
    # cos = prediction . unit target / |prediction|: the value of normalising both, with two full-size passes fewer
    # forward and backward (on the demo's [2, 16, 75, 384] targets 2.0 ms against 4.7 ms fwd + bwd, two threads)
    p = prediction.float()
    t = F.normalize(target.float(), dim=-1)
    cos = (p * t).sum(-1) / torch.linalg.vector_norm(p, dim=-1).clamp_min(1e-12)
    return (2 - 2 * cos).mean()


def select_tokens(x: Tensor, keep: Tensor, count: int | None = None) -> Tensor:
    """[..., B, T*N, C] -> [..., B, n, C]: the kept tokens (keep: bool [B, T*N], the same count n per sample).

    count: n when the caller knows it (then nothing is read back from the device); else read from keep.
    """
    n = int(keep[0].sum()) if count is None else count
    return gather_tokens(x, kept_index(keep, n))


def uta_loss(prediction: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """UMT's unmasked token alignment: the MVM loss on the visible tokens only.

    Args:
        prediction: [K, B, n, C] decoder outputs for the kept tokens.
        target: [K, B, T*N, C] teacher targets of the whole clip.
        keep: bool [B, T*N], True = visible.
    """
    return mvm_loss(prediction, select_tokens(target, keep, prediction.shape[-2]))
