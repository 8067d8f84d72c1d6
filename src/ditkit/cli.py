"""`ditkit` command line: a thin layer over the Python API (everything here a script can do too)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from typing import Any


def cmd_flops(args: argparse.Namespace) -> int:
    from ditkit.evaluate import zoo_table

    for flag, value, least in (("--input-size", args.input_size, 1), ("--in-channels", args.in_channels, 1),
                               ("--num-classes", args.num_classes, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    table = zoo_table(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    size = f"{args.in_channels}x{args.input_size}x{args.input_size}"
    print(f"{'model':<10} {'params (M)':>11} {'GFLOPs':>9}   (forward MACs, {size} input)")
    for name, row in table.items():
        print(f"{name:<10} {row['params'] / 1e6:>11.1f} {row['gflops']:>9.2f}")
    return 0


TRAIN_FLAGS = ("data", "model", "objective", "steps", "minutes", "batch_size", "out", "seed", "save_every",
               "sample_every", "precision", "compile", "grad_checkpoint", "unconditional", "control", "base", "init",
               "lora_rank", "lora_alpha", "lora_targets", "classes")


def cmd_train(args: argparse.Namespace) -> int:
    from ditkit.train import build_config, train

    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS}  # None: not given (0 is a value, then validated)
    for key in ("lora_targets", "classes"):  # lists are comma-separated config values
        if overrides[key] is not None:
            overrides[key] = ",".join(overrides[key])
    if args.resume:  # the run's saved config, with the flags that do not change its identity
        config = resume_locked_first(args, overrides)
    else:
        config = build_config(args.config, overrides, args.assignments)
    result = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, one process reports
        return 0
    ran = result.steps - result.start_step
    print(f"trained {ran} steps{f' (steps {result.start_step + 1}..{result.steps})' if result.start_step else ''} "
          f"in {result.seconds:.0f} s ({result.images_per_second:.0f} images/s), final loss {result.final_loss:.4f}"
          + (f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""))
    print(f"checkpoint: {result.checkpoint}")
    for name in ("samples.png", "samples.gif", "loss_curve.png", "metrics.csv"):
        if (result.out / name).exists():
            print(f"{name + ':':<16}{result.out / name}")
    return 0


def resume_locked_first(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """resume_config; when it finds no checkpoint to resume, a run still in progress there (it has not
    written its first checkpoint yet) is the reason to report."""
    from ditkit.checksums import CheckpointError
    from ditkit.train import build_config, resume_config
    from ditkit.train.lock import check_unlocked

    try:
        return resume_config(args.config, overrides, args.assignments)
    except CheckpointError:
        check_unlocked(build_config(args.config, overrides, args.assignments).out)
        raise


def cmd_sample(args: argparse.Namespace) -> int:
    from ditkit.pipeline import Pipeline, describe

    pipe = Pipeline.load(args.ckpt, ema=args.ema, vae=args.vae, adapters=parse_adapters(args.adapter))
    pipe.check_output(args.out)  # before sampling, not after
    preset = pipe.paper_preset() if args.paper else {}
    classes = args.classes if args.classes is not None else preset.pop("classes", None)
    preset.pop("classes", None)
    given = {k: v for k, v in dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg, cache=args.cache,
                                   precision=args.precision, compile=args.compile).items() if v is not None}
    if args.guide_ckpt:  # autoguidance by another (weaker) run instead of the run's own guide
        given["guide_model"] = Pipeline.load(args.guide_ckpt, device=pipe.device).model
    n_per_class = args.n_per_class if args.n_per_class is not None else (1 if args.paper else 8)
    samples = pipe.generate(classes=classes, prompts=args.prompts, n_per_class=n_per_class, seed=args.seed,
                            frames=args.frames, first_frame=args.first_frame, extend=args.extend,
                            frame_conditioning=args.frame_conditioning, lora_scale=args.lora_scale,
                            **{**preset, **given})
    for note in samples.notes:
        print(f"note: {note}")
    pipe.save(samples, args.out)
    print(f"sampling: {describe(samples.settings)}")
    print(f"wrote {len(samples.images)} samples to {args.out}")
    return 0


def parse_adapters(items: list[str] | None) -> dict[str, float] | None:
    """--adapter RUN[:WEIGHT] ... -> {RUN: weight} (weight 1 when not given)."""
    if not items:
        return None
    out = {}
    for item in items:
        run, sep, weight = item.rpartition(":")
        try:
            out[run if sep else item] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--adapter {item}: expected RUN or RUN:WEIGHT with a number as the weight") from None
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    from ditkit.lora import merge_run

    out, gap = merge_run(args.ckpt, args.out, ema=args.ema)
    print(f"merged the adapter of {args.ckpt} into {out} (a standalone checkpoint; largest output difference "
          f"from the unfused model on a test batch: {gap:.1e})")
    print(f"sample: ditkit sample --ckpt {out} --out samples.png")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from ditkit.data.folder import check_image
    from ditkit.pipeline import Pipeline, describe

    check_image(args.image, "--image")  # before loading the model
    if args.mask:
        check_image(args.mask, "--mask")
    pipe = Pipeline.load(args.ckpt, ema=args.ema)
    pipe.check_output(args.out)
    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    samples = pipe.edit(args.image, mask=args.mask, strength=args.strength, class_label=args.class_,
                        prompt=args.prompt, n=args.n, sampler=args.sampler, steps=args.steps, cfg=args.cfg,
                        seed=args.seed, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample)
    for note in samples.notes:
        print(f"note: {note}")
    pipe.save(samples, args.out, scale=args.scale)
    print(f"sampling: {describe(samples.settings)}")
    print(f"wrote {args.n} {samples.settings['what']} image(s) (strength {samples.settings['strength']}) "
          f"to {args.out}")
    return 0


EVAL_ROWS = (("classifier_heldout_accuracy", "classifier accuracy, held-out real"),
             ("accuracy", "classifier accuracy, samples"),
             ("fd_classifier", "FD-classifier (vs held-out)"),
             ("precision", "precision (k-NN)"),
             ("recall", "recall (k-NN)"),
             ("fid", "Inception FID"),
             ("inception_score", "Inception Score"))


def cmd_eval(args: argparse.Namespace) -> int:
    from ditkit.evaluate import evaluate, evaluate_clips, load_samples
    from ditkit.evaluate.video import clip_metrics_table, load_clip_rule

    samples = args.samples or args.samples_file
    if not samples:
        raise ValueError("no samples given: ditkit eval FILE.npz (or --samples FILE.npz | DIR)")
    check_first_image(samples, "--samples")
    if args.reference != "mnist":
        check_first_image(args.reference, "--reference")
    # folder samples are read at the classifier's size for the mnist reference, else at their own
    size = dict(image_size=32, channels=1) if args.reference == "mnist" else {}
    images, labels = load_samples(samples, **size)
    if images.ndim == 5:  # clips (N, C, F, H, W) from a video run: per-frame metrics beside real clips'
        rule = load_clip_rule(samples)  # the run's data options, recorded by `ditkit sample`; flags override them
        rule.update({k: v for k, v in dict(motion=args.motion, speed=args.speed, digit_size=args.digit_size).items()
                     if v is not None})
        metrics = evaluate_clips(images, labels, **rule)
        print(json.dumps(metrics) if args.json else clip_metrics_table(metrics))
        return 0
    metrics = evaluate(images, labels, reference=args.reference, inception_weights=args.inception_weights)
    print(json.dumps(metrics) if args.json else image_metrics_table(metrics, samples, args.reference))
    return 0


def check_first_image(path: str, what: str) -> None:
    """A folder's first image is opened to learn its size: one Pillow refuses is named (the others are
    skipped with a warning when the folder is read)."""
    from ditkit.data.folder import check_image, list_images

    if os.path.isdir(path):
        check_image(list_images(path)[0][0][0], f"{what} {path}: its first image", decode=False)


def image_metrics_table(metrics: dict[str, float], samples: str, reference: str) -> str:
    lines = [f"{int(metrics['num_samples'])} samples from {samples}, reference {reference}",
             f"{'metric':<36} {'value':>10}"]
    for key, name in EVAL_ROWS:
        if key not in metrics:
            continue
        extra = ""
        if key == "fd_classifier":
            extra = f"   real-vs-real baseline (train vs held-out): {metrics['fd_classifier_real_baseline']:.4f}"
        elif key == "inception_score":
            extra = f"   (std {metrics['inception_score_std']:.3f})"
        lines.append(f"{name:<36} {metrics[key]:>10.4f}{extra}")
    return "\n".join(lines)


def cmd_convert(args: argparse.Namespace) -> int:
    from ditkit.interop.official import convert_official

    out = convert_official(args.from_official, args.out, num_heads=args.num_heads, ema=args.ema, vae=args.vae)
    config = json.loads((out / "config.json").read_text())
    print(f"converted {args.from_official} -> {out}: depth {config['depth']}, width {config['hidden_size']}, "
          f"{config['num_heads']} heads, patch {config['patch_size']}, input {config['input_size']}, "
          f"{config['num_classes']} classes")
    print(f"sample: ditkit sample --ckpt {out} --paper{'' if args.vae else ' --vae VAE_DIR'} --out samples.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ditkit.extras import require

    require("interop", "onnx", "onnxruntime", what="ditkit export")  # before loading anything
    from ditkit.interop.onnx import export_onnx, max_onnx_error
    from ditkit.pipeline import Pipeline

    model = Pipeline.load(args.ckpt, ema=args.ema).model
    path = export_onnx(model, args.out, opset=args.opset)
    print(f"wrote {path}: inputs x (N, {model.in_channels}, {model.input_size[0]}, {model.input_size[1]}) float32, "
          f"t (N,) float32, y (N,) int64; output (N, {model.out_channels}, ...); N dynamic")
    print(f"onnxruntime vs PyTorch, batch of 3: max abs difference {max_onnx_error(model, path):.2e}")
    return 0


def cmd_extract_latents(args: argparse.Namespace) -> int:
    from ditkit.data.latents import extract_latents, load_latents

    out = extract_latents(args.data, args.vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                          flip=args.flip, seed=args.seed)
    data = load_latents(out)
    print(f"{len(data)} latents {tuple(data.images.shape[1:])} of {data.num_classes} class(es) in {out}; "
          f"train with: ditkit train --data {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ditkit.app import serve

    serve(ckpt=args.ckpt, runs=args.runs, host=args.host, port=args.port, allow_remote=args.allow_remote)
    return 0


DEMO_MINUTES = 5.5  # the training budget; start-up, saving and the sample grid come on top


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train the default config on MNIST-5k, then sample a grid."""
    from ditkit.train import build_config, train

    out, n = args.out, 1
    while not args.resume and os.path.exists(os.path.join(out, "checkpoints")):  # never overwrite a run
        out, n = f"{args.out}-{n}", n + 1
    if out != args.out:
        print(f"demo: {args.out} holds an earlier run, so this one is written to {out} (the commands below "
              f"name {out}; --resume continues {args.out} instead)", flush=True)
    else:
        print(f"demo: {'continuing' if args.resume else 'writing'} the run in {out}", flush=True)
    # the demo promises minutes on a laptop: a wall-clock cap guards slower machines
    config = build_config(None, {"out": out, "minutes": DEMO_MINUTES}, args.assignments)
    start = time.perf_counter()
    result = train(config, resume=args.resume)
    print(f"\ndemo: {result.steps} steps of {config.batch_size} images in {result.seconds:.0f} s "
          f"({result.images_per_second:.0f} images/s), final loss {result.final_loss:.4f}; "
          f"total {time.perf_counter() - start:.0f} s")
    print(f"run:        {result.out}")
    print(f"samples:    {result.out / 'samples.png'}   (top row: real digits; below: generated, one column per class)")
    print(f"loss curve: {result.out / 'loss_curve.png'}")
    print(f"checkpoint: {result.checkpoint}   (ditkit sample --ckpt {result.out} --out grid.png)")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other bad input: one `ditkit CMD: error:` line
    (pointing at --help) instead of the usage block."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (ditkit {self.prog.split()[-1]} --help lists the flags)\n"
                  if self.prog != "ditkit" else f"ditkit: error: {message} (ditkit --help lists the commands)\n")


