"""Latent diffusion data: an image folder encoded once by a VAE into a memory-mapped cache.

DiT trains in the latent space of Stable Diffusion's VAE (a diffusers `AutoencoderKL`): an image x in
[-1, 1] becomes z = (mean + std * eps - shift_factor) * scaling_factor, with the posterior's mean and std,
eps ~ N(0, I), and the factors from the VAE's config (0.18215 and none for the SD VAE); sampling decodes
z / scaling_factor + shift_factor. As fast-DiT does, each image is encoded once and one posterior sample is
stored, so training never runs the encoder.

    CACHE/index.json      format, VAE, factors, image size, latent shape, classes, and the source files
    CACHE/latents.npy     (rows, C, h, w) float32, memory-mapped; a row per image (two with flips)
    CACHE/labels.npy      (rows,) int64
    CACHE/progress.json   files encoded and rows written so far: an interrupted run resumes from it

The noise of each batch is seeded from (seed, position of its first file), so a resumed extraction
writes the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ditkit.data.dataset import ImageDataset
from ditkit.data.folder import list_images, load_image
from ditkit.io import write_json_atomic
from ditkit.notes import warn

FORMAT = "ditkit-latents"
INDEX, LATENTS, LABELS, PROGRESS = "index.json", "latents.npy", "labels.npy", "progress.json"


class LatentSpace:
    """A diffusers AutoencoderKL (local directory, or a hub id where a network exists) and its scaling."""

    def __init__(self, vae: str | os.PathLike, device: str | torch.device = "cpu"):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ValueError("VAE latents need diffusers: pip install 'ditkit[interop]'") from None
        self.vae = str(Path(vae).resolve()) if Path(vae).exists() else str(vae)
        if Path(vae).exists() and not (Path(vae) / "config.json").is_file():
            raise FileNotFoundError(f"{vae} has no config.json: expected a diffusers AutoencoderKL directory "
                                    "(vae.save_pretrained(DIR), or a download of stabilityai/sd-vae-ft-ema)")
        try:
            # low_cpu_mem_usage needs the accelerate package; without it diffusers would warn on every load
            self.model = AutoencoderKL.from_pretrained(self.vae, low_cpu_mem_usage=False).to(device).eval()
        except (OSError, ValueError) as err:  # missing files, or a hub id without a network
            raise FileNotFoundError(f"cannot load the VAE {vae!r}: {str(err).splitlines()[0][:300]}; pass a local "
                                    "diffusers AutoencoderKL directory") from None
        config = self.model.config
        self.device = torch.device(device)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)  # one 2x downsampling per block but the last

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, C, H / f, W / f) scaled posterior samples; noise from a CPU
        `generator`, so the numbers do not depend on the device."""
        posterior = self.model.encode(images.to(self.device)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
        return ((posterior.mean + posterior.std * eps - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 16) -> Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, h * f, w * f) in [-1, 1], in chunks that bound memory."""
        out = [self.model.decode(z.to(self.device).float() / self.scaling_factor + self.shift_factor).sample
               for z in latents.split(batch_size)]
        return torch.cat(out).clamp(-1, 1)


@functools.lru_cache(maxsize=2)
def load_latent_space(vae: str, device: str = "cpu") -> LatentSpace:
    """A LatentSpace, loaded once per (VAE, device) however often a run decodes."""
    return LatentSpace(vae, device)


@dataclass
class LatentDataset(ImageDataset):
    """An ImageDataset whose `images` are scaled VAE latents (memory-mapped; not in [-1, 1]) and which
    names the VAE that decodes them. Flips are not valid on latents: with `flip`, the cache holds the
    encoded mirror images as extra rows instead."""

    vae: str = ""

    def decode(self, latents: Tensor, device: str | torch.device = "cpu") -> Tensor:
        return load_latent_space(self.vae, str(device)).decode(latents)


def is_latent_cache(path: str | os.PathLike) -> bool:
    index = Path(path) / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def _progress(out: Path) -> dict:
    file = out / PROGRESS
    return json.loads(file.read_text()) if file.is_file() else {"files_done": 0, "rows": 0, "skipped": []}


def _open_cache(out: Path, index: dict[str, Any], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The cache's latent and label arrays (memory-mapped): those of an interrupted extraction with the same
    `index`, or new ones; an extraction with other arguments is refused."""
    if (out / INDEX).is_file():
        saved = json.loads((out / INDEX).read_text())
        changed = [k for k in index if saved.get(k) != index[k]]
        if changed:
            raise ValueError(f"{out} holds a different extraction (differs in: {', '.join(changed)}): "
                             "choose another --out or delete it to start over")
        return (np.lib.format.open_memmap(out / LATENTS, mode="r+"),
                np.lib.format.open_memmap(out / LABELS, mode="r+"))
    out.mkdir(parents=True, exist_ok=True)
    latents = np.lib.format.open_memmap(out / LATENTS, mode="w+", dtype=np.float32, shape=shape)
    labels = np.lib.format.open_memmap(out / LABELS, mode="w+", dtype=np.int64, shape=shape[:1])
    write_json_atomic(out / PROGRESS, {"files_done": 0, "rows": 0, "skipped": []})
    write_json_atomic(out / INDEX, index)
    return latents, labels


def _read_batch(files: list, ks: range, index: dict[str, Any], image_size: int,
                state: dict[str, Any]) -> tuple[list[Tensor], list[int]]:
    """The readable images of files[ks] (3, H, W) and their labels; unreadable ones are noted in state."""
    batch, ys = [], []
    for k in ks:
        try:
            batch.append(torch.from_numpy(load_image(files[k][0], image_size, 3)))
            ys.append(index["labels"][k])
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            state["skipped"].append(f"{index['files'][k]} ({type(err).__name__})")
    return batch, ys


def extract_latents(data: str | os.PathLike, vae: str | os.PathLike | LatentSpace, out: str | os.PathLike,
                    image_size: int = 256, batch_size: int = 32, flip: bool = False, seed: int = 0,
                    device: str | torch.device | None = None, progress: bool = True) -> Path:
    """Encode the image folder `data` (DIR/<class>/*.png or DIR/*.png) into the cache directory `out`.

    Images are centre-cropped and resized to `image_size` (a multiple of the VAE's downsampling); with
    `flip`, each image's mirror image is encoded too. Rerunning with the same arguments resumes an
    interrupted extraction (or does nothing when it is complete); different arguments are refused.
    Unreadable images are skipped with one warning. Returns `out`.
    """
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data} is not a directory of images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    space = vae if isinstance(vae, LatentSpace) else LatentSpace(vae, device)
    if image_size < 1 or image_size % space.downsample:
        raise ValueError(f"image_size {image_size} must be a positive multiple of the VAE's downsampling "
                         f"factor {space.downsample}")
    root, out = Path(data), Path(out)
    files, groups, subfolders = list_images(root)
    views = 2 if flip else 1
    h = image_size // space.downsample
    index = {"format": FORMAT, "version": 1, "vae": space.vae, "scaling_factor": space.scaling_factor,
             "shift_factor": space.shift_factor, "image_size": image_size, "latent_shape": [space.channels, h, h],
             "flip": flip, "seed": seed, "class_names": groups if subfolders else ["all"],
             "conditional": bool(subfolders), "files": [str(p.relative_to(root)) for p, _ in files],
             "labels": [groups.index(name) for _, name in files]}
    shape = (len(files) * views, space.channels, h, h)
    latents, labels = _open_cache(out, index, shape)
    state = _progress(out)

    bar = tqdm(total=len(files), initial=state["files_done"], desc="encoding", disable=not progress)
    for start in range(state["files_done"], len(files), batch_size):
        batch, ys = _read_batch(files, range(start, min(start + batch_size, len(files))), index, image_size, state)
        if batch:
            x = torch.stack(batch)  # (B, 3, H, W)
            if flip:  # rows: image, mirror, image, mirror, ...
                x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
            z = space.encode(x, torch.Generator().manual_seed(seed * 1_000_003 + start)).cpu().numpy()
            r = state["rows"]
            latents[r:r + len(z)] = z
            labels[r:r + len(z)] = np.repeat(ys, views)
            latents.flush()
            labels.flush()
            state["rows"] = r + len(z)
        state["files_done"] = min(start + batch_size, len(files))
        write_json_atomic(out / PROGRESS, state)  # only after the rows are on disk
        bar.update(state["files_done"] - bar.n)
    bar.close()
    if state["skipped"]:
        warn(f"skipped {len(state['skipped'])} unreadable image(s): {'; '.join(state['skipped'][:20])}",
             stacklevel=2)
    if state["rows"] == 0:
        raise ValueError(f"none of the {len(files)} image files in {root} could be read")
    return out


def load_latents(cache: str | os.PathLike) -> LatentDataset:
    """The latent cache as a LatentDataset; the latents stay memory-mapped (copy-on-write, never written)."""
    cache = Path(cache)
    index, state = json.loads((cache / INDEX).read_text()), _progress(cache)
    if state["files_done"] < len(index["files"]):
        raise ValueError(f"the latent cache {cache} is incomplete ({state['files_done']} of {len(index['files'])} "
                         "images encoded): rerun the same `ditkit extract-latents` command to finish it")
    rows = state["rows"]
    images = torch.from_numpy(np.load(cache / LATENTS, mmap_mode="c")[:rows])
    labels = torch.from_numpy(np.array(np.load(cache / LABELS, mmap_mode="r")[:rows]))
    classes = index["class_names"]
    return LatentDataset(images=images, labels=labels, num_classes=len(classes), class_names=classes,
                         hflip=False, conditional=index["conditional"], vae=index["vae"])
