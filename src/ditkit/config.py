"""The training configuration: one dataclass per concern (data, the model of each kind, objective,
optimisation, output, sampling), joined into `TrainConfig`; loadable from YAML/JSON and `key=value`.

Every field but the sampling ones has a flat name (`c.hidden_size`, `hidden_size=256`). The one nested
section is `sample`: its fields are the keyword arguments of `ditkit.sample()` and are passed to it as they
are (the run's sample grid, and `Pipeline.generate` when an argument is None). A file writes it as a
`sample:` mapping, `key=value` as `sample.steps=20`; a sampling key at the top level is an error that names
the nested key.

Fields made with `identity(...)` define the run: resuming refuses to change them.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from ditkit.data import VIDEO_SOURCES
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
    mlp: str = identity("gelu_erf")     # custom only: gelu (the paper's tanh form) | gelu_erf (the exact erf
                                        # form, cheaper on a CPU) | swiglu; zoo models keep the paper's unless
                                        # model_args says otherwise
    class_dropout_prob: float = identity(0.1)
    model_args: dict[str, Any] = identity(default_factory=dict)


@dataclass
class VideoConfig:
    """Video data builds a VideoDiT from the model fields and these (a window goes in model_args)."""
    patch_t: int = identity(1)                   # frames per spacetime patch
    attention: str = identity("full")            # "full" | "factorized" (spatial/temporal) | "windowed"
    init_image: str | None = identity(None)      # an image DiT run or checkpoint to start from (its spatial
    #                                              weights; temporal blocks start as the identity): docs/video.md
    context_share: float = identity(0.0)         # frame conditioning: the share of training clips whose first
    #                                              context_frames frames are given clean (t = 0, no loss), for
    #                                              image-to-video and longer clips by extension (docs/video.md)
    context_frames: int = identity(1)            # the most frames given in those clips (each draws 1..this many
    #                                              whole tubelets); a multiple of patch_t; extension keeps this many
    image_model: str | None = identity(None)     # an image run that draws each clip's first frame, which this video
    #                                              model continues (Emu Video's factorisation; needs context_share);
    #                                              a config file is trained first, into OUT/image
    image_model_minutes: float | None = identity(None)  # image_model=CONFIG_FILE: that run's time budget
    sample_frames: int | None = None             # frames of a sampled clip when none are asked for (None: the
    #                                              trained window); more than `frames` are drawn by extension


@dataclass
class ControlConfig:
    """Structure control: only a ControlNet-style branch trains, on a frozen base run (model fields unused)."""
    control: str | None = identity(None)         # None, or the condition image: "edges" | "lowres"
    base: str | None = identity(None)            # the base run or checkpoint directory (needed with control);
    #                                              objective=meanflow: or a flow config file, trained first
    base_minutes: float | None = identity(None)  # base=CONFIG_FILE: that flow run's time budget (None: its own)
    control_blocks: int | None = identity(None)  # blocks copied into the branch; None: half the base's depth


@dataclass
class FinetuneConfig:
    """Fine-tuning from a trained model (docs/fine-tuning.md): in full, or a LoRA adapter on the frozen base."""
    init: str | None = identity(None)            # start from: a run or checkpoint directory, a diffusers directory,
    #                                              an original DiT .pt; or a config file, trained first into OUT/base
    init_minutes: float | None = identity(None)  # init=CONFIG_FILE: that run's time budget (None: its own)
    classes: str | None = identity(None)         # the label set, comma-separated names (None: the base's classes,
    #                                              then the data's new ones); shared names keep their rows
    new_class_init: str = identity("null")       # a new class's row starts as the base's "null" row or the "mean"
    replay_per_class: int = identity(0)          # per base class (text runs: training caption) the data lacks:
    #                                              samples drawn from the base and trained on (prior preservation;
    #                                              cached in OUT/replay.safetensors)
    lora_rank: int | None = identity(None)       # a LoRA adapter of this rank on the frozen base (None: in full)
    lora_alpha: float | None = identity(None)    # LoRA alpha (None: the rank, a scale of 1)
    lora_targets: str | None = identity(None)    # comma-separated groups (attention, mlp, modulation) or module
    #                                              names (attn.qkv, cross_attn.kv, ...); None: attention,mlp


@dataclass
class TextConfig:
    """Text-to-image: captioned data (e.g. "shapes") trains a text model on its encoded captions."""
    text_model: str = identity("mmdit")          # "mmdit" (SD3 joint attention) | "pixart" (adaLN-single + cross-attn)
    text_encoder: str = identity("minilm")       # "minilm" | "bytes" | a local encoder directory (see ditkit.text)
    text_max_length: int | None = identity(None)  # tokens kept per caption; None: the encoder's default


@dataclass
class ObjectiveConfig:
    objective: str = identity("flow")            # "flow" (rectified flow), "ddpm" (Gaussian, learned sigma),
    #                                              "meanflow" (one-step, the JVP identity; base= starts from a flow
    #                                              run) or "distill" (one-step, the base flow run's trajectories)
    timestep_sampling: str = identity("logit_normal")  # flow only: "uniform" | "logit_normal"
    velocity_cosine_weight: float = identity(0.0)  # flow only: weight of the 1 - cos(v, target) loss term
    flow_time_scale: float = identity(FLOW_TIME_SCALE)  # flow/meanflow/distill: the model is fed t x this; 1000 is
    #                                              DiT's step range, 10 keeps it smooth in t, as MeanFlow's JVP needs
    meanflow_unequal: float = identity(0.25)     # meanflow: share of training pairs with r < t (the rest r = t)
    meanflow_cfg: float = identity(1.0)          # meanflow: guidance folded into the target (sample with cfg 1)
    meanflow_adaptive_p: float = identity(1.0)   # meanflow: loss weight 1 / (|delta|^2 + 1e-3)^p; 0: plain MSE
    meanflow_interval_scale: float = identity(0.01)  # meanflow/distill: the interval embedder sees (t - r) x
    #                                              flow_time_scale
    #                                              x this: smooth in t - r, so the JVP's du/dt stays small
    meanflow_teacher: bool = identity(False)     # meanflow with base=: the base's own (guided) velocity is the
    #                                              target's v instead of noise - x0 (same mean, far less variance)
    meanflow_cfg_interval: tuple[float, float] | None = identity(None)  # meanflow: the times (lo, hi) where
    #                                              meanflow_cfg applies (None: all; outside it w = 1)
    meanflow_loss: str = identity("u")           # meanflow: "u" (the paper's loss on the average velocity) or "v"
    #                                              (iMF's: on the instantaneous velocity, the target free of the model)
    meanflow_cfg_range: tuple[float, float] | None = identity(None)  # meanflow: guidance scales (lo, hi) drawn
    #                                              per row and fed to the model (a guidance embedder), so
    #                                              `ditkit sample --cfg W` steers one model; meanflow_cfg stays 1
    distill_trajectories: int = identity(2048)   # distill: the base run's guided ODE solved from this many noises
    #                                              before training (inside `minutes`)
    distill_heun_steps: int = identity(8)        # distill: Heun steps of each of those solves
    distill_cfg: float = identity(1.0)           # distill: the base run's CFG scale in those solves
    distill_cfg_interval: tuple[float, float] | None = identity(None)  # distill: the times (lo, hi) where
    #                                              distill_cfg applies (None: all; outside it w = 1)


@dataclass
class OptimConfig:
    steps: int = 2600                   # a resumed run may be extended (a cosine is stretched to the new total)
    minutes: float | None = None        # wall-clock budget; training stops at whichever comes first, and a
                                        # decaying lr is fitted to end with the budget (trainer.fit_schedule)
    batch_size: int = identity(32)      # global batch (split across processes)
    lr: float = identity(3.5e-3)        # peak, after warm-up (benchmarks/recipe_ablation.py compares recipes)
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
    cfg_scale: float = 2.5              # classifier-free guidance scale (1: none)
    cfg_interval: tuple[float, float] | None = (0.0, 0.75)  # (lo, hi) of the trajectory where guidance applies
                                        # (1 = noise): none at the noisiest quarter keeps diversity
    guide_scale: float | None = None    # autoguidance weight on top of CFG, by the guide model (None: none)
    guide_unconditional: bool = False   # call the guide model with the null label
    shift: float | None = 1.5           # time shift of the step grid (None: plain grid; 1.5: more steps at high
                                        # noise, a lower FD at the same accuracy)
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
class TrainConfig(OutputConfig, OptimConfig, ObjectiveConfig, FinetuneConfig, TextConfig, ControlConfig,
                  VideoConfig, ModelConfig, DataConfig):
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sample, dict):  # TrainConfig(**saved_dict)
            self.sample = SampleConfig(**self.sample)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from saved or loaded values (e.g. run.json's train_config), type-checked and validated."""
        return build_config(values=values, source=source)

    @staticmethod
    def identity_keys() -> tuple[str, ...]:
        """Fields whose change makes a run a different run (resume refuses them)."""
        return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("identity"))


