"""stmvl.api: model folders (strict loading, run folders, errors naming files/keys), encode_video / encode_text."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import stmvl
from stmvl.config import ConfigError
from stmvl.api import ModelDirError, encode_text, encode_video, load_model, video_features
from stmvl.models.losses import frame_similarity
from stmvl.models.stm import STMModel
from stmvl.models.weights import WeightLoadError, save_model
from tiny_recipe import tiny_inference_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = STMModel(tiny_inference_config()).eval()
    run = tmp_path_factory.mktemp("run")
    save_model(model, model.cfg, run / "model", extra={"inference": {"num_frames": 3, "img_size": 32}})
    return model, run


def test_top_level_exports_are_lazy():
    code = "import sys, stmvl; assert 'torch' not in sys.modules; stmvl.load_model; assert 'stmvl.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stmvl.load_model is load_model and stmvl.search.__module__ == "stmvl.api"
    with pytest.raises(AttributeError, match="nothing"):
        stmvl.nothing  # noqa: B018


def test_run_folder_loads_the_same_weights_in_eval_mode(saved):
    original, run = saved
    model = load_model(run)  # a run folder: its model/ sub-folder is used
    assert not model.training and model.model_dir == run / "model"
    assert model.inference.num_frames == 3 and model.inference.sampling == "middle"
    assert model.teacher is None and not model.teacher_loaded
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_encoders_agree_with_the_evaluator_similarity(saved):
    original, run = saved
    model = load_model(run)
    video = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    single = encode_video(model, video[0])
    batch = encode_video(model, video)
    text = encode_text(model, ["a red circle moves left", "a blue square grows"])
    assert single.shape == (24,) and batch.shape == (2, 24) and text.shape == (2, 24)
    torch.testing.assert_close(single, batch[0])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    _, frames = video_features(model, video)
    torch.testing.assert_close(text @ batch.T, frame_similarity(text, frames))  # same score as the evaluator
    uint8 = (video[0] * 255).round().to(torch.uint8)
    assert torch.allclose(encode_video(model, uint8), single, atol=1e-2)
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        encode_video(model, torch.rand(3, 32, 32))


def test_missing_and_unexpected_keys_are_named(saved, tmp_path):
    _, run = saved
    weights = load_file(run / "model" / "model.safetensors")
    del weights["vision_proj.bias"]
    weights["stray.weight"] = torch.ones(1)
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((run / "model" / "config.json").read_text())
    with pytest.raises(WeightLoadError, match=r"vision_proj\.bias") as error:
        load_model(tmp_path)
    assert "stray.weight" in str(error.value)


def test_bad_folders_name_the_file(saved, tmp_path):
    _, run = saved
    with pytest.raises(ModelDirError, match="no model.safetensors"):
        load_model(tmp_path)
    meta = json.loads((run / "model" / "config.json").read_text())
    for change, message in ((dict(stmvl_config_type="VisionConfig"), "needs a full model"),
                            (dict(inference={"frames": 4}), "unknown 'inference' keys"),
                            (dict(config=dict(meta["config"], colour="red")), "colour")):
        folder = tmp_path / message.split()[0].strip("'")
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((run / "model" / "model.safetensors").read_bytes())
        (folder / "config.json").write_text(json.dumps(dict(meta, **change)))
        with pytest.raises((ModelDirError, ConfigError), match=message) as error:
            load_model(folder)
        assert "config.json" in str(error.value)
