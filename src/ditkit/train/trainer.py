"""The training loop, top to bottom: data -> objective -> model -> loss -> AdamW + EMA -> checkpoints.

All randomness of a step (data order, flips, label dropout, timesteps, noise) comes from one seeded
generator drawn for the *global* batch, and each process takes its slice: one process and N processes
see the same numbers, and a resumed run continues bit-identically.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ditkit.data import ImageDataset, LatentDataset, VideoDataset, load_dataset, random_hflip
from ditkit.diffusion import FlowMatching, create_diffusion
from ditkit.images import save_comparison, save_gif, save_loss_curve, shown_classes
from ditkit.io import write_json_atomic, write_text_atomic
from ditkit.data.conditions import make_condition
from ditkit.models import DiT, MMDiT, PixArtDiT, VideoDiT, create_model
from ditkit.models.control import ControlBranch, ControlDiT
from ditkit.prompts import PromptTable
from ditkit.sampling import GUIDE_DIR, load_guide, recorded_options, sample
from ditkit.text import TextEncoder, load_text_encoder
from ditkit.train import checkpoint as ckpt
from ditkit.train import distributed
from ditkit.train.config import TrainConfig
from ditkit.train.ema import EMA

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float
    skipped_steps: int


# ------------------------------------------------------------------------------------------------
# Builders: each turns config fields into one object
# ------------------------------------------------------------------------------------------------

def build_dataset(c: TrainConfig, split: str = "train") -> ImageDataset:
    return load_dataset(c.data, image_size=c.image_size, channels=c.channels, split=split,
                        unconditional=c.unconditional, frames=c.frames, **c.data_args)


def build_objective(objective: str, timestep_sampling: str = "logit_normal", cosine_weight: float = 0.0):
    """"flow": rectified flow (velocity prediction); "ddpm": the original DiT recipe (1000 linear-beta
    steps, epsilon prediction, learned sigma, hybrid loss)."""
    if objective == "flow":
        return FlowMatching(timestep_sampling=timestep_sampling, cosine_weight=cosine_weight)
    if objective == "ddpm":
        return create_diffusion("", learn_sigma=True)
    raise ValueError(f"unknown objective {objective!r}: expected flow or ddpm")


def model_kwargs(c: TrainConfig, data: ImageDataset) -> dict[str, Any]:
    return dict(input_size=data.image_size, in_channels=data.channels, num_classes=data.num_classes,
                learn_sigma=c.objective == "ddpm", class_dropout_prob=c.class_dropout_prob, **c.model_args)


def build_model(c: TrainConfig, data: ImageDataset) -> DiT | VideoDiT:
    kwargs = model_kwargs(c, data)
    if isinstance(data, VideoDataset):
        if c.model != "custom" or c.block != "adaln_zero":
            raise ValueError("video data trains a VideoDiT (adaLN-Zero blocks): set model: custom and block: "
                             "adaln_zero, and size it with hidden_size, depth, num_heads, patch_size, patch_t")
        return VideoDiT(num_frames=data.frames, hidden_size=c.hidden_size, depth=c.depth, num_heads=c.num_heads,
                        patch_size=c.patch_size, patch_t=c.patch_t, mlp_ratio=c.mlp_ratio,
                        attention=c.attention, **kwargs)
    if c.model == "custom":
        arch = dict(hidden_size=c.hidden_size, depth=c.depth, num_heads=c.num_heads, patch_size=c.patch_size,
                    mlp_ratio=c.mlp_ratio, block=c.block)
        return DiT(**{**arch, **kwargs})
    return create_model(c.model, **{"block": c.block, **kwargs})



def build_text_model(c: TrainConfig, data: ImageDataset, encoder: TextEncoder) -> PromptTable:
    """An MMDiT or PixArtDiT sized by the config, behind a PromptTable of the data's distinct captions
    (label k = caption k, encoded once; label dropout = the model's null caption)."""
    arch = dict(input_size=data.image_size, in_channels=data.channels, hidden_size=c.hidden_size, depth=c.depth,
                num_heads=c.num_heads, patch_size=c.patch_size, mlp_ratio=c.mlp_ratio, context_dim=encoder.dim,
                learn_sigma=c.objective == "ddpm", **c.model_args)
    if c.text_model == "mmdit":
        model = MMDiT(pooled_dim=encoder.pooled_dim, pos_embed_max_size=None, **arch)
    else:  # caption dropout comes from the trainer's generator (force_drop_ids), not the model's
        model = PixArtDiT(caption_length=encoder.max_length, caption_dropout_prob=0.0, **arch)
    return PromptTable.encode(model, encoder, data.class_names)


def build_control_model(c: TrainConfig, data: ImageDataset, base_dir: Path) -> ControlDiT:
    """The base run's (EMA) model, frozen, steered by a fresh branch of `control_blocks` copied blocks."""
    from ditkit.pipeline import load_pipeline  # the pipeline module imports this one

    pipe = load_pipeline(base_dir)
    base = pipe.model
    if type(base) is not DiT:
        raise ValueError(f"structure control steers a class-conditional image DiT; {base_dir} holds a "
                         f"{type(base).__name__}")
    if pipe.info["objective"] != c.objective:
        raise ValueError(f"the base run {base_dir} was trained with objective={pipe.info['objective']}: "
                         f"train its control branch with the same objective")
    facts = {"channels": (data.channels, base.in_channels),
             "image size": ((data.image_size, data.image_size), base.input_size),
             "classes": (data.num_classes, base.num_classes)}
    wrong = [f"{name} {ours} vs the base's {theirs}" for name, (ours, theirs) in facts.items() if ours != theirs]
    if wrong:
        raise ValueError(f"data {c.data} does not fit the base model {base_dir}: {'; '.join(wrong)}")
    blocks = c.control_blocks if c.control_blocks is not None else max(1, len(base.blocks) // 2)
    return ControlDiT(base, ControlBranch.from_base(base, blocks, c.control))


def lr_at(c: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused kernels missing for this device/dtype
        return torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)


# ------------------------------------------------------------------------------------------------
# Data order: a fresh permutation per epoch from (seed, epoch), so the position alone is the state
# ------------------------------------------------------------------------------------------------

class EpochSampler:
    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = epoch, position
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> Tensor:
        """Indices of the next global batch; an epoch's tail is completed from the next epoch."""
        idx = []
        while len(idx) < self.batch_size:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(idx), self.n - self.position)
            idx.append(self._perm[self.position:self.position + take])
            self.position += take
        return torch.cat(idx)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def draw_timesteps(objective, n: int, generator: torch.Generator) -> Tensor:
    if isinstance(objective, FlowMatching):
        return objective.sample_t(n, generator=generator)
    return torch.randint(0, objective.num_timesteps, (n,), generator=generator)


# ------------------------------------------------------------------------------------------------
# Output files
# ------------------------------------------------------------------------------------------------

def run_info(c: TrainConfig, data: ImageDataset) -> dict[str, Any]:
    info = {"train_config": c.to_dict(), "objective": c.objective, "class_names": data.class_names,
            "num_classes": data.num_classes, "channels": data.channels, "image_size": data.image_size,
            "conditional": data.conditional}
    if isinstance(data, LatentDataset):  # sampling decodes with the VAE the latents came from
        info.update(latent=True, vae=data.vae)
    if isinstance(data, VideoDataset):
        info["frames"] = data.frames
    return info


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_metrics(path: Path, up_to_step: int) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f) if float(row["step"]) <= up_to_step]


