"""Training-step throughput and model FLOP utilisation (MFU), fp32 vs bf16 vs torch.compile.

Prints, for the demo config (and the same with the paper's tanh GELU) and for DiT-S/2 (32x32x4 latents,
batch 8), images/s and MFU of one AdamW training step, each as a ratio to an eager fp32 step of the same
model measured in this run, and the machine's matmul peak (fp32 and bf16) measured by this script.

    python benchmarks/train_throughput.py [--repeats 5] [--no-compile] [--xl] [--markdown]   (--xl: DiT-XL/2, GPU)
"""
from __future__ import annotations

import argparse
import time

import torch
from common import Table, add_markdown_flag

from ditkit.evaluate.flops import dit_example_inputs, forward_gflops
from ditkit.models import DiT, create_model
from ditkit.config import TrainConfig


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Measured GFLOP/s (2 n^3 per matmul) of a square matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    device_sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    device_sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def step_time(model: DiT, batch: int, precision: str, compiled: bool, device: torch.device, repeats: int) -> float:
    """Median seconds of one training step (forward, MSE loss, backward, AdamW)."""
    H, W = model.input_size
    x = torch.randn(batch, model.in_channels, H, W, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    model = model.to(device).train()
    fn = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    times = []
    for i in range(repeats + 2):  # two warm-up steps (and compilation)
        device_sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = fn(x, t, y).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        device_sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def demo_model(mlp: str | None = None) -> DiT:
    c = TrainConfig()
    return DiT(input_size=32, patch_size=c.patch_size, in_channels=1, hidden_size=c.hidden_size, depth=c.depth,
               num_heads=c.num_heads, num_classes=10, learn_sigma=False, mlp=mlp or c.mlp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--xl", action="store_true", help="also DiT-XL/2 at batch 32 (GPU)")
    add_markdown_flag(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(f"device: {name}; matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")

    cases = [("demo (MNIST, 1x32x32)", demo_model, TrainConfig().batch_size),
             ("demo, tanh GELU (paper)", lambda: demo_model("gelu"), TrainConfig().batch_size),
             ("DiT-S/2 (4x32x32)", lambda: create_model("DiT-S/2"), 8)]
    if args.xl:
        cases.append(("DiT-XL/2 (4x32x32)", lambda: create_model("DiT-XL/2"), 32))
    modes = [("fp32", False), ("bf16", False)] + ([] if args.no_compile else [("fp32", True), ("bf16", True)])
    print()
    table = Table(["model", "batch", "mode", "ms/step", "img/s", "x fp32", "MFU"], args.markdown)
    for label, build, batch in cases:
        torch.manual_seed(0)
        model = build()
        train_flops = 3 * 2 * forward_gflops(model, dit_example_inputs(model, "cpu")) * 1e9 * batch  # fwd + 2x bwd
        base = None
        for precision, compiled in modes:
            torch.manual_seed(0)
            seconds = step_time(build(), batch, precision, compiled, device, args.repeats)
            base = base or seconds
            mfu = train_flops / seconds / (peak[precision] * 1e9)
            mode = precision + (" + compile" if compiled else "")
            table.add(label, batch, mode, f"{seconds * 1e3:.1f}", f"{batch / seconds:.1f}", f"{base / seconds:.2f}",
                      f"{mfu:.1%}")
        del model
    table.finish()


if __name__ == "__main__":
    main()
