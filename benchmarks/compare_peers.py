"""ditkit's DiT against diffusers' DiTTransformer2DModel: training-step and sampling throughput.

Builds the same architecture on both sides (DiT-S/2 on 32x32x4 latents with learned sigma and 1000
classes, and the demo config of `TrainConfig()`), then measures in this process, alternating the two
implementations repeat by repeat, images/s of
  - one training step (forward, MSE loss, backward, AdamW) at batch 8 (DiT-S/2) / 64 (demo), and
  - sampling: a network forward pass under `torch.inference_mode()` at batch 32 / 256,
in fp32 and bf16 autocast, and prints each pair as a ratio ditkit / diffusers, and each as a ratio to diffusers'
fp32 eager step (`x peer fp32`).

With `--run RUN` (a demo run, e.g. from `ditkit demo`), also sampling precision on that model: its own sampler
and settings for `--samples` digits from fixed noise in fp32, bf16 autocast and int8 (torchao's int8 dynamic
quantization when torchao is installed, else PyTorch's own dynamic quantization of the Linear layers; weights and
activations int8, the rest float32), each timed and scored by the digit classifier (accuracy, FD against the
held-out digits, that FD over the real-image baseline's) and by its distance from the fp32 samples.

diffusers is an optional extra:  pip install 'ditkit[peers]'

    python benchmarks/compare_peers.py [--repeats 3] [--only demo|dit-s2] [--run RUN [--samples 500]] [--markdown]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable

import torch
from common import Table, add_markdown_flag
from torch import nn

from ditkit.interop.diffusers import to_diffusers
from ditkit.models import DiT, create_model
from ditkit.config import TrainConfig

try:
    from diffusers import DiTTransformer2DModel
except ImportError:  # pragma: no cover - depends on the environment
    DiTTransformer2DModel = None


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def peer_of(model: DiT) -> nn.Module:
    """diffusers' DiTTransformer2DModel with the same layout and weights as a ditkit adaLN-Zero DiT."""
    return to_diffusers(model)


def demo_model() -> DiT:
    c = TrainConfig()
    return DiT(input_size=32, patch_size=c.patch_size, in_channels=1, hidden_size=c.hidden_size, depth=c.depth,
               num_heads=c.num_heads, num_classes=10, learn_sigma=False)


def make_inputs(model: DiT, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    H, W = model.input_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_channels, H, W, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)  # integer timesteps: both sides accept them
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def call_ditkit(model: nn.Module, x, t, y) -> torch.Tensor:
    return model(x, t, y)


def call_diffusers(model: nn.Module, x, t, y) -> torch.Tensor:
    return model(hidden_states=x, timestep=t, class_labels=y).sample


