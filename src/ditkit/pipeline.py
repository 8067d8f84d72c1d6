"""Loading a trained run for sampling: model (raw or EMA), objective and data facts from a checkpoint."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditkit.data.latents import load_latent_space
from ditkit.models import DiT, MMDiT, PixArtDiT, VideoDiT
from ditkit.models.control import ControlBranch, ControlDiT
from ditkit.prompts import PromptTable
from ditkit.sampling import load_guide
from ditkit.train import checkpoint as ckpt
from ditkit.train.trainer import build_objective


@dataclass
class Pipeline:
    # a ControlDiT (control run) needs its condition: model.bind(condition); a text model its prompts:
    # pipe.with_prompts([...])
    model: DiT | ControlDiT | VideoDiT | MMDiT | PixArtDiT
    objective: Any
    info: dict[str, Any]
    vae: str | None = None  # the diffusers AutoencoderKL that decodes a latent model's samples
    guide: Any = None  # issue 14: the run's autoguidance model (sample(..., guide_model=guide)), if it records one

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def is_text_model(self) -> bool:
        return isinstance(self.model, (MMDiT, PixArtDiT))

    def with_prompts(self, prompts: list[str]) -> PromptTable:
        """The text model conditioned on `prompts` as labels 0..P-1 (P = no prompt), encoded with the
        run's text encoder: sample it like a class-conditional DiT, with y = prompt indices."""
        if not self.is_text_model:
            raise ValueError(f"prompts need a text-to-image run; this one is a {type(self.model).__name__} "
                             f"(use class labels)")
        from ditkit.text import load_text_encoder

        return PromptTable.encode(self.model, load_text_encoder(**self.info["text_encoder"]), prompts)

    def decode(self, samples: Tensor) -> Tensor:
        """Samples -> images in [-1, 1]: VAE-decoded for a latent model, else clamped."""
        if self.vae is None:
            return samples.float().clamp(-1, 1)
        return load_latent_space(self.vae, str(samples.device)).decode(samples)


def load_pipeline(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu",
                  vae: str | None = None) -> Pipeline:
    """Model + objective of a ditkit run directory (newest good checkpoint) or checkpoint directory;
    `vae` overrides the VAE the run recorded (latent runs, converted original checkpoints)."""
    path = ckpt.resolve_checkpoint(path)
    weights = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    info_file = path / "run.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {"objective": "ddpm"}
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == ControlBranch.__name__:
        model = load_control(path, weights, info, device)
    else:
        classes = {cls.__name__: cls for cls in (VideoDiT, MMDiT, PixArtDiT)}
        model_class = classes.get(model_type, DiT)
        model = model_class.from_pretrained(path, weights_name=weights).to(device).eval()
    config = info.get("train_config", {})
    objective = build_objective(info["objective"], config.get("timestep_sampling", "logit_normal"))
    guide = load_guide(path.parent.parent, config, device) if model_type == DiT.__name__ else None  # issue 14
    return Pipeline(model=model, objective=objective, info=info, vae=vae or info.get("vae"), guide=guide)


def load_control(path: Path, weights: str, info: dict[str, Any], device: str | torch.device) -> ControlDiT:
    """A control run's branch on the base model it was trained on (the base checkpoint's EMA weights)."""
    base_dir = info.get("base_checkpoint")
    if base_dir is None or not Path(base_dir).is_dir():
        raise FileNotFoundError(f"control run {path} needs its base model, recorded in run.json as {base_dir}, "
                                f"which is not there")
    base = load_pipeline(base_dir, device=device).model
    return ControlDiT(base, ControlBranch.from_pretrained(path, weights_name=weights)).to(device).eval()
