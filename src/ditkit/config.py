"""The training configuration: one dataclass per concern (data, the model of each kind, objective,
optimisation, output, sampling), joined into `TrainConfig`; loadable from YAML/JSON and `key=value`.

Every field keeps its flat name (`c.hidden_size`, `hidden_size=256`), so config files stay flat. The one
nested section is `sample`: its fields are the keyword arguments of `ditkit.sample()` and are passed
to it as they are (the run's sample grid, and `Pipeline.generate` when an argument is None). Its old flat
names still work: `sampler`, `sample_steps` (-> sample.steps), `cfg_scale`, and `sample.NAME=...`.

Fields made with `identity(...)` define the run: resuming refuses to change them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from ditkit.data.conditions import check_condition
from ditkit.diffusion.flow import FLOW_TIME_SCALE
from ditkit.models.dit import MLPS


def identity(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A field whose change makes a different run (`--resume` refuses to change it)."""
    return field(default=default, default_factory=default_factory, metadata={"identity": True})


@dataclass
class DataConfig:
    data: str = identity("mnist")                # "mnist", "patterns", a directory of images, or a latent cache
    image_size: int | None = identity(None)      # None: the data source's default (32)
    channels: int | None = identity(None)        # None: the data source's default (mnist 1, others 3)
    unconditional: bool = identity(False)        # ignore class labels (null label only)
    frames: int | None = identity(None)          # video sources (moving_mnist): frames per clip; None: the source's (8)
    data_args: dict[str, Any] = identity(default_factory=dict)  # source options, e.g. {"motion": "class"}


@dataclass
class ModelConfig:
    """The image DiT: a zoo name ("DiT-S/2") or "custom" with the fields below; `model_args` overrides either.
    Video and text models are sized by the same fields."""
    model: str = identity("custom")
    hidden_size: int = identity(128)
    depth: int = identity(6)
    num_heads: int = identity(4)
    patch_size: int = identity(4)
    mlp_ratio: float = identity(4.0)
    block: str = identity("adaln_zero")
    mlp: str = identity("gelu_erf")     # custom only: gelu (the paper's tanh form) | gelu_erf (exact, ~10% faster
                                        # steps on a CPU in bf16) | swiglu; zoo models keep the paper's unless
                                        # model_args says otherwise
    class_dropout_prob: float = identity(0.1)
    model_args: dict[str, Any] = identity(default_factory=dict)


@dataclass
class VideoConfig:
    """Video data builds a VideoDiT from the model fields and these (a window goes in model_args)."""
    patch_t: int = identity(1)                   # frames per spacetime patch
    attention: str = identity("full")            # "full" | "factorized" (spatial/temporal) | "windowed"


@dataclass
class ControlConfig:
    """Structure control: only a ControlNet-style branch trains, on a frozen base run (model fields unused)."""
    control: str | None = identity(None)         # None, or the condition image: "edges" | "lowres"
    base: str | None = identity(None)            # the base run or checkpoint directory (needed with control);
    #                                              objective=meanflow: or a flow config file, trained first
    base_minutes: float | None = identity(None)  # base=CONFIG_FILE: that flow run's time budget (None: its own)
    control_blocks: int | None = identity(None)  # blocks copied into the branch; None: half the base's depth


@dataclass
class TextConfig:
    """Text-to-image: captioned data (e.g. "shapes") trains a text model on its encoded captions."""
    text_model: str = identity("mmdit")          # "mmdit" (SD3 joint attention) | "pixart" (adaLN-single + cross-attn)
    text_encoder: str = identity("minilm")       # "minilm" | "bytes" | a local encoder directory (see ditkit.text)
    text_max_length: int | None = identity(None)  # tokens kept per caption; None: the encoder's default


