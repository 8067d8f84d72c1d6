"""MeanFlow training from a TrainConfig (issue 15): the configured objective, and the start from a
flow-matching run (`base=RUN`), whose velocity model is the two-time model at r = t."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ditkit.diffusion.meanflow import MeanFlow
from ditkit.models.dit import RECIPE_DEFAULTS
from ditkit.train import checkpoint as ckpt


def meanflow_objective(c: Any) -> MeanFlow:
    """The MeanFlow objective a TrainConfig `c` asks for (its meanflow_* fields)."""
    return MeanFlow(timestep_sampling=c.timestep_sampling, unequal_fraction=c.meanflow_unequal,
                    adaptive_p=c.meanflow_adaptive_p, cfg_scale=c.meanflow_cfg, cfg_mix=c.meanflow_cfg_mix)


def load_base_weights(model: nn.Module, base: Path) -> None:
    """Start `model` (a DiT with an interval embedder) from a flow-matching checkpoint's EMA weights.

    Every key but the interval embedder's must be there with the same shape; the interval embedder keeps
    its zero-initialised output, so the start is exactly the base velocity model at r = t."""
    info_file = base / "run.json"
    objective = json.loads(info_file.read_text()).get("objective") if info_file.is_file() else None
    if objective != "flow":
        raise ValueError(f"base={base} must be a flow-matching run to start MeanFlow from, "
                         f"got objective={objective}")
    config_file = base / "config.json"  # the MLP's activation is not in the keys: compare it by name
    paper = RECIPE_DEFAULTS["mlp"]
    base_mlp = json.loads(config_file.read_text()).get("mlp", paper) if config_file.is_file() else paper
    own_mlp = getattr(model, "config", {}).get("mlp", paper)
    if base_mlp != own_mlp:
        raise ValueError(f"base={base} has mlp {base_mlp} but this config builds mlp {own_mlp}: "
                         f"add mlp={base_mlp}")
    weights = "ema.safetensors" if (base / "ema.safetensors").is_file() else "model.safetensors"
    state = ckpt.load_weights(base, weights)
    own = model.state_dict()
    wrong = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in state and not k.startswith("interval_embedder."))
    if wrong or missing:
        raise ValueError(f"base={base} does not fit this model (set the same model fields as the base run): "
                         f"unexpected or differently shaped {wrong[:4]}, missing {missing[:4]}")
    model.load_state_dict(state, strict=False)
