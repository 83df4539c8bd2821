"""Retrieval metrics: recall@K, median rank and mean rank with several ground truths per query.

Rank rule (used for every number this module returns):

* Ranks are 1-based.
* A query with several ground truths is ranked by its best-scoring ground truth.
* Ties are broken **pessimistically**: every non-ground-truth candidate whose score is greater than *or equal to*
  the best ground-truth score counts as ranked ahead of it. Other ground truths never count against the query.
  So ``rank = 1 + #{j not in GT : s[j] >= max_{g in GT} s[g]}``. A model that gives every candidate the same score
  therefore gets the worst rank, not a lucky one.
* The median rank of an even number of queries is the mean of the two middle ranks (``numpy.median``).
* Recalls are percentages (0-100), as in the UMT/STM tables.

Ground truth that cannot be ranked (a query without any, an index outside the gallery) comes from the annotation
file: it is an :class:`~stmvl.data.annotations.AnnotationError` (a user error, one line) naming the file when the
caller passes ``source`` and the query.
"""

from __future__ import annotations

from typing import Sequence

import torch

from stmvl.data.annotations import AnnotationError

RECALL_KS = (1, 5, 10)
# how errors name the queries of each direction (the videos of a retrieval corpus are its records, in order)
TEXT_QUERY, VIDEO_QUERY = "text query", "the video of record"


def ground_truth_mask(gts: Sequence[Sequence[int]], num_candidates: int, *, source: str = "",
                      query: str = "query") -> torch.Tensor:
    """Turn per-query ground-truth lists into a mask.

    Args:
        gts: for each of Q queries, the candidate indices that are correct (at least one each).
        num_candidates: C, the gallery size.
        source, query: what the error names: the annotation file and the kind of query (``"text query"``).

    Returns:
        bool [Q, C], True where the candidate is a ground truth of the query.

    Raises:
        AnnotationError: a query without ground truth, or one outside the gallery.
    """
    where = f"{source}: " if source else ""
    mask = torch.zeros(len(gts), num_candidates, dtype=torch.bool)
    for index, correct in enumerate(gts):
        if len(correct) == 0:
            raise AnnotationError(f"{where}{query} {index} has no ground truth (every query needs at least one; "
                                  "check the records' 'gt' fields)")
        for candidate in correct:
            if not 0 <= candidate < num_candidates:
                raise AnnotationError(f"{where}{query} {index}: ground truth {candidate} is outside the gallery of "
                                      f"{num_candidates}")
            mask[index, candidate] = True
    return mask


def query_ranks(sim: torch.Tensor, gts: Sequence[Sequence[int]], *, source: str = "",
                query: str = "query") -> torch.Tensor:
    """1-based rank of each query's best ground truth under the pessimistic tie rule (see module doc).

    Args:
        sim: float [Q, C], higher = more similar. ``-inf`` is allowed (a candidate ruled out); NaN is not.
        gts: Q lists of ground-truth candidate indices.
        source, query: named by the AnnotationError of bad ground truth (see :func:`ground_truth_mask`).

    Returns:
        long [Q] ranks in [1, C].
    """
    if sim.dim() != 2 or sim.shape[0] != len(gts):
        raise ValueError(f"sim must be [Q, C] with Q = {len(gts)} queries, got {tuple(sim.shape)}")
    sim = sim.detach().float().cpu()
    if torch.isnan(sim).any():
        raise ValueError("similarity matrix contains NaN; a rank would be meaningless")
    is_gt = ground_truth_mask(gts, sim.shape[1], source=source, query=query)
    best_gt = sim.masked_fill(~is_gt, float("-inf")).max(dim=1).values
    ahead = (sim >= best_gt[:, None]) & ~is_gt
    return 1 + ahead.sum(dim=1)


def rank_summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    """R@1/5/10 (percent), their mean, median and mean rank for one direction.

    Args:
        ranks: long [Q] 1-based ranks.
        prefix: key prefix, e.g. ``"t2v"``.

    Returns:
        ``{prefix_r1, prefix_r5, prefix_r10, prefix_r_mean, prefix_medr, prefix_meanr}``.
    """
    ranks_f = ranks.double()
    out = {f"{prefix}_r{k}": float((ranks_f <= k).double().mean() * 100.0) for k in RECALL_KS}
    out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out[f"{prefix}_medr"] = float(ranks_f.median()) if ranks.numel() % 2 else _even_median(ranks_f)
    out[f"{prefix}_meanr"] = float(ranks_f.mean())
    return out


def _even_median(values: torch.Tensor) -> float:
    # torch.median returns the lower middle value; the usual retrieval tables use numpy's midpoint convention.
    ordered = values.sort().values
    middle = values.numel() // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def retrieval_metrics(
    sim: torch.Tensor,
    txt2vid: Sequence[Sequence[int]],
    vid2txt: Sequence[Sequence[int]],
    *,
    v2t_sim: torch.Tensor | None = None,
    source: str = "",
) -> dict[str, float]:
    """Text-to-video and video-to-text retrieval metrics.

    Args:
        sim: float [Nt, Nv] text-video scores; rows are the text queries.
        txt2vid: Nt lists of the correct videos of each text.
        vid2txt: Nv lists of the correct texts of each video.
        v2t_sim: optional float [Nv, Nt] scores for the video queries, when they differ from ``sim.T`` (ITM
            re-ranking picks a different top-k per direction). Defaults to ``sim.T``.
        source: the annotation file the ground truth comes from (named by the AnnotationError of a bad one).

    Returns:
        ``t2v_*`` and ``v2t_*`` keys from :func:`rank_summary` plus ``r_mean``, the mean of the six recalls.
    """
    if sim.dim() != 2 or sim.shape != (len(txt2vid), len(vid2txt)):
        raise ValueError(
            f"sim must be [Nt, Nv] = [{len(txt2vid)}, {len(vid2txt)}] to match the ground truth, got {tuple(sim.shape)}"
        )
    video_queries = sim.t() if v2t_sim is None else v2t_sim
    if video_queries.shape != (sim.shape[1], sim.shape[0]):
        raise ValueError(f"v2t_sim must be [Nv, Nt] = {tuple(sim.t().shape)}, got {tuple(video_queries.shape)}")
    out = rank_summary(query_ranks(sim, txt2vid, source=source, query=TEXT_QUERY), "t2v")
    out.update(rank_summary(query_ranks(video_queries, vid2txt, source=source, query=VIDEO_QUERY), "v2t"))
    out["r_mean"] = (out["t2v_r_mean"] + out["v2t_r_mean"]) / 2
    return out
