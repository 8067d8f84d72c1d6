"""Few-step generation: NFE against quality and time, for the demo (flow) model and a one-step
(average-velocity) model, with and without block caching, in fp32 and bf16; then `ditkit sample` end to end.

Every setting draws the same digits (N per class) from the same noise, judged by ditkit's MNIST-5k
classifier: class accuracy and FD-classifier against the held-out split, as a ratio to the real-vs-real
baseline at the same size. NFE counts model calls of one trajectory (a CFG call evaluates a doubled
batch once); "blocks" counts the calls that ran the transformer blocks (fewer with caching). Seconds are
wall time of the sampling loop in this process (CPU threads as set by OMP_NUM_THREADS).

    python benchmarks/few_step.py --demo runs/mnist_onestep/base --onestep runs/mnist_onestep [--n-per-class 20]
        [--sections table speed precision] [--end-to-end 500]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from common import CountingModel, digits

from ditkit.sampling.cache import BlockCache
from ditkit.evaluate import evaluate
from ditkit.evaluate.classifier import load_classifier
from ditkit.pipeline import Pipeline
from ditkit.sampling import CFG, sample

DEMO_ROWS = ([("euler", n, None) for n in (1, 2, 4, 10, 20, 40)]
             + [("heun", n, None) for n in (1, 2, 5, 10, 20)]
             + [("heun", 10, 0.08), ("heun", 20, 0.08), ("heun", 20, 0.1)])
BOTH_PRECISIONS = {("heun", 20, None), ("heun", 20, 0.08), ("euler", 20, None)}  # the rest in bf16, the runs' own


def run(pipe, y, noise, sampler, steps, cfg, cache=None, precision=None, chunk=250):
    """Images, NFE, block evaluations and seconds for one setting."""
    start, images, blocks = time.perf_counter(), [], 0
    for i in range(0, len(y), chunk):  # each chunk is its own trajectory: a fresh cache
        counted = CountingModel(BlockCache(pipe.model, cache) if cache is not None else pipe.model)
        out = sample(counted, pipe.objective, noise[i:i + chunk].shape, y=y[i:i + chunk], guidance=CFG(cfg),
                     steps=steps, sampler=sampler, noise=noise[i:i + chunk], progress=False,
                     null_label=pipe.model.num_classes, precision=precision)
        images.append(out.float().clamp(-1, 1))
        nfe = counted.calls
        if cache is not None:
            blocks = counted.model.block_evals  # of the last chunk's trajectory
    seconds = time.perf_counter() - start
    return torch.cat(images), nfe, blocks if cache is not None else nfe, seconds


def table(args, classifier) -> list[dict]:
    y, noise = digits(args.n_per_class)
    rows = []
    header = f"{'model':<8} {'sampler':<8} {'steps':>5} {'cache':>5} {'prec':>4} {'NFE':>4} {'blocks':>6} " \
             f"{'acc':>6} {'FD':>7} {'FD/real':>7} {'sec':>6}"
    print(header, flush=True)
    settings = []
    if args.demo:
        demo = Pipeline.load(args.demo)
        for sampler, steps, cache in DEMO_ROWS:
            for precision in ("fp32", "bf16") if (sampler, steps, cache) in BOTH_PRECISIONS else ("bf16",):
                settings.append(("demo", demo, sampler, steps, 4.0, cache, precision))
    if args.onestep:
        one = Pipeline.load(args.onestep)
        for steps in (1, 2, 4):
            for precision in ("fp32", "bf16") if steps == 1 else ("bf16",):
                settings.append(("onestep", one, "meanflow", steps, 1.0, None, precision))
    for name, pipe, sampler, steps, cfg, cache, precision in settings:
        images, nfe, blocks, seconds = run(pipe, y, noise, sampler, steps, cfg, cache,
                                           None if precision == "fp32" else precision)
        m = evaluate(images, y, classifier=classifier)
        ratio = m["fd_classifier"] / m["fd_classifier_real_baseline"]
        row = dict(model=name, sampler=sampler, steps=steps, cfg=cfg, cache=cache, precision=precision, nfe=nfe,
                   blocks=blocks, accuracy=m["accuracy"], fd=m["fd_classifier"],
                   fd_real=m["fd_classifier_real_baseline"], fd_ratio=ratio, seconds=seconds)
        rows.append(row)
        print(f"{name:<8} {sampler:<8} {steps:>5} {cache or '-':>5} {precision:>4} {nfe:>4} {blocks:>6} "
              f"{m['accuracy']:>6.1%} {m['fd_classifier']:>7.2f} {ratio:>7.2f} {seconds:>6.1f}", flush=True)
    return rows


def model_speed(args) -> dict:
    """Forward throughput of the demo model on a CFG batch: fp32 eager vs bf16 autocast vs torch.compile,
    interleaved in this process (medians of `repeats`)."""
    pipe = Pipeline.load(args.demo)
    model = pipe.model
    x = torch.randn(2 * 250, 1, 32, 32)
    t = torch.full((len(x),), 500.0)
    y = torch.arange(len(x)) % 11
    variants = {"fp32 eager": lambda: model(x, t, y)}

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t, y)

    variants["bf16 autocast"] = bf16
    if "compile" in args.sections:
        compiled = torch.compile(model)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x, t, y)
        print(f"torch.compile: first call (compiling) {time.perf_counter() - start:.1f} s", flush=True)
        variants["compiled fp32"] = lambda: compiled(x, t, y)
    times = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    result = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base = result["fp32 eager"]
    for name, sec in result.items():
        print(f"{name:<14} {sec * 1000:8.1f} ms per 500-image forward  ({base / sec:.2f}x fp32 eager)", flush=True)
    return result


def end_to_end(args) -> dict:
    """`ditkit sample` wall time for N digits: one-step model (1 step) vs the demo run's own sampling
    (Heun 20, CFG 2.5 on t in [0, 0.75] for configs/mnist.yaml), alternated."""
    n = args.end_to_end // 10
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    commands = {
        "onestep 1 step": ["--ckpt", args.onestep, "--steps", "1"],
        "demo, its own sampling": ["--ckpt", args.demo],
    }
    result = {k: [] for k in commands}
    for _ in range(args.e2e_repeats):
        for name, extra in commands.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ditkit.cli", "sample", *extra, "--n-per-class", str(n),
                            "--out", f"/tmp/few_step_{name.split()[0]}.npz"], check=True, env=env,
                           capture_output=True)
            result[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in result.items()}
    speedup = best["demo, its own sampling"] / best["onestep 1 step"]
    print(f"ditkit sample, {10 * n} digits: " + ", ".join(f"{k} {v:.1f} s" for k, v in best.items())
          + f" -> {speedup:.1f}x", flush=True)
    return {**best, "speedup": speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", help="a flow-matching demo run (ditkit train --config configs/mnist.yaml)")
    parser.add_argument("--onestep", help="a one-step run (ditkit train --config configs/mnist_onestep.yaml)")
    parser.add_argument("--n-per-class", type=int, default=20)
    parser.add_argument("--sections", nargs="+", default=["table"], choices=["table", "speed", "compile", "e2e"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end", type=int, default=500, help="digits drawn by each `ditkit sample`")
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()
    out = {}
    if "table" in args.sections:
        out["table"] = table(args, load_classifier())
    if "speed" in args.sections or "compile" in args.sections:
        out["speed"] = model_speed(args)
    if "e2e" in args.sections:
        out["end_to_end"] = end_to_end(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
