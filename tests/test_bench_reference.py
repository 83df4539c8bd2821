"""The reference-machine projection of benchmarks/bench_reference_demo.py, on a hand-made demo summary."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "bench_reference_demo.py"


def load_script(name="bench_reference_demo"):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_calibrate_script():
    """calibrate_reference.py as a module (it imports its sibling bench_reference_demo)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return load_script("calibrate_reference")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_projection_scales_every_stage_by_the_ratio_of_peaks():
    bench = load_script()
    summary = {"tier": "quick", "results": {"stm": {"synth_test.itc.t2v_r1": 24.0}},
               "stages": {"corpus": {"seconds": 50.0, "flops": 0},
                          "pretrain stm": {"seconds": 600.0, "flops": 33.5e12}},
               "total": {"seconds": 650.0, "flops": 33.5e12}}
    result = bench.projection(summary, peak_gflops=87.5, reference_gflops=70.0)
    # 87.5 / 70 = 1.25: a core 1.25x faster than the reference machine's two
    assert result["stages"]["pretrain stm"] == {"seconds": 600.0, "tflop": 33.5, "reference_seconds": 750.0}
    assert result["stages"]["total"]["reference_seconds"] == 812.5
    assert result["stages"]["corpus"]["reference_seconds"] == 62.5
    assert result["results"]["stm"]["synth_test.itc.t2v_r1"] == 24.0
    assert "| total | 33.5 | 650.0 | 812.5 (13.5 min) | - |" in bench.table(result)


def test_projection_refuses_a_non_positive_peak():
    with pytest.raises(ValueError, match="positive"):
        load_script().project_seconds(10.0, 0.0)


def test_cores_parse_to_a_set_and_bad_input_names_the_option():
    bench = load_script()
    assert bench.parse_cores("1") == {1} and bench.parse_cores("0,1") == {0, 1}
    for bad in ("a", ",", "0,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--cores"):
            bench.parse_cores(bad)


def test_the_precision_each_training_stage_resolved_to_is_read_from_its_config(tmp_path):
    bench = load_script()
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "config.yaml").write_text(
        "# optim.precision auto -> fp32: auto: CPU with AVX-512 BF16 (AVX2), but a bf16 matmul measured 45.0x the "
        "time of fp32 here\noptim:\n  precision: auto\n")
    found = bench.resolved_precisions(tmp_path)  # the demo reused a teacher: no teacher_run folder
    assert found == {"pretrain": "optim.precision auto -> fp32: auto: CPU with AVX-512 BF16 (AVX2), but a bf16 "
                                 "matmul measured 45.0x the time of fp32 here"}


def test_the_step_ratio_projection_multiplies_every_stage_and_needs_a_calibration_of_the_same_set_up(tmp_path):
    bench = load_script()
    summary = {"tier": "quick", "stages": {"pretrain stm": {"seconds": 300.0, "flops": 20e12}},
               "total": {"seconds": 400.0, "flops": 21e12}}
    result = bench.projection(summary, peak_gflops=140.0, reference_gflops=70.0, step_ratio=1.75)
    assert result["stages"]["total"] == {"seconds": 400.0, "tflop": 21.0, "reference_seconds": 800.0,
                                         "calibrated_seconds": 700.0}
    assert "| total | 21.0 | 400.0 | 800.0 (13.3 min) | 700.0 (11.7 min) |" in bench.table(result)
    # the whole command, start-up and report included, is projected on a row of its own
    whole = bench.projection(summary, peak_gflops=140.0, reference_gflops=70.0, step_ratio=1.75, wall_seconds=410.0)
    assert list(whole["stages"]) == ["pretrain stm", "total", "whole command"]
    assert whole["stages"]["whole command"] == {"seconds": 410.0, "tflop": 21.0, "reference_seconds": 820.0,
                                                "calibrated_seconds": 717.5}
    calibration = tmp_path / "reference_calibration.json"
    assert bench.load_calibration(calibration, 2, "avx2")[0] is None  # no file yet
    calibration.write_text(json.dumps({"step_ratio": 1.75, "threads": 2, "isa": "avx2"}))
    assert bench.load_calibration(calibration, 2, "avx2")[0] == 1.75
    ratio, why = bench.load_calibration(calibration, 1, "avx2")  # measured on two threads, not one
    assert ratio is None and "2 threads" in why


def test_the_step_ratio_is_the_reference_step_over_the_median_step_here():
    calibrate = load_calibrate_script()
    assert calibrate.step_ratio(8.75, [5.0, 4.8, 5.2]) == pytest.approx(1.75)
    with pytest.raises(ValueError, match="positive"):
        calibrate.step_ratio(8.75, [])


def test_each_tier_and_core_count_keeps_its_own_results_file():
    bench = load_script()
    assert bench.result_name("quick", 1) == "reference_demo.json"
    assert bench.result_name("quick", 2) == "reference_demo_two_cores.json"
    assert bench.result_name("full", 2) == "reference_demo_full_two_cores.json"
    assert bench.result_name("full", 4) == "reference_demo_full_4_cores.json"