def train_step_fn(model: nn.Module, call: Callable, batch: int, ref: DiT, precision: str,
                  device: torch.device) -> Callable[[], None]:
    x, t, y = make_inputs(ref, batch, device)
    target = torch.randn(batch, ref.out_channels, *ref.input_size, device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = call(model, x, t, y)
        loss = (out.float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sample_step_fn(model: nn.Module, call: Callable, batch: int, ref: DiT, precision: str,
                   device: torch.device) -> Callable[[], None]:
    x, t, y = make_inputs(ref, batch, device)
    model.eval()
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                      enabled=dtype is not None):
            call(model, x, t, y)

    return step


def timed(fn: Callable[[], None], device: torch.device) -> float:
    device_sync(device)
    start = time.perf_counter()
    fn()
    device_sync(device)
    return time.perf_counter() - start


def compare(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved repeat by repeat (order alternating)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name], device))
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["demo", "dit-s2", "none"], default=None,
                        help="one model of the diffusers comparison (none: only the --run table)")
    parser.add_argument("--run", help="a demo run: add the sampling-precision table (fp32, bf16, int8) on it")
    parser.add_argument("--samples", type=int, default=500, help="digits per precision for --run")
    add_markdown_flag(parser)
    args = parser.parse_args()
    if DiTTransformer2DModel is None:
        print("diffusers is not installed: pip install 'ditkit[peers]'")
        return 1
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}, diffusers {diffusers.__version__}")

    # (label, builder, train batch, sampling batch)
    cases = [("demo (MNIST, 1x32x32)", demo_model, TrainConfig().batch_size, 256),
             ("DiT-S/2 (4x32x32)", lambda: create_model("DiT-S/2"), 8, 32)]
    if args.only:
        cases = {"demo": cases[:1], "dit-s2": cases[1:], "none": []}[args.only]

    rows = []
    for label, build, train_batch, sample_batch in cases:
        torch.manual_seed(0)
        ours = build().to(device)
        theirs = peer_of(ours).to(device)
        out_ours = call_ditkit(ours.eval(), *make_inputs(ours, 2, device))
        out_theirs = call_diffusers(theirs.eval(), *make_inputs(ours, 2, device))
        assert out_ours.shape == out_theirs.shape, (out_ours.shape, out_theirs.shape)
        processor = type(theirs.transformer_blocks[0].attn1.processor).__name__
        print(f"\n{label}: parameters ditkit {param_count(ours):,} ({param_count(ours, True):,} trainable), "
              f"diffusers {param_count(theirs):,} ({param_count(theirs, True):,} trainable); "
              f"diffusers attention processor {processor}")
        # diffusers keeps a timestep + label embedder inside every block's AdaLayerNormZero (its converted
        # checkpoints copy one embedder into all of them) and none outside; ditkit has one, shared. ditkit's
        # fixed sin-cos pos_embed is a frozen Parameter, diffusers' a buffer.
        per_block = param_count(theirs.transformer_blocks[0].norm1.emb)
        extra = (len(theirs.transformer_blocks) - 1) * per_block
        same = param_count(ours, True) + extra == param_count(theirs, True)
        print(f"  diffusers - ditkit trainable = {param_count(theirs, True) - param_count(ours, True):,} = "
              f"{len(theirs.transformer_blocks) - 1} extra per-block embedders x {per_block:,}: "
              f"{'architectures otherwise equal' if same else 'UNEXPLAINED DIFFERENCE'}")
        for mode, batch, make, warmup in (("train", train_batch, train_step_fn, 2),
                                          ("sample", sample_batch, sample_step_fn, 1)):
            for precision in ("fp32", "bf16"):
                # fresh models per measurement so optimiser state / parameter values start equal
                torch.manual_seed(0)
                ours = build().to(device)
                theirs = peer_of(ours).to(device)
                fns = {"ditkit": make(ours, call_ditkit, batch, ours, precision, device),
                       "diffusers": make(theirs, call_diffusers, batch, ours, precision, device)}
                sec = compare(fns, device, args.repeats, warmup)
                rows.append((label, mode, batch, precision, batch / sec["ditkit"], batch / sec["diffusers"]))
                del fns, ours, theirs

    if rows:
        print()
        table = Table(["model", "mode", "batch", "precision", "ditkit img/s", "diffusers img/s", "ditkit/diffusers",
                       "x peer fp32"], args.markdown)
        peer_fp32 = {(label, mode): b for label, mode, _, precision, _, b in rows if precision == "fp32"}
        for label, mode, batch, precision, a, b in rows:
            table.add(label, mode, batch, precision, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}",
                      f"{a / peer_fp32[label, mode]:.2f}")
        table.finish()
    if args.run:
        sampling_precision_table(args)
    return 0


# ------------------------------------------------------------------------------------------------
# Sampling precision on a trained demo model: fp32, bf16 autocast, int8
# ------------------------------------------------------------------------------------------------

