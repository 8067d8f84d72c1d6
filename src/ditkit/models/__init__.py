"""ditkit's transformers. A model maps (x_t, t, condition) to a prediction; it knows no noise schedule."""
from ditkit.models.dit import DiT, ZOO, create_model, list_models
from ditkit.models.mmdit import MMDiT
from ditkit.models.pixart import PixArtDiT
from ditkit.models.video import VideoDiT

__all__ = ["DiT", "MMDiT", "PixArtDiT", "VideoDiT", "ZOO", "create_model", "list_models"]
