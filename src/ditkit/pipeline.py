"""The one inference API, for every front end (CLI, Python, web page): load a run, generate or edit,
save. A run records how it samples (its config's `sample` section); None for an argument means "as this
run does", and every recorded sampling option is passed through to `ditkit.sample()`.

    pipe = Pipeline.load("runs/demo")
    samples = pipe.generate(classes=[3, 7], n_per_class=4)      # the run's sampler, steps and CFG
    pipe.save(samples, "grid.png")

What differs between image, video, text and control runs lives in one small class per kind (ditkit.kinds).
Importing this module imports no training code.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ditkit.data.latents import load_latent_space
from ditkit.diffusion import FLOW_TIME_SCALE, GaussianDiffusion, build_objective
from ditkit.sampling.editing import edit, read_image, read_mask
from ditkit.io import atomic_path, check_writable
from ditkit.interop.official import PAPER_CLASSES, PAPER_SAMPLING
from ditkit.kinds import ImageRun, join_windows, kind_of, load_guide, sample_frames, saved_kind
from ditkit.models import DiT, MMDiT, PixArtDiT, VideoDiT
from ditkit.models.control import ControlDiT
from ditkit.text.prompts import PromptTable
from ditkit.sampling import GUIDANCE_SETTINGS, guidance_from_settings, sample, sampling_schedule
from ditkit import checkpoint as ckpt
from ditkit import lora

Preview = Callable[[int, int, Tensor], None]  # (step, total, x0 prediction as images in [-1, 1] on the CPU)
# generate()'s argument names that differ from sample()'s keywords (the config's `sample` section uses sample()'s)
ARGUMENT_NAMES = {"cfg_scale": "cfg"}
FALLBACK_SETTINGS = {"sampler": None, "steps": None, "cfg": 1.5, "cfg_interval": None}  # runs that recorded none
PAPER_PRESET = {ARGUMENT_NAMES.get(k, k): v for k, v in PAPER_SAMPLING.items()}  # the original sample.py


class Cancelled(Exception):
    """Raise it from a callback to stop generating."""


@dataclass
class Samples:
    images: Tensor           # in [-1, 1] on the CPU, (N, C, H, W) or (N, C, F, H, W); raw latents if not decoded
    labels: Tensor           # (N,) class / prompt index (num_classes: none)
    ncol: int                # columns of a grid: the number of classes or prompts
    settings: dict[str, Any]  # the sampling settings actually used
    decoded: bool = True     # False: latents of a latent run without its VAE (save them as .npz)
    notes: list[str] = field(default_factory=list)  # what was adapted (e.g. an input image resized)


@dataclass
class Pipeline:
    model: DiT | ControlDiT | VideoDiT | MMDiT | PixArtDiT
    objective: Any
    info: dict[str, Any]     # the run's run.json
    vae: str | None = None   # the diffusers AutoencoderKL that decodes a latent model's samples
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    guide: Any = None        # the run's autoguidance model (RUN/guide), used where its settings ask for one

    # ---- loading and facts ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, ema: bool = True, device: str | torch.device | None = None,
             vae: str | None = None, adapters: dict[str, float] | None = None) -> Pipeline:
        """A run directory (its newest good checkpoint) or a checkpoint directory; `device` None: CUDA if
        available; `vae` overrides the VAE the run recorded (latent runs, converted original checkpoints).
        An adapter run (lora_rank) is composed on its recorded base; `adapters` {RUN: weight} adds further
        adapter runs on the same base, all active at once (`ditkit.lora.compose`)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = ckpt.resolve_checkpoint(path)
        info = ckpt.read_json(path / "run.json") if (path / "run.json").is_file() else {"objective": "ddpm"}
        model_type = ckpt.read_json(path / "config.json").get("model_type")
        kind = saved_kind(model_type)
        if "adapter" in info:
            model = lora.compose(path, info, ema=ema, adapters=adapters, device=device)
        elif adapters:
            raise ValueError(f"{path} is not an adapter run: further adapters combine with an adapter run (load "
                             f"one of them and pass the others)")
        else:
            model = kind.load_model(path, ckpt.weights_file(path, ema), model_type, info, device)
        config = info.get("train_config", {})
        objective = build_objective(info["objective"], config.get("timestep_sampling", "logit_normal"),
                                    time_scale=config.get("flow_time_scale", FLOW_TIME_SCALE))
        return cls(model=model, objective=objective, info=info, vae=vae or info.get("vae"), device=device,
                   guide=load_guide(path.parent.parent, device) if kind.guided else None)

    @property
    def kind(self) -> str:
        """"image" | "video" | "text" | "control"."""
        return self._kind.name

    @property
    def _kind(self) -> ImageRun:
        """What this kind of run does its own way (ditkit.kinds)."""
        return kind_of(self.model)

    @property
    def num_classes(self) -> int:
        """Classes (a text run: its training captions)."""
        return int(self.info.get("num_classes", getattr(self.model, "num_classes", 0)))

    @property
    def class_names(self) -> list[str]:
        return list(self.info.get("class_names") or [str(k) for k in range(self.num_classes)])

    @property
    def conditional(self) -> bool:
        return bool(self.info.get("conditional", self.num_classes > 1))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the model's input (latents for a latent run)."""
        size = getattr(self.model, "input_size", None) or self.model.config["input_size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def channels(self) -> int:
        return self.model.in_channels

    @property
    def latents_only(self) -> bool:
        """A latent run without a VAE to decode its samples."""
        return self.vae is None and bool(self.info.get("latent", False))

    # ---- sampling settings ---------------------------------------------------------------------
    @property
    def defaults(self) -> dict[str, Any]:
        """The run's own sampling settings (generate()'s names: sampler, steps, cfg, cfg_interval, and any
        further `ditkit.sample()` option the run recorded)."""
        recorded = self.info.get("train_config", {}).get("sample") or {}  # none: a converted checkpoint
        settings = dict(FALLBACK_SETTINGS)
        settings.update({ARGUMENT_NAMES.get(k, k): v for k, v in recorded.items()})
        if "precision" in recorded and recorded["precision"] is None:  # as trained: bf16 inference for bf16 runs
            trained = self.info.get("train_config", {}).get("precision")
            settings["precision"] = "bf16" if trained == "bf16" else None
        if settings.get("cfg_interval") is not None:
            settings["cfg_interval"] = tuple(settings["cfg_interval"])
        return settings

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The run's defaults with the non-None `overrides` applied (cfg_scale is accepted for cfg), made
        concrete (the sampler's name and number of steps) and validated."""
        overrides = {ARGUMENT_NAMES.get(k, k): v for k, v in overrides.items() if v is not None}
        s = {**self.defaults, **overrides}
        unknown = [k for k in s if ARGUMENT_NAMES_INV.get(k, k) not in SAMPLE_OPTIONS]
        if unknown and not ANY_OPTION:
            raise ValueError(f"unknown sampling option(s) {', '.join(unknown)}: ditkit.sample() takes "
                             f"{', '.join(sorted(SAMPLE_OPTIONS))}")
        if s.get("guide_scale") is not None and s.get("guide_model") is None and self.guide is None:
            s["guide_scale"] = None  # the run's guide model is not there (e.g. it stopped before that step)
        s["sampler"], _, s["steps"] = sampling_schedule(self.objective, s["sampler"], s["steps"])
        if not self.conditional:
            s["cfg"] = 1.0
        if s["cfg"] < 0:
            raise ValueError(f"cfg must be >= 0 (1 = no guidance), got {s['cfg']}")
        return s

    def paper_preset(self) -> dict[str, Any]:
        """generate() arguments of the original DiT sample.py: 250 DDPM steps, CFG 4 on 3 channels (and its
        8 ImageNet classes, one sample each, for a 1000-class model)."""
        if not isinstance(self.objective, GaussianDiffusion):
            raise ValueError("--paper reproduces the original's DDPM sampling: this run was trained with flow matching")
        preset = {**PAPER_PRESET, "guided_channels": min(PAPER_PRESET["guided_channels"], self.channels)}
        return {**preset, "classes": PAPER_CLASSES if self.num_classes == 1000 else None}

    # ---- generate ------------------------------------------------------------------------------
    def generate(self, classes: list[int] | None = None, prompts: list[str] | None = None, n_per_class: int = 1,
                 sampler: str | None = None, steps: int | None = None, cfg: float | None = None,
                 cfg_interval: tuple[float, float] | None = None, seed: int = 0, frames: int | None = None,
                 progress: bool = True, callback: Preview | None = None,
                 condition: Tensor | None = None, first_frame: str | os.PathLike | Tensor | None = None,
                 extend: bool | None = None, frame_conditioning: str | None = None, lora_scale: float | None = None,
                 **options: Any) -> Samples:
        """`n_per_class` samples of each class (default: all) or prompt (text runs; default: up to 10 of the
        training captions), one seeded generator; None settings are the run's. `condition` (control runs):
        one image per column (K, C, H, W) in [-1, 1] whose structure the samples follow. `options`: further
        `ditkit.sample()` keywords (e.g. guided_channels, precision="fp16" on a CUDA GPU).
        Video runs: `first_frame` (an image file, (C, H, W) or (1, C, H, W) in [-1, 1], or the first k frames
        (1, C, k, H, W)) starts every clip, kept exactly, or (N, C, k, H, W) starts each of the N clips (in the
        order of the samples' labels); `frames` beyond the trained window are drawn by
        extension (`extend`), each window conditioned on the last frames of the one before; `frame_conditioning`
        "trained" | "inpaint" (None: as the run allows; see `ditkit.kinds.VideoRun.frame_plan`).
        `lora_scale` (adapter runs): the run's adapter at this weight (1: as trained, 0: the base)."""
        self.scale_adapter(lora_scale)
        if n_per_class < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        model, columns = self._kind.columns(self, classes, prompts)
        model = self._kind.conditioned(self, model, condition, len(columns), n_per_class)
        clip = self._kind.clip(self, frames)  # clips are (N, C, F, H, W)
        notes: list[str] = []
        clips = len(columns) * n_per_class
        given = self._first_frames(first_frame, clips, notes) if first_frame is not None and clip else first_frame
        if given is None and clip:
            given = self._kind.drawn_first_frames(self, columns, n_per_class, seed, progress)
        plan = self._kind.frame_plan(self, given, frames, extend, frame_conditioning, notes)
        s = self.settings(sampler=sampler, steps=steps, cfg=cfg, cfg_interval=cfg_interval, **options)
        y = torch.tensor(columns, device=self.device).repeat(n_per_class)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        shape, kwargs = (len(y), self.channels, *clip, *self.image_size), self.sample_kwargs(s)
        if plan is None:
            raw = sample(model, self.objective, shape, y=y, generator=generator, progress=progress,
                         callback=self._previews(callback), **kwargs)
        else:
            if plan["given"] is not None:
                plan["given"] = plan["given"].to(self.device).expand(len(y), -1, -1, -1, -1)
            windows = sample_frames(model, self.objective, shape, y=y, generator=generator, progress=progress,
                                    callback=self._previews(callback), **kwargs, **plan)
            raw = join_windows(windows, plan["overlap"], shape[2])
            s = {**s, "frame_conditioning": plan["conditioning"]}
        images = raw.float().cpu() if self.latents_only else self.decode(raw).cpu()
        return Samples(images, y.cpu(), len(columns), {**s, "seed": seed}, decoded=not self.latents_only, notes=notes)

    def _first_frames(self, first: str | os.PathLike | Tensor, clips: int, notes: list[str]) -> Tensor:
        """(1 or clips, C, k, H, W) in [-1, 1] from an image (a file, (C, H, W) or (1, C, H, W)) or k frames
        (1, C, k, H, W) for every clip, or k frames of each clip (clips, C, k, H, W), in the clips' order: each
        frame fitted as `edit` fits its image (grey <-> colour converted, another size resized, noted once)."""
        if not isinstance(first, Tensor):
            first = read_image(first)
        if first.ndim == 5 and first.shape[0] not in (1, clips):
            raise ValueError(f"first frames must be one clip's (1, C, k, H, W) or one per clip ({clips}, C, k, H, W), "
                             f"got shape {tuple(first.shape)}")
        seen: list[str] = []
        if first.ndim == 5:
            fit = [[self._fit_image(frame[None].float(), seen)[0] for frame in clip.unbind(1)] for clip in first]
            fitted = torch.stack([torch.stack(clip, dim=1) for clip in fit])
        else:
            fitted = self._fit_image(first.float(), seen)[:, :, None]
        notes.extend(dict.fromkeys(seen))
        return fitted  # (1 or clips, C, k, H, W)

    # ---- edit ----------------------------------------------------------------------------------
    def edit(self, image: str | os.PathLike | Tensor, mask: str | os.PathLike | Tensor | None = None,
             strength: float | None = None, class_label: int | None = None, prompt: str | None = None, n: int = 1,
             sampler: str | None = None, steps: int | None = None, cfg: float | None = None, seed: int = 0,
             jump_length: int = 1, jump_n_sample: int = 1, progress: bool = True,
             callback: Preview | None = None) -> Samples:
        """`n` edits of one image (a file, or (C, H, W) / (1, C, H, W) in [-1, 1]): image-to-image
        (SDEdit), inpainting where `mask` is white (RePaint), or, on a control run, the image's structure.
        An image of another size is centre-cropped to the model's aspect ratio and resized (noted)."""
        if not self._kind.edits or self.vae is not None or self.info.get("latent", False):
            raise ValueError("this is a latent or video run: editing works on pixel-space image runs only")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        notes: list[str] = []
        image = self._fit_image(read_image(image) if not isinstance(image, Tensor) else image, notes)
        image = image.to(self.device).repeat(n, 1, 1, 1)
        if mask is not None:
            mask = self._fit_mask(read_mask(mask) if not isinstance(mask, Tensor) else mask, notes).to(self.device)
        model, y = self._kind.edit_condition(self, class_label, prompt, n, image)
        default_strength, what = self._kind.edit_style(self, mask is not None)
        strength = default_strength if strength is None else strength
        s = self.settings(sampler=sampler, steps=steps, cfg=cfg if y is not None else 1.0)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out = edit(model, self.objective, image, mask, strength, generator=generator, progress=progress,
                   jump_length=jump_length, jump_n_sample=jump_n_sample, y=y,
                   callback=self._previews(callback), **self.sample_kwargs(s))
        labels = y.cpu() if y is not None else torch.full((n,), self.num_classes)
        settings = {**s, "strength": strength, "seed": seed, "what": what}
        return Samples(out.float().clamp(-1, 1).cpu(), labels, n, settings, notes=notes)

    def _fit_image(self, image: Tensor, notes: list[str]) -> Tensor:
        """(1, C, H, W) at the model's channels and size: grey <-> colour converted, another size
        centre-cropped to the model's aspect ratio and resized."""
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"the image must be (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
        C = self.channels
        if image.shape[1] != C and {image.shape[1], C} == {1, 3}:
            image = image.repeat(1, 3, 1, 1) if C == 3 else image.mean(dim=1, keepdim=True)
            notes.append(f"converted the image to {'colour' if C == 3 else 'grey'} ({C} channel(s)), "
                         f"as the model takes")
        elif image.shape[1] != C:
            raise ValueError(f"the image has {image.shape[1]} channel(s) but the model takes {C}")
        H, W = self.image_size
        h, w = image.shape[-2:]
        if (h, w) != (H, W):
            image = F.interpolate(_centre_crop(image, H / W), size=(H, W), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(-1, 1)
            notes.append(f"resized the {w}x{h} image to the model's {W}x{H} (centre crop to its aspect ratio)")
        return image

    def _fit_mask(self, mask: Tensor, notes: list[str]) -> Tensor:
        mask = mask[None, None] if mask.ndim == 2 else mask
        H, W = self.image_size
        if mask.ndim == 4 and tuple(mask.shape[-2:]) != (H, W):
            mask = F.interpolate(_centre_crop(mask.float(), H / W), size=(H, W), mode="nearest")
            notes.append(f"resized the mask to {W}x{H}")
        return mask

    # ---- save ----------------------------------------------------------------------------------
    def check_output(self, path: str | os.PathLike) -> None:
        """ValueError unless `path` is an output this run's samples can be written to (check it before
        generating)."""
        path = str(path)
        folder = path.endswith(("/", os.sep)) or os.path.isdir(path)
        if os.path.isfile(path.rstrip("/" + os.sep)) and folder:
            raise ValueError(f"{path} is a file, not a folder")
        clip = path.endswith((".gif", ".mp4"))
        if not (folder or clip or path.endswith((".png", ".npz"))):
            raise ValueError(f"--out must end in .png (an image grid), .npz (arrays for evaluation), / (a folder "
                             f"of PNGs, one per sample) or, for a video model, .gif or .mp4, got {path}")
        check_writable(path, folder=folder)  # a file in the way or a read-only place fails now, not after sampling
        if path.endswith(".npz"):
            return
        self._kind.check_output(path)
        if self.latents_only:
            raise ValueError(f"this model samples {self.channels}-channel latents: pass a VAE (--vae DIR, the "
                             "diffusers AutoencoderKL its latents come from, e.g. a local copy of "
                             "stabilityai/sd-vae-ft-ema), or write the raw latents to FILE.npz")

    def save(self, samples: Samples, path: str | os.PathLike, scale: int | None = None) -> Path:
        """Write samples by the path's form: FILE.png (one image at its own size, or a grid of `ncol`
        columns), FILE.npz (images in [-1, 1], labels; a moving-MNIST run's clip rule for `ditkit eval`),
        DIR/ (one PNG per sample, a subfolder per class),
        FILE.gif / FILE.mp4 (clips). `scale` enlarges each pixel (default 1, clips 2)."""
        self.check_output(path)
        text, images = str(path), samples.images
        scale = self._kind.scale if scale is None else scale
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if not samples.decoded and not text.endswith(".npz"):
            raise ValueError(f"these samples are raw latents: write them to FILE.npz, not {text}")
        if text.endswith(".npz"):
            with atomic_path(text) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images.numpy(), labels=samples.labels.numpy(), **self._kind.sample_record(self))
        else:
            self._kind.write(self, text, images, samples.labels, samples.ncol, scale)
        return Path(text)

    # ---- helpers -------------------------------------------------------------------------------
    def scale_adapter(self, scale: float | None) -> None:
        """Set the run's own adapter to `scale` (None: 1, as trained); refused on a run without one."""
        adapted = "adapter" in self.info
        if scale is not None and not adapted:
            raise ValueError("lora_scale applies to adapter runs (trained with lora_rank); this run has no adapter")
        if adapted:
            lora.set_scale(self.model, {lora.OWN: 1.0 if scale is None else float(scale)})

    def with_prompts(self, prompts: list[str]) -> PromptTable:
        """The text model conditioned on `prompts` as labels 0..P-1 (P = no prompt), encoded with the
        run's text encoder: sample it like a class-conditional DiT, with y = prompt indices."""
        return self._kind.prompt_model(self, prompts)

    def decode(self, samples: Tensor) -> Tensor:
        """Samples -> images in [-1, 1]: VAE-decoded for a latent model, else clamped."""
        if self.vae is None:
            return samples.float().clamp(-1, 1)
        return load_latent_space(self.vae, str(samples.device)).decode(samples)

    def sample_kwargs(self, s: dict[str, Any]) -> dict[str, Any]:
        """`ditkit.sample()` keywords for settings from `settings()` (the run's guide model where they ask for one)."""
        kwargs = {ARGUMENT_NAMES_INV.get(k, k): v for k, v in s.items()}
        flat = {k: kwargs.pop(k) for k in GUIDANCE_SETTINGS if k in kwargs}  # the run's flat guidance settings
        if flat.get("guide_scale") is not None and flat.get("guide_model") is None:
            flat["guide_model"] = self.guide
        return {**kwargs, "guidance": guidance_from_settings(**flat)}

    def _previews(self, callback: Preview | None) -> Callable[[int, int, Tensor], None] | None:
        if callback is None:
            return None
        decode = (lambda x: x.float().cpu()) if self.latents_only else (lambda x: self.decode(x).float().cpu())
        return lambda step, total, x0: callback(step, total, decode(x0))


ARGUMENT_NAMES_INV = {v: k for k, v in ARGUMENT_NAMES.items()}
# the settings a run may record and a caller may pass: sample()'s keywords (guidance as its flat settings),
# less what generate() supplies
SAMPLE_OPTIONS = (frozenset(inspect.signature(sample).parameters) | GUIDANCE_SETTINGS) - {
    "model", "objective", "shape", "y", "guidance", "generator", "progress", "callback", "noise", "step_noises",
    "editing"}
ANY_OPTION = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(sample).parameters.values())  # sample(**kw)


def _centre_crop(x: Tensor, aspect: float) -> Tensor:
    """The centred crop of (N, C, H, W) with height / width = aspect."""
    h, w = x.shape[-2:]
    if h / w > aspect:
        ch = max(1, round(w * aspect))
        top = (h - ch) // 2
        return x[..., top:top + ch, :]
    cw = max(1, round(h / aspect))
    left = (w - cw) // 2
    return x[..., left:left + cw]


def describe(settings: dict[str, Any]) -> str:
    """One line of sampling settings, e.g. "heun, 20 steps, cfg 4.0, seed 0"."""
    hidden = ("sampler", "steps", "cfg", "what", "guide_model", "apg_momentum", "compile", "guide_unconditional")
    shown = {k: v for k, v in settings.items() if k not in hidden or (k in ("compile", "guide_unconditional") and v)}
    extra = "".join(f", {k} {v}" for k, v in shown.items() if v is not None)
    return f"{settings['sampler']}, {settings['steps']} steps, cfg {settings['cfg']}{extra}"
