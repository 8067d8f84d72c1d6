"""The original DiT's checkpoint files (facebookresearch/DiT) -> ditkit.

Two formats exist: the released files (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`), a plain state dict;
and the training script's checkpoints, `{"model", "ema", "opt", "args"}` with `args` an argparse
Namespace. Both are pickles, so they are read with `torch.load(weights_only=True)`, which allows tensors
and plain containers and, here, exactly one class more: argparse.Namespace. A file that would run code
when unpickled is refused. The state-dict keys are ditkit's own (see models/dit.py), so only the
constructor arguments have to be recovered, from the tensor shapes.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditkit.io import check_writable, write_json_atomic
from ditkit.models.dit import DiT, ZOO, ZOO_CONFIGS

# The original's sample.py: 250 DDPM steps, classifier-free guidance 4.0 on the first 3 channels.
PAPER_SAMPLING = {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "guided_channels": 3}
# The ImageNet classes sample.py draws (loggerhead, macaw, ... ), seed 0.
PAPER_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def load_official_file(path: str | os.PathLike) -> Any:
    """The unpickled file, tensors and plain containers only (plus argparse.Namespace)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: pass the checkpoint file itself (e.g. DiT-XL-2-256x256.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: download DiT-XL-2-256x256.pt (or 512x512) from the DiT "
                                "authors' release, or pass a checkpoint written by their train.py")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download? expected a PyTorch checkpoint")
    # torch.save writes a zip archive (PK..) or, before PyTorch 1.6, a pickle (protocol 2+ starts 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: it starts with {head!r}, not a zip "
                         "archive or a pickle (a text or HTML file, e.g. a download's error page?)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(". Please")[0]
        if "Unsupported global" in text or "Unsupported class" in text:
            raise ValueError(f"refusing to load {path}: unpickling it would call or build something other than "
                             f"tensors ({detail[:200]}); only state dicts and the original training checkpoints "
                             "are accepted") from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({detail[:200]})") from None
    except Exception as err:  # a damaged file fails anywhere in the unpickler (EOFError, KeyError, ...)
        first = (str(err).splitlines() or [""])[0].split(". ")[0][:200]
        raise ValueError(f"{path} is not a readable PyTorch checkpoint, truncated or damaged "
                         f"({type(err).__name__}{': ' + first if first else ''})") from None


def load_official_state_dict(path: str | os.PathLike, ema: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, training args as a dict; empty for a released file).

    A training checkpoint gives its "ema" weights (`ema=True`, what the authors sample from) or "model".
    """
    obj = load_official_file(path)
    args: dict[str, Any] = {}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        key = "ema" if ema else "model"
        if key not in obj:
            raise ValueError(f"{path} is a training checkpoint without {key!r} weights (keys: {', '.join(obj)})")
        state = obj[key]
        if isinstance(obj.get("args"), argparse.Namespace):
            args = vars(obj["args"])
    else:
        state = obj
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a DiT state dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from a DDP wrapper
    return state, args


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"not a DiT checkpoint: {key!r} is missing ({len(state)} keys, e.g. "
                         f"{', '.join(list(state)[:5])})")
    return tuple(state[key].shape)


def infer_config(state: dict[str, Tensor], num_heads: int | None = None,
                 args: dict[str, Any] | None = None) -> dict[str, Any]:
    """DiT constructor arguments read from an original state dict's shapes.

    Heads cannot be read from weights: `num_heads`, else the training args' zoo model name, else the zoo
    entry with the same depth and width (S, B, L, XL); otherwise a ValueError asks for `num_heads`.
    The label table has a null row when the model was trained with label dropout (the original always
    was); the training args' num_classes settles it when present.
    """
    args = args or {}
    D, C, p, _ = _shape(state, "x_embedder.proj.weight")
    _, T, _ = _shape(state, "pos_embed")
    grid = math.isqrt(T)
    if grid * grid != T:
        raise ValueError(f"pos_embed has {T} tokens: the original models are square, expected a square number")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = _shape(state, "blocks.0.mlp.fc1.weight")[0] / D
    out_channels = _shape(state, "final_layer.linear.weight")[0] // (p * p)
    rows = _shape(state, "y_embedder.embedding_table.weight")[0]
    num_classes = int(args.get("num_classes", rows - 1))
    if rows not in (num_classes, num_classes + 1):
        raise ValueError(f"the label table has {rows} rows but the training args say num_classes={num_classes}")
    if out_channels not in (C, 2 * C):
        raise ValueError(f"final layer predicts {out_channels} channels for {C} input channels: "
                         f"expected {C} or {2 * C}")

    if num_heads is None and args.get("model") in ZOO and ZOO[args["model"]]["hidden_size"] == D:
        num_heads = ZOO[args["model"]]["num_heads"]
    if num_heads is None:
        same = [cfg for cfg in ZOO_CONFIGS.values() if cfg["depth"] == depth and cfg["hidden_size"] == D]
        if not same:
            raise ValueError(f"cannot tell the number of attention heads of a depth-{depth}, width-{D} model (no "
                             "zoo model has that size): pass num_heads (--num-heads)")
        num_heads = same[0]["num_heads"]
    if D % num_heads:
        raise ValueError(f"hidden size {D} is not divisible by num_heads {num_heads}")
    return dict(input_size=grid * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth, num_heads=num_heads,
                mlp_ratio=mlp_ratio, class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0,
                num_classes=num_classes, learn_sigma=out_channels == 2 * C)


def load_official(path: str | os.PathLike, num_heads: int | None = None, ema: bool = True) -> DiT:
    """A DiT with the weights of an original checkpoint file (see `infer_config` for `num_heads`)."""
    state, args = load_official_state_dict(path, ema=ema)
    model = DiT(**infer_config(state, num_heads, args))
    model.load_state_dict(state)
    return model.eval()


def convert_official(path: str | os.PathLike, out: str | os.PathLike, num_heads: int | None = None,
                     ema: bool = True, vae: str | None = None) -> Path:
    """Write an original checkpoint as a ditkit checkpoint directory (config.json, model.safetensors,
    run.json) that `DiT.from_pretrained` and `ditkit sample --ckpt` read. `vae`: the VAE (local
    directory or hub id) its latents decode with, remembered for sampling."""
    out = Path(out)
    check_writable(out, folder=True)  # before reading a multi-GB file
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new --out directory")
    model = load_official(path, num_heads=num_heads, ema=ema)
    if not model.learn_sigma:  # the original's sampler (and ours for its checkpoints) reads a learned variance
        raise ValueError(f"{path} predicts {model.out_channels} channels for {model.in_channels} input channels: "
                         f"the noise alone, without the learned sigma channels that the original DiT's "
                         f"checkpoints carry and `ditkit sample` needs; load it in Python instead "
                         f"(ditkit.interop.official.load_official) and sample it with a fixed-variance "
                         f"GaussianDiffusion (model_var_type='fixed_small')")
    model.save_pretrained(out)
    info = {"objective": "ddpm", "latent": True, "num_classes": model.num_classes,
            "conditional": model.num_classes > 1, "channels": model.in_channels, "image_size": model.input_size[0],
            "source": {"official": Path(path).name, "weights": "ema" if ema else "model"}}
    if vae is not None:  # a local directory is remembered absolutely, so sampling works from anywhere
        info["vae"] = str(Path(vae).resolve()) if Path(vae).exists() else vae
    write_json_atomic(out / "run.json", info)
    return out
