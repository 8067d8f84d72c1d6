"""ditkit.kinds: which per-kind class a checkpoint or a model gets, and what each kind refuses or writes. The
kinds sampling end to end: test_pipeline (image), test_video, test_text_to_image, test_control."""
from types import SimpleNamespace

import pytest
import torch

from ditkit.kinds import ControlRun, ImageRun, TextRun, VideoRun, kind_of, saved_kind
from ditkit.models import DiT, VideoDiT

TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=2)


def test_a_checkpoint_gets_the_kind_its_config_names():
    kinds = {name: type(saved_kind(name)) for name in ("DiT", None, "VideoDiT", "MMDiT", "PixArtDiT",
                                                         "ControlBranch")}
    assert kinds == {"DiT": ImageRun, None: ImageRun, "VideoDiT": VideoRun, "MMDiT": TextRun, "PixArtDiT": TextRun,
                     "ControlBranch": ControlRun}
    assert [k.name for k in (ImageRun(), VideoRun(), TextRun(), ControlRun())] == ["image", "video", "text", "control"]


def test_a_model_samples_as_its_kind_and_anything_else_as_an_image_run():
    assert type(kind_of(DiT(**TINY))) is ImageRun
    assert type(kind_of(VideoDiT(num_frames=2, **TINY))) is VideoRun
    assert type(kind_of(torch.nn.Linear(1, 1))) is ImageRun  # e.g. the trainer's PromptTable, sampled as classes


def test_each_kind_checks_its_own_outputs_and_inputs():
    run = SimpleNamespace(model=SimpleNamespace(num_frames=5), num_classes=2, conditional=True, device="cpu", info={})
    ImageRun().check_output("x.png")
    with pytest.raises(ValueError, match="holds an image model: write its samples to .png, a folder/ or .npz"):
        ImageRun().check_output("x.gif")
    VideoRun().check_output("x.gif")
    with pytest.raises(ValueError, match="holds a video model: write its samples to .gif, .mp4 or .npz"):
        VideoRun().check_output("x.png")
    assert VideoRun().clip(run, None) == [5] and VideoRun().clip(run, 3) == [3] and ImageRun().clip(run, None) == []
    with pytest.raises(ValueError, match="frames must be >= 1, got 0"):
        VideoRun().clip(run, 0)
    with pytest.raises(ValueError, match=r"frames applies to video runs only \(this is an image run\)"):
        ImageRun().clip(run, 4)
    with pytest.raises(ValueError, match="this is a control run: it samples from a condition image"):
        ControlRun().conditioned(run, run.model, None, 2, 1)
    with pytest.raises(ValueError, match=r"condition images are for control runs, one per class \(2\)"):
        ImageRun().conditioned(run, run.model, torch.zeros(2, 1, 8, 8), 2, 1)
    assert ImageRun().edit_style(run, masked=False)[1] == "edited" and ImageRun().edit_style(run, True) == (
        1.0, "inpainted")
    assert not VideoRun().edits and ImageRun().guided and not TextRun().guided
