"""ditkit: Diffusion Transformers (DiT) — the paper's models, objectives, samplers and training."""
from __future__ import annotations

__version__ = "0.1.0"

from ditkit.models import DiT, create_model, list_models  # noqa: E402
from ditkit.sampling import sample  # noqa: E402

__all__ = ["DiT", "create_model", "list_models", "sample", "__version__"]