@dataclass
class ObjectiveConfig:
    objective: str = identity("flow")            # "flow" (rectified flow), "ddpm" (Gaussian, learned sigma) or
    #                                              "meanflow" (one-step; base= fine-tunes a flow run)
    timestep_sampling: str = identity("logit_normal")  # flow only: "uniform" | "logit_normal"
    velocity_cosine_weight: float = identity(0.0)  # flow only: weight of the 1 - cos(v, target) loss term
    flow_time_scale: float = identity(FLOW_TIME_SCALE)  # flow/meanflow: the model is fed t x this; 1000 is
    #                                              DiT's step range, 10 keeps it smooth in t, as MeanFlow's JVP needs
    meanflow_unequal: float = identity(0.25)     # meanflow: share of training pairs with r < t (the rest r = t)
    meanflow_cfg: float = identity(1.0)          # meanflow: guidance folded into the target (sample with cfg 1)
    meanflow_cfg_mix: float = identity(0.0)      # meanflow: the paper's kappa (conditional part of the target)
    meanflow_adaptive_p: float = identity(1.0)   # meanflow: loss weight 1 / (|delta|^2 + 1e-3)^p; 0: plain MSE
    meanflow_interval_scale: float = identity(0.01)  # meanflow: the interval embedder sees (t - r) x flow_time_scale
    #                                              x this: smooth in t - r, so the JVP's du/dt stays small
    meanflow_teacher: bool = identity(False)     # meanflow with base=: the base's own (guided) velocity is the
    #                                              target's v instead of noise - x0 (same mean, far less variance)
    meanflow_cfg_interval: tuple[float, float] | None = identity(None)  # meanflow: the times (lo, hi) where
    #                                              meanflow_cfg applies (None: all; outside it w = 1)
    meanflow_trajectories: int = identity(0)     # meanflow with the teacher: its guided ODE solved from this many
    #                                              noises before training (inside `minutes`), a share of each batch
    meanflow_trajectory_share: float = identity(0.5)  # regressing their average velocities directly (no JVP)
    meanflow_trajectory_steps: int = identity(8)  # Heun steps of those ODE solves


@dataclass
class OptimConfig:
    steps: int = 2600                   # a resumed run may be extended (a cosine is stretched to the new total)
    minutes: float | None = None        # wall-clock budget; training stops at whichever comes first, and a
                                        # decaying lr is fitted to end with the budget (trainer.fit_schedule)
    batch_size: int = identity(32)      # global batch (split across processes); 64 before issue 14
    lr: float = identity(3.5e-3)        # 2e-3 (batch 64, cosine) before issue 14 (benchmarks/recipe_ablation.py)
    weight_decay: float = identity(0.0)
    warmup_steps: int = identity(200)
    min_lr_ratio: float = identity(0.1)  # cosine decays to lr * min_lr_ratio (1: constant after warm-up); with
                                         # `minutes` it ends where the budget does (fitted after warm-up)
    grad_clip: float = identity(1.0)
    ema_decay: float = identity(0.995)
    ema_warmup: bool = identity(True)   # decay min(ema_decay, (1 + step) / (10 + step))
    ema_std: float | None = identity(None)  # EDM2 power-function EMA of this relative std (replaces ema_decay)
    precision: str = identity("bf16")   # "fp32" | "bf16" | "fp16" (autocast; fp16 uses a GradScaler)
    compile: bool = False
    grad_checkpoint: bool = False
    fsdp: bool = identity(False)        # with torchrun: FSDP2 fully_shard instead of DDP
    seed: int = identity(0)


@dataclass
class OutputConfig:
    out: str = "runs/demo"
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0               # 0: only at the end
    tensorboard: bool = False
    samples_per_class: int = 8          # rows of the sample grid written at the end (and every sample_every)
    sample_guide_step: int | None = None  # keep the EMA weights of this step in OUT/guide: an autoguidance model


