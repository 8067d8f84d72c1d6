"""Shared test helpers: where the reference fixtures live, and how a missing folder is treated."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def reference_path(*parts: str) -> Path:
    """Path under ../shared/reference; fails under CI (CI=true) when missing, skips elsewhere."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        msg = f"reference data not found at {path} (CI expects ../shared beside the clone)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def reference_cases() -> list[str]:
    """Names of the parity cases in dit_official (NAME.json + weights + io). Empty if the folder is missing."""
    folder = REFERENCE / "dit_official"
    if not folder.exists():
        return ["<missing>"]  # one case, so the test runs and fails/skips through reference_path
    return sorted(p.name[: -len(".weights.safetensors")] for p in folder.glob("*.weights.safetensors"))
