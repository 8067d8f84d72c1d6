"""Image folders: DIR/<class>/*.png (class-conditional, classes = sorted subfolder names) or DIR/*.png
(unconditional). Images are centre-cropped to a square, resized, and decoded into memory once, which
keeps CPU training fast and deterministic (float32: about 12 KB per 32x32 RGB image)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ditkit.data.dataset import ImageDataset

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


def _images_in(folder: Path) -> list[Path]:
    # dot files are skipped: macOS "._x.png" resource forks would otherwise all be reported unreadable
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))


def load_image(path: str | os.PathLike, image_size: int, channels: int) -> np.ndarray:
    """(channels, image_size, image_size) float32 in [-1, 1]: centre crop, then a high-quality resize.

    EXIF rotation is applied; transparent pixels become white rather than whatever colour they hide.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        im = ImageOps.fit(im.convert("L" if channels == 1 else "RGB"), (image_size, image_size),
                          Image.Resampling.BICUBIC)  # scales the shorter side, crops the centre
        arr = np.asarray(im, dtype=np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return arr / 127.5 - 1


def list_images(root: str | os.PathLike) -> tuple[list[tuple[Path, str]], list[str], list[str]]:
    """(files as (path, class name), group names, class subfolders) of an image folder; with class
    subfolders the groups are their sorted names, without them one group "all" (unconditional)."""
    root = Path(root)
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = {name: _images_in(root / name) for name in subfolders} if subfolders else {"all": _images_in(root)}
    files = [(path, name) for name, paths in groups.items() for path in paths]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {root} or its class subfolders")
    if subfolders and _images_in(root):
        warnings.warn(f"{root}: images directly in the folder are ignored, only its class subfolders are used",
                      stacklevel=3)
    return files, list(groups), subfolders


def load_folder(root: str | os.PathLike, image_size: int = 32, channels: int = 3) -> ImageDataset:
    """Decode every image under `root` into one ImageDataset (random flips allowed).

    With class subfolders, the classes are their sorted names (a subfolder without a readable image is
    dropped with a warning, so every class has examples) and images directly in `root` are ignored.
    Without subfolders the set is unconditional. Unreadable files are skipped with one warning naming
    them all; no readable image at all is a ValueError.
    """
    if channels not in (1, 3):
        raise ValueError(f"image folders load as 1 (grey) or 3 (RGB) channels, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root)
    files, groups, subfolders = list_images(root)

    images, names, unreadable = [], [], []
    for path, name in tqdm(files, desc=f"loading {root}", disable=len(files) <= 1000):
        try:
            images.append(load_image(path, image_size, channels))
            names.append(name)
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
            unreadable.append(f"{path} ({type(err).__name__})")
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} unreadable image(s): {'; '.join(unreadable)}", stacklevel=2)
    if not images:
        raise ValueError(f"none of the {len(files)} image files in {root} could be read")

    present = set(names)
    classes = [name for name in groups if name in present]
    if subfolders and len(classes) < len(subfolders):
        missing = sorted(set(subfolders) - present)
        warnings.warn(f"{root}: class subfolder(s) without a readable image dropped: {', '.join(missing)}",
                      stacklevel=2)
    index = {name: k for k, name in enumerate(classes)}
    return ImageDataset(images=torch.from_numpy(np.stack(images)), labels=torch.tensor([index[n] for n in names]),
                        num_classes=len(classes), class_names=classes, hflip=True, conditional=bool(subfolders))
