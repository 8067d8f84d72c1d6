"""VideoDiT, 3D positions, attention modes, moving MNIST, GIF output and the video CLI path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data import VideoDataset, load_dataset
from ditkit.data.moving_mnist import DIRECTIONS, make_moving_mnist
from ditkit.diffusion import FlowMatching, create_diffusion
from ditkit.images import clip_frames, save_gif
from ditkit.models import VideoDiT
from ditkit.models.layers import apply_rope_3d, rope_3d_tables, sincos_2d, sincos_3d
from ditkit.models.layers import attention as attention_fn
from ditkit.models.video import from_windows, to_windows, window_attention
from ditkit.sampling import CFG, sample


def tiny(**kw) -> VideoDiT:
    args = dict(input_size=16, num_frames=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                num_classes=4)
    return VideoDiT(**{**args, **kw})


def randomize(model: VideoDiT, seed: int = 0) -> VideoDiT:
    """Give the zero-initialised adaLN and output layers weights, so that attention reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def centre_of_mass(clips: torch.Tensor) -> torch.Tensor:
    """(N, 1, F, H, W) in [-1, 1] -> (N, F, 2) brightness-weighted (row, column) centres."""
    m = (clips[:, 0].float() + 1).clamp(min=0)  # background -1 weighs nothing
    H, W = m.shape[-2:]
    w = m.sum((-1, -2)).clamp(min=1e-6)
    rows = (m.sum(-1) * torch.arange(H, dtype=torch.float32)).sum(-1) / w
    cols = (m.sum(-2) * torch.arange(W, dtype=torch.float32)).sum(-1) / w
    return torch.stack([rows, cols], dim=-1)


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------

def test_sincos_3d_is_the_2d_code_per_frame_plus_a_frame_code():
    D, grid = 64, (3, 2, 4)
    emb = sincos_3d(D, grid).reshape(3, 8, D)
    for f in range(3):  # every frame repeats the image model's spatial code in its first 3/4
        np.testing.assert_array_equal(emb[f, :, :48], sincos_2d(48, (2, 4)))
    assert np.ptp(emb[:, :, 48:], axis=1).max() == 0  # the frame code is one vector per frame
    assert len(np.unique(emb.reshape(-1, D).round(6), axis=0)) == 24  # all tokens distinct
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_3d(40, grid)


# ---------------------------------------------------------------------------------------------
# shapes, patch order, other frame counts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("F,H,W,p,pt", [(8, 16, 16, 4, 1), (4, 16, 8, 2, 2), (6, 8, 16, 4, 3), (1, 16, 16, 4, 1),
                                        (3, 8, 8, 2, 2), (1, 8, 8, 4, 2)])
@pytest.mark.parametrize("attention", ["full", "factorized", "windowed"])
def test_shape_round_trips(F, H, W, p, pt, attention):
    model = tiny(patch_size=p, patch_t=pt, attention=attention, window=(1, 2, 2), learn_sigma=True).eval()
    x = torch.randn(2, 1, F, H, W)
    out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([0, 3]))
    assert out.shape == (2, 2, F, H, W)  # learned sigma: 2 x channels
    assert torch.isfinite(out).all()


def test_model_built_for_8_frames_runs_on_4_and_16():
    model = randomize(tiny(num_frames=8, patch_t=2))
    for F in (4, 8, 16):
        out = model(torch.randn(2, 1, F, 16, 16), torch.tensor([5.0, 500.0]), torch.tensor([1, 2]))
        assert out.shape == (2, 1, F, 16, 16) and torch.isfinite(out).all()


def test_tubelets_are_tokens_in_frame_row_column_order_and_unpatchify_inverts():
    model = tiny(patch_size=2, patch_t=2)
    x = torch.zeros(1, 1, 4, 8, 8)
    x[:, :, 2:4, 4:6, 6:8] = 1.0  # the tubelet at (frame 1, row 2, column 3) of a (2, 4, 4) grid
    with torch.no_grad():
        model.x_embedder.proj.weight.fill_(1.0)
        tokens = model.x_embedder(x)[0, :, 0]  # (T,)
    assert tokens.nonzero().flatten().tolist() == [1 * 16 + 2 * 4 + 3]
    # unpatchify: a token of ones lands exactly on its tubelet
    grid = (2, 4, 4)
    tok = torch.zeros(1, 32, 2 * 2 * 2)
    tok[0, 1 * 16 + 2 * 4 + 3] = 1.0
    assert torch.equal(model.unpatchify(tok, grid), x)


