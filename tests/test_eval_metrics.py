"""Retrieval metrics against hand-computed ranks (ties, several ground truths, -inf, errors)."""

import json

import pytest
import torch

from stmvl.data.annotations import AnnotationError
from stmvl.eval.metrics import query_ranks, rank_summary, retrieval_metrics

# 3 texts x 4 videos. Hand ranks (pessimistic ties, best ground truth, other ground truths never count):
#   t0 gt {0,1}: best 0.9 (v0); v2 ties at 0.9 -> rank 2
#   t1 gt {1,2}: best 0.7 (both gts tie with each other) -> rank 1
#   t2 gt {3}:   0.4; v0 and v1 tie at 0.4 -> rank 3
#   v0 gt {0}: [0.9, 0.2, 0.4] -> 1;  v1 gt {0,1}: [0.5, 0.7, 0.4] -> 1
#   v2 gt {1}: [0.9, 0.7, 0.1] -> 2;  v3 gt {2}:   [0.1, 0.4, 0.4] -> 2 (t1 ties)
SIM = torch.tensor(
    [
        [0.9, 0.5, 0.9, 0.1],
        [0.2, 0.7, 0.7, 0.4],
        [0.4, 0.4, 0.1, 0.4],
    ]
)
TXT2VID = [[0, 1], [1, 2], [3]]
VID2TXT = [[0], [0, 1], [1], [2]]


def test_ranks_follow_pessimistic_ties_and_best_ground_truth():
    assert query_ranks(SIM, TXT2VID).tolist() == [2, 1, 3]
    assert query_ranks(SIM.t(), VID2TXT).tolist() == [1, 1, 2, 2]


def test_retrieval_metrics_on_hand_built_matrix():
    m = retrieval_metrics(SIM, TXT2VID, VID2TXT)
    # t2v ranks [2, 1, 3]
    assert m["t2v_r1"] == pytest.approx(100 / 3)
    assert m["t2v_r5"] == pytest.approx(100.0)
    assert m["t2v_r10"] == pytest.approx(100.0)
    assert m["t2v_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["t2v_medr"] == pytest.approx(2.0)
    assert m["t2v_meanr"] == pytest.approx(2.0)
    # v2t ranks [1, 1, 2, 2]: even count -> median is the midpoint 1.5
    assert m["v2t_r1"] == pytest.approx(50.0)
    assert m["v2t_r5"] == pytest.approx(100.0)
    assert m["v2t_medr"] == pytest.approx(1.5)
    assert m["v2t_meanr"] == pytest.approx(1.5)
    assert m["v2t_r_mean"] == pytest.approx(250 / 3)
    assert m["r_mean"] == pytest.approx(((100 / 3 + 200) / 3 + 250 / 3) / 2)


def test_rank_summary_recall_cutoffs():
    ranks = torch.tensor([1, 4, 5, 6, 10, 11, 30])
    s = rank_summary(ranks, "q")
    assert s["q_r1"] == pytest.approx(100 / 7)
    assert s["q_r5"] == pytest.approx(300 / 7)
    assert s["q_r10"] == pytest.approx(500 / 7)
    assert s["q_r_mean"] == pytest.approx(900 / 21)
    assert s["q_medr"] == pytest.approx(6.0)
    assert s["q_meanr"] == pytest.approx(67 / 7)


def test_separate_v2t_matrix_is_used_for_video_queries():
    # Video queries rank with their own matrix: make every video's ground truth the clear winner.
    v2t = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    m = retrieval_metrics(SIM, TXT2VID, VID2TXT, v2t_sim=v2t)
    assert m["v2t_r1"] == pytest.approx(100.0)
    assert m["t2v_r1"] == pytest.approx(100 / 3)


def test_all_equal_scores_give_the_worst_rank():
    sim = torch.zeros(2, 5)
    assert query_ranks(sim, [[0], [2, 4]]).tolist() == [5, 4]


def test_minus_infinity_ground_truth_ranks_behind_everything():
    sim = torch.tensor([[float("-inf"), 0.1, float("-inf"), -3.0]])
    assert query_ranks(sim, [[0]]).tolist() == [4]


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        query_ranks(torch.tensor([[float("nan"), 1.0]]), [[0]])
    with pytest.raises(ValueError, match="no ground truth"):
        query_ranks(torch.zeros(1, 2), [[]])
    with pytest.raises(ValueError, match="outside the gallery"):
        query_ranks(torch.zeros(1, 2), [[2]])
    with pytest.raises(ValueError, match=r"\[Nt, Nv\]"):
        retrieval_metrics(torch.zeros(2, 2), [[0]], [[0], [0]])


def test_ground_truth_that_cannot_be_ranked_is_an_annotation_error_naming_the_file():
    with pytest.raises(AnnotationError) as info:
        retrieval_metrics(torch.zeros(2, 2), [[0], [1]], [[0], []], source="ret.json")
    assert str(info.value) == ("ret.json: the video of record 1 has no ground truth (every query needs at least one; "
                               "check the records' 'gt' fields)")
    with pytest.raises(AnnotationError) as info:
        retrieval_metrics(torch.zeros(2, 2), [[0], [5]], [[0], [1]], source="ret.json")
    assert str(info.value) == "ret.json: text query 1: ground truth 5 is outside the gallery of 2"


def test_a_video_no_text_matches_stops_the_evaluation_before_any_clip_is_read(tmp_path):
    from stmvl.data.datasets import RetrievalDataset
    from stmvl.eval.retrieval import evaluate_retrieval

    # both texts name video 0 as their match ("gt"): video 1 has no text to be retrieved by
    path = tmp_path / "ret.json"
    path.write_text(json.dumps([{"video": "a.mp4", "caption": "a dog", "gt": [0]},
                                {"video": "b.mp4", "caption": "a cat", "gt": [0]}]))
    dataset = RetrievalDataset(path, tmp_path / "absent")  # no clip exists: reading one would fail differently
    with pytest.raises(AnnotationError) as info:
        evaluate_retrieval(object(), dataset)  # the model is never reached either
    assert str(info.value) == (f"{path}: the video of record 1 has no ground truth (every query needs at least one; "
                               "check the records' 'gt' fields)")
