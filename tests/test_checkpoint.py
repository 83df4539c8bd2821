"""Checkpoint files: safetensors with tied weights, atomic folders, keep-last-N, latest, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stmvl.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight  # tied like the BERT MLM head
        self.qkv = nn.Linear(3, 9)


def test_weights_round_trip_with_tied_and_sliced_tensors(tmp_path):
    model = Tied()
    state = model.state_dict()
    state["q_slice"] = model.qkv.weight.detach()[:3]  # a view into another tensor's storage
    save_weights(state, tmp_path / "w.safetensors", metadata={"note": "x"})
    loaded = load_weights(tmp_path / "w.safetensors")
    assert set(loaded) == set(state)
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    assert loaded["head.weight"].data_ptr() == loaded["emb.weight"].data_ptr()  # tie restored
    other = Tied()
    other.load_state_dict({k: v for k, v in loaded.items() if k != "q_slice"})
    assert torch.equal(other.head.weight, model.emb.weight)
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_latest_and_incomplete_folders(tmp_path):
    state = {"w": torch.arange(4.0)}
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"w": state["w"] * step}, {"global_step": step}, keep_last=2,
                        protect=("step_00000002",))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 6, 8]  # 2 is protected (best), 4 pruned
    # a crash mid-save leaves a temp folder and maybe an incomplete one: both are ignored
    (tmp_path / "checkpoints" / ".tmp-step_00000010").mkdir()
    incomplete = tmp_path / "checkpoints" / "step_00000012"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "step_00000008"
    model_state, train_state = load_checkpoint(tmp_path)  # a run folder means its latest checkpoint
    assert torch.equal(model_state["w"], torch.arange(4.0) * 8) and train_state == {"global_step": 8}
    save_checkpoint(tmp_path, 14, state, {"global_step": 14}, keep_last=2)
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000010").exists()


def test_state_file_holds_optimizer_and_rng_under_weights_only(tmp_path):
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path, 1, {"p": p.detach()},
                           {"optimizer": opt.state_dict(), "rng": [{"torch": rng, "python": (3, (1, 2), None)}]})
    _, st = load_checkpoint(path)
    assert torch.equal(st["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(st["rng"][0]["torch"], rng) and st["rng"][0]["python"] == (3, (1, 2), None)


def test_load_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {}, keep_last=0)
