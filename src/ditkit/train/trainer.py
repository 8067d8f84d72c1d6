"""The training loop, top to bottom: data -> objective -> model -> loss -> AdamW + EMA -> checkpoints.

The loop is the same for every model kind; what differs (building the model, its extra inputs, what a
checkpoint holds, the sample grid) lives in `ditkit.train.kinds`.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from ditkit.data import random_hflip
from ditkit.diffusion import FlowMatching, build_objective
from ditkit.images import save_loss_curve
from ditkit.io import write_json_atomic, write_text_atomic
from ditkit.sampling.fast import PRECISIONS
from ditkit import checkpoint as ckpt
from ditkit.train import distributed
from ditkit.config import ONE_STEP, TrainConfig
from ditkit.train.ema import EMA
from ditkit.train.interrupt import Interrupts, catch_interrupts
from ditkit.train.finetune import finetune_kind, train_init_base, write_adapter
from ditkit.train.kinds import ImageKind, make_kind
from ditkit.train.lock import run_lock
from ditkit.train.phases import train_image_model
from ditkit.train.onestep import make_trajectories, one_step_objective, train_flow_base



@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float
    skipped_steps: int
    start_step: int = 0  # the step a resumed run started from


# ------------------------------------------------------------------------------------------------
# Schedule, optimizer, data order
# ------------------------------------------------------------------------------------------------

def lr_at(c: TrainConfig, step: int, total: int | None = None) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at step `total` (default c.steps: a run extended
    on resume follows the cosine of its new total; a run with `minutes` passes the total fitted to them)."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    total = c.steps if total is None else total
    progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused kernels missing for this device/dtype
        return torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)


class EpochSampler:
    """A fresh permutation per epoch from (seed, epoch), so the position alone is the state."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = epoch, position
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> Tensor:
        """Indices of the next global batch; an epoch's tail is completed from the next epoch."""
        idx, count = [], 0
        while count < self.batch_size:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - count, self.n - self.position)
            idx.append(self._perm[self.position:self.position + take])
            self.position += take
            count += take
        return torch.cat(idx)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def draw_timesteps(objective: Any, n: int, generator: torch.Generator) -> Any:
    """The global batch's times (Gaussian steps, flow times, MeanFlow's (t, r) pairs, or a distillation's
    TrajectoryPairs): sliced per process and moved to the device like the batch's other tensors."""
    if isinstance(objective, FlowMatching):
        return objective.sample_t(n, generator=generator)
    return torch.randint(0, objective.num_timesteps, (n,), generator=generator)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Output files
# ------------------------------------------------------------------------------------------------

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


def draw_loss_curve(c: TrainConfig, metrics: list[dict[str, float]]) -> None:
    """loss_curve.png; a plot must never fail a finished run, so a failure only warns."""
    try:
        save_loss_curve(Path(c.out) / "loss_curve.png", [m["step"] for m in metrics], [m["loss"] for m in metrics],
                        title=f"{c.model if c.model != 'custom' else 'DiT'} on {c.data} ({c.objective})")
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"the loss curve was not drawn ({err}); the run and metrics.csv are complete", stacklevel=2)


# ------------------------------------------------------------------------------------------------
# The run's state: what a checkpoint restores
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    c: TrainConfig
    dist: distributed.DistInfo
    kind: ImageKind
    objective: Any
    model: nn.Module
    ema: EMA
    gen: torch.Generator
    sampler: EpochSampler
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    forward: nn.Module | None = None  # the model as the step calls it (DDP-wrapped, compiled)
    step: int = 0
    skipped: int = 0
    metrics: list[dict[str, float]] = field(default_factory=list)
    schedule_steps: int | None = None  # where the cosine ends when fitted to `minutes` (None: c.steps)
    fit_minutes: bool = True  # False: `minutes` is a one-off budget given on resume, which must not refit the lr

    @property
    def out(self) -> Path:
        return Path(self.c.out)


