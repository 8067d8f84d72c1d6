"""Structure control: the zero-initialised branch leaves the base model unchanged bit for bit, only the
branch trains, condition images, a short control training on MNIST whose samples follow their
low-resolution condition, and `ditkit train --control` / `ditkit edit` end to end."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main
from ditkit.data import load_dataset
from ditkit.data.conditions import edges, lowres, make_condition
from ditkit.models import DiT
from ditkit.models.control import ControlBranch, ControlDiT
from ditkit.pipeline import Pipeline
from ditkit.sampling import sample
from ditkit.train import build_config, train
from ditkit import checkpoint as ckpt
from test_gaussian_diffusion import one_thread  # noqa: F401  (the fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_dit(block: str, **options) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=3,
                block=block, **options)
    for p in model.parameters():  # the zero-initialised layers would hide any difference
        p.data.normal_(0, 0.1)
    return model


# ------------------------------------------------------------------------------------------------
# The branch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["adaln_zero", "adaln", "cross_attn", "in_context"])
@pytest.mark.parametrize("condition", ["edges", "lowres"])
def test_zero_initialised_branch_leaves_the_base_unchanged(block, condition):
    base = random_dit(block).eval()
    control = ControlDiT(base, ControlBranch.from_base(base, 2, condition)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t, y = torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([0, 1, 2, 3])
    cond = make_condition(condition, torch.rand(4, 1, 8, 8, generator=g) * 2 - 1)
    with torch.no_grad():
        assert torch.equal(control(x, t, y, cond), base(x, t, y))  # bit for bit
    for copy, original in zip(control.branch.blocks, base.blocks):
        assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), original.state_dict().values()))


@pytest.mark.parametrize("mlp", ["gelu_erf", "swiglu"])
def test_the_branch_copies_the_bases_mlp_kind(tmp_path, mlp):
    """The demo's base has the exact-GELU MLP (issue 14): the copies must compute what the base's blocks do."""
    base = random_dit("adaln_zero", mlp=mlp).eval()
    branch = ControlBranch.from_base(base, 2, "lowres")
    assert branch.config["mlp"] == mlp
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(branch.blocks[1](tokens, c), base.blocks[1](tokens, c))
    branch.save_pretrained(tmp_path)
    assert ControlBranch.from_pretrained(tmp_path).config == branch.config
    ControlDiT(base, branch)  # fits its base
    with pytest.raises(ValueError, match="paper's DiT blocks"):
        ControlBranch.from_base(random_dit("adaln_zero", norm="rmsnorm"), 1, "lowres")


def test_only_the_branch_trains_and_then_changes_the_output():
    base = random_dit("adaln_zero")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    control = ControlDiT(base, ControlBranch.from_base(base, 2, "lowres")).train()
    assert not any(p.requires_grad for p in base.parameters())
    optimizer = torch.optim.SGD([p for p in control.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t, y = torch.full((4,), 300.0), torch.tensor([0, 1, 2, 0])
    for _ in range(2):  # the zero projections move first, then the condition embedder gets a gradient
        optimizer.zero_grad()
        control(x, t, y, cond).square().mean().backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    branch = control.branch
    assert branch.zero_projs[0].weight.abs().sum() > 0 and branch.cond_embedder.proj.weight.abs().sum() > 0
    with torch.no_grad():
        assert not torch.equal(control.eval()(x, t, y, cond), base(x, t, y))


def test_branch_must_fit_its_base():
    base = random_dit("adaln_zero")
    with pytest.raises(ValueError, match="control_blocks must be in 1..3"):
        ControlBranch.from_base(base, 4, "edges")
    other = ControlBranch(64, 2, 4.0, 2, 1, "adaln_zero", 2, "edges")
    with pytest.raises(ValueError, match="hidden_size"):
        ControlDiT(base, other)
    control = ControlDiT(base, ControlBranch.from_base(base, 1, "edges"))
    with pytest.raises(ValueError, match="condition must be"):
        control(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown control condition"):
        ControlBranch.from_base(base, 1, "depth")


def test_conditions():
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.equal(edges(flat), torch.full((1, 1, 8, 8), -1.0))  # no edge anywhere, not even at the border
    step = torch.full((1, 3, 8, 8), -1.0)
    step[..., 4:] = 1.0
    e = edges(step)
    assert e.shape == (1, 1, 8, 8) and (e[..., 3:5] == 1).all()
    assert (e[..., :2] == -1).all() and (e[..., 6:] == -1).all()
    x = torch.arange(64.0).reshape(1, 1, 8, 8) / 32 - 1
    low = lowres(x)
    assert low.shape == x.shape and torch.allclose(low[0, 0, :4, :4], x[0, 0, :4, :4].mean().expand(4, 4))
    assert torch.allclose(lowres(low), low)  # already low resolution
    with pytest.raises(ValueError, match="divisible by 4"):
        lowres(torch.zeros(1, 1, 6, 6))


# ------------------------------------------------------------------------------------------------
# Control training on MNIST
# ------------------------------------------------------------------------------------------------

# 16x16 MNIST, a 2-block DiT with 4x4 patches: a base run and a low-resolution control run, ~6 s on one core
TINY = ["image_size=16", "hidden_size=64", "depth=2", "num_heads=4", "patch_size=4", "batch_size=32",
        "warmup_steps=10", "samples_per_class=1", "sample.steps=4", "precision=fp32", "log_every=50"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    torch.set_num_threads(1)
    train(build_config(None, {"data": "mnist", "out": str(root / "base"), "steps": 100}, TINY), progress=False)
    train(build_config(None, {"data": "mnist", "out": str(root / "ctl"), "steps": 150, "control": "lowres",
                              "base": str(root / "base")}, TINY), progress=False)
    return root


def test_control_run_checkpoints_only_the_branch(runs):
    path = ckpt.latest_checkpoint(runs / "ctl")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "ControlBranch" and config["num_blocks"] == 1 and config["condition"] == "lowres"
    info = json.loads((path / "run.json").read_text())
    assert info["base_checkpoint"] == str(ckpt.latest_checkpoint(runs / "base").resolve())
    pipe = Pipeline.load(runs / "ctl")
    assert isinstance(pipe.model, ControlDiT)
    saved = ckpt.load_weights(path, "ema.safetensors")
    assert set(saved) == set(pipe.model.branch.state_dict())  # no base weights in the control checkpoint
    base = Pipeline.load(runs / "base").model
    assert all(torch.equal(v, pipe.model.base.state_dict()[k]) for k, v in base.state_dict().items())


def test_samples_follow_the_low_resolution_condition(runs):
    """100 held-out digits: the low-resolution error of samples against the digits' own low-resolution
    images (MSE in [-1, 1] units, 10 Euler steps, seed 0). Measured: base 0.058, control 0.0061."""
    held = load_dataset("mnist", image_size=16, split="heldout")
    x, y = held.images[:100], held.labels[:100]
    cond = lowres(x)
    base, control = Pipeline.load(runs / "base"), Pipeline.load(runs / "ctl")
    kw = dict(y=y, steps=10, sampler="euler", progress=False)
    plain = sample(base.model, base.objective, x.shape, generator=torch.Generator().manual_seed(0), **kw)
    steered = sample(control.model.bind(cond), control.objective, x.shape, generator=torch.Generator().manual_seed(0),
                     **kw)
    err_plain = (lowres(plain.clamp(-1, 1)) - cond).square().mean().item()
    err_control = (lowres(steered.clamp(-1, 1)) - cond).square().mean().item()
    assert err_control < 0.02 and err_control < err_plain / 3


# ------------------------------------------------------------------------------------------------
# The CLI
# ------------------------------------------------------------------------------------------------

def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_cli_edit(runs, tmp_path, capsys):
    digit = ((load_dataset("mnist", image_size=16, split="heldout").images[0, 0] + 1) * 127.5).round()
    digit = digit.to(torch.uint8).numpy()
    image = _png(tmp_path / "in.png", digit)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # regenerate the right half
    mask_file = _png(tmp_path / "mask.png", mask)

    out = str(tmp_path / "inpainted.png")
    assert main(["edit", "--ckpt", str(runs / "base"), "--image", image, "--mask", mask_file, "--class", "7",
                 "--steps", "8", "--jump-n-sample", "2", "--n", "2", "--out", out]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 16 + 2, 2 + 2 * 18)  # make_grid's 2-pixel padding, two edits in a row
    for left in (2, 20):
        edited = grid[2:18, left:left + 16]
        assert np.array_equal(edited[:, :8], digit[:, :8]) and not np.array_equal(edited[:, 8:], digit[:, 8:])

    out = str(tmp_path / "controlled.png")
    assert main(["edit", "--ckpt", str(runs / "ctl"), "--image", image, "--steps", "8", "--out", out]) == 0
    # one edit is written at the image's size, no border
    assert "lowres-controlled" in capsys.readouterr().out and Image.open(out).size == (16, 16)
    assert main(["edit", "--ckpt", str(runs / "base"), "--image", image, "--strength", "0", "--out", out]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), digit)


def test_cli_edit_fits_another_size_and_colour_to_the_model(runs, tmp_path, capsys):
    """An input of another size is centre-cropped to the model's aspect ratio and resized, with a note; a colour
    image for a grey model is converted (strength 0 returns the fitted input)."""
    wide = np.zeros((32, 48, 3), np.uint8)
    wide[:, 8:40] = 255  # the centred 32x32 square is white, the side bars black
    out = str(tmp_path / "o.png")
    assert main(["edit", "--ckpt", str(runs / "base"), "--image", _png(tmp_path / "w.png", wide), "--strength", "0",
                 "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "resized the 48x32 image to the model's 16x16" in printed and "converted the image to grey" in printed
    assert np.asarray(Image.open(out)).shape == (16, 16) and np.asarray(Image.open(out)).min() == 255


@pytest.mark.parametrize("command,options,match", [
    ("edit", {"--mask": "nomask.png"}, "mask nomask.png not found"),
    ("edit", {"--strength": "2"}, r"strength must be in \[0, 1\]"),
    ("edit", {"--class": "10"}, "--class 10: this model has classes 0..9"),
    ("edit", {"--image": "missing.png"}, "missing.png not found"),
    ("edit", {"--prompt": "a seven"}, "prompts need a text-to-image run"),
    ("sample", {}, "is a control run"),
    ("train", {"--control": "edges"}, "needs both control=edges|lowres and base="),
    ("train", {"--control": "edges", "--base": "BASE", "--data": "patterns"},
     r"does not fit the base model .*channels 3 vs the base's 1; image size \(32, 32\) vs the base's \(16, 16\)"),
    ("train", {"--control": "edges", "--base": "BASE", "--objective": "ddpm", "image_size=16": ""},
     "was trained with objective=flow"),
    ("train", {"--control": "edges", "--base": "BASE", "flow_time_scale=10": "", "image_size=16": ""},
     "was trained with flow_time_scale=1000: train its control branch with flow_time_scale=1000"),
])
def test_cli_bad_input_is_one_clear_error(runs, tmp_path, capsys, monkeypatch, command, options, match):
    monkeypatch.chdir(tmp_path)
    _png("small.png", np.zeros((16, 16), np.uint8))
    _png("big.png", np.zeros((32, 32), np.uint8))
    defaults = {"edit": {"--ckpt": str(runs / "base"), "--image": "small.png", "--out": "o.png"},
                "sample": {"--ckpt": str(runs / "ctl"), "--out": "o.png"}, "train": {"--out": "r"}}[command]
    options = {k: str(runs / "base") if v == "BASE" else v for k, v in options.items()}
    argv = [command] + [item for pair in {**defaults, **options}.items() for item in pair if item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_cli_edit_with_a_prompt(tmp_path, capsys):
    """Text-to-image runs edit from a prompt (a 5-step MM-DiT: only the plumbing and the kept pixels count)."""
    run = tmp_path / "t2i"
    train(build_config(None, {"out": str(run), "data": "shapes", "steps": 5},
                       ["text_model=mmdit", "text_encoder=bytes", "text_max_length=40", "image_size=16",
                        'data_args={"n": 64}', "hidden_size=32", "depth=1", "num_heads=2", "patch_size=4",
                        "batch_size=8", "precision=fp32", "samples_per_class=1", "sample.steps=2"]), progress=False)
    picture = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    out = str(tmp_path / "o.png")
    assert main(["edit", "--ckpt", str(run), "--image", _png(tmp_path / "in.png", picture), "--mask",
                 _png(tmp_path / "m.png", mask), "--prompt", "a red square", "--cfg", "3", "--steps", "3",
                 "--out", out]) == 0
    edited = np.asarray(Image.open(out))  # one edit: at the image's size, no border
    keep = mask == 0
    assert np.array_equal(edited[keep], picture[keep]) and not np.array_equal(edited[~keep], picture[~keep])
    assert main(["edit", "--ckpt", str(run), "--image", str(tmp_path / "in.png"), "--class", "1", "--out", out]) == 2
    assert "takes --prompt TEXT" in capsys.readouterr().err
