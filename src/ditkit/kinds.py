"""What differs between the kinds of run at inference, one small class each, so that `ditkit.pipeline.Pipeline`
reads the same for every kind (the trainer's counterpart is `ditkit.train.kinds`).

A kind owns: loading its model from a checkpoint directory, what a grid's columns are (classes or prompts),
the condition that samples and edits follow, a sample's dimensions between channels and (H, W), how a clip's
frames are drawn (given first frames, extension window by window), and the files its samples are written to.

    ImageRun     a DiT on pixels or VAE latents, class-conditional or not (any other model samples as one too)
    VideoRun     a VideoDiT: samples are clips (N, C, F, H, W), written as .gif or .mp4
    TextRun      an MMDiT or PixArtDiT behind a PromptTable: prompts act as class labels 0..P-1
    ControlRun   a ControlNet-style branch on its base run's DiT: samples follow a condition image's structure
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ditkit import checkpoint as ckpt
from ditkit.checksums import sha256
from ditkit.data.conditions import make_condition
from ditkit.data.moving_mnist import CLIP_RULE
from ditkit.images import save_gif, save_grid, save_image_folder, save_mp4, save_png, shown_classes, to_uint8
from ditkit.diffusion.flow import FlowMatching
from ditkit.models import DiT, MMDiT, PixArtDiT, VideoDiT
from ditkit.models.control import ControlBranch, ControlDiT
from ditkit.models.video import GivenFrames
from ditkit.sampling import Editing, sample, sampling_schedule
from ditkit.sampling.editing import DEFAULT_STRENGTH, noised_to_level
from ditkit.text.prompts import PromptTable

GUIDE_DIR = "guide"  # a run's autoguidance model (its EMA weights at sample_guide_step), beside checkpoints/
FRAME_CONDITIONINGS = ("trained", "inpaint")  # how a video run is given frames (see VideoRun.frame_plan)
Model = Any  # what is sampled: the run's model, a PromptTable on it, or a ControlDiT bound to a condition
Device = str | torch.device


class LoadedRun(Protocol):
    """What a kind reads of the pipeline it serves."""
    model: Any
    info: dict[str, Any]
    device: torch.device

    @property
    def num_classes(self) -> int: ...

    @property
    def conditional(self) -> bool: ...

    @property
    def class_names(self) -> list[str]: ...


class ImageRun:
    """A DiT on pixels or latents: a grid's columns are its classes (one column if it is unconditional)."""
    name = "image"
    models: tuple[type[nn.Module], ...] = (DiT,)  # what it samples
    saved: tuple[type[nn.Module], ...] = (DiT,)  # what its checkpoint holds (the class config.json names)
    edits = True  # edit() applies (on pixels)
    guided = True  # it may keep an autoguidance model (RUN/guide)
    outputs = ".png, a folder/"
    scale = 1  # how much save() enlarges each pixel by default

    def load_model(self, path: Path, weights: str, model_type: str | None, info: dict[str, Any],
                   device: Device) -> nn.Module:
        """The model of checkpoint directory `path` with the weights file `weights`, in eval mode."""
        model_class = {c.__name__: c for c in self.saved}.get(model_type, self.saved[0])
        return model_class.from_pretrained(path, weights_name=weights).to(device).eval()

    def columns(self, run: LoadedRun, classes: list[int] | None,
                prompts: list[str] | None) -> tuple[Model, list[int]]:
        """The model to sample and the label of each grid column."""
        if prompts is not None:
            self.prompt_model(run, prompts)  # refuses: prompts need a text run
        K = run.num_classes
        if not run.conditional:
            if classes is not None and list(classes) != [0]:
                raise ValueError(f"class {list(classes)}: this run is unconditional (it has no classes)")
            return run.model, [0]
        classes = list(range(K)) if classes is None else list(classes)
        bad = [k for k in classes if not 0 <= k < K]
        if bad or not classes:
            raise ValueError(f"--class {bad} out of range: this model has classes 0..{K - 1}")
        return run.model, classes

    def prompt_model(self, run: LoadedRun, prompts: list[str]) -> PromptTable:
        """The model conditioned on `prompts` as labels 0..P-1: text runs only."""
        raise ValueError(f"prompts need a text-to-image run; this one is a {type(run.model).__name__} "
                         f"(use class labels)")

    def conditioned(self, run: LoadedRun, model: Model, condition: Tensor | None, columns: int,
                    n_per_class: int) -> Model:
        """The model that generate() samples, given its `condition` images (control runs: one per column)."""
        if condition is not None:
            raise ValueError(f"condition images are for control runs, one per class ({columns})")
        return model

    def clip(self, run: LoadedRun, frames: int | None) -> list[int]:
        """A sample's dimensions between channels and (H, W): none for an image."""
        if frames is not None:
            article = "an" if self.name[0] in "aeiou" else "a"
            raise ValueError(f"frames applies to video runs only (this is {article} {self.name} run)")
        return []

    def drawn_first_frames(self, run: LoadedRun, columns: list[int], n_per_class: int, seed: int,
                           progress: bool) -> Tensor | None:
        """First frames drawn by another model (VideoRun); None: the model draws every frame."""
        return None

    def frame_plan(self, run: LoadedRun, given: Tensor | None, frames: int | None, extend: bool | None,
                   conditioning: str | None, notes: list[str]) -> dict[str, Any] | None:
        """How generate() draws a clip's frames (`sample_frames`' arguments), or None for one plain draw;
        given frames and extension are for video runs."""
        if given is not None or extend or conditioning is not None:
            article = "an" if self.name[0] in "aeiou" else "a"
            raise ValueError(f"a first frame (--first-frame), --extend and --frame-conditioning apply to video runs "
                             f"only (this is {article} {self.name} run)")
        return None

    def edit_condition(self, run: LoadedRun, class_label: int | None, prompt: str | None, n: int,
                       image: Tensor) -> tuple[Model, Tensor | None]:
        """The model an edit samples and its labels (None: unconditional) for `n` edits of `image`."""
        if prompt is not None:
            self.prompt_model(run, [prompt])  # refuses: prompts need a text run
        if class_label is None:
            return run.model, None
        if not run.conditional:
            raise ValueError(f"--class {class_label}: this run is unconditional (it has no classes)")
        if not 0 <= class_label < run.num_classes:
            raise ValueError(f"--class {class_label}: this model has classes 0..{run.num_classes - 1}")
        return run.model, torch.full((n,), class_label, device=run.device)

    def edit_style(self, run: LoadedRun, masked: bool) -> tuple[float, str]:
        """(the default strength, what the edit is called): inpainting redraws the mask, SDEdit part-noises."""
        return (1.0, "inpainted") if masked else (DEFAULT_STRENGTH, "edited")

    def check_output(self, path: str) -> None:
        """ValueError unless `path` (a file name or folder, not .npz) fits this kind's samples."""
        if path.endswith((".gif", ".mp4")):
            raise ValueError(f"this run holds an image model: write its samples to {self.outputs} or .npz, "
                             f"not {path}")

    def labelled(self, run: LoadedRun) -> bool:
        """Whether a folder of samples gets one subfolder per label."""
        return run.conditional

    def sample_record(self, run: LoadedRun) -> dict[str, str]:
        """Strings an .npz of samples keeps beside images and labels, for `ditkit eval` to read."""
        return {}

    def write(self, run: LoadedRun, path: str, images: Tensor, labels: Tensor, ncol: int, scale: int) -> None:
        """FILE.png (one image at its own size, or a grid of `ncol` columns) or DIR/ (one PNG per sample)."""
        if path.endswith(".png") and len(images) == 1:  # one image: at its own size, no border
            save_png(path, to_uint8(images)[0], scale)
        elif path.endswith(".png"):
            save_grid(path, images, nrow=ncol, scale=scale)
        else:
            save_image_folder(path, images, labels if self.labelled(run) else None)


