"""UMT (OpenGVLab/unmasked_teacher) written out from ITS code, for the interop tests -- never from stmvl's exporter.

* Key layouts: the state-dict names and shapes of UMT's classes, listed by hand from
  ``multi_modality/models/backbones/vit/vit.py`` (``PretrainVisionTransformer``: ``encoder`` =
  ``PretrainVisionTransformerEncoder``, ``clip_decoder`` = ``Linear_Decoder`` list, ``pool_norm``),
  ``multi_modality/models/backbones/vit/clip.py`` (``VisionTransformer``: Conv3d ``conv1``, ``transformer.resblocks``
  of ``nn.MultiheadAttention`` blocks, ``proj [W, C]``), ``multi_modality/models/umt.py`` (``vision_encoder``,
  ``text_encoder`` = BertForMaskedLM, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, ``clip_teacher``) and
  ``single_modality/models/modeling_pretrain_umt.py`` (stage 1: ``encoder.*`` + ``clip_decoder.*``).
* Forwards: UMT's student, decoders, pooling and CLIP teacher re-implemented tensor by tensor from that code
  (position tables with UMT's numpy formula, the q/zero/v bias concat, ``nn.MultiheadAttention`` for the teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UmtSizes:
    """Sizes of a small UMT model (every value deliberately unlike the B/16 defaults, MLPs not 4x wide)."""

    img: int = 32
    patch: int = 8
    width: int = 128  # student D; heads = width / 64 (UMT's B and L keep 64-wide heads)
    depth: int = 3
    mlp: int = 384  # student MLP hidden (3x)
    decoders: int = 2  # clip_return_layer K
    t_width: int = 128  # teacher
    t_layers: int = 2
    t_mlp: int = 512  # 4x, as every CLIP (UMT's ResidualAttentionBlock hard-codes d_model * 4)
    clip_dim: int = 48  # teacher proj / decoder output C
    vocab: int = 30522  # the packaged bert-base-uncased vocabulary, so stmvl's tokenizer runs
    t_hidden: int = 64  # BERT
    t_layers_text: int = 3
    fusion_layer: int = 2
    text_ffn: int = 96
    max_pos: int = 40
    embed: int = 40  # vision_proj / text_proj width

    @property
    def heads(self) -> int:
        return self.width // 64

    @property
    def t_heads(self) -> int:
        return self.t_width // 64


def _block_shapes(prefix: str, d: int, hidden: int) -> dict[str, tuple]:
    """vit.py Block(qkv_bias=True, init_values=0): norm1, attn.{qkv (no bias), q_bias, v_bias, proj}, norm2, mlp."""
    return {
        prefix + "norm1.weight": (d,), prefix + "norm1.bias": (d,),
        prefix + "attn.q_bias": (d,), prefix + "attn.v_bias": (d,),
        prefix + "attn.qkv.weight": (3 * d, d),
        prefix + "attn.proj.weight": (d, d), prefix + "attn.proj.bias": (d,),
        prefix + "norm2.weight": (d,), prefix + "norm2.bias": (d,),
        prefix + "mlp.fc1.weight": (hidden, d), prefix + "mlp.fc1.bias": (hidden,),
        prefix + "mlp.fc2.weight": (d, hidden), prefix + "mlp.fc2.bias": (d,),
    }


def student_shapes(s: UmtSizes, prefix: str, pool_norm: bool) -> dict[str, tuple]:
    """``PretrainVisionTransformer`` under ``prefix`` ("" for stage 1, "vision_encoder." for stage 2)."""
    e = prefix + "encoder."
    shapes = {e + "patch_embed.proj.weight": (s.width, 3, 1, s.patch, s.patch), e + "patch_embed.proj.bias": (s.width,)}
    for i in range(s.depth):
        shapes.update(_block_shapes(f"{e}blocks.{i}.", s.width, s.mlp))
    shapes.update({e + "norm.weight": (s.width,), e + "norm.bias": (s.width,)})
    if pool_norm:
        shapes.update({prefix + "pool_norm.weight": (s.width,), prefix + "pool_norm.bias": (s.width,)})
    for i in range(s.decoders):
        d = f"{prefix}clip_decoder.{i}."
        shapes.update({d + "head.weight": (s.clip_dim, s.width), d + "head.bias": (s.clip_dim,),
                       d + "norm.weight": (s.clip_dim,), d + "norm.bias": (s.clip_dim,)})
    return shapes


def teacher_shapes(s: UmtSizes, prefix: str = "clip_teacher.") -> dict[str, tuple]:
    """clip.py ``VisionTransformer``: Conv3d conv1 (1, p, p) without bias, resblocks of nn.MultiheadAttention."""
    w, grid = s.t_width, s.img // s.patch
    shapes = {prefix + "conv1.weight": (w, 3, 1, s.patch, s.patch), prefix + "class_embedding": (w,),
              prefix + "positional_embedding": (grid * grid + 1, w),
              prefix + "ln_pre.weight": (w,), prefix + "ln_pre.bias": (w,)}
    for i in range(s.t_layers):
        r = f"{prefix}transformer.resblocks.{i}."
        shapes.update({r + "attn.in_proj_weight": (3 * w, w), r + "attn.in_proj_bias": (3 * w,),
                       r + "attn.out_proj.weight": (w, w), r + "attn.out_proj.bias": (w,),
                       r + "ln_1.weight": (w,), r + "ln_1.bias": (w,),
                       r + "mlp.c_fc.weight": (s.t_mlp, w), r + "mlp.c_fc.bias": (s.t_mlp,),
                       r + "mlp.c_proj.weight": (w, s.t_mlp), r + "mlp.c_proj.bias": (w,),
                       r + "ln_2.weight": (w,), r + "ln_2.bias": (w,)})
    shapes.update({prefix + "ln_post.weight": (w,), prefix + "ln_post.bias": (w,), prefix + "proj": (w, s.clip_dim)})
    return shapes


def text_shapes(s: UmtSizes) -> dict[str, tuple]:
    """xbert BertForMaskedLM under ``text_encoder.``: cross-attention from ``fusion_layer`` on, tied MLM decoder."""
    h, b = s.t_hidden, "text_encoder.bert."
    shapes = {b + "embeddings.position_ids": (1, s.max_pos),  # a persistent buffer of xbert's BertEmbeddings
              b + "embeddings.word_embeddings.weight": (s.vocab, h), b + "embeddings.position_embeddings.weight": (s.max_pos, h),
              b + "embeddings.token_type_embeddings.weight": (2, h),
              b + "embeddings.LayerNorm.weight": (h,), b + "embeddings.LayerNorm.bias": (h,)}
    for i in range(s.t_layers_text):
        p = f"{b}encoder.layer.{i}."
        for att in ["attention"] + (["crossattention"] if i >= s.fusion_layer else []):
            kv_in = s.width if att == "crossattention" else h  # cross-attention keys/values read video tokens
            shapes.update({f"{p}{att}.self.query.weight": (h, h), f"{p}{att}.self.query.bias": (h,),
                           f"{p}{att}.self.key.weight": (h, kv_in), f"{p}{att}.self.key.bias": (h,),
                           f"{p}{att}.self.value.weight": (h, kv_in), f"{p}{att}.self.value.bias": (h,),
                           f"{p}{att}.output.dense.weight": (h, h), f"{p}{att}.output.dense.bias": (h,),
                           f"{p}{att}.output.LayerNorm.weight": (h,), f"{p}{att}.output.LayerNorm.bias": (h,)})
        shapes.update({p + "intermediate.dense.weight": (s.text_ffn, h), p + "intermediate.dense.bias": (s.text_ffn,),
                       p + "output.dense.weight": (h, s.text_ffn), p + "output.dense.bias": (h,),
                       p + "output.LayerNorm.weight": (h,), p + "output.LayerNorm.bias": (h,)})
    c = "text_encoder.cls.predictions."
    shapes.update({c + "bias": (s.vocab,), c + "transform.dense.weight": (h, h), c + "transform.dense.bias": (h,),
                   c + "transform.LayerNorm.weight": (h,), c + "transform.LayerNorm.bias": (h,),
                   c + "decoder.weight": (s.vocab, h), c + "decoder.bias": (s.vocab,)})
    return shapes


def stage2_shapes(s: UmtSizes, teacher: bool = True) -> dict[str, tuple]:
    """Every key of ``UMT.state_dict()`` (multi_modality/models/umt.py) at sizes ``s``."""
    shapes = student_shapes(s, "vision_encoder.", pool_norm=True)
    shapes.update(text_shapes(s))
    shapes.update({"vision_proj.weight": (s.embed, s.width), "vision_proj.bias": (s.embed,),
                   "text_proj.weight": (s.embed, s.t_hidden), "text_proj.bias": (s.embed,),
                   "itm_head.weight": (2, s.t_hidden), "itm_head.bias": (2,), "temp": ()})
    if teacher:
        shapes.update(teacher_shapes(s))
    return shapes


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values (norm weights near 1) so that any misplaced tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        value = 0.05 * torch.randn(shape, generator=g)
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight", "ln_1.weight",
                         "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
            value = value + 1.0
        sd[key] = value
    for key in [k for k in sd if k.endswith("position_ids")]:
        sd[key] = torch.arange(sd[key].shape[1]).unsqueeze(0)
    if "temp" in sd:
        sd["temp"] = torch.tensor(0.07)
    tied = "text_encoder.cls.predictions."
    if tied + "decoder.weight" in sd:  # BertForMaskedLM ties the decoder to the word embeddings
        sd[tied + "decoder.weight"] = sd["text_encoder.bert.embeddings.word_embeddings.weight"]
        sd[tied + "decoder.bias"] = sd[tied + "bias"]
    return sd


# --------------------------------------------------------------------------------------------------- forwards


def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """vit.py ``get_sinusoid_encoding_table`` (numpy, float64 then float32): ``[1, n, d]``."""
    def angles(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    table = np.array([angles(pos) for pos in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float).unsqueeze(0)


def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _umt_block(x, sd, p, heads):
    """vit.py Block / Attention / Mlp (qkv bias = cat(q_bias, zeros, v_bias), exact GELU, eps 1e-6)."""
    B, N, C = x.shape
    h = _ln(x, sd, p + "norm1", 1e-6)
    bias = torch.cat((sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]))
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (C // heads) ** -0.5
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    a = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = _ln(x, sd, p + "norm2", 1e-6)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + h


def student_forward(sd, prefix: str, s: UmtSizes, x: torch.Tensor, mask: torch.Tensor | None = None,
                    keep_temporal: bool = True):
    """vit.py ``PretrainVisionTransformer.forward`` (stage 2 class; stage 1 is the same encoder and decoders).

    Args:
        x: [B, 3, T, H, W] normalised video; mask: bool [B, T*N], True = masked (UMT's convention).

    Returns:
        (x_vis [B, n, D], x_pool [B, T, D] (keep_temporal) or [B, 1, D] (None without pool_norm),
        x_clip [K, B, n, C] (None without a mask)).
    """
    e = prefix + "encoder."
    T = x.shape[2]
    x = F.conv3d(x, sd[e + "patch_embed.proj.weight"], sd[e + "patch_embed.proj.bias"],
                 stride=(1, s.patch, s.patch)).flatten(2).transpose(1, 2)
    x = x + sinusoid_table(x.shape[1], s.width).type_as(x)
    B, _, C = x.shape
    x_vis = x[~mask].reshape(B, -1, C) if mask is not None else x
    return_index = [s.depth - int(i * 1) - 1 for i in range(s.decoders)]
    x_clip_vis = []
    for idx in range(s.depth):
        x_vis = _umt_block(x_vis, sd, f"{e}blocks.{idx}.", s.heads)
        if idx in return_index:
            x_clip_vis.append(x_vis)
    x_vis = _ln(x_vis, sd, e + "norm", 1e-6)
    x_clip_vis = _ln(torch.stack(x_clip_vis), sd, e + "norm", 1e-6)
    x_clip = None
    if mask is not None:
        K = x_clip_vis.shape[0]
        pos = sinusoid_table(mask.shape[1], s.width).repeat(B, 1, 1).type_as(x)
        pos_vis = pos[~mask].view(B, -1, C).unsqueeze(0).repeat(K, 1, 1, 1)
        full = x_clip_vis + pos_vis
        d = prefix + "clip_decoder."
        x_clip = torch.stack([
            F.layer_norm(F.linear(full[i], sd[f"{d}{i}.head.weight"], sd[f"{d}{i}.head.bias"]), (s.clip_dim,),
                         sd[f"{d}{i}.norm.weight"], sd[f"{d}{i}.norm.bias"], 1e-5)  # nn.LayerNorm(output_dim)
            for i in range(K)])
    pool = prefix + "pool_norm"
    if pool + ".weight" not in sd:  # single_modality's class has no pool norm
        return x_vis, None, x_clip
    if keep_temporal:
        x_pool = _ln(x_vis.view(B, T, -1, C).mean(2), sd, pool, 1e-6)
    else:
        x_pool = _ln(x_vis.mean(1, keepdim=True), sd, pool, 1e-6)
    return x_vis, x_pool, x_clip


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def teacher_forward(sd, s: UmtSizes, x: torch.Tensor, prefix: str = "clip_teacher."):
    """clip.py ``VisionTransformer.forward`` (mask None), with torch's nn.MultiheadAttention as UMT uses it.

    Args:
        x: [B, 3, T, H, W] normalised video.

    Returns:
        (targets [K, B, T*HW, C], attn [B*T, HW]: last block, class token -> patches, mean over heads).
    """
    w = s.t_width
    x = F.conv3d(x, sd[prefix + "conv1.weight"], stride=(1, s.patch, s.patch))
    N, C, T, H, W = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(N * T, H * W, C)
    cls = sd[prefix + "class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + sd[prefix + "positional_embedding"]
    x = _ln(x, sd, prefix + "ln_pre", 1e-5)
    x = x.permute(1, 0, 2)
    return_index = [s.t_layers - i - 1 for i in range(s.decoders)]
    z, attn = [], None
    for idx in range(s.t_layers):
        r = f"{prefix}transformer.resblocks.{idx}."
        mha = nn.MultiheadAttention(w, s.t_heads)
        mha.load_state_dict({"in_proj_weight": sd[r + "attn.in_proj_weight"], "in_proj_bias": sd[r + "attn.in_proj_bias"],
                             "out_proj.weight": sd[r + "attn.out_proj.weight"], "out_proj.bias": sd[r + "attn.out_proj.bias"]})
        h = _ln(x, sd, r + "ln_1", 1e-5)
        if idx == s.t_layers - 1:
            out, attn = mha(h, h, h, need_weights=True)
        else:
            out = mha(h, h, h, need_weights=False)[0]
        x = x + out
        h = _ln(x, sd, r + "ln_2", 1e-5)
        h = F.linear(_QuickGELU()(F.linear(h, sd[r + "mlp.c_fc.weight"], sd[r + "mlp.c_fc.bias"])),
                     sd[r + "mlp.c_proj.weight"], sd[r + "mlp.c_proj.bias"])
        x = x + h
        if idx in return_index:
            z.append(x)
    z = torch.stack(z)
    K = z.shape[0]
    HW = H * W
    z = _ln(z[:, 1:, :, :], sd, prefix + "ln_post", 1e-5)
    z = z.view(K, HW, N, T, C).permute(0, 2, 3, 1, 4).reshape(K, N, T * HW, C)
    return z @ sd[prefix + "proj"], attn[:, 0, 1:]


def uta_loss(student_output: torch.Tensor, clip_output: torch.Tensor) -> torch.Tensor:
    """criterions.py ``UTA_Loss.uta_loss`` with norm_type l2, loss_type l2."""
    student_output = student_output / student_output.norm(dim=-1, keepdim=True)
    clip_output = clip_output / clip_output.norm(dim=-1, keepdim=True)
    return (2 - 2 * (student_output * clip_output).sum(dim=-1)).mean()
