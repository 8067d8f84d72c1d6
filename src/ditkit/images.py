"""Images out: grids, the real-vs-generated comparison figure, loss curves. Every file is written atomically."""
from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ditkit.io import atomic_path


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (clamped) -> (N, H, W, 1 or 3) uint8.

    1 channel stays grey and 3 are RGB; more (e.g. 4 latent channels) show their first 3 as RGB, and 2
    show as red and green.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    x = x.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] == 2:
        x = torch.cat([x, torch.full_like(x[:, :1], -1.0)], dim=1)
    elif x.shape[1] > 3:
        x = x[:, :3]
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) images, `nrow` per row, into one uint8 array
    (rows * (H + padding) + padding, nrow * (W + padding) + padding, 1 or 3)."""
    if nrow < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1 and padding >= 0, got {nrow} and {padding}")
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    rows = max(1, math.ceil(n / nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = tile
    return grid


def save_png(path: str | os.PathLike, array: np.ndarray, scale: int = 1) -> None:
    """Write an (H, W, 1 or 3) uint8 array as a PNG, each pixel enlarged to `scale` x `scale`."""
    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_grid(path: str | os.PathLike, images: Tensor, nrow: int, scale: int = 1) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid, `nrow` per row, enlarged `scale` times."""
    save_png(path, make_grid(images, nrow), scale)


def clip_frames(clips: Tensor, nrow: int, scale: int = 1) -> list[np.ndarray]:
    """Clips (N, C, F, H, W) in [-1, 1] -> F uint8 grids (one per frame, `nrow` clips per row, see
    `make_grid`), each pixel enlarged to `scale` x `scale`."""
    if clips.ndim != 5 or scale < 1:
        raise ValueError(f"expected clips (N, C, F, H, W) and scale >= 1, got {tuple(clips.shape)} and {scale}")
    return [make_grid(clips[:, :, f], nrow).repeat(scale, axis=0).repeat(scale, axis=1)
            for f in range(clips.shape[2])]


def save_gif(path: str | os.PathLike, clips: Tensor, nrow: int, scale: int = 1, fps: float = 8.0) -> None:
    """Write clips (N, C, F, H, W) in [-1, 1] as one looping animated GIF of grids (Pillow)."""
    frames = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in clip_frames(clips, nrow, scale)]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                       loop=0)


def save_mp4(path: str | os.PathLike, clips: Tensor, nrow: int, scale: int = 1, fps: float = 8.0) -> None:
    """Write clips (N, C, F, H, W) in [-1, 1] as an H.264 MP4 of grids; needs imageio-ffmpeg."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ValueError("writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                         "a .gif needs nothing") from None
    frames = clip_frames(clips, nrow, scale)
    # H.264 wants sides divisible by 16 (or ffmpeg rescales): pad with the grid's white
    h, w = frames[0].shape[:2]
    pad = ((0, -h % 16), (0, -w % 16), (0, 0))
    frames = [np.pad(np.broadcast_to(a, (h, w, 3)), pad, constant_values=255) for a in frames]
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(str(tmp), (w + pad[1][1], h + pad[0][1]), fps=fps,
                                             output_params=["-f", "mp4"])  # the temp name has no .mp4
        writer.send(None)  # start the generator
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()


def shown_classes(num_classes: int, most: int = 10) -> list[int]:
    """At most `most` class indices, evenly spaced over 0..num_classes-1: the columns of a sample grid (a
    caption set or ImageNet has far more classes than a grid can show)."""
    return torch.linspace(0, num_classes - 1, min(num_classes, most)).round().long().tolist()


def save_image_folder(root: str | os.PathLike, images: Tensor, labels: Tensor | None = None) -> None:
    """Write (N, C, H, W) images in [-1, 1] one PNG each: ROOT/<label>/<index>.png, or ROOT/<index>.png
    without labels (the layout that `load_samples` and image-folder training read back)."""
    root = Path(root)
    for i, array in enumerate(to_uint8(images)):
        folder = root / str(int(labels[i])) if labels is not None else root
        folder.mkdir(parents=True, exist_ok=True)
        save_png(folder / f"{i:05d}.png", array)


def save_comparison(path: str | os.PathLike, real: Tensor, generated: Tensor, scale: int = 2) -> None:
    """The classic comparison figure: a row of real images (K, C, H, W), one per class, above R rows of
    generated ones (R, K, C, H, W) whose column k is class k, with a dark line between them."""
    if real.ndim != 4 or generated.ndim != 5 or generated.shape[1:] != real.shape:
        raise ValueError(f"expected real (K, C, H, W) and generated (R, K, C, H, W), got "
                         f"{tuple(real.shape)} and {tuple(generated.shape)}")
    K = real.shape[0]
    top = make_grid(real, nrow=K)
    bottom = make_grid(generated.reshape(-1, *real.shape[1:]), nrow=K)
    line = np.full((3, top.shape[1], top.shape[2]), 64, np.uint8)
    save_png(path, np.concatenate([top, line, bottom], axis=0), scale)


def _ema(values: np.ndarray, span: float) -> np.ndarray:
    """Exponential moving average that starts at the first finite value and steps over NaN/inf."""
    alpha = 2 / (span + 1)
    out = np.full_like(values, np.nan)
    acc = None
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out[i] = np.nan if acc is None else acc
    return out


def save_loss_curve(path: str | os.PathLike, steps: Sequence[float], losses: Sequence[float],
                    title: str = "training loss") -> None:
    """Plot the raw loss (faint) and its moving average against `steps` as a PNG.

    The y axis is logarithmic while every loss is positive. Needs matplotlib (pip install matplotlib,
    or ditkit[data]); it is drawn without pyplot, so no global backend or figure state is touched.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise RuntimeError("plotting the loss curve needs matplotlib: pip install matplotlib "
                           "(or pip install 'ditkit[data]')") from err
    steps_arr = np.asarray(steps, dtype=np.float64)
    losses_arr = np.asarray(losses, dtype=np.float64)
    if steps_arr.shape != losses_arr.shape or steps_arr.ndim != 1:
        raise ValueError(f"steps and losses must be equal-length sequences, got {len(steps)} and {len(losses)}")
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot(steps_arr, losses_arr, alpha=0.3, lw=1, label="loss")
    # smooth over ~1/20 of the run, so short and long runs both show a readable trend
    ax.plot(steps_arr, _ema(losses_arr, span=max(5.0, len(losses_arr) / 20)), lw=2, label="moving average")
    finite = losses_arr[np.isfinite(losses_arr)]
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