def _flag_group(*flags: tuple[str, dict[str, Any]]) -> argparse.ArgumentParser:
    """A parent parser holding flags that several commands share, so each is defined once."""
    parent = Parser(add_help=False)
    for name, options in flags:
        parent.add_argument(name, **options)
    return parent


EMA = ("--ema", dict(action=argparse.BooleanOptionalAction, default=True,
                     help="use the EMA weights (default; --no-ema: the raw model)"))
CKPT = ("--ckpt", dict(required=True, help="run directory or checkpoint directory"))
SAMPLING = (("--steps", dict(type=int, help="sampling steps (default: the run's)")),
            ("--sampler", dict(help="ddpm | ddim (Gaussian runs); euler | heun | sde (flow runs); default: the run's")),
            ("--cfg", dict(type=float, help="classifier-free guidance scale (1 = none; default: the run's)")),
            ("--seed", dict(type=int, default=0)))
ASSIGNMENTS = ("assignments", dict(nargs="*", metavar="key=value",
                                   help="any config key, e.g. lr=1e-4 or sample.steps=20 (see configs/)"))


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of config keys (see configs/)")
    p.add_argument("--data", help="mnist | patterns | a directory of images (one subfolder per class, or none) | "
                   "a latent cache from extract-latents")
    p.add_argument("--model", help="zoo name such as DiT-S/2, or custom (hidden_size=..., depth=...)")
    p.add_argument("--objective", choices=["flow", "ddpm"])
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float, help="wall-clock budget; stops at steps or minutes, whichever first")
    p.add_argument("--batch-size", type=int, help="global batch size (split across torchrun processes)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.csv, loss_curve.png, samples.png)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest good checkpoint, "
                   "with its saved config (flags may change only what does not define the run; a larger --steps "
                   "extends it)")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--sample-every", type=int, help="write an EMA sample grid every K steps")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute activations in backward")
    p.add_argument("--unconditional", action="store_true", default=None, help="ignore class labels")
    p.add_argument("--control", choices=["edges", "lowres"], help="train a structure-control branch on this "
                   "condition image; the --base model stays frozen")
    p.add_argument("--base", help="with --control: the base run (or checkpoint) directory")
    p.add_argument("--init", metavar="RUN_OR_CHECKPOINT", help="fine-tune from this trained model: a run, a "
                   "checkpoint directory, a diffusers directory or an original DiT .pt (docs/fine-tuning.md)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="with --init: train a LoRA adapter of rank R on the "
                   "frozen base instead of every weight (needs ditkit[lora])")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", nargs="+", metavar="TARGET", help="what the adapter wraps: attention, mlp, "
                   "modulation, or module names such as attn.qkv (default: attention mlp)")
    p.add_argument("--classes", nargs="+", metavar="NAME", help="with --init: the label set by name (default: the "
                   "base's classes, then the data's new ones)")


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class", dest="classes", type=int, nargs="+", help="class labels (default: all)")
    p.add_argument("--prompt", dest="prompts", nargs="+", metavar="TEXT",
                   help="text-to-image runs: one or more prompts, one column each (default: 10 training captions)")
    p.add_argument("--n-per-class", type=int, help="samples per class (default 8; 1 with --paper)")
    p.add_argument("--cache", type=float, metavar="THRESHOLD", help="reuse the DiT blocks' output while the "
                   "modulated input changed less than this (0..1; 0 = never)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast the model (guidance stays fp32; "
                   "default: bf16 for a run trained in bf16)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (needs a C++ compiler on the CPU)")
    p.add_argument("--guide-ckpt", help="autoguidance by this weaker run or checkpoint (EMA weights), e.g. an "
                   "early checkpoint of the same run, instead of the run's own guide (RUN/guide)")
    p.add_argument("--out", required=True, help="FILE.png (grid), FILE.npz (images in [-1, 1], labels) or DIR/ "
                   "(one PNG per sample, in a subfolder per class); video models: FILE.gif or FILE.mp4 "
                   "(needs imageio-ffmpeg), a grid of clips")
    p.add_argument("--paper", action="store_true", help="the original DiT sample.py: 250 DDPM steps, CFG 4.0 on "
                   "3 channels (and its 8 ImageNet classes for a 1000-class model)")
    p.add_argument("--vae", help="diffusers AutoencoderKL directory that decodes latents (default: the run's)")
    p.add_argument("--frames", type=int, help="frames per clip, video models (default: the frames trained on; more "
                   "are drawn by extension on a run trained with frame conditioning, context_share)")
    p.add_argument("--first-frame", metavar="IMAGE", help="video models: every clip starts with this image, kept "
                   "exactly (image-to-video)")
    p.add_argument("--extend", action=argparse.BooleanOptionalAction, default=None, help="video models: draw "
                   "--frames window by window, each conditioned on the last frames of the one before (default: "
                   "when --frames is more than the trained frames and the run was trained with context_share)")
    p.add_argument("--lora-scale", type=float, metavar="S", help="adapter runs: the adapter's weight (1: as "
                   "trained, 0: the base alone)")
    p.add_argument("--adapter", action="append", metavar="RUN[:WEIGHT]", help="adapter runs: add another adapter "
                   "run on the same base at this weight (repeatable)")
    p.add_argument("--frame-conditioning", choices=["trained", "inpaint"], help="video models: how given frames "
                   "are kept: trained (fed at t = 0; runs trained with context_share) or inpaint (training-free "
                   "RePaint); default: trained where the run was")


