"""Temporal probe (with the shuffled-frame control) and multiple-choice scoring, with fake models."""

import json
import math

import pytest
import torch

from stmvl.data.annotations import AnnotationError
from stmvl.eval.mc import combine_option_scores, evaluate_mc
from stmvl.eval.probe import ShuffledFrames, evaluate_probe, frame_permutation

TEXTS = {"it moves forward": 0, "it moves backward": 1}


class OrderModel(torch.nn.Module):
    """Sees frame order only: frames whose pixel [0, 0, 0] increases embed as "forward", decreases as "backward",
    anything else as a third direction orthogonal to both texts (so caption and foil tie)."""

    def __init__(self):
        super().__init__()
        self.temp = torch.tensor(0.1)

    def tokenizer(self, texts, max_length):
        ids = torch.tensor([[TEXTS[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def video_features(self, video):
        steps = video[:, :, 0, 0, 0].diff(dim=1)
        direction = torch.full((video.shape[0],), 2)
        direction[(steps > 0).all(dim=1)] = 0
        direction[(steps < 0).all(dim=1)] = 1
        frames = torch.eye(3)[direction][:, None].expand(-1, video.shape[1], -1)
        return direction.float()[:, None, None], frames

    def text_features(self, input_ids, attention_mask):
        return input_ids.float()[:, :, None], torch.eye(3)[input_ids[:, 0]]

    def itm_logits(self, video_tokens, text_states, text_mask, video_index=None):
        if video_index is not None:  # the model's interface: distinct videos + the video of each text
            video_tokens = video_tokens[video_index]
        direction, text = video_tokens[:, 0, 0].long(), text_states[:, 0, 0].long()
        match = torch.where(direction == 2, 0.0, torch.where(direction == text, 3.0, -3.0))
        return torch.stack([torch.zeros_like(match), match], dim=1)


class ProbeDataset:
    """Clips 0-1 move forward (pixel 10, 20, 30, 40), clips 2-3 backward; the foil names the other direction."""

    split, num_frames = "probe", 4

    def __len__(self):
        return 4

    def __getitem__(self, index):
        values = torch.tensor([10, 20, 30, 40], dtype=torch.uint8)
        forward = index < 2
        video = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
        video[:, 0, 0, 0] = values if forward else values.flip(0)
        names = ("it moves forward", "it moves backward")
        caption, foil = names if forward else names[::-1]
        return {"video": video, "caption": caption, "foil": foil}


def test_probe_accuracy_on_ordered_clips():
    result = evaluate_probe(OrderModel(), ProbeDataset(), batch_size=3)
    assert (result["itc_acc"], result["itm_acc"], result["n"]) == (1.0, 1.0, 4)
    assert result["protocol"]["shuffle_frames"] == "none" and result["protocol"]["split"] == "probe"


def test_probe_without_itm_never_runs_the_fusion_layers():
    class NoFusion(OrderModel):
        def itm_logits(self, *args, **kwargs):
            raise AssertionError("itm=False must not call the VTM head")

    result = evaluate_probe(NoFusion(), ProbeDataset(), batch_size=3, itm=False)
    assert (result["itc_acc"], result["n"]) == (1.0, 4) and "itm_acc" not in result
    reversed_order = evaluate_probe(NoFusion(), ProbeDataset(), batch_size=3, shuffle_frames="reverse", itm=False)
    assert reversed_order["itc_acc"] == 0.0


def test_reversed_frames_flip_every_answer():
    result = evaluate_probe(OrderModel(), ProbeDataset(), batch_size=3, shuffle_frames="reverse")
    assert (result["itc_acc"], result["itm_acc"]) == (0.0, 0.0)


def test_permuted_frames_score_ties_as_half():
    result = evaluate_probe(OrderModel(), ProbeDataset(), batch_size=2, shuffle_frames="permute", seed=3)
    # A non-monotone order embeds orthogonally to both texts (tie, 0.5); only the exact reversal flips (0).
    reversal = torch.tensor([3, 2, 1, 0])
    expected = sum(0.0 if torch.equal(frame_permutation(i, 4, "permute", 3), reversal) else 0.5 for i in range(4)) / 4
    assert result["itc_acc"] == pytest.approx(expected) and result["itm_acc"] == pytest.approx(expected)
    assert 0.0 < expected <= 0.5
    assert result["protocol"]["shuffle_seed"] == 3


def test_frame_permutations_are_fixed_non_identity_and_per_clip():
    perms = [frame_permutation(i, 4, "permute", seed=0) for i in range(50)]
    assert all(sorted(p.tolist()) == [0, 1, 2, 3] for p in perms)
    assert not any(torch.equal(p, torch.arange(4)) for p in perms)
    assert len({tuple(p.tolist()) for p in perms}) > 5
    assert torch.equal(frame_permutation(7, 4, "permute", seed=0), perms[7])
    assert frame_permutation(0, 4, "reverse").tolist() == [3, 2, 1, 0]
    assert frame_permutation(0, 1, "permute").tolist() == [0]
    with pytest.raises(ValueError, match="shuffle_frames"):
        frame_permutation(0, 4, "sideways")


def test_shuffled_view_reorders_frames_and_keeps_attributes():
    view = ShuffledFrames(ProbeDataset(), "reverse")
    assert view[0]["video"][:, 0, 0, 0].tolist() == [40, 30, 20, 10]
    assert view[0]["caption"] == "it moves forward"
    assert (len(view), view.split) == (4, "probe")


OPTIONS = ["a", "b", "c", "d", "e"]
NEG = -10.0
# Per clip: ITM logits and ITC cosines over the five options, and the answer.
MC_ITM = torch.tensor(
    [[math.log(1.5), 0.0, NEG, NEG, NEG], [math.log(4.0), NEG, NEG, NEG, NEG], [NEG, NEG, 2.0, NEG, 0.0]]
)
MC_ITC = torch.tensor([[0.2, 0.5, 0.0, 0.0, 0.0], [0.0, 0.3, 0.1, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0, 0.1]])
MC_ANSWERS = [1, 0, 4]


class OptionModel(torch.nn.Module):
    """ITM logit and ITC cosine of (clip v, option k) read from MC_ITM / MC_ITC (one-hot option embeddings)."""

    def __init__(self):
        super().__init__()
        self.temp = torch.tensor(0.1)

    def tokenizer(self, texts, max_length):
        ids = torch.tensor([[OPTIONS.index(t)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def video_features(self, video):
        clip = (video[:, 0, 0, 0, 0] * 255).round().long()
        coords = MC_ITC[clip]
        unit = torch.cat([coords, (1 - coords.pow(2).sum(1, keepdim=True)).sqrt()], dim=1)
        return clip.float()[:, None, None], unit[:, None].expand(-1, 2, -1)

    def text_features(self, input_ids, attention_mask):
        return input_ids.float()[:, :, None], torch.eye(6)[input_ids[:, 0]]

    def itm_logits(self, video_tokens, text_states, text_mask, video_index=None):
        if video_index is not None:  # the model's interface: distinct videos + the video of each text
            video_tokens = video_tokens[video_index]
        logits = MC_ITM[video_tokens[:, 0, 0].long(), text_states[:, 0, 0].long()]
        return torch.stack([torch.zeros_like(logits), logits], dim=1)


class MCDataset:
    def __len__(self):
        return 3

    def __getitem__(self, index):
        video = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
        video[:, 0, 0, 0] = index
        return {"video": video, "options": list(OPTIONS), "answer": MC_ANSWERS[index]}


def test_mc_score_combines_itm_and_option_softmax():
    itm_prob = torch.tensor([[0.6, 0.5, 0.0, 0.0, 0.0]])
    scores = combine_option_scores(itm_prob, MC_ITC[:1], 0.1)
    total = math.exp(2) + math.exp(5) + 3
    expected = [0.7 * 0.6 + 0.3 * math.exp(2) / total, 0.7 * 0.5 + 0.3 * math.exp(5) / total]
    torch.testing.assert_close(scores[0, :2], torch.tensor(expected))
    assert scores.argmax().item() == 1


def test_mc_accuracy_by_combined_itm_and_itc_scores():
    # Clip 0: ITM prefers option 0 (0.6 vs 0.5), ITC/temp option 1 -> combined 1 (correct).
    # Clip 1: ITM option 0 (0.8), ITC option 1 -> combined 0 (correct). Clip 2: all pick 2, answer 4 (wrong).
    result = evaluate_mc(OptionModel(), MCDataset(), batch_size=2)
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["itm_acc"] == pytest.approx(1 / 3)
    assert result["itc_acc"] == pytest.approx(1 / 3)
    assert result["n"] == 3 and result["protocol"]["temp"] == pytest.approx(0.1)


def test_mc_rejects_ragged_options():
    class Ragged(MCDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            item["options"] = item["options"][: 5 - index]
            return item

    with pytest.raises(AnnotationError) as info:
        evaluate_mc(OptionModel(), Ragged(), batch_size=3)
    assert str(info.value) == ("record 1: 4 options, but record 0 has 5; every multiple-choice item needs the same "
                               "number of options")


def test_mc_annotation_with_ragged_options_is_refused_before_any_clip_is_read(tmp_path):
    from stmvl.data.datasets import MCDataset as FileMCDataset

    path = tmp_path / "mc.json"
    path.write_text(json.dumps([{"video": f"{i}.mp4", "caption": ["a", "b", "c"][: 3 - (i == 2)], "answer": 0}
                                for i in range(4)]))
    dataset = FileMCDataset(path, tmp_path / "absent")  # no clip exists: reading one would fail differently
    with pytest.raises(AnnotationError) as info:
        evaluate_mc(OptionModel(), dataset)
    assert str(info.value) == (f"{path}: record 2: 2 options, but record 0 has 3; every multiple-choice item needs "
                               "the same number of options")


def test_the_probe_and_its_controls_in_one_pass_equal_separate_runs_and_decode_each_clip_once():
    from stmvl.eval.probe import evaluate_probe_orders

    class CountingDataset(ProbeDataset):
        reads = 0

        def __getitem__(self, index):
            CountingDataset.reads += 1
            return super().__getitem__(index)

    class CountingModel(OrderModel):
        texts = 0

        def text_features(self, input_ids, attention_mask):
            CountingModel.texts += input_ids.shape[0]
            return super().text_features(input_ids, attention_mask)

    orders = (None, "reverse", "permute")
    together = evaluate_probe_orders(CountingModel(), CountingDataset(), orders, batch_size=3, seed=3)
    assert CountingDataset.reads == 4 and CountingModel.texts == 8  # 4 clips, a caption and a foil each
    separate = [evaluate_probe(OrderModel(), ProbeDataset(), batch_size=3, shuffle_frames=mode, seed=3)
                for mode in orders]
    assert together == separate
    assert [r["itc_acc"] for r in together[:2]] == [1.0, 0.0]
    without_itm = evaluate_probe_orders(OrderModel(), ProbeDataset(), orders, batch_size=3, seed=3, itm=False)
    assert [{k: v for k, v in r.items() if k != "itm_acc"} for r in separate] == without_itm
