"""ditkit's transformers. A model maps (x_t, t, condition) to a prediction; it knows no noise schedule."""
from ditkit.models.dit import DiT, ZOO, create_model, list_models

__all__ = ["DiT", "ZOO", "create_model", "list_models"]
