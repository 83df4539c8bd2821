"""Student video encoder: a ViT over per-frame patches with a sincos position embedding (docs/method.md).

Parameter names follow UMT (``patch_embed.proj``, ``blocks.i.{norm1, attn.{qkv, q_bias, v_bias, proj}, norm2,
mlp.{fc1, fc2}}``, ``norm``, ``pool_norm``) so UMT checkpoints map onto it one to one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from stmvl.models.config import VisionConfig
from stmvl.models.masking import gather_tokens, kept_index
from stmvl.models.layers import (
    Attention,
    DropPath,
    Mlp,
    check_heads,
    init_linear_trunc_normal,
    layer_norm,
    resize_grid_table,
    sincos_table,
)

_PRESETS = {
    "tiny": dict(img_size=32, patch_size=8, width=64, depth=2, heads=2),
    "demo": dict(img_size=64, patch_size=8, width=192, depth=6, heads=3),
    "b16": dict(img_size=224, patch_size=16, width=768, depth=12, heads=12),
    "l16": dict(img_size=224, patch_size=16, width=1024, depth=24, heads=16),
}
_STEM_CHANNELS = {"rgb": 3, "diff": 6, "tubelet2": 3}
POS_EMBED_CHOICES = ("1d", "3d", "learned")


class LearnedPosition(nn.Module):
    """Learnt position embedding of a video grid: a square spatial table ``[g*g, D]`` (bicubic-interpolated for
    another grid, like CLIP's) plus a per-frame table ``[max_frames, D]`` that starts at zero, so at
    initialisation every frame gets the same spatial table (as a per-frame image model such as the teacher)."""

    def __init__(self, grid: int, width: int, max_frames: int) -> None:
        super().__init__()
        self.spatial = nn.Parameter(torch.empty(grid * grid, width))
        self.frames = nn.Parameter(torch.zeros(max_frames, width))
        nn.init.trunc_normal_(self.spatial, std=0.02, a=-0.04, b=0.04)

    def forward(self, T: int, gh: int, gw: int) -> torch.Tensor:
        """The table ``[T*gh*gw, D]`` (frame-major)."""
        if T > self.frames.shape[0]:
            raise ValueError(f"the learnt frame table holds {self.frames.shape[0]} frames (vision.max_frames), got {T}")
        spatial = resize_grid_table(self.spatial, gh, gw)
        return (self.frames[:T, None, :] + spatial[None]).reshape(T * gh * gw, -1)


def vit_config(size: str, **overrides) -> VisionConfig:
    """The VisionConfig preset ``tiny | demo | b16 | l16``; keyword overrides win."""
    if size not in _PRESETS:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(_PRESETS)}")
    return replace(VisionConfig(size=size, **_PRESETS[size]), **overrides)


class ViTOutput(NamedTuple):
    """tokens: ``[B, n, D]`` after the final norm; layers: ``[K, B, n, D]`` (last K blocks, same norm) or None."""

    tokens: torch.Tensor
    layers: torch.Tensor | None


class PatchEmbed(nn.Module):
    """Conv3d patchify: video ``[B, C, T, H, W]`` -> tokens ``[B, T'*N, D]`` (frame-major)."""

    def __init__(self, in_channels: int, width: int, patch: int, tubelet: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, width, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel equals the stride, so the convolution is one matmul over non-overlapping patches. Written as
        # that matmul (same weights, same sums): on a CPU oneDNN's Conv3d took 4.3 ms forward + backward for a demo
        # batch against 2.2 ms for the reshape + linear, and the demo runs it three times a video step.
        B, C, T, H, W = x.shape
        tub, p = self.proj.kernel_size[0], self.proj.kernel_size[1]
        if T % tub or H % p or W % p:
            raise ValueError(f"input [{C}, {T}, {H}, {W}] does not split into {tub}x{p}x{p} patches")
        patches = x.reshape(B, C, T // tub, tub, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(B, (T // tub) * (H // p) * (W // p), C * tub * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop(attn(norm1 x))``, then ``x + drop(mlp(norm2 x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float, eps: float) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = Attention(dim, heads, qkv_bias="qv")
        self.norm2 = layer_norm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act="gelu")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VideoViT(nn.Module):
    """The student ViT. Input video ``[B, T, 3, H, W]`` float in [0, 1] (normalised inside with cfg.mean/std).

    Stems (``cfg.stem``): ``rgb`` = per-frame 16x16 patches (Conv3d kernel (1, p, p), UMT-loadable); ``diff`` =
    6 input channels, RGB plus the difference to the previous frame (zero for frame 0); ``tubelet2`` = patches
    spanning 2 frames (T must be even, T' = T/2). No class token.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.stem not in _STEM_CHANNELS:
            raise ValueError(f"vision.stem must be one of {sorted(_STEM_CHANNELS)}, got {cfg.stem!r}")
        if cfg.pos_embed not in POS_EMBED_CHOICES:
            raise ValueError(f"vision.pos_embed must be one of {POS_EMBED_CHOICES}, got {cfg.pos_embed!r}")
        check_heads(cfg.width, cfg.heads, "vision")
        self.cfg = cfg
        self.tubelet = 2 if cfg.stem == "tubelet2" else 1
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 1, 3, 1, 1), persistent=False)
        self.patch_embed = PatchEmbed(_STEM_CHANNELS[cfg.stem], cfg.width, cfg.patch_size, self.tubelet)
        # Plain Python (not torch.linspace) so the model can be built on the meta device for size checks.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, rate, cfg.norm_eps) for rate in rates
        )
        self.norm = layer_norm(cfg.width, cfg.norm_eps)
        self.pool_norm = layer_norm(cfg.width, cfg.norm_eps)
        init_linear_trunc_normal(self)
        # created after the initialisation above so that the learnt table's random draw comes last: every other
        # layer starts from the same values as without these options
        if cfg.pos_embed == "learned":
            if cfg.img_size % cfg.patch_size:
                raise ValueError(f"vision.img_size {cfg.img_size} is not divisible by patch_size {cfg.patch_size}")
            self.position = LearnedPosition(cfg.img_size // cfg.patch_size, cfg.width, cfg.max_frames)
        self.pre_norm = layer_norm(cfg.width, cfg.norm_eps) if cfg.pre_norm else None

    @property
    def width(self) -> int:
        return self.cfg.width

    def grid(self, T: int, H: int, W: int) -> tuple[int, int]:
        """``(T', N)``: token frames and tokens per frame for a ``T x H x W`` input."""
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {p}")
        if T % self.tubelet:
            raise ValueError(f"stem 'tubelet2' needs an even number of frames, got T={T}")
        return T // self.tubelet, (H // p) * (W // p)

    def position_embedding(self, T: int, gh: int, gw: int, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Position embedding ``[T*gh*gw, D]`` for the input's actual grid: a fixed sincos table (not a parameter:
        any grid works), cached per (grid, device, dtype), or the learnt table (``pos_embed: learned``)."""
        if self.cfg.pos_embed == "learned":
            return self.position(T, gh, gw).to(device=device, dtype=dtype)
        shape = (T, gh, gw) if self.cfg.pos_embed == "3d" else (T * gh * gw,)
        return sincos_table(shape, self.cfg.width, device, dtype)

    def _stem_input(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised video ``[B, T, 3, H, W]`` -> Conv3d input ``[B, C, T, H, W]``."""
        x = (video - self.mean.to(video.dtype)) / self.std.to(video.dtype)
        if self.cfg.stem == "diff":
            previous = torch.cat([x[:, :1], x[:, :-1]], dim=1)
            x = torch.cat([x, x - previous], dim=2)
        return x.transpose(1, 2)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embedding (then ``pre_norm`` when on): ``[B, T'*N, D]``."""
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be [B, T, 3, H, W], got shape {tuple(video.shape)}")
        _, T, _, H, W = video.shape
        t_tokens, _ = self.grid(T, H, W)
        x = self.patch_embed(self._stem_input(video))
        pos = self.position_embedding(t_tokens, H // self.cfg.patch_size, W // self.cfg.patch_size, x.device, x.dtype)
        x = x + pos
        return x if self.pre_norm is None else self.pre_norm(x)

    @staticmethod
    def select_kept(x: torch.Tensor, keep: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Tokens where ``keep [B, n_all]`` is True, in order: ``[B, n_all, D] -> [B, n, D]``.

        ``count``: the number of True entries per sample when the caller knows it (the masks of a training step);
        the gather then reads nothing back from the device. Without it the counts are read and checked.
        """
        if keep.dtype != torch.bool or keep.shape != x.shape[:2]:
            raise ValueError(f"keep must be bool [B, T*N] = {list(x.shape[:2])}, got {keep.dtype} {list(keep.shape)}")
        if count is not None:
            return gather_tokens(x, kept_index(keep, count))
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"keep must select the same number of tokens in every sample, got counts {counts.tolist()}")
        return x[keep].view(x.shape[0], int(counts[0]), x.shape[2])

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    @staticmethod
    def weight_tokens(x: torch.Tensor, keep: torch.Tensor | None, keep_weight: torch.Tensor) -> torch.Tensor:
        """Embedded tokens ``[B, n_all, D]`` times a float ``keep_weight [B, n_all]`` (1 on every kept token).

        The weight is STM's straight-through mask (or its complement): 1 or 0 in value, so the kept tokens are
        unchanged, but its gradient carries every loss computed from these tokens back to the mask scores.
        """
        if keep is None:
            raise ValueError("keep_weight needs keep: it weights the tokens that keep selects")
        if keep_weight.shape != x.shape[:2]:
            raise ValueError(f"keep_weight must be [B, T*N] = {list(x.shape[:2])}, got {list(keep_weight.shape)}")
        return x * keep_weight.unsqueeze(-1).to(x.dtype)

    def forward(
        self,
        video: torch.Tensor,
        keep: torch.Tensor | None = None,
        return_layers: int = 0,
        keep_weight: torch.Tensor | None = None,
        keep_count: int | None = None,
    ) -> ViTOutput:
        """Encode ``video [B, T, 3, H, W]``; ``keep`` bool ``[B, T'*N]`` runs only the True tokens.

        ``keep_weight`` (float ``[B, T'*N]``, 1 where ``keep`` is True) multiplies the tokens after the patch and
        position embedding and before the kept ones are gathered, where the reference STM code applies its
        straight-through mask. ``keep_count``: True entries per sample of ``keep``, when known (see select_kept).

        Returns ``ViTOutput(tokens [B, n, D], layers [K, B, n, D] | None)`` with K = ``return_layers``.
        """
        if not 0 <= return_layers <= len(self.blocks):
            raise ValueError(f"return_layers must be in [0, {len(self.blocks)}], got {return_layers}")
        x = self.embed(video)
        if keep_weight is not None:
            x = self.weight_tokens(x, keep, keep_weight)
        if keep is not None:
            x = self.select_kept(x, keep, keep_count)
        first_returned = len(self.blocks) - return_layers
        collected = []
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x)
            if i >= first_returned:
                collected.append(self.norm(x))
        tokens = collected[-1] if collected else self.norm(x)
        return ViTOutput(tokens, torch.stack(collected) if collected else None)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Video embedding ``pool_norm(mean over tokens)``: ``[B, n, D] -> [B, D]``."""
        return self.pool_norm(tokens.mean(dim=1))

    def pool_frames(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        """Per-frame embeddings ``pool_norm(mean over each frame's N tokens)``: ``[B, T'*N, D] -> [B, T', D]``."""
        b, n, d = tokens.shape
        if n % frames:
            raise ValueError(f"{n} tokens do not split into {frames} frames (pool_frames needs all tokens)")
        return self.pool_norm(tokens.view(b, frames, n // frames, d).mean(dim=2))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module (for the size checks against ViT-B/L)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["VideoViT", "ViTOutput", "vit_config", "count_parameters"]
