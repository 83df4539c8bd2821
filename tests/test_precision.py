"""optim.precision: auto picks what the hardware computes natively; explicit bf16 on an emulating CPU warns once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from stmvl.train import precision as P


@pytest.mark.parametrize("native, slowdown, expected, reason", [
    (True, 0.5, "bf16", "auto: CPU under test, bf16 matmul 2.0x faster than fp32 here"),
    (True, 1.8, "fp32", "auto: CPU under test, but a bf16 matmul measured 1.8x the time of fp32 here"),
    (False, 0.5, "fp32", "auto: CPU under test"),
])
def test_auto_on_cpu_takes_bf16_only_where_it_is_native_and_measured_faster(monkeypatch, native, slowdown, expected,
                                                                             reason):
    monkeypatch.setattr(P, "cpu_bf16_support", lambda: (native, "CPU under test"))
    monkeypatch.setattr(P, "measured_bf16_slowdown", lambda: slowdown)
    chosen = P.resolve("auto", torch.device("cpu"))
    assert chosen.name == expected and chosen.reason == reason


def test_explicit_choices_pass_through_and_unknown_names_the_choices(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_support", lambda: (True, "CPU under test"))
    assert [P.resolve(p, torch.device("cpu")).name for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="optim.precision: 'fp8' is not one of auto, bf16, fp16, fp32"):
        P.resolve("fp8", torch.device("cpu"))


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_measured_slowdown(monkeypatch, caplog):
    monkeypatch.setattr(P, "cpu_bf16_support", lambda: (False, "CPU under test"))
    monkeypatch.setattr(P, "bf16_slowdown", lambda: 48.0)
    monkeypatch.setattr(P, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="stmvl.train.precision"):
        assert P.resolve("bf16", torch.device("cpu")).name == "bf16"
        P.resolve("bf16", torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "48x slower than fp32" in warnings[0]


def test_the_real_cpu_probe_and_slowdown_measurement_answer():
    native, why = P.cpu_bf16_support()
    assert isinstance(native, bool) and torch.backends.cpu.get_cpu_capability() in why
    assert P.bf16_slowdown(size=64, repeats=1) > 0


def test_the_run_config_records_what_auto_chose(tmp_path, monkeypatch):
    from stmvl.config import load_config, save_config

    cfg = load_config(None, ["optim.max_steps=1"])
    assert cfg.optim.precision == "auto"
    save_config(cfg, tmp_path / "config.yaml", header="optim.precision auto -> fp32: auto: CPU under test")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# optim.precision auto -> fp32: auto: CPU under test\n")
    assert load_config(str(tmp_path / "config.yaml")).optim.precision == "auto"


def test_demo_stage_overrides_reach_the_teacher():
    from stmvl.demo import teacher_overrides

    given = ["optim.precision=fp32", "optim.max_steps=5", "runtime.threads=1", "model.loss.vtm=0",
             "teacher:optim.max_steps=7"]
    assert teacher_overrides(given) == ["optim.precision=fp32", "runtime.threads=1", "optim.max_steps=7"]


def test_auto_picks_fp32_on_torchs_avx2_kernels_as_on_the_reference_machine():
    """benchmarks/bench_reference_demo.py emulates a CPU without native bf16 by hiding AVX-512 from ATen and oneDNN;
    there a bf16 matmul is emulated, whatever the CPU reports, and auto has to land on fp32 (by the CPU flags on an
    AVX2 machine, by the measured slowdown on one with AVX-512 BF16 or AMX)."""
    code = ("import torch; from stmvl.train import precision as P; "
            "chosen = P.resolve('auto', torch.device('cpu')); "
            "print(torch.backends.cpu.get_cpu_capability(), chosen.name, '|', chosen.reason)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    capability, name = out.split()[:2]
    assert capability in ("AVX2", "DEFAULT") and name == "fp32", out