@torch.no_grad()
def write_sample_grid(path: Path, ema_model: DiT | ControlDiT | PromptTable, objective, c: TrainConfig, data: ImageDataset,
                      device: torch.device, seed: int) -> None:
    """One row of real images per class above `samples_per_class` rows of EMA samples (of a control run:
    each conditioned on the real image above it). Clips: the same rows as an animated GIF, samples.gif."""
    shown = shown_classes(data.num_classes)
    K = len(shown)
    real = torch.stack([data.images[(data.labels == k).nonzero()[0, 0]] for k in shown])
    R = c.samples_per_class
    y = torch.tensor(shown, device=device).repeat(R)
    shape = (R * K, *real.shape[1:])
    generator = torch.Generator(device=device).manual_seed(seed)
    cfg = c.cfg_scale if data.conditional else 1.0
    if c.control:
        ema_model = ema_model.bind(make_condition(c.control, real.to(device)).repeat(R, 1, 1, 1))
    with autocast(device, c.precision):
        images = sample(ema_model, objective, shape, y=y, cfg_scale=cfg, steps=c.sample_steps,
                        sampler=c.sampler, generator=generator, progress=False,
                        **recorded_options(c, load_guide(path.parent, c, device) if step_reached(path.parent, c) else None))
    if isinstance(data, LatentDataset):
        real, images = data.decode(real, device).cpu(), data.decode(images, device)
    images = images.float().clamp(-1, 1).cpu()
    if isinstance(data, VideoDataset):
        save_gif(path.with_suffix(".gif"), torch.cat([real, images]), nrow=K, scale=2)
        return
    save_comparison(path, real, images.reshape(R, K, *images.shape[1:]))


