"""ONNX export of a DiT's forward pass `(x, t, y) -> prediction`, with a dynamic batch dimension.

The graph is traced (TorchScript exporter), which needs no extra package beyond torch and onnx. Input
validation runs once at trace time on the example batch and is not part of the graph: an ONNX runtime
trusts its inputs, so pass labels in 0..num_classes (num_classes = the null label).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ditkit.extras import require
from ditkit.io import atomic_path, check_writable
from ditkit.models.dit import DiT

INPUTS, OUTPUT = ("x", "t", "y"), "out"


def example_inputs(model: DiT, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (x float32, t float32 in [0, 1000), y int64 labels) that fit `model`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *model.input_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


def export_onnx(model: DiT, path: str | os.PathLike, opset: int = 17) -> Path:
    """Write `model` (on CPU, float32, eval mode) as an ONNX graph to `path`, atomically.

    Inputs: x (N, C, H, W) float32, t (N,) float32, y (N,) int64; output "out" (N, out_channels, H, W);
    N is dynamic.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the ONNX file must end in .onnx, got {path}")
    if not isinstance(model, DiT):  # other kinds take more inputs (captions, a condition image, frames)
        raise ValueError(f"ONNX export covers class-conditional image DiTs (inputs x, t, y); this run holds a "
                         f"{type(model).__name__}, which cannot be exported")
    require("interop", "onnx", what="ONNX export")
    check_writable(path)
    model = model.to("cpu", torch.float32).eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about Python-side checks (label range, shapes) that are not in the graph on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, example_inputs(model), str(tmp), dynamo=False, opset_version=opset,
                          input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes={name: {0: "batch"} for name in (*INPUTS, OUTPUT)})
    return path


def onnx_session(path: str | os.PathLike):
    """An onnxruntime InferenceSession of an exported model (CUDA when onnxruntime-gpu has it)."""
    require("interop", "onnxruntime", what="running ONNX models")
    import onnxruntime as ort
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), providers=providers)


def max_onnx_error(model: DiT, path: str | os.PathLike, batch: int = 3, seed: int = 1) -> float:
    """Largest absolute difference between onnxruntime and PyTorch outputs on a random batch."""
    model = model.to("cpu", torch.float32).eval()
    x, t, y = example_inputs(model, batch, seed)
    (out,) = onnx_session(path).run([OUTPUT], {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
    with torch.no_grad():
        ref = model(x, t, y)
    return float((torch.from_numpy(out) - ref).abs().max())