def add_edit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="input image (another size is centre-cropped and resized to "
                   "the model's; a control run: it gives the condition)")
    p.add_argument("--mask", help="inpainting mask of the image's size: white = regenerate, black = keep")
    p.add_argument("--strength", type=float, help="0 = the input unchanged .. 1 = from pure noise "
                   "(default: 1 with --mask or a control run, else 0.6)")
    p.add_argument("--class", dest="class_", type=int, metavar="K", help="class label (default: unconditional)")
    p.add_argument("--prompt", help="text prompt (text-to-image runs)")
    p.add_argument("--jump-length", type=int, default=1, help="inpainting: RePaint jump length in steps")
    p.add_argument("--jump-n-sample", type=int, default=1, help="inpainting: times each stretch is sampled")
    p.add_argument("--n", type=int, default=1, help="how many edits of the image (one row)")
    p.add_argument("--out", required=True, help="FILE.png: the edited image at its size (--n > 1: a row), or DIR/")
    p.add_argument("--scale", type=int, default=1, help="enlarge each pixel of --out to SCALE x SCALE")


def add_flops_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object {name: {params, gflops}}")
    p.add_argument("--input-size", type=int, default=32, help="latent/image side (32 = 256px SD-VAE latents)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)


def add_convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-official", required=True, metavar="FILE.pt",
                   help="DiT-XL-2-256x256.pt / 512x512 from the authors' release, or a checkpoint of their train.py")
    p.add_argument("--out", required=True, help="new checkpoint directory (config.json, model.safetensors, run.json)")
    p.add_argument("--num-heads", type=int, help="attention heads, when the size matches no zoo model")
    p.add_argument("--vae", help="diffusers AutoencoderKL directory to remember for decoding its samples")


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", required=True, help="FILE.onnx")
    p.add_argument("--opset", type=int, default=17)


