"""Quality of the main job: are the demo's digits recognisable and of the requested class?

Trains the default config (or reuses a finished run in --run), samples N digits per class with the
EMA weights, and judges them with ditkit's MNIST-5k classifier (trained on the training split): its
held-out accuracy (its own ceiling), its accuracy on the samples, and FD-classifier with precision/recall.

    python benchmarks/demo_quality.py [--run runs/demo_quality] [--n-per-class 100] [--cfg S] [--steps N] [--markdown]

--markdown prints the metrics as the README's demo table (its noise is this script's, fixed per digit, so the
numbers differ a little from `ditkit sample` + `ditkit eval`, which the README quotes).
"""
from __future__ import annotations

import argparse

from common import add_markdown_flag, digits, draw, markdown_table, trained_run

from ditkit.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo_quality", help="trained here unless it already holds a run")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the run's)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the run's)")
    parser.add_argument("--sampler", help="sampler (default: the run's)")
    add_markdown_flag(parser)
    args = parser.parse_args()

    pipe, train_seconds = trained_run(args.run, {})
    y, noise = digits(args.n_per_class)
    images, nfe, sample_seconds = draw(pipe, y, noise, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg)
    m = evaluate(images, y)
    if args.markdown:
        real = m["fd_classifier_real_baseline"]
        print("\n".join(markdown_table(
            ["accuracy (class asked for)", "FD-classifier", "real-vs-real FD", "FD ratio", "precision", "recall"],
            [[f"{m['accuracy']:.1%}", f"{m['fd_classifier']:.2f}", f"{real:.2f}", f"{m['fd_classifier'] / real:.2f}x",
              f"{m['precision']:.2f}", f"{m['recall']:.2f}"]])))
        return
    cfg = pipe.defaults
    print(f"{'run':<28} {args.run}")
    print(f"{'train time':<28} {'reused' if train_seconds is None else f'{train_seconds:.0f} s'}")
    print(f"{'sampling':<28} {args.sampler or cfg['sampler'] or 'default sampler'}, {nfe} NFE, "
          f"cfg {cfg['cfg'] if args.cfg is None else args.cfg}: {sample_seconds:.0f} s for {len(y)} digits")
    print(f"{'classifier, held-out real':<28} {m['classifier_heldout_accuracy']:.1%}")
    print(f"{'classifier, generated':<28} {m['accuracy']:.1%}  ({args.n_per_class} per class)")
    print(f"{'FD-classifier':<28} {m['fd_classifier']:.2f}  "
          f"(real-vs-real baseline {m['fd_classifier_real_baseline']:.2f})")
    print(f"{'precision / recall':<28} {m['precision']:.2f} / {m['recall']:.2f}")


if __name__ == "__main__":
    main()
