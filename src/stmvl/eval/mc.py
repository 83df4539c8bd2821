"""Multiple-choice video-text scoring (MSRVTT-MC style, README.md, Evaluation protocol).

For a clip and its K candidate sentences:
``score_k = 0.7 * softmax(itm_logits_k)[1] + 0.3 * softmax_k(itc_k / temp)`` where ``itc_k`` is the mean over frames
of the cosine between the frames and option k, and the second softmax runs over the clip's options. The prediction is
the argmax (the first option on an exact tie). ITM-only and ITC-only accuracies are reported beside the combined one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from stmvl.data.annotations import AnnotationError
from stmvl.eval.features import describe_protocol, evaluation_mode, map_clips, score_texts_per_clip

ITM_WEIGHT = 0.7
ITC_WEIGHT = 0.3
DEFAULT_MC_TEXT_LEN = 32


def combine_option_scores(itm_prob: torch.Tensor, itc: torch.Tensor, temp: float | torch.Tensor) -> torch.Tensor:
    """The MC score of every option.

    Args:
        itm_prob: [B, K] ITM positive probabilities.
        itc: [B, K] ITC similarities (frame-mean cosine).
        temp: contrastive temperature (ITC logits are ``itc / temp``).

    Returns:
        [B, K] ``0.7 * itm_prob + 0.3 * softmax_K(itc / temp)``.
    """
    temp = torch.as_tensor(temp, dtype=torch.float32).detach().cpu()
    return ITM_WEIGHT * itm_prob.float() + ITC_WEIGHT * (itc.float() / temp).softmax(dim=-1)


def _different_counts(source: str, index: int, count: int, first_index: int, first_count: int) -> AnnotationError:
    where = f"{source}: " if source else ""
    return AnnotationError(f"{where}record {index}: {count} options, but record {first_index} has {first_count}; every "
                           "multiple-choice item needs the same number of options")


def check_option_counts(dataset: Any) -> None:
    """Every record of an stmvl MC dataset (its ``records``, options in ``caption``) has as many options as the first:
    checked before any clip is read. An AnnotationError names the file and the first record that differs."""
    records = getattr(dataset, "records", None)
    if records is None:  # another dataset: its batches are checked as they come (_option_count)
        return
    first = None
    for index, record in enumerate(records):
        count = len(record["caption"])
        first = count if first is None else first
        if count != first:
            raise _different_counts(str(getattr(records, "source", "")), index, count, 0, first)


def _option_count(options: Sequence[Sequence[str]], indices: Sequence[int], source: str = "") -> int:
    """The number of options of a batch's items; an AnnotationError naming the first item that differs."""
    counts = [len(item_options) for item_options in options]
    for position, count in enumerate(counts):
        if count != counts[0]:
            raise _different_counts(source, int(indices[position]), count, int(indices[0]), counts[0])
    return counts[0]


def evaluate_mc(
    model: Any,
    dataset: Any,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: bool = False,
    max_text_len: int | None = None,
) -> dict[str, Any]:
    """Multiple-choice accuracy.

    Args:
        model: follows the protocol of :mod:`stmvl.eval.features` (including ``temp``).
        dataset: items with ``"video"`` uint8 [T, 3, H, W], ``"options"`` (K strings, the same K for all items)
            and ``"answer"`` (int index of the correct option).
        batch_size: clips per forward (each clip runs K ITM pairs).
        max_text_len: tokenizer truncation; defaults to ``dataset.max_text_len`` or 32.

    Returns:
        ``{"acc", "itm_acc", "itc_acc"}`` in [0, 1], ``"n"`` and ``"protocol"``.
    """
    device = torch.device(device)
    max_len = max_text_len or getattr(dataset, "max_text_len", None) or DEFAULT_MC_TEXT_LEN
    temp = model.temp
    check_option_counts(dataset)
    source = str(getattr(getattr(dataset, "records", None), "source", "") or "")

    def score(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        # the options of a batch are scored as one [B, K] tensor: every clip needs the same K
        _option_count(batch["options"], batch.get("index", range(len(batch["options"]))), source)
        itm, itc = score_texts_per_clip(model, batch["video"], batch["options"], max_len, device, autocast)
        combined = combine_option_scores(itm, itc, temp)
        answer = torch.as_tensor(batch["answer"], dtype=torch.long)
        return tuple((scores.argmax(dim=-1) == answer).float() for scores in (combined, itm, itc))

    with evaluation_mode(model):
        correct, itm_correct, itc_correct = map_clips(dataset, score, batch_size=batch_size, num_workers=num_workers)
    return {
        "acc": float(correct.mean()),
        "itm_acc": float(itm_correct.mean()),
        "itc_acc": float(itc_correct.mean()),
        "n": int(correct.numel()),
        "protocol": describe_protocol(
            dataset,
            task="multiple_choice",
            score=f"{ITM_WEIGHT} * softmax(itm)[1] + {ITC_WEIGHT} * softmax_options(itc / temp)",
            temp=float(torch.as_tensor(temp).detach().float()),
            text_max_len=max_len,
            autocast="bf16" if autocast else "fp32",
        ),
    }
