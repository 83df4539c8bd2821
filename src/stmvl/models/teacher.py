"""Frozen CLIP image ViT applied to every frame: MVM targets, spatial scores, tokenizer tokens (docs/method.md, Teacher).

Layout (names used by the importers in ``stmvl.models.weights``): ``conv1`` (Conv2d, no bias; UMT's teacher
stores it as a Conv3d with temporal kernel 1, ``[W, 3, 1, p, p]``, squeezed on import), ``class_embedding [W]``,
``positional_embedding [1 + G*G, W]``, ``ln_pre``, ``blocks.i.{ln_1, attn.{qkv, proj}, ln_2, mlp.{fc1, fc2}}``,
``ln_post``, ``proj`` (Linear W -> C, no bias), and optionally ``temporal.*`` (temporal fusion).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stmvl.models.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, TeacherConfig
from stmvl.models.layers import Attention, Mlp, check_heads, layer_norm, resize_grid_table

_INPUT_NORMS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": ((0.0,) * 3, (1.0,) * 3)}


class TeacherOutput(NamedTuple):
    """targets ``[K, B, T*N, C]``; attn ``[B*T, N]`` (last block, class -> patches, head mean);
    tokens ``[B, T, N, W]`` (patch embedding output, before class token and position embedding)."""

    targets: torch.Tensor
    attn: torch.Tensor
    tokens: torch.Tensor


class ResidualBlock(nn.Module):
    """CLIP's pre-norm block: ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)``."""

    def __init__(self, width: int, heads: int, act: str, eps: float, mlp_width: int | None = None) -> None:
        super().__init__()
        self.ln_1 = layer_norm(width, eps)
        self.attn = Attention(width, heads, qkv_bias="all")
        self.ln_2 = layer_norm(width, eps)
        self.mlp = Mlp(width, mlp_width or 4 * width, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def class_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention of the class token (index 0) to every token, averaged over heads: ``[B, n]``.

        Computed explicitly (SDPA does not return weights) from the same projections as ``forward``.
        """
        q, k, _ = self.attn.project_qkv(self.ln_1(x))
        scores = q[:, :, :1] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]


class TemporalFusion(nn.Module):
    """ActionCLIP-style temporal transformer: at every spatial position, tokens ``[M, T, C]`` attend over T.

    ``out = blocks(x + frame_position_embeddings[:T]) + x`` (residual around the whole stack, as ActionCLIP's
    ``visual_prompt("Transf")``: 8 heads at width 512, MLP 4x, QuickGELU, LayerNorm eps 1e-12, a 77-row table).
    """

    def __init__(self, width: int, layers: int, max_frames: int, act: str, eps: float) -> None:
        super().__init__()
        check_heads(width, max(width // 64, 1), "teacher temporal fusion")
        self.frame_position_embeddings = nn.Embedding(max_frames, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, max(width // 64, 1), act, eps) for _ in range(layers))
        nn.init.normal_(self.frame_position_embeddings.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"temporal fusion holds {self.frame_position_embeddings.num_embeddings} frames, got T={T}")
        y = x + self.frame_position_embeddings.weight[:T]
        for block in self.blocks:
            y = block(y)
        return y + x


class CLIPTeacher(nn.Module):
    """Frozen CLIP image tower run per frame. ``forward(video [B, T, 3, H, W] in [0, 1]) -> TeacherOutput``.

    The parameters never require grad and the module stays in eval mode whatever ``train()`` is told; the
    forward runs under ``torch.no_grad``. Inputs whose patch grid differs from the weights' grid get a bicubic
    interpolation of the position embedding.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        if cfg.input_norm not in _INPUT_NORMS:
            raise ValueError(f"teacher.input_norm must be one of {sorted(_INPUT_NORMS)}, got {cfg.input_norm!r}")
        if not 1 <= cfg.return_layers <= cfg.layers:
            raise ValueError(f"teacher.return_layers must be in [1, {cfg.layers}], got {cfg.return_layers}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"teacher.img_size {cfg.img_size} is not divisible by patch_size {cfg.patch_size}")
        check_heads(cfg.width, cfg.heads, "teacher")
        self.cfg = cfg
        mean, std = _INPUT_NORMS[cfg.input_norm]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        w, grid = cfg.width, cfg.img_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(1 + grid * grid, w) * w**-0.5)
        self.ln_pre = layer_norm(w, cfg.norm_eps)
        self.blocks = nn.ModuleList(
            ResidualBlock(w, cfg.heads, cfg.act, cfg.norm_eps, cfg.mlp_width) for _ in range(cfg.layers)
        )
        self.ln_post = layer_norm(w, cfg.norm_eps)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)
        self.temporal = (
            TemporalFusion(cfg.embed_dim, cfg.temporal_fusion_layers, cfg.max_frames, cfg.act,
                           cfg.norm_eps if cfg.temporal_fusion_norm_eps is None else cfg.temporal_fusion_norm_eps)
            if cfg.temporal_fusion
            else None
        )
        self._init_clip_style()
        self.requires_grad_(False)
        super().train(False)

    def _init_clip_style(self) -> None:
        w, depth = self.cfg.width, self.cfg.layers
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=w**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=w**-0.5 * (2 * depth) ** -0.5)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=w**-0.5 * (2 * depth) ** -0.5)
        nn.init.normal_(self.proj.weight, std=w**-0.5)

    def train(self, mode: bool = True) -> "CLIPTeacher":
        """Always eval: the teacher is frozen (its dropout-free forward must not depend on the caller's mode)."""
        return super().train(False)

    @property
    def grid_size(self) -> int:
        """Patch grid side of the weights' position table."""
        return math.isqrt(self.positional_embedding.shape[0] - 1)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """Position table ``[1 + gh*gw, W]``, bicubic-interpolated when the grid differs from the weights'."""
        if (gh, gw) == (self.grid_size, self.grid_size):
            return self.positional_embedding
        cls_pos, patch_pos = self.positional_embedding[:1], self.positional_embedding[1:]
        patch_pos = resize_grid_table(patch_pos, gh, gw)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def patch_tokens(self, frames: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Normalised frames ``[F, 3, H, W]`` -> patch embeddings ``[F, N, W]`` and the grid ``(gh, gw)``."""
        x = self.conv1(frames)
        gh, gw = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), gh, gw

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target features of block outputs: ``proj(ln_post(h))``, ``[..., W] -> [..., C]``."""
        return self.proj(self.ln_post(hidden))

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding ``proj(ln_post(class token))`` of ``images [B, 3, H, W]`` in [0, 1]: ``[B, C]``.

        Unlike ``forward`` this keeps the autograd graph, so the demo can train its own teacher (locked-text
        contrastive training) before freezing it.
        """
        frames = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        tokens, gh, gw = self.patch_tokens(frames)
        cls = self.class_embedding.to(tokens.dtype).expand(images.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, tokens], dim=1) + self.position_embedding(gh, gw).to(tokens.dtype))
        for block in self.blocks:
            x = block(x)
        return self.project(x[:, 0])

    @torch.no_grad()
    def forward(self, video: torch.Tensor, grid: tuple[int, int] | None = None) -> TeacherOutput:
        """``video [B, T, 3, H, W]`` float in [0, 1] -> ``TeacherOutput`` (targets, attn, tokens).

        ``grid``: the token grid ``(gh, gw)`` wanted (the student's); the frames are resized (bicubic) to
        ``grid x patch_size`` when they are not that size already. None: the frames' own grid.
        """
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"teacher input must be [B, T, 3, H, W], got shape {tuple(video.shape)}")
        B, T, _, H, W = video.shape
        p = self.cfg.patch_size
        frames = video.reshape(B * T, 3, H, W)
        if grid is not None and (grid[0] * p, grid[1] * p) != (H, W):
            # as UMT (bicubic to clip_img_size): the teacher sees the clip at the size that gives the student's token
            # grid, e.g. 196 px for CLIP-L/14 beside a 224 px ViT-L/16 student
            H, W = grid[0] * p, grid[1] * p
            frames = F.interpolate(frames, size=(H, W), mode="bicubic", align_corners=False)
        if H % p or W % p:
            raise ValueError(f"teacher: frame size {H}x{W} is not divisible by the patch size {p}")
        frames = (frames - self.mean.to(video.dtype)) / self.std.to(video.dtype)
        tokens, gh, gw = self.patch_tokens(frames)
        N = gh * gw
        cls = self.class_embedding.to(tokens.dtype).expand(B * T, 1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.position_embedding(gh, gw).to(tokens.dtype)
        x = self.ln_pre(x)
        K = self.cfg.return_layers
        first_returned = len(self.blocks) - K
        hidden = []
        for i, block in enumerate(self.blocks):
            if i == len(self.blocks) - 1:
                attn = block.class_attention(x)[:, 1:]
            x = block(x)
            if i >= first_returned:
                hidden.append(x[:, 1:])
        targets = self.project(torch.stack(hidden))  # [K, B*T, N, C]
        targets = targets.view(K, B, T, N, -1)
        if self.temporal is not None and T > 1:
            # images (T = 1) are not fused: STM runs its fusion_model only on video batches
            targets = self._fuse_over_time(targets)
        return TeacherOutput(targets.reshape(K, B, T * N, -1), attn, tokens.view(B, T, N, -1))

    def _fuse_over_time(self, targets: torch.Tensor) -> torch.Tensor:
        """Temporal fusion at each spatial position: ``[K, B, T, N, C] -> [K, B, T, N, C]``."""
        K, B, T, N, C = targets.shape
        per_position = targets.permute(0, 1, 3, 2, 4).reshape(K * B * N, T, C)
        fused = self.temporal(per_position)
        return fused.view(K, B, N, T, C).permute(0, 1, 3, 2, 4)
