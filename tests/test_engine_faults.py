"""Engine under hostile conditions: a run folder of another run, checkpoints that do not load, fp16 steps the grad
scaler skips, and (2 gloo ranks) a failure on one rank, which must end every rank within a bounded time."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stmvl.errors import UserError
from stmvl.train.checkpoint import list_checkpoints
from stmvl.train.distributed import RankFailedError, RankUserError, raise_if_any_failed
from stmvl.train.engine import GradScalerError, ResumeError, RunFolderInUseError, Trainer
from stmvl.train.logging import read_metrics

from test_engine import RegressionTask, _cfg

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "engine_worker.py"


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run, "train")]


# ------------------------------------------------------------------------------------------------ run folders


def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path):
    Trainer(_cfg(tmp_path, "optim.lr=0.05", "optim.max_steps=4", "runtime.ckpt_every_steps=2"), RegressionTask()).fit()
    run = tmp_path / "run"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(RunFolderInUseError) as error:
        Trainer(_cfg(tmp_path, "optim.max_steps=2"), RegressionTask()).fit()
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"{run} already holds another run (2 checkpoint folder(s) under checkpoints/, newest "
                       "step_00000004; metrics.jsonl): continue it with --resume (runtime.resume=true), choose a new "
                       "folder with --out, or pass --overwrite (runtime.overwrite=true) to delete its checkpoints and "
                       "metrics first")
    # nothing of the old run was touched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before and _steps(run) == [1, 2, 3, 4]


def test_metrics_alone_mark_a_previous_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 7, "split": "train", "loss": 1.0}\n')
    with pytest.raises(RunFolderInUseError, match=r"already holds another run \(metrics.jsonl\)"):
        Trainer(_cfg(tmp_path, "optim.max_steps=1"), RegressionTask()).fit()


def test_overwrite_clears_the_old_run_so_keep_last_never_prunes_the_new_one(tmp_path, caplog):
    # the old run went further (step 8) than the new one will (step 4)
    Trainer(_cfg(tmp_path, "optim.lr=0.05", "optim.max_steps=8", "runtime.ckpt_every_steps=2"), RegressionTask()).fit()
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="stmvl"):
        Trainer(_cfg(tmp_path, "optim.max_steps=4", "runtime.ckpt_every_steps=1", "runtime.overwrite=true"),
                RegressionTask()).fit()
    assert "runtime.overwrite: deleting the previous run's 2 checkpoint folder(s)" in caplog.text
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]  # only the new run's, the newest two kept
    assert _steps(run) == [1, 2, 3, 4]  # no line of the old run left


def test_a_foreign_later_checkpoint_is_never_counted_by_keep_last(tmp_path):
    from stmvl.train.checkpoint import save_checkpoint

    for step in (2, 4, 100):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, {"global_step": step}, keep_last=5)
    for step in (6, 8):  # a run that restarted at step 4 keeps its two newest, and leaves step 100 alone
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, {"global_step": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8, 100]


# ------------------------------------------------------------------------------------------------ resume


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_falls_back_to_the_previous_checkpoint_and_says_which_was_skipped(tmp_path, caplog):
    first = _cfg(tmp_path, "optim.lr=0.05", "optim.max_steps=6", "runtime.ckpt_every_steps=2", "runtime.keep_last=3")
    Trainer(first, RegressionTask()).fit()
    run = tmp_path / "run"
    _truncate(run / "checkpoints" / "step_00000006" / "state.pt")
    resumed = _cfg(tmp_path, "optim.lr=0.05", "optim.max_steps=6", "runtime.ckpt_every_steps=2",
                   "runtime.keep_last=3", "runtime.resume=true")
    with caplog.at_level(logging.INFO, logger="stmvl"):
        trainer = Trainer(resumed, RegressionTask())
        summary = trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith("[engine] resume: skipping checkpoint step_00000006, it does not load: "
                                  f"{run / 'checkpoints' / 'step_00000006' / 'state.pt'}: not a readable "
                                  "checkpoint state (")
    assert warnings[1] == ("[engine] resume: step_00000006 set aside as unreadable-step_00000006; resuming from the "
                           "older step_00000004")
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} (step 4" in caplog.text
    assert summary["global_step"] == 6
    assert (run / "checkpoints" / "unreadable-step_00000006" / "state.pt").is_file()  # kept for inspection
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]  # step 6 written again by this run
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_resume_with_no_loadable_checkpoint_lists_them_in_one_line(tmp_path):
    Trainer(_cfg(tmp_path, "optim.lr=0.05", "optim.max_steps=4", "runtime.ckpt_every_steps=2"), RegressionTask()).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    _truncate(ckpts / "step_00000004" / "model.safetensors")
    (ckpts / "step_00000002" / "state.pt").write_bytes(b"")
    with pytest.raises(ResumeError) as error:
        Trainer(_cfg(tmp_path, "optim.max_steps=4", "runtime.resume=true"), RegressionTask()).fit()
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError)
    assert message.startswith(f"cannot resume from {tmp_path / 'run'}: no checkpoint loads (step_00000004: "
                              f"{ckpts / 'step_00000004' / 'model.safetensors'}: not a readable safetensors file")
    assert f"; step_00000002: {ckpts / 'step_00000002' / 'state.pt'}: not a readable checkpoint state (EOFError)" \
        in message
    assert message.endswith("start a new run with a new --out, or without --resume and with --overwrite to discard "
                            "them")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]  # nothing moved or lost


def test_resume_into_a_folder_without_checkpoints_drops_the_dead_attempts_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n')
    Trainer(_cfg(tmp_path, "optim.lr=0.05", "optim.max_steps=2", "runtime.resume=true"), RegressionTask()).fit()
    assert _steps(run) == [1, 2] and read_metrics(run, "train")[0]["loss"] != 9.0


# ------------------------------------------------------------------------------------------------ fp16


class InfiniteGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (what an fp16 overflow leaves in the gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class OverflowTask(RegressionTask):
    """Finite losses, but the gradients overflow on the steps in `overflow_at` (all steps when None). The loss is
    scaled down so that, at the scaler's initial scale of 2**16, no other step overflows in fp16."""

    def __init__(self, overflow_at: set[int] | None = None) -> None:
        super().__init__()
        self.overflow_at = overflow_at

    def train_step(self, model, batch, step):
        out = super().train_step(model, batch, step)
        out["loss"] = out["loss"] * 1e-4
        if self.overflow_at is None or step in self.overflow_at:
            out["loss"] = InfiniteGradient.apply(out["loss"])
        return out


