"""The app's one link to inference: runs loaded as `ditkit.pipeline.Pipeline`s (a few kept in memory) and
what the page needs to know of each (kind, classes, samplers, the run's own sampling settings)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ditkit.pipeline import Pipeline
from ditkit.sampling import samplers_for

KEEP_LOADED = 3  # pipelines kept in memory; browsing many checkpoints must not fill it


class PipelineCache:
    """Pipelines by (checkpoint, ema), the least recently used dropped beyond `size`."""

    def __init__(self, size: int = KEEP_LOADED, device: str | None = None):
        self.size, self.device = size, device
        self._pipes: OrderedDict[tuple[str, bool], Pipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, checkpoint: Path, ema: bool = True) -> Pipeline:
        key = (str(checkpoint), bool(ema))
        with self._lock:  # one load at a time: two requests for a new checkpoint load it once
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
            pipe = Pipeline.load(checkpoint, ema=ema, device=self.device)
            self._pipes[key] = pipe
            while len(self._pipes) > self.size:
                self._pipes.popitem(last=False)
            return pipe


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
        "adapter": "adapter" in pipe.info,  # a LoRA run: the page offers its scale
    }
