"""Fine-tuned runs at inference: the base a run started from (a ditkit run or checkpoint, a diffusers
directory, a released DiT .pt), the label table remapped to the run's classes, and LoRA adapters (peft) on
top, with a scale, several at once, or fused into the weights.

A LoRA run's checkpoints hold only what trained (the adapter's A/B matrices and the label rows of new
classes); its run.json records the base by path and sha256, and `compose` rebuilds the model from both. The
run also writes its adapter in peft's own format (OUT/adapter: adapter_model.safetensors, adapter_config.json),
which `peft.PeftModel.from_pretrained(base_module(RUN), OUT/adapter)` loads. Needs `ditkit[lora]` (peft).
Importing this module imports no training code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ditkit import checkpoint as ckpt
from ditkit.checksums import CheckpointError, sha256, write_checksums
from ditkit.extras import require
from ditkit.io import write_json_atomic

ADAPTER_DIR = "adapter"   # OUT/adapter: the run's adapter in peft's format
RECORD = "ditkit.json"    # beside it: the base's identity and the class mapping
PEFT_PREFIX = "base_model.model."  # how peft's save_pretrained names the keys of a wrapped module
OWN = "default"           # the adapter name of a run's own adapter
GROUPS = {"attention": ("qkv", "proj", "q", "kv"), "mlp": ("fc1", "fc2", "w12", "w3"),
          "modulation": ("adaLN_modulation.1", "t_block.1")}  # per block; PixArt's adaLN-single is shared
DEFAULT_GROUPS = ("attention", "mlp")
NEW_CLASS_INITS = ("null", "mean")


def require_peft(what: str = "LoRA adapters") -> None:
    require("lora", "peft", what=what)


# ------------------------------------------------------------------------------------------------
# The base: any checkpoint a fine-tune may start from
# ------------------------------------------------------------------------------------------------

def is_diffusers_dir(path: Path) -> bool:
    config = path / "config.json"
    return path.is_dir() and config.is_file() and "_class_name" in json.loads(config.read_text())


def load_source(source: str | os.PathLike, num_heads: int | None = None) -> tuple[nn.Module, dict[str, Any],
                                                                                 dict[str, Any]]:
    """(model in eval mode on the CPU, identity {path, sha256, weights}, run facts {objective, class_names})
    of a ditkit run or checkpoint directory (its EMA weights), a diffusers DiT directory, or a released or
    trained original DiT .pt file (read with the safe loader; `num_heads` where its size is no zoo model's)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"init={source}: no such run, checkpoint directory, diffusers directory or .pt file")
    if path.is_file():
        from ditkit.interop.official import load_official

        model = load_official(path, num_heads=num_heads)
        facts = {"objective": "ddpm", "class_names": [str(k) for k in range(model.num_classes)]}
        return model, {"path": str(path.resolve()), "sha256": sha256(path), "weights": path.name}, facts
    if is_diffusers_dir(path):
        from ditkit.interop.diffusers import _require_diffusers, from_diffusers

        model = from_diffusers(_require_diffusers().from_pretrained(path))
        weights = next(iter(sorted(path.glob("*.safetensors"))), None)
        if weights is None:
            raise FileNotFoundError(f"init={source}: a diffusers directory without a .safetensors weights file")
        facts = {"objective": "ddpm", "class_names": [str(k) for k in range(model.num_classes)]}
        return model, {"path": str(path.resolve()), "sha256": sha256(weights), "weights": weights.name}, facts
    from ditkit.kinds import saved_kind

    found = ckpt.resolve_checkpoint(path)
    info = ckpt.read_json(found / "run.json") if (found / "run.json").is_file() else {"objective": "ddpm"}
    if "adapter" in info:
        raise ValueError(f"init={source} is itself an adapter run: merge it first (ditkit merge {source} --out DIR) "
                         f"and start from DIR")
    model_type = ckpt.read_json(found / "config.json").get("model_type")
    record = ckpt.weights_record(found)
    model = saved_kind(model_type).load_model(found, record["weights"], model_type, info, "cpu")
    num = int(info.get("num_classes", getattr(model, "num_classes", 0) or 0))
    facts = {"objective": info.get("objective", "ddpm"), "class_names": info.get("class_names")
             or [str(k) for k in range(num)], "info": info}
    return model, record, facts


def check_base(record: dict[str, Any]) -> Path:
    """The base file or directory an adapter run recorded, after checking that it is there and unchanged."""
    path = Path(record["path"])
    weights = path if path.is_file() else path / record["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"this adapter's base model is missing: the run recorded {weights}, which is not "
                                f"there (restore it, or train the adapter again on the new base)")
    now = sha256(weights)
    if now != record["sha256"]:
        raise CheckpointError(f"this adapter was trained on a base with sha256 {record['sha256'][:16]}..., but "
                              f"{weights} now has sha256 {now[:16]}...: it is another model (restore the original "
                              f"base or train the adapter again)")
    return path


# ------------------------------------------------------------------------------------------------
# Classes: a new label set by name; shared classes keep their rows, the null row moves to the end
# ------------------------------------------------------------------------------------------------

def label_table(model: nn.Module) -> nn.Embedding | None:
    """The class-embedding table of a class-conditional model (None: a text model)."""
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    return table if isinstance(table, nn.Embedding) else None


def check_classes(names: list[str], what: str) -> None:
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise ValueError(f"{what} lists class {seen[0]!r} twice: give each class once")


def class_mapping(base: list[str], new: list[str]) -> list[int | None]:
    """For each class of the new label set, its row in the base's table (None: a new class)."""
    check_classes(new, "the class list")
    return [base.index(name) if name in base else None for name in new]


@torch.no_grad()
def remapped_rows(base_rows: Tensor, base_classes: int, mapping: list[int | None], null: bool,
                  new_init: str = "null") -> Tensor:
    """The new label table: row i is the base's row mapping[i] (bit for bit), a new class starts from the
    base's null row ("null") or the mean of its class rows ("mean"); the null row, if any, comes last."""
    if new_init not in NEW_CLASS_INITS:
        raise ValueError(f"new_class_init must be one of {', '.join(NEW_CLASS_INITS)}, got {new_init!r}")
    has_null = base_rows.shape[0] > base_classes
    if new_init == "null" and not has_null:
        new_init = "mean"  # a base trained without label dropout has no null row to start from
    start = base_rows[base_classes] if new_init == "null" else base_rows[:base_classes].mean(0)
    rows = [base_rows[k] if k is not None else start.clone() for k in mapping]
    if null:
        rows.append(base_rows[base_classes] if has_null else base_rows[:base_classes].mean(0))
    return torch.stack(rows)


def load_base_into(model: nn.Module, base: nn.Module, mapping: list[int | None] | None,
                   new_init: str, source: str) -> None:
    """Copy `base`'s weights into `model` (built for the new run): the same architecture, field by field;
    the label table remapped (`mapping`); positions of another image size are the model's own."""
    ours, theirs = getattr(model, "config", {}), getattr(base, "config", {})
    skip = {"num_classes", "input_size", "class_dropout_prob", "caption_dropout_prob", "pos_embed_max_size"}
    wrong = [k for k in ours if k in theirs and k not in skip and ours[k] != theirs[k]]
    if type(model).__name__ != type(base).__name__ or wrong:
        what = ", ".join(f"{k}: the base has {theirs[k]!r}, this config {ours[k]!r}" for k in wrong) or \
            f"the base is a {type(base).__name__}, this config builds a {type(model).__name__}"
        raise ValueError(f"init={source} has another architecture than this config ({what}): set the config's "
                         f"model fields to the base's")
    state, own = dict(base.state_dict()), model.state_dict()
    key = "y_embedder.embedding_table.weight"
    if mapping is not None and key in state:
        state[key] = remapped_rows(state[key], base.num_classes, mapping, own[key].shape[0] > len(mapping),
                                   new_init)
    for name in [k for k in state if k in own and own[k].shape != state[k].shape and k.endswith("pos_embed")]:
        state[name] = own[name]  # another image size: the fixed sin-cos positions of the new grid
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Adapters: targets per model kind, peft's config, saving and loading
# ------------------------------------------------------------------------------------------------

def linear_names(model: nn.Module) -> dict[str, str]:
    """{full name: short name without blocks.N.} of every Linear inside the transformer blocks (and PixArt's
    shared adaLN-single)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("blocks.") or name == "t_block.1"):
            out[name] = re.sub(r"^blocks\.\d+\.", "", name)
    return out


def lora_targets(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """The full module names an adapter wraps: groups (attention, mlp, modulation) or short names such as
    attn.qkv or cross_attn.kv; default: attention and MLP."""
    names = linear_names(model)

    def matches(target: str) -> set[str]:
        suffixes = GROUPS.get(target, (target,))
        return {n for n, short in names.items() if any(short == s or short.endswith("." + s) for s in suffixes)}

    chosen: set[str] = set()
    for target in targets or DEFAULT_GROUPS:
        hit = matches(target)
        if not hit:
            groups = [g for g in GROUPS if matches(g)]
            raise ValueError(f"unknown LoRA target {target!r} for a {type(model).__name__}: the valid ones are the "
                             f"groups {', '.join(groups)} or the modules {', '.join(sorted(set(names.values())))}")
        chosen |= hit
    return sorted(chosen, key=list(names).index)


def lora_config(rank: int, alpha: float | None, modules: list[str], token_rows: list[int] | None = None) -> Any:
    """peft's LoraConfig: rank, alpha (default: the rank, scale 1), the exact modules, and the label rows
    trained in full (new classes)."""
    require_peft()
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    tokens = {"y_embedder.embedding_table": list(token_rows)} if token_rows else None
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(modules),
                      trainable_token_indices=tokens, init_lora_weights=True)


def add_adapter(model: nn.Module, config: Any, name: str = OWN) -> nn.Module:
    """`model` with the adapter injected in place (peft); only the adapter's tensors train."""
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # a second adapter is meant: peft's "multiple adapters" caution is noise here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        return inject_adapter_in_model(config, model, adapter_name=name)


def config_from_record(record: dict[str, Any]) -> Any:
    return lora_config(record["rank"], record["alpha"], record["modules"], record.get("token_rows"))


def peft_names(state: dict[str, Tensor], name: str = OWN) -> dict[str, Tensor]:
    """A module's adapter tensors under peft's saved names (the adapter name removed, the wrapper's prefix
    added)."""
    return {PEFT_PREFIX + rename(k, name, ""): v for k, v in state.items()}


def rename(key: str, old: str, new: str) -> str:
    """A module key with its adapter name `old` replaced by `new` ("" removes it, as peft saves keys)."""
    return re.sub(rf"\.{re.escape(old)}(?=\.|$)", f".{new}" if new else "", key)


def save_adapter(directory: str | os.PathLike, state: dict[str, Tensor], record: dict[str, Any]) -> Path:
    """Write an adapter (`state`: a LoRA run's checkpoint tensors) in peft's format, with the run's record
    (base identity, classes), atomically: a temp directory renamed over the old one."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in peft_names(state).items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config_from_record(record["lora"]).save_pretrained(str(tmp))
    write_json_atomic(tmp / RECORD, record)
    write_checksums(tmp, ["adapter_model.safetensors", "adapter_config.json", RECORD])
    old = directory.parent / f".{directory.name}.old"
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def export_adapter(run: str | os.PathLike, out: str | os.PathLike | None = None, ema: bool = True) -> Path:
    """A LoRA run's checkpoint (its newest good one for a run directory) -> peft's format in `out`
    (default RUN/adapter)."""
    step = ckpt.resolve_checkpoint(run)
    info = ckpt.read_json(step / "run.json")
    if "adapter" not in info:
        raise ValueError(f"{run} is not an adapter run (it was not trained with lora_rank)")
    out = Path(out) if out is not None else step.parent.parent / ADAPTER_DIR
    state = ckpt.load_weights(step, ckpt.weights_file(step, ema))
    return save_adapter(out, state, info["adapter"])


# ------------------------------------------------------------------------------------------------
# Composition at inference: base + remapped classes + adapter(s), scales, fusing
# ------------------------------------------------------------------------------------------------

def build_from_config(step: Path) -> nn.Module:
    """An untrained model of the class and constructor arguments in checkpoint `step`'s config.json."""
    from ditkit.kinds import saved_kind

    config = dict(ckpt.read_json(step / "config.json"))
    model_type = config.pop("model_type", None)
    classes = {c.__name__: c for c in saved_kind(model_type).saved}
    return classes.get(model_type, next(iter(classes.values())))(**config)


def base_module(run: str | os.PathLike) -> nn.Module:
    """The module an adapter run's adapter goes on: its base (checked against the recorded sha256) with the
    label table remapped to the run's classes; `peft.PeftModel.from_pretrained(base_module(RUN), RUN/adapter)`
    loads the adapter onto it."""
    step = ckpt.resolve_checkpoint(run)
    info = ckpt.read_json(step / "run.json")
    record = info.get("adapter") or info.get("init")
    if record is None:
        raise ValueError(f"{run} was not fine-tuned from a base (no init recorded in its run.json)")
    model = build_from_config(step)
    base, _, _ = load_source(check_base(record["base"]), num_heads=getattr(model, "config", {}).get("num_heads"))
    classes = record.get("classes") or {}
    load_base_into(model, base, classes.get("mapping"), classes.get("new_class_init", "null"), record["base"]["path"])
    return model.eval()


def load_adapter_tensors(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load an adapter's tensors into the model it was injected in; every adapter tensor must be there."""
    own = model.state_dict()
    wrong = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    if wrong:
        raise CheckpointError(f"{source} does not fit its base model with this adapter: {', '.join(wrong[:4])}")
    model.load_state_dict(state, strict=False)


def adapter_runs(extra: dict[str, float] | None, record: dict[str, Any]) -> list[tuple[Path, dict[str, Any], float]]:
    """(checkpoint, adapter record, weight) of each further adapter run, refused unless it was trained on the
    same base with the same classes."""
    out = []
    for run, weight in (extra or {}).items():
        step = ckpt.resolve_checkpoint(run)
        other = ckpt.read_json(step / "run.json").get("adapter") if (step / "run.json").is_file() else None
        if other is None:
            raise ValueError(f"adapter {run} is not an adapter run (it was not trained with lora_rank)")
        if other["base"]["sha256"] != record["base"]["sha256"]:
            raise ValueError(f"adapter {run} was trained on another base ({other['base']['path']}) than this run "
                             f"({record['base']['path']}): adapters combine only on the same base")
        if other["lora"].get("token_rows"):
            raise ValueError(f"adapter {run} adds classes of its own: a further adapter may not add classes (only "
                             f"the run loaded first may)")
        names = (other.get("classes") or {}).get("names")
        own = (record.get("classes") or {}).get("names") or names
        if names is not None and (names != own[:len(names)] or other["classes"]["mapping"] != list(range(len(names)))):
            raise ValueError(f"adapter {run} has other classes than this run ({', '.join(names)} vs "
                             f"{', '.join(own)}): adapters combine only on the base's own classes")
        out.append((step, other, float(weight)))
    return out


def compose(step: Path, info: dict[str, Any], ema: bool = True, adapters: dict[str, float] | None = None,
            device: str | torch.device = "cpu") -> nn.Module:
    """An adapter run's model: its base, the run's own adapter (checkpoint `step`'s EMA or model tensors),
    and further adapter runs at their weights (`adapters` {RUN: weight}), all active at once."""
    require_peft("this adapter run")
    record = info["adapter"]
    model = base_module(step)
    add_adapter(model, config_from_record(record["lora"]), OWN)
    load_adapter_tensors(model, ckpt.load_weights(step, ckpt.weights_file(step, ema)), str(step))
    scales = {OWN: 1.0}
    for i, (other, other_record, weight) in enumerate(adapter_runs(adapters, record), start=1):
        name = f"adapter{i}"
        add_adapter(model, config_from_record(other_record["lora"]), name)
        state = ckpt.load_weights(other, ckpt.weights_file(other, ema))
        load_adapter_tensors(model, {rename(k, OWN, name): v for k, v in state.items()}, str(other))
        scales[name] = weight
    activate(model, list(scales))
    set_scale(model, scales)
    return model.to(device).eval().requires_grad_(False)


def activate(model: nn.Module, names: list[str]) -> None:
    """Make every adapter in `names` active at once (peft activates one by default)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([n for n in names if n in module.active_adapters or n in _adapters_of(module)])


def _adapters_of(module: nn.Module) -> set[str]:
    names: set[str] = set()
    for attr in ("lora_A", "trainable_tokens_delta"):
        names |= set(getattr(module, attr, {}) or {})
    return names


def is_adapted(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def set_scale(model: nn.Module, scales: dict[str, float]) -> None:
    """Scale each named adapter's LoRA update (1: as trained, 0: the base; new class rows are not scaled)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in scales.items():
                module.set_scale(name, weight)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fuse every active adapter into its layer's weights and drop peft's wrappers: a plain model whose
    outputs equal the adapted model's (within float rounding)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def fused(module: nn.Module) -> nn.Module:
        layer = getattr(module, "token_adapter", module)  # peft's wrapper around trained label rows
        if isinstance(layer, BaseTunerLayer):
            layer.merge(adapter_names=[n for n in layer.active_adapters if n in _adapters_of(layer)])
            return layer.get_base_layer()
        return module

    for name, module in list(model.named_modules()):
        if name and (isinstance(module, BaseTunerLayer) or hasattr(module, "token_adapter")):
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if getattr(owner, leaf, None) is module:
                setattr(owner, leaf, fused(module))
    return model


def merge_run(run: str | os.PathLike, out: str | os.PathLike, ema: bool = True) -> tuple[Path, float | None]:
    """Write an adapter run with its adapter fused into the base as a standalone checkpoint directory `out`
    (config.json, model.safetensors, run.json), atomically; returns it and the largest output difference
    between the fused and the unfused model on a seeded test batch (class-conditional models; else None)."""
    from ditkit.io import check_writable

    out = Path(out)
    check_writable(out, folder=True)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new --out directory")
    step = ckpt.resolve_checkpoint(run)
    info = ckpt.read_json(step / "run.json") if (step / "run.json").is_file() else {}
    if "adapter" not in info:
        raise ValueError(f"{run} is not an adapter run (it was not trained with lora_rank): nothing to merge")
    model = compose(step, info, ema=ema)
    batch = test_batch(model)
    before = model(*batch) if batch else None
    merge(model)
    gap = None if before is None else float((model(*batch) - before).abs().max())
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    merged = {k: v for k, v in info.items() if k != "adapter"}
    write_json_atomic(tmp / "run.json", {**merged, "merged_from": {"run": str(step.resolve()),
                                                                   "base": info["adapter"]["base"]}})
    write_checksums(tmp, ["config.json", "run.json", "model.safetensors"])
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out, gap


@torch.no_grad()
def test_batch(model: nn.Module) -> tuple[Tensor, ...] | None:
    """A seeded (x, t, y) batch of every class for a class-conditional model (None: other models)."""
    if not hasattr(getattr(model, "y_embedder", None), "embedding_table") or not hasattr(model, "in_channels"):
        return None
    g = torch.Generator().manual_seed(0)
    n = getattr(model, "num_classes", 1)
    shape = (n, model.in_channels, *getattr(model, "input_size", (8, 8)))
    if hasattr(model, "num_frames"):
        shape = (n, model.in_channels, model.num_frames, *model.input_size)
    return torch.randn(shape, generator=g), torch.rand(n, generator=g), torch.arange(n)