class VideoRun(ImageRun):
    """A VideoDiT: samples are clips of the run's number of frames (or another), saved as GIF or MP4."""
    name = "video"
    guided = False
    models = saved = (VideoDiT,)
    edits = False
    outputs = ".gif, .mp4"
    scale = 2

    def clip(self, run: LoadedRun, frames: int | None) -> list[int]:
        if frames is not None and frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        return [frames or self.default_frames(run)]

    @staticmethod
    def default_frames(run: LoadedRun) -> int:
        """A clip's frames when none are asked for: the run's sample_frames, else its trained window."""
        return int(run.info.get("train_config", {}).get("sample_frames") or run.model.num_frames)

    def check_output(self, path: str) -> None:
        if not path.endswith((".gif", ".mp4")):
            raise ValueError(f"this run holds a video model: write its samples to {self.outputs} or .npz, "
                             f"not {path}")
        if path.endswith(".mp4") and importlib.util.find_spec("imageio_ffmpeg") is None:
            raise ValueError("writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); a .gif needs nothing")

    def write(self, run: LoadedRun, path: str, images: Tensor, labels: Tensor, ncol: int, scale: int) -> None:
        (save_gif if path.endswith(".gif") else save_mp4)(path, images, nrow=ncol, scale=scale)

    def sample_record(self, run: LoadedRun) -> dict[str, str]:
        """A moving-MNIST run's clip rule (its data options that `evaluate_clips` takes), as JSON."""
        config = run.info.get("train_config", {})
        if config.get("data") != "moving_mnist":
            return {}
        args = config.get("data_args") or {}
        return {"clip_rule": json.dumps({k: args[k] for k in CLIP_RULE if k in args})}

    def drawn_first_frames(self, run: LoadedRun, columns: list[int], n_per_class: int, seed: int,
                           progress: bool) -> Tensor | None:
        """A run trained with an image_model (Emu Video's factorisation): each clip's first frame (N, C, 1, H, W),
        drawn by that image run with its own settings and `seed`, in the order of the clips' labels; None for
        other runs (the video model draws every frame)."""
        record = run.info.get("image_model")
        if record is None:
            return None
        path = Path(record["path"])
        if not (path / record["weights"]).is_file():
            raise FileNotFoundError(f"this video run continues first frames drawn by its image run, recorded in "
                                    f"run.json as {path}, which is not there: put that run back, or give first "
                                    f"frames (first_frame=, --first-frame)")
        if sha256(path / record["weights"]) != record["sha256"]:
            raise ValueError(f"the image run {path} has changed since this video run was trained on its frames "
                             f"(the sha256 of {record['weights']} differs from run.json's)")
        image = type(run).load(path, device=run.device)  # the same class as the run: a Pipeline
        drawn = image.generate(classes=columns, n_per_class=n_per_class, seed=seed, progress=progress)
        return drawn.images.clamp(-1, 1).unsqueeze(2).to(run.device)

    def frame_plan(self, run: LoadedRun, given: Tensor | None, frames: int | None, extend: bool | None,
                   conditioning: str | None, notes: list[str]) -> dict[str, Any] | None:
        """Given first frames (n, C, k, H, W) and clips longer than the trained window, drawn window by window.

        conditioning "trained": the given frames at t = 0 (a run trained with context_share); "inpaint": the
        training-free form, RePaint on the frames after them; None: trained where the run was and the given
        frames fill whole tubelets, else inpaint (noted). extend None: when more frames are asked for than
        the run was trained on and it was trained with frame conditioning (inpaint otherwise on request)."""
        model, config = run.model, run.info.get("train_config", {})
        window, pt, total = model.num_frames, model.patch_t, frames or self.default_frames(run)
        trained = bool(config.get("context_share"))
        if conditioning not in (None, *FRAME_CONDITIONINGS):
            raise ValueError(f"frame_conditioning must be one of {', '.join(FRAME_CONDITIONINGS)}, "
                             f"got {conditioning!r}")
        if conditioning == "trained" and not trained:
            raise ValueError("frame_conditioning 'trained' needs a run trained with frame conditioning "
                             "(context_share > 0 in its config, e.g. context_share=0.5); this run was not: use "
                             "'inpaint' (training-free) or train with context_share")
        if extend is None:
            extend = total > window and (trained or conditioning == "inpaint")
            if total > window and not extend:
                notes.append(f"{total} frames drawn in one window (this run was trained on {window}-frame clips "
                             f"without frame conditioning, context_share, so it cannot extend them)")
        elif extend and not trained and conditioning != "inpaint":
            raise ValueError("extending a clip conditions each window on the last frames of the one before: this "
                             "run was not trained with frame conditioning (set context_share, e.g. "
                             "context_share=0.5, in its config), or ask for the training-free form with "
                             "frame conditioning 'inpaint'")
        span = window if extend else total
        if span % pt:
            notes.append(f"{span} frames is not a multiple of patch_t={pt}: the last tubelet is padded by "
                         f"repeating the last frame, and the clip cut back")
        if given is None and not extend:
            return None
        k = 0 if given is None else given.shape[2]
        mode = conditioning or ("trained" if trained and k % pt == 0 else "inpaint")
        if conditioning is None and given is not None and mode == "inpaint":
            notes.append("the first frame is kept by inpainting the others (training-free): "
                         + (f"a tubelet holds {pt} frames and one is given" if trained else
                            "this run was not trained with frame conditioning (context_share)"))
        if k >= span:
            raise ValueError(f"{k} given frame(s) leave nothing to generate in {span} frames: ask for more frames")
        if mode == "trained" and k % pt:
            raise ValueError(f"{k} given frame(s) with patch_t={pt}: the trained form gives whole tubelets of {pt} "
                             f"frames; give {pt} frames or use frame conditioning 'inpaint'")
        overlap = int(config.get("context_frames", 1)) if trained else max(1, window // 2)
        if extend and not 0 < overlap < window:
            raise ValueError(f"extension needs windows of more than {overlap} frames; this run's are {window}")
        return {"given": given, "window": span, "overlap": overlap, "conditioning": mode}


class TextRun(ImageRun):
    """An MMDiT or PixArtDiT: a grid's columns are prompts (default: up to 10 of the training captions),
    encoded with the run's text encoder and sampled like classes."""
    name = "text"
    guided = False
    models = saved = (MMDiT, PixArtDiT)

    def columns(self, run: LoadedRun, classes: list[int] | None,
                prompts: list[str] | None) -> tuple[Model, list[int]]:
        if classes is not None:
            raise ValueError("a text-to-image model takes --prompt TEXT [TEXT ...], not --class")
        if not prompts:
            prompts = [run.class_names[i] for i in shown_classes(len(run.class_names))]
        return self.prompt_model(run, prompts), list(range(len(prompts)))

    def prompt_model(self, run: LoadedRun, prompts: list[str]) -> PromptTable:
        from ditkit.text import load_text_encoder

        return PromptTable.encode(run.model, load_text_encoder(**run.info["text_encoder"]), prompts)

    def edit_condition(self, run: LoadedRun, class_label: int | None, prompt: str | None, n: int,
                       image: Tensor) -> tuple[Model, Tensor | None]:
        if class_label is not None or prompt is None:
            raise ValueError("a text-to-image run takes --prompt TEXT, a class-conditional one --class K")
        return self.prompt_model(run, [prompt]), torch.zeros(n, dtype=torch.long, device=run.device)

    def labelled(self, run: LoadedRun) -> bool:
        return True


class ControlRun(ImageRun):
    """A control branch on the base run it was trained on: generate() takes one condition image per
    column, edit() follows its input image's structure."""
    name = "control"
    guided = False
    models = (ControlDiT,)
    saved = (ControlBranch,)

    def load_model(self, path: Path, weights: str, model_type: str | None, info: dict[str, Any],
                   device: Device) -> nn.Module:
        """The branch on its base model (the base checkpoint's EMA weights), named in run.json."""
        base_dir = info.get("base_checkpoint")
        if base_dir is None or not Path(base_dir).is_dir():
            raise FileNotFoundError(f"control run {path} needs its base model, recorded in run.json as "
                                    f"{base_dir}, which is not there")
        base_dir = ckpt.resolve_checkpoint(base_dir)
        base = IMAGE.load_model(base_dir, ckpt.weights_file(base_dir, ema=True), None, {}, device)
        return ControlDiT(base, ControlBranch.from_pretrained(path, weights_name=weights)).to(device).eval()

    def conditioned(self, run: LoadedRun, model: Model, condition: Tensor | None, columns: int,
                    n_per_class: int) -> Model:
        if condition is None:
            raise ValueError("this is a control run: it samples from a condition image, use edit(image) "
                             "(ditkit edit --ckpt RUN --image IMAGE --out OUT.png)")
        if len(condition) != columns:
            raise ValueError(f"condition images are for control runs, one per class ({columns})")
        cond = make_condition(run.model.condition, condition.to(run.device))
        return model.bind(cond.repeat(n_per_class, *([1] * (cond.ndim - 1))))

    def edit_condition(self, run: LoadedRun, class_label: int | None, prompt: str | None, n: int,
                       image: Tensor) -> tuple[Model, Tensor | None]:
        model, y = super().edit_condition(run, class_label, prompt, n, image)
        return model.bind(make_condition(model.condition, image)), y  # the structure of the input image

    def edit_style(self, run: LoadedRun, masked: bool) -> tuple[float, str]:
        return 1.0, "inpainted" if masked else f"{run.model.condition}-controlled"


KINDS = (ControlRun(), VideoRun(), TextRun())
IMAGE = ImageRun()  # the kind of every other model


def kind_of(model: nn.Module) -> ImageRun:
    """The kind of run that `model` samples as."""
    return next((kind for kind in KINDS if isinstance(model, kind.models)), IMAGE)


def saved_kind(model_type: str | None) -> ImageRun:
    """The kind of run whose checkpoint's config.json names the class `model_type` (None: a DiT)."""
    return next((kind for kind in KINDS if model_type in {c.__name__ for c in kind.saved}), IMAGE)


def load_guide(run_dir: str | os.PathLike, device: Device = "cpu") -> DiT | None:
    """The autoguidance model a run keeps in RUN/guide (its EMA weights at sample_guide_step), or None."""
    path = Path(run_dir) / GUIDE_DIR
    if not (path / "config.json").is_file():
        return None
    return DiT.from_pretrained(path).to(device).eval()


# ------------------------------------------------------------------------------------------------
# Clips from given frames: image-to-video and extension, window by window
# ------------------------------------------------------------------------------------------------

def _noised(schedule: Any, steps: int, shift: float | None, frames: Tensor, level: int, noise: Tensor) -> Tensor:
    """`frames` as the sampling state at `level` holds them (the flow grid shifted as sampling shifts it)."""
    if isinstance(schedule, FlowMatching) and level < steps:
        return schedule.q_sample(frames, schedule.timesteps(steps, shift)[level].reshape(1), noise)
    return noised_to_level(schedule, steps, frames, level, noise)


def sample_window(model: Model, objective: Any, shape: tuple[int, ...], given: Tensor | None, conditioning: str,
                  y: Tensor | None, generator: torch.Generator | None, **options: Any) -> Tensor:
    """One clip of `shape` (N, C, F, H, W) whose first k frames are `given` (N, C, k, H, W), kept exactly:
    "trained" feeds them clean at t = 0 (`GivenFrames`), "inpaint" replaces them after every step by
    themselves noised to the level reached (RePaint's known region). `options`: `ditkit.sample()`'s."""
    if given is None:
        return sample(model, objective, shape, y=y, generator=generator, **options)
    k = given.shape[2]
    if conditioning == "trained":
        def keep(x: Tensor, level: int) -> Tensor:
            return torch.cat([given.to(x), x[:, :, k:]], dim=2)

        return sample(GivenFrames(model, given), objective, shape, y=y, generator=generator,
                      editing=Editing(step_hook=keep), **options)
    _, schedule, n = sampling_schedule(objective, options.get("sampler"), options.get("steps"), options.get("shift"))

    def keep_noised(x: Tensor, level: int) -> Tensor:
        noise = torch.randn(given.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.cat([_noised(schedule, n, options.get("shift"), given.to(x), level, noise), x[:, :, k:]], dim=2)

    return sample(model, objective, shape, y=y, generator=generator, editing=Editing(step_hook=keep_noised),
                  **options)


def sample_frames(model: Model, objective: Any, shape: tuple[int, ...], *, given: Tensor | None, window: int,
                  overlap: int, conditioning: str, y: Tensor | None = None, generator: torch.Generator | None = None,
                  **options: Any) -> list[Tensor]:
    """The windows of `window` frames that make a clip of shape[2] frames: the first starts from the `given`
    frames (or none), each next one is conditioned on the last `overlap` frames of the one before, which it
    keeps exactly (`join_windows` puts them together)."""
    N, C, total, H, W = shape
    windows = [sample_window(model, objective, (N, C, window, H, W), given, conditioning, y, generator, **options)]
    done = window
    while done < total:
        context = windows[-1][:, :, -overlap:]
        windows.append(sample_window(model, objective, (N, C, window, H, W), context, conditioning, y, generator,
                                     **options))
        done += window - overlap
    return windows


def join_windows(windows: list[Tensor], overlap: int, frames: int) -> Tensor:
    """The clip of `frames` frames that `sample_frames`' windows make (each next window's first `overlap`
    frames are the last of the one before)."""
    return torch.cat([windows[0], *(w[:, :, overlap:] for w in windows[1:])], dim=2)[:, :, :frames]
