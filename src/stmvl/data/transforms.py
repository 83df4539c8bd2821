"""Clip transforms on uint8 tensors ``[T, 3, H, W]`` without torchvision.

Every random parameter is drawn once per clip (all frames get the same crop and flip) from an explicit
``torch.Generator``, so a sample is reproducible from its seed regardless of the DataLoader worker that loads it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_clip(video: torch.Tensor) -> None:
    if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a uint8 clip [T, 3, H, W], got {video.dtype} {tuple(video.shape)}")


def resize_clip(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased) resize of uint8 [T, 3, H, W] to [T, 3, size[0], size[1]], rounded back to uint8."""
    _check_clip(video)
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    resized = F.interpolate(video.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of a random area fraction in ``scale`` and aspect ratio in ``ratio``.

    Ten tries at the requested area/ratio (as in the usual RandomResizedCrop), then a centred crop clamped to the
    ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class TrainTransform:
    """RandomResizedCrop(scale, bicubic) to ``size`` x ``size`` + optional horizontal flip, same for all frames.

    ``__call__(video uint8 [T,3,H,W], generator) -> uint8 [T,3,size,size]``. Keep ``hflip=False`` for corpora whose
    captions say "left"/"right" (the synthetic corpus): a flip would contradict the caption.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = False):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        self.size, self.scale, self.ratio, self.hflip = int(size), tuple(scale), tuple(ratio), bool(hflip)

    def __call__(self, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_clip(video)
        top, left, h, w = random_resized_crop_params(video.shape[-2], video.shape[-1], self.scale, self.ratio,
                                                     generator)
        out = resize_clip(video[..., top:top + h, left:left + w], (self.size, self.size))
        if self.hflip and bool(torch.rand(1, generator=generator) < 0.5):
            out = out.flip(-1)
        return out


class EvalTransform:
    """Deterministic resize to ``size`` x ``size`` (UMT's eval resize), or shorter side + centre crop.

    ``__call__(video uint8 [T,3,H,W], generator=None) -> uint8 [T,3,size,size]``.
    """

    def __init__(self, size: int, center_crop: bool = False):
        self.size, self.center_crop = int(size), bool(center_crop)

    def __call__(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_clip(video)
        if not self.center_crop:
            return resize_clip(video, (self.size, self.size))
        h, w = video.shape[-2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.size, int(round(h * scale))), max(self.size, int(round(w * scale)))
        resized = resize_clip(video, (new_h, new_w))
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return resized[..., top:top + self.size, left:left + self.size].contiguous()


def build_transform(train: bool, size: int, hflip: bool = False, scale: tuple[float, float] = (0.5, 1.0),
                    center_crop: bool = False):
    """TrainTransform for training (random crop, optional flip), EvalTransform otherwise."""
    return TrainTransform(size, scale=scale, hflip=hflip) if train else EvalTransform(size, center_crop=center_crop)


def to_float(video: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 in [0, 1] (the model input range of docs/internals.md)."""
    if video.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {video.dtype}")
    return video.float().div_(255.0)


def normalize(video: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std over the channel axis of float [..., 3, H, W] in [0, 1] (student: ImageNet, teacher: CLIP)."""
    if not video.is_floating_point():
        raise ValueError(f"normalize expects float frames in [0, 1], got {video.dtype}")
    shape = (3, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=video.dtype, device=video.device).view(shape)
    std_t = torch.as_tensor(std, dtype=video.dtype, device=video.device).view(shape)
    return (video - mean_t) / std_t
