"""Transformer building blocks shared by the student ViT, the CLIP teacher and the BERT text encoder.

All attention goes through :func:`attend`: ``torch.nn.functional.scaled_dot_product_attention`` except when training
on a CPU in bf16/fp16, where it computes the same function with two batched matmuls and a softmax (see there). Masks
passed to the attention modules are boolean with True = "may attend" (the SDPA convention), shaped to broadcast
against ``[B, heads, n_query, n_key]``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
}


def activation(name: str):
    """The activation function called ``name`` (gelu | gelu_tanh | quick_gelu | relu)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """A LayerNorm with an explicit eps (ViTs use 1e-6, CLIP 1e-5, BERT 1e-12; never rely on the default)."""
    return nn.LayerNorm(dim, eps=eps)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, n, H*d] -> [B, H, n, d]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, n, d] -> [B, n, H*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def padding_mask_to_attn_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Key padding mask ``[B, n]`` (nonzero/True = real token) -> SDPA boolean mask ``[B, 1, 1, n]``."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"padding mask must be [B, n], got shape {tuple(mask.shape)}")
    return mask.bool()[:, None, None, :]


def _explicit_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attend` takes the matmul path: autograd on a CPU in a 16-bit float dtype."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d), masked) v`` as two batched matmuls: q ``[B, H, n, d]``, k/v ``[B, H, m, d]`` ->
    ``[B, H, n, d]``. Same function as SDPA, including its zeros for a query row whose mask allows no key (a plain
    softmax over all -inf would give NaN). ``attn_mask``: boolean (True = may attend) or additive float."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    empty_rows = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        empty_rows = ~attn_mask.any(dim=-1, keepdim=True)
    elif attn_mask is not None:
        scores = scores + attn_mask
    probs = scores.softmax(dim=-1)
    if empty_rows is not None and bool(empty_rows.any()):
        probs = probs.masked_fill(empty_rows, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs.to(v.dtype), v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention, q ``[B, H, n, d]``, k/v ``[B, H, m, d]`` -> ``[B, H, n, d]``.

    SDPA, except under autograd on a CPU in bf16/fp16, which takes :func:`explicit_attention`: there torch's CPU
    flash kernel (SDPA's pick) runs its backward 2.6-7.6x slower than the two matmuls and the softmax at the demo's
    sizes (`benchmarks/bench_attention.py`), while its forward is as fast or faster, so inference, the frozen teacher
    and fp32 training keep SDPA.
    """
    if _explicit_path(q, k, v):
        return explicit_attention(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (UMT/BEiT and CLIP layout).

    Args:
        dim: token width D.
        heads: number of heads (D must be divisible by it).
        qkv_bias: ``"qv"`` = separate ``q_bias`` and ``v_bias`` parameters and no key bias (UMT student; the
            key bias cancels in the softmax), ``"all"`` = one bias on ``qkv`` (CLIP), ``"none"``.

    ``forward(x [B, n, D], attn_mask=None) -> [B, n, D]``.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: str = "qv") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if qkv_bias not in ("qv", "all", "none"):
            raise ValueError(f"qkv_bias must be 'qv', 'all' or 'none', got {qkv_bias!r}")
        self.heads = heads
        self.qkv_bias_mode = qkv_bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "all")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values ``[B, heads, n, d]`` of tokens ``x [B, n, D]``."""
        bias = self.qkv.bias
        if self.qkv_bias_mode == "qv":
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        return _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        return self.proj(_merge_heads(attend(q, k, v, attn_mask=attn_mask)))


class CrossAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (BERT layout); keys may have another width.

    ``forward(x [B, n, D], context [B, m, Dc] | None, attn_mask=None) -> [B, n, D]``; with ``context=None`` it is
    self-attention on ``x`` (BERT's self-attention shares this layout). ``attn_mask`` broadcasts to
    ``[B, heads, n, m]``, True = may attend. ``context_index`` (long ``[B]``): ``context`` is ``[U, m, Dc]`` and row
    ``i`` of ``x`` attends to ``context[context_index[i]]``; keys and values are projected once per context row, so
    scoring many texts against few videos (ITM re-ranking, probes, multiple choice) does not re-project a video for
    every pair.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        context_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        q = _split_heads(self.q(x), self.heads)
        k = _split_heads(self.k(context), self.heads)
        v = _split_heads(self.v(context), self.heads)
        if context_index is not None:
            # index_select, not k[context_index]: its backward is an index_add, where advanced indexing's is an
            # accumulating index_put (2.0 against 0.3 ms for the demo's fusion pairs on a CPU)
            k, v = k.index_select(0, context_index), v.index_select(0, context_index)
        p = self.dropout if self.training else 0.0
        return self.out(_merge_heads(attend(q, k, v, attn_mask=attn_mask, dropout_p=p)))


class Mlp(nn.Module):
    """Two-layer feed-forward ``fc2(act(fc1(x)))``: ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act_name = act
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of positions ``[n]`` -> ``[n, dim]`` (float32).

    Channels are interleaved (sin at even, cos at odd indices) with frequency ``10000 ** (-2i / dim)``, the
    layout of UMT's ``get_sinusoid_encoding_table``, so UMT checkpoints see the embedding they were trained with.
    """
    if dim % 2:
        raise ValueError(f"sincos embedding width must be even, got {dim}")
    positions = positions.to(torch.float64).reshape(-1, 1)
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions * freq
    table = torch.empty(positions.shape[0], dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


@functools.lru_cache(maxsize=64)
def _cached_table(kind: str, shape: tuple[int, ...], dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # a normal tensor even when first asked for under inference_mode (an inference tensor could not be saved for a
    # later backward)
    with torch.inference_mode(False), torch.no_grad():
        table = sincos_1d(torch.arange(shape[0]), dim) if kind == "1d" else sincos_3d(*shape, dim)
        return table.to(device=device, dtype=dtype)


def sincos_table(shape: tuple[int, ...], dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fixed sincos table, built once per (shape, width, device, dtype) and then served from a cache.

    `shape` (n,) gives `sincos_1d(arange(n), dim)`; (t, gh, gw) gives `sincos_3d(t, gh, gw, dim)`. Without the cache
    every forward rebuilt the table in float64 on the CPU and copied it to the GPU (several times per step: the
    student passes and every decoder). The result is shared: never modify it in place.
    """
    kind = "1d" if len(shape) == 1 else "3d"
    return _cached_table(kind, tuple(int(s) for s in shape), int(dim), torch.device(device), dtype)


def resize_grid_table(table: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """A learnt square position table ``[g*g, D]`` for a ``gh x gw`` grid: itself when the grid matches, else a
    bicubic interpolation (as CLIP-style models do for another image size). Returns ``[gh*gw, D]``."""
    g = int(round(table.shape[0] ** 0.5))
    if g * g != table.shape[0]:
        raise ValueError(f"a position table of {table.shape[0]} rows is not a square grid")
    if (gh, gw) == (g, g):
        return table
    grid = table.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(table.dtype)


def _axis_widths(dim: int, axes: int) -> list[int]:
    """Split ``dim`` into even per-axis widths; the first axis takes the remainder."""
    if dim % 2:
        raise ValueError(f"sincos embedding width must be even, got {dim}")
    base = 2 * (dim // (2 * axes))
    return [dim - base * (axes - 1)] + [base] * (axes - 1)


def sincos_2d(gh: int, gw: int, dim: int) -> torch.Tensor:
    """Separable 2-D sincos embedding of a ``gh x gw`` grid -> ``[gh*gw, dim]`` (row-major)."""
    dh, dw = _axis_widths(dim, 2)
    rows = sincos_1d(torch.arange(gh), dh)[:, None, :].expand(gh, gw, dh)
    cols = sincos_1d(torch.arange(gw), dw)[None, :, :].expand(gh, gw, dw)
    return torch.cat([rows, cols], dim=-1).reshape(gh * gw, dim)


def sincos_3d(t: int, gh: int, gw: int, dim: int) -> torch.Tensor:
    """Separable 3-D sincos embedding of a ``t x gh x gw`` grid -> ``[t*gh*gw, dim]`` (frame-major)."""
    dt, dh, dw = _axis_widths(dim, 3)
    frames = sincos_1d(torch.arange(t), dt)[:, None, None, :].expand(t, gh, gw, dt)
    rows = sincos_1d(torch.arange(gh), dh)[None, :, None, :].expand(t, gh, gw, dh)
    cols = sincos_1d(torch.arange(gw), dw)[None, None, :, :].expand(t, gh, gw, dw)
    return torch.cat([frames, rows, cols], dim=-1).reshape(t * gh * gw, dim)


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """ViT/BERT initialisation: truncated-normal Linear/Conv weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


def check_heads(width: int, heads: int, what: str) -> None:
    """Fail early, naming the component, when a width does not split into heads."""
    if heads <= 0 or width % heads:
        raise ValueError(f"{what}: width {width} is not divisible by heads {heads}")
