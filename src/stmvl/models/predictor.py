"""Temporal point predictor (docs/method.md, "Temporal point predictor"): where does the moving thing sit in each
pair of adjacent frames?

For every adjacent frame pair (t-1, t) the two token maps are stacked along channels on the patch grid and go
through a small interaction CNN; a point head turns the CNN features into two 2-D points in [-0.75, 0.75]^2, one
per frame of the pair. A point becomes a soft heatmap on the grid: per axis, a plateau around the point with a linear
fall-off on top of a constant floor, the two axes multiplied. A frame's temporal map is the mean of the heatmaps of
the (up to two) pairs that include it. The STM masking uses these maps as temporal scores; every spatio-temporal
decoder runs its own copy of this module (without the input projection) to align adjacent frames.

Grid coordinates are normalised to [-1, 1] with the first and last cell centres at -1 and 1; a point is (x, y)
with x along the width and y along the height.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stmvl.models.config import PredictorConfig


def grid_coordinates(cells: int, device=None, dtype=torch.float32) -> Tensor:
    """Normalised coordinates of `cells` cell centres along one axis: [cells] in [-1, 1] (0 for one cell)."""
    if cells == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, cells, device=device, dtype=dtype)


def axis_profile(distance: Tensor, plateau: float, slope: float) -> Tensor:
    """1 within |d| <= plateau, then falling linearly with `slope` until it reaches 0."""
    return (1.0 - slope * (distance.abs() - plateau)).clamp(0.0, 1.0)


HEATMAP_FORMS = ("product", "bump")
LAST_FRAME_POINTS = ("second", "first")


def heatmap(
    points: Tensor,
    gh: int,
    gw: int,
    plateau: float = 0.25,
    slope: float = 1.5,
    floor: float = 1.0,
    jitter: float = 0.0,
    form: str = "product",
) -> Tensor:
    """Heatmaps of 2-D points on a gh x gw grid.

    form "product" (the reference code): value(x, y) = (floor + profile(x - px)) * (floor + profile(y - py)), so
        with floor 1 the values lie in [1, 4]: 4 on the plateau around the point, 2 on the point's row or column
        away from it, 1 far from it on both axes.
    form "bump" (stmvl before it followed the reference): value(x, y) = floor + profile(x - px) * profile(y - py),
        values in [floor, floor + 1]; a flatter map, 2 at the point against 1 elsewhere.
    Either way the floor keeps every token selectable. With `jitter` > 0 the map is the mean over 9 copies of the
    point shifted by {-1, 0, 1}^2 * jitter (training).

    Args:
        points: [..., 2] points (x, y) in normalised grid coordinates.
        gh, gw: grid height and width in cells.
        jitter: offset step of the 9 jittered copies; 0 = the point alone (eval).
        form: "product" or "bump" (see above).

    Returns:
        [..., gh * gw] heatmap, row-major over the grid (index = row * gw + col).
    """
    if form not in HEATMAP_FORMS:
        raise ValueError(f"heatmap form must be one of {HEATMAP_FORMS}, got {form!r}")
    if jitter > 0:
        steps = torch.tensor([-1.0, 0.0, 1.0], device=points.device, dtype=points.dtype) * jitter
        offsets = torch.cartesian_prod(steps, steps)  # [9, 2]
        copies = points.unsqueeze(-2) + offsets  # [..., 9, 2]
        return heatmap(copies, gh, gw, plateau, slope, floor, 0.0, form).mean(dim=-2)
    xs = grid_coordinates(gw, points.device, points.dtype)
    ys = grid_coordinates(gh, points.device, points.dtype)
    px = axis_profile(xs - points[..., 0:1], plateau, slope)  # [..., gw]
    py = axis_profile(ys - points[..., 1:2], plateau, slope)  # [..., gh]
    if form == "product":
        return ((floor + py).unsqueeze(-1) * (floor + px).unsqueeze(-2)).flatten(-2)
    bump = py.unsqueeze(-1) * px.unsqueeze(-2)  # [..., gh, gw]
    return floor + bump.flatten(-2)


def pairs_to_frames(per_pair: Tensor, last: str = "second") -> Tensor:
    """Per-frame mean over the pairs that include each frame.

    Args:
        per_pair: [B, T-1, 2, ...] values of pair (t-1, t) for its first (index 0) and second (index 1) frame.
        last: what the last frame gets: "second" = the second-frame value of the last pair (its own value);
            "first" = the first-frame value of the last pair, i.e. frame T-2's value (the reference code's masking
            branch does this; docs/method.md lists it among the deliberate differences).

    Returns:
        [B, T, ...]: frame 0 and frame T-1 belong to one pair, every other frame to two.
    """
    if last not in LAST_FRAME_POINTS:
        raise ValueError(f"last-frame point must be one of {LAST_FRAME_POINTS}, got {last!r}")
    first, second = per_pair[:, :, 0], per_pair[:, :, 1]
    pad = torch.zeros_like(first[:, :1])
    total = torch.cat([first, pad], 1) + torch.cat([pad, second], 1)
    count = torch.full((per_pair.shape[1] + 1,), 2.0, device=per_pair.device, dtype=per_pair.dtype)
    count[0] = count[-1] = 1.0
    frames = total / count.view(1, -1, *([1] * (total.dim() - 2)))
    if last == "first":
        frames = torch.cat([frames[:, :-1], first[:, -1:]], 1)
    return frames


class SafeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that uses its running statistics when a training batch has one value per channel.

    Tiny grids pooled down to 1x1 with a single pair would otherwise make BatchNorm raise in training mode.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def conv_bn_relu(cin: int, cout: int, kernel: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
        SafeBatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InteractionCNN(nn.Module):
    """Pair CNN: depthwise 3x3 + BN + ReLU, 1x1 -> hidden + BN + ReLU, 3x3 hidden + BN + ReLU.

    Input [P, 2d, gh, gw] (two frames' maps stacked on channels), output [P, hidden, gh, gw].
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.depthwise = conv_bn_relu(2 * dim, 2 * dim, 3, groups=2 * dim)
        self.pointwise = conv_bn_relu(2 * dim, hidden, 1)
        self.mix = conv_bn_relu(hidden, hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(self.pointwise(self.depthwise(x)))


class PointHead(nn.Module):
    """CNN features [P, hidden, gh, gw] -> two points [P, 2, 2] in [-scale, scale]^2 (one per frame of the pair)."""

    def __init__(self, hidden: int, head_hidden: int, scale: float):
        super().__init__()
        self.block1 = self.conv_bn(hidden, head_hidden)
        self.block2 = self.conv_bn(head_hidden, head_hidden)
        # Two groups: each half of the channels predicts the point of one frame of the pair.
        self.fc1 = nn.Conv2d(head_hidden, head_hidden // 2, 1, groups=2)
        self.fc2 = nn.Conv2d(head_hidden // 2, 4, 1, groups=2)
        # Zero-init: every point starts at the grid centre, so the first heatmaps are centred, not random.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.scale = scale

    @staticmethod
    def conv_bn(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), SafeBatchNorm2d(cout))

    @staticmethod
    def pool_if_possible(x: Tensor) -> Tensor:
        # ceil_mode keeps odd grids whole; a grid already 1 cell wide along both axes has nothing to pool.
        if x.shape[-1] < 2 and x.shape[-2] < 2:
            return x
        return F.max_pool2d(x, 2, ceil_mode=True)

    def forward(self, features: Tensor) -> Tensor:
        x = F.relu(self.pool_if_possible(self.block1(features)))
        x = F.relu(self.pool_if_possible(self.block2(x)))
        x = x.amax(dim=(-2, -1), keepdim=True)
        x = self.fc2(F.relu(self.fc1(x))).flatten(1)  # [P, 4]
        return torch.tanh(x).view(-1, 2, 2) * self.scale


@dataclass
class PredictorOutput:
    """Outputs of the temporal point predictor for a clip of T >= 2 frames (P = T - 1 pairs).

    points: [B, P, 2, 2] point (x, y) of the first/second frame of each pair.
    pair_maps: [B, P, 2, N] heatmap of each frame of each pair.
    frame_map: [B, T, N] temporal map of each frame (mean over its pairs' maps).
    features: [B, P, hidden, gh, gw] interaction-CNN features of each pair.
    """

    points: Tensor
    pair_maps: Tensor
    frame_map: Tensor
    features: Tensor


class TemporalPointPredictor(nn.Module):
    """Temporal point predictor over adjacent frame pairs (docs/method.md, "Temporal point predictor").

    Args:
        in_dim: width W' of the input token maps.
        cfg: PredictorConfig (projection width d, CNN widths, heatmap shape, jitter, last-frame point).
        project: put Linear(W' -> d) + LayerNorm in front of the pair CNN (the masking predictor, which reads the
            teacher's tokens); False = the pair CNN reads the W'-wide maps directly (the ST decoder's copy).
        last_frame: "second" | "first" (see pairs_to_frames); None = cfg.last_frame_point.
    """

    def __init__(
        self, in_dim: int, cfg: PredictorConfig | None = None, project: bool = True, last_frame: str | None = None
    ):
        super().__init__()
        self.cfg = cfg = cfg or PredictorConfig()
        self.last_frame = last_frame or cfg.last_frame_point
        if self.last_frame not in LAST_FRAME_POINTS:
            raise ValueError(f"predictor.last_frame_point must be one of {LAST_FRAME_POINTS}, got {self.last_frame!r}")
        if cfg.heatmap not in HEATMAP_FORMS:
            raise ValueError(f"predictor.heatmap must be one of {HEATMAP_FORMS}, got {cfg.heatmap!r}")
        cnn_dim = cfg.dim if project else in_dim
        self.proj = nn.Linear(in_dim, cfg.dim) if project else nn.Identity()
        self.norm = nn.LayerNorm(cfg.dim) if project else nn.Identity()
        self.interaction = InteractionCNN(cnn_dim, cfg.hidden)
        self.head = PointHead(cfg.hidden, cfg.head_hidden, cfg.point_scale)

    def jitter_step(self, halve_jitter: bool) -> float:
        """Offset step of the 9 jittered copies: cfg.jitter in training (halved on request), 0 in eval."""
        if not self.training:
            return 0.0
        return self.cfg.jitter * (0.5 if halve_jitter else 1.0)

    def pair_inputs(self, maps: Tensor, gh: int, gw: int) -> Tensor:
        """[B, T, N, d] -> [B*(T-1), 2d, gh, gw]: frames t-1 and t stacked along channels."""
        b, t, n, d = maps.shape
        grid = maps.transpose(2, 3).reshape(b, t, d, gh, gw)
        return torch.cat([grid[:, :-1], grid[:, 1:]], dim=2).flatten(0, 1)

    def forward(self, tokens: Tensor, gh: int, gw: int, halve_jitter: bool = False) -> PredictorOutput | None:
        """Points, heatmaps and pair features of a clip.

        Args:
            tokens: [B, T, N, W'] per-frame token maps, N = gh * gw (row-major).
            halve_jitter: use half the jitter offsets (the schedule's second phase).

        Returns:
            PredictorOutput, or None for T = 1 (an image has no temporal map).
        """
        b, t, n, _ = tokens.shape
        if n != gh * gw:
            raise ValueError(f"token maps have N={n} tokens but the grid is {gh}x{gw}")
        if t < 2:
            return None
        maps = self.norm(self.proj(tokens))
        features = self.interaction(self.pair_inputs(maps, gh, gw))  # [B*P, hidden, gh, gw]
        points = self.head(features).view(b, t - 1, 2, 2)
        c = self.cfg
        pair_maps = heatmap(points, gh, gw, c.plateau, c.slope, c.floor, self.jitter_step(halve_jitter), c.heatmap)
        return PredictorOutput(
            points=points,
            pair_maps=pair_maps,
            frame_map=pairs_to_frames(pair_maps, self.last_frame),
            features=features.view(b, t - 1, *features.shape[1:]),
        )
