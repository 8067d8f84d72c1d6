"""Image folders: DIR/<class>/*.png (class-conditional, classes = sorted subfolder names) or DIR/*.png
(unconditional). Images are centre-cropped to a square, resized, and decoded into memory once, which
keeps CPU training fast and deterministic (float32: about 12 KB per 32x32 RGB image).

Bit depth: 8-bit images scale 0..255 to [-1, 1]; 16-bit ones 0..65535 (16-bit grey keeps its full
precision, 16-bit colour PNGs are read by Pillow at 8 bits per channel); float images (e.g. 32-bit
TIFF) are taken as 0..1, values outside clipped."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ditkit.data.dataset import ImageDataset
from ditkit.notes import note, warn

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# Pillow modes of one channel with more than 8 bits, and the value that means white
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _images_in(folder: Path) -> list[Path]:
    # dot files are skipped: macOS "._x.png" resource forks would otherwise all be reported unreadable
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))


GREY_MODES = {"1", "L", "LA", *WIDE_MODES}


def check_image(path: str | os.PathLike, what: str = "image", decode: bool = True) -> None:
    """A ValueError naming `path` when Pillow cannot read it: not an image, truncated (found only when
    `decode`), or over Pillow's decompression-bomb limit. A missing file is left to the reader's own error."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{what} {path} is refused by Pillow as a possible decompression bomb ({err}); "
                         f"use a smaller image") from None
    except (OSError, ValueError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{what} {path} cannot be read as an image ({err})") from None


def load_image(path: str | os.PathLike, image_size: int, channels: int,
               seen: set[tuple[int, int, str]] | None = None) -> np.ndarray:
    """(channels, image_size, image_size) float32 in [-1, 1]: centre crop, then a high-quality resize.

    EXIF rotation is applied; transparent pixels become white rather than whatever colour they hide.
    `seen` collects each file's (width, height, Pillow mode).
    """
    with Image.open(path) as im:
        if seen is not None:
            seen.add((*im.size, im.mode))
        im = ImageOps.exif_transpose(im)
        im = flatten(im)
        if im.mode != "F":
            im = im.convert("L" if channels == 1 else "RGB")
        im = ImageOps.fit(im, (image_size, image_size), Image.Resampling.BICUBIC)  # shorter side, centre crop
        arr = np.asarray(im, dtype=np.float32)
    if im.mode == "F":  # wide grey, in [0, 1]; bicubic may overshoot a little
        arr = np.clip(arr, 0, 1)[None].repeat(channels, 0) * 2 - 1
        return arr.astype(np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return arr / 127.5 - 1


def flatten(im: Image.Image) -> Image.Image:
    """`im` ready to convert to 8-bit "L"/"RGB": transparency composited on white, and a wide grey image
    (16-bit, 32-bit int, float) as a float "F" image in [0, 1], since Pillow's own conversion of those to
    "L" clips every value above 255 (a 16-bit image would load almost all white)."""
    if im.mode in WIDE_MODES:
        white = WIDE_MODES[im.mode]
        if im.mode == "I" and np.asarray(im).max() > 65535:  # a true 32-bit integer image
            white = 2**32 - 1
        arr = np.asarray(im, dtype=np.float64) / white
        return Image.fromarray(np.nan_to_num(arr, nan=0.0).clip(0, 1).astype(np.float32))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im


def _nested_only(folder: Path) -> bool:
    """A class folder with no images of its own but folders inside (DIR/cat/2019/*.png)."""
    return not _images_in(folder) and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def list_images(root: str | os.PathLike) -> tuple[list[tuple[Path, str]], list[str], list[str]]:
    """(files as (path, class name), group names, class subfolders) of an image folder; with class
    subfolders the groups are their sorted names, without them one group "all" (unconditional)."""
    root = Path(root)
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = {name: _images_in(root / name) for name in subfolders} if subfolders else {"all": _images_in(root)}
    files = [(path, name) for name, paths in groups.items() for path in paths]
    if not files:
        nested = [name for name in subfolders if _nested_only(root / name)]
        hint = (f" (subfolders of class folders are not searched: {', '.join(nested[:5])} hold only folders)"
                if nested else "")
        raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {root} or its class subfolders{hint}")
    if subfolders and _images_in(root):
        warn(f"{root}: images directly in the folder are ignored, only its class subfolders are used",
             stacklevel=3)
    return files, list(groups), subfolders


def load_folder(root: str | os.PathLike, image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """Decode every image under `root` into one ImageDataset (random flips allowed).

    With class subfolders, the classes are their sorted names (a subfolder without a readable image is
    dropped with a warning, so every class has examples) and images directly in `root` are ignored.
    Without subfolders the set is unconditional. Unreadable files are skipped with one warning naming
    them all and how many were used; no readable image at all is a ValueError. `image_size` and
    `channels` default to 32 and 3 (RGB); when the images differ from a default, a note says so.
    """
    size = 32 if image_size is None else image_size
    depth = 3 if channels is None else channels
    if depth not in (1, 3):
        raise ValueError(f"image folders load as 1 (grey) or 3 (RGB) channels, got {depth}")
    if size < 1:
        raise ValueError(f"image_size must be positive, got {size}")
    root = Path(root)
    files, groups, subfolders = list_images(root)

    images, names, unreadable, seen = [], [], [], set()
    for path, name in tqdm(files, desc=f"loading {root}", disable=len(files) <= 1000):
        try:
            images.append(load_image(path, size, depth, seen))
            names.append(name)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # UnidentifiedImageError
            unreadable.append(f"{path} ({type(err).__name__})")                         # is an OSError
    if not images:
        shown = "; ".join(unreadable[:5]) + ("; ..." if len(unreadable) > 5 else "")
        raise ValueError(f"none of the {len(files)} image files in {root} could be read: {shown}")
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable image(s) of {len(files)}, using the other {len(images)}: "
             f"{'; '.join(unreadable)}", stacklevel=2)
    note_defaults(root, seen, size if image_size is None else None, depth if channels is None else None)

    present = set(names)
    classes = [name for name in groups if name in present]
    if subfolders and len(classes) < len(subfolders):
        missing = sorted(set(subfolders) - present)
        nested = [name for name in missing if _nested_only(root / name)]
        hint = f" ({', '.join(nested)}: only subfolders, which are not searched)" if nested else ""
        warn(f"{root}: class subfolder(s) without a readable image dropped: {', '.join(missing)}{hint}",
             stacklevel=2)
    index = {name: k for k, name in enumerate(classes)}
    return ImageDataset(images=torch.from_numpy(np.stack(images)), labels=torch.tensor([index[n] for n in names]),
                        num_classes=len(classes), class_names=classes, hflip=True, conditional=bool(subfolders))


def note_defaults(root: Path, seen: set[tuple[int, int, str]], size: int | None, channels: int | None) -> None:
    """A note when a default size or channel count (the one not None) changes the folder's images: what was
    found, what they were loaded as, and how to choose otherwise."""
    sizes = sorted({(w, h) for w, h, _ in seen})
    modes = sorted({mode for _, _, mode in seen})
    resized = size is not None and sizes != [(size, size)]
    depths = {1 if mode in GREY_MODES else 3 for mode in modes}
    converted = channels is not None and depths != {channels}
    if not (resized or converted):
        return
    found = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (f" and {len(sizes) - 4} more" if len(sizes) > 4 else "")
    chosen = []
    if size is not None:
        chosen.append(f"{size}x{size} (the default image_size; centre-cropped and resized)")
    if channels is not None:
        chosen.append(f"{'RGB' if channels == 3 else 'grey'} (the default channels={channels})")
    note(f"{root}: images of size {found} and mode {', '.join(modes)}, loaded as {' and '.join(chosen)}; "
         f"choose others with image_size=N and channels=1 (grey) or 3 (RGB)")
