"""Loading a trained run for sampling: model (raw or EMA), objective and data facts from a checkpoint."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditkit.models import DiT
from ditkit.train import checkpoint as ckpt
from ditkit.train.trainer import build_objective


@dataclass
class Pipeline:
    model: DiT
    objective: Any
    info: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def load_pipeline(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu") -> Pipeline:
    """Model + objective of a ditkit run directory (newest good checkpoint) or checkpoint directory."""
    path = ckpt.resolve_checkpoint(path)
    weights = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    model = DiT.from_pretrained(path, weights_name=weights).to(device).eval()
    info_file = path / "run.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {"objective": "ddpm"}
    config = info.get("train_config", {})
    objective = build_objective(info["objective"], config.get("timestep_sampling", "logit_normal"))
    return Pipeline(model=model, objective=objective, info=info)