def int8_model(model: nn.Module) -> tuple[nn.Module, str]:
    """A copy of `model` with int8 Linear layers (dynamic: activations quantized per call), and its name."""
    model = copy.deepcopy(model).eval()
    try:
        import torchao.quantization as tq
    except ImportError:
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore")
            quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        return quantized, "int8 (torch.ao dynamic)"
    # the config class of recent torchao releases, the function of earlier ones
    config = getattr(tq, "Int8DynamicActivationInt8WeightConfig", None) or tq.int8_dynamic_activation_int8_weight
    tq.quantize_(model, config())
    return model, "int8 (torchao dynamic)"


def draw_at(pipe, model: nn.Module, precision: str | None, y: torch.Tensor, noise: torch.Tensor,
            chunk: int = 250) -> tuple[torch.Tensor, float]:
    """The run's own sampler and settings on `model` at `precision` (None: float32); images and seconds."""
    from ditkit.sampling import sample

    options = {k: v for k, v in pipe.sample_kwargs(pipe.settings()).items() if k not in ("precision", "compile")}
    images, start = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(y), chunk):
            out = sample(model, pipe.objective, noise[i:i + chunk].shape, y=y[i:i + chunk], noise=noise[i:i + chunk],
                         generator=torch.Generator().manual_seed(i), progress=False, precision=precision,
                         guided_channels=pipe.model.in_channels, null_label=pipe.model.num_classes, **options)
            images.append(out.float().clamp(-1, 1))
    return torch.cat(images), time.perf_counter() - start


def sampling_precision_table(args: argparse.Namespace) -> None:
    from common import digits

    from ditkit.evaluate.classifier import load_classifier
    from ditkit.evaluate.metrics import evaluate, frechet_distance_from_features
    from ditkit.pipeline import Pipeline

    pipe = Pipeline.load(args.run)
    names = pipe.class_names
    if not all(name.isdigit() for name in names):
        raise SystemExit(f"--run {args.run}: the digit classifier scores digit runs; its classes are {names}")
    _, noise = digits(max(1, args.samples // 10))
    y = torch.arange(len(names)).repeat(len(noise) // len(names) + 1)[:len(noise)]
    digit_of = torch.tensor([int(name) for name in names])
    int8, int8_name = int8_model(pipe.model)
    cases = [("fp32", pipe.model, None), ("bf16 autocast", pipe.model, "bf16"), (int8_name, int8, None)]
    draw_at(pipe, pipe.model, None, y[:20], noise[:20])  # warm-up
    results = {}
    for _ in range(2):  # two rounds, alternating, each case's faster round kept
        for name, model, precision in cases:
            images, seconds = draw_at(pipe, model, precision, y, noise)
            results[name] = (images, min(seconds, results.get(name, (None, float("inf")))[1]))
    classifier = load_classifier().eval()
    with torch.no_grad():
        features = {name: classifier.features(images) for name, (images, _) in results.items()}
    print(f"\nsampling {len(y)} digits of {args.run} ({pipe.settings()['sampler']}, {pipe.settings()['steps']} steps, "
          f"{torch.get_num_threads()} threads; FD = the classifier's FD against the held-out digits)")
    table = Table(["precision", "s", "img/s", "x fp32", "accuracy", "FD", "FD / real", "FD to fp32",
                   "max |x - x fp32|"], args.markdown)
    base_images, base_seconds = results["fp32"]
    for name, (images, seconds) in results.items():
        m = evaluate(images, digit_of[y], classifier=classifier)
        table.add(name, f"{seconds:.1f}", f"{len(y) / seconds:.1f}", f"{base_seconds / seconds:.2f}",
                  f"{m['accuracy']:.1%}", f"{m['fd_classifier']:.2f}",
                  f"{m['fd_classifier'] / m['fd_classifier_real_baseline']:.2f}x",
                  f"{frechet_distance_from_features(features[name], features['fp32']):.3f}",
                  f"{(images - base_images).abs().max():.3f}")
    table.finish()


if __name__ == "__main__":
    sys.exit(main())
