"""Parameter and FLOP counts, measured on the meta device (no memory, no compute: instant for DiT-XL/2).

GFLOPs follow the DiT paper's convention: multiply-accumulates of one forward pass, batch size 1.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Trainable parameters (the fixed positional table is not counted, as in the paper)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_gflops(model: nn.Module, example_inputs: tuple) -> float:
    """Multiply-accumulates (in units of 1e9) of `model(*example_inputs)`, counted by PyTorch's
    FlopCounterMode (which reports 2 FLOPs per MAC)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*example_inputs)
    return counter.get_total_flops() / 2 / 1e9


def dit_example_inputs(model: nn.Module, device: str | torch.device = "meta") -> tuple:
    """One sample (x, t, y) that fits `model` (a DiT)."""
    H, W = model.input_size
    return (
        torch.zeros(1, model.in_channels, H, W, device=device),
        torch.zeros(1, device=device),
        torch.zeros(1, dtype=torch.long, device=device),
    )


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build().eval()


def zoo_table(input_size: int = 32, in_channels: int = 4, num_classes: int = 1000) -> dict[str, dict]:
    """{name: {"params": int, "gflops": float}} for every zoo model at the given input."""
    from ditkit.models import create_model, list_models

    table = {}
    for name in list_models():
        model = _on_meta(lambda name=name: create_model(name, input_size=input_size, in_channels=in_channels,
                                              num_classes=num_classes))
        table[name] = {"params": count_params(model), "gflops": forward_gflops(model, dit_example_inputs(model))}
    return table
