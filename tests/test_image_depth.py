"""Images of every bit depth load at their true brightness (issue 16, items 1 and 11): 16-bit grey and
RGB PNGs, float and 16-bit TIFFs, against an 8-bit copy of the same picture."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ditkit.data import load_folder
from ditkit.data.folder import load_image
from ditkit.sampling.editing import read_image

SIZE = 8
# a horizontal ramp, dark to white, and its 8-bit copy: 8-bit level k is 16-bit level 257 k
RAMP8 = np.tile(np.linspace(0, 255, SIZE).round().astype(np.uint8), (SIZE, 1))
RAMP16 = RAMP8.astype(np.uint16) * 257


def write_png16(path, arr) -> None:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write 16-bit colour."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].tobytes() for i in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_16_bit_grey_png_matches_its_8_bit_copy(tmp_path):
    write_png16(tmp_path / "g16.png", RAMP16)
    Image.fromarray(RAMP8).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really read as a 16-bit image
    for channels in (1, 3):
        a, b = load_image(tmp_path / "g16.png", SIZE, channels), load_image(tmp_path / "g8.png", SIZE, channels)
        assert a.shape == b.shape == (channels, SIZE, SIZE)
        np.testing.assert_allclose(a, b, atol=1e-5)  # bug: [-1, 1, 1, 1, ...] (all but black clipped)
    np.testing.assert_allclose(load_image(tmp_path / "g16.png", SIZE, 1)[0, 0, [0, -1]], [-1, 1], atol=1e-6)


def test_16_bit_rgb_png_matches_its_8_bit_copy(tmp_path):
    rgb8 = np.stack([RAMP8, RAMP8[:, ::-1], np.full_like(RAMP8, 100)], -1)
    write_png16(tmp_path / "c16.png", rgb8.astype(np.uint16) * 257)
    Image.fromarray(rgb8).save(tmp_path / "c8.png")
    for channels in (1, 3):
        np.testing.assert_allclose(load_image(tmp_path / "c16.png", SIZE, channels),
                                   load_image(tmp_path / "c8.png", SIZE, channels), atol=1e-5)


def test_float_and_16_bit_tiffs_are_read_and_scaled(tmp_path):
    Image.fromarray(RAMP8.astype(np.float32) / 255).save(tmp_path / "f.tif")  # mode "F", 0..1
    Image.fromarray(RAMP16).save(tmp_path / "g.tiff")  # mode "I;16"
    Image.fromarray(RAMP8).save(tmp_path / "g8.png")
    ref = load_image(tmp_path / "g8.png", SIZE, 1)
    for name in ("f.tif", "g.tiff"):
        np.testing.assert_allclose(load_image(tmp_path / name, SIZE, 1), ref, atol=1e-5)
    # a float image brighter than 1 is clipped to white, not wrapped or rescaled
    Image.fromarray(np.full((SIZE, SIZE), 3.0, np.float32)).save(tmp_path / "hot.tif")
    assert load_image(tmp_path / "hot.tif", SIZE, 1).min() == 1.0


def test_a_folder_of_16_bit_and_tiff_images_trains_at_true_brightness(tmp_path):
    for k, cls in enumerate(("dark", "light")):
        (tmp_path / cls).mkdir()
        level = 10_000 if k == 0 else 50_000
        write_png16(tmp_path / cls / "a.png", np.full((SIZE, SIZE), level, np.uint16))
        Image.fromarray(np.full((SIZE, SIZE), level, np.uint16)).save(tmp_path / cls / "b.tif")
    data = load_folder(tmp_path, image_size=SIZE, channels=1)
    assert data.class_names == ["dark", "light"] and len(data) == 4  # .tif files are read too
    means = [data.images[data.labels == k].mean().item() for k in range(2)]
    expected = [10_000 / 65535 * 2 - 1, 50_000 / 65535 * 2 - 1]
    assert means == pytest.approx(expected, abs=1e-4)


def test_edit_reads_16_bit_images_at_true_brightness(tmp_path):
    write_png16(tmp_path / "g16.png", RAMP16)
    Image.fromarray(RAMP8).save(tmp_path / "g8.png")
    a, b = read_image(tmp_path / "g16.png"), read_image(tmp_path / "g8.png")
    assert a.shape == b.shape == (1, 1, SIZE, SIZE)
    assert (a - b).abs().max() < 1e-5
