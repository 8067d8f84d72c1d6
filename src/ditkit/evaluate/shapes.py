"""Prompt adherence on the captioned shapes set, from pixel statistics alone (no learned judge).

For an image holding one object: its colour is the palette colour nearest to the mean of the bright
pixels; its position is the named position nearest to their centre of mass; its shape follows from how
much of its bounding box it fills (square ~0.99, circle ~0.78 (pi/4), triangle ~0.57).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from ditkit.data.shapes import COLOURS, POSITIONS, SHAPES

CAPTION = re.compile(r"^a (\w+) (\w+) (?:at the|in the) (.+)$")
FILL = {"triangle": 0.57, "circle": 0.78, "square": 0.99}  # mean fill of the bounding box, measured on the data


def parse_caption(text: str) -> tuple[str, str, str]:
    """"a red square at the top left" -> ("red", "square", "top left")."""
    m = CAPTION.match(text)
    if m is None or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in POSITIONS:
        raise ValueError(f"not a one-object shapes caption: {text!r} (expected e.g. 'a red square at the top left')")
    return m.group(1), m.group(2), m.group(3)


def describe(image: Tensor, threshold: float = 0.35) -> tuple[str, str, str] | None:
    """(colour, shape, position) of the one object in a (3, H, W) image in [-1, 1]; None if it is empty."""
    rgb = (image.float().clamp(-1, 1) + 1) / 2  # [0, 1]
    on = rgb.amax(0) > threshold  # the background is black
    if on.sum() < 4:
        return None
    mean = rgb[:, on].mean(1) * 255
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    colour = list(COLOURS)[int((palette - mean).norm(dim=1).argmin())]
    H, W = on.shape
    ys, xs = torch.nonzero(on, as_tuple=True)
    cx, cy = xs.float().mean() / W, ys.float().mean() / H
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(on.sum() / box)
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return colour, shape, position


def prompt_adherence(images: Tensor, prompts: list[str]) -> dict[str, float]:
    """Fractions of images (N, 3, H, W) whose object has the prompted colour, shape, position, and all three."""
    if len(images) != len(prompts) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"need (N, 3, H, W) images and N prompts, got {tuple(images.shape)} and {len(prompts)}")
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    for image, prompt in zip(images, prompts):
        want, got = parse_caption(prompt), describe(image)
        if got is None:
            continue
        match = [w == g for w, g in zip(want, got)]
        for key, ok in zip(("colour", "shape", "position"), match):
            hits[key] += ok
        hits["all"] += all(match)
    return {key: value / len(prompts) for key, value in hits.items()}
