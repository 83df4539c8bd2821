"""Zero-shot / finetuned text-video retrieval: ITC similarity, ITM re-ranking of the top ``k_test``, both tables.

Protocol: README.md, "Evaluation protocol". Features are extracted once (sharded over ranks, gathered). The ITC
matrix is the mean over frames of the cosine between text and frame embeddings. For every query, in both
directions, its ``k_test`` best candidates by ITC are re-scored by the ITM head's positive probability; the
(text, video) pairs of all queries and both directions are deduplicated, sharded over ranks and scored in chunks
of ``batch_size`` pairs. In the re-ranked matrix the other candidates keep their ITC order but sit strictly below
every re-scored one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from stmvl.eval.features import (
    autocast_context,
    describe_protocol,
    evaluation_mode,
    extract_text_features,
    extract_video_features,
    gather_rows,
    itc_similarity,
    positive_probability,
    rank_and_world,
    shard_range,
)
from stmvl.eval.metrics import TEXT_QUERY, VIDEO_QUERY, ground_truth_mask, retrieval_metrics

DEFAULT_TEXT_MAX_LEN = 32


def top_k_pairs(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (text, video) pairs to re-score: each text's top-k videos and each video's top-k texts.

    Args:
        sim: [Nt, Nv] ITC scores.
        k: candidates per query (clipped to the gallery size).

    Returns:
        ``pairs`` long [P, 2] unique (text, video) pairs sorted by text then video; ``t2v_top`` long [Nt, k_v];
        ``v2t_top`` long [Nv, k_t] (candidate indices per query).
    """
    num_texts, num_videos = sim.shape
    t2v_top = sim.topk(min(k, num_videos), dim=1).indices
    v2t_top = sim.t().topk(min(k, num_texts), dim=1).indices
    t2v_keys = torch.arange(num_texts)[:, None] * num_videos + t2v_top
    v2t_keys = v2t_top * num_videos + torch.arange(num_videos)[:, None]
    keys = torch.unique(torch.cat([t2v_keys.flatten(), v2t_keys.flatten()]))
    pairs = torch.stack([keys // num_videos, keys % num_videos], dim=1)
    return pairs, t2v_top, v2t_top


def score_pairs(
    model: Any,
    pairs: torch.Tensor,
    video_tokens: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast: bool = False,
) -> torch.Tensor:
    """ITM positive probability of (text, video) pairs, in chunks of ``batch_size`` pairs, sharded over ranks.

    Args:
        pairs: long [P, 2] (text index, video index).
        video_tokens: [Nv, n, D]; text_states: [Nt, L, H]; text_mask: [Nt, L].

    Returns:
        float32 [P] on the CPU, identical on every rank.

    The pairs are scored in video order, so that a chunk holds few distinct videos and the fusion layers project
    each one's keys and values once per chunk (a video is a candidate of ~2 k_test pairs), not once per pair.
    """
    device = torch.device(device)
    rank, world = rank_and_world()
    order = torch.argsort(pairs[:, 1], stable=True)  # video order
    shard = shard_range(pairs.shape[0], rank, world)
    scores = []
    with evaluation_mode(model):
        for start in range(shard.start, shard.stop, batch_size):
            text_idx, video_idx = pairs[order[start : min(start + batch_size, shard.stop)]].unbind(dim=1)
            videos, video_index = torch.unique(video_idx, return_inverse=True)
            with autocast_context(device, autocast):
                logits = model.itm_logits(
                    video_tokens[videos].to(device), text_states[text_idx].to(device), text_mask[text_idx].to(device),
                    video_index=video_index.to(device),
                )
            scores.append(positive_probability(logits).cpu())
    in_video_order = gather_rows(torch.cat(scores) if scores else None, pairs.shape[0])
    return torch.empty_like(in_video_order).index_copy_(0, order, in_video_order)


def rerank_matrices(
    sim: torch.Tensor, pairs: torch.Tensor, pair_scores: torch.Tensor, t2v_top: torch.Tensor, v2t_top: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the ITM-re-ranked score matrices.

    Each query's top-k candidates get their ITM probability (in [0, 1]); every other candidate gets
    ``itc - max(itc) - 1`` (at most -1, so below every re-scored candidate, and still in ITC order).

    Args:
        sim: [Nt, Nv] ITC; pairs: [P, 2]; pair_scores: [P]; t2v_top: [Nt, k]; v2t_top: [Nv, k].

    Returns:
        ``t2v`` [Nt, Nv] and ``v2t`` [Nv, Nt].
    """
    num_texts, num_videos = sim.shape
    itm = torch.full((num_texts, num_videos), float("nan"))
    itm[pairs[:, 0], pairs[:, 1]] = pair_scores.float()
    floor = sim.float() - sim.max().float() - 1.0
    t2v = floor.clone()
    t2v.scatter_(1, t2v_top, itm.gather(1, t2v_top))
    v2t = floor.t().clone()
    v2t.scatter_(1, v2t_top, itm.t().gather(1, v2t_top))
    return t2v, v2t


def evaluate_retrieval(
    model: Any,
    dataset: Any,
    *,
    batch_size: int = 32,
    k_test: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: bool = False,
    max_text_len: int | None = None,
    itm: bool = True,
    similarity_out: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Retrieval evaluation of ``model`` on ``dataset`` with both tables.

    Args:
        model: follows the protocol of :mod:`stmvl.eval.features`.
        dataset: ``len(dataset)`` videos; ``dataset[i]["video"]`` uint8 [T, 3, H, W]; attributes ``texts``
            (list[str]), ``txt2vid`` and ``vid2txt`` (ground-truth index lists); optionally ``split``,
            ``num_frames``, ``sampling``, ``max_text_len`` for the protocol.
        batch_size: clips, texts and ITM pairs per forward.
        k_test: candidates re-ranked by ITM per query.
        max_text_len: tokenizer truncation; defaults to ``dataset.max_text_len`` or 32.
        itm: set False to skip the re-ranking (only the ``itc`` table is returned).
        similarity_out: a dict that receives ``"itc"``: the ITC similarity ``[texts, videos]`` (float, CPU) the
            ``itc`` table ranks by, for error analysis (the metrics stay JSON-ready).

    Returns:
        ``{"itc": metrics, "itm": metrics, "protocol": {...}}`` (see :func:`stmvl.eval.metrics.retrieval_metrics`).
    """
    max_len = max_text_len or getattr(dataset, "max_text_len", None) or DEFAULT_TEXT_MAX_LEN
    source = str(getattr(getattr(dataset, "records", None), "source", "") or "")
    # ground truth that cannot be ranked is the annotation's fault: say so before any clip is encoded
    ground_truth_mask(dataset.txt2vid, len(dataset), source=source, query=TEXT_QUERY)
    ground_truth_mask(dataset.vid2txt, len(dataset.texts), source=source, query=VIDEO_QUERY)
    video_tokens, frame_embeds = extract_video_features(
        model, dataset, batch_size=batch_size, num_workers=num_workers, device=device, autocast=autocast
    )
    text_states, text_mask, text_embeds = extract_text_features(
        model, dataset.texts, max_length=max_len, batch_size=batch_size, device=device, autocast=autocast
    )
    sim = itc_similarity(text_embeds, frame_embeds)
    if similarity_out is not None:
        similarity_out["itc"] = sim.detach().float().cpu()
    result: dict[str, Any] = {"itc": retrieval_metrics(sim, dataset.txt2vid, dataset.vid2txt, source=source)}
    k = min(k_test, max(sim.shape))
    if itm:
        pairs, t2v_top, v2t_top = top_k_pairs(sim, k)
        pair_scores = score_pairs(
            model, pairs, video_tokens, text_states, text_mask, batch_size=batch_size, device=device, autocast=autocast
        )
        t2v, v2t = rerank_matrices(sim, pairs, pair_scores, t2v_top, v2t_top)
        result["itm"] = retrieval_metrics(t2v, dataset.txt2vid, dataset.vid2txt, v2t_sim=v2t, source=source)
    result["protocol"] = describe_protocol(
        dataset,
        task="retrieval",
        k_test=k if itm else None,
        text_max_len=max_len,
        num_texts=len(dataset.texts),
        num_videos=len(dataset),
        similarity="mean over frames of cosine(frame, text)",
        rerank="softmax(itm)[1] on the top k_test ITC candidates per query" if itm else None,
        ties="pessimistic (a tied non-ground-truth counts ahead)",
        autocast="bf16" if autocast else "fp32",
    )
    return result


def ground_truth_from_pairs(text_to_video: Sequence[int], num_videos: int) -> tuple[list[list[int]], list[list[int]]]:
    """``txt2vid`` and ``vid2txt`` lists when each text has exactly one video (``text_to_video[t]``)."""
    txt2vid = [[v] for v in text_to_video]
    vid2txt: list[list[int]] = [[] for _ in range(num_videos)]
    for text, video in enumerate(text_to_video):
        vid2txt[video].append(text)
    return txt2vid, vid2txt
