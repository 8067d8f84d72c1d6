"""More GFLOPs, better samples? The DiT paper's scaling claim (its Fig. 2/6) on MNIST-5k, on a CPU.

Three ditkit-sized analogues of the paper's DiT-S/4, DiT-S/2 and DiT-B/4 keep the paper's ratios:
S -> B doubles the width (and heads) at the same depth, /4 -> /2 halves the patch (4x the tokens);
each is about 4x the forward GFLOPs of S/4. The S/4 analogue is the demo model. All train the demo recipe
(flow matching, bf16) twice: for the same number of images, and for the same wall-clock budget. Each is
then judged on the same digits (N per class, same noise, Heun 20 steps, CFG 4) by ditkit's MNIST-5k
classifier: FD-classifier vs the held-out split (lower is better) and class accuracy.

    python benchmarks/quality_vs_compute.py [--steps 600] [--minutes 2.5] [--regime images time] [--out runs/qvc]
"""
from __future__ import annotations

import argparse

from common import Table, add_markdown_flag, digits, draw, trained_run

from ditkit.evaluate import evaluate
from ditkit.evaluate.classifier import load_classifier
from ditkit.evaluate.flops import count_params, dit_example_inputs, forward_gflops
from ditkit.checkpoint import latest_checkpoint

ANALOGUES = {  # paper name -> demo-sized architecture with the paper's width/patch ratios
    "S/4": dict(hidden_size=128, num_heads=4, depth=6, patch_size=4),
    "S/2": dict(hidden_size=128, num_heads=4, depth=6, patch_size=2),
    "B/4": dict(hidden_size=256, num_heads=8, depth=6, patch_size=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="'images' regime: steps of 64 images each")
    parser.add_argument("--minutes", type=float, default=2.5, help="'time' regime: wall-clock budget per model")
    parser.add_argument("--regime", nargs="+", choices=["images", "time"], default=["images", "time"])
    parser.add_argument("--n-per-class", type=int, default=30)
    parser.add_argument("--out", default="runs/qvc", help="runs go to OUT/<regime>-<model>; existing ones are reused")
    add_markdown_flag(parser)
    args = parser.parse_args()

    classifier = load_classifier()
    y, noise = digits(args.n_per_class)
    table = Table(["budget", "model", "params", "GFLOPs", "steps (images)", "train s", "FD-classifier", "accuracy"],
                  args.markdown)
    for regime in args.regime:
        # the step cap of the time regime is never reached: the budget stops every model
        budget = {"steps": args.steps} if regime == "images" else {"steps": 10**6, "minutes": args.minutes}
        for name, arch in ANALOGUES.items():
            # a step-based lr schedule would differ between models in the time regime: keep it flat there
            schedule = {} if regime == "images" else {"min_lr_ratio": 1.0}
            pipe_dir = f"{args.out}/{regime}-{name.replace('/', '')}"
            pipe, seconds = trained_run(pipe_dir,
                                        {**arch, **budget, **schedule, "save_every": 10**6})
            steps = int(latest_checkpoint(pipe_dir).name.removeprefix("step_"))
            gflops = forward_gflops(pipe.model, dit_example_inputs(pipe.model, device="cpu"))
            images, _, _ = draw(pipe, y, noise, sampler="heun", steps=20, cfg_scale=4.0)
            m = evaluate(images, y, classifier=classifier)
            budget_name = f"{args.steps} steps of 64" if regime == "images" else f"{args.minutes:g} min"
            table.add(budget_name, name, f"{count_params(pipe.model) / 1e6:.2f}M", f"{gflops:.3f}",
                      f"{steps} ({steps * 64:,})", "reused" if seconds is None else f"{seconds:.0f}",
                      f"{m['fd_classifier']:.1f}", f"{m['accuracy']:.1%}")
    table.finish()
    print(f"\n{len(y)} samples per model; real-vs-real FD-classifier baseline at this size: "
          f"{m['fd_classifier_real_baseline']:.2f}")


if __name__ == "__main__":
    main()
