"""Sample quality against the number of function evaluations (NFE) for DDPM, DDIM, Euler and Heun,
all on one trained demo checkpoint (the demo config, trained here unless --run already holds a run).

The demo model is a flow-matching (velocity) model; DDPM and DDIM run it as the epsilon model of the
original 1000-step linear schedule through `EpsilonFromVelocity` (an exact change of variables, tested),
with fixed variances. Every setting starts from the same noise and draws the same digits (N per class,
CFG 4 as the demo), judged by ditkit's MNIST-5k classifier: FD-classifier against the held-out split, and
class accuracy. NFE counts model calls (a CFG call evaluates a doubled batch once). The summary gives, per
sampler, the fewest steps from which the FD stays within 10% of that sampler's 250-step FD (above or below).

    python benchmarks/samplers.py [--run runs/bench_flow] [--n-per-class 20] [--steps 5 10 20 50 250] [--markdown]

--markdown prints one row per sampler, cells "FD-classifier (accuracy, NFE)" per step count, as the sampling
guide shows it.
"""
from __future__ import annotations

import argparse

from common import add_markdown_flag, digits, draw, markdown_table, trained_run

from ditkit.diffusion import create_diffusion
from ditkit.diffusion.flow import EpsilonFromVelocity
from ditkit.evaluate import evaluate
from ditkit.evaluate.classifier import load_classifier

SAMPLERS = ("ddpm", "ddim", "euler", "heun")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/bench_flow")
    parser.add_argument("--n-per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 250])
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    add_markdown_flag(parser)
    args = parser.parse_args()
    steps_grid = sorted(set(args.steps) | {250})  # 250 steps is the reference each sampler is held to

    classifier = load_classifier()
    y, noise = digits(args.n_per_class)
    pipe, _ = trained_run(args.run, {"objective": "flow"})
    gaussian = create_diffusion("", learn_sigma=False)
    as_eps = EpsilonFromVelocity(pipe.model, gaussian.alphas_cumprod, pipe.objective)
    rows = []
    print(f"{'sampler':<7} {'steps':>5} {'NFE':>5} {'FD-classifier':>13} {'accuracy':>9} {'seconds':>8}", flush=True)
    for sampler in args.samplers:
        model, objective = (as_eps, gaussian) if sampler in ("ddpm", "ddim") else (pipe.model, pipe.objective)
        for steps in steps_grid:
            images, nfe, seconds = draw(pipe, y, noise, sampler=sampler, steps=steps, cfg_scale=4.0,
                                        model=model, objective=objective)
            m = evaluate(images, y, classifier=classifier)
            rows.append((sampler, steps, nfe, m["fd_classifier"], m["accuracy"]))
            print(f"{sampler:<7} {steps:>5} {nfe:>5} {m['fd_classifier']:>13.2f} {m['accuracy']:>9.1%} "
                  f"{seconds:>8.1f}", flush=True)

    print(f"\n{len(y)} samples per setting; FD-classifier vs the held-out split "
          f"(real-vs-real baseline at this size: {m['fd_classifier_real_baseline']:.2f})")
    converged = {sampler: fewest_steps([r for r in rows if r[0] == sampler]) for sampler in args.samplers}
    if args.markdown:
        cells = {(r[0], r[1]): f"{r[3]:.1f} ({r[4]:.1%}, {r[2]} NFE)" for r in rows}
        table = [[sampler, *(cells[sampler, n] for n in steps_grid), f"{converged[sampler][1]} steps, "
                  f"{converged[sampler][2]} NFE"] for sampler in args.samplers]
        print("\n".join(markdown_table(["sampler", *(f"{n} steps" for n in steps_grid),
                                         "converged (within 10% of 250 steps)"], table)))
        return
    print(f"{'sampler':<7} {'FD @ 250 steps':>14} {'fewest steps within 10%':>24} {'NFE':>5}")
    for sampler in args.samplers:
        ref, steps, nfe = converged[sampler]
        print(f"{sampler:<7} {ref:>14.2f} {steps:>24} {nfe:>5}")


def fewest_steps(mine: list[tuple]) -> tuple[float, int, int]:
    """(250-step FD, steps, NFE) of the fewest steps from which every larger count stays within 10% of the
    250-step FD, on either side (with CFG 4, coarse deterministic solvers can land *below* it: fewer steps
    guide less). `mine`: one sampler's (sampler, steps, nfe, fd, accuracy) rows in increasing steps."""
    ref = next(r[3] for r in mine if r[1] == 250)
    within = [abs(r[3] - ref) <= 0.1 * ref for r in mine]
    first = next(i for i in range(len(mine)) if all(within[i:]))
    return ref, mine[first][1], mine[first][2]


if __name__ == "__main__":
    main()
