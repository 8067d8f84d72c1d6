"""The text LoRA demo, judged by the shapes evaluator (pixel statistics, no learned judge): prompts with the new
caption word and prompts of the base's own words, each sampled with the adapter run and with its base, and the
adapter's size as a share of the base's weights file.

    ditkit train --config configs/shapes_lora.yaml --out runs/shapes_lora
    python benchmarks/lora_text.py --run runs/shapes_lora [--n 150] [--grid FILE.png] [--markdown]

The run's settings sample every prompt (Heun 20 steps, CFG 4); `--n` samples per prompt set, cycling through
its captions (the new word's 15: every shape at every position).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import Table, add_markdown_flag
from lora_quality import trained_share

from ditkit import checkpoint as ckpt
from ditkit.data.shapes import COLOURS, POSITIONS, SHAPES, caption
from ditkit.evaluate.shapes import prompt_adherence
from ditkit.images import save_grid
from ditkit.pipeline import Pipeline


def captions_of(colours: list[str], n: int) -> list[str]:
    """n captions cycling through every (colour, shape, position) of `colours`."""
    every = [caption(c, s, p) for c in colours for s in SHAPES for p in POSITIONS]
    return [every[i % len(every)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an adapter run on a shapes text model (configs/shapes_lora.yaml)")
    parser.add_argument("--n", type=int, default=150, help="samples per prompt set")
    parser.add_argument("--grid", help="also write a grid: the new word's prompts, base above adapter")
    add_markdown_flag(parser)
    args = parser.parse_args()
    config = json.loads((Path(args.run) / "config.json").read_text())
    new = list((config.get("data_args") or {}).get("colours") or [])
    old = [c for c in COLOURS if c not in new]
    step = ckpt.resolve_checkpoint(args.run)
    base = json.loads((step / "run.json").read_text())["init"]["base"]["path"]
    runs = {"adapter": Pipeline.load(args.run), "base": Pipeline.load(base)}
    table = Table(["prompts", "model", "n", "colour", "shape", "position", "all three"], args.markdown)
    for words, colours in ((f"new word ({', '.join(new)})", new), (f"base's words ({', '.join(old)})", old)):
        prompts = captions_of(colours, args.n)
        for name, pipe in runs.items():
            x = pipe.generate(prompts=prompts, seed=1, progress=False).images
            s = prompt_adherence(x, prompts)
            table.add(words, name, len(prompts), *(f"{s[k]:.1%}" for k in ("colour", "shape", "position", "all")))
    mb, share = trained_share(args.run)
    table.finish()
    print(f"adapter: {mb:.2f} MB, {share:.1%} of the base's weights file")
    if args.grid:
        prompts = captions_of(new, 10)
        rows = [runs[k].generate(prompts=prompts, seed=2, progress=False).images for k in ("base", "adapter")]
        save_grid(args.grid, torch.cat(rows).clamp(-1, 1), nrow=10, scale=2)
        print(f"grid: {args.grid} (columns: {'; '.join(prompts)}; top row base, bottom row adapter)")


if __name__ == "__main__":
    main()
