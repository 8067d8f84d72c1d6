"""The modern DiT recipe, one change at a time (LightningDiT-style table) at the demo's budget.

Each row adds one change to the row above, starting from the demo as it was (the paper's DiT blocks on
rectified flow with logit-normal t, CFG 4, Heun 20 steps). Training changes train a run (the demo config
plus the row's overrides, same steps and batch: equal images seen), reused when `--runs DIR/<name>` already
holds one; sampling changes reuse the run above. Every row draws the same digits from the same noise
(N per class) and is judged by `ditkit.evaluate`: class accuracy, FD-classifier and its ratio to the
real-vs-real baseline of the same count, k-NN precision and recall. Wall time is the run's training time
as its metrics.csv recorded it (on a shared machine: compare steps, not seconds).

    python benchmarks/recipe_ablation.py [--runs runs/ablation] [--n-per-class 100] [--rows 0 1 2 ...]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from common import digits, draw, trained_run

from ditkit.evaluate import evaluate
from ditkit.evaluate.classifier import load_classifier
from ditkit.pipeline import load_pipeline
from ditkit.train.checkpoint import step_dir

# (label, run name, training overrides of the demo config, sampling options); both cumulative by hand, so
# each row reads as one change. "guide_step": autoguidance by that step's EMA checkpoint of the same run.
PAPER = {"velocity_cosine_weight": 0.0, "timestep_sampling": "logit_normal", "model_args": {},
         "sample_cfg_interval": None, "sample_apg_eta": None, "sample_shift": None, "cfg_scale": 4.0,
         "ema_std": None}
ARCH = {"mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True, "pos_embed": "sincos+rope"}
ROWS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("demo as it was: DiT blocks, logit-normal t, CFG 4", "paper", {}, {}),
    ("+ guidance interval t in [0.2, 0.8]", "paper", {}, {"cfg_interval": (0.2, 0.8)}),
    ("+ adaptive projected guidance (eta 0)", "paper", {}, {"cfg_interval": (0.2, 0.8), "apg_eta": 0.0}),
    ("+ uniform t (training)", "uniform", {"timestep_sampling": "uniform"},
     {"cfg_interval": (0.2, 0.8), "apg_eta": 0.0}),
    ("+ velocity-direction loss, SwiGLU, RMSNorm, RoPE, QK-norm", "lightning",
     {"timestep_sampling": "uniform", "velocity_cosine_weight": 1.0, "model_args": ARCH},
     {"cfg_interval": (0.2, 0.8), "apg_eta": 0.0}),
]


def train_seconds(run: Path) -> float | None:
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        return None
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["elapsed_s"]) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/ablation", help="one run per training recipe, reused if present")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--rows", type=int, nargs="+", help="row numbers to run (default: all)")
    args = parser.parse_args()

    classifier = load_classifier()
    y, noise = digits(args.n_per_class)
    print("| # | change | run | train steps | train s | sampling | NFE | accuracy | FD-classifier | FD ratio "
          "| precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (label, name, train_overrides, options) in enumerate(ROWS):
        if args.rows and i not in args.rows:
            continue
        path = Path(args.runs) / name
        pipe, _ = trained_run(str(path), {**PAPER, **train_overrides})
        cfg = pipe.info["train_config"]
        options = dict(options)
        guide_step = options.pop("guide_step", None)
        if guide_step is not None:
            options["guide_model"] = load_pipeline(step_dir(path, guide_step)).model
        sampling = dict(cfg_interval=None, apg_eta=None, shift=None, **options)  # nothing from the run's record
        images, nfe, _ = draw(pipe, y, noise, cfg_scale=options.pop("cfg_scale", 4.0),
                              **{k: v for k, v in sampling.items() if k != "cfg_scale"})
        m = evaluate(images, y, classifier=classifier)
        ratio = m["fd_classifier"] / m["fd_classifier_real_baseline"]
        seconds = train_seconds(path)
        described = ", ".join(f"{k}={v}" for k, v in options.items() if k != "guide_model") or "-"
        if guide_step is not None:
            described += f", guide=EMA@{guide_step}"
        print(f"| {i} | {label} | {name} | {cfg['steps']} | {seconds:.0f} | {cfg['sampler']} {cfg['sample_steps']}, "
              f"CFG {sampling.get('cfg_scale', 4.0)}, {described} | {nfe} | {m['accuracy']:.1%} | "
              f"{m['fd_classifier']:.2f} | {ratio:.1f}x | {m['precision']:.2f} | {m['recall']:.2f} |", flush=True)
    print(f"\n{len(y)} samples per row ({args.n_per_class} per class, same noise); real-vs-real FD at this count: "
          f"{m['fd_classifier_real_baseline']:.2f}")


if __name__ == "__main__":
    main()
