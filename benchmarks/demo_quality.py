"""Quality of the main job: are the demo's digits recognisable and of the requested class?

Trains the default config (or loads a finished run with --run), samples N digits per class with the
EMA weights, and classifies them with ditkit's MNIST-5k classifier (trained on the training split).
Prints train time, the classifier's held-out accuracy (its own ceiling) and its accuracy on samples.

    python benchmarks/demo_quality.py [--run runs/demo] [--n-per-class 100] [key=value ...]
"""
from __future__ import annotations

import argparse
import time

import torch

from ditkit.data import load_mnist
from ditkit.evaluate.classifier import accuracy, load_classifier
from ditkit.pipeline import load_pipeline
from ditkit.sampling import sample, samplers_for
from ditkit.train import build_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="evaluate this finished run instead of training one")
    parser.add_argument("--out", default="runs/demo_quality")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the run's)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the run's)")
    parser.add_argument("--sampler", help="sampler (default: the run's)")
    parser.add_argument("assignments", nargs="*", metavar="key=value")
    args = parser.parse_args()

    train_seconds = float("nan")
    run = args.run
    if run is None:
        config = build_config(None, {"out": args.out}, args.assignments)
        result = train(config)
        train_seconds, run = result.seconds, str(result.out)
    pipe = load_pipeline(run)
    cfg = pipe.info["train_config"]
    cfg_scale = args.cfg if args.cfg is not None else cfg["cfg_scale"]
    steps = args.steps or cfg["sample_steps"]
    sampler = args.sampler or cfg["sampler"] or samplers_for(pipe.objective)[0]

    y = torch.arange(10).repeat(args.n_per_class)
    start = time.perf_counter()
    images = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16"):
        for chunk in y.split(250):
            images.append(sample(pipe.model, pipe.objective, (len(chunk), 1, 32, 32), y=chunk, cfg_scale=cfg_scale,
                                 steps=steps, sampler=sampler,
                                 generator=torch.Generator().manual_seed(len(images)), progress=False).float())
    sample_seconds = time.perf_counter() - start
    images = torch.cat(images).clamp(-1, 1)

    classifier = load_classifier()
    held = load_mnist(32, split="heldout")
    print(f"{'run':<28} {run}")
    print(f"{'train time':<28} {train_seconds:.0f} s")
    print(f"{'sampler':<28} {sampler}, {steps or 'default'} steps, cfg {cfg_scale}")
    print(f"{'sampling time':<28} {sample_seconds:.0f} s for {len(y)} digits")
    print(f"{'classifier, held-out real':<28} {accuracy(classifier, held.images, held.labels):.1%}")
    print(f"{'classifier, generated':<28} {accuracy(classifier, images, y):.1%}  ({args.n_per_class} per class)")


if __name__ == "__main__":
    main()
