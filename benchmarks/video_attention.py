"""Memory and time of one VideoDiT training step: full vs factorised vs windowed attention, as clips grow.

For each attention mode and 4, 8, 16, 32 frames of 32x32 (4x4 patches: 64 tokens a frame), one step of
flow-matching loss + backward + AdamW on a batch of clips, fp32. Each configuration runs in a fresh
process, so that its peak memory is its own: CUDA's max_memory_allocated on a GPU, else the growth of
the process's peak resident memory (ru_maxrss) during the steps, over what model and optimiser already held.

    python benchmarks/video_attention.py [--frames 4 8 16 32] [--batch 2] [--repeats 3] [--hidden 128 --depth 4]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import Table, add_markdown_flag

from ditkit.diffusion import FlowMatching
from ditkit.models import VideoDiT

MODES = ("full", "factorized", "windowed")


def measure(mode: str, frames: int, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per training step and peak extra memory (MiB) of one configuration, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = VideoDiT(input_size=32, num_frames=frames, patch_size=4, in_channels=1, hidden_size=args.hidden,
                     depth=args.depth, num_heads=args.heads, num_classes=10, attention=mode,
                     window=(2, 4, 4)).to(device)
    objective = FlowMatching()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(args.batch, 1, frames, 32, 32, device=device)
    y = torch.arange(args.batch, device=device) % 10
    t = torch.rand(args.batch, device=device)

    def step() -> None:
        loss = objective.training_losses(model, x0, t, {"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: creates the optimiser state, so the baseline below holds it
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": statistics.median(times), "mib": max(0, peak - base) / 2**20,
            "tokens": frames * 64, "device": device.type}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    add_markdown_flag(p)
    p.add_argument("--one", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return
    shared = ["--batch", str(args.batch), "--repeats", str(args.repeats), "--hidden", str(args.hidden),
              "--depth", str(args.depth), "--heads", str(args.heads)]
    print(f"VideoDiT training step (hidden {args.hidden}, depth {args.depth}, batch {args.batch} clips of 32x32, "
          f"4x4 patches, windows 2x4x4 tokens), median of {args.repeats}")
    table = Table(["frames", "tokens", *(f"{m} {unit}" for m in MODES for unit in ("s/step", "MiB"))], args.markdown)
    for frames in args.frames:
        row = []
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--one", mode, str(frames), *shared],
                                 capture_output=True, text=True, check=True)
            row.append(json.loads(out.stdout.strip().splitlines()[-1]))
        table.add(frames, row[0]["tokens"], *(v for r in row for v in (f"{r['seconds']:.3f}", f"{r['mib']:.0f}")))
    table.finish()
    print(f"(device: {row[0]['device']}; memory: peak growth during the steps over model + optimiser state)")


if __name__ == "__main__":
    main()
