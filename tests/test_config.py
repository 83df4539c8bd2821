"""Run config: schema validation, recipes with `extends:`, dotted overrides, interpolation, save/load."""

from __future__ import annotations

import pytest

from stmvl.config import (
    ConfigError,
    CorpusConfig,
    RunConfig,
    config_to_dict,
    from_dict,
    list_recipes,
    load_config,
    save_config,
)

EXPECTED_RECIPES = {
    "demo", "pretrain/stm_b16_5m", "pretrain/stm_b16_17m", "pretrain/stm_b16_25m", "pretrain/stm_l16_25m",
    "pretrain/umt_b16_5m", "zeroshot/ret_msrvtt", "zeroshot/ret_didemo", "zeroshot/ret_anet", "zeroshot/ret_lsmdc",
    "zeroshot/ret_msvd",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_RECIPES))
def test_every_packaged_recipe_loads_and_validates(name, tmp_path):
    cfg = load_config(name, [f"paths.data={tmp_path}"])
    assert isinstance(cfg, RunConfig)
    for corpus in cfg.data.corpora + cfg.eval.corpora:
        assert "${" not in corpus.annotation and corpus.annotation.startswith(str(tmp_path))


def test_recipe_list_is_complete():
    assert EXPECTED_RECIPES <= set(list_recipes())


def test_reference_settings_of_the_paper_recipes():
    b5 = load_config("pretrain/stm_b16_5m")
    o = b5.optim
    assert (o.lr, o.weight_decay, o.betas, o.epochs, o.warmup_epochs, o.min_lr_ratio) == (
        1e-4, 0.02, (0.9, 0.999), 15, 2.0, 0.01)
    d = b5.data
    assert (d.video_batch_size, d.image_batch_size, d.num_frames, d.img_size) == (32, 128, 4, 224)
    assert [c.name for c in b5.data.corpora] == ["webvid_2m", "cc3m"]
    assert (b5.model.mask.video_ratio, b5.model.mask.image_ratio, b5.model.mask.video_strategy) == (0.7, 0.5, "stm")
    assert len(load_config("pretrain/stm_b16_17m").data.corpora) == 6
    assert load_config("pretrain/stm_b16_25m").data.corpora[0].name == "webvid_10m"
    large = load_config("pretrain/stm_l16_25m").model
    assert (large.vision.width, large.teacher.img_size, large.teacher.patch_size, large.text.fusion_start,
            large.embed_dim) == (1024, 196, 14, 19, 768)
    umt = load_config("pretrain/umt_b16_5m").model
    assert (umt.mask.video_strategy, umt.mask.video_ratio, umt.mvm_tokens, umt.decoder, umt.pass2_tokens) == (
        "attention", 0.8, "visible", "linear", "visible")
    lengths = {n: load_config(f"zeroshot/ret_{n}").eval for n in ("msrvtt", "lsmdc", "msvd", "didemo", "anet")}
    assert {n: e.text_max_length for n, e in lengths.items()} == {
        "msrvtt": 32, "lsmdc": 64, "msvd": 64, "didemo": 64, "anet": 150}
    assert all((e.num_frames, e.sampling, e.k_test) == (4, "middle", 128) for e in lengths.values())
    demo = load_config("demo")
    assert (demo.model.vision.stem, demo.model.text.fusion_start, demo.data.img_size, demo.optim.precision) == (
        "diff", 4, 40, "auto")
    assert demo.model.loss.temporal_negatives and demo.model.loss.foil_negatives and not demo.data.flip


def test_overrides_parse_values_with_yaml_not_eval():
    cfg = load_config("demo", ["optim.lr=2e-5", "optim.betas=[0.8, 0.9]", "optim.clip_grad=null",
                               "data.corpora.0.weight=3", "model.mask.video_strategy=random", "runtime.resume=true"])
    assert cfg.optim.lr == 2e-5 and cfg.optim.betas == (0.8, 0.9) and cfg.optim.clip_grad is None
    assert cfg.data.corpora[0].weight == 3.0 and cfg.model.mask.video_strategy == "random" and cfg.runtime.resume
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got str \"__import__\('os'\)\""):
        load_config("demo", ["optim.lr=__import__('os')"])