def test_windows_round_trip():
    x = torch.randn(2, 4 * 6 * 8, 5)
    for window in [(1, 6, 8), (4, 1, 1), (2, 3, 4), (4, 6, 8)]:
        assert torch.equal(from_windows(to_windows(x, (4, 6, 8), window), (4, 6, 8), window), x)


# ---------------------------------------------------------------------------------------------
# attention modes
# ---------------------------------------------------------------------------------------------

def test_windowed_with_a_window_covering_the_clip_equals_full_exactly():
    full = randomize(tiny(attention="full", depth=3))
    covering = tiny(attention="windowed", depth=3, window=(8, 4, 4))  # the 8 x 4 x 4 token grid
    covering.load_state_dict(full.state_dict())
    local = tiny(attention="windowed", depth=3, window=(2, 2, 2))
    local.load_state_dict(full.state_dict())
    x = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([0, 1])
    with torch.no_grad():
        reference = full(x, t, y)
        assert torch.equal(covering.eval()(x, t, y), reference)
        assert not torch.allclose(local.eval()(x, t, y), reference, atol=1e-3)  # the window does matter


def test_attention_reaches_exactly_the_tokens_it_should():
    t, y = torch.tensor([400.0]), torch.tensor([2])
    x = torch.randn(1, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    poked = x.clone()
    poked[:, :, 0, :4, :4] += 1.0  # the token at (frame 0, row 0, column 0) of the (4, 4, 4) grid

    def changed(model):  # (F, 4, 4): which output tokens change at all
        with torch.no_grad():
            d = (model(poked, t, y) - model(x, t, y)).abs()[0, 0]  # (F, H, W)
        return d.reshape(4, 4, 4, 4, 4).amax(dim=(2, 4)) > 0
    # "does not change" is exact; "changes" asks for some change per frame or box (a far token's
    # change can round away in float32)
    spatial_only = changed(randomize(tiny(attention="factorized", depth=1)))  # block 0 is spatial
    assert spatial_only[0].any() and not spatial_only[1:].any()  # its own frame only
    both = changed(randomize(tiny(attention="factorized", depth=2)))  # spatial, then temporal
    assert all(both[f].any() for f in range(4))
    windowed = changed(randomize(tiny(attention="windowed", depth=1, window=(2, 2, 2))))
    assert windowed[:2, :2, :2].all() and windowed.sum() == 8  # exactly its own 2x2x2 box
    shifted = changed(randomize(tiny(attention="windowed", depth=2, window=(2, 2, 2))))  # block 1 shifts
    assert shifted[2:].any() and shifted.sum() > 8


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_fits_a_fixed_small_batch(attention):
    torch.manual_seed(0)
    data = make_moving_mnist(n_clips=4, frames=4, image_size=16, seed=1)
    model = tiny(attention=attention, num_classes=10, hidden_size=64)
    objective = FlowMatching()
    g = torch.Generator().manual_seed(0)
    t, noise = objective.sample_t(4, generator=g), torch.randn(data.images.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = objective.training_losses(model, data.images, t, {"y": data.labels}, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------------------------------------
# bad input, save/load, sampling
# ---------------------------------------------------------------------------------------------

def test_bad_input_says_what_is_wrong():
    model = tiny(attention="windowed", window=(2, 2, 2))
    t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"clips \(N, 1, F, H, W\)"):
        model(torch.randn(1, 1, 16, 16), t, y)
    with pytest.raises(ValueError, match="divisible by patch size"):
        model(torch.randn(1, 1, 4, 18, 16), t, y)
    with pytest.raises(ValueError, match="not divisible by the attention window"):
        model(torch.randn(1, 1, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match="labels must be in 0..4"):
        model(torch.randn(1, 1, 4, 16, 16), t, torch.tensor([7]))
    with pytest.raises(ValueError, match="unknown attention"):
        tiny(attention="sparse")


def test_save_and_load_pretrained(tmp_path):
    model = randomize(tiny(attention="windowed", window=(2, 2, 2), patch_t=2))
    model.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    x, t, y = torch.randn(1, 1, 8, 16, 16), torch.tensor([50.0]), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_sampler_draws_clips(objective):
    model = randomize(tiny(learn_sigma=objective == "ddpm"))
    obj = FlowMatching() if objective == "flow" else create_diffusion("", learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    clips = sample(model, obj, (3, 1, 4, 16, 16), y=torch.tensor([0, 1, 2]), guidance=CFG(2.0), steps=3,
                   generator=g, progress=False)
    assert clips.shape == (3, 1, 4, 16, 16) and torch.isfinite(clips).all()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def test_moving_mnist_is_deterministic_and_in_range():
    a = make_moving_mnist(n_clips=20, frames=5, image_size=32, num_digits=2, seed=3)
    b = load_dataset("moving_mnist", frames=5, seed=3, n_clips=20, num_digits=2)
    assert isinstance(b, VideoDataset) and b.frames == 5 and b.image_size == 32
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (20, 1, 5, 32, 32) and a.images.min() == -1 and a.images.max() <= 1
    assert not torch.equal(make_moving_mnist(n_clips=20, frames=5, num_digits=2, seed=4).images, a.images)
    with pytest.raises(ValueError, match="unknown moving_mnist option"):
        load_dataset("moving_mnist", colour="red")
    with pytest.raises(ValueError, match="apply only to the video sources"):
        load_dataset("mnist", frames=4)


def test_class_and_label_motion_move_the_digit_exactly_as_labelled():
    data = make_moving_mnist(n_clips=40, frames=4, image_size=32, motion="class", speed=2, seed=0)
    step = centre_of_mass(data.images).diff(dim=1)  # (N, F - 1, 2)
    expected = torch.tensor([DIRECTIONS[k % 4] for k in data.labels.tolist()], dtype=torch.float32) * 2
    torch.testing.assert_close(step, expected[:, None].expand_as(step), atol=1e-3, rtol=0)
    data = make_moving_mnist(n_clips=40, frames=4, image_size=32, motion="label", speed=2, seed=0)
    assert data.num_classes == 40 and data.class_names[7] == "1-up"
    step = centre_of_mass(data.images).diff(dim=1)
    expected = torch.tensor([DIRECTIONS[k % 4] for k in data.labels.tolist()], dtype=torch.float32) * 2
    torch.testing.assert_close(step, expected[:, None].expand_as(step), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# GIF and the CLI
# ---------------------------------------------------------------------------------------------

def test_save_gif_holds_every_frame(tmp_path):
    clips = make_moving_mnist(n_clips=3, frames=4, image_size=16, seed=0).images
    save_gif(tmp_path / "c.gif", clips, nrow=3, scale=2)
    expected = clip_frames(clips, nrow=3, scale=2)
    with Image.open(tmp_path / "c.gif") as gif:
        assert gif.n_frames == 4 and gif.size == expected[0].shape[1::-1]
        for f in range(4):
            gif.seek(f)
            np.testing.assert_array_equal(np.asarray(gif.convert("L")), expected[f][..., 0])


def test_cli_trains_and_samples_a_gif(tmp_path, capsys):
    from ditkit.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "moving_mnist", "--steps", "2", "--batch-size", "4", "--out", str(run),
                 "frames=4", "image_size=16", "hidden_size=32", "depth=2", "num_heads=2", "patch_t=2",
                 "attention=windowed", 'model_args={"window": [1, 2, 2]}', 'data_args={"n_clips": 100}',
                 "samples_per_class=1", "sample.steps=1", "precision=fp32"]) == 0
    assert (run / "samples.gif").is_file()
    assert main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "clip.gif"), "--class", "3", "7",
                 "--n-per-class", "1", "--steps", "2", "--frames", "6"]) == 0
    with Image.open(tmp_path / "clip.gif") as gif:
        assert gif.n_frames == 6
    assert main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "grid.png")]) == 2
    assert "holds a video model" in capsys.readouterr().err


