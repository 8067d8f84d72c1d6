"""The synthetic 4-class multi-channel pattern set of the classic DiT walkthrough.

Over a grid x, y in [-pi, pi]:  class 0 sin(2x), class 1 sin(4y), class 2 sign(sin 3x sin 3y)
(checkerboard), class 3 exp(-r^2 / 2) cos(4r) (radial ripple). Channel i adds 0.1 i; then Gaussian
noise; then each image is normalised to [-1, 1].
"""
from __future__ import annotations

import math

import torch

from ditkit.data.dataset import ImageDataset

CLASS_NAMES = ["sin 2x", "sin 4y", "checkerboard", "radial ripple"]


def pattern(k: int, image_size: int) -> torch.Tensor:
    """The noiseless (image_size, image_size) pattern of class k."""
    axis = torch.linspace(-math.pi, math.pi, image_size, dtype=torch.float64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    r = torch.sqrt(x**2 + y**2)
    return [torch.sin(2 * x), torch.sin(4 * y), torch.sign(torch.sin(3 * x) * torch.sin(3 * y)),
            torch.exp(-r**2 / 2) * torch.cos(4 * r)][k]


def make_patterns(n_per_class: int, image_size: int = 32, channels: int = 3, noise: float = 0.05,
                  seed: int = 0) -> ImageDataset:
    """n_per_class images of each of the 4 classes, deterministic from `seed`."""
    if n_per_class < 1 or image_size < 2 or channels < 1:
        raise ValueError("patterns need n_per_class >= 1, image_size >= 2 and channels >= 1")
    g = torch.Generator().manual_seed(seed)
    offsets = 0.1 * torch.arange(channels, dtype=torch.float64)[:, None, None]
    images, labels = [], []
    for k in range(4):
        base = pattern(k, image_size)[None] + offsets  # (C, H, W)
        x = base[None] + noise * torch.randn(n_per_class, channels, image_size, image_size, generator=g,
                                             dtype=torch.float64)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        images.append((2 * (x - lo) / (hi - lo).clamp_min(1e-12) - 1).float())
        labels.append(torch.full((n_per_class,), k, dtype=torch.long))
    return ImageDataset(images=torch.cat(images), labels=torch.cat(labels), num_classes=4,
                        class_names=list(CLASS_NAMES), hflip=False)
