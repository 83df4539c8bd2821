"""MVM decoders: STM's spatio-temporal decoder (docs/method.md) and UMT's plain linear decoder.

Both map student tokens of width D to teacher target width C. STM builds one STDecoder per returned student layer;
the decoder reconstructs every token of the clip (visible and masked), UMT's decoder only the visible ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stmvl.models.config import PredictorConfig
from stmvl.models.layers import sincos_table
from stmvl.models.masking import gather_tokens, kept_index
from stmvl.models.predictor import TemporalPointPredictor, pairs_to_frames


def scatter_to_grid(visible: Tensor, keep: Tensor) -> Tensor:
    """Put the kept tokens back at their positions; every other slot is 0.

    Args:
        visible: [B, n, D] tokens of the kept positions, in increasing token-index order.
        keep: bool [B, T*N], True = kept; n kept per sample.

    Returns:
        [B, T*N, D].
    """
    b, total = keep.shape
    n, d = visible.shape[1], visible.shape[-1]
    index = kept_index(keep, n).unsqueeze(-1).expand(b, n, d)
    return visible.new_zeros(b, total, d).scatter(1, index, visible)


class PredictionHead(nn.Module):
    """Linear(D -> C) + LayerNorm: the per-token head onto the teacher's target space."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.head = nn.Linear(width, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.head(x))