def fake_calibrations(bench, monkeypatch, result: Path, key: str, start: float) -> list:
    """Replace the script's subprocess.run by a calibration whose n-th run writes {key: start + n / 10} to
    `result`; returns the list the commands it is given are appended to."""
    import subprocess

    commands = []

    def fake_run(command):
        commands.append(command)
        result.write_text(json.dumps({key: start + len(commands) / 10}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    return commands


def test_a_bracket_calibration_runs_the_calibration_on_the_same_cores_and_reads_its_ratio(tmp_path, monkeypatch):
    import subprocess

    bench = load_script()
    monkeypatch.setattr(bench, "CALIBRATION", tmp_path / "reference_calibration.json")
    commands = fake_calibrations(bench, monkeypatch, tmp_path / "reference_calibration.json", "step_ratio", 2.5)
    assert [bench.bracket_calibration({0, 1}, "avx2") for _ in range(2)] == [2.6, 2.7]
    assert commands[0][1].endswith("calibrate_reference.py") and commands[0][2:] == ["--cores", "0,1"]
    monkeypatch.setattr(bench.subprocess, "run", lambda command: subprocess.CompletedProcess(command, 1))
    with pytest.raises(SystemExit, match="calibrate_reference.py failed"):
        bench.bracket_calibration({0, 1}, "avx2")
    with pytest.raises(SystemExit, match="needs --isa avx2"):
        bench.bracket_calibration({0}, "native")


def test_the_training_run_bracket_calibrates_that_workload_and_adds_its_projection(tmp_path, monkeypatch):
    bench = load_script()
    monkeypatch.setattr(bench, "TRAINING_RUN_CALIBRATION", tmp_path / "training_run.json")
    commands = fake_calibrations(bench, monkeypatch, tmp_path / "training_run.json", "training_run_ratio", 3.0)
    ratios = [bench.bracket_calibration({0, 1}, "avx2", "training-run") for _ in range(2)]
    assert ratios == [3.1, 3.2]
    assert commands[0][2:] == ["--cores", "0,1", "--workload", "training-run", "--repeats", "1"]
    summary = {"tier": "quick", "stages": {"pretrain stm": {"seconds": 300.0, "flops": 20e12}},
               "total": {"seconds": 400.0, "flops": 21e12}}
    result = bench.projection(summary, peak_gflops=140.0, reference_gflops=70.0, step_ratio=1.75)
    bench.add_workload_projection(result, "training-run", ratios)
    assert result["training_run_ratio"] == 3.15 and result["training_run_ratios_bracket"] == [3.1, 3.2]
    assert result["stages"]["total"]["training_run_seconds"] == 1260.0
    assert "| total | 21.0 | 400.0 | 800.0 (13.3 min) | 700.0 (11.7 min) | 1260.0 (21.0 min) |" in bench.table(result)


def test_the_demo_run_bracket_reads_its_own_file_and_adds_a_column_after_the_training_run(tmp_path, monkeypatch):
    bench = load_script()
    monkeypatch.setattr(bench, "DEMO_RUN_CALIBRATION", tmp_path / "demo_run.json")
    commands = fake_calibrations(bench, monkeypatch, tmp_path / "demo_run.json", "demo_run_ratio", 1.9)
    ratios = [bench.bracket_calibration({0, 1}, "avx2", "demo-run") for _ in range(2)]
    assert ratios == [2.0, 2.1] and commands[0][2:] == ["--cores", "0,1", "--workload", "demo-run", "--repeats", "1"]
    summary = {"tier": "quick", "stages": {}, "total": {"seconds": 400.0, "flops": 21e12}}
    result = bench.projection(summary, peak_gflops=140.0, reference_gflops=70.0, step_ratio=1.75)
    bench.add_workload_projection(result, "demo-run", ratios)
    assert result["demo_run_ratio"] == 2.05 and result["stages"]["total"]["demo_run_seconds"] == 820.0
    assert "| total | 21.0 | 400.0 | 800.0 (13.3 min) | 700.0 (11.7 min) | 820.0 (13.7 min) |" in bench.table(result)
    bench.add_workload_projection(result, "training-run", [3.0])
    header, _, total = bench.table(result).splitlines()
    assert header.endswith("| by the training-run ratio | by the demo-run ratio |")
    assert total.endswith("| 1200.0 (20.0 min) | 820.0 (13.7 min) |")


def test_the_training_run_ratio_is_written_to_its_own_file(tmp_path, monkeypatch):
    calibrate = load_calibrate_script()
    monkeypatch.setattr(calibrate, "TRAINING_RUN_RESULT", tmp_path / "training_run.json")
    assert calibrate.write_training_run("4996a8d", [110.0, 130.0, 100.0], [0, 1], 2) == 0
    written = json.loads((tmp_path / "training_run.json").read_text())
    assert written["training_run_ratio"] == pytest.approx(407.0 / 110.0, abs=1e-3)  # the median run
    assert written["seconds_here"] == [110.0, 130.0, 100.0] and written["threads"] == 2


def test_the_demo_run_ratio_is_the_mean_over_both_runs_and_the_old_recipe_is_set_to_fp32(tmp_path, monkeypatch):
    calibrate = load_calibrate_script()
    monkeypatch.setattr(calibrate, "DEMO_RUN_RESULT", tmp_path / "demo_run.json")
    runs = {"64px_48x32": {"seconds": 375.0, "corpus": 30.2}, "32px_110x32": {"seconds": 250.0, "corpus": 23.7}}
    assert calibrate.write_demo_run("4996a8d", runs, [0, 1], 2) == 0
    written = json.loads((tmp_path / "demo_run.json").read_text())
    assert written["demo_run_ratio"] == pytest.approx((600 / 375 + 600 / 250) / 2, abs=1e-3)  # 1.6 and 2.4
    assert written["runs"] == runs and written["reference_seconds"] == 600.0
    assert "64px_48x32: optim.max_steps=48" in written["workload"]
    recipe = tmp_path / "src" / "stmvl" / "recipes" / "demo.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("optim:\n  lr: 1.0e-3\n  precision: bf16\n  clip_grad: 1.0\n")
    calibrate.train_in_fp32(tmp_path)
    assert recipe.read_text() == "optim:\n  lr: 1.0e-3\n  precision: fp32\n  clip_grad: 1.0\n"
    with pytest.raises(RuntimeError, match="precision: bf16"):
        calibrate.train_in_fp32(tmp_path)  # already fp32: the old recipe is not what the calibration expects
