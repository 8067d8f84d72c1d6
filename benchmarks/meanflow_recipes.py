"""Teacher-free one-step recipes at equal steps: each variant trains a second phase from the same flow run
(`--base`, fed t x 10: a two-phase run's OUT/base, or `ditkit train --config configs/mnist.yaml
flow_time_scale=10`) for `--steps` steps (no time limit, so a busy machine only slows the rows down; the
seconds column says how long each took here), then draws N digits per class from the same noise at 1 step and
at 2 steps (the grid shifted by 3, t = 1 -> 0.75 -> 0) and judges them with ditkit's MNIST-5k classifier:
accuracy, FD-classifier as a ratio to the real-vs-real baseline at that size, recall.

Variants (all start from the base's weights; only `distill` calls the base as a teacher):
  meanflow        the paper's loss on u (JVP along noise - x0), CFG 2.5 folded into the target
  v_loss          iMF's loss on v (JVP along the network's own velocity), CFG 2.5 folded
  v_loss_guidance the config (configs/mnist_meanflow.yaml): the v-loss with the CFG scale an input, w ~ U[1, 4]
  distill         configs/mnist_onestep.yaml's second phase: the base's guided ODE trajectories regressed
With `v_loss_guidance` a second table: the one model sampled at each `--scales` W (`ditkit sample --cfg W`).

    python benchmarks/meanflow_recipes.py --base RUN/base [--steps 600] [--n-per-class 100]
        [--out runs/meanflow_recipes] [--variants meanflow v_loss ...] [--scales 1 1.5 2 2.5 3 4] [--markdown]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import Table, add_markdown_flag, digits, draw

from ditkit.evaluate import evaluate
from ditkit.evaluate.classifier import load_classifier
from ditkit.pipeline import Pipeline
from ditkit.train import build_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FOLDED = ["meanflow_cfg_range=null", "meanflow_cfg=2.5", "sample.cfg_scale=1.0"]  # one scale in the weights
VARIANTS = {  # (config file, key=value overrides, the CFG scale the ablation row samples at)
    "meanflow": ("mnist_meanflow.yaml", ["meanflow_loss=u", *FOLDED], 1.0),
    "v_loss": ("mnist_meanflow.yaml", FOLDED, 1.0),
    "v_loss_guidance": ("mnist_meanflow.yaml", [], 2.0),  # the config's default scale
    "distill": ("mnist_onestep.yaml", [], 1.0),
}


def scores(pipe: Pipeline, y, noise, classifier, steps: int, cfg: float) -> tuple[float, float, float]:
    """(accuracy, FD ratio to real-vs-real, recall) of digits drawn in `steps` steps at CFG `cfg`."""
    images, _, _ = draw(pipe, y, noise, steps=steps, cfg_scale=cfg, shift=3.0 if steps > 1 else None)
    m = evaluate(images, y, classifier=classifier)
    return m["accuracy"], m["fd_classifier"] / m["fd_classifier_real_baseline"], m["recall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the flow run (fed t x 10) every variant starts from")
    parser.add_argument("--steps", type=int, default=600, help="training steps of each variant")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--out", default="runs/meanflow_recipes", help="one run directory per variant in here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
                        help="the CFG scales of the guidance table")
    add_markdown_flag(parser)
    args = parser.parse_args()

    base = Path(args.base)
    saved = json.loads((base / "config.json").read_text())
    if saved.get("objective") != "flow" or saved.get("flow_time_scale") != 10.0:
        raise SystemExit(f"--base {base} must be a flow run fed t x 10 (flow_time_scale: 10), got objective="
                         f"{saved.get('objective')}, flow_time_scale={saved.get('flow_time_scale')}")
    classifier = load_classifier()
    y, noise = digits(args.n_per_class)
    table = Table(["variant", "steps", "seconds", "steps/s", "1 step: accuracy", "FD ratio", "recall",
                   "2 steps: accuracy", "FD ratio"], args.markdown)
    steered = None
    for name in args.variants:
        config, overrides, cfg = VARIANTS[name]
        out = Path(args.out) / name
        c = build_config(str(CONFIGS / config), {"out": str(out), "base": str(base)},
                         [f"steps={args.steps}", "minutes=null", f"save_every={args.steps}", *overrides])
        result = train(c, progress=False)
        pipe = Pipeline.load(out)
        a1, r1, rec1 = scores(pipe, y, noise, classifier, 1, cfg)
        a2, r2, _ = scores(pipe, y, noise, classifier, 2, cfg)
        label = name if cfg == 1.0 else f"{name} (cfg {cfg:g})"
        table.add(label, result.steps, f"{result.seconds:.0f}", f"{result.steps / result.seconds:.2f}",
                  f"{a1:.1%}", f"{r1:.2f}x", f"{rec1:.2f}", f"{a2:.1%}", f"{r2:.2f}x")
        if name == "v_loss_guidance":
            steered = pipe
    table.finish()
    if steered is None:
        return
    print()
    guided = Table(["CFG scale W", "1 step: accuracy", "FD ratio", "recall", "2 steps: accuracy", "FD ratio"],
                   args.markdown)
    for w in args.scales:
        a1, r1, rec1 = scores(steered, y, noise, classifier, 1, w)
        a2, r2, _ = scores(steered, y, noise, classifier, 2, w)
        guided.add(f"{w:g}", f"{a1:.1%}", f"{r1:.2f}x", f"{rec1:.2f}", f"{a2:.1%}", f"{r2:.2f}x")
    guided.finish()


if __name__ == "__main__":
    main()
