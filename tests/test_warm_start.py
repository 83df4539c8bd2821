"""stmvl.models.warm_start: the student starts as a copy of the teacher's image tower."""

import dataclasses
import json

import pytest
import torch

from stmvl.config import ConfigError
from stmvl.models.config import ModelConfig, TeacherConfig
from stmvl.models.teacher import CLIPTeacher
from stmvl.models.vit import VideoViT, vit_config
from stmvl.models.warm_start import warm_start_from_teacher


def _pair(stem: str = "diff", act: str = "gelu", **teacher_changes):
    torch.manual_seed(0)
    teacher = CLIPTeacher(TeacherConfig(img_size=32, patch_size=8, width=64, layers=3, heads=2, embed_dim=16,
                                        return_layers=1, act=act, **teacher_changes))
    # the trained teacher's biases are not 0; random ones make the bias mapping observable
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    student = VideoViT(vit_config("tiny", width=64, depth=2, heads=2, patch_size=8, img_size=32, stem=stem,
                                  drop_path=0.0)).eval()
    return student, teacher


@pytest.mark.parametrize("stem", ["rgb", "diff"])
def test_patch_tokens_and_blocks_compute_what_the_teachers_do(stem):
    student, teacher = _pair(stem)
    warm_start_from_teacher(student, teacher)
    # a still clip: the diff stem's difference channels (which keep their own initialisation) see zeros
    video = torch.rand(2, 1, 3, 32, 32).expand(2, 4, 3, 32, 32)
    with torch.no_grad():
        # the student's patch vectors (its normalisation, the teacher's kernel) equal the teacher's on its own
        # normalisation
        student_patches = student.patch_embed(student._stem_input(video))  # [2, 4*16, 64]
        frames = (video.flatten(0, 1) - teacher.mean) / teacher.std
        teacher_patches, _, _ = teacher.patch_tokens(frames)  # [8, 16, 64]
        torch.testing.assert_close(student_patches.reshape(8, 16, 64), teacher_patches, atol=1e-5, rtol=1e-5)
        x = torch.randn(2, 10, 64)
        for s_block, t_block in zip(student.blocks, teacher.blocks):
            torch.testing.assert_close(s_block(x), t_block(x), atol=1e-5, rtol=1e-5)
        # the norms differ only in eps (1e-6 vs CLIP's 1e-5)
        torch.testing.assert_close(student.norm(x), teacher.ln_post(x), atol=1e-4, rtol=1e-4)
    assert len(student.blocks) == 2 < len(teacher.blocks)  # a shallower student takes the first blocks


def test_a_student_shaped_unlike_the_teacher_is_refused_naming_the_sizes():
    student, teacher = _pair()
    wide = VideoViT(vit_config("tiny", width=96, depth=2, heads=2, patch_size=8, img_size=32, stem="diff"))
    with pytest.raises(ConfigError, match=r"model.vision.width 96 != model.teacher.width 64"):
        warm_start_from_teacher(wide, teacher)
    deep = VideoViT(vit_config("tiny", width=64, depth=4, heads=2, patch_size=8, img_size=32))
    with pytest.raises(ConfigError, match=r"model.vision.depth 4 > model.teacher.layers 3"):
        warm_start_from_teacher(deep, teacher)


def test_stm_model_warm_starts_from_teacher_weights_and_saves_a_folder_that_loads_without_them(tmp_path):
    from stmvl.api import load_model
    from stmvl.models.stm import STMModel
    from stmvl.models.weights import save_model
    from tests.test_stm import tiny_config

    base = tiny_config()
    teacher_cfg = dataclasses.replace(base.teacher, width=64, layers=2, heads=2, act="gelu")
    vision = dataclasses.replace(base.vision, width=64, depth=2, heads=2, warm_start="teacher")
    with pytest.raises(ConfigError, match="warm_start=teacher needs trained teacher weights"):
        STMModel(dataclasses.replace(base, vision=vision, teacher=teacher_cfg))
    torch.manual_seed(1)
    teacher_dir = save_model(CLIPTeacher(teacher_cfg), teacher_cfg, tmp_path / "teacher")
    cfg = dataclasses.replace(base, vision=vision, teacher=dataclasses.replace(teacher_cfg, weights=str(teacher_dir)))
    model = STMModel(cfg)
    torch.testing.assert_close(model.vision.blocks[1].mlp.fc2.weight, model.teacher.blocks[1].mlp.fc2.weight)
    out = save_model(model, cfg, tmp_path / "model")
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["vision"]["warm_start"] == "none" and "warm_start" in saved["initialised_from"]
    (teacher_dir / "model.safetensors").unlink()  # the folder must not need the teacher it started from
    loaded = load_model(out)
    torch.testing.assert_close(loaded.vision.blocks[1].mlp.fc2.weight, model.vision.blocks[1].mlp.fc2.weight)
    # a folder whose config.json still asks for the warm start (written by hand) loads its own tensors too
    saved["config"]["vision"]["warm_start"] = "teacher"
    saved["config"]["teacher"]["weights"] = str(teacher_dir)
    (out / "config.json").write_text(json.dumps(saved))
    loaded = load_model(out)
    torch.testing.assert_close(loaded.vision.blocks[1].mlp.fc2.weight, model.vision.blocks[1].mlp.fc2.weight)


def test_warm_start_value_is_checked():
    from stmvl.models.stm import validate_config

    cfg = ModelConfig()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, warm_start="clip"))
    with pytest.raises(ValueError, match=r"vision.warm_start must be one of \('none', 'teacher'\)"):
        validate_config(cfg)


def test_pre_norm_and_learnt_positions_take_the_teachers_input_side():
    torch.manual_seed(0)
    teacher = CLIPTeacher(TeacherConfig(img_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=16,
                                        return_layers=1, act="gelu"))
    with torch.no_grad():
        teacher.ln_pre.weight.uniform_(0.5, 1.5)
        teacher.ln_pre.bias.normal_(0.0, 0.1)
    student = VideoViT(vit_config("tiny", width=64, depth=2, heads=2, patch_size=8, img_size=32, stem="rgb",
                                  drop_path=0.0, norm_eps=1e-5, pos_embed="learned", pre_norm=True,
                                  max_frames=4)).eval()
    warm_start_from_teacher(student, teacher)
    video = torch.rand(2, 1, 3, 32, 32).expand(2, 3, 3, 32, 32)  # a still clip of 3 frames
    with torch.no_grad():
        frames = (video.flatten(0, 1) - teacher.mean) / teacher.std
        patches, gh, gw = teacher.patch_tokens(frames)  # [6, 16, 64]
        expected = teacher.ln_pre(patches + teacher.positional_embedding[1:])
        # the per-frame table starts at zero: every frame gets the teacher's input tokens
        torch.testing.assert_close(student.embed(video).reshape(6, 16, 64), expected, atol=1e-5, rtol=1e-5)
        # another grid interpolates the spatial table; too many frames is refused naming the option
        assert student.position_embedding(2, 6, 6).shape == (72, 64)
    with pytest.raises(ValueError, match="vision.max_frames"):
        student.position_embedding(5, 4, 4)
    names = [name for name, _ in student.named_parameters()]
    assert {"position.spatial", "position.frames", "pre_norm.weight"} <= set(names)
