"""Batched, rank-sharded, gradient-free feature extraction shared by every evaluator.

The evaluators only rely on this model protocol (see docs/internals.md):

* ``model.video_features(video [B, T, 3, H, W] float in [0, 1]) -> (tokens [B, n, D], frame_embeds [B, T', E])``,
  the frame embeddings L2-normalised;
* ``model.text_features(input_ids [B, L], attention_mask [B, L]) -> (states [B, L, H], embeds [B, E])``;
* ``model.itm_logits(video_tokens [U, n, D], text_states [P, L, H], text_mask [P, L], video_index [P]) -> [P, 2]``
  (index 1 = matching pair; text ``i`` is paired with video ``video_index[i]`` of the ``U`` distinct videos);
* ``model.temp`` (scalar tensor), ``model.tokenizer(texts: list[str], max_length) -> {"input_ids", "attention_mask"}``.

Sharding: when ``torch.distributed`` is initialised, rank r processes the contiguous rows
``[r * ceil(N / W), (r + 1) * ceil(N / W))`` and the results are all-gathered, so every rank ends with the full,
ordered tensors. Without a process group everything runs in the one process.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

# Rows per all_gather call: bounds the temporary memory of gathering video tokens (N x n x D can be gigabytes).
GATHER_BLOCK_ROWS = 256


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(total: int, rank: int, world: int) -> range:
    """Contiguous rows of ``total`` owned by ``rank``: chunks of ``ceil(total / world)``.

    The last shards may be short or empty.
    """
    chunk = math.ceil(total / world) if total else 0
    return range(min(rank * chunk, total), min((rank + 1) * chunk, total))


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor | None, total: int) -> torch.Tensor:
    """All-gather the row shards of :func:`shard_range` into the full ``[total, ...]`` tensor, on the CPU.

    Args:
        local: this rank's rows ``[len(shard), ...]``, or None for an empty shard (its shape is taken from the
            other ranks).
        total: the number of rows over all ranks.

    Returns:
        ``[total, ...]`` on every rank, in the original row order.
    """
    rank, world = rank_and_world()
    if world == 1:
        if local is None:
            raise ValueError("nothing to gather: the single process produced no rows")
        return local.cpu()
    meta = [None] * world
    dist.all_gather_object(meta, None if local is None else (tuple(local.shape[1:]), local.dtype))
    known = [m for m in meta if m is not None]
    if not known:
        raise ValueError("nothing to gather: every rank produced no rows")
    trailing, dtype = known[0]
    chunk = math.ceil(total / world)
    padded = torch.zeros((chunk, *trailing), dtype=dtype)
    if local is not None:
        padded[: local.shape[0]] = local.cpu()
    device = _comm_device()
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, chunk, GATHER_BLOCK_ROWS):
        block = padded[start : start + GATHER_BLOCK_ROWS].to(device)
        received = [torch.empty_like(block) for _ in range(world)]
        dist.all_gather(received, block)
        for r, part in enumerate(received):
            per_rank[r].append(part.cpu())
    # Padding sits only past `total` because shards are contiguous and only the tail ones are short.
    return torch.cat([torch.cat(parts) for parts in per_rank])[:total]


def gather_list(local: list[Any], total: int) -> list[Any]:
    """All-gather python objects sharded like :func:`shard_range` (e.g. captions); the full ordered list."""
    _, world = rank_and_world()
    if world == 1:
        return list(local)
    parts: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(parts, list(local))
    merged = [item for part in parts for item in part]
    if len(merged) != total:
        raise RuntimeError(f"gathered {len(merged)} items, expected {total}")
    return merged


def collate_clips(items: Sequence[dict]) -> dict[str, Any]:
    """Stack dataset items: ``"video"`` uint8 [T, 3, H, W] -> float [B, T, 3, H, W] in [0, 1]; other keys as lists."""
    batch: dict[str, Any] = {"video": torch.stack([item["video"] for item in items]).float().div_(255.0)}
    for key in items[0]:
        if key != "video":
            batch[key] = [item[key] for item in items]
    return batch


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; the training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def map_clips(
    dataset: Any,
    fn: Callable[[dict[str, Any]], Sequence[torch.Tensor]],
    *,
    batch_size: int,
    num_workers: int = 0,
) -> list[torch.Tensor]:
    """Run ``fn`` over this rank's shard of ``dataset`` in batches and gather every output over the ranks.

    Args:
        dataset: indexable, ``dataset[i]`` a dict with ``"video"`` uint8 [T, 3, H, W] and any other fields.
        fn: batch (see :func:`collate_clips`) -> tuple of tensors, each ``[B, ...]``.
        batch_size: clips per forward.
        num_workers: DataLoader workers.

    Returns:
        one ``[len(dataset), ...]`` CPU tensor per output of ``fn``, in dataset order.
    """
    total = len(dataset)
    rank, world = rank_and_world()
    shard = shard_range(total, rank, world)
    from stmvl.data.mixing import one_thread_per_worker

    loader = DataLoader(
        Subset(dataset, list(shard)), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_clips, worker_init_fn=one_thread_per_worker if num_workers > 0 else None,
    )
    outputs: list[list[torch.Tensor]] = []
    error = None
    try:
        for batch in loader:
            for slot, value in enumerate(fn(batch)):
                if slot == len(outputs):
                    outputs.append([])
                outputs[slot].append(value.detach().cpu())
    except Exception as exc:  # noqa: BLE001 - e.g. a corrupt clip in one rank's shard
        error = exc
    # every rank learns of a failure here, before the gathers below, so none is left waiting in them
    from stmvl.data.video import MediaError
    from stmvl.errors import UserError
    from stmvl.train.distributed import raise_if_any_failed

    raise_if_any_failed(error, "reading the evaluation clips", user_errors=(UserError, MediaError))
    num_outputs = _agree_on_output_count(len(outputs))
    local = [torch.cat(outputs[slot]) if outputs else None for slot in range(num_outputs)]
    return [gather_rows(part, total) for part in local]


def _agree_on_output_count(local_count: int) -> int:
    # A rank with an empty shard never called fn, so it learns the number of outputs from the others.
    _, world = rank_and_world()
    if world == 1:
        return local_count
    counts = [0] * world
    dist.all_gather_object(counts, local_count)
    return max(counts)


def extract_video_features(
    model: Any,
    dataset: Any,
    *,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Video tokens and frame embeddings of every clip of ``dataset``.

    Returns:
        ``tokens [Nv, n, D]`` (bf16 when ``autocast``, to halve the memory of keeping them for ITM) and
        ``frame_embeds [Nv, T', E]`` float32, both on the CPU.
    """
    device = torch.device(device)

    def encode(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_context(device, autocast):
            tokens, frame_embeds = model.video_features(batch["video"].to(device))
        return _storage(tokens, autocast), frame_embeds.float()

    with evaluation_mode(model):
        tokens, frame_embeds = map_clips(dataset, encode, batch_size=batch_size, num_workers=num_workers)
    return tokens, frame_embeds


def _storage(x: torch.Tensor, autocast: bool) -> torch.Tensor:
    return x.to(torch.bfloat16) if autocast else x.float()


def tokenize(model: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """``model.tokenizer`` on all ``texts`` at once, so every row shares one padded length L."""
    tokens = model.tokenizer(list(texts), max_length=max_length)
    return {"input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long()}


def extract_text_features(
    model: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text states, masks and embeddings of every text, sharded over ranks and gathered.

    Returns:
        ``states [Nt, L, H]`` (bf16 when ``autocast``), ``mask [Nt, L]`` long, ``embeds [Nt, E]`` float32, on CPU.
    """
    device = torch.device(device)
    tokens = tokenize(model, texts, max_length)
    total = len(texts)
    rank, world = rank_and_world()
    shard = shard_range(total, rank, world)
    states_parts, embed_parts = [], []
    with evaluation_mode(model):
        for start in range(shard.start, shard.stop, batch_size):
            rows = slice(start, min(start + batch_size, shard.stop))
            with autocast_context(device, autocast):
                states, embeds = model.text_features(
                    tokens["input_ids"][rows].to(device), tokens["attention_mask"][rows].to(device)
                )
            states_parts.append(_storage(states, autocast).cpu())
            embed_parts.append(embeds.float().cpu())
    states = gather_rows(torch.cat(states_parts) if states_parts else None, total)
    embeds = gather_rows(torch.cat(embed_parts) if embed_parts else None, total)
    return states, tokens["attention_mask"], embeds


def itc_similarity(text_embeds: torch.Tensor, frame_embeds: torch.Tensor, video_chunk: int = 1024) -> torch.Tensor:
    """Mean over frames of the cosine between each text and each frame.

    Args:
        text_embeds: [Nt, E] L2-normalised.
        frame_embeds: [Nv, T', E] L2-normalised.
        video_chunk: videos per matmul, to bound the [Nt, chunk, T'] temporary.

    Returns:
        float32 [Nt, Nv].
    """
    text_embeds = text_embeds.float()
    columns = [
        torch.einsum("te,vfe->tvf", text_embeds, frame_embeds[start : start + video_chunk].float()).mean(dim=-1)
        for start in range(0, frame_embeds.shape[0], video_chunk)
    ]
    return torch.cat(columns, dim=1)


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """softmax(itm_logits)[:, 1] in float32: [P, 2] -> [P]."""
    return logits.float().softmax(dim=-1)[:, 1]


def score_texts_per_clip(
    model: Any, video: torch.Tensor, texts: Sequence[Sequence[str]], max_length: int,
    device: torch.device, autocast: bool, itm: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """ITM match probability and ITC similarity of every clip with each of its own K texts (MC options, probe
    caption and foil).

    Args:
        video: float [B, T, 3, H, W]; texts: B lists of K strings (tokenized together: one padded length).
        itm: set False to skip the fusion layers (the first element is then None).

    Returns:
        (itm [B, K], itc [B, K]) on the CPU in float32; itc is the frame-mean cosine, as in retrieval.
    """
    side = encode_texts_per_clip(model, texts, max_length, device, autocast)
    return score_clips_against_texts(model, video, side, device, autocast, itm=itm)


@dataclass
class ClipTexts:
    """The encoded texts of :func:`encode_texts_per_clip`: K per clip, flattened clip-major (row b * K + k)."""

    count: int  # K
    states: torch.Tensor  # [B * K, L, H]
    mask: torch.Tensor  # [B * K, L]
    embeds: torch.Tensor  # [B * K, E]


def encode_texts_per_clip(model: Any, texts: Sequence[Sequence[str]], max_length: int, device: torch.device,
                          autocast: bool) -> ClipTexts:
    """Encode B lists of K texts once, for scoring against one or more versions of the B clips."""
    tokens = tokenize(model, [text for clip_texts in texts for text in clip_texts], max_length)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    with autocast_context(device, autocast):
        states, embeds = model.text_features(ids, mask)
    return ClipTexts(len(texts[0]), states, mask, embeds)


def score_clips_against_texts(model: Any, video: torch.Tensor, texts: ClipTexts, device: torch.device,
                              autocast: bool, itm: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(itm [B, K] or None, itc [B, K]) of clips float [B, T, 3, H, W] with their encoded texts (CPU, float32)."""
    size, count = video.shape[0], texts.count
    with autocast_context(device, autocast):
        video_tokens, frame_embeds = model.video_features(video.to(device))
        logits = None
        if itm:
            video_index = torch.arange(size, device=device).repeat_interleave(count)
            logits = model.itm_logits(video_tokens, texts.states, texts.mask, video_index=video_index)
    text_embeds = texts.embeds.float().view(size, count, -1)
    itc = torch.einsum("bfe,bke->bkf", frame_embeds.float(), text_embeds).mean(-1).cpu()
    return None if logits is None else positive_probability(logits).view(size, count).cpu(), itc


def describe_protocol(dataset: Any, **fields: Any) -> dict[str, Any]:
    """The protocol written next to every number: dataset attributes (split, frames, sampling) plus ``fields``.

    Reads ``split``, ``num_frames`` and ``sampling`` from ``dataset`` when it has them; ``fields`` override.
    """
    protocol: dict[str, Any] = {}
    for name in ("split", "num_frames", "sampling"):
        value = getattr(dataset, name, None)
        if value is not None:
            protocol["frames" if name == "num_frames" else name] = value
    protocol.update({key: value for key, value in fields.items() if value is not None})
    return protocol
