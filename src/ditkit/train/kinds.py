"""What differs between the model kinds the trainer trains, one small class each; the loop in
`ditkit.train.trainer` is the same for all of them.

A kind owns: building the model, the model's extra inputs in a training step, what a checkpoint holds
(and the run.json facts that rebuild the rest), and the sample grid (drawn through `ditkit.pipeline`,
exactly as `ditkit sample` would draw it).

    ImageKind    a DiT on pixels or VAE latents, class-conditional or not
    VideoKind    a VideoDiT on clips (N, C, F, H, W); its grid is an animated GIF
    TextKind     an MMDiT or PixArtDiT behind a PromptTable of the data's captions (label k = caption k)
    ControlKind  a ControlNet-style branch on a frozen base run, conditioned on each image's structure
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditkit.data import ImageDataset, LatentDataset, VideoDataset, load_dataset
from ditkit.data.conditions import make_condition
from ditkit.images import save_comparison, save_gif, shown_classes
from ditkit.models import DiT, MMDiT, PixArtDiT, VideoDiT, create_model
from ditkit.models.control import ControlBranch, ControlDiT
from ditkit.models.inflate import inflate, load_image_dit
from ditkit.kinds import GUIDE_DIR, load_guide
from ditkit.pipeline import Pipeline
from ditkit.text.prompts import PromptTable
from ditkit.text import load_text_encoder
from ditkit import checkpoint as ckpt
from ditkit.config import ONE_STEP, TrainConfig
from ditkit.train.onestep import load_base_weights


class ImageKind:
    """A DiT (zoo name or custom) on images or latents."""

    def __init__(self, c: TrainConfig, data: ImageDataset):
        self.c, self.data = c, data

    def model_kwargs(self) -> dict[str, Any]:
        data, c = self.data, self.c
        return dict(input_size=data.image_size, in_channels=data.channels, num_classes=data.num_classes,
                    learn_sigma=c.objective == "ddpm", class_dropout_prob=c.class_dropout_prob, **c.model_args)

    def build(self) -> nn.Module:
        """The module that trains (on the CPU; the trainer moves it). A one-step objective (meanflow, distill)
        adds the interval embedder and may start from a flow-matching run (base=)."""
        c, kwargs = self.c, self.model_kwargs()
        if c.objective in ONE_STEP:
            kwargs = {"interval_embed": True, "interval_scale": c.meanflow_interval_scale, **kwargs}
            if c.meanflow_cfg_range is not None:  # the guidance scale as an input (iMF)
                kwargs["guidance_range"] = tuple(c.meanflow_cfg_range)
        if c.model == "custom":
            arch = dict(hidden_size=c.hidden_size, depth=c.depth, num_heads=c.num_heads, patch_size=c.patch_size,
                        mlp_ratio=c.mlp_ratio, block=c.block, mlp=c.mlp)
            model = DiT(**{**arch, **kwargs})
        else:
            model = create_model(c.model, **{"block": c.block, **kwargs})
        if c.objective in ONE_STEP and c.base:  # a resumed run then loads its own weights over these
            load_base_weights(model, ckpt.resolve_checkpoint(c.base), c.flow_time_scale)
        return model

    def saved(self, model: nn.Module) -> nn.Module:
        """The part of `model` (or of its EMA copy) that a checkpoint holds."""
        return model

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors of `saved(model)`'s state dict that a checkpoint holds (a LoRA run: its adapter's)."""
        return state

    def load_checkpoint(self, module: nn.Module, state: dict[str, Tensor]) -> None:
        """Load a checkpoint's `checkpoint_state` into `saved(model)`."""
        module.load_state_dict(state)

    def step_inputs(self, x0: Tensor, y: Tensor, drop: Tensor) -> dict[str, Tensor]:
        """The model's keyword arguments in a training step (label dropout from the trainer's generator)."""
        return {"y": y, "force_drop_ids": drop} if self.c.class_dropout_prob > 0 else {"y": y}

    def given_frames(self, n: int, generator: torch.Generator) -> Tensor | None:
        """An (n, F) mask of the clip frames given clean in a training step (frame conditioning); None: none
        (nothing is drawn, so runs without it take the generator's draws as before)."""
        return None

    def run_info(self) -> dict[str, Any]:
        """run.json: the config and the data facts that sampling needs."""
        data = self.data
        info = {"train_config": self.c.to_dict(), "objective": self.c.objective, "class_names": data.class_names,
                "num_classes": data.num_classes, "channels": data.channels, "image_size": data.image_size,
                "conditional": data.conditional}
        if isinstance(data, LatentDataset):  # sampling decodes with the VAE the latents came from
            info.update(latent=True, vae=data.vae)
        return info

    # ---- the sample grid: one row of real images per class above samples_per_class rows of samples
    def grid_options(self, real: Tensor) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def sample_grid(self, path: Path, ema_model: nn.Module, objective: Any, device: torch.device,
                    seed: int) -> None:
        data = self.data
        shown = shown_classes(data.num_classes)
        real = torch.stack([data.images[(data.labels == k).nonzero()[0, 0]] for k in shown])
        pipe = Pipeline(model=ema_model, objective=objective, info=self.run_info(),
                        vae=getattr(data, "vae", None), device=device, guide=load_guide(path.parent, device))
        samples = pipe.generate(classes=shown if data.conditional else None, n_per_class=self.c.samples_per_class,
                                seed=seed, progress=False, **self.grid_options(real))
        if isinstance(data, LatentDataset):
            real = data.decode(real, device).cpu()
        self.save_grid(path, real.float().clamp(-1, 1), samples.images)

    def save_guide(self, ema_model: nn.Module, out: Path) -> None:
        """Keep the EMA weights of this step as the run's autoguidance model (OUT/guide): plain image DiTs
        with a multi-step objective only."""
        if type(ema_model) is DiT and self.c.objective not in ONE_STEP:
            ema_model.save_pretrained(out / GUIDE_DIR)

    def save_grid(self, path: Path, real: Tensor, images: Tensor) -> None:
        K = real.shape[0]
        save_comparison(path, real, images.reshape(-1, K, *images.shape[1:]))


