"""One-step training settings: each variant trains `configs/mnist_onestep.yaml`'s second phase (trajectory
distillation, or with MEANFLOW MeanFlow's JVP identity) from the same flow run (`--base`, e.g. a demo run) for
`--minutes`, then draws N digits per class at 1 step and at 2 steps on the uniform grid and on grids shifted by 2
and 3 (the config's) from the same noise, and judges them with ditkit's MNIST-5k classifier: accuracy,
FD-classifier as a ratio to the real-vs-real baseline at that size, recall. One row per variant, all in this
process, one after another (run nothing else on the machine: every variant has the same wall-clock budget).
With a demo run as `--base` the rows feed t x 1000 (the demo's flow_time_scale); with a base fed t x 10 (a
two-phase run's OUT/base) they keep the config's x 10 (`--variants identity identity_cfg_interval distill`).

    python benchmarks/onestep_recipes.py --base runs/mnist [--minutes 4] [--n-per-class 100] [--out runs/recipes]
        [--variants interval_x10 teacher_uniform ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import digits, draw

from ditkit.evaluate import evaluate
from ditkit.evaluate.classifier import load_classifier
from ditkit.pipeline import Pipeline
from ditkit.train import build_config, train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_onestep.yaml"
# key=value overrides of the config's second phase, row by row. MEANFLOW trains MeanFlow's identity instead of
# distilling: the base run as its teacher (the identity's v is the base's guided velocity), CFG 2.5 on [0, 0.75],
# uniform (t, r), half of the pairs with r < t. The rows before `identity` feed t x 1000 (AT_X1000, with a
# demo run as base) and guide at every t (IDENTITY); those before `teacher` regress the one-sample noise - x0.
MEANFLOW = ["objective=meanflow", "meanflow_teacher=true", "meanflow_cfg=2.5", "meanflow_cfg_interval=[0, 0.75]",
            "timestep_sampling=uniform", "meanflow_unequal=0.5", "meanflow_adaptive_p=1.0"]
BEFORE_TEACHER = ["meanflow_teacher=false"]
AT_X1000 = ["flow_time_scale=1000", "meanflow_interval_scale=0.01"]  # every row: t x 1000, t - r x 10
IDENTITY = [*MEANFLOW, "meanflow_cfg_interval=null"]  # MeanFlow's identity with guidance at every t
VARIANTS = {
    "interval_x1000": [*BEFORE_TEACHER, "meanflow_interval_scale=1.0"],
    "interval_x1000_cfg2": [*BEFORE_TEACHER, "meanflow_interval_scale=1.0", "meanflow_cfg=2.0"],
    "interval_x10": BEFORE_TEACHER,
    "interval_x1": [*BEFORE_TEACHER, "meanflow_interval_scale=0.001"],
    "batch32": [*BEFORE_TEACHER, "batch_size=32"],
    "lr2e-3": [*BEFORE_TEACHER, "lr=2e-3"],
    "unequal0.25": [*BEFORE_TEACHER, "meanflow_unequal=0.25"],
    "unequal0.75": [*BEFORE_TEACHER, "meanflow_unequal=0.75"],
    "cfg2": [*BEFORE_TEACHER, "meanflow_cfg=2.0"],
    "teacher": [],
    "teacher_unequal0.75": ["meanflow_unequal=0.75"],
    "teacher_uniform": ["timestep_sampling=uniform"],
    "teacher_uniform_cfg2": ["timestep_sampling=uniform", "meanflow_cfg=2.0"],
    "teacher_uniform_cfg3": ["timestep_sampling=uniform", "meanflow_cfg=3.0"],
    "teacher_uniform_p0.5": ["timestep_sampling=uniform", "meanflow_adaptive_p=0.5"],
    "teacher_uniform_ema0.995": ["timestep_sampling=uniform", "ema_decay=0.995"],
    "teacher_uniform_unequal0.25": ["timestep_sampling=uniform", "meanflow_unequal=0.25"],
    "teacher_uniform_batch128": ["timestep_sampling=uniform", "batch_size=128"],
    # from a base fed t x 10 (a two-phase run's OUT/base)
    "identity": IDENTITY,
    "identity_cfg_interval": MEANFLOW,
    "distill": [],  # the config's second phase as it is
}
X1000_ROWS = list(VARIANTS)[:list(VARIANTS).index("identity")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the flow run every variant fine-tunes (its EMA weights)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time of each variant")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--out", default="runs/onestep_recipes", help="one run directory per variant in here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()

    base = Path(args.base)  # a run directory (config.json) or one of its checkpoints (run.json)
    saved = (json.loads((base / "config.json").read_text()) if (base / "config.json").is_file()
             else json.loads((base / "run.json").read_text())["train_config"])
    base_scale = saved.get("flow_time_scale", 1000)
    pins = AT_X1000 if base_scale == 1000 else []
    classifier = load_classifier()
    y, noise = digits(args.n_per_class)
    print(f"{'variant':<20} {'steps':>6} {'1 step':>7} {'FD/real':>8} {'recall':>7} {'2 steps':>8} {'FD/real':>8}"
          f" {'shift 2':>8} {'FD/real':>8} {'shift 3':>8} {'FD/real':>8}", flush=True)
    for name in args.variants:
        out = Path(args.out) / name
        c = build_config(str(CONFIG), {"out": str(out), "base": args.base, "minutes": args.minutes},
                         ["steps=100000", "save_every=100000", *pins, *(IDENTITY if name in X1000_ROWS else []),
                          *VARIANTS[name]])
        result = train(c, progress=False)
        pipe = Pipeline.load(out)
        row = []
        for steps, shift in ((1, None), (2, None), (2, 2.0), (2, 3.0)):
            images, _, _ = draw(pipe, y, noise, steps=steps, shift=shift)
            m = evaluate(images, y, classifier=classifier)
            row.append((m["accuracy"], m["fd_classifier"] / m["fd_classifier_real_baseline"], m["recall"]))
        (a1, r1, rec1), *two = row
        print(f"{name:<20} {result.steps:>6} {a1:>7.1%} {r1:>7.2f}x {rec1:>7.2f}"
              + "".join(f" {a:>8.1%} {r:>7.2f}x" for a, r, _ in two), flush=True)


if __name__ == "__main__":
    main()
