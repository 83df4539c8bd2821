"""VideoQA model and evaluation: causal answer decoder copied from the fusion layers, answer-list ranking."""

from __future__ import annotations

import torch

from stmvl.eval.qa import majority_baseline, tokenize_answers
from stmvl.models.qa import VideoQAModel, answer_log_likelihood
from stmvl.models.stm import STMModel

from test_finetune import tiny_pretrain_config

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