@dataclass
class SampleConfig:
    """How the run samples: its grid, and `Pipeline.generate` whenever an argument is None. The names are
    `ditkit.sample()`'s keywords and every field is passed to it: a new sampling option is one field here."""
    sampler: str | None = None          # None: "heun" for flow, "ddpm" for Gaussian
    steps: int | None = 20              # None: the sampler's default
    cfg_scale: float = 2.5              # 4 everywhere before issue 14 (benchmarks/recipe_ablation.py)
    cfg_interval: tuple[float, float] | None = (0.0, 0.75)  # (lo, hi) of the trajectory where guidance applies
                                        # (1 = noise): none at the noisiest quarter keeps diversity
    guide_scale: float | None = None    # autoguidance weight on top of CFG, by the guide model (None: none)
    guide_unconditional: bool = False   # call the guide model with the null label
    shift: float | None = 1.5           # time shift of the step grid (None: plain grid; 1.5: more steps at high
                                        # noise, a lower FD at the same accuracy, issue 14)
    apg_eta: float | None = None        # adaptive projected guidance: parallel weight (None: plain CFG)
    apg_norm: float | None = None       # APG norm cap
    apg_momentum: float = 0.0           # APG reverse momentum
    cache: float | None = None          # block-cache threshold in [0, 1] (ditkit.sampling.cache); None: no cache
    precision: str | None = None        # "fp32" | "bf16" autocast of the model; None: bf16 if the run trained in bf16
    compile: bool = False               # torch.compile the model for sampling

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ditkit.sample()`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class TrainConfig(OutputConfig, OptimConfig, ObjectiveConfig, TextConfig, ControlConfig, VideoConfig, ModelConfig,
                  DataConfig):
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sample, dict):  # TrainConfig(**saved_dict)
            self.sample = SampleConfig(**self.sample)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from saved or loaded values (run.json's train_config, old flat sampling keys included),
        type-checked and validated."""
        return build_config(values=with_old_defaults(values), source=source)

    @staticmethod
    def identity_keys() -> tuple[str, ...]:
        """Fields whose change makes a run a different run (resume refuses them)."""
        return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("identity"))


def with_old_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config values, with the value each field had before it existed: a run saved without
    `mlp` had the paper's tanh GELU in its custom DiT, one without `cfg_interval` guided every step, one
    without `shift` sampled on the plain grid, a MeanFlow run without `meanflow_interval_scale` embedded
    t - r as t."""
    old = {"mlp": "gelu", "cfg_interval": None, "shift": None, "meanflow_interval_scale": 1.0}
    return {**old, **saved}  # the saved values (sample section too) win


def _fields(cls: type = TrainConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def sample_aliases() -> dict[str, str]:
    """Flat config names of the sample section: its field name, or sample_NAME where NAME is taken
    (`steps` is the training steps, so the sampling steps are `sample_steps`)."""
    top = _fields()
    return {(f"sample_{name}" if name in top else name): name for name in _fields(SampleConfig)}


def _sample_key(key: str) -> str | None:
    """The sample-section field a flat key names: an alias above, or sample_NAME for any field."""
    if key in sample_aliases():
        return sample_aliases()[key]
    name = key[len("sample_"):] if key.startswith("sample_") else None
    return name if name in _fields(SampleConfig) else None


# ------------------------------------------------------------------------------------------------
# Values: `key=value` text and file values are checked against the field's declared type
# ------------------------------------------------------------------------------------------------

def _expects(kind: str) -> str:
    base = kind.split(" | ")[0]
    names = {"bool": "true or false", "int": "an int", "float": "a float", "str": "a string",
             "dict": "a mapping (JSON object)", "tuple": "two numbers [lo, hi]"}
    return next((text for name, text in names.items() if base.startswith(name)), base)


def parse_value(key: str, text: str, kind: str | None = None) -> Any:
    """Parse a `key=value` override according to the field's declared type."""
    kind = kind or _kind(key)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true or false, got {text!r}")
    if kind.startswith(("dict", "tuple")):
        try:
            loaded = json.loads(text if not kind.startswith("tuple") or "[" in text else f"[{text}]")
        except json.JSONDecodeError as err:
            raise ValueError(f"{key} expects {_expects(kind)} as JSON, got {text!r} ({err.msg})") from None
        return check_value(key, loaded, kind)
    for cast, name in ((int, "int"), (float, "float")):
        if kind.startswith(name):
            try:
                return cast(text)
            except ValueError:
                raise ValueError(f"{key} expects {_expects(kind)}, got {text!r}") from None
    return text


def check_value(key: str, value: Any, kind: str | None = None) -> Any:
    """A value from a YAML/JSON file (or Python) checked against the field's type: no silent coercion,
    so `unconditional: "false"` or `steps: "ten"` is an error naming the key."""
    kind = kind or _kind(key)
    base = kind.split(" | ")[0]
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict),
          "tuple": lambda v: isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)}
    if value is None and "None" in kind:
        return None
    if base.startswith("float") and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    check = next((fn for name, fn in ok.items() if base.startswith(name)), None)
    if check is not None and not check(value):
        got = f"the string {value!r}" if isinstance(value, str) else repr(value)
        raise ValueError(f"{key} expects {_expects(kind)}, got {got}")
    if base.startswith("tuple"):
        return tuple(float(x) for x in value)
    if base.startswith("float"):
        return float(value)
    return value


def _kind(key: str) -> str:
    if key.startswith("sample."):
        return str(_fields(SampleConfig)[key[len("sample."):]].type)
    return str(_fields()[key].type)


def _place(key: str) -> tuple[str, str] | None:
    """("top" | "sample", field name) for a config key, or None if unknown."""
    key = key.strip().replace("-", "_")
    if key.startswith("sample.") and key[len("sample."):] in _fields(SampleConfig):
        return "sample", key[len("sample."):]
    if _sample_key(key) is not None:
        return "sample", _sample_key(key)
    if key in _fields() and key != "sample":
        return "top", key
    return None


def _merge(target: dict[str, Any], section: dict[str, Any], values: dict[str, Any], source: str,
           text: bool = False) -> None:
    """Check `values` (file values, or `key=value` text) and put them in `target` / its sample `section`."""
    unknown = []
    for key, value in values.items():
        if key == "sample" and isinstance(value, dict) and not text:
            _merge(target, section, {f"sample.{k}": v for k, v in value.items()}, source)
            continue
        place = _place(key)
        if place is None:
            unknown.append(key)
            continue
        where, name = place
        full = f"sample.{name}" if where == "sample" else name
        try:
            typed = parse_value(key, value, _kind(full)) if text else check_value(key, value, _kind(full))
        except ValueError as err:
            raise ValueError(f"{source}: {err}" if source else str(err)) from None
        (section if where == "sample" else target)[name] = typed
    if unknown:
        raise ValueError(unknown_keys_message(unknown))


def read_config_file(config_file: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON file; a syntax error is one line naming the file and line."""
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def build_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                 assignments: list[str] | None = None, values: dict[str, Any] | None = None,
                 source: str = "") -> TrainConfig:
    """Defaults <- `values` (e.g. a saved run's config) <- YAML/JSON file <- `overrides` (typed, e.g. CLI
    flags; None = not given, 0 and False are values) <- `key=value` strings. Every value is type-checked."""
    top: dict[str, Any] = {}
    section: dict[str, Any] = {}
    _merge(top, section, values or {}, source)
    if config_file:
        loaded = read_config_file(config_file)
        if is_config_file(loaded.get("base")):  # a config file names another as an include does: from its folder
            loaded["base"] = str(Path(config_file).parent / loaded["base"])
        _merge(top, section, loaded, str(config_file))
    _merge(top, section, {k: v for k, v in (overrides or {}).items() if v is not None}, "")
    pairs = {}
    for item in assignments or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        pairs[key.strip().replace("-", "_")] = text
    _merge(top, section, pairs, "", text=True)
    config = TrainConfig(**top, sample=SampleConfig(**section))
    validate(config)
    return config


BASE_DIR = "base"  # where a base=CONFIG_FILE flow run is trained, inside the MeanFlow run's directory


def is_config_file(path: str | None) -> bool:
    """Whether `base` names a config file (a flow run to train first) rather than a run directory."""
    return path is not None and Path(path).suffix in (".yaml", ".yml", ".json")


def resume_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                  assignments: list[str] | None = None) -> TrainConfig:
    """The config of the run to resume (its newest good checkpoint's), with the given file, flags and
    `key=value` applied on top; the trainer then refuses any change to an identity field."""
    from ditkit import checkpoint as ckpt

    given = build_config(config_file, overrides, assignments)
    out = given.out
    found = ckpt.latest_checkpoint(out)
    if found is None and ckpt.list_checkpoints(Path(out) / BASE_DIR):  # stopped in a two-phase run's flow phase
        return given
    if found is None:
        raise ckpt.CheckpointError(f"--resume: no usable checkpoint in {out}/{ckpt.CHECKPOINTS}")
    saved = json.loads((found / "run.json").read_text())["train_config"]
    return build_config(config_file, {**(overrides or {}), "out": out}, assignments, values=with_old_defaults(saved),
                        source=str(found / "run.json"))


def unknown_keys_message(keys: list[str]) -> str:
    names = [n for n in _fields() if n != "sample"] + list(sample_aliases())
    return f"unknown config key(s) {', '.join(map(repr, keys))}; the keys are: {', '.join(dict.fromkeys(names))}"


def validate_meanflow(c: TrainConfig) -> None:
    """The meanflow_* settings that need another one."""
    if c.meanflow_teacher and (c.objective != "meanflow" or c.base is None):
        raise ValueError("meanflow_teacher=true takes its velocity from the base run: it needs objective=meanflow "
                         "and base=RUN_DIR (or a flow config file)")
    if c.meanflow_teacher and c.meanflow_cfg_mix > 0:
        raise ValueError("meanflow_cfg_mix mixes the model's own predictions into the target, which "
                         "meanflow_teacher=true replaces with the teacher's: set meanflow_cfg_mix=0")
    if c.meanflow_trajectories < 0 or c.meanflow_trajectory_steps < 1:
        raise ValueError(f"meanflow_trajectories must be >= 0 and meanflow_trajectory_steps >= 1, got "
                         f"{c.meanflow_trajectories}, {c.meanflow_trajectory_steps}")
    if c.meanflow_trajectories and not c.meanflow_teacher:
        raise ValueError("meanflow_trajectories are the teacher's ODE solutions: set meanflow_teacher=true too")
    if not 0 < c.meanflow_trajectory_share <= 1:
        raise ValueError(f"meanflow_trajectory_share must be in (0, 1], got {c.meanflow_trajectory_share}")
    check_interval("meanflow_cfg_interval", c.meanflow_cfg_interval)


def check_interval(key: str, lo_hi: tuple[float, float] | None) -> None:
    """A guidance interval [lo, hi] of times in [0, 1] (None: every time)."""
    if lo_hi is not None and not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
        raise ValueError(f"{key} must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")


def validate(c: TrainConfig) -> None:
    """Reject settings that cannot work, before anything is built or written."""
    choices = {"objective": ("flow", "ddpm", "meanflow"), "precision": ("fp32", "bf16", "fp16"),
               "timestep_sampling": ("uniform", "logit_normal"),
               "attention": ("full", "factorized", "windowed"), "mlp": MLPS}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {getattr(c, key)!r}")
    positive = ("steps", "batch_size", "save_every", "keep_last", "log_every", "samples_per_class", "patch_t")
    for key in positive:
        if getattr(c, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(c, key)}")
    if c.sample.steps is not None and c.sample.steps < 1:
        raise ValueError(f"sample_steps must be >= 1, got {c.sample.steps}")
    for key in ("minutes", "base_minutes", "lr", "flow_time_scale", "meanflow_interval_scale"):
        if getattr(c, key) is not None and getattr(c, key) <= 0:
            raise ValueError(f"{key} must be > 0, got {getattr(c, key)}")
    if c.flow_time_scale != FLOW_TIME_SCALE and c.objective == "ddpm":
        raise ValueError("flow_time_scale is for objective=flow or meanflow (ddpm's model sees its step number)")
    if not 0 <= c.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {c.ema_decay}")
    if c.text_model not in ("mmdit", "pixart"):
        raise ValueError(f"text_model must be mmdit or pixart, got {c.text_model!r}")
    if is_config_file(c.base):
        if c.objective != "meanflow" or c.control is not None:
            raise ValueError(f"base={c.base} is a config file: only objective=meanflow trains a base run first; "
                             f"give a run directory instead")
        if not Path(c.base).is_file():
            raise FileNotFoundError(f"base={c.base}: config file not found (a path from the current directory)")
    elif c.base_minutes is not None and c.base is None:
        raise ValueError("base_minutes is the time budget of a base=CONFIG_FILE run; without one it does nothing")
    validate_meanflow(c)
    if c.control is None and c.base is not None and c.objective != "meanflow":
        raise ValueError("base=RUN_DIR goes with control=edges|lowres, or with objective=meanflow (fine-tuning)")
    if c.control is not None and c.base is None:
        raise ValueError("control training needs both control=edges|lowres and base=RUN_DIR (the frozen model)")
    check_interval("sample_cfg_interval", c.sample.cfg_interval)
    for key in ("shift", "apg_norm"):
        if getattr(c.sample, key) is not None and getattr(c.sample, key) <= 0:
            raise ValueError(f"sample_{key} must be > 0, got {getattr(c.sample, key)}")
    if c.sample_guide_step is not None and c.sample_guide_step < 1:
        raise ValueError(f"sample_guide_step must be >= 1 (or none), got {c.sample_guide_step}")
    if c.sample.cache is not None and not 0 <= c.sample.cache <= 1:
        raise ValueError(f"sample_cache must be in [0, 1] (0: never reuse), got {c.sample.cache}")
    if c.sample.precision not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"sample_precision must be fp32, bf16 or fp16, got {c.sample.precision!r}")
    if c.control is not None:
        check_condition(c.control)
        if c.fsdp:
            raise ValueError("control training runs with DDP or one process, not fsdp=true")
