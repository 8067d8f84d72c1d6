"""Editing with a trained model: image-to-image (SDEdit, Meng et al. 2022) and inpainting (RePaint,
Lugmayr et al. 2022), under both objectives and with every sampler and guidance.

Both are ordinary sampling (`ditkit.sampling.sample`) started part-way and steered after each step:
- SDEdit: of the `steps` steps sampling would take, only the last round(strength * steps) run, from the
  image noised to the level where they start. strength 0 returns the image; strength 1 is plain sampling
  from the same seed (the start noise is used as it is, as sampling does).
- Inpainting: after every step the kept pixels are replaced by the image noised to the level reached,
  with fresh noise each time, and by the image itself at the end. Resampling jumps (jump_length,
  jump_n_sample) noise the state back and sample that stretch again, so that the generated pixels agree
  with the kept ones; without them the replacement alone ignores how the two parts correlate.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ditkit.data.folder import flatten
from ditkit.diffusion import FlowMatching, GaussianDiffusion
from ditkit.sampling import Editing, Guidance, sample, sampling_schedule

DEFAULT_STRENGTH = 0.6  # SDEdit's sweet spot between faithfulness and realism (Meng et al., fig. 4)


def check_image(model: Callable[..., Tensor], image: Tensor) -> None:
    """ValueError unless `image` is (N, C, H, W) with the channels and size the model was built for
    (checked when the model states them, as DiT does)."""
    if image.ndim != 4 or min(image.shape) < 1:
        raise ValueError(f"the image must be (N, C, H, W), got shape {tuple(image.shape)}")
    channels = getattr(model, "in_channels", None)
    if channels is not None and image.shape[1] != channels:
        raise ValueError(f"the image has {image.shape[1]} channel(s) but the model takes {channels}")
    size = getattr(model, "input_size", None)
    if size is not None and tuple(image.shape[-2:]) != tuple(size):
        H, W = image.shape[-2:]
        raise ValueError(f"the image is {H}x{W} but the model was built for {size[0]}x{size[1]}: resize it first")


def _keep_mask(mask: Tensor, image: Tensor) -> Tensor:
    """True where the image is kept (mask 0), broadcast to the image's shape."""
    if mask.ndim == 2:
        mask = mask[None, None]
    if mask.ndim != 4 or tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(f"the mask must be (H, W) or (N or 1, C or 1, H, W) with the image's size "
                         f"{tuple(image.shape[-2:])}, got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, image.shape[0]) or mask.shape[1] not in (1, image.shape[1]):
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(image.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("the mask must hold only 0 (keep) and 1 (regenerate): threshold it first")
    return (mask == 0).to(image.device).expand_as(image)


def noised_to_level(schedule: GaussianDiffusion | FlowMatching, steps: int, image: Tensor, level: int,
                    noise: Tensor) -> Tensor:
    """The image as the sampling loop's state at `level` would hold it (level 0: the noisiest, `steps`:
    the image itself): a draw of q(x_level | image) with the given noise."""
    if level == steps:
        return image
    if isinstance(schedule, FlowMatching):
        return schedule.q_sample(image, schedule.timesteps(steps)[level].reshape(1), noise)
    t = torch.full((image.shape[0],), steps - 1 - level, dtype=torch.long)
    return schedule.q_sample(image, t, noise)


def edit(model: Callable[..., Tensor], objective: GaussianDiffusion | FlowMatching, image: Tensor,
         mask: Tensor | None = None, strength: float | None = None, *, y: Tensor | None = None,
         guidance: Guidance | float | None = None, steps: int | None = None, sampler: str | None = None,
         jump_length: int = 1, jump_n_sample: int = 1, generator: torch.Generator | None = None,
         progress: bool = False, **options: Any) -> Tensor:
    """Edit images (N, C, H, W) in the model's range ([-1, 1] for pixels) with `model(x, t, y)`.

    mask: None for image-to-image; else (H, W) or (N or 1, C or 1, H, W), 1 where pixels are regenerated
    and 0 where the image is kept (inpainting). strength in [0, 1]: how much noise the edit starts from
    (None: 1 with a mask, DEFAULT_STRENGTH without). jump_length, jump_n_sample: RePaint's resampling
    jumps (inpainting only): every jump_length steps, go back jump_length steps and sample them again,
    jump_n_sample times in all. guidance and the rest (`options`: guided_channels, null_label, callback,
    ...) are as `ditkit.sampling.sample`; all noise comes from `generator`.
    """
    check_image(model, image)
    keep = None if mask is None else _keep_mask(mask, image)
    if strength is None:
        strength = 1.0 if mask is not None else DEFAULT_STRENGTH
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 = the image unchanged, 1 = pure noise), got {strength}")
    if mask is None and (jump_length, jump_n_sample) != (1, 1):
        raise ValueError("resampling jumps (jump_length, jump_n_sample) are for inpainting: give a mask")
    sampler, schedule, n = sampling_schedule(objective, sampler, steps)
    start = n - round(strength * n)
    if start == n:
        return image.clone()

    def draw() -> Tensor:
        return torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)

    noise = draw()  # drawn as sampling draws its start noise, so that strength 1 is plain sampling
    x = noise if start == 0 else noised_to_level(schedule, n, image, start, noise)

    def keep_known(x: Tensor, level: int) -> Tensor:
        return torch.where(keep, noised_to_level(schedule, n, image, level, draw()), x)

    steering = Editing(start, None if keep is None else keep_known, jump_length, jump_n_sample)
    return sample(model, objective, image.shape, y=y, guidance=guidance, steps=steps, sampler=sampler,
                  generator=generator, progress=progress, noise=x, editing=steering, **options)


# ------------------------------------------------------------------------------------------------
# Files: the input image and mask of `ditkit edit`
# ------------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike) -> Tensor:
    """(1, C, H, W) float32 in [-1, 1] from an image file, C = 1 for grey images and 3 for colour ones,
    at its own size (transparent pixels become white)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with Image.open(path) as im:
        im = flatten(im)  # transparency on white; 16-bit and float grey as "F" in [0, 1]
        grey = im.mode in ("1", "L", "F")
        arr = (np.asarray(im, dtype=np.float32) * 255 if im.mode == "F"
               else np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32))
    arr = arr[None] if grey else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1).unsqueeze(0)


def read_mask(path: str | os.PathLike) -> Tensor:
    """(1, 1, H, W) mask from an image file: 1 (regenerate) where it is light (grey level >= 128), 0 (keep)
    where it is dark."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} not found")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.uint8)
    return torch.from_numpy((arr >= 128).astype(np.float32))[None, None]