class VideoKind(ImageKind):
    """A spacetime VideoDiT (adaLN-Zero blocks) sized by the model fields, patch_t and attention; with
    init_image, started from an image DiT run (`ditkit.models.inflate`)."""

    init_record: dict[str, Any] | None = None  # the image checkpoint the model started from (run.json)
    image_record: dict[str, Any] | None = None  # the image run that draws the first frames (run.json)

    def __init__(self, c: TrainConfig, data: ImageDataset):
        super().__init__(c, data)
        if c.context_share and c.context_frames >= data.frames:
            raise ValueError(f"context_frames={c.context_frames} leaves nothing to generate in the data's clips of "
                             f"{data.frames} frames: give fewer frames")
        if c.image_model is not None:  # checked and hashed once, before anything is built
            self.image_record = image_model_record(c.image_model, data)

    def given_frames(self, n: int, generator: torch.Generator) -> Tensor | None:
        """For a context_share of the clips (drawn from the trainer's generator), their first k frames are given,
        k drawn per clip from the whole tubelets up to context_frames: one frame starts a clip (image-to-video),
        several carry a velocity into the next window of a longer clip (extension: a single frame cannot tell
        a digit that bounced from one about to). The objective feeds them clean at t = 0, outside the loss."""
        c = self.c
        if not c.context_share:
            return None
        chosen = torch.rand(n, generator=generator) < c.context_share
        most = c.context_frames // c.patch_t
        tubelets = (torch.randint(1, most + 1, (n,), generator=generator) if most > 1
                    else torch.ones(n, dtype=torch.long))
        frame = torch.arange(self.data.frames)
        return chosen[:, None] & (frame[None] < (tubelets * c.patch_t)[:, None])

    def build(self) -> nn.Module:
        """The VideoDiT; init_image copies an image run's weights into it (a resumed run then loads its own
        weights over these) and places tokens as the image model does (pos_embed image+frame)."""
        c = self.c
        if c.model != "custom" or c.block != "adaln_zero":
            raise ValueError("video data trains a VideoDiT (adaLN-Zero blocks): set model: custom and block: "
                             "adaln_zero, and size it with hidden_size, depth, num_heads, patch_size, patch_t")
        kwargs = self.model_kwargs()
        if c.init_image:
            kwargs = {"pos_embed": "image+frame", **kwargs}
        model = VideoDiT(num_frames=self.data.frames, hidden_size=c.hidden_size, depth=c.depth,
                         num_heads=c.num_heads, patch_size=c.patch_size, patch_t=c.patch_t, mlp_ratio=c.mlp_ratio,
                         attention=c.attention, **kwargs)
        if c.init_image:
            image, self.init_record = load_image_dit(c.init_image, c.objective, c.flow_time_scale)
            try:
                inflate(image, model)
            except ValueError as err:
                raise ValueError(f"init_image={c.init_image}: {err} (set the video run's model fields to the "
                                 f"image run's)") from None
        return model

    def run_info(self) -> dict[str, Any]:
        info = {**super().run_info(), "frames": self.data.frames}
        if self.image_record is not None:
            info["image_model"] = self.image_record
        return {**info, "init_image": self.init_record} if self.init_record else info

    def save_grid(self, path: Path, real: Tensor, images: Tensor) -> None:
        save_gif(path.with_suffix(".gif"), torch.cat([real, images]), nrow=real.shape[0], scale=2)