def start_checkpoint(c: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint a resumed run starts from (None: a new run), checked before anything is written."""
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    if not resume:
        if ckpt.list_checkpoints(out):
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue it, or choose another --out")
        return None
    start = ckpt.latest_checkpoint(out)
    if start is None:
        raise ckpt.CheckpointError(f"--resume: no usable checkpoint in {out}/{ckpt.CHECKPOINTS}")
    saved = TrainConfig.from_dict(json.loads((start / "run.json").read_text())["train_config"]).to_dict()
    changed = [k for k in TrainConfig.identity_keys() if saved.get(k) != getattr(c, k)]
    if changed:
        diffs = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {getattr(c, k)!r}" for k in changed)
        raise ckpt.CheckpointError(f"cannot resume {out}: it was trained with a different config ({diffs})")
    at = int(start.name.split("_")[-1])
    if c.steps <= at:
        raise ValueError(f"{out} is already at step {at} of steps={c.steps}: pass --steps N with N > {at} "
                         f"to train it further")
    return start


def run_config(c: TrainConfig, start: Path | None, is_main: bool) -> dict[str, Any]:
    """The config saved as the run's own (config.json and every checkpoint's run.json): for a new run, `c`;
    for a resumed one, the config it was saved with, where only `steps` (the run's length) takes the new
    value. Other overrides given on resume (a shorter `minutes`, a `log_every`) apply to this invocation
    only, so the next plain --resume trains as the run was configured; they are printed as such."""
    now = c.to_dict()
    if start is None:
        return now
    saved = TrainConfig.from_dict(ckpt.read_json(start / "run.json")["train_config"],
                                  source=str(start / "run.json")).to_dict()
    own = {**saved, "steps": c.steps, "out": c.out}
    once = [f"{k}={now[k]}" for k in now if k not in ("steps", "out") and now[k] != own[k]]
    if is_main and c.steps != saved["steps"]:
        print(f"steps={c.steps}: the run's new length (was {saved['steps']}), saved in its config", flush=True)
    if is_main and once:
        print(f"for this invocation only (the run's saved config keeps its own): {', '.join(once)}", flush=True)
    return own


def build_run(c: TrainConfig, dist: distributed.DistInfo, start: Path | None) -> Run:
    """Data, objective, model (+ EMA), the distributed wrapper, optimizer and scaler, restored from `start`."""
    torch.manual_seed(c.seed + dist.rank)  # anything not drawn from `gen` differs per rank
    kind = finetune_kind(c, make_kind(c))  # init=: started from a trained model (in full, or LoRA)
    torch.manual_seed(c.seed)  # identical initial weights on every rank
    model = kind.build().to(dist.device)
    if c.objective in ONE_STEP:  # built from the model before any update: its teacher is the base's weights
        objective = one_step_objective(c, model)
    else:
        objective = build_objective(c.objective, c.timestep_sampling, cosine_weight=c.velocity_cosine_weight,
                                    time_scale=c.flow_time_scale)
    model.grad_checkpointing = c.grad_checkpoint
    run = Run(c, dist, kind, objective, model, EMA(model, decay=c.ema_decay, warmup=c.ema_warmup, power_std=c.ema_std),
              torch.Generator().manual_seed(c.seed), EpochSampler(len(kind.data), c.batch_size, c.seed))
    if start is not None:
        kind.load_checkpoint(kind.saved(model), ckpt.load_weights(start, "model.safetensors"))
        kind.load_checkpoint(kind.saved(run.ema.model), ckpt.load_weights(start, "ema.safetensors"))
    run.forward = distribute(run)
    run.optimizer = make_optimizer(model, c)
    run.scaler = torch.amp.GradScaler(dist.device.type, enabled=c.precision == "fp16")
    if start is not None:
        restore_train_state(run, start)
    if c.compile:
        run.forward = torch.compile(run.forward)
    return run


def distribute(run: Run) -> nn.Module:
    """DDP (or FSDP2 with fsdp=true) across processes; the model itself with one process."""
    if not run.dist.enabled:
        return run.model
    if run.c.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in run.kind.saved(run.model).blocks:
            fully_shard(block)
        fully_shard(run.model)
        return run.model
    device = run.dist.device
    return nn.parallel.DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)


def restore_train_state(run: Run, start: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    tensors, meta = ckpt.load_train_state(start)
    set_optimizer_state_dict(run.model, run.optimizer, ckpt.unflatten_optimizer(tensors, meta["optimizer"]),
                             options=StateDictOptions(full_state_dict=True))
    if meta.get("scaler"):
        run.scaler.load_state_dict(meta["scaler"])
    run.step, run.skipped = meta["step"], meta["skipped_steps"]
    fitted = meta.get("schedule") or {}
    if fitted.get("steps") == run.c.steps:  # a run extended with a new `steps` stretches its cosine instead
        run.schedule_steps = fitted["ends_at"]
    run.sampler = EpochSampler(len(run.kind.data), run.c.batch_size, run.c.seed, **meta["data"])
    ckpt.restore_rng(tensors, {"train": run.gen})
    run.metrics = read_metrics(run.out / "metrics.csv", run.step)
    if run.dist.is_main:
        print(f"resuming from step {run.step} ({start}), training to step {run.c.steps}", flush=True)


def save(run: Run, info: dict[str, Any]) -> Path:
    """Checkpoint the current step (every process takes part in gathering sharded state)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    saved = run.kind.saved(run.model)
    model_state = run.kind.checkpoint_state(get_model_state_dict(saved, options=full))
    opt_state = get_optimizer_state_dict(run.model, run.optimizer, options=full)
    path = ckpt.step_dir(run.out, run.step)
    if run.dist.is_main:
        model_config = {"model_type": type(saved).__name__, **saved.config}
        extra = {"step": run.step, "skipped_steps": run.skipped, "data": run.sampler.state(),
                 "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                 "schedule": {"steps": run.c.steps, "ends_at": run.schedule_steps} if run.schedule_steps else None}
        path = ckpt.save_checkpoint(run.out, run.step, model_config, info, model_state,
                                    run.kind.checkpoint_state(run.kind.saved(run.ema.model).state_dict()),
                                    opt_state, extra,
                                    ckpt.rng_tensors({"train": run.gen}), run.c.keep_last)
    distributed.barrier(run.dist)
    return path


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------

def draw_batch(run: Run) -> tuple[Tensor, Tensor, Tensor, dict[str, Any], dict[str, Tensor]]:
    """Draw the global batch and all its randomness and take this process's slice: (x0, t, noise, the model's
    keyword inputs, the objective's extra inputs)."""
    c, data, device = run.c, run.kind.data, run.dist.device
    B_local = c.batch_size // run.dist.world_size
    lo, hi = run.dist.rank * B_local, (run.dist.rank + 1) * B_local
    idx = run.sampler.next()
    x0, y = data.images[idx], data.labels[idx]
    if data.hflip:
        x0 = random_hflip(x0, run.gen)
    drop = (torch.rand(c.batch_size, generator=run.gen) < c.class_dropout_prob).long()
    t = draw_timesteps(run.objective, c.batch_size, run.gen)
    noise = torch.randn(x0.shape, generator=run.gen)
    given = run.kind.given_frames(c.batch_size, run.gen)  # clip frames given clean; None: no draw
    x0, y, t, noise, drop = (v[lo:hi].to(device, non_blocking=True) for v in (x0, y, t, noise, drop))
    extra = {} if given is None else {"given": given[lo:hi].to(device)}
    return x0, t, noise, run.kind.step_inputs(x0, y, drop), extra


def train_step(run: Run) -> tuple[Tensor, Tensor]:
    """One update on the next batch (`draw_batch`); returns the (local) loss and the gradient norm. Its phases
    are named for the profiler (train.draw, train.model, train.update, train.ema), which
    benchmarks/train_throughput.py reads to show the trainer's own share of a step."""
    c = run.c
    with record_function("train.draw"):
        x0, t, noise, kwargs, extra = draw_batch(run)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(c, run.step, run.schedule_steps)
    with record_function("train.model"):
        with autocast(run.dist.device, c.precision):
            loss = run.objective.training_losses(run.forward, x0, t, model_kwargs=kwargs, noise=noise,
                                                 **extra)["loss"].mean()
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
    with record_function("train.update"):
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), c.grad_clip)
        if run.scaler.is_enabled():
            scale_before = run.scaler.get_scale()
            run.scaler.step(run.optimizer)  # skips the update itself when gradients are not finite
            run.scaler.update()
            run.skipped += int(run.scaler.get_scale() < scale_before)
        elif torch.isfinite(grad_norm):
            run.optimizer.step()
        else:
            run.skipped += 1
    with record_function("train.ema"):
        run.ema.update(run.model, run.step)
    run.step += 1
    return loss.detach(), grad_norm


