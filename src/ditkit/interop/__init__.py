"""Interoperability: the original DiT checkpoints, diffusers' DiTTransformer2DModel, ONNX export.

Each submodule imports its optional dependency (diffusers, onnx, onnxruntime) only where it is used.
"""
from ditkit.interop.official import convert_official, infer_config, load_official, load_official_state_dict

__all__ = ["convert_official", "infer_config", "load_official", "load_official_state_dict"]
