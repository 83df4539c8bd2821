"""The frozen text-state cache (model.text.cache_states): the same states and losses as the text-only layers, each
caption encoded once, fewer FLOPs per step by exactly the text-only forwards it saves, and the pretraining task's
prepare hook filling it from the corpora."""

import dataclasses
import json

import pytest
import torch

from stmvl.config import load_config
from stmvl.models.config import TextConfig
from stmvl.models.stm import STMModel, validate_config
from stmvl.models.text import BertEncoder, FrozenStateCache
from stmvl.tasks.pretrain import PretrainTask
from stmvl.train.flops import count_flops
from test_stm import CAPTIONS, make_batch, tiny_config
from tiny_recipe import tiny_recipe


def cached_config(**text_changes):
    cfg = tiny_config("stm")
    text = dataclasses.replace(cfg.text, freeze_below=cfg.text.fusion_start, cache_states=True, **text_changes)
    loss = dataclasses.replace(cfg.loss, temporal_negatives=True, foil_negatives=True)
    return dataclasses.replace(cfg, text=text, loss=loss)


def with_foils(model: STMModel, batch: dict) -> dict:
    foil = model.tokenizer(CAPTIONS[4:8][::-1])
    return {**batch, "foil_input_ids": foil["input_ids"], "foil_attention_mask": foil["attention_mask"]}


def test_cached_states_equal_the_text_only_layers_with_zeros_past_each_caption():
    torch.manual_seed(0)
    encoder = BertEncoder(TextConfig(vocab_size=50, hidden=32, layers=3, heads=4, intermediate=64, max_position=16,
                                     dropout=0.0, fusion_start=2)).eval()
    ids = torch.randint(5, 50, (4, 7))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    cache = FrozenStateCache()
    # first seen in another batch (other rows, other padded length), then read back
    cache.states(encoder, ids[[3, 1]][:, :3], mask[[3, 1]][:, :3])
    got = cache.states(encoder, ids, mask)
    want = encoder(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert got[~real].abs().max() == 0
    assert len(cache) == 4


def test_a_cached_caption_runs_the_text_only_layers_once():
    torch.manual_seed(0)
    model = STMModel(cached_config()).train()
    rows = []
    hook = model.text.embeddings.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        assert model.cache_captions(CAPTIONS[:6]) == 6
        assert model.cache_captions(CAPTIONS[:6]) == 0
        tokens = model.tokenizer(CAPTIONS[::-1])
        model.caption_states(tokens["input_ids"], tokens["attention_mask"])
        model.caption_states(tokens["input_ids"], tokens["attention_mask"])
        repeated = model.tokenizer(["a purple star rises"] * 3)
        model.caption_states(repeated["input_ids"], repeated["attention_mask"])
    finally:
        hook.remove()
    # the prefill, then only the two captions it did not hold, nothing on the second call, and a new caption
    # repeated in its batch once
    assert rows == [6, 2, 1]
    assert len(model.text_cache) == len(CAPTIONS) + 1


@pytest.mark.parametrize("changes, key", [({"freeze_below": 1}, "text.freeze_below"),
                                          ({"dropout": 0.1}, "text.dropout")])
def test_cache_states_needs_frozen_dropout_free_text_only_layers(changes, key):
    cfg = cached_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **changes))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_a_step_with_the_cache_gives_the_same_losses_and_gradients_for_fewer_flops():
    torch.manual_seed(0)
    model = STMModel(cached_config()).train()
    batch = with_foils(model, make_batch(model))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(batch, step=3)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.items()}, grads

    cache = model.text_cache
    model.text_cache = None
    plain_flops = count_flops(step)
    plain, plain_grads = step()
    model.text_cache = cache
    model.cache_captions(CAPTIONS)
    cached_flops = count_flops(step)
    cached, cached_grads = step()

    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-5)
    assert cached_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(cached_grads[name], plain_grads[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        text_only = count_flops(lambda: model.text(batch["input_ids"], batch["attention_mask"]))
        text_only += count_flops(lambda: model.text(batch["foil_input_ids"], batch["foil_attention_mask"]))
    assert text_only > 0
    assert plain_flops - cached_flops == text_only


def test_the_pretraining_prepare_hook_caches_every_caption_and_foil_of_the_corpora(tmp_path):
    records = [{"video": f"v{i}.mp4", "caption": CAPTIONS[i], "foil": CAPTIONS[7 - i]} for i in range(3)]
    records.append({"video": "v3.mp4", "caption": CAPTIONS[0], "foil": CAPTIONS[6]})  # a repeated caption
    (tmp_path / "train.json").write_text(json.dumps(records), encoding="utf-8")
    recipe = tiny_recipe(f'{{{{name: v, media_type: video, annotation: "{tmp_path}/train.json", '
                         f'media_root: "{tmp_path}"}}}}', "seed: 0").format()
    (tmp_path / "tiny.yaml").write_text(recipe, encoding="utf-8")
    cfg = load_config(str(tmp_path / "tiny.yaml"), ["model.text.freeze_below=1", "model.text.cache_states=true"])
    task = PretrainTask(cfg)
    model = task.build_model()
    task.prepare(model)
    distinct = {r["caption"] for r in records} | {r["foil"] for r in records}
    assert len(model.text_cache) == len(distinct) == 6
    tokens = int(model.tokenizer(sorted(distinct))["attention_mask"].sum())
    assert model.text_cache.nbytes == tokens * model.text.hidden * 4  # fp32 states of every real token


@pytest.mark.parametrize("override, message", [
    ("model.text.dropout=0.1", r"model\.text\.cache_states needs model\.text\.dropout 0 \(got 0\.1"),
    ("model.text.freeze_below=2", r"set model\.text\.freeze_below \(2\) to at least model\.text\.fusion_start \(4\)"),
])
def test_the_config_loader_names_what_the_cache_needs(override, message):
    from stmvl.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])
    load_config("demo", [override, "model.text.cache_states=false"])  # the way out the message names


def test_a_dry_run_fills_the_cache_first_so_its_step_costs_what_a_training_step_costs(tmp_path):
    """`--dry-run` (and `stmvl demo --compare`, which sets each variant's steps from dry-run counts) must count a
    step with the cache filled, as training runs it: counting the first step's caption encoding into every step
    would hand the cheaper variants too few steps."""
    from stmvl.data.synth import generate_corpus
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import dry_run, pretrain_task
    from stmvl.train.engine import unwrap_model

    generate_corpus(tmp_path, seed=0, train=8, test=2, probe=2, size=32, frames=4, workers=1)
    recipe = tiny_recipe(f'{{{{name: v, media_type: video, annotation: "{tmp_path}/annotations/train_video.json", '
                         f'media_root: "{tmp_path}"}}}}', "seed: 0, count_flops: true").format()
    (tmp_path / "tiny.yaml").write_text(recipe, encoding="utf-8")
    cfg = load_run_config(str(tmp_path / "tiny.yaml"), ["model.text.freeze_below=1", "model.text.cache_states=true"])
    rows, trainer = dry_run(cfg, pretrain_task)
    model = unwrap_model(trainer.model)
    records = json.loads((tmp_path / "annotations" / "train_video.json").read_text())
    assert len(model.text_cache) == len({r["caption"] for r in records} | {r["foil"] for r in records})

    batch = trainer.task.sample_batches()["video"]
    filled = count_flops(lambda: model(batch, step=0)["loss"].backward())
    model.text_cache.clear()
    empty = count_flops(lambda: model(batch, step=0)["loss"].backward())
    assert rows[0]["flops"] == filled < empty
