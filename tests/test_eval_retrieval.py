"""ITC + ITM retrieval evaluation with a table-driven fake model whose scores are known by construction."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stmvl.eval.features import extract_text_features, extract_video_features, itc_similarity, shard_range
from stmvl.eval.retrieval import evaluate_retrieval, rerank_matrices, top_k_pairs

FRAME_OFFSET = 0.05  # frame 0 gets +offset, frame 1 -offset: only the mean over frames equals the target cosine


class TableModel(torch.nn.Module):
    """Fake model following the evaluation protocol; every score comes from fixed tables.

    Clip i is recognised by pixel value i in video[:, 0, 0, 0]; text j by its vocabulary entry. With one-hot text
    embeddings and frame embeddings whose coordinate t is ``sim[t, v] +- FRAME_OFFSET``, the ITC similarity of
    text t and video v is exactly ``sim[t, v]``. ``itm[t, v]`` is the matching logit.
    """

    def __init__(self, sim: torch.Tensor, itm: torch.Tensor, texts: list[str]):
        super().__init__()
        num_texts, _ = sim.shape
        self.text_ids = {text: i for i, text in enumerate(texts)}
        self.text_table = torch.eye(num_texts, num_texts + 1)
        self.frame_table = torch.stack([self._frame(sim, +FRAME_OFFSET), self._frame(sim, -FRAME_OFFSET)], dim=1)
        self.itm = itm
        self.temp = torch.tensor(0.1)
        self.itm_calls: list[list[tuple[int, int]]] = []
        self.max_lengths: list[int] = []

    @staticmethod
    def _frame(sim: torch.Tensor, offset: float) -> torch.Tensor:
        coords = sim.t() + offset  # [Nv, Nt]
        slack = (1 - coords.pow(2).sum(dim=1, keepdim=True)).sqrt()  # unit norm without touching the text coords
        return torch.cat([coords, slack], dim=1)

    def tokenizer(self, texts, max_length):
        self.max_lengths.append(max_length)
        ids = torch.tensor([[self.text_ids[t] + 1] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def video_features(self, video):
        index = (video[:, 0, 0, 0, 0] * 255).round().long()
        return index.float()[:, None, None], self.frame_table[index]

    def text_features(self, input_ids, attention_mask):
        index = input_ids[:, 0] - 1
        return index.float()[:, None, None], self.text_table[index]

    def itm_logits(self, video_tokens, text_states, text_mask, video_index=None):
        if video_index is not None:  # the model's interface: distinct videos + the video of each text
            video_tokens = video_tokens[video_index]
        videos = video_tokens[:, 0, 0].float().round().long()
        texts = text_states[:, 0, 0].float().round().long()
        self.itm_calls.append(list(zip(texts.tolist(), videos.tolist())))
        return torch.stack([torch.zeros(len(videos)), self.itm[texts, videos]], dim=1)


class TableDataset:
    """Clips of 2 frames whose pixel [0, 0, 0] holds the clip index; one text per video unless told."""

    split, num_frames, sampling, max_text_len = "test", 2, "middle", 24

    def __init__(self, num_videos, txt2vid):
        self.num_videos = num_videos
        self.texts = [f"caption {t}" for t in range(len(txt2vid))]
        self.txt2vid = txt2vid
        self.vid2txt = [[t for t, vids in enumerate(txt2vid) if v in vids] for v in range(num_videos)]

    def __len__(self):
        return self.num_videos

    def __getitem__(self, index):
        video = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
        video[:, 0, 0, 0] = index
        return {"video": video, "index": index}


def cyclic_sim(n=4):
    """Text t: video t+1 -> 0.4, t+2 -> 0.3, t (the ground truth) -> 0.2, t+3 -> 0.1: ITC ranks every gt 3rd."""
    sim = torch.zeros(n, n)
    for t in range(n):
        for shift, value in zip(range(4), (0.2, 0.4, 0.3, 0.1)):
            sim[t, (t + shift) % n] = value
    return sim


def build(sim, itm):
    dataset = TableDataset(sim.shape[1], [[t] for t in range(sim.shape[0])])
    return TableModel(sim, itm, dataset.texts), dataset


def test_itc_similarity_is_frame_mean_of_cosines():
    model, dataset = build(cyclic_sim(), torch.zeros(4, 4))
    _, frames = extract_video_features(model, dataset, batch_size=3)
    _, _, texts = extract_text_features(model, dataset.texts, max_length=8, batch_size=3)
    assert frames.shape == (4, 2, 5)
    torch.testing.assert_close(frames.norm(dim=-1), torch.ones(4, 2))
    torch.testing.assert_close(itc_similarity(texts, frames), cyclic_sim(), atol=1e-6, rtol=0)
    # A single frame alone is off by the offset, so the mean over frames is what produced the match above.
    torch.testing.assert_close(itc_similarity(texts, frames[:, :1]), cyclic_sim() + FRAME_OFFSET, atol=1e-6, rtol=0)


def test_itm_reranking_lifts_the_third_itc_candidate_to_first():
    model, dataset = build(cyclic_sim(), 4.0 * torch.eye(4))
    similarity = {}
    result = evaluate_retrieval(model, dataset, batch_size=5, k_test=3, similarity_out=similarity)
    itc, itm = result["itc"], result["itm"]
    # the matrix the ITC table ranked by is handed back (the ITM re-ranking does not change it)
    torch.testing.assert_close(similarity["itc"], cyclic_sim(), atol=1e-6, rtol=0)
    assert (itc["t2v_r1"], itc["t2v_r5"], itc["t2v_medr"], itc["t2v_meanr"]) == (0.0, 100.0, 3.0, 3.0)
    assert (itc["v2t_r1"], itc["v2t_medr"]) == (0.0, 3.0)
    assert (itm["t2v_r1"], itm["v2t_r1"], itm["t2v_meanr"], itm["r_mean"]) == (100.0, 100.0, 1.0, 100.0)
    # Pairs of both directions deduplicated: {(t, t), (t, t+1), (t, t+2)} = 12 pairs, in chunks of 5 across queries.
    assert [len(call) for call in model.itm_calls] == [5, 5, 2]
    assert len({t for t, _ in model.itm_calls[0]}) > 1
    scored = {pair for call in model.itm_calls for pair in call}
    assert scored == {(t, (t + s) % 4) for t in range(4) for s in (0, 1, 2)}


def test_k_test_smaller_than_the_gallery_is_honoured():
    model, dataset = build(cyclic_sim(), 4.0 * torch.eye(4))
    result = evaluate_retrieval(model, dataset, batch_size=3, k_test=2)
    # Only (t, t+1) and (t, t+2) are re-scored (the same 8 pairs from both directions); the ground truth stays
    # outside the top 2, below both re-scored candidates and above the ITC-worse (t, t+3).
    scored = [pair for call in model.itm_calls for pair in call]
    assert sorted(scored) == sorted((t, (t + s) % 4) for t in range(4) for s in (1, 2))
    assert [len(call) for call in model.itm_calls] == [3, 3, 2]
    assert (result["itm"]["t2v_r1"], result["itm"]["t2v_meanr"], result["itm"]["v2t_meanr"]) == (0.0, 3.0, 3.0)
    assert result["protocol"]["k_test"] == 2


def test_rerank_keeps_itc_order_below_the_top_k():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    pairs, t2v_top, v2t_top = top_k_pairs(sim, 2)
    assert t2v_top.tolist() == [[0, 2]]
    assert v2t_top.tolist() == [[0], [0], [0], [0]]  # k clipped to the single text
    scores = torch.tensor([0.2 if v == 0 else 0.8 if v == 2 else 0.5 for v in pairs[:, 1].tolist()])
    t2v, v2t = rerank_matrices(sim, pairs, scores, t2v_top, v2t_top)
    assert t2v.argsort(dim=1, descending=True).tolist() == [[2, 0, 3, 1]]
    torch.testing.assert_close(t2v[0, [1, 3]], torch.tensor([0.1 - 1.9, 0.3 - 1.9]))
    torch.testing.assert_close(v2t[:, 0], torch.tensor([0.2, 0.5, 0.8, 0.5]))


def test_protocol_is_written_next_to_the_numbers():
    model, dataset = build(cyclic_sim(), torch.eye(4))
    result = evaluate_retrieval(model, dataset, batch_size=4, k_test=128)
    protocol = result["protocol"]
    assert {k: protocol[k] for k in ("split", "frames", "sampling", "k_test", "text_max_len")} == {
        "split": "test", "frames": 2, "sampling": "middle", "k_test": 4, "text_max_len": 24,
    }
    assert (protocol["num_texts"], protocol["num_videos"]) == (4, 4)
    assert set(model.max_lengths) == {24}
    json.dumps(result)  # plain numbers only


def test_multiple_captions_per_video_and_autocast():
    # 6 texts over 3 videos (2 captions each); ITC already perfect: all recalls 100 in both tables.
    txt2vid = [[0], [0], [1], [1], [2], [2]]
    sim = torch.tensor([[0.5 if v == t // 2 else 0.1 for v in range(3)] for t in range(6)])
    dataset = TableDataset(3, txt2vid)
    model = TableModel(sim, torch.zeros(6, 3), dataset.texts)
    result = evaluate_retrieval(model, dataset, batch_size=4, k_test=2, autocast=True)
    assert result["itc"]["t2v_r1"] == 100.0 and result["itc"]["v2t_r1"] == 100.0
    # ITM gives every pair the same probability: pessimistic ties push each ground truth behind its rival.
    assert result["itm"]["t2v_meanr"] == 2.0
    assert result["protocol"]["autocast"] == "bf16"


def test_shard_ranges_cover_rows_in_order():
    assert [list(shard_range(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(shard_range(2, r, 3)) for r in range(3)] == [1, 1, 0]


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_eval_retrieval import TableModel, TableDataset
from stmvl.eval.features import extract_text_features, extract_video_features, itc_similarity
from stmvl.eval.retrieval import evaluate_retrieval
dist.init_process_group("gloo")
g = torch.Generator().manual_seed(7)
sim = torch.rand(7, 5, generator=g) * 0.4
itm = torch.randn(7, 5, generator=g)
dataset = TableDataset(5, [[t % 5] for t in range(7)])
model = TableModel(sim, itm, dataset.texts)
_, frames = extract_video_features(model, dataset, batch_size=2)
_, _, texts = extract_text_features(model, dataset.texts, max_length=8, batch_size=2)
result = evaluate_retrieval(model, dataset, batch_size=2, k_test=3)
if dist.get_rank() == 0:
    json.dump({{"sim": itc_similarity(texts, frames).tolist(), "result": result}}, open({out!r}, "w"))
dist.destroy_process_group()
"""


