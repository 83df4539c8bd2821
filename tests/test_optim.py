"""Parameter groups (decay rules, own learning rates) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stmvl.train.optim import build_optimizer, default_param_groups, is_no_decay, normalise_groups
from stmvl.train.schedule import WarmupCosineSchedule, lr_factor


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.pos_embed = nn.Parameter(torch.zeros(3, 4))
        self.temporal_fusion = nn.Linear(4, 4, bias=False)
        self.lam = nn.Parameter(torch.tensor(0.5))
        self.predictor = nn.Sequential(nn.Linear(4, 4))
        self.teacher = nn.Linear(4, 4)


def _names(groups, name):
    return sorted(next(g for g in groups if g["name"] == name)["param_names"])


def test_no_decay_rules_match_components_not_substrings():
    w = torch.zeros(2, 2)
    assert is_no_decay("text.bias", w) and is_no_decay("vision.pos_embed", w) and is_no_decay("temp", w)
    assert is_no_decay("anything", torch.zeros(3))
    assert not is_no_decay("teacher.temporal_fusion.weight", w)
    assert not is_no_decay("position_ids_proj.weight", w)


def test_default_groups_split_decay_lr_and_exclude_frozen():
    groups = default_param_groups(Net(), weight_decay=0.02, lr_overrides={"lam": 5e-2, "predictor": 1e-3},
                                  exclude=("teacher",))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"base/decay", "base/no_decay", "lam/no_decay", "predictor/decay", "predictor/no_decay"}
    assert _names(groups, "base/decay") == ["proj.weight", "temporal_fusion.weight"]
    assert _names(groups, "base/no_decay") == ["norm.bias", "norm.weight", "pos_embed", "proj.bias", "temp"]
    assert by_name["base/decay"]["weight_decay"] == 0.02 and by_name["base/no_decay"]["weight_decay"] == 0.0
    assert by_name["lam/no_decay"]["lr"] == 5e-2 and "lr" not in by_name["base/decay"]
    assert _names(groups, "predictor/decay") == ["predictor.0.weight"]
    with pytest.raises(ValueError, match="match no trainable parameter: decoder"):
        default_param_groups(Net(), 0.02, lr_overrides={"decoder": 1.0})


def test_normalise_groups_fills_lr_and_rejects_duplicates():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    groups = normalise_groups([{"params": [a], "lr_scale": 0.1}, {"params": [b], "lr": 3.0}], base_lr=2.0,
                              weight_decay=0.5)
    assert [g["lr"] for g in groups] == [pytest.approx(0.2), 3.0] and groups[0]["weight_decay"] == 0.5
    with pytest.raises(ValueError, match="repeats a parameter"):
        normalise_groups([{"params": [a]}, {"params": [a]}], 1.0, 0.0)
    frozen = nn.Parameter(torch.ones(1), requires_grad=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        normalise_groups([{"params": [frozen]}], 1.0, 0.0)


def test_lr_factor_warmup_cosine_floor():
    assert lr_factor(0, 100, 10, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.01) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.01) == pytest.approx(1.0)
    mid = 10 + 89 / 2
    assert lr_factor(int(mid), 100, 10, 0.01) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert lr_factor(99, 100, 10, 0.01) == pytest.approx(0.01)
    assert lr_factor(150, 100, 10, 0.01) == pytest.approx(0.01)  # never below the floor
    assert lr_factor(50, 100, 10, 0.0, kind="constant") == 1.0
    with pytest.raises(ValueError, match="cosine, constant"):
        lr_factor(0, 10, 0, 0.0, kind="linear")


def test_schedule_keeps_per_group_ratio_and_resumes():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = build_optimizer([{"params": [a]}, {"params": [b], "lr": 5e-2}], lr=1e-4, weight_decay=0.0,
                          betas=(0.9, 0.999), eps=1e-8)
    sched = WarmupCosineSchedule(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.01)
    seen = []
    for _ in range(20):
        lrs = sched.get_last_lr()
        assert lrs[1] / lrs[0] == pytest.approx(500.0)
        seen.append(lrs[0])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.25e-4) and max(seen) == pytest.approx(1e-4) and seen[-1] == pytest.approx(1e-6)
    fresh = WarmupCosineSchedule(build_optimizer([{"params": [a]}], 1e-4, 0.0, (0.9, 0.999), 1e-8), 20, 4, 0.01)
    fresh.load_state_dict({"last_step": 7})
    assert fresh.get_last_lr()[0] == pytest.approx(seen[7])


def test_the_fused_update_matches_the_per_parameter_one_and_its_state_loads_into_either():
    def run(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2))
        opt = build_optimizer(default_param_groups(model, 0.05), 1e-2, 0.05, (0.9, 0.98), 1e-6, fused=fused)
        for _ in range(5):
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    (fused_model, fused_opt), (plain_model, plain_opt) = run(True), run(False)
    assert fused_opt.defaults["fused"] and not plain_opt.defaults["fused"]
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    plain_opt.load_state_dict(fused_opt.state_dict())  # same layout: a checkpoint of one loads into the other
    assert torch.equal(plain_opt.state_dict()["state"][0]["exp_avg"], fused_opt.state_dict()["state"][0]["exp_avg"])
