"""Condition images for structure control, computed from the data on the fly (nothing is stored).

Every condition maps images (N, C, H, W) in [-1, 1] to a condition image of the same size in [-1, 1], so
the control branch patchifies it like the image itself:
- "edges": Sobel gradient magnitude of the channel mean, 1 on strong edges, -1 on flat areas.
- "lowres": the image average-pooled LOWRES_FACTOR times smaller, then blown up again (nearest), so the
  sampler must fill in the detail (super-resolution as control).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOWRES_FACTOR = 4
# A step edge between -1 and 1 gives a Sobel magnitude of 8 (kernel weights 1, 2, 1 on either side);
# half of that already marks an edge, and saturating there keeps thin strokes as bright as thick ones.
_EDGE_FULL_SCALE = 4.0
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edges(images: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 1, H, W): Sobel edge magnitude in [-1, 1] (replicated border, so the frame
    of the image is not an edge)."""
    grey = images.float().mean(dim=1, keepdim=True)
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None].to(grey.device)  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)  # (N, 2, H, W)
    magnitude = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    return (magnitude / _EDGE_FULL_SCALE).clamp(max=1.0) * 2 - 1


def lowres(images: Tensor, factor: int = LOWRES_FACTOR) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W): each factor x factor block replaced by its mean."""
    H, W = images.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"lowres needs an image size divisible by {factor}, got {H}x{W}")
    small = F.avg_pool2d(images.float(), factor)
    return F.interpolate(small, scale_factor=factor, mode="nearest")


CONDITIONS = {"edges": edges, "lowres": lowres}


def condition_channels(name: str, image_channels: int) -> int:
    """How many channels condition `name` has for images of `image_channels` channels."""
    check_condition(name)
    return 1 if name == "edges" else image_channels


def check_condition(name: str) -> None:
    if name not in CONDITIONS:
        raise ValueError(f"unknown control condition {name!r}: expected one of {', '.join(CONDITIONS)}")


def make_condition(name: str, images: Tensor) -> Tensor:
    """The condition image of kind `name` ("edges" or "lowres") for images (N, C, H, W) in [-1, 1]."""
    check_condition(name)
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    return CONDITIONS[name](images)