def log(run: Run, window: list[Tensor], grad_norm: Tensor, seconds: float, steps_run: int, bar: tqdm,
        writer: Any) -> float:
    """Average the loss over the window and processes; metrics.csv, progress bar, TensorBoard."""
    loss = distributed.mean_across_ranks(torch.stack(window).mean(), run.dist).item()
    ips = steps_run * run.c.batch_size / seconds
    run.metrics.append({"step": run.step, "loss": loss, "lr": lr_at(run.c, run.step - 1, run.schedule_steps),
                        "grad_norm": float(grad_norm), "images_per_s": ips, "elapsed_s": seconds})
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
    if run.dist.is_main:
        write_metrics(run.out / "metrics.csv", run.metrics)
    if writer is not None:
        for key in ("loss", "lr", "grad_norm", "images_per_s"):
            writer.add_scalar(f"train/{key}", run.metrics[-1][key], run.step)
    return loss


def tensorboard_writer(c: TrainConfig, dist: distributed.DistInfo) -> Any:
    if not (c.tensorboard and dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(Path(c.out) / "tensorboard"))


def sample_grid(run: Run) -> None:
    with autocast(run.dist.device, run.c.precision):
        run.kind.sample_grid(run.out / "samples.png", run.ema.model, run.objective, run.dist.device, run.c.seed)


