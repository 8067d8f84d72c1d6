"""Is MeanFlow's du/dt the trajectory's (`flow_time_scale`)? For each one-step run given (objective meanflow
or distill), the JVP of u(z, r, t) along (v, 0, 1), as MeanFlow's training target takes it, against central
differences over eps of the time range, on the same pairs (fixed seed; t in [0.2, 0.95], r below it, z on the
path from N(0, 0.25) data, v = noise - x0, labels 0-9). A model smooth in t agrees at small eps; one that wiggles
in t (the time embedding fed t x 1000) does not. Also |(t - r) du/dt|, the target's correction, against |v|.
float32, math attention.

    python benchmarks/jvp_smoothness.py RUN [RUN ...] [--pairs 32]
"""
from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditkit.diffusion.meanflow import AverageVelocity, MeanFlow
from ditkit.pipeline import Pipeline

EPS = (0.02, 0.005, 0.001)


def measure(run: str, pairs: int) -> dict[str, float]:
    pipe = Pipeline.load(run, device="cpu")
    if not isinstance(pipe.objective, AverageVelocity):
        raise SystemExit(f"{run} is not a one-step run (objective: meanflow or distill)")
    model, mf = pipe.model.float().eval(), MeanFlow(time_scale=pipe.objective.time_scale)
    g = torch.Generator().manual_seed(0)
    C, H = model.in_channels, model.input_size[0]
    x0 = 0.5 * torch.randn(pairs, C, H, H, generator=g)
    t = 0.2 + 0.75 * torch.rand(pairs, generator=g)
    r = t * torch.rand(pairs, generator=g)
    noise = torch.randn(pairs, C, H, H, generator=g)
    z, v = mf.q_sample(x0, t, noise), noise - x0
    kwargs = {"y": torch.randint(0, model.num_classes, (pairs,), generator=g)}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, u_tgt = mf.jvp_target(model, z, t, r, v, kwargs)
        dudt = (v - u_tgt) / (t - r).reshape(-1, *([1] * (v.ndim - 1)))
        row = {"time_scale": mf.time_scale, "|h du/dt| / |v|": ((v - u_tgt).norm() / v.norm()).item()}
        for eps in EPS:
            ahead = mf.average_velocity(model, z + eps * v, t + eps, r, kwargs)
            behind = mf.average_velocity(model, z - eps * v, t - eps, r, kwargs)
            row[f"eps {eps}"] = (((ahead - behind) / (2 * eps) - dudt).norm() / dudt.norm()).item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="one-step run directories")
    parser.add_argument("--pairs", type=int, default=32)
    args = parser.parse_args()
    header = f"{'run':<40} {'t x':>6} {'|h du/dt|/|v|':>14} " + " ".join(f"{'FD err, eps ' + str(e):>18}"
                                                                         for e in EPS)
    print(header, flush=True)
    for run in args.runs:
        row = measure(run, args.pairs)
        print(f"{run:<40} {row['time_scale']:>6g} {row['|h du/dt| / |v|']:>14.2f} "
              + " ".join(f"{row[f'eps {e}']:>18.1%}" for e in EPS), flush=True)


if __name__ == "__main__":
    main()