def test_fp16_skipped_steps_are_counted(tmp_path):
    cfg = _cfg(tmp_path, "optim.precision=fp16", "optim.lr=0.05", "optim.max_steps=5")
    trainer = Trainer(cfg, OverflowTask(overflow_at={1, 2}))
    summary = trainer.fit()
    assert trainer.precision == "fp16"
    train = read_metrics(tmp_path / "run", "train")
    assert [r["skipped"] for r in train] == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert [r["skipped_steps"] for r in train] == [0, 1, 2, 2, 2]
    assert summary["skipped_steps"] == 2 and trainer.consecutive_skips == 0
    assert trainer.scaler.get_scale() == 2.0 ** 14  # halved twice from 2**16
    assert torch.isfinite(trainer.model.lin.weight).all()


def test_fp16_persistent_nonfinite_gradients_end_the_run(tmp_path):
    cfg = _cfg(tmp_path, "optim.precision=fp16", "optim.max_steps=50", "optim.max_consecutive_skips=3")
    with pytest.raises(GradScalerError) as error:
        Trainer(cfg, OverflowTask()).fit()
    assert str(error.value) == (
        "the fp16 grad scaler skipped 4 optimizer steps in a row (steps 1 to 4: non-finite gradients, scale now "
        "4.1e+03), more than optim.max_consecutive_skips=3: lower optim.lr, set optim.clip_grad, use "
        "optim.precision=bf16 or fp32, or check the data")
    assert _steps(tmp_path / "run") == [1, 2, 3]  # step 4 raised before its record


# ------------------------------------------------------------------------------------------------ one process


def test_without_a_process_group_the_failure_agreement_just_raises():
    assert raise_if_any_failed(None, "x", counts=(3, 4)) == [3.0, 4.0]
    with pytest.raises(KeyError, match="boom"):
        raise_if_any_failed(KeyError("boom"), "x")


# ------------------------------------------------------------------------------------------------ 2 gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(run_dir: Path, *args: str, steps: int = 6, limit: float = 90.0) -> tuple[list[tuple[int, str]], float]:
    """Start rank 0 and rank 1 of the engine worker as separate processes (as a cluster launcher would, so that no
    agent kills the survivors for us): [(exit code, stderr)] per rank and the seconds until both had exited."""
    return _launch_two([str(WORKER), "--run-dir", str(run_dir), "--steps", str(steps), "--precision", "fp32",
                        "--dropout", "0", *args], limit)


def _launch_two(command: list[str], limit: float) -> tuple[list[tuple[int, str]], float]:
    port = _free_port()
    procs = []
    started = time.monotonic()
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        results = []
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, limit - (time.monotonic() - started)))
            results.append((proc.returncode, err))
        return results, time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.ddp
