"""Moving MNIST from the embedded MNIST-5k digits: clips of one or two digits travelling across a square
frame and bouncing off its edges (Srivastava et al. 2015, at any size), generated deterministically
from a seed; nothing is downloaded.

Motion: "bounce" draws a random direction per clip; "class" moves every digit k along a fixed
direction, DIRECTIONS[k % 4] (right, down, left, up), so the class label also fixes the motion;
"label" draws one of the four directions per clip and makes it part of the label (digit * 4 + direction,
40 classes named like "3-left"). In "class" and "label" clips the start is, with `start` "inside", drawn so
that the digit does not reach an edge within the clip whenever the frame has room for that; with "anywhere"
it is drawn anywhere in the frame, so that many clips show the digit hitting a wall and bouncing back (what a
model must see to continue a clip past a wall). With a `lattice` of L pixels, every position is a multiple of L
(the start is drawn on the lattice, the speed is a multiple of L and the walls stand on it), so with L equal to
a model's patch size each frame's digit sits on the patch grid and a clip moves by whole tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ditkit.data.dataset import ImageDataset
from ditkit.data.mnist import SPLITS, _raw, heldout_mask

MOTIONS = ("bounce", "class", "label")
DIRECTIONS = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (rows, columns) per frame: right, down, left, up
DIRECTION_NAMES = ("right", "down", "left", "up")
STARTS = ("inside", "anywhere")
OPTIONS = ("n_clips", "num_digits", "motion", "speed", "digit_size", "start", "lattice")  # a config's data_args
CLIP_RULE = ("motion", "speed", "digit_size", "start", "lattice")  # what a clip follows (evaluate_clips' options)


@dataclass
class VideoDataset(ImageDataset):
    """`images` holds clips (N, C, F, H, W) float32 in [-1, 1]; labels and classes as ImageDataset."""

    layout: ClassVar[tuple[str, ...]] = ("N", "C", "F", "H", "W")

    @property
    def frames(self) -> int:
        return self.images.shape[2]

    def first_frames(self) -> ImageDataset:
        """Each clip's first frame as an image (N, C, H, W): the frames a video model draws, for an image model
        trained first (`init_image`)."""
        return ImageDataset(images=self.images[:, :, 0].contiguous(), labels=self.labels,
                            num_classes=self.num_classes, class_names=self.class_names, hflip=False)

    def with_channels(self, channels: int) -> VideoDataset:
        """Repeat 1-channel clips to `channels`, or reject a conversion that would invent colour."""
        if channels == self.channels:
            return self
        if self.channels != 1:
            raise ValueError(f"cannot convert {self.channels}-channel clips to {channels} channels")
        return replace(self, images=self.images.expand(-1, channels, -1, -1, -1).contiguous())


def _reflect(u: np.ndarray, room: int) -> np.ndarray:
    """Positions on an unbounded line folded into [0, room]: the path of a point bouncing between walls."""
    if room == 0:
        return np.zeros_like(u)
    u = np.mod(u, 2 * room)
    return np.where(u > room, 2 * room - u, u)


def _digits(split: str, digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST-5k digits of `split` resized to `digit_size`: (M, s, s) in [0, 1], and their labels (M,)."""
    pixels, labels = _raw()
    held = heldout_mask(labels)
    keep = {"train": ~held, "heldout": held, "all": np.ones(len(labels), bool)}[split]
    pixels, labels = pixels[keep], labels[keep]
    digits = torch.from_numpy(pixels).float().div(255).unsqueeze(1)
    if digit_size != 28:
        digits = F.interpolate(digits, size=(digit_size, digit_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
    return digits[:, 0].numpy(), labels


def _path(rng: np.random.RandomState, direction: int | None, speed: float, room: int, frames: int,
          start: str, lattice: int | None = None) -> np.ndarray:
    """One digit's (frames, 2) integer top-left corners: a random direction (direction None) from anywhere,
    or DIRECTIONS[direction] from a start drawn as `start` says (see the module docstring)."""
    if lattice is not None:
        return lattice * _cell_path(rng, direction, round(speed / lattice), room // lattice, frames, start)
    if direction is None:
        angle = rng.uniform(0, 2 * np.pi)
        velocity = speed * np.array([np.sin(angle), np.cos(angle)])
        origin = rng.uniform(0, room, size=2)
    else:
        velocity = speed * np.array(DIRECTIONS[direction], np.float64)
        origin = rng.uniform(0, room, size=2)
        travel = speed * (frames - 1)
        if start == "inside" and travel <= room:  # room to move straight: start where the path stays inside
            axis = 0 if velocity[0] else 1
            sign = np.sign(velocity[axis])
            origin[axis] = rng.uniform(0, room - travel) + (travel if sign < 0 else 0)
    steps = np.arange(frames, dtype=np.float64)
    return np.rint(_reflect(origin[None] + steps[:, None] * velocity[None], room)).astype(int)


def _cell_path(rng: np.random.RandomState, direction: int | None, cells_per_frame: int, cells: int, frames: int,
               start: str) -> np.ndarray:
    """`_path` on a lattice: (frames, 2) positions in whole cells between walls at 0 and `cells`."""
    if direction is None:
        velocity = cells_per_frame * np.array(DIRECTIONS[rng.randint(4)])
    else:
        velocity = cells_per_frame * np.array(DIRECTIONS[direction])
    origin = rng.randint(0, cells + 1, size=2)
    travel = cells_per_frame * (frames - 1)
    if direction is not None and start == "inside" and travel <= cells:
        axis = 0 if velocity[0] else 1
        origin[axis] = rng.randint(0, cells - travel + 1) + (travel if velocity[axis] < 0 else 0)
    steps = np.arange(frames)
    return _reflect(origin[None] + steps[:, None] * velocity[None], cells).astype(int)


def make_moving_mnist(n_clips: int = 5000, frames: int = 8, image_size: int = 32, num_digits: int = 1,
                      motion: str = "bounce", speed: float | None = None, digit_size: int | None = None,
                      split: str = "train", seed: int = 0, start: str = "inside",
                      lattice: int | None = None) -> VideoDataset:
    """`n_clips` clips (N, 1, frames, image_size, image_size) in [-1, 1]; label = the digit (see `motion`).

    digit_size: the side digits are resized to (default 7/16 of the frame: 28 px in 64, 14 px in 32).
    speed: pixels per frame (default image_size / 16). With two digits, both are (different) images of
    the clip's class and move independently; overlaps keep the brighter pixel. Digits come from the
    MNIST-5k `split` ("train", "heldout" or "all", as `load_mnist`). start: "inside" or "anywhere", where
    "class" and "label" clips start (see the module docstring; "bounce" clips always start anywhere).
    lattice: pixels between allowed positions (a divisor of speed; "bounce" clips then move along an axis).
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}: expected one of {', '.join(MOTIONS)}")
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}: expected one of {', '.join(STARTS)}")
    if start != "inside" and motion == "bounce":
        raise ValueError(f"start={start} is for motion class or label: bounce clips always start anywhere")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    digit_size = digit_size or max(1, image_size * 7 // 16)
    speed = image_size / 16 if speed is None else speed
    if min(n_clips, frames, image_size, num_digits) < 1 or not 0 < digit_size <= image_size or speed < 0:
        raise ValueError(f"need n_clips, frames, image_size, num_digits >= 1, 0 < digit_size <= image_size and "
                         f"speed >= 0; got {n_clips}, {frames}, {image_size}, {num_digits}, {digit_size}, {speed}")
    if lattice is not None and (lattice < 1 or speed % lattice):
        raise ValueError(f"lattice must be a positive divisor of the speed ({speed:g} pixels per frame); got {lattice}")
    digits, labels = _digits(split, digit_size)

    rng = np.random.RandomState(seed)  # frozen stream across numpy versions (NEP 19)
    room = image_size - digit_size
    clips = np.zeros((n_clips, frames, image_size, image_size), np.float32)
    clip_labels = np.zeros(n_clips, np.int64)
    by_class = [np.flatnonzero(labels == k) for k in range(10)]
    for n in range(n_clips):
        first = rng.randint(len(labels))
        k = int(labels[first])
        chosen = [first] + [int(rng.choice(by_class[k])) for _ in range(num_digits - 1)]
        direction = k % 4 if motion == "class" else rng.randint(4) if motion == "label" else None
        clip_labels[n] = k * 4 + direction if motion == "label" else k
        for index in chosen:
            for f, (r, c) in enumerate(_path(rng, direction, speed, room, frames, start, lattice)):
                window = clips[n, f, r:r + digit_size, c:c + digit_size]
                np.maximum(window, digits[index], out=window)
    names = ([f"{k}-{d}" for k in range(10) for d in DIRECTION_NAMES] if motion == "label"
             else [str(k) for k in range(10)])
    x = torch.from_numpy(clips).mul(2).sub(1).unsqueeze(1)  # (N, 1, F, H, W) in [-1, 1]
    return VideoDataset(images=x, labels=torch.from_numpy(clip_labels), num_classes=len(names),
                        class_names=names, hflip=False)  # mirroring would swap left and right motion
