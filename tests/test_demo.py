"""The demo end to end at a scaled-down size: every stage runs, the report states each stage's time and FLOPs, and
the counted FLOPs of a pretraining step equal an independent count of the same step."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SMALL = ["data.synthetic.num_train=48", "data.synthetic.num_images=48", "data.synthetic.num_test=16",
         "data.synthetic.num_probe=16", "data.synthetic.frames=4", "teacher:optim.max_steps=2",
         "teacher:data.image_batch_size=8", "optim.max_steps=3", "optim.warmup_steps=1", "data.video_batch_size=8",
         "data.image_batch_size=8", "data.corpora.1.weight=0.01", "data.num_workers=0", "eval.num_workers=0",
         "eval.k_test=4", "eval.batch_size=8", "model.vision.depth=2", "runtime.log_every=1", "runtime.threads=1",
         "optim.precision=fp32"]


@pytest.mark.slow
def test_scaled_down_demo_reports_the_compute_of_every_stage(tmp_path):
    from stmvl.demo import run_demo
    from stmvl.models.stm import STMModel
    from stmvl.tasks.pretrain import PretrainTask, load_run_config
    from stmvl.data.transforms import to_float
    from stmvl.tasks.data import pretrain_stream, tokenizer_for
    from stmvl.train.flops import count_flops

    summary = run_demo(tmp_path / "demo", overrides=SMALL)
    stages = summary["stages"]
    assert list(stages) == ["corpus", "teacher", "pretrain stm", "attribute check"]
    assert stages["teacher"]["flops"] > 0 and stages["pretrain stm"]["flops"] > stages["teacher"]["flops"] / 100
    assert summary["total"]["flops"] == sum(v["flops"] for v in stages.values())
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    compute = next(s for s in report["sections"] if s["title"] == "Compute")
    assert compute["numbers"]["total"]["TFLOP"] == pytest.approx(summary["total"]["flops"] / 1e12, abs=0.01)
    attributes = next(s for s in report["sections"] if s["title"].startswith("What the top-ranked clip"))
    assert attributes["numbers"]["captions"] >= 1 and 0 <= attributes["numbers"]["shape"] <= 100
    # the attribute check ranks by the similarity the final evaluation saved: nothing encoded again, and that
    # matrix gives the retrieval table's R@1
    assert stages["attribute check"]["flops"] == 0
    assert "the final evaluation's ITC similarity" in attributes["text"]
    saved = torch.load(tmp_path / "demo" / "pretrain" / "similarity" / "synth_test.pt", weights_only=True)
    assert saved["itc"].shape == (16, 16) and len(saved["texts"]) == 16 and len(saved["videos"]) == 16
    from stmvl.eval.metrics import retrieval_metrics
    from stmvl.tasks.data import eval_datasets
    from stmvl.tasks.pretrain import load_run_config as load_cfg

    (_, test_set), = eval_datasets(load_cfg(str(tmp_path / "demo" / "pretrain" / "config.yaml")),
                                    ("retrieval",)).values()
    r1 = retrieval_metrics(saved["itc"], test_set.txt2vid, test_set.vid2txt)["t2v_r1"]
    assert r1 == pytest.approx(summary["results"]["stm"]["synth_test.itc.t2v_r1"])
    for key in ("synth_test.itc.t2v_r1", "synth_probe.itc_acc", "synth_probe_shuffled.itc_acc"):
        assert summary["results"]["stm"][key] is not None
    # the quick tier scores ITC only (eval.itm: never), and its report says so
    assert summary["results"]["stm"]["synth_test.itm.t2v_r1"] is None
    retrieval = next(s for s in report["sections"] if s["title"].startswith("Zero-shot text-video retrieval"))
    assert set(retrieval["numbers"]) == {"itc"} and "eval.itm: never" in retrieval["text"]

    # the engine's count of the first video step equals a count of the same step made here, on the same batch
    run = tmp_path / "demo" / "pretrain"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    counted = [r for r in records if r.get("split") == "train" and "flops_counted" in r and "loss_video_vtc" in r]
    assert len(counted) == 1, "the first video step is counted once"
    cfg = load_run_config(str(run / "config.yaml"))
    batch = pretrain_stream(cfg, tmp_path / "again", tokenizer_for(cfg.model.text), 0, 1).first_batch("video")
    batch["video"] = to_float(batch["video"])
    torch.manual_seed(0)
    model = STMModel(cfg.model).train()
    with torch.no_grad():
        PretrainTask(cfg).prepare(model)  # the frozen-text cache, filled before step 1 as in the run
    here = count_flops(lambda: model(batch, step=counted[0]["step"] - 1)["loss"].backward())
    assert counted[0]["flops_counted"] == here


def test_attribute_accuracy_scores_the_top_clip_of_one_object_captions_only():
    from stmvl.demo import attribute_accuracy

    def clip(*objects):
        return {"objects": [dict(zip(("color", "shape", "motion"), o)) for o in objects]}

    clips = [clip(("red", "circle", "left")), clip(("red", "square", "left")), clip(("blue", "circle", "grows")),
             clip(("red", "circle", "left"), ("blue", "star", "up"))]
    sim = torch.tensor([[0.1, 0.9, 0.0, 0.0],   # wants red circle left, gets red square left: shape wrong
                        [0.0, 0.1, 0.8, 0.0],   # wants red square left, gets blue circle grows: all wrong
                        [0.0, 0.0, 0.9, 0.1],   # wants blue circle grows, gets it: all right
                        [0.9, 0.0, 0.0, 0.1]])  # a two-object caption: not scored
    out = attribute_accuracy(sim, clips, clips)
    assert out["captions"] == 3
    assert out["color"] == pytest.approx(200 / 3) and out["shape"] == pytest.approx(100 / 3)
    assert out["motion"] == pytest.approx(200 / 3) and out["all three"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="sim must be"):
        attribute_accuracy(sim[:2], clips, clips)


def test_equal_compute_steps_follow_the_media_schedule():
    from stmvl.data.mixing import media_schedule
    from stmvl.demo import equal_compute_steps, media_steps

    counts = {"video": 3, "image": 1}
    stm = {"video": 10, "image": 4}
    # the same FLOPs per step: the same steps, wherever the run stops in an epoch
    for ref_steps in (1, 5, 9):
        assert equal_compute_steps(counts, 0, stm, stm, ref_steps) == ref_steps
    # half the FLOPs of every step: twice the steps (one epoch of the reference = 34 FLOPs = two epochs of 17)
    assert equal_compute_steps(counts, 0, stm, {"video": 5, "image": 2}, 4) == 8
    # the schedule is the stream's, epoch after epoch, and differs between seeds
    steps = list(itertools.islice(media_steps(counts, 3), 8))
    assert steps == media_schedule(counts, 3, 0) + media_schedule(counts, 3, 1)
    # cheaper video steps only: where the image step falls decides the count; 2 steps of the reference at seed s
    for seed in range(4):
        first_two = list(itertools.islice(media_steps(counts, seed), 2))
        budget = sum(stm[m] for m in first_two)
        got = equal_compute_steps(counts, seed, stm, {"video": 1, "image": 4}, 2)
        cheap = {"video": 1, "image": 4}
        taken = [cheap[m] for m in itertools.islice(media_steps(counts, seed), got + 1)]
        spent, last, nxt = sum(taken[:-1]), taken[-2], taken[-1]
        # the closest count: the last step overshoots by at most half of it, the next would by more than half
        assert spent - budget <= last / 2 and spent + nxt / 2 > budget, (seed, first_two, got)


@pytest.mark.slow
def test_scaled_down_compare_gives_every_variant_the_training_flops_of_stm_and_resumes(tmp_path, monkeypatch):
    from stmvl.demo import run_demo

    # two runs at a time, each in its own process
    summary = run_demo(tmp_path / "demo", compare=True, seeds=2, overrides=SMALL + ["optim.max_steps=4"], jobs=2)
    assert summary["compare_at"] == "flops" and "equal-compute steps" in summary["stages"]
    for seed in range(2):  # each seed's first batches (captions padded to their longest) set its own count
        stm, umt, rnd = (summary["seeds"][name][seed] for name in ("stm", "umt", "random"))
        assert stm["steps"] == 4 and umt["steps"] > 4  # UMT has no second student pass: more steps, same work
        for run in (umt, rnd):  # within half a step of STM's training FLOPs
            assert abs(run["train_tflop"] - stm["train_tflop"]) <= 0.5 * stm["train_tflop"] / 4, summary["seeds"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Masking strategies compared: equal training FLOPs, 2 seed(s)" in report
    assert "synth_test.itc.t2v_r1" in report and "itm" not in report.split("Masking strategies compared")[1]

    # --resume: every run finished with the same settings, so none trains again and the table is the same
    import stmvl.tasks.runs

    def no_training(cfg):
        raise AssertionError(f"{cfg.runtime.out_dir} was trained again")

    monkeypatch.setattr(stmvl.tasks.runs, "pretrain", no_training)
    again = run_demo(tmp_path / "demo", compare=True, seeds=2, overrides=SMALL + ["optim.max_steps=4"], resume=True)
    assert again["seeds"] == summary["seeds"] and again["results"] == summary["results"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Masking strategies compared: equal training FLOPs, 2 seed(s)" in report


def _fake_pretrain(calls):
    """Stands in for stmvl.tasks.runs.pretrain: writes an exported model folder and returns an engine result."""
    from pathlib import Path

    def pretrain(cfg):
        calls.append(cfg.runtime.out_dir)
        model_dir = Path(cfg.runtime.out_dir) / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text("{}")
        return {"global_step": cfg.optim.max_steps, "run_dir": str(cfg.runtime.out_dir), "model_dir": str(model_dir),
                "precision": "fp32", "flops": {"train": 7 * cfg.optim.max_steps, "eval": 3},
                "results": {"synth_test": {"itc": {"t2v_r1": 12.5}}, "synth_probe": {"itc_acc": 0.75}}}
    return pretrain


def test_resume_reuses_a_finished_run_with_the_same_settings_and_retrains_any_other(tmp_path, monkeypatch):
    import stmvl.tasks.runs
    from stmvl.demo import RUN_RECORD, run_pretrain

    calls = []
    monkeypatch.setattr(stmvl.tasks.runs, "pretrain", _fake_pretrain(calls))
    first = run_pretrain(tmp_path, "stm_seed0", ["optim.max_steps=5"], reuse=True)
    assert len(calls) == 1 and (tmp_path / "stm_seed0" / RUN_RECORD).is_file()

    again = run_pretrain(tmp_path, "stm_seed0", ["optim.max_steps=5"], reuse=True)
    assert len(calls) == 1, "a finished run with the same settings is not trained again"
    for key in ("global_step", "results", "flops", "model_dir", "run_dir"):
        assert again[key] == first[key], key
    assert again["seconds"] == pytest.approx(first["seconds"]) and again["cfg"].optim.max_steps == 5

    run_pretrain(tmp_path, "stm_seed0", ["optim.max_steps=6"], reuse=True)  # other settings: trained again
    run_pretrain(tmp_path, "stm_seed0", ["optim.max_steps=6"])  # without reuse: always trained
    assert len(calls) == 3
    (tmp_path / "stm_seed0" / RUN_RECORD).write_text("{not json")  # an unreadable record: trained again
    run_pretrain(tmp_path, "stm_seed0", ["optim.max_steps=6"], reuse=True)
    assert len(calls) == 4
    # a run cut short leaves no record (it is written after the model is exported): trained again
    monkeypatch.setattr(stmvl.tasks.runs, "pretrain", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tmp_path, "stm_seed1", ["optim.max_steps=5"], reuse=True)
    assert not (tmp_path / "stm_seed1" / RUN_RECORD).exists()


@pytest.mark.parametrize("tier", ["quick", "full"])
def test_each_tier_loads_a_teacher_of_the_sizes_its_teacher_recipe_trains(tier):
    from stmvl.demo import TEACHER_RECIPES, TEACHER_SIZES, TIERS
    from stmvl.tasks.pretrain import load_run_config

    pretrain = load_run_config(TIERS[tier])
    teacher = load_run_config(TEACHER_RECIPES[tier])
    assert teacher.task == "train_teacher"
    for key in TEACHER_SIZES:  # the pretraining run loads this teacher: every size must agree
        assert getattr(teacher.model.teacher, key) == getattr(pretrain.model.teacher, key), key
    sizes = {pretrain.data.img_size, pretrain.model.vision.img_size, pretrain.model.teacher.img_size,
             teacher.data.img_size, teacher.model.vision.img_size}
    assert len(sizes) == 1, f"{tier}: one image size for frames, student and teacher, got {sizes}"
    assert pretrain.model.vision.patch_size == pretrain.model.teacher.patch_size  # the warm start copies the stem


def test_a_teacher_of_other_sizes_is_trained_again_and_a_matching_one_reused(tmp_path, monkeypatch):
    import stmvl.tasks.runs
    from stmvl.demo import TEACHER_SIZES, run_teacher, teacher_mismatch
    from stmvl.tasks.pretrain import load_run_config

    trained = []

    def fake_train_teacher(cfg):
        trained.append(cfg)
        folder = tmp_path / "teacher"
        folder.mkdir(exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        saved = {k: getattr(cfg.model.teacher, k) for k in TEACHER_SIZES}
        (folder / "config.json").write_text(json.dumps({"stmvl_config_type": "TeacherConfig", "config": saved}))
        return {"flops": {"train": 5}}

    monkeypatch.setattr(stmvl.tasks.runs, "train_teacher", fake_train_teacher)
    assert run_teacher(tmp_path, [])["flops"] == 5
    assert run_teacher(tmp_path, []) == {"seconds": 0.0, "flops": 0}, "same sizes: reused"
    assert len(trained) == 1
    # a teacher of an earlier demo at 64 px: named and trained again at the recipe's size
    size = load_run_config("teacher/demo").model.teacher.img_size
    assert size != 64
    assert run_teacher(tmp_path, ["model.teacher.img_size=64"])["flops"] == 5 and len(trained) == 2
    assert teacher_mismatch(tmp_path / "teacher", load_run_config("teacher/demo").model.teacher) == [
        f"img_size 64 -> {size}"]
    assert run_teacher(tmp_path, [])["flops"] == 5 and len(trained) == 3
    assert trained[-1].model.teacher.img_size == size
    # the quick tier's teacher left in a folder the full tier then uses: the tiers differ in image size
    full_size = load_run_config("teacher/demo_full").model.teacher.img_size
    assert full_size != size
    assert run_teacher(tmp_path, [], "teacher/demo_full")["flops"] == 5 and len(trained) == 4
    assert trained[-1].model.teacher.img_size == full_size
    assert run_teacher(tmp_path, [], "teacher/demo_full") == {"seconds": 0.0, "flops": 0}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's state from /proc")
def test_a_side_by_side_child_ends_when_the_demo_process_is_killed(tmp_path):
    # the pool run_side_by_side uses, in a parent that is then killed as a scheduler would (SIGTERM)
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time, multiprocessing\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from stmvl.demo import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=exit_with_parent, initargs=(0.1,))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child), "the child runs while its parent does"
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the child outlived the killed demo process"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's exit may stay unreaped where PID 1 is not an init)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status
