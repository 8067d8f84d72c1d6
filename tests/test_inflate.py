"""A VideoDiT started from an image DiT (ditkit.models.inflate, init_image): it begins as the image model
applied frame by frame, every mismatch is named, and a video run records the image checkpoint it began from."""
from __future__ import annotations

import json

import pytest
import torch

from ditkit.checksums import sha256
from ditkit.models import DiT, VideoDiT
from ditkit.models.inflate import inflate, inflation_mismatches, spatial_block_indices
from ditkit.models.layers import sincos_2d, sincos_image_frame

ATOL = 1e-5  # float32 rounding of outputs of size ~1


def image_dit(**kw) -> DiT:
    """A small image DiT with every weight random (none left at adaLN-Zero's zeros), in eval mode."""
    args = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                learn_sigma=False, mlp="gelu")
    model = DiT(**{**args, **kw})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def video_for(image: DiT, **kw) -> VideoDiT:
    attention = kw.get("attention", "factorized")
    depth = len(image.blocks) * (2 if attention == "factorized" else 1)
    args = dict(input_size=16, num_frames=4, patch_size=image.patch_size, in_channels=image.in_channels,
                hidden_size=64, depth=depth, num_heads=4, num_classes=image.num_classes,
                learn_sigma=image.out_channels != image.in_channels, attention=attention, pos_embed="image+frame")
    return VideoDiT(**{**args, **kw})


