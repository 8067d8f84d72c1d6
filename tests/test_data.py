"""Data sources: MNIST-5k and its fixed held-out split, patterns, image folders, augmentation, images out."""
import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data import load_dataset, random_hflip
from ditkit.data.patterns import make_patterns
from ditkit.images import make_grid, save_comparison, save_grid, save_loss_curve


def test_mnist_loads_with_a_fixed_heldout_split():
    train, held, full = (load_dataset("mnist", split=s) for s in ("train", "heldout", "all"))
    assert len(full) == 5000 and full.images.shape == (5000, 1, 32, 32)
    assert full.images.min() == -1 and full.images.max() == 1
    assert full.labels.bincount().tolist() == [500] * 10
    assert held.labels.bincount().tolist() == [50] * 10 and len(train) == 4500
    # disjoint: no held-out image appears in the training split
    train_keys = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in train_keys for x in held.images)
    assert torch.equal(load_dataset("mnist", split="heldout").images, held.images)  # fixed
    assert (full.images[:, :, :2] == -1).all()  # padding is background
    assert load_dataset("mnist", seed=123).labels.tolist() == train.labels.tolist()  # split ignores user seed
    small = load_dataset("mnist", image_size=16, split="heldout")
    assert small.images.shape == (500, 1, 16, 16) and small.hflip is False


def test_patterns_follow_their_formulas():
    data = make_patterns(5, image_size=16, channels=3, noise=0.0)
    assert data.images.shape == (20, 3, 16, 16) and data.num_classes == 4
    assert data.images.min() >= -1 and data.images.max() <= 1
    sin2x = data.images[0, 0]
    assert torch.allclose(sin2x, sin2x[0:1].expand_as(sin2x))  # class 0 varies along x only
    sin4y = data.images[5, 0]
    assert torch.allclose(sin4y, sin4y[:, 0:1].expand_as(sin4y))  # class 1 along y only
    assert len(data.images[10, 0].unique()) == 2  # checkerboard is two-valued
    noisy = make_patterns(5, image_size=16, channels=2, seed=1)
    assert torch.equal(noisy.images, make_patterns(5, image_size=16, channels=2, seed=1).images)
    assert not torch.equal(noisy.images, make_patterns(5, image_size=16, channels=2, seed=2).images)


def _png(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_classes_and_an_unreadable_file(tmp_path):
    _png(tmp_path / "cats" / "a.png", (255, 0, 0))
    _png(tmp_path / "cats" / "b.PNG", (250, 0, 0))
    _png(tmp_path / "dogs" / "c.jpg", (0, 0, 255))
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"dogs/broken.png"):
        data = load_dataset(str(tmp_path), image_size=8)
    assert data.class_names == ["cats", "dogs"] and data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 3, 8, 8) and data.hflip
    assert data.images[0, 0].mean() > 0.9 and data.images[2, 2].mean() > 0.9


def test_flat_folder_is_unconditional_and_empty_folder_is_an_error(tmp_path):
    _png(tmp_path / "flat" / "a.png", (0, 255, 0))
    data = load_dataset(str(tmp_path / "flat"), image_size=8, channels=1)
    assert data.num_classes == 1 and data.labels.tolist() == [0] and data.images.shape == (1, 1, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown data source 'nope'"):
        load_dataset("nope")
    uncond = load_dataset("patterns", image_size=8, unconditional=True, n_per_class=2)
    assert uncond.num_classes == 1 and uncond.labels.unique().tolist() == [0]


def test_random_hflip_is_deterministic_given_a_generator():
    x = torch.arange(64.0).reshape(4, 1, 4, 4)
    a = random_hflip(x, torch.Generator().manual_seed(3))
    b = random_hflip(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for orig, out in zip(x, a):
        assert torch.equal(out, orig) or torch.equal(out, orig.flip(-1))


def test_grids_and_figures(tmp_path):
    imgs = torch.rand(6, 1, 8, 8) * 2 - 1
    assert make_grid(imgs, nrow=3).shape == (2 * 10 + 2, 3 * 10 + 2, 1)
    save_grid(tmp_path / "g.png", imgs, nrow=3)
    assert Image.open(tmp_path / "g.png").size == (32, 22)
    save_comparison(tmp_path / "c.png", torch.zeros(4, 3, 8, 8), torch.zeros(2, 4, 3, 8, 8), scale=1)
    assert Image.open(tmp_path / "c.png").size == (42, 10 + 2 + 3 + 22)
    save_loss_curve(tmp_path / "l.png", [1, 2, 3], [1.0, 0.5, 0.25])
    assert Image.open(tmp_path / "l.png").size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "g.png", "l.png"]  # no temp files left
