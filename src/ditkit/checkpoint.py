"""Checkpoint directories, written by the trainer and read by inference, the web page and resume alike: one
directory per saved step, written whole into a temp directory and renamed, so a crash never leaves a half
checkpoint; checksums catch files damaged afterwards. `resolve_checkpoint` is the one rule for which
checkpoint of a run is used, `find_checkpoints` for which ones a reader may choose from.

    OUT/checkpoints/step_00001000/
        config.json              model constructor (DiT.from_pretrained reads it)
        run.json                 the TrainConfig and data facts (class names, channels, size)
        model.safetensors        weights
        ema.safetensors          EMA weights
        train_state.safetensors  optimizer, grad scaler, step, data position, every RNG state
        checksums.json           sha256 of each file above
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ditkit.checksums import CHECKSUMS, CheckpointError, sha256, verify_files
from ditkit.io import WriteError
from ditkit.notes import warn

CHECKPOINTS = "checkpoints"
FILES = ("config.json", "run.json", "model.safetensors", "ema.safetensors", "train_state.safetensors")


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


# ------------------------------------------------------------------------------------------------
# RNG states as tensors (safetensors holds tensors only)
# ------------------------------------------------------------------------------------------------

def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, Tensor]:
    """Every RNG the run uses: torch (CPU, CUDA), numpy, Python, and the named generators."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out["rng.numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    out["rng.numpy.extra"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["rng.numpy.cached"] = torch.tensor([cached], dtype=torch.float64)
    version, internal, gauss = random.getstate()
    out["rng.python"] = torch.tensor(list(internal), dtype=torch.int64)
    out["rng.python.gauss"] = torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64)
    for name, gen in generators.items():
        out[f"rng.gen.{name}"] = gen.get_state()
    return out