def step_reached(out: Path, c: TrainConfig) -> bool:
    """Whether the run's autoguidance model (issue 14) exists yet (intermediate grids come before it)."""
    return c.sample_guide_step is not None and (out / GUIDE_DIR / "config.json").is_file()


def autocast(device: torch.device, precision: str):
    dtype = AUTOCAST[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def train(c: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a DiT as configured; writes checkpoints, metrics.csv, loss_curve.png and samples.png
    (samples.gif for video data) to c.out."""
    dist = distributed.setup()
    device = dist.device
    out = Path(c.out)
    if c.batch_size % dist.world_size:
        raise ValueError(f"batch_size {c.batch_size} is not divisible by the {dist.world_size} processes")

    # ---- resume checks come before anything is written
    start_ckpt = None
    if resume:
        start_ckpt = ckpt.latest_checkpoint(out)
        if start_ckpt is None:
            raise ckpt.CheckpointError(f"--resume: no usable checkpoint in {out}/{ckpt.CHECKPOINTS}")
        saved = json.loads((start_ckpt / "run.json").read_text())["train_config"]
        changed = [k for k in TrainConfig.identity_keys() if saved.get(k) != getattr(c, k)]
        if changed:
            diffs = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {getattr(c, k)!r}" for k in changed)
            raise ckpt.CheckpointError(f"cannot resume {out}: it was trained with a different config ({diffs})")
    elif ckpt.list_checkpoints(out):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue it, or choose another --out")

    torch.manual_seed(c.seed + dist.rank)  # anything not drawn from `gen` differs per rank
    data = build_dataset(c)
    encoder = None
    if data.captions is not None:  # text-to-image: distinct captions become labels, each encoded once
        data = data.captions_as_labels()
        encoder = load_text_encoder(c.text_encoder, c.text_max_length)
    objective = build_objective(c.objective, c.timestep_sampling, c.velocity_cosine_weight)
    torch.manual_seed(c.seed)  # identical initial weights on every rank
    base_dir = ckpt.resolve_checkpoint(c.base) if c.control else None
    if base_dir:
        model = build_control_model(c, data, base_dir)
    else:
        model = build_text_model(c, data, encoder) if encoder else build_model(c, data)
    model = model.to(device)
    model.grad_checkpointing = c.grad_checkpoint
    ema = EMA(model, decay=c.ema_decay, warmup=c.ema_warmup, power_std=c.ema_std)
    # what checkpoints hold: the model, or only the control branch (the base is referenced by run.json)
    saved, saved_ema = (model.branch, ema.model.branch) if c.control else (model, ema.model)
    if encoder:  # the text model alone: its prompt table is rebuilt from the captions in run.json
        saved, saved_ema = model.model, ema.model.model
    summary_writer = None  # created only once data and model are known to be valid
    if c.tensorboard and dist.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        summary_writer = SummaryWriter(str(out / "tensorboard"))

    gen = torch.Generator().manual_seed(c.seed)
    sampler = EpochSampler(len(data), c.batch_size, c.seed)
    step, skipped, metrics = 0, 0, []

    if start_ckpt is not None:
        saved.load_state_dict(ckpt.load_weights(start_ckpt, "model.safetensors"))
        saved_ema.load_state_dict(ckpt.load_weights(start_ckpt, "ema.safetensors"))

    train_model: nn.Module = model
    if dist.enabled:
        if c.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in saved.blocks:
                fully_shard(block)
            fully_shard(model)
        else:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, c)
    scaler = torch.amp.GradScaler(device.type, enabled=c.precision == "fp16")

    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         get_model_state_dict, set_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    if start_ckpt is not None:
        tensors, meta = ckpt.load_train_state(start_ckpt)
        set_optimizer_state_dict(model, optimizer, ckpt.unflatten_optimizer(tensors, meta["optimizer"]),
                                 options=StateDictOptions(full_state_dict=True))
        if meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        step, skipped = meta["step"], meta["skipped_steps"]
        sampler = EpochSampler(len(data), c.batch_size, c.seed, **meta["data"])
        ckpt.restore_rng(tensors, {"train": gen})
        metrics = read_metrics(out / "metrics.csv", step)

    compiled = torch.compile(train_model) if c.compile else train_model
    model_config = {"model_type": type(saved).__name__, **saved.config}
    info = run_info(c, data)
    if encoder:
        info.update(text_model=c.text_model, text_encoder=encoder.spec)
    if base_dir:
        info["base_checkpoint"] = str(base_dir.resolve())
    if dist.is_main:
        write_json_atomic(out / "config.json", c.to_dict())

    def save(at_step: int) -> Path:
        model_state = get_model_state_dict(saved, options=full)
        opt_state = get_optimizer_state_dict(model, optimizer, options=full)
        path = ckpt.step_dir(out, at_step)
        if dist.is_main:
            path = ckpt.save_checkpoint(
                out, at_step, model_config, info, model_state, saved_ema.state_dict(), opt_state,
                {"step": at_step, "skipped_steps": skipped, "data": sampler.state(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None},
                ckpt.rng_tensors({"train": gen}), c.keep_last)
        distributed.barrier(dist)
        return path

    B_local = c.batch_size // dist.world_size
    lo, hi = dist.rank * B_local, (dist.rank + 1) * B_local
    drop_labels = c.class_dropout_prob > 0
    start_time, start_step = time.perf_counter(), step
    window: list[Tensor] = []
    bar = tqdm(total=c.steps, initial=step, disable=not (progress and dist.is_main), dynamic_ncols=True,
               file=sys.stderr, desc="train")
    last_path = start_ckpt
    loss_value = float("nan")

    def out_of_time() -> bool:
        """Past the wall-clock budget on any process (all must stop at the same step)."""
        over = torch.tensor(float(time.perf_counter() - start_time > c.minutes * 60), device=device)
        return distributed.mean_across_ranks(over, dist).item() > 0

    model.train()
    while step < c.steps:
        if c.minutes is not None and out_of_time():
            break
        # ---- the global batch and all its randomness, then this process's slice
        idx = sampler.next()
        x0, y = data.images[idx], data.labels[idx]
        if data.hflip:
            x0 = random_hflip(x0, gen)
        drop = (torch.rand(c.batch_size, generator=gen) < c.class_dropout_prob).long()
        t = draw_timesteps(objective, c.batch_size, gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, y, t, noise, drop = (v[lo:hi].to(device, non_blocking=True) for v in (x0, y, t, noise, drop))
        kwargs = {"y": y, "force_drop_ids": drop} if drop_labels else {"y": y}
        if c.control:
            kwargs["condition"] = make_condition(c.control, x0)

        for group in optimizer.param_groups:
            group["lr"] = lr_at(c, step)
        with autocast(device, c.precision):
            loss = objective.training_losses(compiled, x0, t, model_kwargs=kwargs, noise=noise)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        if scaler.is_enabled():
            scale_before = scaler.get_scale()
            scaler.step(optimizer)  # skips the update itself when gradients are not finite
            scaler.update()
            skipped += int(scaler.get_scale() < scale_before)
        elif torch.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        ema.update(model, step)
        step += 1
        if step == c.sample_guide_step and dist.is_main:  # issue 14: autoguidance by this early EMA
            saved_ema.save_pretrained(out / GUIDE_DIR)
        window.append(loss.detach())

        if step % c.log_every == 0 or step == c.steps:
            loss_value = distributed.mean_across_ranks(torch.stack(window).mean(), dist).item()
            window = []
            elapsed = time.perf_counter() - start_time
            ips = (step - start_step) * c.batch_size / elapsed
            metrics.append({"step": step, "loss": loss_value, "lr": lr_at(c, step - 1),
                            "grad_norm": float(grad_norm), "images_per_s": ips, "elapsed_s": elapsed})
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.0f}")
            if dist.is_main:
                write_metrics(out / "metrics.csv", metrics)
            if summary_writer is not None:
                for key in ("loss", "lr", "grad_norm", "images_per_s"):
                    summary_writer.add_scalar(f"train/{key}", metrics[-1][key], step)
        bar.update(1)
        if step % c.save_every == 0 or step == c.steps:
            last_path = save(step)
        if c.sample_every and step % c.sample_every == 0 and dist.is_main and step != c.steps:
            write_sample_grid(out / "samples.png", ema.model, objective, c, data, device, c.seed)
    bar.close()
    if summary_writer is not None:
        summary_writer.close()

    if last_path is None or last_path.name != ckpt.step_dir(out, step).name:
        last_path = save(step)  # stopped by the time budget
    seconds = time.perf_counter() - start_time
    ips = (step - start_step) * c.batch_size / max(seconds, 1e-9)
    if dist.is_main:
        if metrics:
            save_loss_curve(out / "loss_curve.png", [m["step"] for m in metrics], [m["loss"] for m in metrics],
                            title=f"{c.model if c.model != 'custom' else 'DiT'} on {c.data} ({c.objective})")
        write_sample_grid(out / "samples.png", ema.model, objective, c, data, device, c.seed)
    distributed.teardown(dist)
    return TrainResult(out=out, checkpoint=last_path, steps=step, final_loss=loss_value, seconds=seconds,
                       images_per_second=ips, skipped_steps=skipped)
