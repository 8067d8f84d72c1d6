"""The app's one link to inference: runs loaded as `ditkit.pipeline.Pipeline`s (a few kept in memory) and
what the page needs to know of each (kind, classes, samplers, the run's own sampling settings)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditkit import lora
from ditkit.pipeline import Pipeline
from ditkit.sampling import samplers_for

KEEP_LOADED = 3  # pipelines kept in memory; browsing many checkpoints must not fill it


class PipelineCache:
    """Pipelines by (checkpoint, ema, further adapter checkpoints), the least recently used dropped beyond
    `size`. The adapters' weights are not part of the key: `weigh` sets them per request, so moving a weight
    does not load the model again."""

    def __init__(self, size: int = KEEP_LOADED, device: str | None = None):
        self.size, self.device = size, device
        self._pipes: OrderedDict[tuple[str, bool, tuple[str, ...]], Pipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, checkpoint: Path, ema: bool = True, adapters: Sequence[Path] = ()) -> Pipeline:
        """The run at `checkpoint` with the adapter runs `adapters` (checkpoint directories, in the order that
        `weigh` takes their weights) composed on it, each at weight 1 until weighed."""
        key = (str(checkpoint), bool(ema), tuple(str(a) for a in adapters))
        with self._lock:  # one load at a time: two requests for a new checkpoint load it once
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
            pipe = Pipeline.load(checkpoint, ema=ema, device=self.device,
                                 adapters={a: 1.0 for a in key[2]} if adapters else None)
            self._pipes[key] = pipe
            while len(self._pipes) > self.size:
                self._pipes.popitem(last=False)
            return pipe


def weigh(pipe: Pipeline, weights: Sequence[float]) -> None:
    """Set the further adapters' weights, in the order they were composed (`ditkit.lora.compose` names the
    i-th one adapter{i}, from 1; the run's own adapter keeps the lora_scale that generate() sets)."""
    if weights:
        lora.set_scale(pipe.model, {f"adapter{i}": float(w) for i, w in enumerate(weights, start=1)})


def facts(pipe: Pipeline) -> dict[str, Any]:
    """What the page's controls need: the kind of run, its classes, samplers and default settings."""
    names = list(pipe.class_names or [])
    return {
        "kind": pipe.kind,
        "num_classes": int(pipe.num_classes),
        "class_names": [str(n) for n in names],
        "conditional": bool(pipe.conditional),
        "image_size": list(pipe.image_size),
        "channels": int(pipe.channels),
        "samplers": list(samplers_for(pipe.objective)),  # the default first
        # the run's own settings made concrete (the default sampler's name and steps)
        "defaults": {k: v for k, v in pipe.settings().items()
                     if isinstance(v, (int, float, str, list, tuple, type(None)))},
        "frames": pipe.info.get("frames"),
        "adapter": "adapter" in pipe.info,  # a LoRA run: the page offers its scale and further adapters
        "first_frame": first_frame_form(pipe),
    }


def first_frame_form(pipe: Pipeline) -> str | None:
    """How a video run keeps an uploaded first frame (None: not a video run): "trained", fed clean at t = 0
    (a run trained with frame conditioning, context_share, whose tubelets hold one frame), or "inpaint",
    the training-free form (`ditkit.kinds.VideoRun.frame_plan` decides the same way)."""
    if pipe.kind != "video":
        return None
    trained = bool(pipe.info.get("train_config", {}).get("context_share"))
    return "trained" if trained and int(getattr(pipe.model, "patch_t", 1)) == 1 else "inpaint"