def centres_of_mass(clips: torch.Tensor, floor: float = 0.25) -> torch.Tensor:
    """(N, 1, F, H, W) in [-1, 1] -> (N, F, 2) (row, column) centre of the pixels brighter than `floor`
    (in [0, 1]), so that faint residual noise over the background does not pull it to the centre."""
    w = ((clips[:, 0] + 1) / 2 - floor).clamp(min=0)
    rows = torch.arange(float(w.shape[-2]))[:, None]
    cols = torch.arange(float(w.shape[-1]))[None, :]
    mass = w.sum((2, 3)).clamp(min=1e-6)
    return torch.stack([(w * rows).sum((2, 3)) / mass, (w * cols).sum((2, 3)) / mass], -1)


@pytest.mark.slow
def test_generated_clips_move_in_the_conditioned_direction(tmp_path):
    """Moving MNIST with one direction per class (digit k moves right/down/left/up for k % 4): after a
    short training run, the digit in generated clips travels the conditioned way (displacement from the
    first to the last frame within 60 degrees of it and longer than 2 px) in >= 60% of 40 clips; chance
    is about 25%. 8x8 patches (16 tokens per clip) at a constant lr 3e-3: with CFG 4, 100% for each of three
    noise seeds after these 2000 steps (about 100 s of training on the 2-core CPU); 25-40% after 1000
    steps at lr 1e-3 (the samples barely move yet). 4x4 patches at lr 1e-3 needed 7 minutes for 82%."""
    from ditkit.pipeline import Pipeline
    from ditkit.train import build_config, train

    config = build_config(None, {"out": str(tmp_path / "run"), "data": "moving_mnist"}, [
        "image_size=16", "frames=4", 'data_args={"n_clips": 3000, "motion": "class", "speed": 2, "digit_size": 8}',
        "hidden_size=128", "depth=4", "num_heads=4", "patch_size=8", "steps=2000", "batch_size=32", "lr=3e-3",
        "min_lr_ratio=1.0", "warmup_steps=50", "precision=bf16", "save_every=100000", "samples_per_class=1",
        "sample.steps=4"])
    train(config, progress=False)
    pipe = Pipeline.load(config.out)
    y = torch.arange(10).repeat(4)
    clips = sample(pipe.model, pipe.objective, (40, 1, 4, 16, 16), y=y, guidance=CFG(4.0), steps=20,
                   generator=torch.Generator().manual_seed(1), progress=False).float().clamp(-1, 1)
    com = centres_of_mass(clips)
    moved = com[:, -1] - com[:, 0]
    want = torch.tensor([DIRECTIONS[k % 4] for k in y.tolist()], dtype=torch.float32)
    along = (moved * want).sum(1)
    hits = (along > 0.5 * moved.norm(dim=1)) & (moved.norm(dim=1) > 2)
    assert hits.float().mean() >= 0.6, (hits.float().mean(), moved[:8])


