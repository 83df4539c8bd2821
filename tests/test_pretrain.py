"""Real pretraining runs (PretrainTask on the engine) at tiny size: exact resume after a kill, and 2-rank DDP
giving the same VTC loss curve as one rank with the same global batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stmvl.data.synth import generate_corpus
from tiny_recipe import tiny_recipe

WORKER = Path(__file__).parent / "pretrain_worker.py"
SRC = Path(__file__).resolve().parents[1] / "src"

TINY = tiny_recipe('{{name: v, media_type: video, annotation: "{root}/annotations/train_video.json", '
                   'media_root: "{root}"}}',
                   "seed: 3, log_every: 1, ckpt_every_steps: 1, keep_last: 5, tensorboard: false, progress: false")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, seed=0, train=32, test=4, probe=2, size=32, frames=4, workers=1)
    path = root / "tiny.yaml"
    path.write_text(TINY.format(root=root), encoding="utf-8")
    return path


def _run(cmd: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_uninterrupted_losses_exactly(recipe, tmp_path):
    full = _run([sys.executable, str(WORKER), str(recipe), f"runtime.out_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run([sys.executable, str(WORKER), str(recipe), f"runtime.out_dir={tmp_path / 'cut'}"],
                  {"STMVL_TEST_EXIT_AFTER": "2"})
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert len(_train_records(tmp_path / "cut")) == 2
    resumed = _run([sys.executable, str(WORKER), str(recipe), f"runtime.out_dir={tmp_path / 'cut'}",
                    "runtime.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    names = ("loss", "loss_video_vtc", "loss_video_vtm", "loss_video_mlm", "loss_video_mvm")
    expected = [[r[n] for n in names] for r in _train_records(tmp_path / "full")]
    got = [[r[n] for n in names] for r in _train_records(tmp_path / "cut")]
    assert len(expected) == 4
    assert got == expected  # exactly: same samples, masks, negatives and RNG after the restart
    # the first step runs under the FLOP counter and is kept out of the rates; the others log clips/s and MFU
    records = _train_records(tmp_path / "full")
    assert "mfu" not in records[0] and all(0 < r["mfu"] < 1.5 and r["clips_per_s"] > 0 for r in records[1:])
    assert expected[0][0] != expected[-1][0]


@pytest.mark.ddp
@pytest.mark.slow  # CI runs it (make test-slow); the default run keeps a shorter 2-rank check
def test_two_rank_gloo_pretraining_gives_the_one_rank_vtc_curve(recipe, tmp_path):
    # VTC only with random masking: the other losses use batch-local draws (VTM negatives, BatchNorm statistics of
    # the predictor) that legitimately differ with the per-rank batch, while VTC must not
    vtc_only = ["model.loss.vtm=0", "model.loss.mlm=0", "model.loss.mvm=0", "model.mask.video_strategy=random",
                "runtime.find_unused_parameters=true", "optim.max_steps=3"]
    one = _run([sys.executable, str(WORKER), str(recipe), f"runtime.out_dir={tmp_path / 'one'}", *vtc_only])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
                str(recipe), f"runtime.out_dir={tmp_path / 'two'}", "data.video_batch_size=4", *vtc_only])
    assert two.returncode == 0, two.stderr[-3000:]
    curve_one = [r["loss_video_vtc"] for r in _train_records(tmp_path / "one")]
    curve_two = [r["loss_video_vtc"] for r in _train_records(tmp_path / "two")]
    assert len(curve_one) == len(curve_two) == 3
    assert curve_two == pytest.approx(curve_one, rel=1e-5, abs=1e-6)
    assert curve_one[0] != curve_one[-1]


MIXED = ["data.corpora=[{name: v, media_type: video, annotation: {root}/annotations/train_video.json, "
         "media_root: {root}}, {name: i, media_type: image, weight: 0.5, "
         "annotation: {root}/annotations/train_image.json, media_root: {root}}]",
         "optim.max_steps=20", "runtime.ckpt_every_steps=0"]


def _media_records(run_dir: Path) -> tuple[list[dict], set[str]]:
    records = _train_records(run_dir)
    return records, {k.split("_")[1] for r in records for k in r if k.startswith("loss_")}


@pytest.mark.ddp
def test_two_rank_mixed_image_video_stm_pretraining_runs_with_default_ddp_settings(recipe, tmp_path):
    """The paper recipes' shape: STM masking, all four losses, image and video steps mixed, 2 ranks, no
    find_unused_parameters. Image steps leave the predictor, lambda and the decoders' temporal branches unused;
    the engine must still finish every step (it used to crash at the first image step)."""
    root = recipe.parent
    mixed = [m.replace("{root}", str(root)) for m in MIXED]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
                str(recipe), f"runtime.out_dir={tmp_path / 'two'}", "data.video_batch_size=4",
                "data.image_batch_size=4", *mixed])
    assert two.returncode == 0, two.stderr[-3000:]
    records, media = _media_records(tmp_path / "two")
    assert len(records) == 20 and media == {"video", "image"}
    assert all(math.isfinite(r["loss"]) for r in records)
    assert any("video_mask_lambda" in r for r in records)


@pytest.mark.ddp
def test_two_rank_mixed_media_gives_the_one_rank_curves(recipe, tmp_path):
    """Image + video, VTC + MVM through the ST decoder (per-sample losses with teacher-attention masks, drawn per
    sample), 20 steps: 2 ranks x 4 clips give the losses of 1 rank x 8 clips, step for step."""
    root = recipe.parent
    mixed = [m.replace("{root}", str(root)) for m in MIXED]
    per_sample = ["model.loss.vtm=0", "model.loss.mlm=0", "model.mask.video_strategy=attention",
                  "model.loss.temporal_negatives=false", "model.loss.foil_negatives=false", *mixed]
    one = _run([sys.executable, str(WORKER), str(recipe), f"runtime.out_dir={tmp_path / 'one'}",
                "data.image_batch_size=8", *per_sample])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
                str(recipe), f"runtime.out_dir={tmp_path / 'two'}", "data.video_batch_size=4",
                "data.image_batch_size=4", *per_sample])
    assert two.returncode == 0, two.stderr[-3000:]
    rec_one, media = _media_records(tmp_path / "one")
    rec_two, _ = _media_records(tmp_path / "two")
    assert media == {"video", "image"} and len(rec_one) == len(rec_two) == 20
    assert [r["loss"] for r in rec_two] == pytest.approx([r["loss"] for r in rec_one], rel=1e-4, abs=1e-5)
    assert rec_one[0]["loss"] != rec_one[-1]["loss"]


@pytest.mark.ddp
@pytest.mark.slow  # CI runs it (make test-slow); the default run keeps a shorter 2-rank check
def test_a_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch_and_refuses_another(recipe, tmp_path,
                                                                                                 capsys):
    """2 ranks x 4 clips, killed after step 2, resumed on 1 rank x 8 clips: the same samples per step and schedule,
    so the losses continue the uninterrupted run's (VTC + MVM with per-sample masks, no dropout). Resuming with
    another global batch is refused with a one-line error (exit 2)."""
    from stmvl.cli import main

    per_sample = ["model.loss.vtm=0", "model.loss.mlm=0", "model.mask.video_strategy=attention",
                  "model.loss.temporal_negatives=false", "model.loss.foil_negatives=false"]
    full = _run([sys.executable, str(WORKER), str(recipe), f"runtime.out_dir={tmp_path / 'full'}", *per_sample])
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
                   str(recipe), f"runtime.out_dir={tmp_path / 'cut'}", "data.video_batch_size=4", *per_sample],
                  {"STMVL_TEST_EXIT_AFTER": "2"})
    assert killed.returncode != 0 and len(_train_records(tmp_path / "cut")) == 2
    code = main(["pretrain", str(recipe), "--out", str(tmp_path / "cut"), "--resume", "data.video_batch_size=4",
                 *per_sample])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume from" in err and "written by 2 rank(s)" in err, err[-2000:]
    resumed = _run([sys.executable, str(WORKER), str(recipe), f"runtime.out_dir={tmp_path / 'cut'}",
                    "runtime.resume=true", *per_sample])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint has 2 ranks, run has 1" in resumed.stderr
    expected = [r["loss"] for r in _train_records(tmp_path / "full")]
    got = [r["loss"] for r in _train_records(tmp_path / "cut")]
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_dry_run_lists_every_missing_path_at_once(recipe, tmp_path, capsys):
    from stmvl.cli import main

    root = recipe.parent
    bad_eval = (f"eval.corpora=[{{name: t, kind: retrieval, annotation: {root}/annotations/no_such_test.json, "
                f"media_root: {root}}}]")
    code = main(["pretrain", str(recipe), "--dry-run", "--out", str(tmp_path / "run"), bad_eval,
                 f"model.teacher.weights={tmp_path}/no_teacher"])
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("stmvl pretrain: error: "), err
    assert "2 path(s) named by the recipe do not exist" in err[0]
    assert "eval.corpora.0.annotation (t)" in err[0] and "no_such_test.json" in err[0]
    assert "model.teacher.weights" in err[0] and "no_teacher" in err[0]


def test_dry_run_runs_one_step_of_each_media_type_and_writes_nothing(recipe, tmp_path, capsys):
    from stmvl.cli import main

    root = recipe.parent
    mixed = [m.replace("{root}", str(root)) for m in MIXED]
    code = main(["pretrain", str(recipe), "--dry-run", "--out", str(tmp_path / "run"), "data.image_batch_size=4",
                 *mixed])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("[dry-run]")]
    assert lines[0].startswith("[dry-run] image: one step") and lines[1].startswith("[dry-run] video: one step")
    assert "peak memory" in lines[1] and "loss_video_mvm=" in lines[1] and "loss_image_vtc=" in lines[0]
    assert " GFLOP, peak memory" in lines[0] and " GFLOP, peak memory" in lines[1]
    assert not (tmp_path / "run").exists()


def test_evaluate_command_reproduces_the_end_of_training_numbers(recipe, tmp_path):
    """`stmvl evaluate RECIPE --checkpoint RUN` on the exported model gives the numbers the run reported."""
    import torch

    from stmvl.cli import main
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import pretrain

    root = recipe.parent
    evals = (f"eval.corpora=[{{name: t, kind: retrieval, caption_mode: single, "
             f"annotation: {root}/annotations/retrieval_test.json, media_root: {root}}}, "
             f"{{name: p, kind: probe, annotation: {root}/annotations/probe.json, media_root: {root}}}]")
    common = [evals, "eval.num_frames=4", "eval.k_test=2", "eval.batch_size=4", "eval.num_workers=0",
              "optim.max_steps=2", "runtime.ckpt_every_steps=0"]
    torch.set_num_threads(1)
    result = pretrain(load_run_config(str(recipe), [f"runtime.out_dir={tmp_path / 'run'}", *common]))
    code = main(["evaluate", str(recipe), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "ev"),
                 *common])
    assert code == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert again["t"]["itc"] == pytest.approx(result["results"]["t"]["itc"])
    assert again["t"]["itm"] == pytest.approx(result["results"]["t"]["itm"])
    assert again["p"]["itc_acc"] == pytest.approx(result["results"]["p"]["itc_acc"])
    assert again["t"]["protocol"]["k_test"] == 2
    # the final evaluation kept the retrieval corpus' ITC matrix, and it ranks to the reported ITC numbers
    from stmvl.eval.metrics import retrieval_metrics
    from stmvl.tasks.data import eval_datasets

    saved = torch.load(Path(result["run_dir"]) / "similarity" / "t.pt", weights_only=True)
    (_, dataset), = eval_datasets(load_run_config(str(recipe), common), ("retrieval",)).values()
    assert saved["texts"] == dataset.texts and len(saved["videos"]) == len(dataset)
    ranked = retrieval_metrics(saved["itc"], dataset.txt2vid, dataset.vid2txt)
    assert ranked == pytest.approx(result["results"]["t"]["itc"])
    assert not (Path(result["run_dir"]) / "similarity" / "p.pt").exists()  # probes have no matrix


def test_itm_only_at_the_final_evaluation_and_never(recipe, tmp_path):
    """eval.itm 'final': the learning-curve evaluations score ITC alone, the run's last one ITM too, with the same ITC
    numbers as an evaluation that scores both; 'never' leaves ITM out of `stmvl evaluate` as well."""
    import torch

    from stmvl.cli import main
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import pretrain

    root = recipe.parent
    evals = (f"eval.corpora=[{{name: t, kind: retrieval, caption_mode: single, "
             f"annotation: {root}/annotations/retrieval_test.json, media_root: {root}}}, "
             f"{{name: p, kind: probe, annotation: {root}/annotations/probe.json, media_root: {root}}}]")
    common = [evals, "eval.num_frames=4", "eval.k_test=2", "eval.batch_size=4", "eval.num_workers=0",
              "runtime.ckpt_every_steps=0"]
    torch.set_num_threads(1)
    # 32 clips in batches of 8: evaluations after epoch 1 (step 4) and at the end (step 6)
    result = pretrain(load_run_config(str(recipe), [f"runtime.out_dir={tmp_path / 'run'}", "optim.max_steps=6",
                                                    "eval.every_epochs=1", "eval.itm=final", *common]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = [r for r in records if r.get("split") == "eval"]
    assert (first["step"], last["step"]) == (4, 6)
    assert "t/itc/t2v_r1" in first and "p/itc_acc" in first
    assert not any("itm" in key for key in first)
    assert "t/itm/t2v_r1" in last and "p/itm_acc" in last
    assert result["results"]["t"]["protocol"]["k_test"] == 2

    code = main(["evaluate", str(recipe), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "ev"),
                 "eval.itm=never", *common])
    assert code == 0
    never = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(never["t"]) == {"itc", "protocol"} and "k_test" not in never["t"]["protocol"]
    assert never["t"]["itc"] == pytest.approx(result["results"]["t"]["itc"])
    assert never["p"]["itc_acc"] == pytest.approx(result["results"]["p"]["itc_acc"]) and "itm_acc" not in never["p"]