def frame_by_frame(image: DiT, clips: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([image(clips[:, :, f], t, y) for f in range(clips.shape[2])], dim=2)


T = torch.tensor([10.0, 500.0, 990.0])
Y = torch.tensor([1, 7, 10])  # 10: the null label


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_inflated_model_is_the_image_model_on_every_frame(learn_sigma):
    image = image_dit(learn_sigma=learn_sigma)
    video = inflate(image, video_for(image)).eval()
    clips = torch.randn(3, 1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, want = video(clips, T, Y), frame_by_frame(image, clips, T, Y)
    assert out.shape == want.shape == (3, 2 if learn_sigma else 1, 4, 16, 16)
    assert want.abs().max() > 0.5  # the image model's output is not trivially zero
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    # the temporal blocks are the identity through their gates alone: opening one mixes the frames
    with torch.no_grad():
        video.blocks[1].adaLN_modulation[-1].bias.fill_(0.5)
        assert (video(clips, T, Y) - want).abs().max() > 1e-2


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_with_temporal_patches_a_static_clip_is_the_image_model(attention):
    """patch_t = 2: a clip of one repeated frame gives the image model's output on every frame (full
    attention too: each key is repeated equally often, so the attention weights are the image's)."""
    image = image_dit()
    video = inflate(image, video_for(image, patch_t=2, attention=attention)).eval()
    frame = torch.randn(3, 1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    clips = frame.expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        out, want = video(clips, T, Y), image(frame[:, :, 0], T, Y)
    for f in range(4):
        torch.testing.assert_close(out[:, :, f], want, atol=ATOL, rtol=0)


def test_blocks_embeddings_and_decoder_are_copied_as_documented():
    image = image_dit()
    video = inflate(image, video_for(image, patch_t=2))
    assert spatial_block_indices(video) == [0, 2]
    kernel = video.x_embedder.proj.weight  # (D, C, 2, p, p): each frame half of the image kernel
    torch.testing.assert_close(kernel.sum(2), image.x_embedder.proj.weight, atol=1e-7, rtol=0)
    assert torch.equal(kernel[:, :, 0], kernel[:, :, 1])
    assert torch.equal(video.blocks[2].attn.qkv.weight, image.blocks[1].attn.qkv.weight)
    assert not video.blocks[1].adaLN_modulation[-1].weight.any() and not video.frame_gate.any()
    rows = image.final_layer.linear.weight.shape[0]
    assert torch.equal(video.final_layer.linear.weight[rows:], image.final_layer.linear.weight)


def test_temporal_parts_start_at_zero_but_learn():
    image = image_dit()
    video = inflate(image, video_for(image)).train()
    clips = torch.randn(2, 1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    video(clips, T[:2], Y[:2], force_drop_ids=torch.zeros(2)).square().mean().backward()
    assert video.frame_gate.grad.abs().sum() > 0
    assert video.blocks[1].adaLN_modulation[-1].weight.grad.abs().sum() > 0


def test_every_mismatch_is_named_in_one_error():
    image = image_dit(num_heads=2, patch_size=2, mlp="gelu_erf", num_classes=5, class_dropout_prob=0.0, depth=3)
    video = video_for(image_dit(), pos_embed="sincos3d")
    wrong = " | ".join(inflation_mismatches(image, video))
    for name in ("num_heads 4 vs the image model's 2", "patch_size 4 vs the image model's 2", "mlp (",
                 "num_classes 10 vs the image model's 5", "null class",
                 "depth 4 vs the image model's 3 (factorized attention needs depth 6", "pos_embed sincos3d"):
        assert name in wrong, name
    assert "hidden_size" not in wrong
    with pytest.raises(ValueError, match="cannot start this VideoDiT from the image DiT: .*num_heads.*mlp"):
        inflate(image, video)
    with pytest.raises(ValueError, match="must be a class-conditional DiT, got a VideoDiT"):
        inflate(video, video)


def test_image_frame_positions_are_the_image_table_and_off_by_default():
    spatial, frame = sincos_image_frame(64, (3, 4, 4))
    table = sincos_2d(64, (4, 4))
    assert (spatial[:16] == table).all() and (spatial[32:] == table).all()
    assert (frame[:16] == frame[0]).all() and not (frame[16] == frame[0]).all()
    default = VideoDiT(input_size=16, num_frames=4, patch_size=4, hidden_size=64, depth=2, num_heads=4)
    assert "pos_embed" not in default.config and not any("frame_gate" in k for k in default.state_dict())
    assert video_for(image_dit()).config["pos_embed"] == "image+frame"
    with pytest.raises(ValueError, match="unknown pos_embed 'rope'"):
        VideoDiT(hidden_size=64, num_heads=4, pos_embed="rope")


def test_inflated_model_saves_and_loads(tmp_path):
    image = image_dit()
    video = inflate(image, video_for(image))
    with torch.no_grad():
        video.frame_gate.fill_(0.3)
    loaded = VideoDiT.from_pretrained(video.save_pretrained(tmp_path / "m")).eval()
    clips = torch.randn(3, 1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(clips, T, Y), video.eval()(clips, T, Y))


# ---------------------------------------------------------------------------------------------
# init_image: the config key and a video run started from an image run
# ---------------------------------------------------------------------------------------------

TINY = ["image_size=16", "hidden_size=32", "depth=1", "num_heads=2", "patch_size=4", "mlp=gelu", "steps=1",
        "batch_size=4", "precision=fp32", "samples_per_class=1", "sample.steps=2", "warmup_steps=1"]


def test_init_image_needs_video_data_and_a_directory(tmp_path):
    from ditkit.config import build_config

    with pytest.raises(ValueError, match="init_image starts a video model from an image run: it needs video data"):
        build_config(None, {"data": "mnist", "init_image": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="init_image=.*nowhere: no such run or checkpoint directory"):
        build_config(None, {"data": "moving_mnist", "init_image": str(tmp_path / "nowhere")})
    assert build_config(None, {"data": "moving_mnist"}).init_image is None


def test_a_video_run_starts_from_an_image_run_and_records_it(tmp_path):
    from ditkit.config import build_config
    from ditkit.train import train
    from ditkit.train.kinds import make_kind

    image_run = tmp_path / "image"
    train(build_config(None, {"out": str(image_run), "data": "mnist"}, TINY), progress=False)
    video_args = [*TINY, "frames=4", 'data_args={"n_clips": 60}', "depth=2", "attention=factorized",
                  f"init_image={image_run}"]
    config = build_config(None, {"out": str(tmp_path / "video"), "data": "moving_mnist"}, video_args)
    kind = make_kind(config)
    video = kind.build().eval()
    step = image_run / "checkpoints" / "step_00000001"
    image = DiT.from_pretrained(step, weights_name="ema.safetensors").eval()
    assert torch.equal(video.blocks[0].mlp.fc1.weight, image.blocks[0].mlp.fc1.weight)
    assert torch.equal(video.final_layer.linear.weight, image.final_layer.linear.weight)
    assert video.final_layer.linear.weight.any()  # one step of training moved the zero-initialised decoder
    clips = torch.randn(3, 1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(video(clips, T, Y), frame_by_frame(image, clips, T, Y), atol=ATOL, rtol=0)
    assert kind.run_info()["init_image"] == {"path": str(step.resolve()), "weights": "ema.safetensors",
                                            "sha256": sha256(step / "ema.safetensors")}
    train(config, progress=False)
    info = json.loads((tmp_path / "video" / "checkpoints" / "step_00000001" / "run.json").read_text())
    assert info["init_image"]["sha256"] == sha256(step / "ema.safetensors")
    wider = build_config(None, {"out": str(tmp_path / "v2"), "data": "moving_mnist"}, [*video_args, "hidden_size=64"])
    with pytest.raises(ValueError, match="init_image=.*hidden_size 64 vs the image model's 32"):
        make_kind(wider).build()
    ddpm = build_config(None, {"out": str(tmp_path / "v3"), "data": "moving_mnist"}, [*video_args, "objective=ddpm"])
    with pytest.raises(ValueError, match="trained with objective=flow .* this run has objective=ddpm"):
        make_kind(ddpm).build()
