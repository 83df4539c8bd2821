"""Warm start of the student ViT from the CLIP teacher's image tower (`model.vision.warm_start: teacher`).

Not part of STM or UMT, whose students start from random weights (or a UMT checkpoint, `model.vision.init`). It is
an option for small budgets, such as the embedded demo: the teacher has already learnt what single frames show, so
the student need not learn it again before it can learn motion. The copy is exact where the two architectures agree
and leaves the rest to training:

- blocks ``0..depth-1``: ``ln_1 -> norm1``, ``attn.qkv -> attn.qkv`` (CLIP's key bias is dropped: it adds the same
  amount to every score of a query and cancels in the softmax), ``attn.proj``, ``ln_2 -> norm2``, ``mlp.fc1/fc2``;
- ``ln_post -> norm`` (the student's final norm);
- the patch embedding: the teacher's RGB kernel, rescaled from the teacher's input normalisation to the student's
  (so the same pixels give the same patch vector), with the normalisation difference folded into the bias; the
  extra input channels of the ``diff`` stem (frame differences) keep their own initialisation, so at step 0 the
  student's patch tokens are the teacher's wherever a frame equals the previous one (an image, the first frame).

- ``ln_pre -> pre_norm`` when the student has one (``vision.pre_norm: true``);
- the patch rows of the position table into the student's learnt spatial table when ``vision.pos_embed`` is
  ``learned`` (bicubic-resized if the grids differ; the per-frame table starts at zero, so every frame gets the
  teacher's table).

What cannot be copied stays the student's own: a sincos position table (``1d``/``3d``), the class token (the student
has none), the activation (GELU against the teacher's, usually QuickGELU; the two differ by at most 0.021 on
[-3, 3]) and the pooling head. Without ``pre_norm`` and the learnt table the blocks see inputs they were not trained
on: a linear probe finds less of the teacher's shape knowledge in such a student (docs/weights.md).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from stmvl.config import ConfigError
from stmvl.models.layers import resize_grid_table

log = logging.getLogger(__name__)

WARM_START_CHOICES = ("none", "teacher")


def warm_start_problems(v, t, prefix: str = "model") -> list[str]:
    """Why a student of VisionConfig ``v`` cannot be a copy of a teacher of TeacherConfig ``t`` (empty: it can)."""
    mlp_t = t.mlp_width or 4 * t.width
    checks = [
        (v.width != t.width, f"{prefix}.vision.width {v.width} != {prefix}.teacher.width {t.width}"),
        (v.heads != t.heads, f"{prefix}.vision.heads {v.heads} != {prefix}.teacher.heads {t.heads}"),
        (v.depth > t.layers, f"{prefix}.vision.depth {v.depth} > {prefix}.teacher.layers {t.layers}"),
        (v.patch_size != t.patch_size,
         f"{prefix}.vision.patch_size {v.patch_size} != {prefix}.teacher.patch_size {t.patch_size}"),
        (int(v.width * v.mlp_ratio) != mlp_t, f"student MLP width {int(v.width * v.mlp_ratio)} != teacher MLP width "
                                               f"{mlp_t}"),
        (v.stem not in ("rgb", "diff"), f"{prefix}.vision.stem {v.stem!r} (warm start supports 'rgb' and 'diff')"),
    ]
    return [message for failed, message in checks if failed]


def check_shapes(v, t, prefix: str = "model") -> None:
    """Raise ConfigError naming every size in which VisionConfig ``v`` differs from TeacherConfig ``t`` (called on
    the recipe's configs before anything is built, and on the built towers: a teacher loaded from weights takes its
    sizes from the file)."""
    problems = warm_start_problems(v, t, prefix)
    if problems:
        raise ConfigError(f"{prefix}.vision.warm_start=teacher needs a student shaped like the teacher: "
                          + "; ".join(problems))


@torch.no_grad()
def _copy_patch_embedding(vision: nn.Module, teacher: nn.Module) -> None:
    """Teacher Conv2d (no bias) on x_t = (v - m_t) / s_t  ->  student Conv3d on x_s = (v - m_s) / s_s.

    v = x_s * s_s + m_s, so W_t x_t = sum_c W_t[c] (s_s[c] / s_t[c]) x_s[c] + sum_c W_t[c] (m_s[c] - m_t[c]) / s_t[c]:
    a rescaled kernel plus a constant (the bias).
    """
    w_t = teacher.conv1.weight.float()  # [D, 3, p, p]
    m_t, s_t = teacher.mean.view(3).float(), teacher.std.view(3).float()
    m_s, s_s = vision.mean.view(3).float(), vision.std.view(3).float()
    scaled = w_t * (s_s / s_t).view(1, 3, 1, 1)
    bias = (w_t * ((m_s - m_t) / s_t).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    proj = vision.patch_embed.proj  # Conv3d weight [D, C, 1, p, p]
    # the diff stem's difference channels keep their initialisation: zeroing them (the student exactly the teacher
    # at step 0) gave the demo t2v R@1 16.0 against 20.6 with them kept (400 steps, one seed)
    proj.weight[:, :3, 0] = scaled.to(proj.weight.dtype)
    proj.bias.copy_(bias.to(proj.bias.dtype))


@torch.no_grad()
def _copy_block(student: nn.Module, teacher: nn.Module) -> None:
    """CLIP ResidualBlock -> student Block (both pre-norm: the same function but for the activation)."""
    width = student.norm1.weight.shape[0]
    student.norm1.load_state_dict(teacher.ln_1.state_dict())
    student.norm2.load_state_dict(teacher.ln_2.state_dict())
    student.attn.qkv.weight.copy_(teacher.attn.qkv.weight)
    # the student keeps separate q and v biases (UMT layout); CLIP's one qkv bias splits into them, its key part
    # dropped (it adds one constant to all of a query's scores, which the softmax removes)
    qkv_bias = teacher.attn.qkv.bias
    student.attn.q_bias.copy_(qkv_bias[:width])
    student.attn.v_bias.copy_(qkv_bias[2 * width:])
    student.attn.proj.load_state_dict(teacher.attn.proj.state_dict())
    student.mlp.fc1.load_state_dict(teacher.mlp.fc1.state_dict())
    student.mlp.fc2.load_state_dict(teacher.mlp.fc2.state_dict())


def warm_start_from_teacher(vision: nn.Module, teacher: nn.Module) -> None:
    """Copy the teacher's image tower into the student ViT in place (module docstring).

    Args:
        vision: the student VideoViT; teacher: a CLIPTeacher (its weights already loaded).

    Raises:
        ConfigError: the student is not shaped like the teacher (names the sizes that differ).
    """
    check_shapes(vision.cfg, teacher.cfg)
    _copy_patch_embedding(vision, teacher)
    for student_block, teacher_block in zip(vision.blocks, teacher.blocks):
        _copy_block(student_block, teacher_block)
    vision.norm.load_state_dict(teacher.ln_post.state_dict())
    copied = _copy_input_side(vision, teacher)
    log.info("student warm-started from the teacher: patch embedding, %d of %d blocks, the final norm%s "
             "(the pooling head and activation stay the student's own)",
             len(vision.blocks), len(teacher.blocks), "".join(f", {name}" for name in copied))


@torch.no_grad()
def _copy_input_side(vision: nn.Module, teacher: nn.Module) -> list[str]:
    """ln_pre and the patch position table, where the student has a place for them; returns what was copied."""
    copied = []
    if vision.pre_norm is not None:
        vision.pre_norm.load_state_dict(teacher.ln_pre.state_dict())
        copied.append("ln_pre")
    if vision.cfg.pos_embed == "learned":
        grid = vision.cfg.img_size // vision.cfg.patch_size
        table = resize_grid_table(teacher.positional_embedding[1:].float(), grid, grid)
        vision.position.spatial.copy_(table.to(vision.position.spatial.dtype))
        copied.append("the position table")
    return copied
