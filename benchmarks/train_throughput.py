"""Training throughput: the trainer against an earlier commit's, its own overhead, and one training step per mode.

Four tables:

1. The trainer (`ditkit.train.trainer.train_step` on the demo config, configs/mnist.yaml) against the same
   function of an earlier commit (`--against`, exported with `git archive`), each in its own worker process
   started side by side; the two take turns, `--block` steps at a time, and steps `--from` to `--steps` are
   timed (images/s and the ratio). Also the first 50 steps' losses of both, from the same draws: the earlier
   commit's data sampler drew B(B+1)/2 indices and noise for them per step where a step trains on B, so for
   this comparison its worker draws B (the `sampler-fixed` row, also timed), and the loss curves differ only
   by the arithmetic of the changed kernels.
2. The trainer's own share of a step (data, time and noise draws, EMA, the lr, logging) from the profiler's
   record_function scopes in `train_step` over 50 steps.
3. On a CPU, attention's forward and backward in bf16 per kernel: ditkit's (two matmuls around a bf16 softmax),
   the same around a float32 softmax, and SDPA's default and math kernels, at the demo's and DiT-S/2's shapes.
4. One AdamW training step per mode (fp32, bf16, + torch.compile) of the demo model and of DiT-S/2 (32x32x4
   latents, batch 8), as ratios to eager fp32 in this process, with MFU against the matmul peak measured here;
   with CUDA, DiT-XL/2 at 256x256 (32x32x4 latents) in bf16 with the flash SDPA kernel, eager and compiled.

    python benchmarks/train_throughput.py [--against b45eb2a] [--steps 400 --from 100] [--repeats 5]
                                          [--no-compile] [--skip trainer,overhead,attention,modes] [--markdown]

Set OMP_NUM_THREADS (both workers inherit it) to compare at a fixed thread count.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import Table, add_markdown_flag

REPO = Path(__file__).resolve().parents[1]
LOSS_STEPS = 50  # the loss curve compared between the two trainers


# ------------------------------------------------------------------------------------------------
# Table 1: the trainer against an earlier commit's (each in a train_worker.py process)
# ------------------------------------------------------------------------------------------------

class Worker:
    """A worker process on the tree `src` (None: this checkout)."""

    def __init__(self, src: Path | None, config: str, fix_sampler: bool = False):
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(Path(__file__).with_name("train_worker.py")), config]
        cmd += ["--fix-sampler"] if fix_sampler else []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        ready = json.loads(self._line())
        self.src, self.batch, self.tokens = ready["ready"], ready["batch"], ready["tokens"]

    def _line(self) -> str:
        """The next answer (a JSON line; anything the trainer itself prints is passed through)."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the training worker ({' '.join(self.proc.args)}) ended without an answer")
            if line.startswith("{"):
                return line
            print(line, end="")

    def steps(self, n: int) -> dict:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def export_tree(ref: str, into: str) -> Path:
    """`git archive REF` unpacked under `into`; returns its src/ folder."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return Path(into) / "src"


def trainer_table(args: argparse.Namespace) -> None:
    """Table 1: this checkout's trainer against `args.against`'s, taking turns in blocks of steps."""
    with tempfile.TemporaryDirectory() as tree:
        workers = {"this checkout": Worker(None, args.config)}
        if args.against != "none":
            src = export_tree(args.against, tree)
            workers[args.against] = Worker(src, args.config)
            workers[f"{args.against}, sampler-fixed"] = Worker(src, args.config, fix_sampler=True)
        names = list(workers)
        batch, tokens = workers["this checkout"].batch, workers["this checkout"].tokens
        losses = {name: workers[name].steps(LOSS_STEPS)["losses"] for name in names}
        for name in names:  # untimed warm-up to step --from
            workers[name].steps(max(0, args.start - LOSS_STEPS))
        seconds = dict.fromkeys(names, 0.0)
        done, block = args.start, args.block
        while done < args.steps:
            n = min(block, args.steps - done)
            order = names if (done // block) % 2 == 0 else names[::-1]
            for name in order:
                seconds[name] += workers[name].steps(n)["seconds"]
            done += n
        for w in workers.values():
            w.close()
    timed = args.steps - args.start
    print(f"\ntrainer on {args.config} (batch {batch}, {tokens} tokens per sample): steps {args.start}-{args.steps} "
          f"timed, turns of {block} steps, {torch.get_num_threads()} threads")
    ref = seconds.get(args.against, seconds["this checkout"])
    table = Table(["trainer", "ms/step", "samples/s", "tokens/s", f"x {names[min(1, len(names) - 1)]}"],
                  args.markdown)
    for name in names:
        per = seconds[name] / timed
        table.add(name, f"{per * 1e3:.1f}", f"{batch / per:.1f}", f"{batch * tokens / per:.0f}",
                  f"{ref / seconds[name]:.2f}")
    table.finish()
    if args.against == "none":
        return
    a, b = losses["this checkout"], losses[f"{args.against}, sampler-fixed"]
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    print(f"loss over steps 1-{LOSS_STEPS}: largest relative difference {worst:.4%} between this checkout and "
          f"{args.against} (sampler-fixed); mean {sum(a) / len(a):.4f} vs {sum(b) / len(b):.4f}")


# ------------------------------------------------------------------------------------------------
# Table 2: the trainer's own share of a step
# ------------------------------------------------------------------------------------------------

def overhead_table(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile
    from tqdm.auto import tqdm

    from ditkit.config import build_config
    from ditkit.train import distributed, trainer

    steps = 50
    config = args.config if Path(args.config).exists() else str(REPO / args.config)  # as the workers read it
    with tempfile.TemporaryDirectory() as out:
        c = build_config(config, {"out": out})
        run = trainer.build_run(c, distributed.setup(), None)
        run.model.train()
        for _ in range(20):
            trainer.train_step(run)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            window = []
            for _ in range(steps):
                loss, grad_norm = trainer.train_step(run)
                window.append(loss)
            total = time.perf_counter() - start
        bar = tqdm(disable=True)
        start = time.perf_counter()
        for _ in range(10):  # the log point: every log_every steps
            trainer.log(run, window, grad_norm, 1.0, 1, bar, None)
        log_share = (time.perf_counter() - start) / 10 / c.log_every
    scopes = {e.key: e.cpu_time_total / 1e6 / steps for e in prof.key_averages() if e.key.startswith("train.")}
    per_step = total / steps
    print(f"\nthe trainer's share of a step ({args.config}, {steps} steps profiled, {per_step * 1e3:.1f} ms/step "
          f"under the profiler)")
    table = Table(["phase", "ms/step", "share"], args.markdown)
    rows = [("train.draw: data, flips, label drop, t, noise", scopes.get("train.draw", 0.0)),
            ("train.ema: EMA update", scopes.get("train.ema", 0.0)),
            (f"log (every {c.log_every} steps, per step)", log_share),
            ("train.update: clip + AdamW", scopes.get("train.update", 0.0)),
            ("train.model: forward + backward", scopes.get("train.model", 0.0))]
    for label, sec in rows:
        table.add(label, f"{sec * 1e3:.2f}", f"{sec / per_step:.1%}")
    table.finish()
    own = sum(sec for label, sec in rows[:3])
    print(f"trainer overhead (draws, EMA, logging): {own / per_step:.1%} of a step")


# ------------------------------------------------------------------------------------------------
# Table 3: CPU bf16 attention, forward + backward, per kernel
# ------------------------------------------------------------------------------------------------

def attention_table(args: argparse.Namespace) -> None:
    """ditkit's CPU bf16 attention (two matmuls, bf16 softmax) against SDPA (its default and its math kernel) and
    the same matmuls around a float32 softmax, at the demo's and DiT-S/2's head shapes, taking turns."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ditkit.models.layers import attention

    def float_softmax(q, k, v):
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return scores.float().softmax(dim=-1).to(v.dtype) @ v

    def sdpa_math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    kernels = {"ditkit (bf16 softmax)": attention, "matmuls + float32 softmax": float_softmax,
               "SDPA (default kernel)": F.scaled_dot_product_attention, "SDPA (math kernel)": sdpa_math}
    shapes = [("demo", (32, 4, 64, 32)), ("DiT-S/2", (8, 6, 256, 64))]
    print(f"\nCPU bf16 attention, forward + backward ({torch.get_num_threads()} threads)")
    table = Table(["heads of", "(N, heads, T, d)", "kernel", "ms", "x ditkit"], args.markdown)
    for label, shape in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shape, generator=g).bfloat16().requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=g).bfloat16()
        times = {name: [] for name in kernels}
        for i in range(2 + 2 * args.repeats):
            for name in (list(kernels) if i % 2 == 0 else list(kernels)[::-1]):
                start = time.perf_counter()
                kernels[name](q, k, v).backward(grad)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
        median = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        for name in kernels:
            table.add(label, str(shape), name, f"{median[name] * 1e3:.2f}",
                      f"{median[name] / median['ditkit (bf16 softmax)']:.2f}")
    table.finish()


