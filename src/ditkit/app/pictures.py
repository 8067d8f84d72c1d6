"""Samples as files for the page: one PNG (GIF for clips) per sample, and a grid of them."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from ditkit.images import clip_frames, make_grid


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def _gif(frames: list[np.ndarray], fps: float = 8.0) -> bytes:
    pictures = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in frames]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def grid_png(images: Tensor, ncol: int) -> bytes:
    """(N, C, H, W) in [-1, 1] -> a PNG grid `ncol` wide; clips (N, C, F, H, W) show their middle frame."""
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    return _png(make_grid(images, max(1, ncol)))


@dataclass
class Result:
    """A finished job's pictures; `media` is image/png or image/gif (clips); `notes`: what the Pipeline adapted
    (an upload resized or converted, how a first frame was kept)."""
    media: str
    images: list[bytes]
    grid: bytes
    labels: list[int]
    settings: dict[str, Any]
    ncol: int = 1  # columns of the grid (classes or prompts)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Any) -> Result:
        images, ncol = samples.images, max(1, int(samples.ncol))
        labels = [int(v) for v in samples.labels.tolist()] if samples.labels is not None else []
        settings = {k: v for k, v in dict(samples.settings or {}).items()
                    if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
        notes = [str(n) for n in getattr(samples, "notes", None) or []]
        if images.ndim == 5:  # one GIF per clip at its own size (no border, as the PNGs), and a grid of them
            clips = [_gif([make_grid(images[i:i + 1, :, f], 1, padding=0) for f in range(images.shape[2])])
                     for i in range(len(images))]
            return cls("image/gif", clips, _gif(clip_frames(images, ncol, scale=1)), labels, settings, ncol, notes)
        return cls("image/png", [_png(make_grid(images[i:i + 1], 1, padding=0)) for i in range(len(images))],
                   _png(make_grid(images, ncol)), labels, settings, ncol, notes)
