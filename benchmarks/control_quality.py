"""Editing quality on MNIST-5k at full size (32x32, the demo's model): how closely samples follow a
low-resolution control image, and how far SDEdit moves from its input as the strength grows.

Trains a base run and a `lowres` control run on it unless the directories already hold runs, then takes
N held-out digits and prints two tables:
- structure control: the MSE (in [-1, 1] units) between the 4x-downsampled sample and the condition,
  for the base model (same class, no condition) and the control run;
- SDEdit: the MSE between input and output, per strength.

    python benchmarks/control_quality.py [--base runs/bench_base] [--control runs/bench_lowres] [--n 200] [--markdown]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import Table, add_markdown_flag

from ditkit.data import load_dataset
from ditkit.data.conditions import lowres
from ditkit.sampling.editing import edit
from ditkit.pipeline import Pipeline
from ditkit.sampling import sample
from ditkit.train import build_config, train
from ditkit import checkpoint as ckpt


def ensure_run(out: str, overrides: dict) -> float | None:
    """Train into `out` unless it holds a run; the training seconds, or None when reused."""
    if ckpt.latest_checkpoint(Path(out)) is not None:
        return None
    start = time.perf_counter()
    train(build_config(None, {"out": out, **overrides}), progress=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/bench_base", help="base run (trained here with the demo config)")
    parser.add_argument("--control", default="runs/bench_lowres", help="lowres control run on --base")
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--control-steps", type=int, default=400)
    parser.add_argument("--n", type=int, default=200, help="held-out digits")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (Heun)")
    add_markdown_flag(parser)
    args = parser.parse_args()

    base_seconds = ensure_run(args.base, {"data": "mnist", "steps": args.base_steps})
    control_seconds = ensure_run(args.control, {"data": "mnist", "steps": args.control_steps, "control": "lowres",
                                                "base": args.base})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, control = Pipeline.load(args.base, device=device), Pipeline.load(args.control, device=device)
    held = load_dataset("mnist", split="heldout")
    x, y = held.images[: args.n].to(device), held.labels[: args.n].to(device)
    cond = lowres(x)
    kw = dict(y=y, steps=args.steps, sampler="heun", progress=False)

    def mse(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.clamp(-1, 1) - b).square().mean().item()

    plain = sample(base.model, base.objective, x.shape, generator=torch.Generator(device).manual_seed(0), **kw)
    steered = sample(control.model.bind(cond), control.objective, x.shape,
                     generator=torch.Generator(device).manual_seed(0), **kw)
    for name, seconds in (("base", base_seconds), ("control", control_seconds)):
        print(f"{name} run: {'reused' if seconds is None else f'trained in {seconds:.0f} s'}")
    print(f"\nstructure control, {args.n} held-out digits, Heun {args.steps} steps, class label given, no CFG")
    control_table = Table(["model", "low-res MSE to the condition"], args.markdown)
    control_table.add("base (no condition)", f"{mse(lowres(plain), cond):.4f}")
    control_table.add("lowres control", f"{mse(lowres(steered), cond):.4f}")
    control_table.finish()

    print(f"\nSDEdit on the same digits (base run, own class label, Heun {args.steps} steps)")
    strengths, errors = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), []
    for strength in strengths:
        out = edit(base.model, base.objective, x, strength=strength, y=y, steps=args.steps, sampler="heun",
                   generator=torch.Generator(device).manual_seed(0))
        errors.append(f"{mse(out, x):.4f}")
    sdedit = Table(["SDEdit strength", *(f"{s:g}" for s in strengths)], args.markdown)
    sdedit.add("MSE to the input", *errors)
    sdedit.finish()

if __name__ == "__main__":
    main()
