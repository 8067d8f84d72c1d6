"""Images out: grids, the real-vs-generated comparison figure, loss curves. Every file written atomically."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ditkit.io import atomic_path


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3 or 1) uint8; more than 3 channels (latents) show the first 3."""
    x = x.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], dim=1)
    elif x.shape[1] > 3:
        x = x[:, :3]
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) images, `nrow` per row, into one (rows * (H + pad) + pad, ..., C) uint8 array."""
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = tile
    return grid


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_grid(path: str | os.PathLike, images: Tensor, nrow: int, scale: int = 1) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid, optionally enlarged `scale` times."""
    grid = make_grid(images, nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    save_png(path, grid)


def save_comparison(path: str | os.PathLike, real: Tensor, generated: Tensor, scale: int = 2) -> None:
    """The classic comparison figure: one row of real images (K, C, H, W), one per class, above R rows of
    generated ones (R, K, C, H, W) whose column k is class k, separated by a dark line."""
    K = real.shape[0]
    top = make_grid(real, nrow=K)
    bottom = make_grid(generated.reshape(-1, *generated.shape[2:]), nrow=K)
    line = np.full((3, top.shape[1], top.shape[2]), 64, np.uint8)
    figure = np.concatenate([top, line, bottom], axis=0)
    save_png(path, figure.repeat(scale, axis=0).repeat(scale, axis=1))


def save_loss_curve(path: str | os.PathLike, steps: Sequence[float], losses: Sequence[float],
                    title: str = "training loss") -> None:
    """Raw loss (faint) and its exponential moving average, log-scale y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses_arr = np.asarray(losses, dtype=np.float64)
    smooth, acc = np.empty_like(losses_arr), losses_arr[0]
    for i, v in enumerate(losses_arr):
        acc = 0.9 * acc + 0.1 * v
        smooth[i] = acc
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses_arr, alpha=0.3, lw=1, label="loss")
    ax.plot(steps, smooth, lw=2, label="moving average")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