def _fields(cls: type = TrainConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def config_keys() -> list[str]:
    """Every key a config may set: the top-level fields, then the sampling section's as sample.NAME."""
    return [n for n in _fields() if n != "sample"] + [f"sample.{n}" for n in _fields(SampleConfig)]


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
        if key == "sample":
            raise ValueError(f"{source + ': ' if source else ''}sample is the sampling section: a mapping in a "
                             f"file (sample: {{steps: 20}}), or one key at a time: sample.steps=20")
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
        raise ValueError(f"{source + ': ' if source else ''}{unknown_keys_message(unknown)}")


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
    _merge(top, section, saved_one_step_keys(values or {}), source)
    if config_file:
        loaded = read_config_file(config_file)
        for key in ("base", "init", "image_model"):  # a config file names another as an include does: from its folder
            if is_config_file(loaded.get(key)):
                loaded[key] = str(Path(config_file).parent / loaded[key])
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


BASE_DIR = "base"  # where a base=CONFIG_FILE flow run is trained, inside the one-step run's directory
ONE_STEP = ("meanflow", "distill")  # the objectives of a two-time (average-velocity) model, sampled in one step


def is_config_file(path: Any) -> bool:
    """Whether `base` (or `init`, `image_model`) names a config file (a run to train first) rather than a run
    directory; a value of another type is neither (the type check names it)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix in (".yaml", ".yml", ".json")


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
    return build_config(config_file, {**(overrides or {}), "out": out}, assignments, values=saved,
                        source=str(found / "run.json"))


def suggest_key(key: str) -> str | None:
    """The key a wrong one probably meant: the nested name of a sampling key given at the top level
    (`cfg_scale` or `sample_cfg_scale` -> sample.cfg_scale), else the closest key by spelling, else None."""
    bare = key[len("sample_"):] if key.startswith("sample_") else key
    if bare in _fields(SampleConfig):
        return f"sample.{bare}"
    if key.startswith("sample."):  # spelt against the section's names only, not the shared prefix
        close = difflib.get_close_matches(key[len("sample."):], list(_fields(SampleConfig)), n=1, cutoff=0.6)
        return f"sample.{close[0]}" if close else None
    close = difflib.get_close_matches(key, config_keys(), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_keys_message(keys: list[str]) -> str:
    """One line naming each unknown key with its likely meaning; the full list only when a key has none."""
    hints = {key: suggest_key(key) for key in keys}
    if len(keys) == 1 and hints[keys[0]]:
        return f"unknown config key {keys[0]!r}: did you mean {hints[keys[0]]}?"
    named = ", ".join(f"{key!r} (did you mean {hint}?)" if hint else repr(key) for key, hint in hints.items())
    text = f"unknown config key{'s' if len(keys) > 1 else ''} {named}"
    if None in hints.values():
        text += f"; the keys are: {', '.join(config_keys())}"
    return text


def validate_one_step(c: TrainConfig) -> None:
    """The meanflow_* and distill_* settings that need another one."""
    if c.meanflow_teacher and (c.objective != "meanflow" or c.base is None):
        raise ValueError("meanflow_teacher=true takes its velocity from the base run: it needs objective=meanflow "
                         "and base=RUN_DIR (or a flow config file)")
    check_interval("meanflow_cfg_interval", c.meanflow_cfg_interval)
    check_interval("distill_cfg_interval", c.distill_cfg_interval)
    if c.meanflow_cfg < 1 or c.distill_cfg < 1:
        raise ValueError(f"meanflow_cfg and distill_cfg must be >= 1 (1: no guidance), got {c.meanflow_cfg}, "
                         f"{c.distill_cfg}")
    if c.meanflow_loss not in ("u", "v"):
        raise ValueError(f"meanflow_loss must be u (MeanFlow's) or v (iMF's), got {c.meanflow_loss!r}")
    if c.meanflow_cfg_range is not None:
        lo_hi = c.meanflow_cfg_range
        if c.objective != "meanflow":
            raise ValueError("meanflow_cfg_range is for objective=meanflow")
        if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"meanflow_cfg_range must be [lo, hi] with 1 <= lo <= hi, got {list(lo_hi)}")
        if c.meanflow_cfg != 1 or c.meanflow_teacher:
            raise ValueError("meanflow_cfg_range draws each row's guidance scale: leave meanflow_cfg at 1 and "
                             "meanflow_teacher false")
        if c.class_dropout_prob == 0 or c.unconditional:
            raise ValueError("meanflow_cfg_range guides against the null label, which a model trained with "
                             "class_dropout_prob=0 or unconditional=true lacks")
        if c.sample.cfg_interval is not None:
            raise ValueError("meanflow_cfg_range makes the CFG scale a model input, used on every step: set "
                             "sample.cfg_interval: null")
    if c.objective != "distill":
        return
    if c.base is None:
        raise ValueError("objective=distill distils a flow run's trajectories: set base=RUN_DIR (a flow run) or "
                         "base=CONFIG_FILE (a flow config, trained first)")
    if c.distill_trajectories < 1 or c.distill_heun_steps < 1:
        raise ValueError(f"distill_trajectories and distill_heun_steps must be >= 1, got "
                         f"{c.distill_trajectories}, {c.distill_heun_steps}")
    if c.distill_cfg > 1 and (c.class_dropout_prob == 0 or c.unconditional):
        raise ValueError(f"distill_cfg={c.distill_cfg:g} guides the base run with its null label, which a model "
                         f"trained with class_dropout_prob=0 or unconditional=true lacks: set distill_cfg=1")


REMOVED_ONE_STEP_KEYS = ("meanflow_cfg_mix", "meanflow_trajectories", "meanflow_trajectory_share",
                         "meanflow_trajectory_steps")


def saved_one_step_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config values in today's one-step keys. A MeanFlow run that regressed its teacher's
    trajectories on every row (meanflow_trajectories K > 0, meanflow_trajectory_share 1) is the distill
    objective: distill_trajectories K, distill_heun_steps = meanflow_trajectory_steps, and the teacher's
    guidance meanflow_cfg / meanflow_cfg_interval as distill_cfg / distill_cfg_interval. Other runs drop those
    keys at their neutral values; a saved value that no objective trains with is refused by name."""
    if not any(k in saved for k in REMOVED_ONE_STEP_KEYS):
        return saved
    values = {k: v for k, v in saved.items() if k not in REMOVED_ONE_STEP_KEYS}
    if saved.get("meanflow_cfg_mix", 0.0) != 0.0:
        raise ValueError(f"this run was trained with meanflow_cfg_mix={saved['meanflow_cfg_mix']}, a MeanFlow "
                         f"option ditkit does not train with: sample it (Pipeline.load), or train a new run")
    if saved.get("objective") != "meanflow" or not saved.get("meanflow_trajectories"):
        return values
    share = saved.get("meanflow_trajectory_share", 0.5)
    if share != 1.0 or saved.get("meanflow_adaptive_p", 1.0) != 1.0:
        raise ValueError(f"this run mixed MeanFlow's identity with trajectory distillation (meanflow_trajectory_share"
                         f"={share}, meanflow_adaptive_p={saved.get('meanflow_adaptive_p', 1.0)}), which no "
                         f"objective trains: sample it (Pipeline.load), or train a new run with objective=distill")
    guidance = {"distill_cfg": values.pop("meanflow_cfg", 1.0),
                "distill_cfg_interval": values.pop("meanflow_cfg_interval", None)}
    values.update(objective="distill", distill_trajectories=saved["meanflow_trajectories"],
                  distill_heun_steps=saved.get("meanflow_trajectory_steps", 8), meanflow_teacher=False, **guidance)
    return values


def check_interval(key: str, lo_hi: tuple[float, float] | None) -> None:
    """A guidance interval [lo, hi] of times in [0, 1] (None: every time)."""
    if lo_hi is not None and not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
        raise ValueError(f"{key} must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")


def validate_image_model(c: TrainConfig) -> None:
    """image_model: a video run trained to continue given first frames (context_share, whole one-frame tubelets),
    and an image run directory or a config file to train first."""
    if c.image_model is None:
        if c.image_model_minutes is not None:
            raise ValueError("image_model_minutes is the time budget of an image_model=CONFIG_FILE run; without one "
                             "it does nothing")
        return
    if c.data not in VIDEO_SOURCES or not c.context_share or c.patch_t != 1:
        raise ValueError(f"image_model draws first frames that the video model continues: it needs video data, "
                         f"patch_t=1 (a tubelet of one frame) and frame conditioning (context_share > 0); got "
                         f"data={c.data!r}, patch_t={c.patch_t}, context_share={c.context_share}")
    if is_config_file(c.image_model):
        if not Path(c.image_model).is_file():
            raise FileNotFoundError(f"image_model={c.image_model}: config file not found")
    elif not Path(c.image_model).is_dir():
        raise FileNotFoundError(f"image_model={c.image_model}: no such run directory or config file")


def validate_video(c: TrainConfig) -> None:
    """The video-only settings: init_image needs clip data and an existing run or checkpoint directory."""
    validate_image_model(c)
    if c.init_image is None:
        return
    if c.data not in VIDEO_SOURCES or c.control is not None:
        raise ValueError(f"init_image starts a video model from an image run: it needs video data (data: "
                         f"{' or '.join(VIDEO_SOURCES)}) and no control; got data={c.data!r}"
                         + (f", control={c.control}" if c.control else ""))
    if not Path(c.init_image).is_dir():
        raise FileNotFoundError(f"init_image={c.init_image}: no such run or checkpoint directory (a path from the "
                                f"current directory)")


def validate_context(c: TrainConfig) -> None:
    """Frame conditioning (context_share, context_frames): flow-matching video runs, whole tubelets, and
    frames left to generate."""
    if not 0.0 <= c.context_share <= 1.0:
        raise ValueError(f"context_share must be in [0, 1] (the share of training clips with given first frames), "
                         f"got {c.context_share}")
    if c.context_frames < 1:
        raise ValueError(f"context_frames must be >= 1, got {c.context_frames}")
    if c.sample_frames is not None and (c.data not in VIDEO_SOURCES or c.sample_frames < 1):
        raise ValueError(f"sample_frames is a video run's default clip length: it needs video data and a value "
                         f">= 1; got data={c.data!r}, sample_frames={c.sample_frames}")
    if not c.context_share:
        return
    if c.data not in VIDEO_SOURCES or c.objective != "flow":
        raise ValueError(f"context_share trains frame conditioning of a video model: it needs video data (data: "
                         f"{' or '.join(VIDEO_SOURCES)}) and objective=flow; got data={c.data!r}, "
                         f"objective={c.objective!r}")
    if c.context_frames % c.patch_t:
        raise ValueError(f"context_frames={c.context_frames} with patch_t={c.patch_t}: a tubelet of patch_t frames "
                         f"has one time, so the given frames must fill whole tubelets; set context_frames to a "
                         f"multiple of {c.patch_t}")
    if c.frames is not None and c.context_frames >= c.frames:
        raise ValueError(f"context_frames={c.context_frames} leaves nothing to generate in clips of frames="
                         f"{c.frames}: give fewer frames")


def class_list(text: str | None) -> list[str] | None:
    """The `classes` key as names (comma-separated; duplicates refused)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice or not names:
        raise ValueError(f"classes={text!r} " + (f"lists {', '.join(twice)} more than once: give each class once"
                                                   if twice else "names no class"))
    return names


def validate_finetune(c: TrainConfig) -> None:
    """init, the class list and the LoRA settings."""
    class_list(c.classes)
    if c.lora_rank is not None and c.lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1 (the adapter's rank), got {c.lora_rank}")
    if c.new_class_init not in ("null", "mean"):
        raise ValueError(f"new_class_init must be null or mean, got {c.new_class_init!r}")
    if c.replay_per_class < 0:
        raise ValueError(f"replay_per_class must be >= 0, got {c.replay_per_class}")
    if c.init is None:
        needs = [k for k in ("lora_rank", "lora_alpha", "lora_targets", "classes", "init_minutes")
                 if getattr(c, k) is not None] + (["replay_per_class"] if c.replay_per_class else [])
        if needs:
            raise ValueError(f"{', '.join(needs)} fine-tune a trained model: set init=RUN (a run, checkpoint, "
                             f"diffusers directory or DiT .pt file)")
        return
    if c.control is not None or c.objective in ONE_STEP or c.init_image is not None:
        raise ValueError("init= fine-tunes an image, video or text model: it does not combine with control, "
                         "init_image or a one-step objective")
    if is_config_file(c.init):
        if not Path(c.init).is_file():
            raise FileNotFoundError(f"init={c.init}: config file not found (a path from the current directory)")
    elif not Path(c.init).exists():
        raise FileNotFoundError(f"init={c.init}: no such run, checkpoint directory, diffusers directory or .pt file")
    elif c.init_minutes is not None:
        raise ValueError("init_minutes is the time budget of an init=CONFIG_FILE run; without one it does nothing")
    if c.lora_rank is None and (c.lora_alpha is not None or c.lora_targets is not None):
        raise ValueError("lora_alpha and lora_targets shape a LoRA adapter: set lora_rank too")


def validate(c: TrainConfig) -> None:
    """Reject settings that cannot work, before anything is built or written."""
    choices = {"objective": ("flow", "ddpm", *ONE_STEP), "precision": ("fp32", "bf16", "fp16"),
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
        raise ValueError(f"sample.steps must be >= 1, got {c.sample.steps}")
    for key in ("minutes", "base_minutes", "init_minutes", "image_model_minutes", "lr", "flow_time_scale",
                "meanflow_interval_scale"):
        if getattr(c, key) is not None and getattr(c, key) <= 0:
            raise ValueError(f"{key} must be > 0, got {getattr(c, key)}")
    if c.flow_time_scale != FLOW_TIME_SCALE and c.objective == "ddpm":
        raise ValueError("flow_time_scale is for objective=flow, meanflow or distill (ddpm's model sees its step "
                         "number)")
    if not 0 <= c.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {c.ema_decay}")
    if c.text_model not in ("mmdit", "pixart"):
        raise ValueError(f"text_model must be mmdit or pixart, got {c.text_model!r}")
    if is_config_file(c.base):
        if c.objective not in ONE_STEP or c.control is not None:
            raise ValueError(f"base={c.base} is a config file: only objective=meanflow or distill trains a base "
                             f"run first; give a run directory instead")
        if not Path(c.base).is_file():
            raise FileNotFoundError(f"base={c.base}: config file not found (a path from the current directory)")
    elif c.base_minutes is not None and c.base is None:
        raise ValueError("base_minutes is the time budget of a base=CONFIG_FILE run; without one it does nothing")
    validate_one_step(c)
    validate_finetune(c)
    validate_video(c)
    validate_context(c)
    if c.control is None and c.base is not None and c.objective not in ONE_STEP:
        raise ValueError("base=RUN_DIR goes with control=edges|lowres, or with objective=meanflow or distill (a "
                         "one-step model from a flow run)")
    if c.control is not None and c.base is None:
        raise ValueError("control training needs both control=edges|lowres and base=RUN_DIR (the frozen model)")
    check_interval("sample.cfg_interval", c.sample.cfg_interval)
    for key in ("shift", "apg_norm"):
        if getattr(c.sample, key) is not None and getattr(c.sample, key) <= 0:
            raise ValueError(f"sample.{key} must be > 0, got {getattr(c.sample, key)}")
    if c.sample_guide_step is not None and c.sample_guide_step < 1:
        raise ValueError(f"sample_guide_step must be >= 1 (or none), got {c.sample_guide_step}")
    if c.sample.cache is not None and not 0 <= c.sample.cache <= 1:
        raise ValueError(f"sample.cache must be in [0, 1] (0: never reuse), got {c.sample.cache}")
    if c.sample.precision not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"sample.precision must be fp32, bf16 or fp16, got {c.sample.precision!r}")
    if c.control is not None:
        check_condition(c.control)
        if c.fsdp:
            raise ValueError("control training runs with DDP or one process, not fsdp=true")
