"""Images out: uint8 conversion, grids, the comparison figure, the loss curve; all written atomically."""
import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.images import make_grid, save_comparison, save_grid, save_loss_curve, to_uint8


def test_to_uint8_maps_the_range_and_channel_counts():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    assert to_uint8(x).reshape(-1).tolist() == [0, 128, 255, 255]  # clamped
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    latent = torch.stack([torch.full((4, 4), v) for v in (-1.0, 0.0, 1.0, 0.5)])[None]
    assert to_uint8(latent)[0, 0, 0].tolist() == [0, 128, 255]  # first 3 of 4 channels
    assert to_uint8(torch.ones(1, 2, 4, 4))[0, 0, 0].tolist() == [255, 255, 0]


def test_grid_pixel_size_and_placement():
    imgs = torch.rand(5, 1, 8, 6) * 2 - 1
    grid = make_grid(imgs, nrow=3)
    assert grid.shape == (2 * 10 + 2, 3 * 8 + 2, 1) and grid.dtype == np.uint8
    assert np.array_equal(grid[12:20, 10:16], to_uint8(imgs[4:5])[0])  # 5th image: row 1, column 1
    assert (grid[12:20, 18:24] == 255).all()  # the unused 6th cell stays padding
    assert make_grid(torch.zeros(4, 3, 8, 8), nrow=4, padding=0).shape == (8, 32, 3)
    with pytest.raises(ValueError):
        make_grid(imgs, nrow=0)


def test_save_grid_writes_a_png_and_no_temp_files(tmp_path):
    imgs = torch.rand(6, 3, 8, 8) * 2 - 1
    save_grid(tmp_path / "sub" / "g.png", imgs, nrow=3)
    with Image.open(tmp_path / "sub" / "g.png") as im:
        assert im.size == (32, 22) and im.mode == "RGB"
    save_grid(tmp_path / "sub" / "g.png", imgs[:, :1], nrow=2, scale=2)  # overwrite, grey, enlarged
    with Image.open(tmp_path / "sub" / "g.png") as im:
        assert im.size == (2 * 22, 2 * 32) and im.mode == "L"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["g.png"]


def test_comparison_figure_layout(tmp_path):
    real = torch.ones(4, 3, 8, 8)
    generated = -torch.ones(2, 4, 3, 8, 8)
    save_comparison(tmp_path / "c.png", real, generated, scale=1)
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (42, 10 + 2 + 3 + 22)
        pixels = np.asarray(im)
    assert (pixels[2:10, 2:10] == 255).all()  # real row on top
    assert (pixels[10 + 2 + 2, :] == 64).all()  # the separator line
    assert (pixels[15 + 2:15 + 10, 2:10] == 0).all()  # generated rows below
    save_comparison(tmp_path / "c2.png", real[:, :1], generated[:, :, :1])
    with Image.open(tmp_path / "c2.png") as im:
        assert im.size == (2 * 42, 2 * 37)
    with pytest.raises(ValueError, match="generated"):
        save_comparison(tmp_path / "bad.png", real, generated[:, :3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "c2.png"]


def test_loss_curve_png(tmp_path):
    steps = list(range(1, 201))
    losses = [1.0 / s + 0.01 for s in steps]
    losses[50] = float("nan")  # a skipped step must not break the plot or its moving average
    save_loss_curve(tmp_path / "l.png", steps, losses, title="test")
    with Image.open(tmp_path / "l.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    save_loss_curve(tmp_path / "neg.png", [1, 2], [-0.5, 0.5])  # non-positive: linear axis
    save_loss_curve(tmp_path / "empty.png", [], [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "l.png", "neg.png"]
    with pytest.raises(ValueError):
        save_loss_curve(tmp_path / "x.png", [1, 2], [1.0])


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600): the final file must have 0666 less the umask."""
    import os

    from ditkit.io import write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