def test_an_exception_in_one_ranks_data_path_ends_both_ranks_at_once(tmp_path):
    (rank0, err0), (rank1, err1), = _two_ranks(tmp_path / "run", "--fail-rank", "1", "--fail-batch", "3",
                                                "--fail-kind", "error")[0]
    # the failing rank keeps its own traceback (an internal error is a bug report); the healthy one names it
    assert rank1 == 1 and err1.rstrip().endswith("RuntimeError: decoder crashed on rank 1 (test)"), err1[-2000:]
    assert rank0 == 1 and err0.rstrip().splitlines()[-1].endswith(
        "stmvl.train.distributed.RankFailedError: rank 1 failed at step 3 (loading its batches) with RuntimeError: "
        "decoder crashed on rank 1 (test) (its traceback is in that rank's output); rank 0 stops too"), err0[-2000:]
    assert _steps(tmp_path / "run") == [1, 2]


@pytest.mark.ddp
def test_the_bad_sample_bound_on_one_rank_stops_both_with_the_same_line(tmp_path):
    results, seconds = _two_ranks(tmp_path / "run", "--fail-rank", "1", "--fail-batch", "2", "--fail-kind", "bound")
    expected = ("stmvl: error: rank 1 at step 2 (loading its batches): corpus 'toy': 20 of 20 media loads failed "
                "(100.0% > max_bad_fraction 10.0%); last: ")
    for code, err in results:
        assert code == 2 and err.rstrip().splitlines()[-1].startswith(expected), err[-2000:]
    assert results[0][1].splitlines()[-1] == results[1][1].splitlines()[-1]
    assert seconds < 60


@pytest.mark.ddp
def test_the_bad_sample_bound_counts_the_loads_of_every_rank(tmp_path):
    # rank 1 fails 2 of every 6 loads, rank 0 none: at step 2, 4 of the 20 loads of both ranks (rank 1 alone has not
    # yet made the 20 loads the bound waits for)
    over, _ = _two_ranks(tmp_path / "over", "--fail-rank", "1", "--fail-kind", "count", "--max-bad-fraction", "0.15",
                         steps=3)
    line = ("stmvl: error: 4 of 20 media loads failed over 2 rank(s) (20.0% > data.max_bad_fraction 15.0%); the "
            f"broken files are listed in {tmp_path / 'over' / 'quarantine.jsonl'}; run `stmvl check-data` on the "
            "annotations")
    assert [(code, err.rstrip().splitlines()[-1]) for code, err in over] == [(2, line), (2, line)]


@pytest.mark.ddp
def test_one_rank_over_the_bound_does_not_stop_a_run_under_it_over_all_ranks(tmp_path):
    # rank 1 fails every third of its loads (33% > 25% on its own, from its 20th load on); rank 0 fails none: over
    # both ranks 12 of 60 loads (20%). The guards of a distributed stream leave the bound to the engine.
    results, _ = _two_ranks(tmp_path / "run", "--fail-rank", "1", "--fail-kind", "local", "--max-bad-fraction",
                            "0.25")
    assert [code for code, _ in results] == [0, 0], results[1][1][-2000:]
    assert _steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


@pytest.mark.ddp
def test_a_corrupt_evaluation_clip_on_one_rank_stops_both_with_the_same_line():
    results, seconds = _launch_two([str(ROOT / "tests" / "eval_failure_worker.py")], 60.0)
    line = ("stmvl: error: rank 1 at reading the evaluation clips: test/clip6.mp4: undecodable (moov atom not "
            "found)")
    assert [(code, err.rstrip().splitlines()[-1]) for code, err in results] == [(2, line), (2, line)], results
    assert seconds < 30  # at once, not after the 30 s process-group timeout


@pytest.mark.ddp
@pytest.mark.slow
def test_a_hung_rank_ends_the_job_after_the_process_group_timeout(tmp_path):
    started = time.monotonic()
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
         "--run-dir", str(tmp_path / "run"), "--steps", "6", "--precision", "fp32", "--fail-rank", "1",
         "--fail-batch", "2", "--fail-kind", "hang", "--dist-timeout", "4"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert job.returncode != 0 and seconds < 60, job.stderr[-3000:]
    # rank 0 gave up waiting in the step's agreement; the launcher then stopped the hung rank
    assert ("[rank0]: stmvl.train.distributed.RankFailedError: rank 0 got no answer from the other ranks at step 2 "
            "(loading its batches) within runtime.dist_timeout_s=4: a rank hung or died (see its output); ") \
        in job.stderr, job.stderr[-3000:]
    assert _steps(tmp_path / "run") == [1]


def test_rank_errors_are_user_errors_only_for_user_failures():
    assert issubclass(RankUserError, UserError) and not issubclass(RankFailedError, UserError)
