"""VideoQA model and evaluation: causal answer decoder copied from the fusion layers, answer-list ranking."""

from __future__ import annotations

import json
import time

import pytest
import torch

from stmvl.config import load_config
from stmvl.data.datasets import QADataset
from stmvl.eval.qa import evaluate_qa, majority_baseline, tokenize_answers
from stmvl.models.qa import VideoQAModel, answer_log_likelihood
from stmvl.models.stm import STMModel
from stmvl.tasks.finetune import finetune, load_qa_model

from downstream import SIZE, TEST_CLIPS, TEXT_LEN
from test_finetune import tiny_pretrain_config


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: stable timings

ANSWERS = ["red", "blue", "green", "circle", "square", "grows", "shrinks", "moves left"]


def tiny_qa() -> VideoQAModel:
    torch.manual_seed(0)
    return VideoQAModel.from_stm(STMModel(tiny_pretrain_config()))


def test_decoder_starts_as_a_copy_of_the_fusion_layers():
    qa = tiny_qa()
    fusion = qa.text.layers[qa.text.cfg.fusion_start:]
    assert len(qa.decoder.layers) == len(fusion) == 2 and qa.decoder.init_report == []
    for mine, theirs in zip(qa.decoder.layers, fusion):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(qa.decoder.lm.dense.weight, qa.text.mlm.dense.weight)
    assert qa.decoder.embeddings.word.weight.data_ptr() != qa.text.embeddings.word.weight.data_ptr()


def test_decoder_is_causal():
    qa = tiny_qa().eval()
    states, q_mask = torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.long)
    ids = torch.randint(1000, 2000, (2, 6))
    changed = ids.clone()
    changed[:, 4:] = 2001
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = qa.decoder(ids, mask, states, q_mask), qa.decoder(changed, mask, states, q_mask)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_answer_log_likelihood_counts_real_tokens_only():
    logits = torch.zeros(1, 4, 10)  # uniform: every predicted token costs log(10)
    ids = torch.tensor([[1, 5, 2, 0]])
    ll = answer_log_likelihood(logits, ids, torch.tensor([[1, 1, 1, 0]]))
    assert torch.allclose(ll, torch.tensor([-2 * torch.log(torch.tensor(10.0))]))