class LinearDecoder(PredictionHead):
    """UMT's decoder (``Linear_Decoder``): visible tokens [B, n, D] -> [B, n, C].

    As UMT's ``PretrainVisionTransformer.forward``, the tokens first get ``clip_pos_embed`` once more: the 1-D sincos
    table over the T*N token index at width D (the encoder's own table), taken at the visible positions. Submodule
    names `head` and `norm` match UMT's `clip_decoder.i.{head,norm}` checkpoint keys.
    """

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Args:
            x: [B, n, D] tokens of the kept positions, in increasing token-index order.
            keep: bool [B, T*N], True = kept (n per sample); None = x holds every token of the clip (n = T*N).

        Returns:
            [B, n, C].
        """
        b, n, d = x.shape
        total = n if keep is None else keep.shape[1]
        pos = sincos_table((total,), d, x.device, x.dtype).expand(b, -1, -1)
        if keep is not None:
            if keep.shape[0] != b:
                raise ValueError(f"keep {list(keep.shape)} does not cover the {b} samples of x")
            pos = gather_tokens(pos, kept_index(keep, n))
        return super().forward(x + pos)


def split_pair_channels(features: Tensor) -> Tensor:
    """Pair CNN features -> per-frame interaction features, as the reference decoder splits them.

    The first half of a pair's channels belongs to its earlier frame, the second half to its later frame; a frame
    inside the clip averages the halves it gets from its two pairs (pairs_to_frames).

    Args:
        features: [B, P, hidden, gh, gw] features of the P = T - 1 pairs.

    Returns:
        [B, T, hidden / 2, gh, gw].
    """
    half = features.shape[2] // 2
    per_pair = torch.stack([features[:, :, :half], features[:, :, half:]], dim=2)  # [B, P, 2, half, gh, gw]
    return pairs_to_frames(per_pair, "second")


class PairAlignment(nn.Module):
    """Pair-alignment block: a temporal point predictor over adjacent frames of the zero-filled grid.

    Its input is the zero-filled grid plus the decoder position embedding, at the student width (no projection in
    front of the pair CNN). Gives the aligned frame map (tokens weighted by their frame's temporal heatmap) and the
    interaction map (the pair CNN's channels split between the two frames of each pair, averaged per frame, mixed
    over time by a Conv3d(3,1,1) and projected to D).
    """

    def __init__(self, width: int, cfg: PredictorConfig):
        super().__init__()
        if cfg.hidden % 2:
            raise ValueError(f"predictor.hidden must be even (its channels split between two frames), got {cfg.hidden}")
        # The reference decoder weights a clip's last frame with the last pair's second point, whatever the masking
        # predictor does, so this copy ignores cfg.last_frame_point.
        self.predictor = TemporalPointPredictor(width, cfg, project=False, last_frame="second")
        half = cfg.hidden // 2
        self.temporal_mix = nn.Conv3d(half, half, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.interaction_proj = nn.Linear(half, width)

    def forward(self, grid: Tensor, gh: int, gw: int, halve_jitter: bool = False) -> tuple[Tensor, Tensor] | None:
        """grid [B, T, N, D] (zero-filled + position) -> (aligned [B, T, N, D], interaction [B, T, N, D]);
        None when T = 1."""
        out = self.predictor(grid, gh, gw, halve_jitter)
        if out is None:
            return None
        aligned = out.frame_map.unsqueeze(-1) * grid
        per_frame = split_pair_channels(out.features)  # [B, T, hidden/2, gh, gw]
        mixed = self.temporal_mix(per_frame.transpose(1, 2))  # [B, hidden/2, T, gh, gw]
        b, half, t = mixed.shape[:3]
        interaction = self.interaction_proj(mixed.reshape(b, half, t, gh * gw).permute(0, 2, 3, 1))
        return aligned, interaction


def decoder_position(frames: int, gh: int, gw: int, width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """The decoder's position embedding [T*N, D]: 1-D sincos over the frame-major token index (the reference's
    table for the decoder; on an image it is the first N rows). Cached per (size, device, dtype): read-only."""
    return sincos_table((frames * gh * gw,), width, device, dtype)


class STDecoder(nn.Module):
    """Spatio-temporal decoder for one student layer (docs/method.md, "Spatio-temporal decoder").

    Args:
        width: student width D.
        text_width: width of the caption embedding that fills the masked slots (projected to D when different).
        out_dim: teacher target width C.
        predictor_cfg: configuration of the pair-alignment predictor (its own weights).
    """

    def __init__(self, width: int, text_width: int, out_dim: int, predictor_cfg: PredictorConfig | None = None):
        super().__init__()
        self.width = width
        self.text_proj = nn.Linear(text_width, width) if text_width != width else nn.Identity()
        self.alignment = PairAlignment(width, predictor_cfg or PredictorConfig())
        self.fc_aligned = nn.Linear(width, width)
        self.fc_interaction = nn.Linear(width, width)
        # Zero-init residual branches: the decoder starts as the text-filled grid and learns how much to align.
        for fc in (self.fc_aligned, self.fc_interaction):
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.head = PredictionHead(width, out_dim)

    def forward(
        self,
        visible: Tensor,
        keep: Tensor,
        frames: int,
        gh: int,
        gw: int,
        text_embed: Tensor,
        mask_weight: Tensor | None = None,
        halve_jitter: bool = False,
    ) -> Tensor:
        """Predict teacher targets for every token of the clip.

        Clips (T >= 2): head(zero-filled + position + caption in the masked slots + FC_a(aligned) + FC_i(interaction)),
        the alignment branches reading the zero-filled grid plus position. Images (T = 1): head(zero-filled +
        position), as the reference decoder does for a non-temporal mask.

        Args:
            visible: [B, n, D] student tokens of the kept positions.
            keep: bool [B, T*N], True = kept (visible).
            frames, gh, gw: the token grid (T frames of gh x gw).
            text_embed: [B, D_text] caption embedding (text encoder class token).
            mask_weight: [B, T*N] float mask, 1 = masked, equal to ~keep in value; when it carries a
                straight-through gradient (mask.straight_through 'decoder' or 'both'), the MVM loss trains the mask
                scores through the fill as well. None = the hard mask.

        Returns:
            [B, T*N, C] predictions.
        """
        b, total = keep.shape
        n = gh * gw
        if total != frames * n:
            raise ValueError(f"mask covers {total} tokens, the grid {frames}x{gh}x{gw} has {frames * n}")
        m = (~keep).to(visible.dtype) if mask_weight is None else mask_weight.to(visible.dtype)
        m = m.unsqueeze(-1)
        pos = decoder_position(frames, gh, gw, self.width, visible.device, visible.dtype)
        grid = scatter_to_grid(visible, keep) * (1 - m) + pos
        if frames == 1:
            return self.head(grid)
        out = grid + m * self.text_proj(text_embed).unsqueeze(1)
        aligned, interaction = self.alignment(grid.view(b, frames, n, -1), gh, gw, halve_jitter)
        out = out + self.fc_aligned(aligned.flatten(1, 2)) + self.fc_interaction(interaction.flatten(1, 2))
        return self.head(out)