# ---------------------------------------------------------------------------------------------
# 3D RoPE
# ---------------------------------------------------------------------------------------------
def test_rope_3d_scores_depend_only_on_the_offset_between_tokens():
    """<R(p) q, R(p') k> = <R(p + d) q, R(p' + d) k> for any shift d of the (frame, row, column) grid (fp32, 1e-5)."""
    head_dim, grid = 32, (4, 5, 6)
    table = rope_3d_tables(head_dim, grid)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def index(f, r, c):
        return (f * grid[1] + r) * grid[2] + c

    def score(p, p2):
        return (apply_rope_3d(q, table[index(*p)][None]) * apply_rope_3d(k, table[index(*p2)][None])).sum()

    base = score((0, 1, 2), (2, 3, 0))
    assert torch.allclose(base, score((1, 2, 5), (3, 4, 3)), atol=1e-5)
    assert not torch.allclose(base, score((0, 1, 2), (2, 3, 1)), atol=1e-3)  # another offset, another score
    assert torch.allclose(apply_rope_3d(q, table[:1]), q)  # position 0 is the identity


@pytest.mark.parametrize("attention", ["factorized", "windowed"])
def test_rope_in_boxes_uses_each_tokens_own_position(attention):
    """Attention within boxes (spatial / temporal / shifted windows) with RoPE equals full attention masked to
    the same boxes with the grid's table: the table follows the tokens through the box layout (fp32, 1e-5)."""
    model = randomize(tiny(attention=attention, rope=True, window=(2, 2, 2), depth=2))
    x = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    grid = (8, 4, 4)
    table = rope_3d_tables(model.blocks[0].attn.head_dim, grid)
    h = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(2))
    for i, block in enumerate(model.blocks):
        window, shift = model.block_window(i, grid)
        got = window_attention(block.attn, h, grid, window, shift, table)
        position = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)
        box = (position - torch.tensor(shift)) % torch.tensor(grid) // torch.tensor(window)
        mask = (box[:, None] == box[None]).all(-1)
        attn = block.attn
        q, k, v = attn.qkv(h).reshape(2, 128, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope_3d(q, table), apply_rope_3d(k, table)
        want = attn.proj(attention_fn(q, k, v, mask).transpose(1, 2).reshape(2, 128, 32))
        assert torch.allclose(got, want, atol=1e-5)
    assert model(x, torch.tensor([5.0, 700.0]), torch.tensor([0, 1])).shape == x.shape
    assert VideoDiT(**{**model.config}).rope  # the option is in the saved config