def test_ranking_returns_answers_from_the_list_and_learns_them():
    qa = tiny_qa()
    answers = tokenize_answers(qa.tokenizer, ANSWERS, 6)
    q = qa.tokenizer(["what color is the circle", "how does the red square move"])
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 4, 3, 32, 32, generator=g)
    target = torch.tensor([1, 7])  # "blue", "moves left" (a two-token answer)
    batch = {"video": video, "question_ids": q["input_ids"], "question_mask": q["attention_mask"],
             "answer_ids": answers["input_ids"][target], "answer_mask": answers["attention_mask"][target]}
    opt = torch.optim.AdamW(qa.parameters(), lr=2e-3)
    for _ in range(40):
        loss = qa(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    qa.eval()
    best, candidates, scores = qa.rank_answers(video, q["input_ids"], q["attention_mask"], answers["input_ids"],
                                               answers["attention_mask"], k=3)
    assert candidates.shape == scores.shape == (2, 3)
    assert ((best >= 0) & (best < len(ANSWERS))).all()
    assert all(b in c for b, c in zip(best.tolist(), candidates.tolist()))
    assert best.tolist() == target.tolist()


def test_majority_baseline():
    out = majority_baseline(["red", "red", "blue"], [["red"], ["blue"], ["red"], ["green"]])
    assert out == {"answer": "red", "acc": 0.5}


@pytest.mark.slow
def test_qa_finetuning_beats_the_majority_answer(pretrained_corpus):
    """QAFinetuneTask through the engine on qa_train.json; accuracy on qa_test.json by answer-list ranking."""
    started = time.perf_counter()
    root = pretrained_corpus
    annotations = root / "synthetic" / "annotations"
    cfg = load_config("finetune/qa_synthetic", [
        f"paths.data={root}", f"runtime.out_dir={root / 'runs' / 'qa'}", "runtime.device=cpu",
        "runtime.tensorboard=false", "runtime.progress=false", "runtime.threads=2", "runtime.log_every=10",
        f"data.img_size={SIZE}", "data.num_frames=4", "data.num_workers=0", "data.video_batch_size=16",
        "eval.num_workers=0", "eval.num_frames=4", f"eval.text_max_length={TEXT_LEN}", "eval.batch_size=60",
        "eval.every_epochs=0", "optim.precision=fp32", "optim.warmup_steps=5", "optim.epochs=4",
        "optim.lr=1e-3",
    ])
    result = finetune(cfg, root / "pretrain", cache_clips=True)
    train = json.loads((annotations / "qa_train.json").read_text())
    test = json.loads((annotations / "qa_test.json").read_text())
    baseline = majority_baseline([r["answer"] for r in train], [[r["answer"]] for r in test])
    prior = question_type_prior(train, test)
    acc = result["eval"]["synth_qa/acc"]
    print(f"QA accuracy {acc:.3f} vs majority answer {baseline['answer']!r} {baseline['acc']:.3f} and the "
          f"question-type prior {prior:.3f} ({len(train)} train / {len(test)} test questions); "
          f"{time.perf_counter() - started:.1f}s")
    assert result["eval"]["synth_qa/n"] == len(test) == 3 * TEST_CLIPS

    # the exported folder loads back as a VideoQAModel with the same weights and gives the same accuracy
    model = load_qa_model(result["model_dir"])
    trained = result["trainer"].model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    dataset = QADataset(str(annotations / "qa_test.json"), root / "synthetic", str(annotations / "qa_answers.json"),
                        num_frames=4, img_size=SIZE, sampling="middle", train=False)
    again = evaluate_qa(model, dataset, k=cfg.eval.qa_topk, batch_size=60, max_question_len=TEXT_LEN,
                        max_answer_len=cfg.finetune.answer_max_length)
    assert again["acc"] == pytest.approx(acc)
    # and `stmvl evaluate` recognises the QA folder and scores the recipe's QA corpus the same way
    from stmvl.tasks.runs import evaluate

    assert evaluate(cfg, result["model_dir"])["synth_qa"]["acc"] == pytest.approx(acc)
    # every prediction is an entry of the answer list (rank_answers indexes the list it is given)
    answers = tokenize_answers(model.tokenizer, dataset.answer_list, cfg.finetune.answer_max_length)
    batch = [dataset[i] for i in range(8)]
    questions = model.tokenizer([b["question"] for b in batch], max_length=TEXT_LEN)
    video = torch.stack([b["video"] for b in batch]).float() / 255
    best, candidates, _ = model.rank_answers(video, questions["input_ids"], questions["attention_mask"],
                                             answers["input_ids"], answers["attention_mask"], k=4)
    assert ((best >= 0) & (best < len(dataset.answer_list))).all()
    assert all(b in c for b, c in zip(best.tolist(), candidates.tolist()))
    # answers are learnt from the video: well above always giving the most frequent training answer, and above
    # the best any question-only model can do (the most frequent training answer of each question type)
    assert acc >= baseline["acc"] + 0.15, f"QA accuracy {acc:.3f} vs majority answer {baseline['acc']:.3f}"
    assert acc >= prior + 0.05, f"QA accuracy {acc:.3f} vs question-type prior {prior:.3f}"


def question_type_prior(train: list[dict], test: list[dict]) -> float:
    """Accuracy on ``test`` of answering each question with its type's most frequent training answer (the type is
    the question's first three words: 'what color is', 'what shape is', 'how does the')."""
    from collections import Counter

    def kind(question: str) -> str:
        return " ".join(question.split()[:3])

    counts: dict[str, Counter] = {}
    for r in train:
        counts.setdefault(kind(r["question"]), Counter())[r["answer"]] += 1
    best = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    return sum(best.get(kind(r["question"])) == r["answer"] for r in test) / len(test)
