"""`ditkit` command line: a thin layer over the Python API (everything here a script can do too)."""
from __future__ import annotations

import argparse
import json
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


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ditkit.models import create_model

    cmd_flops(argparse.Namespace(json=False, input_size=32, in_channels=4, num_classes=1000))
    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=32, in_channels=1, num_classes=10)
    x, t, y = torch.randn(8, 1, 32, 32), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    start = time.perf_counter()
    out = model(x, t, y)
    out.square().mean().backward()
    print(f"\nDiT-S/4 on 8 x 1x32x32: forward + backward in {time.perf_counter() - start:.2f} s, "
          f"output {tuple(out.shape)}")
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

    p = sub.add_parser("demo", help="the main job")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
