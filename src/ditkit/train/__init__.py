"""Training: the config dataclass, the loop, EMA, checkpoints, multi-process set-up."""
from ditkit.train.config import TrainConfig, build_config
from ditkit.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "build_config", "train"]
