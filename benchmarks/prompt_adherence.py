"""Prompt adherence of the text-to-image configs on the captioned shapes, judged by pixel statistics.

Trains configs/shapes_mmdit.yaml and configs/shapes_pixart.yaml at their default budget (or reuses
finished runs), samples 100 prompts drawn from the caption set (Heun 20 steps, CFG 4), and prints the
fraction of samples with the prompted colour, shape and position (and all three), beside the same
model's unconditional samples judged against the same prompts (the chance level of the judge).

    python benchmarks/prompt_adherence.py [--configs configs/shapes_mmdit.yaml ...] [--n 100] [--grid DIR] [--markdown]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import Table, add_markdown_flag

from ditkit.evaluate.shapes import prompt_adherence
from ditkit.images import save_grid
from ditkit.pipeline import Pipeline
from ditkit.sampling import CFG, sample
from ditkit.train import build_config, train
from ditkit.checkpoint import latest_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/shapes_mmdit.yaml", "configs/shapes_pixart.yaml"])
    parser.add_argument("--n", type=int, default=100, help="prompts (one sample each)")
    parser.add_argument("--grid", help="also write a grid of 10 prompts x 4 samples per config into this folder")
    add_markdown_flag(parser)
    args = parser.parse_args()

    results = Table(["config", "train s", "samples", "colour", "shape", "position", "all three"], args.markdown)
    for path in args.configs:
        config = build_config(path, {}, [])
        seconds = None
        if latest_checkpoint(config.out) is None:
            seconds = train(config, progress=False).seconds
        pipe = Pipeline.load(config.out)
        captions = pipe.info["class_names"]
        pick = torch.randint(len(captions), (args.n,), generator=torch.Generator().manual_seed(0))
        prompts = [captions[i] for i in pick]
        table = pipe.with_prompts(prompts)
        shape = (args.n, pipe.model.in_channels, *table.input_size)
        for name, y, cfg in (("prompted", torch.arange(args.n), config.sample.cfg_scale),
                             ("unconditional", torch.full((args.n,), args.n), 1.0)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                x = sample(table, pipe.objective, shape, y=y, guidance=CFG(cfg), steps=20, sampler="heun",
                           generator=torch.Generator().manual_seed(1), progress=False).float().clamp(-1, 1)
            s = prompt_adherence(x, prompts)
            train_s = "reused" if seconds is None else f"{seconds:.0f}"
            results.add(Path(path).name, train_s, name,
                        *(f"{s[k]:.0%}" for k in ("colour", "shape", "position", "all")))
        if args.grid:
            grid_prompts = prompts[:10]
            table = pipe.with_prompts(grid_prompts)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                x = sample(table, pipe.objective, (40, *shape[1:]), y=torch.arange(10).repeat(4), guidance=CFG(4.0),
                           steps=20, generator=torch.Generator().manual_seed(2), progress=False).float()
            out = Path(args.grid) / f"{Path(path).stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_grid(out, x.clamp(-1, 1), nrow=10, scale=2)
            print(f"grid: {out} (columns: {'; '.join(grid_prompts)})")
    results.finish()


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
