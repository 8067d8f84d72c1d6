"""The training configuration: one dataclass, loadable from YAML and `key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditkit.data.conditions import check_condition


@dataclass
class TrainConfig:
    # data
    data: str = "mnist"                 # "mnist", "patterns", a directory of images, or a latent cache
    image_size: int | None = None       # None: the data source's default (32)
    channels: int | None = None         # None: the data source's default (mnist 1, others 3)
    unconditional: bool = False         # ignore class labels (null label only)
    frames: int | None = None           # video sources (moving_mnist): frames per clip; None: the source's (8)
    data_args: dict[str, Any] = field(default_factory=dict)  # source options, e.g. {"motion": "class"}
    # model: a zoo name ("DiT-S/2") or "custom" with the fields below; `model_args` overrides either
    model: str = "custom"
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    patch_size: int = 4
    mlp_ratio: float = 4.0
    block: str = "adaln_zero"
    class_dropout_prob: float = 0.1
    model_args: dict[str, Any] = field(default_factory=dict)
    # video data builds a VideoDiT from the fields above and these (a window goes in model_args)
    patch_t: int = 1                    # frames per spacetime patch
    attention: str = "full"             # "full" | "factorized" (spatial/temporal) | "windowed"
    # structure control: train only a ControlNet-style branch on a frozen base run (model fields above unused)
    control: str | None = None          # None, or the condition image: "edges" | "lowres"
    base: str | None = None             # the base run or checkpoint directory (needed with control)
    control_blocks: int | None = None   # blocks copied into the branch; None: half the base's depth
    # text-to-image: captioned data (e.g. "shapes") trains a text model on its encoded captions
    text_model: str = "mmdit"           # "mmdit" (SD3 joint attention) | "pixart" (adaLN-single + cross-attention)
    text_encoder: str = "minilm"        # "minilm" | "bytes" | a local encoder directory (see ditkit.text)
    text_max_length: int | None = None  # tokens kept per caption; None: the encoder's default
    # objective
    objective: str = "flow"             # "flow" (rectified flow) or "ddpm" (Gaussian, learned sigma)
    timestep_sampling: str = "logit_normal"  # flow only: "uniform" | "logit_normal"
    velocity_cosine_weight: float = 0.0  # issue 14: flow only, weight of the 1 - cos(v, target) loss term
    # optimisation
    steps: int = 1200
    minutes: float | None = None        # wall-clock budget; training stops at whichever comes first
    batch_size: int = 64                # global batch (split across processes)
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_warmup: bool = True             # decay min(ema_decay, (1 + step) / (10 + step))
    ema_std: float | None = None        # issue 14: EDM2 power-function EMA of this relative std (replaces ema_decay)
    precision: str = "bf16"             # "fp32" | "bf16" | "fp16" (autocast; fp16 uses a GradScaler)
    compile: bool = False
    grad_checkpoint: bool = False
    fsdp: bool = False                  # with torchrun: FSDP2 fully_shard instead of DDP
    seed: int = 0
    # output
    out: str = "runs/demo"
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0               # 0: only at the end
    tensorboard: bool = False
    # the sample grid written at the end (and every sample_every steps)
    sampler: str | None = None          # None: "heun" for flow, "ddpm" for Gaussian
    sample_steps: int | None = 20       # None: the sampler's default
    cfg_scale: float = 3.0              # issue 14: 3 with autoguidance below (was 4 alone; README, recipe ablation)
    samples_per_class: int = 8
    # issue 14: more of sample()'s options, recorded so that sampling a run uses them (sample_<kwarg>)
    sample_cfg_interval: list[float] | None = None  # issue 14: (lo, hi) flow-time fraction where CFG applies
    sample_shift: float | None = None   # issue 14: time shift of the sampling grid (None: plain grid)
    sample_apg_eta: float | None = None  # issue 14: adaptive projected guidance, parallel weight (None: CFG)
    sample_apg_norm: float | None = None  # issue 14: APG norm cap
    sample_apg_momentum: float = 0.0    # issue 14: APG reverse momentum
    sample_guide_step: int | None = 400  # issue 14: autoguidance by the EMA weights of this step (kept in OUT/guide)
    sample_guide_unconditional: bool = False  # issue 14: call that guide with the null label
    sample_guide_scale: float | None = 2.0  # issue 14: autoguidance weight on top of CFG (None: cfg_scale is it)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # fields whose change makes a run a different run (resume refuses them)
    @staticmethod
    def identity_keys() -> tuple[str, ...]:
        return ("data", "image_size", "channels", "unconditional", "model", "hidden_size", "depth", "num_heads",
                "patch_size", "mlp_ratio", "block", "class_dropout_prob", "model_args", "objective",
                "timestep_sampling", "velocity_cosine_weight", "ema_std", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "steps",
                "grad_clip", "ema_decay", "ema_warmup", "precision", "seed", "fsdp", "frames", "data_args",
                "patch_t", "attention", "control", "base",
                "control_blocks", "text_model", "text_encoder", "text_max_length")


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_value(key: str, text: str) -> Any:
    """Parse a `key=value` override according to the field's declared type."""
    fields = _field_types()
    kind = str(fields[key].type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true or false, got {text!r}")
    if kind.startswith(("dict", "list")):
        return json.loads(text)
    for cast, name in ((int, "int"), (float, "float")):
        if kind.startswith(name):
            try:
                return cast(text)
            except ValueError:
                raise ValueError(f"{key} expects {'an' if name == 'int' else 'a'} {name}, got {text!r}") from None
    return text


def build_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                 assignments: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML/JSON file <- `overrides` (already typed, e.g. from CLI flags) <- `key=value` strings."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(path.read_text()) or {}
        else:
            loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for item in assignments or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in _field_types():
            raise ValueError(unknown_keys_message([key]))
        values[key] = parse_value(key, text)
    unknown = [k for k in values if k not in _field_types()]
    if unknown:
        raise ValueError(unknown_keys_message(unknown))
    config = TrainConfig(**values)
    validate(config)
    return config


def unknown_keys_message(keys: list[str]) -> str:
    return f"unknown config key(s) {', '.join(map(repr, keys))}; the keys are: {', '.join(_field_types())}"


def validate(c: TrainConfig) -> None:
    """Reject settings that cannot work, before anything is built or written."""
    choices = {"objective": ("flow", "ddpm"), "precision": ("fp32", "bf16", "fp16"),
               "timestep_sampling": ("uniform", "logit_normal"),
               "attention": ("full", "factorized", "windowed")}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {getattr(c, key)!r}")
    positive = ("steps", "batch_size", "save_every", "keep_last", "log_every", "samples_per_class", "patch_t")
    for key in positive:
        if getattr(c, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(c, key)}")
    if c.minutes is not None and c.minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {c.minutes}")
    if c.lr <= 0:
        raise ValueError(f"lr must be > 0, got {c.lr}")
    if not 0 <= c.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {c.ema_decay}")
    from ditkit.sampling import check_recorded_options  # issue 14

    check_recorded_options(c)
    if c.text_model not in ("mmdit", "pixart"):
        raise ValueError(f"text_model must be mmdit or pixart, got {c.text_model!r}")
    if (c.control is None) != (c.base is None):
        raise ValueError("control training needs both control=edges|lowres and base=RUN_DIR (the frozen model)")
    if c.control is not None:
        check_condition(c.control)
        if c.fsdp:
            raise ValueError("control training runs with DDP or one process, not fsdp=true")