def image_model_record(path: str, data: ImageDataset) -> dict[str, Any]:
    """run.json's record of the image run that draws a video run's first frames: its newest good checkpoint and
    the sha256 of the weights sampling reads. The image run must draw the video data's classes and frames."""
    found = ckpt.resolve_checkpoint(path)
    info = ckpt.read_json(found / "run.json")
    theirs = (info.get("class_names"), info.get("channels"), info.get("image_size"))
    if theirs != (data.class_names, data.channels, data.image_size):
        raise ValueError(f"image_model={path} draws {theirs[1]}x{theirs[2]}x{theirs[2]} images of classes "
                         f"{theirs[0]}, but the video data's frames are {data.channels}x{data.image_size}x"
                         f"{data.image_size} of classes {data.class_names}: train the image run on this data's frames "
                         f"(data: moving_mnist_frames with the same data_args)")
    return ckpt.weights_record(found)


class TextKind(ImageKind):
    """An MMDiT or PixArtDiT behind a PromptTable of the data's distinct captions (label k = caption k,
    encoded once; label dropout = the model's null caption). Checkpoints hold the text model alone."""

    def __init__(self, c: TrainConfig, data: ImageDataset):
        super().__init__(c, data.captions_as_labels())
        self.encoder = load_text_encoder(c.text_encoder, c.text_max_length)

    def build(self) -> nn.Module:
        c, data, encoder = self.c, self.data, self.encoder
        arch = dict(input_size=data.image_size, in_channels=data.channels, hidden_size=c.hidden_size, depth=c.depth,
                    num_heads=c.num_heads, patch_size=c.patch_size, mlp_ratio=c.mlp_ratio,
                    context_dim=encoder.dim, learn_sigma=c.objective == "ddpm", **c.model_args)
        if c.text_model == "mmdit":
            model = MMDiT(pooled_dim=encoder.pooled_dim, pos_embed_max_size=None, **arch)
        else:  # caption dropout comes from the trainer's generator (force_drop_ids), not the model's
            model = PixArtDiT(caption_length=encoder.max_length, caption_dropout_prob=0.0, **arch)
        return PromptTable.encode(model, encoder, data.class_names)

    def saved(self, model: nn.Module) -> nn.Module:
        return model.model  # the prompt table is rebuilt from the captions in run.json

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "text_model": self.c.text_model, "text_encoder": self.encoder.spec}


class ControlKind(ImageKind):
    """The base run's (EMA) model, frozen, steered by a fresh branch of `control_blocks` copied blocks;
    checkpoints hold the branch, and run.json names the base checkpoint."""

    def __init__(self, c: TrainConfig, data: ImageDataset):
        super().__init__(c, data)
        self.base_dir = ckpt.resolve_checkpoint(c.base)

    def build(self) -> nn.Module:
        c, data, base_dir = self.c, self.data, self.base_dir
        pipe = Pipeline.load(base_dir, device="cpu")
        base = pipe.model
        if type(base) is not DiT:
            raise ValueError(f"structure control steers a class-conditional image DiT; {base_dir} holds a "
                             f"{type(base).__name__}")
        if pipe.info["objective"] != c.objective:
            raise ValueError(f"the base run {base_dir} was trained with objective={pipe.info['objective']}: "
                             f"train its control branch with the same objective")
        base_scale = getattr(pipe.objective, "time_scale", c.flow_time_scale)
        if base_scale != c.flow_time_scale:
            raise ValueError(f"the base run {base_dir} was trained with flow_time_scale={base_scale:g}: "
                             f"train its control branch with flow_time_scale={base_scale:g}")
        facts = {"channels": (data.channels, base.in_channels),
                 "image size": ((data.image_size, data.image_size), base.input_size),
                 "classes": (data.num_classes, base.num_classes)}
        wrong = [f"{name} {ours} vs the base's {theirs}" for name, (ours, theirs) in facts.items() if ours != theirs]
        if wrong:
            raise ValueError(f"data {c.data} does not fit the base model {base_dir}: {'; '.join(wrong)}")
        blocks = c.control_blocks if c.control_blocks is not None else max(1, len(base.blocks) // 2)
        return ControlDiT(base, ControlBranch.from_base(base, blocks, c.control))

    def saved(self, model: nn.Module) -> nn.Module:
        return model.branch

    def step_inputs(self, x0: Tensor, y: Tensor, drop: Tensor) -> dict[str, Tensor]:
        return {**super().step_inputs(x0, y, drop), "condition": make_condition(self.c.control, x0)}

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "base_checkpoint": str(self.base_dir.resolve())}

    def grid_options(self, real: Tensor) -> dict[str, Any]:
        return {"condition": real}  # each column conditioned on the real image above it


def build_dataset(c: TrainConfig, split: str = "train") -> ImageDataset:
    return load_dataset(c.data, image_size=c.image_size, channels=c.channels, split=split,
                        unconditional=c.unconditional, frames=c.frames, **c.data_args)


def make_kind(c: TrainConfig) -> ImageKind:
    """The data, and the kind of model it trains: control (c.control), text (captioned data), video
    (clips) or image."""
    data = build_dataset(c)
    if c.control:
        return ControlKind(c, data)
    if data.captions is not None:
        return TextKind(c, data)
    if isinstance(data, VideoDataset):
        return VideoKind(c, data)
    return ImageKind(c, data)
