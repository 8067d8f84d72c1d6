"""`ditkit` command line: a thin layer over the Python API (everything here a script can do too)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def cmd_flops(args: argparse.Namespace) -> int:
    from ditkit.evaluate import zoo_table

    table = zoo_table(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'model':<10} {'params (M)':>11} {'GFLOPs':>9}   (forward MACs, {args.in_channels}x{args.input_size}x{args.input_size} input)")
    for name, row in table.items():
        print(f"{name:<10} {row['params'] / 1e6:>11.1f} {row['gflops']:>9.2f}")
    return 0


TRAIN_FLAGS = ("data", "model", "objective", "steps", "minutes", "batch_size", "out", "seed", "save_every",
               "sample_every", "precision", "compile", "grad_checkpoint", "unconditional")


def cmd_train(args: argparse.Namespace) -> int:
    from ditkit.train import build_config, train

    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS}
    overrides = {k: v for k, v in overrides.items() if v not in (None, False)}
    config = build_config(args.config, overrides, args.assignments)
    result = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, one process reports
        return 0
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.images_per_second:.0f} images/s), "
          f"final loss {result.final_loss:.4f}"
          + (f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""))
    print(f"checkpoint: {result.checkpoint}")
    for name in ("samples.png", "loss_curve.png", "metrics.csv"):
        if (result.out / name).exists():
            print(f"{name + ':':<16}{result.out / name}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ditkit.images import save_grid
    from ditkit.io import atomic_path
    from ditkit.pipeline import load_pipeline
    from ditkit.sampling import sample

    if not args.out.endswith((".png", ".npz")):
        raise ValueError(f"--out must end in .png (an image grid) or .npz (arrays for evaluation), got {args.out}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.ckpt, ema=args.ema, device=device)
    K = pipe.num_classes
    conditional = pipe.info.get("conditional", K > 1)
    classes = args.classes if args.classes is not None else (list(range(K)) if conditional else [0])
    bad = [k for k in classes if not 0 <= k < K]
    if bad:
        raise ValueError(f"--class {bad} out of range: this model has classes 0..{K - 1}")
    y = torch.tensor(classes, device=device).repeat(args.n_per_class)
    H, W = pipe.model.input_size
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = sample(pipe.model, pipe.objective, (len(y), pipe.model.in_channels, H, W), y=y,
                    cfg_scale=args.cfg if conditional else 1.0, steps=args.steps, sampler=args.sampler,
                    generator=generator).float().clamp(-1, 1).cpu()
    if args.out.endswith(".npz"):
        with atomic_path(args.out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images.numpy(), labels=y.cpu().numpy())
    else:
        save_grid(args.out, images, nrow=len(classes))
    print(f"wrote {len(y)} samples to {args.out}")
    return 0


EVAL_ROWS = (("classifier_heldout_accuracy", "classifier accuracy, held-out real"),
             ("accuracy", "classifier accuracy, samples"),
             ("fd_classifier", "FD-classifier (vs held-out)"),
             ("precision", "precision (k-NN)"),
             ("recall", "recall (k-NN)"),
             ("fid", "Inception FID"),
             ("inception_score", "Inception Score"))


def cmd_eval(args: argparse.Namespace) -> int:
    from ditkit.evaluate import evaluate, load_samples

    images, labels = load_samples(args.samples)
    metrics = evaluate(images, labels, reference=args.reference, inception_weights=args.inception_weights)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{int(metrics['num_samples'])} samples from {args.samples}, reference {args.reference}")
    print(f"{'metric':<36} {'value':>10}")
    for key, name in EVAL_ROWS:
        if key not in metrics:
            continue
        extra = ""
        if key == "fd_classifier":
            extra = f"   real-vs-real baseline (train vs held-out): {metrics['fd_classifier_real_baseline']:.4f}"
        elif key == "inception_score":
            extra = f"   (std {metrics['inception_score_std']:.3f})"
        print(f"{name:<36} {metrics[key]:>10.4f}{extra}")
    return 0


DEMO_MINUTES = 4.5


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train the default config on MNIST-5k, then sample a grid."""
    from ditkit.train import build_config, train

    out, n = args.out, 1
    while not args.resume and os.path.exists(os.path.join(out, "checkpoints")):  # never overwrite a run
        out, n = f"{args.out}-{n}", n + 1
    # the demo promises minutes on a laptop: a wall-clock cap guards slower machines (~4 min here)
    config = build_config(None, {"out": out, "minutes": DEMO_MINUTES}, args.assignments)
    start = time.perf_counter()
    result = train(config, resume=args.resume)
    print(f"\ndemo: {result.steps} steps of {config.batch_size} images in {result.seconds:.0f} s "
          f"({result.images_per_second:.0f} images/s), final loss {result.final_loss:.4f}; "
          f"total {time.perf_counter() - start:.0f} s")
    print(f"samples:    {result.out / 'samples.png'}   (top row: real digits; below: generated, one column per class)")
    print(f"loss curve: {result.out / 'loss_curve.png'}")
    print(f"checkpoint: {result.checkpoint}   (ditkit sample --ckpt {result.out} --out grid.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Diffusion Transformers: train, sample, measure.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="parameters and forward GFLOPs of every zoo model")
    p.add_argument("--json", action="store_true", help="print one JSON object {name: {params, gflops}}")
    p.add_argument("--input-size", type=int, default=32, help="latent/image side (32 = 256px SD-VAE latents)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("train", help="train a DiT (config file, flags, and key=value overrides)")
    p.add_argument("--config", help="YAML or JSON file of TrainConfig keys (see configs/)")
    p.add_argument("--data", help="mnist | patterns | a directory of images (one subfolder per class, or none)")
    p.add_argument("--model", help="zoo name such as DiT-S/2, or custom (hidden_size=..., depth=...)")
    p.add_argument("--objective", choices=["flow", "ddpm"])
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float, help="wall-clock budget; stops at steps or minutes, whichever first")
    p.add_argument("--batch-size", type=int, help="global batch size (split across torchrun processes)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.csv, loss_curve.png, samples.png)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest good checkpoint")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--sample-every", type=int, help="write an EMA sample grid every K steps")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward")
    p.add_argument("--unconditional", action="store_true", help="ignore class labels")
    p.add_argument("assignments", nargs="*", metavar="key=value", help="any TrainConfig field, e.g. lr=1e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a grid (.png) or arrays for evaluation (.npz) from a run")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights (default)")
    p.add_argument("--class", dest="classes", type=int, nargs="+", help="class labels (default: all)")
    p.add_argument("--n-per-class", type=int, default=8)
    p.add_argument("--steps", type=int, help="sampling steps (default: the sampler's)")
    p.add_argument("--sampler", help="ddpm | ddim (Gaussian runs); euler | heun | sde (flow runs)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (images in [-1, 1], labels)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="sample-quality metrics of an .npz of samples (FD, precision/recall, FID, IS)")
    p.add_argument("--samples", required=True, help="FILE.npz with images (N, C, H, W) in [-1, 1] and optional labels")
    p.add_argument("--reference", default="mnist", help="mnist (default) | a directory of images | FILE.npz")
    p.add_argument("--inception-weights", help="pytorch-fid pt_inception state dict: adds Inception FID and IS")
    p.add_argument("--json", action="store_true", help="print one JSON object of every metric")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the main job: train on MNIST-5k, then sample")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--resume", action="store_true")
    p.add_argument("assignments", nargs="*", metavar="key=value", help="override any TrainConfig field")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come between flags, which argparse's positionals do not allow
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "assignments"):
        args.assignments += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
