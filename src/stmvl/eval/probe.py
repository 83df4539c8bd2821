"""Temporal probe: does the model prefer the true caption over its temporal foil (docs/synthetic_corpus.md)?

Each item has a clip and two captions that differ only in temporal order ("moves left" vs "moves right", "first ...
then ..." swapped); reversing the motion turns one into the other, so a frame-order-blind model cannot beat chance.
Accuracy is reported by ITC (mean over frames of the cosine) and by ITM (positive probability). A tie counts as half
a correct answer, so a model that scores caption and foil identically gets exactly 50%.

The control evaluation (``shuffle_frames``) feeds the same clips with their frames reordered: ``"reverse"`` or
``"permute"`` (a fixed, seeded, non-identity permutation per clip). A probe that measures frame order must fall to
about chance under it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from stmvl.eval.features import (describe_protocol, encode_texts_per_clip, evaluation_mode, map_clips,
                                 score_clips_against_texts)

SHUFFLE_MODES = (None, "reverse", "permute")
DEFAULT_PROBE_TEXT_LEN = 32


def frame_permutation(index: int, num_frames: int, mode: str | None, seed: int = 0) -> torch.Tensor:
    """Frame order used for clip ``index`` in the control evaluation.

    Args:
        index: dataset index (each clip gets its own fixed permutation).
        num_frames: T.
        mode: None (identity), ``"reverse"`` or ``"permute"``.
        seed: base seed of the permutations.

    Returns:
        long [T], a permutation of ``range(T)``; for ``"permute"`` never the identity when T > 1 (an unshuffled clip
        would leak order into the control).
    """
    if mode not in SHUFFLE_MODES:
        raise ValueError(f"shuffle_frames must be one of {SHUFFLE_MODES}, got {mode!r}")
    identity = torch.arange(num_frames)
    if mode is None:
        return identity
    if mode == "reverse":
        return identity.flip(0)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    order = torch.randperm(num_frames, generator=generator)
    while num_frames > 1 and torch.equal(order, identity):
        order = torch.randperm(num_frames, generator=generator)
    return order


def preference_credit(true_score: torch.Tensor, foil_score: torch.Tensor) -> torch.Tensor:
    """1 where the caption wins, 0.5 on a tie, 0 where the foil wins: [B], [B] -> float [B]."""
    return (true_score > foil_score).float() + 0.5 * (true_score == foil_score).float()


class FrameOrders:
    """A view of a clip dataset whose item i holds clip i under each frame order of ``modes`` (see
    :func:`frame_permutation`): ``"video"`` uint8 [M, T, 3, H, W]. The clip is decoded once for all M orders."""

    def __init__(self, dataset: Any, modes: Sequence[str | None], seed: int = 0):
        for mode in modes:
            frame_permutation(0, 1, mode)  # validate every mode before any clip is decoded
        self.dataset, self.modes, self.seed = dataset, tuple(modes), seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        video = item["video"]
        item["video"] = torch.stack([video[frame_permutation(index, video.shape[0], mode, self.seed)]
                                     for mode in self.modes])
        return item

    def __getattr__(self, name: str) -> Any:
        # Protocol attributes (split, num_frames, ...) come from the wrapped dataset.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ShuffledFrames(FrameOrders):
    """A view of a clip dataset with the frames of item i reordered by :func:`frame_permutation` (one order of
    :class:`FrameOrders`): ``"video"`` uint8 [T, 3, H, W]."""

    def __init__(self, dataset: Any, mode: str | None, seed: int = 0):
        super().__init__(dataset, (mode,), seed)
        self.mode = mode

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["video"] = item["video"][0]
        return item


def evaluate_probe(
    model: Any,
    dataset: Any,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: bool = False,
    shuffle_frames: str | None = None,
    seed: int = 0,
    max_text_len: int | None = None,
    itm: bool = True,
) -> dict[str, Any]:
    """Temporal probe accuracy by ITC and by ITM.

    Args:
        model: follows the protocol of :mod:`stmvl.eval.features`.
        dataset: items with ``"video"`` uint8 [T, 3, H, W], ``"caption"`` and ``"foil"`` (str).
        shuffle_frames: None, ``"reverse"`` or ``"permute"`` (control evaluation).
        seed: seed of the ``"permute"`` orders.
        max_text_len: tokenizer truncation; defaults to ``dataset.max_text_len`` or 32.
        itm: set False to skip the VTM head (no ``itm_acc``; the fusion layers are most of the probe's cost).

    Returns:
        ``{"itc_acc", "itm_acc"}`` in [0, 1] (``itm_acc`` only with ``itm``), ``"n"`` (clips) and ``"protocol"``.
    """
    return evaluate_probe_orders(model, dataset, (shuffle_frames,), batch_size=batch_size, num_workers=num_workers,
                                 device=device, autocast=autocast, seed=seed, max_text_len=max_text_len, itm=itm)[0]


def evaluate_probe_orders(
    model: Any,
    dataset: Any,
    orders: Sequence[str | None],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: bool = False,
    seed: int = 0,
    max_text_len: int | None = None,
    itm: bool = True,
) -> list[dict[str, Any]]:
    """:func:`evaluate_probe` under each frame order of ``orders`` (e.g. ``(None, "permute")``: the probe and its
    shuffled control) in one pass: each clip is decoded once and each caption and foil encoded once.

    Returns one result per order, each exactly what ``evaluate_probe(..., shuffle_frames=order)`` returns.
    """
    device = torch.device(device)
    max_len = max_text_len or getattr(dataset, "max_text_len", None) or DEFAULT_PROBE_TEXT_LEN
    clips = FrameOrders(dataset, orders, seed)

    def score(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        pairs = [[caption, foil] for caption, foil in zip(batch["caption"], batch["foil"])]
        texts = encode_texts_per_clip(model, pairs, max_len, device, autocast)
        credits: tuple[torch.Tensor, ...] = ()
        for m in range(len(clips.modes)):  # batch["video"]: [B, M, T, 3, H, W]
            itm_scores, itc = score_clips_against_texts(model, batch["video"][:, m], texts, device, autocast, itm=itm)
            credits += (preference_credit(itc[:, 0], itc[:, 1]),)
            credits += (preference_credit(itm_scores[:, 0], itm_scores[:, 1]),) if itm else ()
        return credits

    with evaluation_mode(model):
        credits = map_clips(clips, score, batch_size=batch_size, num_workers=num_workers)
    per_order = 2 if itm else 1
    results = []
    for m, mode in enumerate(clips.modes):
        itc_credit = credits[m * per_order]
        accuracy = {"itc_acc": float(itc_credit.mean())}
        if itm:
            accuracy["itm_acc"] = float(credits[m * per_order + 1].mean())
        results.append({
            **accuracy,
            "n": int(itc_credit.numel()),
            "protocol": describe_protocol(
                dataset,
                task="temporal_probe",
                shuffle_frames=mode or "none",
                shuffle_seed=seed if mode == "permute" else None,
                text_max_len=max_len,
                ties="half credit",
                autocast="bf16" if autocast else "fp32",
            ),
        })
    return results