def restore_rng(tensors: dict[str, Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    pos, has_gauss = tensors["rng.numpy.extra"].tolist()
    np.random.set_state(("MT19937", tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(tensors["rng.numpy.cached"][0])))
    gauss = float(tensors["rng.python.gauss"][0])
    random.setstate((3, tuple(tensors["rng.python"].tolist()), None if np.isnan(gauss) else gauss))
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.gen.{name}"])


# ------------------------------------------------------------------------------------------------
# Optimizer state (a nested dict keyed by parameter name) <-> flat tensors + JSON
# ------------------------------------------------------------------------------------------------

def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for name, slots in state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"opt.{name}.{slot}"] = value
            else:
                scalars[f"{name}.{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            name, slot = key[4:].rsplit(".", 1)
            state.setdefault(name, {})[slot] = value
    for key, value in meta["scalars"].items():
        name, slot = key.rsplit(".", 1)
        state.setdefault(name, {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------------
# Save / find / load
# ------------------------------------------------------------------------------------------------

def step_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(
    out: str | os.PathLike,
    step: int,
    model_config: dict[str, Any],
    run_info: dict[str, Any],
    model_state: dict[str, Tensor],
    ema_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    extra_state: dict[str, Any],
    rng: dict[str, Tensor],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` under OUT/checkpoints atomically and delete all but the newest `keep_last`.

    A non-finite weight, EMA weight or optimizer value is refused (NonFiniteState) before anything is
    written. A failed write (no space, no permission) is a WriteError naming the checkpoint; its temporary
    directory is removed and the earlier checkpoints are left as they were."""
    opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
    for what, tensors in (("model weights", model_state), ("EMA weights", ema_state),
                          ("optimizer state", opt_tensors)):
        check_finite(tensors, what)
    final = step_dir(Path(out), step)
    tmp = final.parent / f".{final.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_files(tmp, model_config, run_info, model_state, ema_state, opt_tensors,
                     {"optimizer": opt_meta, **extra_state}, rng)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(final, err, what="checkpoint ") from None
    for old in list_checkpoints(Path(out))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, model_config: dict[str, Any], run_info: dict[str, Any], model_state: dict[str, Tensor],
                 ema_state: dict[str, Tensor], opt_tensors: dict[str, Tensor], meta: dict[str, Any],
                 rng: dict[str, Tensor]) -> None:
    """Every file of a checkpoint into the directory `tmp`, fsynced."""
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    (tmp / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    save_file(_cpu(model_state), str(tmp / "model.safetensors"))
    save_file(_cpu(ema_state), str(tmp / "ema.safetensors"))
    save_file(_cpu({**opt_tensors, **rng}), str(tmp / "train_state.safetensors"),
              metadata={"ditkit": json.dumps(meta)})
    (tmp / CHECKSUMS).write_text(json.dumps({f: sha256(tmp / f) for f in FILES}, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


class NonFiniteState(ValueError):
    """A checkpoint would hold a NaN or infinite value (a diverged run): it is never written."""


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """NonFiniteState naming the first of `tensors` (floating point) holding a NaN or an infinity."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteState(f"the {what} hold non-finite values ({name})")


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Every step directory of run OUT, oldest first, damaged ones included (the trainer skips and prunes
    them); a half-written one (.step_*.tmp) is not listed."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_"))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint directory: a model's config and weights (a training step, or a saved or converted model)."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def find_checkpoints(path: str | os.PathLike) -> list[Path]:
    """The checkpoints a reader can choose from at `path`, oldest first: a checkpoint directory is its own
    list; a run directory lists its steps that hold a model (their checksums are verified when loaded)."""
    if is_checkpoint(path):
        return [Path(path)]
    return [p for p in list_checkpoints(path) if is_checkpoint(p)]


def verify(path: Path) -> None:
    """Raise CheckpointError if a file is missing or its checksum differs (truncated or damaged)."""
    verify_files(path, FILES, required=True)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint of run OUT that verifies; damaged newer ones are reported and skipped."""
    found = list_checkpoints(Path(out))
    for k, path in enumerate(reversed(found)):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            older = k + 1 < len(found)
            warn(f"skipping checkpoint: {err}; " + ("trying the previous one" if older else "no older one"))
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (-> its newest good checkpoint) or a checkpoint directory itself. A checkpoint
    directory's JSON files are verified here; the weights, when a model reads them (from_pretrained)."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file: expected a run directory or a checkpoint directory")
    if is_checkpoint(path):
        # a training checkpoint always has checksums; a directory written by save_pretrained or convert may not
        verify_files(path, [f for f in ("config.json", "run.json") if (path / f).exists()],
                     required=(path / "train_state.safetensors").exists())
        return path
    found = latest_checkpoint(path)
    damaged = list_checkpoints(path) if found is None else []
    if damaged:
        try:
            verify(damaged[-1])
            newest = "it changed while being read"
        except CheckpointError as err:
            newest = str(err)
        raise CheckpointError(f"no usable checkpoint in {path}: all {len(damaged)} of its checkpoint(s) are "
                              f"damaged; the newest: {newest}")
    if found is None:
        raise CheckpointError(f"no usable checkpoint in {path}: expected a run directory with "
                              f"{CHECKPOINTS}/step_*/ or a checkpoint directory with config.json and model.safetensors")
    return found


def load_train_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of train_state.safetensors."""
    file = path / "train_state.safetensors"
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            meta = json.loads(f.metadata()["ditkit"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} cannot be read: {err}") from None
    return tensors, meta


def weights_file(path: Path, ema: bool = True) -> str:
    """The weights file of checkpoint directory `path` to sample with: the EMA weights if asked for and
    there (a converted model may hold only model.safetensors)."""
    return "ema.safetensors" if ema and (Path(path) / "ema.safetensors").is_file() else "model.safetensors"


def weights_record(path: Path) -> dict[str, str]:
    """What a run records of a checkpoint directory it starts from or samples with (init_image, image_model,
    a fine-tune's base): its path, the weights file `weights_file` picks and that file's sha256."""
    weights = weights_file(path)
    return {"path": str(Path(path).resolve()), "weights": weights, "sha256": sha256(Path(path) / weights)}


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, run.json); CheckpointError if it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def load_weights(path: Path, name: str) -> dict[str, Tensor]:
    file = path / name
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} cannot be read: {err}") from None