@pytest.mark.ddp
def test_two_rank_sharded_evaluation_matches_single_process(tmp_path):
    out = tmp_path / "ddp.json"
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())

    g = torch.Generator().manual_seed(7)
    sim = torch.rand(7, 5, generator=g) * 0.4
    itm = torch.randn(7, 5, generator=g)
    dataset = TableDataset(5, [[t % 5] for t in range(7)])
    expected = evaluate_retrieval(TableModel(sim, itm, dataset.texts), dataset, batch_size=2, k_test=3)
    torch.testing.assert_close(torch.tensor(got["sim"]), sim, atol=1e-6, rtol=0)
    for table in ("itc", "itm"):
        for key, value in expected[table].items():
            assert math.isclose(got["result"][table][key], value, abs_tol=1e-9), (table, key)


def test_evaluation_cleans_texts_like_the_training_collator():
    """The evaluators tokenize raw annotation texts; the model's tokenizer must clean them (UMT caption cleaning)
    exactly as the training collator does, so both feed the same token ids (no punctuation at test time only)."""
    from stmvl.data.datasets import VideoTextCollator
    from stmvl.data.text import Tokenizer, minilm_folder
    from stmvl.eval.features import tokenize

    class Holder:
        tokenizer = Tokenizer(str(minilm_folder()), 32)

    raw = ["First a Red circle moves to the left, then a blue box grows!", "A small-star / rises."]
    collate = VideoTextCollator(Holder.tokenizer, media="video", max_length=32)
    sample = {"video": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "sample_id": 0, "index": 0}
    trained = collate([dict(sample, caption=text) for text in raw])
    evaluated = tokenize(Holder, raw, 32)
    assert torch.equal(evaluated["input_ids"], trained["input_ids"])
    comma = 1010  # "," in the bert-base-uncased vocabulary
    uncleaned = Tokenizer(str(minilm_folder()), 32, clean=False)(raw)["input_ids"]
    assert (uncleaned == comma).any() and not (evaluated["input_ids"] == comma).any()