# ------------------------------------------------------------------------------------------------
# Table 4: one training step per mode
# ------------------------------------------------------------------------------------------------

def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Measured GFLOP/s (2 n^3 per matmul) of a square matmul in `dtype`."""
    n = 8192 if device.type == "cuda" else n
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


def step_time(model: torch.nn.Module, batch: int, precision: str, compiled: bool, device: torch.device,
              repeats: int, flash: bool = False) -> float:
    """Median seconds of one training step (forward, MSE loss, backward, AdamW)."""
    H, W = model.input_size
    x = torch.randn(batch, model.in_channels, H, W, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    model = model.to(device).train()
    fn = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    if flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else:
        kernel = contextlib.nullcontext()
    times = []
    with kernel:
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


def demo_model(mlp: str | None = None) -> torch.nn.Module:
    from ditkit.config import TrainConfig
    from ditkit.models import DiT

    c = TrainConfig()
    return DiT(input_size=32, patch_size=c.patch_size, in_channels=1, hidden_size=c.hidden_size, depth=c.depth,
               num_heads=c.num_heads, num_classes=10, learn_sigma=False, mlp=mlp or c.mlp)


def modes_table(args: argparse.Namespace) -> None:
    from ditkit.config import TrainConfig
    from ditkit.evaluate.flops import dit_example_inputs, forward_gflops
    from ditkit.models import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(f"\ndevice: {name}; matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    cases = [("demo (MNIST, 1x32x32)", demo_model, TrainConfig().batch_size, False),
             ("demo, tanh GELU (paper)", lambda: demo_model("gelu"), TrainConfig().batch_size, False),
             ("DiT-S/2 (4x32x32)", lambda: create_model("DiT-S/2"), 8, False)]
    modes = [("fp32", False), ("bf16", False)] + ([] if args.no_compile else [("fp32", True), ("bf16", True)])
    if device.type == "cuda":  # the paper's 256x256 ImageNet model, in bf16 with the flash kernel
        cases = [("DiT-XL/2 (4x32x32), flash SDPA", lambda: create_model("DiT-XL/2"), 32, True)] + cases
    table = Table(["model", "batch", "mode", "ms/step", "img/s", "x fp32", "MFU"], args.markdown)
    for label, build, batch, flash in cases:
        torch.manual_seed(0)
        model = build()
        train_flops = 3 * 2 * forward_gflops(model, dit_example_inputs(model, "cpu")) * 1e9 * batch  # fwd + 2x bwd
        base = None
        for precision, compiled in ([("bf16", False), ("bf16", True)] if flash else modes):
            torch.manual_seed(0)
            seconds = step_time(build(), batch, precision, compiled, device, args.repeats, flash=flash)
            base = base or seconds
            mfu = train_flops / seconds / (peak[precision] * 1e9)
            mode = precision + (" + compile" if compiled else "")
            table.add(label, batch, mode, f"{seconds * 1e3:.1f}", f"{batch / seconds:.1f}", f"{base / seconds:.2f}",
                      f"{mfu:.1%}")
        del model
    table.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="b45eb2a",
                        help="the commit whose trainer table 1 compares with (none: this checkout's alone)")
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--steps", type=int, default=400, help="table 1: the last step timed")
    parser.add_argument("--from", dest="start", type=int, default=100, help="table 1: the first step timed")
    parser.add_argument("--block", type=int, default=25, help="table 1: steps per turn")
    parser.add_argument("--repeats", type=int, default=5, help="tables 3 and 4: timed repeats")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip", default="",
                        help="comma-separated tables to leave out: trainer, overhead, attention, modes")
    add_markdown_flag(parser)
    args = parser.parse_args()
    if not LOSS_STEPS <= args.start < args.steps:
        parser.error(f"--from must be in [{LOSS_STEPS}, --steps)")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "trainer" not in skip:
        trainer_table(args)
    if "overhead" not in skip:
        overhead_table(args)
    if "attention" not in skip and not torch.cuda.is_available():
        attention_table(args)
    if "modes" not in skip:
        modes_table(args)


if __name__ == "__main__":
    main()
