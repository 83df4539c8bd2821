"""One rule for every `stmvl` command: a user error is ONE stderr line `stmvl <command>: error: <message>` and exit
code 2; anything else prints its traceback and a line saying it is a bug in stmvl, exit code 1. Each test builds the
hostile input and checks the exact outcome through `stmvl.cli.main` (as the `stmvl` script runs it) or a real
`stmvl` process."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stmvl
from stmvl.cli import COMMANDS, main
from stmvl.commands.rule import command, configure_logging, run_command
from stmvl.config import ConfigError
from stmvl.errors import CorruptWeightsError, UserError
from stmvl.models.config import LossConfig
from stmvl.models.stm import STMModel
from stmvl.models.weights import save_model
from tiny_recipe import tiny_inference_config

SRC = Path(__file__).resolve().parents[1] / "src" / "stmvl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = STMModel(tiny_inference_config())
    return save_model(model, model.cfg, tmp_path_factory.mktemp("cli") / "model",
                      extra={"inference": {"num_frames": 2, "img_size": 32}})


@pytest.fixture(scope="module")
def corrupt_dir(model_dir, tmp_path_factory):
    """A copy of the model folder whose model.safetensors is cut to a third (a torn download)."""
    folder = tmp_path_factory.mktemp("corrupt") / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    weights = (model_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    return folder


def _err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _one_error(capsys, command_name: str) -> str:
    """The single stderr line a user error must print; returns its message part."""
    err = _err_lines(capsys)
    prefix = f"stmvl {command_name}: error: "
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0][len(prefix):]


# ----------------------------------------------------------------------------------------------- the rule itself


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    def raises(exc):
        def main_(argv):
            raise exc
        return main_

    cases = [
        (UserError("annotations.json: record 3: 'caption' is empty"), "annotations.json: record 3: 'caption' is empty"),
        (ConfigError("optim.lr: nan is not a finite number\n(second line)"),
         "optim.lr: nan is not a finite number; (second line)"),
        (FileNotFoundError(2, "No such file or directory", str(tmp_path / "nowhere.json")),
         f"{tmp_path / 'nowhere.json'}: No such file or directory"),
        (PermissionError(13, "Permission denied", "/root/secret.json"), "/root/secret.json: Permission denied"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
         "input is not UTF-8 text (invalid start byte at byte 0)"),
    ]
    for exc, message in cases:
        assert run_command("check-data", raises(exc), []) == 2
        assert _err_lines(capsys) == [f"stmvl check-data: error: {message}"]


def test_a_bug_prints_its_traceback_and_says_it_is_a_bug(capsys):
    def broken(argv):
        return {}["missing"]  # a KeyError inside stmvl is stmvl's fault, never the user's

    assert run_command("search", broken, []) == 1
    err = _err_lines(capsys)
    assert err[0] == "Traceback (most recent call last):" and "KeyError: 'missing'" in err
    assert err[-1] == ("stmvl search: internal error: this is a bug in stmvl, not a problem with your input; please "
                       "report it to the stmvl issue tracker with the traceback above and the command line (stmvl "
                       f"{stmvl.__version__}, Python {platform.python_version()}, torch {torch.__version__})")


def test_help_interrupt_and_decorated_functions(capsys):
    assert run_command("x", lambda argv: (_ for _ in ()).throw(SystemExit(0)), []) == 0
    assert run_command("x", lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()), []) == 130
    assert _err_lines(capsys) == ["stmvl x: interrupted"]

    @command("thing")
    def thing_main(argv):
        raise UserError(f"bad {argv[0]}")

    assert thing_main(["value"]) == 2 and _err_lines(capsys) == ["stmvl thing: error: bad value"]


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert _err_lines(capsys) == [f"stmvl: error: unknown command 'frobnicate'; commands: {', '.join(COMMANDS)}"]
    assert main(["--help"]) == 0 and "commands:" in capsys.readouterr().out


def test_argument_errors_are_one_line_for_every_command(capsys):
    cases = {
        # (argparse's intermixed parsing lists the optional overrides too)
        "pretrain": ([], "the following arguments are required: recipe, overrides"),
        "train-teacher": ([], "the following arguments are required: recipe, overrides"),
        "finetune": (["finetune/ret_synthetic"], "the following arguments are required: --checkpoint"),
        "evaluate": (["demo"], "the following arguments are required: --checkpoint"),
        "search": (["a query"], "the following arguments are required: --checkpoint, --videos"),
        "show-masks": (["--checkpoint", "m"], "the following arguments are required: --video, --out"),
        "convert": (["umt"], "the following arguments are required: src, out"),
        "synth": ([], "the following arguments are required: --out"),
        "check-data": (["--workers", "2"], "the following arguments are required: annotation"),
        "shards": ([], "the following arguments are required: action"),
    }
    for name, (argv, message) in cases.items():
        assert main([name, *argv]) == 2, name
        assert _one_error(capsys, name) == f"{message} (see `stmvl {name} --help`)"
    # a sub-command's parser follows the rule too, naming itself
    assert main(["shards", "write", "a.json", "--out", "o"]) == 2
    assert _one_error(capsys, "shards") == ("the following arguments are required: --media-root (see `stmvl shards "
                                            "write --help`)")
    assert main(["search", "--checkpoint", "m", "--videos", "v", "q", "--top", "many"]) == 2
    assert _one_error(capsys, "search") == ("argument --top: invalid int value: 'many' (see `stmvl search --help`)")


def test_library_logging_goes_to_stderr_once(capsys):
    configure_logging("search")
    configure_logging("search")  # a second command in the same process: still one handler
    logging.getLogger("stmvl.api").info("note %d", 1)
    logging.getLogger("stmvl.api").warning("careful")
    assert _err_lines(capsys) == ["stmvl search: note 1", "stmvl search: warning: careful"]


def test_the_library_never_imports_the_command_layer():
    """Only stmvl.cli and stmvl.commands itself import stmvl.commands; library modules expose plain functions."""
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "cli.py" or rel.startswith("commands/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}: {n}" for n in names if n == "stmvl.commands" or n.startswith("stmvl.commands.")]
    assert offenders == []
    assert not (SRC / "train" / "commands.py").exists()
    for name, (module, func, _) in COMMANDS.items():
        assert module.startswith("stmvl.commands."), name
    for module in ("synth", "check", "shards"):  # the data modules keep plain library functions only
        assert not hasattr(importlib.import_module(f"stmvl.data.{module}"), "cli_main"), module


# ----------------------------------------------------------------------------- recipes: pretrain / train-teacher


@pytest.mark.parametrize("override, message", [
    ("model.mask.video_ratio=1.0", "model.mask.video_ratio: 1.0 is outside the allowed range [0.0, 1.0)"),
    ("model.mask.video_ratio=.nan", "model.mask.video_ratio: nan is not a finite number"),
    ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
    ("optim.weight_decay=.inf", "optim.weight_decay: inf is not a finite number"),
    ("optim.eps=0", "optim.eps: 0.0 is outside the allowed range (0.0, 1.0]"),
    ("optim.eps=-1e-8", "optim.eps: -1e-08 is outside the allowed range (0.0, 1.0]"),
    ("optim.eps=2", "optim.eps: 2.0 is outside the allowed range (0.0, 1.0]"),
    ("model.vision.width=1000000", "model.vision.width: 1000000 is outside the allowed range [1, 8192]"),
    ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'lr'?); allowed keys under optim: "),
    ("model.teacher.return_layers=5", "model.teacher.return_layers (5) exceeds model.teacher.layers (4)"),
    ("model.vision.depth=1", "model.teacher.return_layers (2) exceeds the student depth model.vision.depth (1): one "
                             "decoder per returned layer sits on a student block"),
    ("model.decoder=linear", "model.decoder 'linear' only predicts visible tokens: set model.mvm_tokens=visible or "
                             "model.decoder=st"),
    # a zero weight would reach the batch mixer and fail there as an internal error
    ("data.corpora.1.weight=0", "data.corpora.1.weight: 0.0 is outside the allowed range (0.0, inf]"),
    ("model.vision.warm_start=clip", "model.vision.warm_start: 'clip' is not allowed; allowed values: none, teacher"),
    ("model.vision.pos_embed=2d", "model.vision.pos_embed: '2d' is not allowed; allowed values: 1d, 3d, learned"),
    ("model.vision.lr_scale=-1", "model.vision.lr_scale: -1.0 is outside the allowed range [0.0, inf]"),
    ("model.vision.warm_start=teacher model.vision.width=192 model.vision.heads=4",
     "model.vision.warm_start=teacher needs a student shaped like the teacher: model.vision.width 192 != "
     "model.teacher.width 128; student MLP width 768 != teacher MLP width 512"),
    ("model.vision.warm_start=teacher model.teacher.weights=null",
     "model.vision.warm_start=teacher copies the trained teacher into the student: set model.teacher.weights (in a "
     "run that builds the teacher), or model.vision.warm_start=none"),
])
def test_bad_values_are_refused_before_anything_runs(override, message, capsys):
    assert main(["pretrain", "demo", *override.split(), "--dry-run"]) == 2
    got = _one_error(capsys, "pretrain")
    assert got == message if not message.endswith(": ") else got.startswith(message), got


def test_training_flags_become_runtime_keys():
    from stmvl.commands.recipes import recipe_parser, run_config

    args = recipe_parser("pretrain", "").parse_intermixed_args(["demo", "--overwrite", "--out", "runs/x",
                                                                "optim.max_steps=3"])
    cfg = run_config(args)
    assert (cfg.runtime.overwrite, cfg.runtime.resume, cfg.runtime.out_dir, cfg.optim.max_steps) == (
        True, False, "runs/x", 3)


def test_sizes_whose_product_is_absurd_are_refused_by_name(capsys):
    assert main(["pretrain", "demo", "model.vision.width=8192", "model.vision.heads=64", "model.vision.depth=256",
                 "--dry-run"]) == 2
    got = _one_error(capsys, "pretrain")
    assert got.startswith("model: the sizes ask for about 2.1e+11 parameters (vision 2.1e+11, "), got
    assert got.endswith("more than the 4e+09 stmvl builds; check model.vision / teacher / text sizes")


def test_malformed_non_utf8_and_alias_bomb_recipes(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [1, 2\n", encoding="utf-8")
    assert main(["pretrain", str(broken), "--dry-run"]) == 2
    assert _one_error(capsys, "pretrain").startswith(
        f"{broken}: line 3, column 1: malformed YAML (")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("description: caf\xe9\n".encode("latin-1"))
    assert main(["train-teacher", str(latin), "--dry-run"]) == 2
    assert _one_error(capsys, "train-teacher") == f"{latin}: not UTF-8 text (invalid continuation byte at byte 16)"
    # 7 levels of 10-fold aliases: 10^7 nodes if expanded; refused at the first alias, instantly
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["pretrain", str(bomb), "--dry-run"]) == 2
    assert _one_error(capsys, "pretrain") == (f"{bomb}: line 2: YAML aliases (*a0) are not supported in recipes; "
                                              "write the value out or use `extends:` / ${...} references")
    assert main(["pretrain", str(tmp_path / "absent.yaml")]) == 2
    assert _one_error(capsys, "pretrain").startswith(f"recipe '{tmp_path / 'absent.yaml'}' not found (looked at ")


def test_a_real_stmvl_process_prints_one_line_and_exits_2(tmp_path):
    """The installed entry point (`python -m stmvl.cli`, as the `stmvl` script): exit code and the whole stderr."""
    done = subprocess.run([sys.executable, "-m", "stmvl.cli", "pretrain", "demo", "model.mask.video_ratio=1.0",
                           "--dry-run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("stmvl pretrain: error: model.mask.video_ratio: 1.0 is outside the allowed range "
                           "[0.0, 1.0)\n")


# ------------------------------------------------------------------------------------------------ model folders


def test_search_with_a_corrupt_model_file(corrupt_dir, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    assert main(["search", "--checkpoint", str(corrupt_dir), "--videos", str(videos), "a red circle"]) == 2
    assert _one_error(capsys, "search").startswith(f"{corrupt_dir / 'model.safetensors'}: not a readable "
                                                   "safetensors file (")
    assert main(["search", "--checkpoint", str(corrupt_dir.parent), "--videos", str(videos), "   "]) == 2
    assert _one_error(capsys, "search") == "the search query is empty"
    assert main(["search", "--checkpoint", str(corrupt_dir), "--videos", str(videos), "q", "--top", "0"]) == 2
    assert _one_error(capsys, "search") == "--top must be at least 1, got 0"


def test_search_with_a_missing_videos_folder_and_device(model_dir, tmp_path, capsys):
    assert main(["search", "--checkpoint", str(model_dir), "--videos", str(tmp_path / "none"), "q"]) == 2
    assert _one_error(capsys, "search") == f"videos folder not found: {tmp_path / 'none'}"
    assert main(["search", "--checkpoint", str(model_dir), "--videos", str(tmp_path), "q", "--device", "tpu"]) == 2
    assert _one_error(capsys, "search") == "--device 'tpu': use cpu, cuda or cuda:N"


def test_evaluate_with_a_corrupt_model_file(corrupt_dir, tmp_path, capsys):
    assert main(["evaluate", "demo", "--checkpoint", str(corrupt_dir), "--out", str(tmp_path / "ev"),
                 "runtime.device=cpu"]) == 2
    assert _one_error(capsys, "evaluate").startswith(f"{corrupt_dir / 'model.safetensors'}: not a readable "
                                                     "safetensors file (")
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_show_masks_with_a_corrupt_model_file_and_bad_options(corrupt_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "m.png"
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00not a video" * 50)
    assert main(["show-masks", "--checkpoint", str(corrupt_dir), "--video", str(video), "--out", str(out)]) == 2
    assert _one_error(capsys, "show-masks").startswith(f"{corrupt_dir / 'model.safetensors'}: not a readable ")
    assert main(["show-masks", "--checkpoint", str(model_dir), "--video", str(video), "--out", str(out)]) == 2
    assert _one_error(capsys, "show-masks").startswith(f"{video}: ")  # the MediaError names the file
    assert main(["show-masks", "--checkpoint", str(model_dir), "--video", str(video), "--out", str(out),
                 "--ratio", "1.0"]) == 2
    assert _one_error(capsys, "show-masks") == "--ratio must lie in [0, 1), got 1.0"
    assert not out.exists()


def test_convert_with_corrupt_and_missing_sources(tmp_path, capsys):
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    assert main(["convert", "umt", str(torn), str(tmp_path / "out")]) == 2
    assert _one_error(capsys, "convert").startswith(f"{torn}: not a readable safetensors file (")
    pickled = tmp_path / "args.pth"
    # training arguments pickled beside the weights: refused by weights_only=True, never unpickled
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1e-4)}, pickled)
    assert main(["convert", "umt", str(pickled), str(tmp_path / "out")]) == 2
    assert _one_error(capsys, "convert").startswith(f"{pickled}: cannot be read as a weights-only torch checkpoint")
    assert not (tmp_path / "out").exists()


def _folder_with(model_dir: Path, tmp_path: Path, name: str, change) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    meta = json.loads((model_dir / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def test_model_config_json_is_validated_before_anything_is_allocated(model_dir, tmp_path, capsys, monkeypatch):
    """config.json gets the recipes' typed validation: a width of 10^6 is a one-line error naming the key and the
    file, and no model is built (STMModel is never constructed)."""
    built = []
    monkeypatch.setattr(STMModel, "__init__", lambda self, *a, **k: built.append(1) or (_ for _ in ()).throw(
        AssertionError("a model was built")))

    def width(meta):
        meta["config"]["vision"]["width"] = 10**6

    def depth_type(meta):
        meta["config"]["text"]["layers"] = "twelve"

    def budget(meta):
        meta["config"]["vision"].update(width=8192, heads=64, depth=256)

    def ratio(meta):
        meta["config"]["mask"]["video_ratio"] = float("nan")

    def vocab(meta):
        meta["config"]["text"]["vocab_size"] = 10**9

    cases = [
        (width, "config.vision.width: 1000000 is outside the allowed range [1, 8192]"),
        (depth_type, "config.text.layers: expected int, got str 'twelve'"),
        (budget, "config: the sizes ask for about 2.1e+11 parameters"),
        (ratio, "config.mask.video_ratio: nan is not a finite number"),
        (vocab, "config.text.vocab_size: 1000000000 is outside the allowed range [1, 1000000]"),
    ]
    for i, (change, message) in enumerate(cases):
        folder = _folder_with(model_dir, tmp_path, f"f{i}", change)
        for cmd in (["search", "--checkpoint", str(folder), "--videos", str(tmp_path), "q"],
                    ["evaluate", "demo", "--checkpoint", str(folder), "--out", str(tmp_path / "ev")],
                    ["show-masks", "--checkpoint", str(folder), "--video", str(folder / "x.mp4"), "--out", "x.png"]):
            assert main(cmd) == 2, cmd
            assert _one_error(capsys, cmd[0]).startswith(f"{folder / 'config.json'}: {message}")
    assert built == []


def test_finetune_validates_the_checkpoint_config_first(model_dir, tmp_path, capsys):
    folder = _folder_with(model_dir, tmp_path, "wide", lambda m: m["config"]["teacher"].update(width=10**6))
    assert main(["finetune", "finetune/ret_synthetic", "--checkpoint", str(folder), f"paths.data={tmp_path}",
                 "--out", str(tmp_path / "run")]) == 2
    assert _one_error(capsys, "finetune") == (f"{folder / 'config.json'}: config.teacher.width: 1000000 is outside "
                                              "the allowed range [1, 8192]")
    assert not (tmp_path / "run").exists()


def test_missing_groups_may_only_name_groups_inference_does_not_use(model_dir, tmp_path, capsys):
    folder = _folder_with(model_dir, tmp_path, "groups",
                          lambda m: m.update(missing_groups={"decoders": "not converted", "vision": "forgot it"}))
    assert main(["search", "--checkpoint", str(folder), "--videos", str(tmp_path), "q"]) == 2
    assert _one_error(capsys, "search") == (f"{folder / 'config.json'}: missing_groups may only name teacher, "
                                            "decoders (groups inference does not use); ['vision'] would be left at "
                                            "random weights")


@pytest.mark.parametrize("name, payload, message", [
    ("latin", "{\"config\": \"caf\xe9\"}".encode("latin-1"), "not UTF-8 text (invalid continuation byte at byte 15)"),
    ("torn", b"{\"stmvl_config_type\": \"ModelConfig\", \"con", "not valid JSON (line 1, column 38: "
                                                              "Unterminated string starting at)"),
    ("deep", b"[" * 100000 + b"]" * 100000, "JSON nested too deeply to be a config"),
    ("list", b"[1, 2]", "expected a JSON object, got list"),
])
def test_unreadable_config_json_names_the_file(model_dir, tmp_path, capsys, name, payload, message):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    (folder / "config.json").write_bytes(payload)
    assert main(["search", "--checkpoint", str(folder), "--videos", str(tmp_path), "q"]) == 2
    assert _one_error(capsys, "search") == f"{folder / 'config.json'}: {message}"


def test_inference_settings_and_build_kwargs_are_checked(model_dir, tmp_path, capsys):
    from stmvl.models.weights import load_model_dir

    folder = _folder_with(model_dir, tmp_path, "inf", lambda m: m.update(inference={"num_frames": "four"}))
    assert main(["search", "--checkpoint", str(folder), "--videos", str(tmp_path), "q"]) == 2
    assert _one_error(capsys, "search") == (f"{folder / 'config.json'}: inference.num_frames must be an integer in "
                                            "[1, 1024], got 'four'")
    text_dir = tmp_path / "text"
    save_model(STMModel(tiny_inference_config()).text, tiny_inference_config().text, text_dir)
    meta = json.loads((text_dir / "config.json").read_text())
    (text_dir / "config.json").write_text(json.dumps(dict(meta, kwargs={"cross_width": 10**6})))
    with pytest.raises(ConfigError, match=r"kwargs.cross_width must be null or an integer in \[1, 8192\], got "
                                          r"1000000"):
        load_model_dir(text_dir)


def test_other_failures_name_their_file_not_a_traceback(corrupt_dir, capsys):
    """A corrupt weights file is a CorruptWeightsError: a UserError (exit 2), not a bug."""
    assert issubclass(CorruptWeightsError, UserError)
    from stmvl.api import ModelDirError
    from stmvl.models.weights import WeightLoadError

    assert issubclass(ModelDirError, UserError) and issubclass(ModelDirError, RuntimeError)
    assert issubclass(WeightLoadError, UserError) and issubclass(ConfigError, UserError)


def test_demo_follows_the_rule(capsys):
    assert main(["demo", "--seeds", "0"]) == 2
    assert _err_lines(capsys) == ["stmvl demo: error: --seeds must be at least 1"]
    assert main(["demo", "--compare", "--jobs", "0"]) == 2
    assert _err_lines(capsys) == ["stmvl demo: error: --jobs must be at least 1"]


def test_library_modules_report_through_logging_not_print():
    """No print() in the library outside the command layer (train/ reports through its own loggers and progress
    streams)."""
    skip = ("cli.py",)
    printing = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel in skip or rel.startswith(("commands/", "train/")):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{rel}:{node.lineno}")
    assert printing == []


def test_library_notes_are_logged_and_shown_by_the_command(model_dir, tmp_path, caplog, capsys):
    """load_model's note about a folder without teacher weights is a log record (no stderr from the library);
    under a command the one handler shows it as `stmvl <command>: ...`."""
    from safetensors.torch import load_file, save_file

    from stmvl.api import load_model

    cfg = dataclasses.replace(tiny_inference_config(), loss=LossConfig(mlm=0.0))  # MVM on: a teacher is built
    full = save_model(STMModel(cfg), cfg, tmp_path / "full", extra={"inference": {"num_frames": 2, "img_size": 32}})
    slim = tmp_path / "slim"
    slim.mkdir()
    save_file({k: v for k, v in load_file(full / "model.safetensors").items() if not k.startswith("teacher.")},
              slim / "model.safetensors")
    (slim / "config.json").write_bytes((full / "config.json").read_bytes())
    logging.getLogger("stmvl").handlers = [h for h in logging.getLogger("stmvl").handlers
                                           if not getattr(h, "_stmvl_console", False)]
    with caplog.at_level(logging.INFO, logger="stmvl"):
        model = load_model(slim)
    assert not model.teacher_loaded and capsys.readouterr().err == ""
    assert any("'teacher' tensors not in the checkpoint" in r.getMessage() and r.name == "stmvl.api"
               for r in caplog.records)
    videos = tmp_path / "videos"
    videos.mkdir()
    assert main(["search", "--checkpoint", str(slim), "--videos", str(videos), "a query"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"stmvl search: {slim}: " in err[0] and "'teacher' tensors not in the checkpoint" in err[0], err


def test_finetune_initialisation_from_a_corrupt_model_file_is_a_user_error(corrupt_dir):
    """finetune reads the checkpoint's weights in load_pretrained: a torn file is a CorruptWeightsError naming it,
    which every command turns into one line and exit 2."""
    from stmvl.commands.rule import user_error_message
    from stmvl.tasks.finetune import load_pretrained

    with pytest.raises(CorruptWeightsError) as error:
        load_pretrained(corrupt_dir, tiny_inference_config(), drop={})
    assert user_error_message(error.value).startswith(f"{corrupt_dir / 'model.safetensors'}: not a readable "
                                                      "safetensors file (")


@pytest.mark.parametrize("name, argv, message", [
    ("synth", ["--size", "31"], "--size must be an even number in [32, 4096], got 31"),
    ("synth", ["--frames", "1"], "--frames must lie in [2, 10000], got 1"),
    ("synth", ["--train", "-1"], "--train must lie in [0, 10000000], got -1"),
    ("synth", ["--workers", "0"], "--workers must lie in [1, 1024], got 0"),
    ("check-data", ["--workers", "0"], "--workers must lie in [1, 1024], got 0"),
    ("check-data", ["--min-frames", "0"], "--min-frames must be at least 1, got 0"),
    ("check-data", ["--max-video-seconds", "nan"], "--max-video-seconds must be a positive number, got nan"),
    ("check-data", ["--max-image-pixels", "0"],
     "--max-image-pixels and --max-video-pixels must be at least 1, got 0 and 33177600"),
    ("shards", ["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    ("shards", ["--quality", "101"], "--quality must lie in [1, 100], got 101"),
    ("shards", ["--predecode", "0"], "--predecode must lie in [1, 1024], got 0"),
    ("shards", ["--short-side", "4"], "--short-side must lie in [16, 4096], got 4"),
])
def test_data_commands_refuse_bad_numbers_before_any_work(tmp_path, capsys, name, argv, message):
    required = {"synth": ["--out", str(tmp_path / "out")],
                "check-data": [str(tmp_path / "a.json"), "--media-root", str(tmp_path)],
                "shards": ["write", str(tmp_path / "a.json"), "--media-root", str(tmp_path), "--out",
                           str(tmp_path / "out")]}[name]
    assert main([name, *required, *argv]) == 2
    assert _one_error(capsys, name) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, nothing read


def test_data_commands_refuse_an_output_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert main(["synth", "--out", str(tmp_path / "taken"), "--train", "1"]) == 2
    assert _one_error(capsys, "synth") == f"--out {tmp_path / 'taken'}: exists and is not a folder"
    assert main(["shards", "write", str(tmp_path / "a.json"), "--media-root", str(tmp_path), "--out",
                 str(tmp_path / "taken")]) == 2
    assert _one_error(capsys, "shards") == f"--out {tmp_path / 'taken'}: exists and is not a folder"
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_data_commands_follow_the_rule(tmp_path, capsys):
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"video": "a.mp4", "caption": "caf\xe9"}]'.encode("latin-1"))
    for name, argv in (("check-data", [str(latin), "--media-root", str(tmp_path)]),
                       ("check-data", [str(tmp_path / "absent.json"), "--media-root", str(tmp_path)]),
                       ("shards", ["write", str(tmp_path / "absent.json"), "--media-root", str(tmp_path), "--out",
                                   str(tmp_path / "shards")])):
        assert main([name, *argv]) == 2
        assert str(tmp_path) in _one_error(capsys, name)