FIT_AFTER = 20  # steps of this process timed before the schedule is fitted to `minutes` (the first is slow)


def fit_schedule(run: Run, start_step: int, start_time: float, timed_from: float) -> None:
    """With `minutes` and a decaying lr, end the cosine where the budget ends instead of at c.steps, so a run
    stopped by the clock is not left mid-decay. Fitted once, at the end of warm-up (or FIT_AFTER steps into a
    resumed run), from the measured time per step and a 3% margin; saved with the checkpoints."""
    c = run.c
    fit_at = max(c.warmup_steps, start_step + FIT_AFTER)
    if (c.minutes is None or c.min_lr_ratio == 1.0 or run.schedule_steps is not None or run.step != fit_at
            or not run.fit_minutes):
        return
    now = time.perf_counter()
    per_step = (now - timed_from) / (run.step - start_step - 1)  # the first step (start-up) is left out
    left = c.minutes * 60 - (now - start_time)
    fitted = torch.tensor(float(run.step + max(0.0, 0.97 * left / per_step)), device=run.dist.device)
    run.schedule_steps = min(c.steps, round(distributed.mean_across_ranks(fitted, run.dist).item()))
    if run.schedule_steps < c.steps and run.dist.is_main:
        tqdm.write(f"lr schedule fitted to minutes={c.minutes:g}: the cosine ends at step {run.schedule_steps} "
                   f"({per_step * 1000:.0f} ms/step), not at steps={c.steps}", file=sys.stderr)


def out_of_time(run: Run, start_time: float) -> bool:
    """Past the wall-clock budget on any process (all must stop at the same step)."""
    if run.c.minutes is None:
        return False
    over = torch.tensor(float(time.perf_counter() - start_time > run.c.minutes * 60), device=run.dist.device)
    return distributed.mean_across_ranks(over, run.dist).item() > 0


# ------------------------------------------------------------------------------------------------
# Divergence: a run whose loss explodes or whose steps are mostly non-finite stops
# ------------------------------------------------------------------------------------------------

DIVERGE_WINDOW = 20  # the recent steps judged together
DIVERGE_SHARE = 0.5  # stop when at least this share of them were skipped as non-finite
EXPLODE = 1e4        # ... or at once when a step's loss exceeds this multiple of the first step's (at least 0.1)


