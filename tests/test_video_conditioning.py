"""Frame conditioning of the VideoDiT: per-frame times (Wan 2.2's TI2V form), training with given first
frames, image-to-video and longer clips by extension, and the training-free (RePaint) form beside it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.diffusion import FlowMatching, build_objective
from ditkit.kinds import join_windows, sample_frames, sample_window
from ditkit.models import VideoDiT
from ditkit.models.video import GivenFrames
from ditkit.pipeline import Pipeline
from ditkit.sampling import CFG
from ditkit.train import build_config, train
from test_video import randomize
from test_video import tiny as tiny_video

OLD_RUN = Path(__file__).parent / "data" / "old_run"  # an image run
TINY_RUN = ["data=moving_mnist", "image_size=16", "frames=4", "hidden_size=32", "depth=2", "num_heads=2",
            "patch_size=4", 'data_args={"n_clips": 64, "motion": "class"}', "batch_size=4", "samples_per_class=1",
            "sample.steps=2", "precision=fp32", "warmup_steps=1", "save_every=1000"]


def tiny(**kw) -> VideoDiT:
    return tiny_video(**{"num_frames": 4, **kw})


def frames_like(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# the model: per-frame times
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(patch_t=2, attention="factorized"),
                                     dict(attention="windowed", window=(2, 2, 2), learn_sigma=True)])
def test_a_per_frame_time_equal_on_every_frame_is_the_per_clip_path_bit_for_bit(options):
    model = randomize(tiny(**options))
    x, t, y = frames_like((3, 1, 4, 16, 16)), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t[:, None].expand(3, 4), y))


def test_per_frame_times_modulate_each_frame_group_and_agree_with_the_clip_path():
    """A clip whose frames share a time gives its per-clip output (to fp32 rounding, 1e-5) even in a batch
    where another clip's frames differ; a different time on one frame group changes that clip's output."""
    model = randomize(tiny(patch_t=2))
    x, y = frames_like((2, 1, 4, 16, 16)), torch.tensor([1, 2])
    mixed = torch.tensor([[0.0, 0.0, 600.0, 600.0], [300.0, 300.0, 300.0, 300.0]])
    with torch.no_grad():
        out = model(x, mixed, y)
        alone = model(x, torch.tensor([600.0, 300.0]), y)
    assert torch.allclose(out[1], alone[1], atol=1e-5)
    assert (out[0] - alone[0]).abs().max() > 1e-2  # frames 0-1 at t = 0 instead of 600


def test_tubelet_frames_must_share_a_time_and_t_must_fit():
    model = tiny(patch_t=2)
    x, y = torch.zeros(1, 1, 4, 16, 16), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="a tubelet of patch_t=2 frames has one time"):
        model(x, torch.tensor([[0.0, 500.0, 500.0, 500.0]]), y)
    with pytest.raises(ValueError, match=r"t must be \(1,\) \(one time per clip\) or \(1, 4\) \(one per frame\)"):
        model(x, torch.zeros(1, 3), y)
    with pytest.raises(ValueError, match="give a multiple of 2 frames"):
        GivenFrames(model, torch.zeros(1, 1, 1, 16, 16))


# ---------------------------------------------------------------------------------------------
# sampling with given frames
# ---------------------------------------------------------------------------------------------
def test_the_trained_form_feeds_given_frames_at_t_0_and_keeps_them_exactly():
    model = randomize(tiny(patch_t=2))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    given = frames_like((2, 1, 2, 16, 16))
    out = sample_window(model, FlowMatching(), (2, 1, 4, 16, 16), given, "trained", torch.tensor([0, 3]),
                        torch.Generator().manual_seed(0), guidance=CFG(2.0), steps=3, progress=False)
    assert torch.equal(out[:, :, :2], given)
    assert all(t.shape == (4, 4) and (t[:, :2] == 0).all() for t in seen)  # CFG's doubled batch of 2
    assert (seen[0][:, 2:] == 1000.0).all()  # the generated frames at the step's time (the first: pure noise)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_the_inpainting_form_keeps_the_given_frame_exactly(objective):
    model = randomize(tiny(patch_t=2, learn_sigma=objective == "ddpm"))
    given = frames_like((2, 1, 1, 16, 16))
    out = sample_window(model, build_objective(objective), (2, 1, 4, 16, 16), given, "inpaint", torch.tensor([0, 1]),
                        torch.Generator().manual_seed(0), steps=3, shift=1.5 if objective == "flow" else None,
                        progress=False)
    assert torch.equal(out[:, :, :1], given) and not torch.equal(out[:, :, 1], out[:, :, 0])


@pytest.mark.parametrize("conditioning", ["trained", "inpaint"])
def test_extension_windows_overlap_consistently(conditioning):
    """Each window starts with the last `overlap` frames of the one before, exactly; the joined clip is the
    first window followed by each next window's new frames, cut to length; the first window is the clip of
    one window from the same seed."""
    model = randomize(tiny())
    y, given = torch.tensor([1, 2]), frames_like((2, 1, 1, 16, 16))
    options = dict(y=y, steps=2, progress=False, conditioning=conditioning)
    windows = sample_frames(model, FlowMatching(), (2, 1, 9, 16, 16), given=given, window=4, overlap=2,
                            generator=torch.Generator().manual_seed(0), **options)
    assert len(windows) == 4  # 4 + 2 + 2 + 2 frames >= 9
    assert torch.equal(windows[0][:, :, :1], given)
    assert all(torch.equal(b[:, :, :2], a[:, :, -2:]) for a, b in zip(windows, windows[1:]))
    clip = join_windows(windows, 2, 9)
    assert clip.shape == (2, 1, 9, 16, 16)
    assert torch.equal(clip[:, :, 4:6], windows[1][:, :, 2:]) and torch.equal(clip[:, :, 8], windows[3][:, :, 2])
    one = sample_frames(model, FlowMatching(), (2, 1, 4, 16, 16), given=given, window=4, overlap=2,
                        generator=torch.Generator().manual_seed(0), **options)
    assert len(one) == 1 and torch.equal(one[0], windows[0])


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def test_the_training_loss_ignores_given_frames():
    """Given frames enter x_t clean, at t = 0, and carry no gradient: a per-frame output bias gets none on
    them; the noise drawn for them changes nothing; without `given` the loss is plain flow matching."""
    flow, x0, t = FlowMatching(cosine_weight=0.5), frames_like((3, 1, 4, 8, 8)), torch.tensor([0.2, 0.5, 0.9])
    given = torch.tensor([[True, True, False, False]] * 3)
    bias = torch.zeros(4, requires_grad=True)
    calls = []

    def model(x, t_model, y):
        calls.append((x.detach().clone(), t_model.detach().clone()))
        return 0.5 * x + bias[None, None, :, None, None]

    noise = frames_like(x0.shape, seed=2)
    loss = flow.training_losses(model, x0, t, {"y": torch.zeros(3)}, noise, given=given)["loss"].sum()
    loss.backward()
    assert torch.equal(bias.grad[:2], torch.zeros(2)) and (bias.grad[2:].abs() > 0).all()
    x_seen, t_seen = calls[0]
    assert torch.equal(x_seen[:, :, :2], x0[:, :, :2]) and torch.equal(t_seen[:, :2], torch.zeros(3, 2))
    assert torch.allclose(t_seen[:, 2], t * flow.time_scale)
    other = noise.clone()
    other[:, :, :2] = frames_like(other[:, :, :2].shape, seed=3)
    with torch.no_grad():
        again = flow.training_losses(model, x0, t, {"y": torch.zeros(3)}, other, given=given)["loss"].sum()
        plain = flow.training_losses(model, x0, t, {"y": torch.zeros(3)}, noise)
    assert torch.equal(again, loss.detach())
    pred = 0.5 * flow.q_sample(x0, t, noise)
    assert torch.equal(plain["mse"], ((noise - x0 - pred) ** 2).mean(dim=(1, 2, 3, 4)))


def test_context_training_draws_its_mask_from_the_generator_and_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    from ditkit.train.kinds import make_kind

    settings = [*TINY_RUN, "context_share=0.5", "context_frames=2", "lr=1e-3"]
    kind = make_kind(build_config(None, {"out": str(tmp_path / "k")}, settings))
    mask = kind.given_frames(64, torch.Generator().manual_seed(0))
    # chosen clips get their first frame, or their first two (a velocity for extension), never a later one alone
    assert mask.shape == (64, 4) and not mask[:, 2:].any() and not (mask[:, 1] & ~mask[:, 0]).any()
    assert 0.25 < mask[:, 0].float().mean() < 0.75
    assert 0 < mask[:, 1].sum() < mask[:, 0].sum()
    plain = make_kind(build_config(None, {"out": str(tmp_path / "p")}, TINY_RUN))
    g = torch.Generator().manual_seed(0)
    assert plain.given_frames(64, g) is None  # and draws nothing
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())

    whole = train(build_config(None, {"out": str(tmp_path / "whole"), "steps": 3}, settings), progress=False)
    train(build_config(None, {"out": str(tmp_path / "parts"), "steps": 1}, settings), progress=False)
    parts = train(build_config(None, {"out": str(tmp_path / "parts"), "steps": 3}, settings), resume=True,
                  progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(r.checkpoint / name)) for r in (whole, parts))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_trainer_gives_the_loss_its_mask(tmp_path, monkeypatch):
    seen = []
    losses = FlowMatching.training_losses

    def recording(self, *args, given=None, **kwargs):
        seen.append(given)
        return losses(self, *args, given=given, **kwargs)

    monkeypatch.setattr(FlowMatching, "training_losses", recording)
    train(build_config(None, {"out": str(tmp_path / "c"), "steps": 2}, [*TINY_RUN, "context_share=1"]), progress=False)
    assert len(seen) == 2 and all(g.shape == (4, 4) and g[:, 0].all() and not g[:, 1:].any() for g in seen)
    train(build_config(None, {"out": str(tmp_path / "p"), "steps": 1}, TINY_RUN), progress=False)
    assert seen[2] is None


@pytest.mark.parametrize("settings, match", [
    (["context_share=1.5"], r"context_share must be in \[0, 1\]"),
    (["context_share=0.5", "context_frames=0"], "context_frames must be >= 1"),
    (["context_share=0.5", "patch_t=2"], "context_frames=1 with patch_t=2: .* multiple of 2"),
    (["context_share=0.5", "context_frames=4"], "context_frames=4 leaves nothing to generate"),
    (["context_share=0.5", "objective=ddpm"], "needs video data .* and objective=flow"),
    (["context_share=0.5", "data=mnist", "data_args={}", "frames=null"], "needs video data"),
])
def test_bad_context_settings_say_what_to_change(settings, match):
    with pytest.raises(ValueError, match=match):
        build_config(None, {}, [*TINY_RUN, *settings])


# ---------------------------------------------------------------------------------------------
# Pipeline and CLI on tiny runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run trained with frame conditioning (context_share) and one without, 2 steps each."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("context", ["context_share=0.5"]), ("plain", ["patch_t=2"])):
        train(build_config(None, {"out": str(root / name), "steps": 2}, [*TINY_RUN, *extra]), progress=False)
    return root


def test_image_to_video_keeps_the_first_frame_exactly(runs):
    pipe = Pipeline.load(runs / "context", device="cpu")
    frame = frames_like((1, 16, 16))
    samples = pipe.generate(first_frame=frame, classes=[3, 5], n_per_class=2, steps=2, progress=False)
    assert samples.images.shape == (4, 1, 4, 16, 16) and samples.settings["frame_conditioning"] == "trained"
    assert all(torch.equal(clip[:, 0], frame) for clip in samples.images)
    inpainted = pipe.generate(first_frame=frame, classes=[3], steps=2, progress=False, frame_conditioning="inpaint")
    assert torch.equal(inpainted.images[0, :, 0], frame) and inpainted.settings["frame_conditioning"] == "inpaint"
    each = torch.stack([frames_like((1, 16, 16)) * (i + 1) / 4 for i in range(4)])[:, :, None]  # one per clip
    own = pipe.generate(first_frame=each, classes=[3, 5], n_per_class=2, steps=2, progress=False)
    assert torch.equal(own.images[:, :, :1], each)
    with pytest.raises(ValueError, match=r"one per clip \(4, C, k, H, W\), got shape \(3, 1, 1, 16, 16\)"):
        pipe.generate(first_frame=each[:3], classes=[3, 5], n_per_class=2, steps=2, progress=False)


def test_longer_clips_are_drawn_by_extension(runs):
    pipe = Pipeline.load(runs / "context", device="cpu")
    long = pipe.generate(classes=[1], frames=10, steps=2, progress=False)
    assert long.images.shape == (1, 1, 10, 16, 16) and long.settings["frame_conditioning"] == "trained"
    one = pipe.generate(classes=[1], frames=10, steps=2, progress=False, extend=False)
    assert one.settings.get("frame_conditioning") is None and not torch.equal(one.images, long.images)
    start = pipe.generate(classes=[1], steps=2, progress=False)  # the first window, from the same seed
    assert torch.equal(long.images[:, :, :4], start.images)


def test_bad_frame_input_gets_a_note_or_one_clear_error(runs, tmp_path):
    context, plain = (Pipeline.load(runs / name, device="cpu") for name in ("context", "plain"))
    colour = tmp_path / "colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), dtype=np.uint8)).save(colour)
    samples = context.generate(first_frame=colour, classes=[2], steps=2, progress=False)
    assert any("converted the image to grey" in n for n in samples.notes)
    assert any("resized the 24x40 image to the model's 16x16" in n for n in samples.notes)
    fitted = context._first_frames(colour, 1, [])
    assert torch.equal(samples.images[0, :, :1], fitted[0])

    odd = plain.generate(classes=[2], frames=3, steps=2, progress=False)  # patch_t 2
    assert odd.images.shape[2] == 3 and sum("not a multiple of patch_t=2" in n for n in odd.notes) == 1
    auto = plain.generate(first_frame=frames_like((1, 16, 16)), classes=[2], steps=2, progress=False)
    assert auto.settings["frame_conditioning"] == "inpaint" and any("training-free" in n for n in auto.notes)
    long = plain.generate(classes=[2], frames=6, steps=2, progress=False)
    assert any("drawn in one window" in n and "context_share" in n for n in long.notes)
    inpainted = plain.generate(classes=[2], frames=6, frame_conditioning="inpaint", steps=2, progress=False)
    assert inpainted.images.shape[2] == 6 and inpainted.settings["frame_conditioning"] == "inpaint"
    with pytest.raises(ValueError, match="not trained with frame conditioning .*context_share"):
        plain.generate(classes=[2], frames=8, extend=True, steps=2, progress=False)
    with pytest.raises(ValueError, match="'trained' needs a run trained with frame conditioning .*context_share"):
        plain.generate(first_frame=frames_like((1, 16, 16)), frame_conditioning="trained", progress=False)
    with pytest.raises(ValueError, match="leave nothing to generate"):
        context.generate(first_frame=frames_like((1, 1, 4, 16, 16)), classes=[2], progress=False)
    image_run = Pipeline.load(OLD_RUN, device="cpu")
    with pytest.raises(ValueError, match=r"first frame \(--first-frame\), --extend .* video runs only"):
        image_run.generate(first_frame=colour, progress=False)


def test_cli_image_to_video_and_extension(runs, tmp_path, capsys):
    from ditkit.cli import main

    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16), dtype=np.uint8)).save(digit)
    out = tmp_path / "i2v.npz"
    assert main(["sample", "--ckpt", str(runs / "context"), "--first-frame", str(digit), "--class", "3",
                 "--n-per-class", "2", "--steps", "2", "--out", str(out)]) == 0
    clips = np.load(out)["images"]
    assert str(np.load(out)["clip_rule"]) == '{"motion": "class"}'  # for `ditkit eval` (test_evaluate_video)
    want = np.asarray(Image.open(digit), dtype=np.float32) / 127.5 - 1
    assert clips.shape == (2, 1, 4, 16, 16) and np.array_equal(clips[:, 0, 0], np.stack([want, want]))
    assert main(["sample", "--ckpt", str(runs / "context"), "--frames", "10", "--class", "3", "--n-per-class", "1",
                 "--steps", "2", "--out", str(tmp_path / "long.gif")]) == 0
    with Image.open(tmp_path / "long.gif") as gif:
        assert gif.n_frames == 10
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(runs / "plain"), "--frames", "8", "--extend", "--steps", "2",
                 "--out", str(tmp_path / "x.gif")]) == 2
    assert "context_share" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(OLD_RUN), "--first-frame", str(digit), "--out", str(tmp_path / "x.png")]) == 2
    assert "video runs only" in capsys.readouterr().err
    recorded = Pipeline.load(runs / "context", device="cpu").info["train_config"]
    assert recorded["context_share"] == 0.5 and recorded["context_frames"] == 1


def test_sample_frames_sets_the_clip_length_drawn_by_default(runs):
    """sample_frames: a run trained on short windows gives clips of that many frames when none are asked for,
    by extension (the first window's frames are the start of the clip); an image run may not set it."""
    pipe = Pipeline.load(runs / "context", device="cpu")
    short = pipe.generate(classes=[3], steps=2, progress=False)
    pipe.info["train_config"]["sample_frames"] = 7
    long = pipe.generate(classes=[3], steps=2, progress=False)
    assert short.images.shape[2] == 4 and long.images.shape[2] == 7 and "frame_conditioning" in long.settings
    assert torch.equal(long.images[:, :, :4], short.images)  # the same seed draws the same first window
    assert pipe.generate(classes=[3], frames=5, steps=2, progress=False).images.shape[2] == 5
    with pytest.raises(ValueError, match="sample_frames is a video run's default clip length"):
        build_config(assignments=["sample_frames=8"])
