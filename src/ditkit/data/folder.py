"""Image folders: DIR/<class>/*.png (class-conditional, classes = sorted subfolder names) or DIR/*.png
(unconditional). Images are centre-cropped to a square, resized, and decoded into memory once."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ditkit.data.dataset import ImageDataset

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """(channels, image_size, image_size) float32 in [-1, 1]: centre crop, then a high-quality resize."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return arr / 127.5 - 1


def load_folder(root: str | Path, image_size: int = 32, channels: int = 3) -> ImageDataset:
    if channels not in (1, 3):
        raise ValueError(f"image folders load as 1 (grey) or 3 (RGB) channels, got {channels}")
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(path, k) for k, name in enumerate(classes) for path in _images_in(root / name)]
    else:
        files = [(path, 0) for path in _images_in(root)]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {root} or its class subfolders")
    images, labels, unreadable = [], [], []
    for path, k in tqdm(files, desc=f"loading {root}", disable=len(files) < 1000):
        try:
            images.append(load_image(path, image_size, channels))
            labels.append(k)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            unreadable.append(f"{path} ({type(err).__name__})")
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} unreadable image(s): {'; '.join(unreadable)}", stacklevel=2)
    if not images:
        raise ValueError(f"none of the {len(files)} image files in {root} could be read")
    return ImageDataset(images=torch.from_numpy(np.stack(images)), labels=torch.tensor(labels),
                        num_classes=max(1, len(classes)), class_names=classes or ["all"], hflip=True)