def add_extract_latents_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="directory of images (one subfolder per class, or none)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL: a local directory (or a hub id "
                   "where a network exists), e.g. stabilityai/sd-vae-ft-ema")
    p.add_argument("--out", required=True, help="cache directory; rerun the same command to resume it")
    p.add_argument("--image-size", type=int, default=256, help="images are centre-cropped and resized to this")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--flip", action="store_true", help="also encode each image's mirror image")
    p.add_argument("--seed", type=int, default=0, help="seeds the posterior samples")


def add_merge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="RUN", help="an adapter run (or one of its checkpoints)")
    p.add_argument("--out", required=True, help="new checkpoint directory: the base with the adapter fused in")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples_file", nargs="?", metavar="SAMPLES", help="FILE.npz with images (N, C, H, W) or "
                   "clips (N, C, F, H, W) in [-1, 1] and optional labels, or a folder of images (DIR/<label>/*.png "
                   "as `ditkit sample --out DIR/` writes, or DIR/*.png)")
    p.add_argument("--samples", help="the same as SAMPLES")
    p.add_argument("--motion", choices=("class", "label", "bounce"),
                   help="clips: the moving-MNIST motion rule they follow (default: the one `ditkit sample` "
                   "recorded in the .npz, else class; the same for --speed and --digit-size)")
    p.add_argument("--speed", type=float, help="clips: pixels per frame (default image_size / 16, as moving MNIST)")
    p.add_argument("--digit-size", type=int, help="clips: digit side in pixels (default 7/16 of the frame)")
    p.add_argument("--reference", default="mnist", help="mnist (default) | a directory of images | FILE.npz")
    p.add_argument("--inception-weights", help="pytorch-fid pt_inception state dict: adds Inception FID and IS")
    p.add_argument("--json", action="store_true", help="print one JSON object of every metric")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ckpt", help="one run directory (or checkpoint directory)")
    where.add_argument("--runs", help="a directory: every run under it")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host reachable from other machines "
                   "(no login: anyone who reaches it can use it)")


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--resume", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ema, run, sampling, assignments = (_flag_group(EMA), _flag_group(CKPT, EMA), _flag_group(*SAMPLING),
                                       _flag_group(ASSIGNMENTS))
    commands = (  # name, help, shared flags, the command's own flags, what runs it
        ("flops", "parameters and forward GFLOPs of every zoo model", (), add_flops_flags, cmd_flops),
        ("train", "train a DiT (config file, flags, and key=value overrides)", (assignments,), add_train_flags,
         cmd_train),
        ("sample", "sample a grid (.png) or arrays for evaluation (.npz) from a run", (run, sampling),
         add_sample_flags, cmd_sample),
        ("convert", "an original DiT checkpoint (.pt) -> a ditkit checkpoint directory", (ema,), add_convert_flags,
         cmd_convert),
        ("export", "export a run's model for deployment (ONNX, dynamic batch)", (run,), add_export_flags,
         cmd_export),
        ("merge", "fuse an adapter run's LoRA into its base: a standalone checkpoint", (ema,), add_merge_flags,
         cmd_merge),
        ("extract-latents", "encode an image folder once with a VAE into a latent cache for `train --data CACHE`",
         (), add_extract_latents_flags, cmd_extract_latents),
        ("edit", "edit an image with a run: image-to-image, inpainting, structure control", (run, sampling),
         add_edit_flags, cmd_edit),
        ("eval", "sample-quality metrics of images (FD, precision/recall, FID, IS) or clips (per frame, motion)",
         (), add_eval_flags, cmd_eval),
        ("serve", "a local web page: sample and edit with runs, browse their loss curves, grids and checkpoints "
         "(needs ditkit[app])", (), add_serve_flags, cmd_serve),
        ("demo", "the main job: train on MNIST-5k, then sample", (assignments,), add_demo_flags, cmd_demo),
    )
    parser = Parser(prog="ditkit", description="Diffusion Transformers: train, sample, measure.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, text, parents, add_flags, func in commands:
        p = sub.add_parser(name, help=text, parents=list(parents))
        add_flags(p)
        p.set_defaults(func=func, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # `ditkit flops | head`: the reader has all it wants
        with contextlib.suppress(OSError):  # and Python's own flush at exit must not complain either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # key=value overrides may come between flags, which argparse's positionals do not allow
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "assignments"):
        args.assignments += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except EXPECTED_ERRORS as err:  # bad input or environment: one clear line, no traceback
        print(f"ditkit {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # TrainingInterrupted (checkpoint saved; 130/143) or a plain Ctrl-C
        print(f"ditkit {args.command}: {err or 'aborted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception:  # a bug: keep the traceback
        traceback.print_exc()
        print(f"ditkit {args.command}: this looks like a bug in ditkit; please report it with the traceback above "
              f"and the command you ran", file=sys.stderr)
        return 1


# ValueError covers bad values, unusable checkpoints (CheckpointError) and config files; OSError covers
# missing files, permissions, read-only disks and an --out that is a file
EXPECTED_ERRORS = (ValueError, OSError, ModuleNotFoundError)


def error_line(err: BaseException) -> str:
    """One line for an expected error."""
    if isinstance(err, ModuleNotFoundError):
        return f"this needs the {err.name} package, which is not installed (pip install {err.name})"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