def test_multiple_choice_combines_itm_and_itc_on_a_known_table():
    """Two clips, three options each: ITM alone and ITC alone each get one clip right, 0.7 ITM + 0.3 softmax(ITC /
    temp) gets both (values worked out by hand in the comments)."""
    from stmvl.eval.mc import evaluate_mc

    texts = ["option a", "option b", "option c"]
    sim = torch.tensor([[0.4, 0.1], [0.1, 0.3], [0.2, 0.35]])  # [text, video]
    itm = torch.tensor([[0.5, -1.0], [0.0, 2.0], [0.8, -1.0]])  # matching logits, [text, video]
    model = TableModel(sim, itm, texts)

    class Choices(TableDataset):
        def __getitem__(self, index):
            return dict(super().__getitem__(index), options=list(texts), answer=index)

    # clip 0: ITC picks a (0.4), ITM picks c (sigmoid 0.69 vs 0.62), combined a: 0.435 + 0.253 > 0.483 + 0.034
    # clip 1: ITC picks c (0.35), ITM picks b (sigmoid 0.88), combined b: 0.617 + 0.108 > 0.188 + 0.178
    out = evaluate_mc(model, Choices(2, [[0], [1], [1]]), batch_size=2)
    assert (out["acc"], out["itm_acc"], out["itc_acc"], out["n"]) == (1.0, 0.5, 0.5, 2)
