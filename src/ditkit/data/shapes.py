"""Captioned synthetic shapes: coloured circles, squares and triangles at named positions, with captions
such as "a red square at the top left". Deterministic from a seed; no download.

Each object is drawn anti-aliased (4x supersampled, then reduced) on a black canvas with a little size
and position jitter. With `max_objects > 1` an image holds 1..max_objects objects at distinct corner
positions, and the caption joins them with "and".
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ditkit.data.dataset import ImageDataset

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}  # (x, y) as fractions of the side
SUPERSAMPLE = 4


def caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} at the {position}" if position != "centre" else f"a {colour} {shape} in the centre"


def draw_object(draw: ImageDraw.ImageDraw, colour: str, shape: str, cx: float, cy: float, r: float) -> None:
    """One filled shape of half-size r centred at (cx, cy), in supersampled pixels."""
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r  # equal area to the eye: a square of side 2r looks much bigger than a circle of radius r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)


def render(objects: list[tuple[str, str, str]], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1] holding (colour, shape, position) objects."""
    side = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for colour, shape, position in objects:
        fx, fy = POSITIONS[position]
        jitter = rng.uniform(-0.03, 0.03, size=2) * side
        r = rng.uniform(0.15, 0.19) * side
        draw_object(draw, colour, shape, fx * side + jitter[0], fy * side + jitter[1], r)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1


def make_shapes(n: int = 6000, image_size: int = 32, max_objects: int = 1, seed: int = 0,
                colours: list[str] | None = None) -> ImageDataset:
    """n captioned images; with one object per image every (colour, shape, position) appears equally often.

    labels are the index of the single object's (colour, shape, position) combination (for the
    class-conditional view of the set); with several objects every label is 0. colours: the palette's
    colours drawn (default all of COLOURS), e.g. to hold a colour word out of a base's training.
    """
    if n < 1 or image_size < 8 or not 1 <= max_objects <= 4:
        raise ValueError(f"shapes need n >= 1, image_size >= 8 and 1 <= max_objects <= 4, got {n}, {image_size}, "
                         f"{max_objects}")
    palette = list(COLOURS) if colours is None else list(colours) if isinstance(colours, (list, tuple)) else [colours]
    unknown = [c for c in palette if c not in COLOURS]
    if unknown or not palette or len(set(palette)) < len(palette):
        raise ValueError(f"colours must name distinct colours of {', '.join(COLOURS)}; got {colours}")
    rng = np.random.default_rng(seed)
    combos = [(c, s, p) for c in palette for s in SHAPES for p in POSITIONS]
    images, captions, labels = [], [], []
    corners = [p for p in POSITIONS if p != "centre"]
    for i in range(n):
        if max_objects == 1:
            k = i % len(combos)
            objects = [combos[k]]
        else:
            k = 0
            count = int(rng.integers(1, max_objects + 1))
            places = corners if count > 1 else list(POSITIONS)
            chosen = rng.choice(len(places), size=count, replace=False)
            objects = [(str(rng.choice(palette)), str(rng.choice(SHAPES)), places[j]) for j in chosen]
        images.append(render(objects, image_size, rng))
        captions.append(" and ".join(caption(*o) for o in objects))
        labels.append(k)
    num_classes = len(combos) if max_objects == 1 else 1
    return ImageDataset(images=torch.from_numpy(np.stack(images)), labels=torch.tensor(labels),
                        num_classes=num_classes, hflip=False, conditional=max_objects == 1,
                        class_names=[caption(*c) for c in combos] if max_objects == 1 else ["all"],
                        captions=captions)
