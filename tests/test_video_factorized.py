"""Factorised video generation (Emu Video): an image run draws each clip's first frame, a video run trained with
frame conditioning continues it. The two-phase config, the run's record of its image run, and sampling."""
from __future__ import annotations

import json

import pytest
import torch

from ditkit.data import load_dataset
from ditkit.pipeline import Pipeline
from ditkit.train import build_config, train

DATA = {"n_clips": 64, "motion": "class", "start": "anywhere"}
IMAGE = ["data=moving_mnist_frames", "image_size=16", "hidden_size=32", "depth=2", "num_heads=2", "patch_size=4",
         f"data_args={json.dumps(DATA)}", "batch_size=4", "samples_per_class=1", "sample.steps=2", "precision=fp32",
         "warmup_steps=1", "save_every=1000", "steps=2"]
VIDEO = ["data=moving_mnist", "image_size=16", "frames=4", "hidden_size=32", "depth=2", "num_heads=2", "patch_size=8",
         f"data_args={json.dumps(DATA)}", "batch_size=4", "samples_per_class=1", "sample.steps=2", "precision=fp32",
         "warmup_steps=1", "save_every=1000", "steps=2", "context_share=1.0", "context_frames=1"]


def test_moving_mnist_frames_are_the_clips_first_frames():
    clips = load_dataset("moving_mnist", image_size=16, frames=4, seed=3, n_clips=20, motion="class")
    frames = load_dataset("moving_mnist_frames", image_size=16, seed=3, n_clips=20, motion="class")
    assert frames.images.shape == (20, 1, 16, 16) and not frames.hflip
    assert torch.equal(frames.labels, clips.labels) and frames.class_names == clips.class_names
    # one-frame clips draw the same digits and starts as the first frame of longer ones where the start is free
    anywhere = load_dataset("moving_mnist", image_size=16, frames=4, seed=3, n_clips=20, motion="class",
                            start="anywhere")
    assert torch.equal(load_dataset("moving_mnist_frames", image_size=16, seed=3, n_clips=20, motion="class",
                                    start="anywhere").images, anywhere.images[:, :, 0])
    with pytest.raises(ValueError, match="frames does not apply"):
        load_dataset("moving_mnist_frames", frames=4)


@pytest.fixture(scope="module")
def factorized(tmp_path_factory):
    """A two-phase run from one config: the image run into OUT/image, then the video run continuing its frames."""
    root = tmp_path_factory.mktemp("factorized")
    image_config = root / "image.yaml"
    image_config.write_text("\n".join(item.replace("=", ": ", 1) for item in IMAGE) + "\n")
    c = build_config(assignments=[*VIDEO, f"image_model={image_config}", f"out={root / 'run'}"])
    result = train(c, progress=False)
    return root / "run", result


def test_the_image_run_trains_first_and_the_video_run_records_it(factorized):
    out, result = factorized
    assert (out / "image" / "finished.json").is_file() and result.steps == 2
    info = json.loads((result.checkpoint / "run.json").read_text())
    record = info["image_model"]
    assert record["path"].endswith("step_00000002") and len(record["sha256"]) == 64
    assert info["train_config"]["image_model"] == str(out / "image")


def test_sampling_draws_first_frames_with_the_image_run_and_keeps_them(factorized):
    out, _ = factorized
    pipe = Pipeline.load(out)
    clips = pipe.generate(classes=[1, 2], n_per_class=2, seed=5, progress=False)
    firsts = Pipeline.load(out / "image").generate(classes=[1, 2], n_per_class=2, seed=5, progress=False)
    assert clips.images.shape == (4, 1, 4, 16, 16)
    assert torch.equal(clips.images[:, :, 0], firsts.images.clamp(-1, 1))  # the image run's frames, kept exactly
    assert clips.settings["frame_conditioning"] == "trained"


def test_a_changed_image_run_is_refused(factorized, tmp_path):
    out, result = factorized
    pipe = Pipeline.load(out)
    record = dict(pipe.info["image_model"], sha256="0" * 64)
    pipe.info["image_model"] = record
    with pytest.raises(ValueError, match="has changed since this video run was trained"):
        pipe.generate(classes=[1], progress=False)
    pipe.info["image_model"] = dict(record, path=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="which is not there"):
        pipe.generate(classes=[1], progress=False)


@pytest.mark.parametrize("settings, match", [
    (["context_share=0"], r"frame conditioning \(context_share > 0\)"),
    (["patch_t=2", "context_frames=2"], "patch_t=1"),
    (["image_model_minutes=1"], "without one it does nothing"),
])
def test_bad_image_model_settings_say_what_to_change(settings, match, tmp_path):
    image = [] if "image_model_minutes=1" in settings else [f"image_model={tmp_path}"]
    with pytest.raises(ValueError, match=match):
        build_config(assignments=[*VIDEO, *image, *settings])


def test_an_image_model_config_of_clips_is_refused(tmp_path):
    wrong = tmp_path / "clips.yaml"
    wrong.write_text("data: moving_mnist\n")
    c = build_config(assignments=[*VIDEO, f"image_model={wrong}", f"out={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="must describe an image run"):
        train(c, progress=False)
