"""VideoQA evaluation by answer-list ranking (README.md, Evaluation protocol).

Every question is answered with an entry of the dataset's answer list: the answer decoder keeps the ``k`` answers
whose first token is most probable and re-scores them by full sequence log-likelihood
(:meth:`stmvl.models.qa.VideoQAModel.rank_answers`). A prediction is correct when it is one of the item's answers.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import torch

from stmvl.eval.features import autocast_context, describe_protocol, evaluation_mode, map_clips

DEFAULT_QUESTION_LEN = 32
DEFAULT_ANSWER_LEN = 10


def tokenize_answers(tokenizer, answers: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """The answer list as decoder inputs: ``{"input_ids", "attention_mask"}`` long ``[A, La]`` ([CLS] a [SEP])."""
    tokens = tokenizer(list(answers), max_length=max_length)
    return {"input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long()}


def majority_baseline(train_answers: Iterable[str], test_answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Accuracy of always answering the most frequent training answer.

    Args:
        train_answers: the first answer of every training question.
        test_answers: the accepted answers of every test question.
    """
    answer, _ = Counter(train_answers).most_common(1)[0]
    correct = sum(answer in accepted for accepted in test_answers)
    return {"answer": answer, "acc": correct / max(1, len(test_answers))}


def evaluate_qa(
    model: Any,
    dataset: Any,
    *,
    k: int = 128,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: bool = False,
    max_question_len: int | None = None,
    max_answer_len: int = DEFAULT_ANSWER_LEN,
) -> dict[str, Any]:
    """VideoQA accuracy by answer-list ranking.

    Args:
        model: a :class:`stmvl.models.qa.VideoQAModel` (``tokenizer``, ``rank_answers``).
        dataset: a :class:`stmvl.data.datasets.QADataset` (items ``video`` uint8 [T, 3, H, W], ``question``,
            ``answers``; attribute ``answer_list``).
        k: candidates kept by first-token probability before the full-likelihood re-scoring.
        max_question_len / max_answer_len: tokenizer truncation of questions / answers.

    Returns:
        ``{"acc" in [0, 1], "n", "protocol"}``.
    """
    device = torch.device(device)
    q_len = max_question_len or DEFAULT_QUESTION_LEN
    answer_list = list(dataset.answer_list)
    answers = {key: t.to(device) for key, t in tokenize_answers(model.tokenizer, answer_list, max_answer_len).items()}
    lookup = {a: i for i, a in enumerate(answer_list)}

    def predict(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        questions = model.tokenizer(list(batch["question"]), max_length=q_len)
        with autocast_context(device, autocast):
            best, _, _ = model.rank_answers(
                batch["video"].to(device), questions["input_ids"].to(device), questions["attention_mask"].to(device),
                answers["input_ids"], answers["attention_mask"], k,
            )
        best = best.cpu()
        accepted = [{lookup.get(a, -1) for a in item} for item in batch["answers"]]
        correct = torch.tensor([int(p) in acc for p, acc in zip(best.tolist(), accepted)], dtype=torch.float32)
        return best, correct

    with evaluation_mode(model):
        _, correct = map_clips(dataset, predict, batch_size=batch_size, num_workers=num_workers)
    return {
        "acc": float(correct.mean()) if correct.numel() else 0.0,
        "n": int(correct.numel()),
        "protocol": describe_protocol(
            dataset,
            task="videoqa",
            ranking=f"top {min(k, len(answer_list))} of {len(answer_list)} answers by first-token probability, "
                    "re-scored by full log-likelihood",
            question_max_len=q_len,
            answer_max_len=max_answer_len,
            autocast="bf16" if autocast else "fp32",
        ),
    }
