"""Two-phase runs: a config key that names another config file (a one-step run's `base`, a fine-tune's `init`, a
video run's `image_model`) has that run trained first, into a folder inside this run's, and then names it."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ditkit import checkpoint as ckpt
from ditkit.config import build_config, is_config_file
from ditkit.io import write_json_atomic

FINISHED = "finished.json"  # written in the first run's folder when it ends (not interrupted): phase 2 may start


def train_first_phase(key: str, config_file: str, out: Path, overrides: dict[str, Any], what: str, then: str,
                      progress: bool, train: Callable[..., Any], check: Callable[[Any], None] | None = None) -> Path:
    """Train `config_file`, named by this run's config `key` (with `overrides`, e.g. its `minutes` and this
    run's seed), into `out`, unless a run
    there has already finished (a resumed two-phase run past its first phase); a run stopped in this phase
    resumes it. `what` / `then` name the two phases in the progress lines; `check` refuses a first run that
    cannot serve the second (before anything is trained). Returns `out`."""
    if (out / FINISHED).is_file():
        return out
    first = build_config(config_file, {"out": str(out), **overrides}, source=f"{key}={config_file}")
    if check is not None:
        check(first)
    minutes = overrides.get("minutes")
    if progress:
        print(f"phase 1 of 2: {what} into {out}" + (f", at most {minutes:g} minutes" if minutes else ""), flush=True)
    result = train(first, resume=bool(ckpt.list_checkpoints(out)), progress=progress)
    write_json_atomic(out / FINISHED, {"checkpoint": str(result.checkpoint), "steps": result.steps,
                                       "seconds": round(result.seconds, 1)})
    if progress:
        print(f"phase 2 of 2: {then}", flush=True)
    return out


IMAGE_DIR = "image"  # where a video run's image_model=CONFIG_FILE run is trained, inside the video run's folder


def _check_image_run(first: Any) -> None:
    from ditkit.data import VIDEO_SOURCES

    if first.data in VIDEO_SOURCES or first.objective not in ("flow", "ddpm"):
        raise ValueError(f"image_model must describe an image run (image data, e.g. moving_mnist_frames, and a "
                         f"multi-step objective), got data={first.data}, objective={first.objective}")


def train_image_model(c: Any, resume: bool, progress: bool, train: Callable[..., Any]) -> tuple[Any, bool]:
    """A video run with image_model=CONFIG_FILE: that image run first, into OUT/image (image_model_minutes, this
    run's seed); returns the config naming it, and whether the video phase resumes."""
    if not is_config_file(c.image_model):
        return c, resume
    overrides = {"seed": c.seed, "minutes": c.image_model_minutes}
    out = train_first_phase("image_model", c.image_model, Path(c.out) / IMAGE_DIR, overrides,
                            f"the image run {c.image_model}", "the video run, continuing its frames", progress, train,
                            _check_image_run)
    return dataclasses.replace(c, image_model=str(out)), resume and bool(ckpt.list_checkpoints(c.out))
