"""Image-to-video and longer clips from one video run: each clip starts from the first frame of a real clip of
held-out digits (MNIST-5k's held-out split: digits the model never saw), kept either by the trained form
(the frame fed clean at t = 0: a run trained with context_share) or by the training-free one (RePaint on the
later frames); and clips of `--long` frames drawn by extension, each window conditioned on the last frames of
the one before. Judged as `ditkit eval` judges clips, with real clips of the same length beside:

    python benchmarks/video_continuation.py --run RUN [--n-per-class 40] [--long 32] [--markdown]

first frame: PSNR of the output's first frame against the given one; identity: the later frames the digit
classifier reads as the given digit's class; consistency: clips whose every frame does; motion: clips whose
every step moves by the data's rule, and clips with >= 80% of their steps right (the longer-clip measure).
"""
from __future__ import annotations

import argparse

import torch
from common import Table, add_markdown_flag

from ditkit.data.moving_mnist import CLIP_RULE
from ditkit.evaluate.classifier import load_classifier
from ditkit.evaluate.video import evaluate_clips, frame_classes, real_clips
from ditkit.pipeline import Pipeline


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2); identical images count as 100 dB."""
    err = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return float(torch.where(err > 0, 10 * torch.log10(4 / err.clamp_min(1e-20)), torch.full_like(err, 100.0)).mean())


def judge(clips: torch.Tensor, labels: torch.Tensor, given: torch.Tensor | None, rule: dict) -> dict[str, float]:
    digit_size = rule.get("digit_size") or max(1, clips.shape[-1] * 7 // 16)  # moving MNIST's default
    m = evaluate_clips(clips, labels, **rule)
    k = 0 if given is None else given.shape[2]
    classes, _ = frame_classes(load_classifier(), clips[:, :, k:], digit_size)
    m["identity"] = float((classes == labels[:, None]).float().mean())
    m["first_psnr"] = psnr(clips[:, :, :k], given) if k else float("nan")
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a video run (moving MNIST, motion class)")
    parser.add_argument("--n-per-class", type=int, default=40)
    parser.add_argument("--long", type=int, default=32, help="frames of the extended clips")
    add_markdown_flag(parser)
    args = parser.parse_args()
    pipe = Pipeline.load(args.run)
    config = pipe.info.get("train_config", {})
    data = config.get("data_args", {})
    rule = {k: data[k] for k in CLIP_RULE if k in data}  # the clips' rule, for real clips and the judge
    frames, size = int(pipe.info.get("frames") or pipe.model.num_frames), pipe.image_size[0]
    labels = torch.arange(10).repeat(args.n_per_class)  # the samples' order: every class, n_per_class times
    real = real_clips(labels, frames, size, split="heldout", seed=1, **rule)
    given = real[:, :, :1]
    rows = []
    forms = ["trained", "inpaint"] if config.get("context_share") else ["inpaint"]
    for form in forms:
        s = pipe.generate(n_per_class=args.n_per_class, first_frame=given, frame_conditioning=form, seed=0,
                          progress=False)
        rows.append((f"image-to-video, {form}", frames, judge(s.images, s.labels, given, rule)))
    s = pipe.generate(n_per_class=args.n_per_class, frames=args.long, seed=0, progress=False)
    rows.append((f"{args.long} frames by extension ({s.settings.get('frame_conditioning', 'one window')})",
                 args.long, judge(s.images, s.labels, None, rule)))
    table = Table(["clips", "frames", "first frame", "identity", "consistency", "motion (every step)",
                   "motion (>= 80% of steps)", "FD ratio"], args.markdown)
    for name, f, m in rows:
        first = f"{m['first_psnr']:.0f} dB" if m["first_psnr"] == m["first_psnr"] else "-"
        table.add(name, f, first, f"{m['identity']:.1%}", f"{m['clip_consistency']:.1%}", f"{m['motion']:.1%}",
                  f"{m['motion_most_steps']:.1%}", f"{m['fd_ratio']:.1f}x")
    for _, f, m in (rows[0], rows[-1]):  # the real clips' numbers at both lengths
        table.add(f"real clips ({f} frames)", f, "-", f"{m['frame_accuracy_real']:.1%}",
                  f"{m['clip_consistency_real']:.1%}", f"{m['motion_real']:.1%}", f"{m['motion_most_steps_real']:.1%}",
                  "1.0x")
    table.finish()


if __name__ == "__main__":
    main()