class TrainingDiverged(ValueError):
    """Training stopped because it diverged; nothing written after the last good checkpoint."""


class Health:
    """Judges every step: its loss (averaged over processes, so all stop at the same step) against the first
    step's, and whether its update was skipped for non-finite gradients. Under fp16 the grad scaler's own
    skips are its calibration and are not counted."""

    def __init__(self, good_checkpoint: Path | None, step: int):
        self.good_checkpoint, self.last_good = good_checkpoint, step
        self.first_loss: float | None = None
        self.recent: list[bool] = []  # per recent step: bad (skipped, non-finite or exploded)

    def check(self, run: Run, loss: Tensor, skipped_before: int) -> str | None:
        """What went wrong when the run must stop now, else None."""
        value = distributed.mean_across_ranks(loss.detach().float(), run.dist).item()
        finite = math.isfinite(value)
        if self.first_loss is None and finite:
            self.first_loss = value
        limit = EXPLODE * max(self.first_loss or 0.0, 0.1)
        skipped = run.skipped > skipped_before and not run.scaler.is_enabled()
        bad = skipped or not finite or value > limit
        self.recent = (self.recent + [bad])[-DIVERGE_WINDOW:]
        if not bad:
            self.last_good = run.step
            return None
        if finite and value > limit:
            return f"the loss reached {value:.3g} (the first step's was {self.first_loss:.3g})"
        n = sum(self.recent)
        if n >= DIVERGE_SHARE * DIVERGE_WINDOW:
            return f"{n} of the last {len(self.recent)} steps had a non-finite loss or gradients and were skipped"
        return None

    def diverged(self, run: Run, reason: str) -> TrainingDiverged:
        """The error to raise: what happened, the last good step and checkpoint, what to try."""
        c = run.c
        kept = (f"the last good checkpoint, {self.good_checkpoint}, is kept (--resume continues from it)"
                if self.good_checkpoint is not None else "no checkpoint was written")
        return TrainingDiverged(f"training diverged at step {run.step}: {reason}; the last good step was "
                                f"{self.last_good} and nothing after it was saved; {kept}. Try a new run with a "
                                f"lower lr (this one: lr={c.lr:g}) or more warmup_steps (this one: "
                                f"{c.warmup_steps})")


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def train(c: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as configured; writes checkpoints, metrics.csv, loss_curve.png and samples.png (samples.gif for
    video data) to c.out. resume: continue the run in c.out from its newest good checkpoint. Holds c.out's
    lock (RunLocked if another run has it); on SIGINT/SIGTERM saves a checkpoint after the current step and
    raises TrainingInterrupted. A one-step config (objective meanflow or distill) whose base= is a flow config
    file trains that run first (into c.out/base), then the one-step model from it."""
    c, resume = train_flow_base(c, resume, progress, train)
    c, resume = train_init_base(c, resume, progress, train)  # init=CONFIG_FILE: that run first, into OUT/base
    c, resume = train_image_model(c, resume, progress, train)  # image_model=CONFIG_FILE: first, into OUT/image
    with run_lock(c.out), catch_interrupts() as stop:
        result = _train(c, resume, progress, stop)
    write_adapter(c, result.checkpoint)  # a LoRA run: OUT/adapter in peft's format
    return result


def _train(c: TrainConfig, resume: bool, progress: bool, stop: Interrupts) -> TrainResult:
    dist = distributed.setup()
    if c.batch_size % dist.world_size:
        raise ValueError(f"batch_size {c.batch_size} is not divisible by the {dist.world_size} processes")
    start = start_checkpoint(c, resume)
    own = run_config(c, start, dist.is_main)
    run = build_run(c, dist, start)
    run.fit_minutes = c.minutes == own["minutes"]
    writer = tensorboard_writer(c, dist)  # created only once data and model are known to be valid
    info = {**run.kind.run_info(), "train_config": own}
    if dist.is_main:
        write_json_atomic(run.out / "config.json", own)

    start_time, start_step = time.perf_counter(), run.step
    with autocast(dist.device, c.precision):
        make_trajectories(run, progress)
    bar = tqdm(total=c.steps, initial=run.step, disable=not (progress and dist.is_main), dynamic_ncols=True,
               file=sys.stderr, desc="train")
    try:
        last_path, loss_value = train_loop(run, stop, info, bar, writer, start, start_time)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if run.step == start_step:  # the budget or a signal came before the first step: nothing to save
        distributed.teardown(dist)
        if stop.requested:
            raise stop.interrupted(run.step, None, c.out)
        raise ValueError(f"minutes={c.minutes:g} ran out before the first step: nothing was trained or saved; "
                         f"give a larger minutes (set-up is not counted, the first step is slow)")
    if stop.requested:  # the checkpoint is written; skip the plot and the sample grid
        distributed.teardown(dist)
        raise stop.interrupted(run.step, last_path, c.out)
    seconds = time.perf_counter() - start_time
    if dist.is_main:
        if run.metrics:
            draw_loss_curve(c, run.metrics)
        sample_grid(run)
    distributed.teardown(dist)
    return TrainResult(out=run.out, checkpoint=last_path, steps=run.step, final_loss=loss_value, seconds=seconds,
                       images_per_second=(run.step - start_step) * c.batch_size / max(seconds, 1e-9),
                       skipped_steps=run.skipped, start_step=start_step)


def train_loop(run: Run, stop: Interrupts, info: dict[str, Any], bar: tqdm, writer: Any, start: Path | None,
               start_time: float) -> tuple[Path | None, float]:
    """Step until c.steps, the time budget or a signal; returns the newest checkpoint and the last logged
    loss. Every step is judged (`Health`): a diverging run stops with TrainingDiverged, saving nothing more."""
    c, dist = run.c, run.dist
    start_step, last_path, loss_value, health = run.step, start, float("nan"), Health(start, run.step)
    window: list[Tensor] = []
    due = False  # a checkpoint is due
    run.model.train()
    stop.arm()  # from here a signal ends the loop after the current step
    timed_from = start_time
    while run.step < c.steps and not out_of_time(run, start_time) and not stop.should_stop(dist):
        skipped_before = run.skipped
        loss, grad_norm = train_step(run)
        window.append(loss)
        if run.step == start_step + 1:
            timed_from = time.perf_counter()
        reason = health.check(run, loss, skipped_before)
        if reason is not None:
            log(run, window, grad_norm, time.perf_counter() - start_time, run.step - start_step, bar, writer)
            distributed.teardown(dist)
            raise health.diverged(run, reason)
        fit_schedule(run, start_step, start_time, timed_from)
        if run.step == c.sample_guide_step and dist.is_main:  # the autoguidance model: this early EMA
            run.kind.save_guide(run.kind.saved(run.ema.model), run.out)
        if run.step % c.log_every == 0 or run.step == c.steps:
            loss_value = log(run, window, grad_norm, time.perf_counter() - start_time, run.step - start_step,
                             bar, writer)
            window = []
        bar.update(1)
        due = due or run.step % c.save_every == 0 or run.step == c.steps
        if due and health.last_good == run.step:  # a checkpoint due at a bad step waits for the next good one
            last_path = health.good_checkpoint = save_checked(run, info, health)
            due = False
        if c.sample_every and run.step % c.sample_every == 0 and dist.is_main and run.step != c.steps:
            sample_grid(run)
    if window:  # the steps since the last log point (the budget or a signal can end between two)
        loss_value = log(run, window, grad_norm, time.perf_counter() - start_time, run.step - start_step, bar,
                         writer)
    if run.step > start_step and (last_path is None or last_path.name != ckpt.step_dir(run.out, run.step).name):
        last_path = save_checked(run, info, health)  # stopped by the time budget or a signal
    return last_path, loss_value


def save_checked(run: Run, info: dict[str, Any], health: Health) -> Path:
    """`save`, where state that is no longer finite stops the run as diverged instead of being written."""
    try:
        return save(run, info)
    except ckpt.NonFiniteState as err:
        distributed.teardown(run.dist)
        raise health.diverged(run, str(err)) from None
