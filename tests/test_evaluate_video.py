"""Clip evaluation: real moving-MNIST clips score high, and clips that break one rule (the digit moves the
wrong way, across its axis, stands still or jitters; the frames show different digits; the frames are
noise) fail that measure. The judge is ditkit's digit classifier trained for only two epochs from seed 0,
to keep the tests fast: it reads about 90% of real clips' frames right (the cached full classifier 95-97%)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditkit.data import load_mnist
from ditkit.data.moving_mnist import _reflect
from ditkit.evaluate import (centre_of_mass, evaluate_clips, frame_classes, frame_views, load_samples, motion_steps,
                             real_clips)
from ditkit.evaluate.classifier import train_classifier
from ditkit.evaluate.video import clip_metrics_table

LABELS = torch.arange(10).repeat(4)  # 40 clips, four of each class
FRAMES, SIZE, DIGIT, SPEED = 8, 32, 14, 2.0


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return train_classifier(seed=0, epochs=2)


@pytest.fixture(scope="module")
def clips():
    return real_clips(LABELS, FRAMES, SIZE, seed=5)


def paste(path: list[tuple[int, int]], digit: int = 0) -> torch.Tensor:
    """One clip (1, 1, F, 32, 32) of a 14-pixel held-out digit with its box's top-left corner at `path`."""
    mnist = load_mnist(32, split="heldout")
    x = mnist.images[int(torch.nonzero(mnist.labels == digit)[0, 0])][None, :, 2:30, 2:30].add(1).div(2)
    image = F.interpolate(x, size=(DIGIT, DIGIT), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    image = image.clamp(0, 1).numpy()  # a 28-pixel MNIST digit at moving MNIST's 14 pixels
    clip = np.zeros((len(path), SIZE, SIZE), np.float32)
    for f, (r, c) in enumerate(path):
        clip[f, r:r + DIGIT, c:c + DIGIT] = image
    return torch.from_numpy(clip).mul(2).sub(1)[None, None]


def columns(cols: list[int], row: int = 9) -> list[tuple[int, int]]:
    return [(row, c) for c in cols]


def test_real_clips_score_high(classifier, clips):
    metrics = evaluate_clips(clips, LABELS, classifier=classifier)
    for prefix in ("", "_real"):  # the clips given, and the held-out clips of the baseline
        assert metrics["frame_accuracy" + prefix] >= 0.65
        assert metrics["clip_consistency" + prefix] >= 0.65
        assert metrics["motion" + prefix] == 1.0  # real paths move exactly `speed` pixels a frame
        assert metrics["motion_steps" + prefix] == 1.0
    assert metrics["frame_accuracy_real"] >= 0.85
    assert metrics["fd_ratio"] <= 3.0
    assert (metrics["num_clips"], metrics["frames"], metrics["image_size"], metrics["speed"]) == (40, 8, 32, 2.0)
    table = clip_metrics_table(metrics)
    assert "real clips" in table and "FD-classifier" in table and "motion (steps)" in table


def test_framing_is_what_makes_small_digits_readable(classifier, clips):
    """Shrunk, off-centre digits read as-is or only centred are mostly misread; framed they are not."""
    digits = LABELS[:, None]
    acc = {view: (frame_classes(classifier, clips, DIGIT, view)[0] == digits).float().mean().item()
           for view in ("framed", "centred", "as-is")}
    assert acc["framed"] >= acc["centred"] + 0.4 and acc["framed"] >= acc["as-is"] + 0.4
    framed = frame_views(clips[:, :, 0], DIGIT)
    assert framed.shape == (40, 1, 32, 32) and framed.min() >= -1 and framed.max() <= 1
    assert torch.allclose(centre_of_mass(framed[:, 0]), torch.full((40, 2), 15.5), atol=0.75)


def test_long_real_clips_bounce_and_still_move_right():
    long_labels = torch.arange(10).repeat(2)
    long = real_clips(long_labels, 32, SIZE, seed=1)
    path = centre_of_mass(long[:, 0])
    axis = torch.tensor([1, 0, 1, 0] * 5)[long_labels % 4]
    along = path[torch.arange(20), :, axis].diff(dim=1)
    assert bool((along.sign() != along[:, :1].sign()).any(1).all())  # every clip reverses at a wall
    assert bool(motion_steps(long, long_labels).all())


def test_synthetic_paths():
    right = columns([2 + 2 * t for t in range(FRAMES)])
    bounce = columns([int(_reflect(np.array(10.0 + 2 * t), 18)) for t in range(FRAMES)])  # 10 .. 18, back to 12
    touch = columns([11, 13, 15, 17, 17, 15, 13, 11])  # the step that hits the wall comes straight back
    start_at_wall = columns([17, 17, 15, 13, 11, 9, 7, 5])
    good = [right, bounce, touch, start_at_wall]
    bad = {"wrong way": columns([14 - 2 * t for t in range(FRAMES)]),
           "across": [(2 + 2 * t, 9) for t in range(FRAMES)],
           "static": columns([9] * FRAMES),
           "jitter": columns([9 + 2 * (t % 2) for t in range(FRAMES)]),
           "reversal in mid-air": columns([4, 6, 8, 10, 8, 6, 4, 2]),
           "standing at the wall": columns([14, 16, 18, 18, 18, 16, 14, 12]),
           "too fast": columns([0, 4, 8, 12, 16, 12, 8, 4]),
           "too slow": columns([5, 5, 6, 6, 7, 7, 8, 8])}
    zero = torch.zeros(1, dtype=torch.long)  # digit 0 moves right
    for path in good:
        assert bool(motion_steps(paste(path), zero, SPEED, DIGIT).all()), path
    for name, path in bad.items():
        steps = motion_steps(paste(path), zero, SPEED, DIGIT)
        assert not bool(steps.all()), name
        if name != "standing at the wall":  # that one moves right except where it stands
            assert steps.float().mean() < 0.8, name  # fails the longer-clip measure too
    down = paste([(2 + 2 * t, 9) for t in range(FRAMES)])
    assert bool(motion_steps(down, torch.tensor([1]), SPEED, DIGIT).all())  # class 1 moves down
    assert bool(motion_steps(down, torch.tensor([5]), SPEED, DIGIT).all())  # 5 % 4 = 1: down too


def test_frames_of_different_digits_fail_consistency(classifier, clips):
    swapped = clips.clone()
    swapped[:, :, 4:] = clips.roll(1, 0)[:, :, 4:]  # the second half of each clip from a clip of another class
    assert bool((LABELS.roll(1) != LABELS).all())
    real = evaluate_clips(clips, LABELS, classifier=classifier)
    mixed = evaluate_clips(swapped, LABELS, classifier=classifier)
    assert mixed["clip_consistency"] <= 0.1 < 0.65 <= real["clip_consistency"]
    assert mixed["frame_accuracy"] <= 0.6 * real["frame_accuracy"] + 0.05
    assert mixed["clip_consistency_real"] == real["clip_consistency_real"]  # the baseline ignores the input


def test_noise_clips_have_a_far_worse_fd(classifier, clips):
    noise = torch.rand(clips.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = evaluate_clips(clips, LABELS, classifier=classifier)
    bad = evaluate_clips(noise, LABELS, classifier=classifier)
    assert bad["fd_ratio"] >= 20 * real["fd_ratio"]
    assert bad["motion"] == 0.0 and bad["frame_accuracy"] <= 0.3
    assert bad["fd_classifier_real_baseline"] == real["fd_classifier_real_baseline"]


def test_label_motion_and_bounce_motion(classifier):
    label_clips = real_clips(torch.arange(40), 6, SIZE, motion="label", seed=2)
    assert bool(motion_steps(label_clips, torch.arange(40)).all())  # label k * 4 + d moves DIRECTIONS[d]
    bounce = real_clips(LABELS[:20], FRAMES, SIZE, motion="bounce", seed=2)
    metrics = evaluate_clips(bounce, LABELS[:20], motion="bounce", classifier=classifier)
    assert "motion" not in metrics and metrics["frame_accuracy_real"] >= 0.6  # random directions: no motion rule
    assert "motion" not in clip_metrics_table(metrics)
    with pytest.raises(ValueError, match="positive speed"):
        motion_steps(label_clips, torch.arange(40), speed=0)


def test_real_clips_have_the_labels_asked_for():
    labels = torch.tensor([3, 3, 3, 0, 9, 9])
    a = real_clips(labels, 4, 16, seed=4)
    b = real_clips(labels, 4, 16, seed=4)
    assert a.shape == (6, 1, 4, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # three different clips of class 3


@pytest.mark.parametrize("clips, labels, kwargs, message", [
    (torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.long), {}, "video array .* images, not clips"),
    (torch.zeros(4, 3, 8, 32, 32), torch.zeros(4, dtype=torch.long), {}, "1 channel"),
    (torch.zeros(4, 1, 1, 32, 32), torch.zeros(4, dtype=torch.long), {}, "F >= 2"),
    (torch.zeros(4, 1, 8, 32, 16), torch.zeros(4, dtype=torch.long), {}, "square"),
    (torch.zeros(4, 1, 8, 32, 32), torch.zeros(3, dtype=torch.long), {}, "shape \\(4,\\)"),
    (torch.zeros(4, 1, 8, 32, 32), torch.zeros(4), {}, "integers"),
    (torch.zeros(4, 1, 8, 32, 32), torch.full((4,), 10), {}, "0..9"),
    (torch.zeros(4, 1, 8, 32, 32), None, {}, "need labels"),
    (torch.full((4, 1, 8, 32, 32), 2.0), torch.zeros(4, dtype=torch.long), {}, "\\[-1, 1\\]"),
    (torch.full((4, 1, 8, 32, 32), float("nan")), torch.zeros(4, dtype=torch.long), {}, "NaN"),
    (torch.zeros(4, 1, 8, 32, 32), torch.zeros(4, dtype=torch.long), {"motion": "spin"}, "unknown motion"),
    (torch.zeros(4, 1, 8, 32, 32), torch.zeros(4, dtype=torch.long), {"view": "zoom"}, "unknown view"),
    (torch.zeros(4, 1, 8, 32, 32), torch.zeros(4, dtype=torch.long), {"digit_size": 40}, "digit_size"),
])
def test_bad_input_is_one_clear_error(clips, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_clips(clips, labels, classifier=torch.nn.Identity(), **kwargs)  # fails before any classifying


def test_clips_written_by_sample_load_and_evaluate(classifier, clips, tmp_path):
    """An .npz as `ditkit sample --out clips.npz` writes it for a video run: images (N, C, F, H, W), labels."""
    path = tmp_path / "clips.npz"
    np.savez(path, images=clips.numpy(), labels=LABELS.numpy())
    images, labels = load_samples(path)
    from_file = evaluate_clips(images, labels, classifier=classifier)
    assert from_file == evaluate_clips(clips.numpy(), LABELS.numpy(), classifier=classifier)


def test_clip_rule_recorded_in_the_npz_sets_the_real_clips(classifier, tmp_path, monkeypatch, capsys):
    """`ditkit sample` records a moving-MNIST run's data options (CLIP_RULE) in its .npz; `ditkit eval` reads
    them, so lattice clips at 4 px a frame are judged against real clips of the same rule (every step right),
    and a flag overrides the record."""
    import json

    from ditkit.cli import main
    from ditkit.evaluate import video
    from ditkit.evaluate.video import load_clip_rule

    rule = {"motion": "class", "speed": 4, "start": "anywhere", "lattice": 4}
    labels = torch.arange(10).repeat(2)
    lattice = real_clips(labels, FRAMES, SIZE, speed=4, start="anywhere", lattice=4, seed=3)
    path = tmp_path / "clips.npz"
    np.savez(path, images=lattice.numpy(), labels=labels.numpy(), clip_rule=json.dumps(rule))
    assert load_clip_rule(path) == rule and load_clip_rule(tmp_path / "none.npz") == {}
    metrics = evaluate_clips(lattice, labels, classifier=classifier, **rule)
    assert metrics["motion"] == metrics["motion_real"] == 1.0 and metrics["speed"] == 4
    assert evaluate_clips(lattice, labels, classifier=classifier)["motion"] == 0.0  # judged at 2 px a frame

    monkeypatch.setattr(video, "load_classifier", lambda: classifier)
    capsys.readouterr()
    assert main(["eval", str(path), "--json"]) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert (recorded["speed"], recorded["motion"]) == (4, 1.0)
    assert main(["eval", str(path), "--json", "--speed", "8"]) == 0  # a flag wins over the record
    overridden = json.loads(capsys.readouterr().out)
    assert overridden["speed"] == 8 and overridden["motion"] < 0.5
