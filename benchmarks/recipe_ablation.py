"""The modern DiT recipe, one change at a time (LightningDiT-style table) at the demo's budget.

Each row adds one change to the row above, starting from the demo as it was (the paper's DiT blocks on
rectified flow with logit-normal t, CFG 4, Heun 20 steps). Training changes train a run (the demo config
plus the row's overrides, same steps and batch: equal images seen), reused when `--runs DIR/<name>` already
holds one; sampling changes reuse the run above. Every row draws the same digits from the same noise
(N per class) and is judged by `ditkit.evaluate`: class accuracy, FD-classifier and its ratio to the
real-vs-real baseline of the same count, k-NN precision and recall. Wall time is the run's training time
as its metrics.csv recorded it (on a shared machine: compare steps, not seconds).

    python benchmarks/recipe_ablation.py [--runs runs/ablation] [--n-per-class 30] [--rows 0 1 2 ...]

The README's first table is rows 0-10 at 30 per class (the new default's row also at 100 per class); its second
table (the training schedule) is rows 11-20 at 50 per class: `--rows 11 12 ... 19 --n-per-class 50`.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from common import digits, draw, trained_run

from ditkit.evaluate import evaluate
from ditkit.evaluate.classifier import load_classifier
from ditkit.pipeline import Pipeline
from ditkit.checkpoint import step_dir

# (label, run name, training overrides of the demo config, sampling options). Every run trains with the
# demo config (which keeps its step-400 EMA as the autoguidance model in RUN/guide) plus its overrides; the
# sampling options of each row are complete (nothing is taken from the run's record). "kept" says whether
# the change stays in the rows below (a change that did not help is measured and dropped, as LightningDiT's
# table does).
PAPER_SAMPLING = {"cfg_scale": 4.0, "cfg_interval": None, "apg_eta": None, "shift": None, "guide_model": None,
                      "guide_scale": None, "guide_unconditional": False}
AUTO = dict(PAPER_SAMPLING, cfg_scale=2.0, guide_model="run")  # the guide replaces the unconditional pass
BOTH = dict(PAPER_SAMPLING, guide_model="run", guide_scale=2.0)   # CFG plus autoguidance
CFG15 = dict(PAPER_SAMPLING, cfg_scale=1.5)
CONST = {"steps": 1100, "min_lr_ratio": 1.0}
ROWS: list[tuple[str, bool, str, dict[str, Any], dict[str, Any]]] = [
    ("demo before issue 14 (DiT blocks, logit-normal t)", True, "paper", {}, PAPER_SAMPLING),
    ("+ APG (eta 0)", False, "paper", {}, dict(PAPER_SAMPLING, apg_eta=0.0)),
    ("+ guidance interval t in [0.2, 0.8]", False, "paper", {}, dict(PAPER_SAMPLING, cfg_interval=(0.2, 0.8))),
    ("autoguidance by the step-400 EMA instead of CFG", False, "paper", {}, AUTO),
    ("autoguidance by the step-600 EMA, w 3", False, "paper", {}, dict(AUTO, cfg_scale=3.0, guide_model=600)),
    ("guide = step-400 EMA, unconditional (a weak CFG)", False, "paper", {}, dict(AUTO, guide_unconditional=True)),
    ("the same, w 4", False, "paper", {}, dict(AUTO, cfg_scale=4.0, guide_unconditional=True)),
    ("CFG 2 + autoguidance w 2 (step 400)", False, "paper", {}, dict(BOTH, cfg_scale=2.0)),
    ("CFG 4 in [0.2, 0.8] + autoguidance w 2", False, "paper", {}, dict(BOTH, cfg_interval=(0.2, 0.8))),
    ("CFG 3 + autoguidance w 2 (step 400): the first pass's default", True, "paper", {}, dict(BOTH, cfg_scale=3.0)),
    ("+ uniform t (training), autoguidance w 2", False, "uniform", {"timestep_sampling": "uniform"}, AUTO),
    # the second pass: the training schedule (rows 11-19 are the README's second table, at 50 per class)
    ("demo before issue 14, CFG 1.5", False, "paper", {}, CFG15),
    ("constant lr after warm-up (min_lr_ratio 1), 1,100 steps", True, "const", CONST, CFG15),
    ("+ lr 3e-3", True, "lr3", dict(CONST, lr=3e-3), CFG15),
    ("+ lr 5e-3", True, "lr5", dict(CONST, lr=5e-3), CFG15),
    ("lr 5e-3, CFG 1.75", False, "lr5", dict(CONST, lr=5e-3), dict(CFG15, cfg_scale=1.75)),
    ("lr 5e-3, CFG 2", False, "lr5", dict(CONST, lr=5e-3), dict(CFG15, cfg_scale=2.0)),
    ("lr 8e-3 (instead of 5e-3)", False, "lr8", dict(CONST, lr=8e-3), CFG15),
    ("lr 5e-3, CFG 2.5 for t in [0, 0.7] (none at high noise)", False, "lr5", dict(CONST, lr=5e-3),
     dict(CFG15, cfg_scale=2.5, cfg_interval=(0.0, 0.7))),
    ("lr 5e-3, CFG 2.5 for t in [0, 0.75]: the new default", True, "lr5", dict(CONST, lr=5e-3),
     dict(CFG15, cfg_scale=2.5, cfg_interval=(0.0, 0.75))),
]
# the recipe before issue 14: every row trains from it plus its overrides, so the table does not move when
# the defaults do
TRAIN = {"timestep_sampling": "logit_normal", "velocity_cosine_weight": 0.0, "model_args": {}, "ema_std": None,
         "sample_guide_step": 400, "save_every": 200, "keep_last": 10, "steps": 1200, "lr": 2e-3,
         "min_lr_ratio": 0.1, "ema_decay": 0.995, "batch_size": 64, "warmup_steps": 100, "mlp": "gelu"}


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
    parser.add_argument("--n-per-class", type=int, default=30)
    parser.add_argument("--rows", type=int, nargs="+", help="row numbers to run (default: all)")
    args = parser.parse_args()

    classifier = load_classifier()
    y, noise = digits(args.n_per_class)
    print("| # | change | kept | train steps | train s | sampling | NFE | accuracy | FD-classifier | FD ratio "
          "| precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (label, kept, name, train_overrides, options) in enumerate(ROWS):
        if args.rows and i not in args.rows:
            continue
        path = Path(args.runs) / name
        pipe, _ = trained_run(str(path), {**TRAIN, **train_overrides})
        cfg, run = pipe.info["train_config"], pipe.defaults
        options = dict(options)
        guide = options["guide_model"]
        if guide == "run":  # the run's own guide (older runs: their step-400 checkpoint's EMA, the same weights)
            options["guide_model"] = pipe.guide or Pipeline.load(step_dir(path, TRAIN["sample_guide_step"])).model
        elif isinstance(guide, int):
            options["guide_model"] = Pipeline.load(step_dir(path, guide)).model
        images, nfe, _ = draw(pipe, y, noise, **options)
        m = evaluate(images, y, classifier=classifier)
        ratio = m["fd_classifier"] / m["fd_classifier_real_baseline"]
        seconds = train_seconds(path)
        described = ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("guide_model", "cfg_scale")
                              and v not in (None, False)) or "-"
        if guide is not None:
            described += f", guide=EMA@{TRAIN['sample_guide_step'] if guide == 'run' else guide}"
        print(f"| {i} | {label} | {'yes' if kept else 'no'} | {cfg['steps']} | {seconds:.0f} | {run['sampler']} "
              f"{run['steps']}, w {options['cfg_scale']}, {described} | {nfe} | {m['accuracy']:.1%} | "
              f"{m['fd_classifier']:.2f} | {ratio:.2f}x | {m['precision']:.2f} | {m['recall']:.2f} |", flush=True)
    print(f"\n{len(y)} samples per row ({args.n_per_class} per class, same noise); real-vs-real FD at this count: "
          f"{m['fd_classifier_real_baseline']:.2f}")


if __name__ == "__main__":
    main()