def test_unknown_override_names_the_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["optim.lrr=1e-3"])
    msg = str(err.value)
    assert "unknown key 'optim.lrr'" in msg and "did you mean 'lr'" in msg and "weight_decay" in msg
    with pytest.raises(ConfigError, match="unknown key 'model.mask.video_stratgy'.*did you mean 'video_strategy'"):
        load_config(None, ["model.mask.video_stratgy=stm"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not an index of a list of 2 items"):
        load_config("demo", ["data.corpora.5.weight=1"])


def test_wrong_types_and_choices_name_key_and_allowed_values():
    with pytest.raises(ConfigError, match="model.mask.video_strategy: 'tubes' is not allowed.*did you mean 'tube'"
                                          ".*random, tube, attention, attention_inverse, stm"):
        load_config(None, ["model.mask.video_strategy=tubes"])
    for override, pattern in [
        ("optim.epochs=ten", "optim.epochs: expected int | None, got str 'ten'"),
        ("runtime.compile=1", "runtime.compile: expected bool, got int 1"),
        ("optim.betas=[0.9]", r"optim.betas: expected 2 values"),
        ("optim.precision=fp8", "optim.precision: 'fp8' is not allowed; allowed values: auto, bf16, fp16, fp32"),
        ("model.vision.stem=flow", "model.vision.stem.*allowed values: rgb, diff, tubelet2"),
        ("model.pass2_tokens=some", "model.pass2_tokens.*masked, visible, all"),
        ("model.teacher.input_norm=x", "model.teacher.input_norm.*clip, imagenet, none"),
        ("model.mask.logits=x", "model.mask.logits.*log, reference"),
        ("model.decoder=mlp", "model.decoder.*st, linear"),
        ("model.mvm_tokens=x", "model.mvm_tokens.*all, visible"),
        ("eval.itm=sometimes", "eval.itm: 'sometimes' is not allowed; allowed values: every, final, never"),
        ("model.mask.video_ratio=1.5", r"model.mask.video_ratio: 1.5 is outside the allowed range \[0.0, 1.0\)"),
        ("data.corpora=[{name: a, annotation: x, media_type: audio}]", "data.corpora.0.media_type: 'audio'"),
        ("task=pretrian", "task: 'pretrian' is not allowed.*did you mean 'pretrain'"),
        ("optim.max_steps=1e3", None),
    ]:
        if pattern is None:
            assert load_config(None, [override]).optim.max_steps == 1000
            continue
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, [override])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="optim.epochs and optim.max_steps are both null"):
        load_config(None, ["optim.epochs=null"])
    with pytest.raises(ConfigError, match="fusion_start \\(7\\) exceeds model.text.layers \\(6\\)"):
        load_config("demo", ["model.text.fusion_start=7"])
    with pytest.raises(ConfigError, match="data.corpora: corpus names must be unique, repeated: a"):
        load_config(None, ["data.corpora=[{name: a, annotation: x}, {name: a, annotation: y}]"])
    with pytest.raises(ConfigError,
                       match="eval.best_key 'msrvtt/itm/r_mean' is an ITM number, but eval.itm is 'final'"):
        load_config("finetune/ret_msrvtt", ["eval.itm=final"])
    assert load_config("finetune/ret_msrvtt", ["eval.itm=final", "eval.best_key=msrvtt/itc/r_mean"]).eval.itm == "final"


def test_extends_deep_merges_and_detects_cycles(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "optim: {lr: 3.0e-4, epochs: 2}\nruntime: {out_dir: '${paths.data}/${env:STMVL_TEST_RUN}'}\n")
    (tmp_path / "sub" / "child.yaml").write_text(
        "extends: [demo, ../base.yaml]\noptim: {epochs: 4}\npaths: {data: /d}\n")
    monkeypatch.setenv("STMVL_TEST_RUN", "r1")
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"), ["optim.weight_decay=0.1"])
    # base (listed last) wins over demo; the child wins over both; untouched keys keep demo's values
    demo_steps = load_config("demo").optim.max_steps
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.weight_decay, cfg.optim.max_steps) == (3e-4, 4, 0.1, demo_steps)
    assert cfg.model.vision.stem == "diff"
    assert cfg.runtime.out_dir == "/d/r1"
    assert cfg.data.synthetic.dir == "/d/synthetic"
    monkeypatch.delenv("STMVL_TEST_RUN")
    with pytest.raises(ConfigError, match="environment variable 'STMVL_TEST_RUN'"):
        load_config(str(tmp_path / "sub" / "child.yaml"))
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="recipe 'nope' not found.*packaged recipes: demo"):
        load_config("nope")
    (tmp_path / "bad.yaml").write_text("runtime: {out_dir: '${paths.nothere}'}\n")
    with pytest.raises(ConfigError, match=r"runtime.out_dir: interpolation \$\{paths.nothere\}"):
        load_config(str(tmp_path / "bad.yaml"))


def test_save_config_round_trips(tmp_path):
    cfg = load_config("pretrain/stm_l16_25m", ["optim.lr=2e-5"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(str(tmp_path / "run" / "config.yaml"))
    assert again == cfg
    assert config_to_dict(again)["optim"]["betas"] == [0.9, 0.999]


def test_from_dict_reports_nested_paths():
    with pytest.raises(ConfigError, match="data.corpora.1: expected a mapping for CorpusConfig, got str 'x'"):
        from_dict(RunConfig, {"data": {"corpora": [{"name": "a", "annotation": "b"}, "x"]}})
    assert from_dict(CorpusConfig, {"name": "n", "weight": "0.5"}).weight == 0.5


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
    ("optim.weight_decay=.inf", "optim.weight_decay: inf is not a finite number"),
    ("model.mask.video_ratio=.nan", "model.mask.video_ratio: nan is not a finite number"),
    ("model.mask.video_ratio=1.0", r"model.mask.video_ratio: 1.0 is outside the allowed range \[0.0, 1.0\)"),
    ("optim.eps=0", r"optim.eps: 0.0 is outside the allowed range \(0.0, 1.0\]"),
])
def test_non_finite_and_out_of_range_numbers_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_malformed_yaml_and_alias_bombs_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+: malformed YAML"):
        load_config(str(broken))
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]" for i in range(1, 8)]
    bomb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bomb.yaml: line 2: YAML aliases \(\*a0\) are not supported"):
        load_config(str(bomb))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8 text"):
        load_config(str(latin))
