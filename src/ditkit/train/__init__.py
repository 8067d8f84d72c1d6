"""Training: the config dataclass, the loop, EMA, checkpoints, multi-process set-up.

`train` and `TrainResult` load the training loop on first use, so that inference (which reads
checkpoints through `ditkit.checkpoint`) never imports it.
"""
from __future__ import annotations

from typing import Any

from ditkit.config import TrainConfig, build_config, resume_config

__all__ = ["TrainConfig", "TrainResult", "build_config", "resume_config", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from ditkit.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ditkit.train' has no attribute {name!r}")
