"""Judging moving-MNIST clips: does every frame show the digit asked for, does the digit keep its identity
from frame to frame, does it move by the data's rule, and do the frames look like real ones.

Every number comes with the same number for real clips (the held-out split of moving MNIST, as many clips
as given, with the same labels, frames, image size and speed), so a generated clip's score reads against
what a perfect model would get under the same judge. The judge is ditkit's digit classifier, applied to
every frame after framing the digit as MNIST does (see `frame_views`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ditkit.data.moving_mnist import CLIP_RULE, DIRECTIONS, MOTIONS, make_moving_mnist
from ditkit.evaluate.classifier import DigitClassifier, load_classifier
from ditkit.evaluate.metrics import RANGE_SLACK, _warn_if_few, frechet_distance_from_features

VIEWS = ("framed", "centred", "as-is")
STEP_MIN, STEP_MAX = 0.5, 1.5  # a step along the axis moves between these multiples of the speed
ACROSS_MAX = 0.5               # and drifts across it by less than this multiple of the speed
SHARE_OF_STEPS = 0.8           # the longer-clip measure: clips with at least this share of steps right
CLASSIFIER_SIZE = 32           # the digit classifier's input side
MNIST_BOX = 28 / 32            # an MNIST digit's 28-pixel box in the classifier's 32-pixel frame
CLIP_ROWS = (("frame_accuracy", "frame accuracy"), ("clip_consistency", "clip consistency"),
             ("motion", "motion (clips, every step)"), ("motion_steps", "motion (steps)"),
             ("motion_most_steps", "motion (clips, >= 80% of steps)"))
LEVELS = (0.3, 0.5)            # "framed": shares of the frame's peak mapped to black and to white


def _check_clips(clips: Tensor, labels: Tensor | None, motion: str) -> tuple[Tensor, Tensor]:
    """Clips (N, 1, F, H, W) float in [-1, 1] and integer labels (N,) in the motion's label range."""
    clips = torch.as_tensor(clips)
    shape = tuple(clips.shape)
    if clips.ndim != 5:
        what = " images, not clips: evaluate images with `evaluate`" if clips.ndim == 4 else ""
        raise ValueError(f"clips must be a video array (N, C, F, H, W), got shape {shape}{what}")
    n, c, f, h, w = shape
    if c != 1 or f < 2 or h != w or n < 2:
        raise ValueError(f"clips must be (N, 1, F, H, W) with N >= 2 clips, 1 channel (the digit classifier "
                         f"is greyscale), F >= 2 frames (motion needs a step) and square frames, got {shape}")
    clips = clips.float()
    if not torch.isfinite(clips).all():
        raise ValueError("clips contain NaN or inf values")
    lo, hi = clips.min().item(), clips.max().item()
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(f"clips must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}: expected one of {', '.join(MOTIONS)}")
    if labels is None:
        raise ValueError("clips need labels (the class asked for, one per clip): frame accuracy and motion are "
                         "judged against it; `ditkit sample --out FILE.npz` writes them")
    labels = torch.as_tensor(labels)
    classes = 40 if motion == "label" else 10
    if labels.shape != (n,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers of shape ({n},), one per clip, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if not (0 <= int(labels.min()) and int(labels.max()) < classes):
        raise ValueError(f"labels of motion {motion!r} must lie in 0..{classes - 1}, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return clips.clamp(-1, 1), labels.long()


def centre_of_mass(frames: Tensor) -> Tensor:
    """(..., H, W) frames in [-1, 1] -> (..., 2) intensity centre of mass (row, column) in pixel indices.

    Pixels are mapped to [0, 1] and weigh by their value; a blank frame's centre is the frame's centre.
    """
    p = (frames.float() + 1).div(2).clamp(0, 1)
    h, w = p.shape[-2:]
    mass = p.sum((-2, -1))
    rows = torch.arange(h, dtype=p.dtype)
    cols = torch.arange(w, dtype=p.dtype)
    r = (p.sum(-1) * rows).sum(-1) / mass.clamp_min(1e-6)
    c = (p.sum(-2) * cols).sum(-1) / mass.clamp_min(1e-6)
    blank = mass < 1e-6
    r = torch.where(blank, torch.full_like(r, (h - 1) / 2), r)
    c = torch.where(blank, torch.full_like(c, (w - 1) / 2), c)
    return torch.stack([r, c], -1)


def frame_views(frames: Tensor, digit_size: int, view: str = "framed") -> Tensor:
    """(M, 1, H, W) frames in [-1, 1] -> (M, 1, 32, 32), as the digit classifier reads them.

    "framed": a box of side digit_size * 32 / 28 centred on the frame's centre of mass, rescaled to 32
    pixels (bicubic), which is MNIST's own framing (a centred 28-pixel box padded to 32); then levels:
    LEVELS[0] x the frame's peak and below is black, LEVELS[1] x the peak and above white. The levels undo
    what shrinking did to the strokes: a digit shrunk to 14 pixels and enlarged again is dim and blurred,
    and the classifier, trained on sharp full-size digits, misreads a third of such frames; with the
    levels its strokes are solid again. "centred": the frame shifted so its centre of mass sits in the
    middle (the digit keeps its size and contrast); "as-is": the frame, resized to 32 pixels if need be.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    m, _, h, w = frames.shape
    if view == "as-is":
        if h == CLASSIFIER_SIZE and w == CLASSIFIER_SIZE:
            return frames
        out = F.interpolate(frames, size=(CLASSIFIER_SIZE,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return out.clamp(-1, 1)
    side = digit_size / MNIST_BOX if view == "framed" else float(h)
    com = centre_of_mass(frames[:, 0])  # (M, 2)
    base = ((torch.arange(CLASSIFIER_SIZE, dtype=torch.float32) + 0.5) / CLASSIFIER_SIZE - 0.5) * side
    ys = com[:, 0:1] + base  # (M, 32) source rows
    xs = com[:, 1:2] + base
    # pixel index i is at (2i + 1) / size - 1 in grid_sample's [-1, 1] coordinates (align_corners=False)
    gy = ((2 * ys + 1) / h - 1)[:, :, None].expand(-1, -1, CLASSIFIER_SIZE)
    gx = ((2 * xs + 1) / w - 1)[:, None, :].expand(-1, CLASSIFIER_SIZE, -1)
    grid = torch.stack([gx, gy], -1)
    # sampled in [0, 1], where the zero padding outside the frame is the black background
    mode = "bicubic" if view == "framed" else "bilinear"
    p = F.grid_sample(frames.add(1).div(2), grid, mode=mode, padding_mode="zeros", align_corners=False).clamp(0, 1)
    if view == "framed":
        peak = p.amax((1, 2, 3), keepdim=True).clamp_min(1e-6)
        p = ((p - LEVELS[0] * peak) / ((LEVELS[1] - LEVELS[0]) * peak)).clamp(0, 1)
    return p.mul(2).sub(1)


@torch.no_grad()
def frame_classes(model: DigitClassifier, clips: Tensor, digit_size: int, view: str = "framed",
                  batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """The classifier's class of every frame (N, F) and its features of every frame (N * F, 128)."""
    n, _, f, h, w = clips.shape
    frames = clips.transpose(1, 2).reshape(n * f, 1, h, w)
    classes, features = [], []
    for i in range(0, len(frames), batch_size):
        x = frame_views(frames[i:i + batch_size], digit_size, view)
        feats = model.features(x)
        features.append(feats)
        classes.append(model.head(feats).argmax(1))
    return torch.cat(classes).view(n, f), torch.cat(features)


def _walk(along: np.ndarray, across: np.ndarray, position: np.ndarray, sign: float, speed: float,
          reach: tuple[float, float]) -> np.ndarray:
    """Which steps of one clip's centre-of-mass path move by the rule (see `motion_steps`)."""
    lo, hi = STEP_MIN * speed, STEP_MAX * speed
    ok = np.zeros(len(along), bool)
    for t, (d, x) in enumerate(zip(along, across)):
        wall = reach[1] if sign > 0 else -reach[0]  # at the wall the digit is heading to beyond this
        starts_at_wall, ends_at_wall = sign * position[t] >= wall, sign * position[t + 1] >= wall
        if abs(x) >= ACROSS_MAX * speed:
            continue
        if lo <= sign * d <= hi:
            ok[t] = True
        elif starts_at_wall and lo <= -sign * d <= hi:  # left the wall it was touching: the other way from now
            ok[t], sign = True, -sign
        elif (starts_at_wall or ends_at_wall) and abs(d) < lo:  # in and back out within the step
            ok[t], sign = True, -sign
    return ok


def motion_steps(clips: Tensor, labels: Tensor, speed: float | None = None, digit_size: int | None = None) -> Tensor:
    """(N, F - 1) bool: which frame-to-frame steps of each clip move by moving MNIST's rule.

    The path is the intensity centre of mass of each frame. The way is DIRECTIONS[label % 4] (right,
    down, left, up: `motion` "class" and "label" both put the direction there), starting with the
    class's own sign. A step is right when it moves along the way's axis by STEP_MIN..STEP_MAX x speed
    with the current sign and drifts across it by less than ACROSS_MAX x speed. Walls reverse the sign.
    The digit is at the wall it is heading to when its centre of mass is within 0.55 x digit_size + 0.5
    + speed / 2 pixels of that edge: a digit's box touching the edge puts its centre of mass within
    0.51 x digit_size + 0.5 of it (MNIST digits are centred by their centre of mass), and a bounce turns
    within half a step of the edge. There a step STEP_MIN..STEP_MAX x speed the other way is right (it
    left the wall), and so is a shorter step either way (it hit the wall and came back within the
    step); both turn the sign. So a digit standing at a wall fails its second step, a reversal away from
    the walls fails, and a clip that starts at the wall it is heading to and leaves it counts as bounced.
    """
    n, _, f, h, w = clips.shape
    speed = h / 16 if speed is None else float(speed)
    digit_size = digit_size or max(1, h * 7 // 16)
    if speed <= 0:
        raise ValueError(f"motion needs a positive speed (pixels per frame), got {speed}")
    com = centre_of_mass(clips[:, 0]).numpy().astype(np.float64)  # (N, F, 2)
    margin = 0.55 * digit_size + 0.5 + speed / 2
    ok = np.zeros((n, f - 1), bool)
    for i, label in enumerate(labels.tolist()):
        dr, dc = DIRECTIONS[label % 4]
        axis = 0 if dr else 1
        size = h if axis == 0 else w
        path = com[i, :, axis]
        reach = (-0.5 + margin, size - 0.5 - margin)  # the centre of mass is at a wall beyond these
        ok[i] = _walk(np.diff(path), np.diff(com[i, :, 1 - axis]), path, float(dr or dc), speed, reach)
    return torch.from_numpy(ok)


def real_clips(labels: Tensor, frames: int, image_size: int, motion: str = "class", speed: float | None = None,
               digit_size: int | None = None, split: str = "heldout", seed: int = 0, start: str = "inside",
               lattice: int | None = None) -> Tensor:
    """Moving-MNIST clips (N, 1, frames, image_size, image_size) of `split` with exactly these labels.

    Clips are drawn from `seed` and the first one of each label is kept in turn, so two calls with the
    same arguments give the same clips.
    """
    labels = labels.long()
    need = torch.bincount(labels, minlength=int(labels.max()) + 1)
    pool = 2 * len(labels) + 200
    while True:
        data = make_moving_mnist(n_clips=pool, frames=frames, image_size=image_size, motion=motion, speed=speed,
                                 digit_size=digit_size, split=split, seed=seed, start=start, lattice=lattice)
        have = torch.bincount(data.labels, minlength=len(need))[:len(need)]
        if bool((have >= need).all()):
            break
        pool *= 2  # a rare label: draw more
    by_label = {k: torch.nonzero(data.labels == k).flatten().tolist() for k in labels.unique().tolist()}
    taken = {k: 0 for k in by_label}
    pick = []
    for k in labels.tolist():
        pick.append(by_label[k][taken[k]])
        taken[k] += 1
    return data.images[pick]


def _scores(model: DigitClassifier, clips: Tensor, labels: Tensor, motion: str, speed: float, digit_size: int,
            view: str, batch_size: int) -> tuple[dict[str, float], Tensor]:
    """The classifier's and the motion's numbers for one set of clips, and its frame features."""
    digits = labels // 4 if motion == "label" else labels
    classes, features = frame_classes(model, clips, digit_size, view, batch_size)
    right = classes == digits[:, None]
    scores = {"frame_accuracy": right.float().mean().item(), "clip_consistency": right.all(1).float().mean().item()}
    if motion != "bounce":
        steps = motion_steps(clips, labels, speed, digit_size)
        scores["motion"] = steps.all(1).float().mean().item()
        scores["motion_steps"] = steps.float().mean().item()
        scores["motion_most_steps"] = (steps.float().mean(1) >= SHARE_OF_STEPS).float().mean().item()
    return scores, features


def evaluate_clips(clips: Tensor, labels: Tensor | None, *, speed: float | None = None, motion: str = "class",
                   digit_size: int | None = None, start: str = "inside", lattice: int | None = None,
                   classifier: DigitClassifier | None = None,
                   view: str = "framed", reference_seed: int = 0, batch_size: int = 250) -> dict[str, float]:
    """Quality of moving-MNIST clips (N, 1, F, H, W) in [-1, 1] of class `labels` (N,), each number
    with the same for real clips beside it (key + "_real").

    frame_accuracy: share of frames the classifier reads as the clip's digit. clip_consistency: share
    of clips whose every frame does. motion (motion "class" or "label" only): share of clips whose every
    step moves by the rule of `motion_steps` (so the first step goes the class's way, or bounces off the
    wall the digit starts at); motion_steps: share of all steps that do; motion_most_steps: share of
    clips with at least 80% of their steps right. fd_classifier: Fréchet distance of the classifier's
    features of every frame vs the frames of real held-out clips; fd_classifier_real_baseline: the same
    for as many frames of real training-split clips; fd_ratio: their ratio.

    The real clips are moving MNIST's held-out split (the training split for the FD baseline) with the
    same labels, frames, image size, speed, digit size, motion, start and lattice (`make_moving_mnist`'s
    options: `CLIP_RULE` reads them from a sample file), drawn from `reference_seed`. `speed` and
    `digit_size` default to moving MNIST's (image_size / 16 and 7/16 of the frame).
    view: how frames are shown to the classifier (see `frame_views`). The default "framed" crops the
    digit around its centre of mass and rescales it to MNIST's framing, because the classifier was
    trained on centred 28-pixel digits in 32 pixels, while a moving digit is small and off-centre:
    read "as-is" or only "centred", real clips' frames are misread far more often, and a generated
    clip's accuracy would measure the judge's blind spot rather than the clip. The FD sees the frames
    in the same view, so it judges the digit's shape (and stray ink, noise, blur), not its position
    (motion judges that) nor its overall brightness (the levels set it).
    `classifier` defaults to the cached `load_classifier()`. Bad input raises one ValueError.
    """
    clips, labels = _check_clips(clips, labels, motion)
    n, _, f, h, _ = clips.shape
    speed = h / 16 if speed is None else float(speed)
    digit_size = digit_size or max(1, h * 7 // 16)
    if not 0 < digit_size <= h:
        raise ValueError(f"digit_size must lie in 1..{h} (the frame's side), got {digit_size}")
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    _warn_if_few(n * f, 128, "clip frames")
    model = (classifier or load_classifier()).eval()
    options = dict(frames=f, image_size=h, motion=motion, speed=speed, digit_size=digit_size,
                   start="inside" if motion == "bounce" else start, lattice=lattice)
    held = real_clips(labels, split="heldout", seed=reference_seed, **options)
    train = real_clips(labels, split="train", seed=reference_seed + 1, **options)
    fake_scores, f_fake = _scores(model, clips, labels, motion, speed, digit_size, view, batch_size)
    real_scores, f_held = _scores(model, held, labels, motion, speed, digit_size, view, batch_size)
    f_train = frame_classes(model, train, digit_size, view, batch_size)[1]
    metrics: dict[str, float] = {"num_clips": n, "frames": f, "image_size": h, "speed": speed}
    for key, value in fake_scores.items():
        metrics[key], metrics[f"{key}_real"] = value, real_scores[key]
    metrics["fd_classifier"] = frechet_distance_from_features(f_fake, f_held)
    metrics["fd_classifier_real_baseline"] = frechet_distance_from_features(f_train, f_held)
    metrics["fd_ratio"] = metrics["fd_classifier"] / max(metrics["fd_classifier_real_baseline"], 1e-12)
    return metrics


def load_clip_rule(path: str | os.PathLike) -> dict[str, Any]:
    """The clip rule (CLIP_RULE's options) that `ditkit sample` records in an .npz of a moving-MNIST run's
    clips; {} for other files."""
    if not str(path).endswith(".npz") or not Path(path).is_file():
        return {}
    with np.load(path, allow_pickle=False) as npz:
        if "clip_rule" not in npz.files:
            return {}
        rule = json.loads(str(npz["clip_rule"]))
    return {k: rule[k] for k in CLIP_RULE if k in rule}


def clip_metrics_table(metrics: dict[str, float]) -> str:
    """`evaluate_clips`' numbers as a table: each beside the same number for real clips."""
    lines = [f"{int(metrics['num_clips'])} clips of {int(metrics['frames'])} frames, "
             f"{int(metrics['image_size'])}x{int(metrics['image_size'])}, speed {metrics['speed']:g} px/frame",
             f"{'metric':<34} {'clips':>8} {'real clips':>11}"]
    for key, name in CLIP_ROWS:
        if key in metrics:
            lines.append(f"{name:<34} {metrics[key]:>8.4f} {metrics[key + '_real']:>11.4f}")
    lines.append(f"{'FD-classifier, per frame':<34} {metrics['fd_classifier']:>8.4f} "
                 f"{metrics['fd_classifier_real_baseline']:>11.4f}   (real: train vs held-out clips; "
                 f"ratio {metrics['fd_ratio']:.2f}x)")
    return "\n".join(lines)
