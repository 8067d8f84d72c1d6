"""Video recipes at equal wall-clock: each row trains configs/moving_mnist.yaml with its overrides from nothing
for the same minutes, samples 40 clips per class with the run's own settings, and judges them as
`ditkit eval clips.npz` does (frame accuracy, clip consistency, motion, per-frame FD ratio; real clips beside).

    python benchmarks/video_recipes.py [--minutes 10] [--rows NAME ...] [--root runs/video_recipes] [--markdown]

A row whose run folder already holds a checkpoint is judged again without training. The factorised row spends
its minutes on both phases (the image run gets `--image-share` of them).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import Table, add_markdown_flag

from ditkit.evaluate.video import evaluate_clips
from ditkit.pipeline import Pipeline
from ditkit.train import build_config, train
from ditkit.checkpoint import latest_checkpoint

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "moving_mnist.yaml"
FRAMES_CONFIG = CONFIG.with_name("moving_mnist_frames.yaml")
ROWS = {
    "tubelets 4x4x2, factorised": ["patch_size=4", "patch_t=2", "attention=factorized"],
    "tubelets 4x4x4, full": ["patch_size=4", "patch_t=4"],
    "patches 8x8x1, full (shipped)": [],
    "patches 8x8x1, full, 3D RoPE": ["model_args={rope: true}"],
    "factorised: image run + continuation": ["context_share=1.0", f"image_model={FRAMES_CONFIG}"],
}


def run_row(name: str, overrides: list[str], root: Path, minutes: float, image_share: float) -> tuple[Path, int]:
    out = root / name.split(":")[0].replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    if latest_checkpoint(out) is None:
        budget = [f"minutes={minutes}"]
        if any(o.startswith("image_model=") for o in overrides):
            budget = [f"minutes={minutes * (1 - image_share):g}", f"image_model_minutes={minutes * image_share:g}"]
        print(f"training {name} for {minutes:g} minutes ...", flush=True)
        train(build_config(str(CONFIG), None, [*overrides, *budget, f"out={out}"]), progress=False)
    return out, int(latest_checkpoint(out).name.split("_")[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each row's training")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--root", default="runs/video_recipes")
    parser.add_argument("--image-share", type=float, default=0.45, help="the factorised row's image-phase share")
    parser.add_argument("--n-per-class", type=int, default=40)
    add_markdown_flag(parser)
    args = parser.parse_args()
    table = Table(["recipe", "steps", "frame acc.", "consistency", "motion (steps)", "FD ratio"], args.markdown)
    for name in args.rows:
        out, steps = run_row(name, ROWS[name], Path(args.root), args.minutes, args.image_share)
        clips = Pipeline.load(out).generate(n_per_class=args.n_per_class, seed=0, progress=False)
        m = evaluate_clips(clips.images, clips.labels)
        table.add(name, steps, f"{m['frame_accuracy']:.1%}", f"{m['clip_consistency']:.1%}",
                  f"{m['motion']:.0%} ({m['motion_steps']:.1%})", f"{m['fd_ratio']:.1f}x")
    table.finish()
    print(f"real clips: frame accuracy {m['frame_accuracy_real']:.1%}, consistency {m['clip_consistency_real']:.1%}, "
          f"motion {m['motion_real']:.0%}")


if __name__ == "__main__":
    main()
