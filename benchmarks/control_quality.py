"""Editing quality on MNIST-5k at full size (32x32, the demo's model): how closely samples follow a
low-resolution control image, and how far SDEdit moves from its input as the strength grows.

Trains a base run and a `lowres` control run on it unless the directories already hold runs, then takes
N held-out digits and prints two tables:
- structure control: the MSE (in [-1, 1] units) between the 4x-downsampled sample and the condition,
  for the base model (same class, no condition) and the control run;
- SDEdit: the MSE between input and output, per strength.

    python benchmarks/control_quality.py [--base runs/bench_base] [--control runs/bench_lowres] [--n 200]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ditkit.data import load_dataset
from ditkit.data.conditions import lowres
from ditkit.sampling.editing import edit
from ditkit.pipeline import load_pipeline
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
    args = parser.parse_args()

    base_seconds = ensure_run(args.base, {"data": "mnist", "steps": args.base_steps})
    control_seconds = ensure_run(args.control, {"data": "mnist", "steps": args.control_steps, "control": "lowres",
                                                "base": args.base})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, control = load_pipeline(args.base, device=device), load_pipeline(args.control, device=device)
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
    print(f"{'model':<28} {'low-res MSE vs condition':>26}")
    print(f"{'base (no condition)':<28} {mse(lowres(plain), cond):>26.4f}")
    print(f"{'lowres control':<28} {mse(lowres(steered), cond):>26.4f}")

    print(f"\nSDEdit on the same digits (base run, own class label, Heun {args.steps} steps)")
    print(f"{'strength':<10} {'MSE to input':>14}")
    for strength in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out = edit(base.model, base.objective, x, strength=strength, y=y, steps=args.steps, sampler="heun",
                   generator=torch.Generator(device).manual_seed(0))
        print(f"{strength:<10} {mse(out, x):>14.4f}")


if __name__ == "__main__":
    main()
