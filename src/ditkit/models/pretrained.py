"""Saving and loading models as a directory: `config.json` (constructor arguments) and
`model.safetensors` (weights), written atomically; plus clear errors on mismatched state dicts."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ditkit.io import atomic_path, write_json_atomic


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raise ValueError listing missing keys, unexpected keys and shape mismatches, if any."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        more = " ..." if len(missing) > 20 else ""
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{more}")
    if unexpected:
        more = " ..." if len(unexpected) > 20 else ""
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{more}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}")
    if problems:
        raise ValueError(
            f"checkpoint does not match {type(model).__name__}({json.dumps(getattr(model, 'config', {}))}): "
            + " | ".join(problems)
        )


class PretrainedMixin:
    """For modules that keep their constructor arguments in `self.config` (a JSON-able dict)."""

    config: dict[str, Any]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict(self, state_dict)  # one readable error instead of torch's RuntimeError
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]

    def save_pretrained(self, directory: str | os.PathLike, weights_name: str = "model.safetensors") -> Path:
        """Write `config.json` and the weights (contiguous, on CPU) into `directory`, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        with atomic_path(directory / weights_name) as tmp:
            save_file(tensors, str(tmp))
        write_json_atomic(directory / "config.json", {"model_type": type(self).__name__, **self.config})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, weights_name: str = "model.safetensors",
                        map_location: str | torch.device = "cpu"):
        """Build the model from `directory/config.json` and load `directory/<weights_name>`."""
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / weights_name
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: expected a directory written by save_pretrained "
                                        f"or a ditkit run")
        config = json.loads(config_path.read_text())
        model_type = config.pop("model_type", cls.__name__)
        if model_type != cls.__name__:
            raise ValueError(f"{directory} holds a {model_type}, not a {cls.__name__}")
        model = cls(**config)
        model.load_state_dict(load_file(str(weights_path), device=str(map_location)))  # type: ignore[attr-defined]
        return model
