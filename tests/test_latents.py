"""The latent pipeline with a tiny random AutoencoderKL: extract (resumable, flips), train, sample, decode."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from ditkit.cli import main  # noqa: E402
from ditkit.data import LatentDataset, load_dataset  # noqa: E402
from ditkit.data.folder import load_image  # noqa: E402
from ditkit.data.latents import LatentSpace, extract_latents, load_latents  # noqa: E402

SCALE = 0.5  # not the SD VAE's 0.18215: proves the factor is read from the VAE's config
IMAGE, LATENT = 32, 16  # two encoder blocks: one 2x downsampling


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=IMAGE, scaling_factor=SCALE)
    with torch.no_grad():  # a narrow posterior (std e^-10), so a sample identifies the image it came from
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -20.0  # log-variance channels
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Two classes of 5 random 40x36 RGB images (resized and centre-cropped to 32x32 on loading)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for k in range(5):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    return root


def posterior(space: LatentSpace, images: torch.Tensor):
    with torch.no_grad():
        dist = space.model.encode(images).latent_dist
    return dist.mean, dist.std


def test_latents_are_scaled_posterior_samples(vae_dir, image_dir, tmp_path):
    space = LatentSpace(vae_dir)
    assert space.scaling_factor == SCALE and space.downsample == 2
    cache = extract_latents(image_dir, space, tmp_path / "cache", image_size=IMAGE, batch_size=4, progress=False)
    data = load_latents(cache)
    assert isinstance(data, LatentDataset) and not data.hflip
    assert data.images.shape == (10, 4, LATENT, LATENT) and data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0] * 5 + [1] * 5 and data.vae == str(vae_dir.resolve())
    files = sorted(image_dir.glob("*/*.png"))
    x = torch.stack([torch.from_numpy(load_image(f, IMAGE, 3)) for f in files])
    mean, std = posterior(space, x)
    eps = (data.images / SCALE - mean) / std  # the noise each stored sample drew: standard normal
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1  # 10240 values: 0.01 standard error


def test_flip_stores_the_mirror_image_as_the_next_row(vae_dir, image_dir, tmp_path):
    space = LatentSpace(vae_dir)
    data = load_latents(extract_latents(image_dir, space, tmp_path / "c", image_size=IMAGE, flip=True,
                                        progress=False))
    assert len(data) == 20 and data.labels.tolist() == [0] * 10 + [1] * 10
    first = torch.from_numpy(load_image(sorted(image_dir.glob("cat/*.png"))[0], IMAGE, 3))[None]
    for row, image in ((0, first), (1, first.flip(-1))):
        mean, std = posterior(space, image)
        assert ((data.images[row:row + 1] / SCALE - mean) / std).abs().max() < 6
    mean, std = posterior(space, first.flip(-1))  # and not the other way round
    assert ((data.images[0:1] / SCALE - mean) / std).abs().max() > 100


def test_an_interrupted_extraction_resumes_to_the_same_cache(vae_dir, image_dir, tmp_path, monkeypatch):
    space = LatentSpace(vae_dir)
    whole = load_latents(extract_latents(image_dir, space, tmp_path / "whole", image_size=IMAGE, batch_size=3,
                                         progress=False))
    calls, encode = [], LatentSpace.encode

    def crash_on_third_batch(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(self, *args, **kw)

    monkeypatch.setattr(LatentSpace, "encode", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_latents(image_dir, space, tmp_path / "part", image_size=IMAGE, batch_size=3, progress=False)
    progress = json.loads((tmp_path / "part" / "progress.json").read_text())
    assert progress["files_done"] == 6 and progress["rows"] == 6
    with pytest.raises(ValueError, match="incomplete.*rerun"):
        load_dataset(tmp_path / "part")
    monkeypatch.setattr(LatentSpace, "encode", encode)
    resumed = load_latents(extract_latents(image_dir, space, tmp_path / "part", image_size=IMAGE, batch_size=3,
                                           progress=False))
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.labels, whole.labels)
    with pytest.raises(ValueError, match="different extraction.*flip"):
        extract_latents(image_dir, space, tmp_path / "part", image_size=IMAGE, batch_size=3, flip=True,
                        progress=False)


def test_bad_vae_and_sizes_are_clear_errors(vae_dir, image_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LatentSpace(tmp_path)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        extract_latents(image_dir, vae_dir, tmp_path / "c", image_size=33, progress=False)


def test_extract_train_sample_decode_end_to_end(vae_dir, image_dir, tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["extract-latents", "--data", str(image_dir), "--vae", str(vae_dir), "--out", str(cache),
                 "--image-size", str(IMAGE), "--flip"]) == 0
    assert "20 latents (4, 16, 16)" in capsys.readouterr().out
    assert main(["train", "--data", str(cache), "--steps", "3", "--out", str(run), "hidden_size=32", "depth=1",
                 "num_heads=2", "patch_size=4", "batch_size=4", "warmup_steps=1", "samples_per_class=1",
                 "sample.steps=2", "precision=fp32"]) == 0
    info = json.loads((run / "checkpoints" / "step_00000003" / "run.json").read_text())
    config = json.loads((run / "checkpoints" / "step_00000003" / "config.json").read_text())
    assert info["vae"] == str(vae_dir.resolve())
    assert (config["in_channels"], config["input_size"]) == (4, LATENT)  # the model is sized by the cache
    with Image.open(run / "samples.png") as grid:  # decoded: real row + one sample row of 32x32 RGB images
        assert grid.mode == "RGB" and grid.height >= 2 * IMAGE
    assert main(["sample", "--ckpt", str(run), "--n-per-class", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.npz")]) == 0
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (4, 3, IMAGE, IMAGE) and images.min() >= -1 and images.max() <= 1
    # without its VAE a latent model cannot write pictures
    step = run / "checkpoints" / "step_00000003"
    (step / "run.json").write_text(json.dumps({**info, "vae": None}))
    assert main(["sample", "--ckpt", str(step), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert "run.json is truncated or corrupt (checksum mismatch; if you edited it on purpose, delete its entry " \
        "in checksums.json)" in capsys.readouterr().err
    sums = json.loads((step / "checksums.json").read_text())
    (step / "checksums.json").write_text(json.dumps({k: v for k, v in sums.items() if k != "run.json"}))
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(step), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert "--vae" in capsys.readouterr().err
