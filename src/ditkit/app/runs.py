"""The run browser's view of the disk: which runs are served, what each holds (config, metrics, sample
grids, checkpoints), and the one gate through which the page reads files (only inside a served run)."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditkit.checkpoint import find_checkpoints, resolve_checkpoint

# what the page may fetch from a run: pictures, and the text files the browser shows
READABLE = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".mp4": "video/mp4", ".csv": "text/csv", ".json": "application/json"}
MAX_DEPTH = 4  # how deep `--runs DIR` looks for runs
MAX_POINTS = 2000  # loss curve points sent to the page (longer runs are thinned evenly)


@dataclass(frozen=True)
class Run:
    """One served run: `id` names it in URLs (its path below the served root, '/'-separated)."""
    id: str
    path: Path

    def checkpoint(self, name: str | None) -> Path:
        """The checkpoint called `name` (a directory name from `find_checkpoints`), or, for none, the one
        `ditkit sample --ckpt RUN` uses: the newest that verifies."""
        found = find_checkpoints(self.path)
        if not found:
            raise FileNotFoundError(f"run {self.id} has no checkpoint yet")
        if not name:
            return resolve_checkpoint(self.path)
        for path in found:
            if path.name == name:
                return path
        raise FileNotFoundError(f"run {self.id} has no checkpoint {name!r}")


class RunIndex:
    """The runs under a root: `--ckpt RUN` serves one run (or one checkpoint directory), `--runs DIR` every
    run found under DIR, looked up afresh on each request so that runs started later appear."""

    def __init__(self, ckpt: str | Path | None = None, runs: str | Path | None = None):
        if (ckpt is None) == (runs is None):
            raise ValueError("serve one run (--ckpt RUN) or a folder of runs (--runs DIR)")
        root = Path(ckpt if ckpt is not None else runs).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        self.single = ckpt is not None
        self.root = root
        if self.single and not find_checkpoints(root):
            raise FileNotFoundError(f"no checkpoint in {root}: expected a run directory with checkpoints/step_*/ "
                                    "or a checkpoint directory with config.json and model.safetensors")

    def runs(self) -> list[Run]:
        if self.single:
            return [Run(self.root.name, self.root)]
        found: list[Run] = []

        def walk(folder: Path, depth: int) -> None:
            if find_checkpoints(folder) or (folder / "metrics.csv").is_file():
                found.append(Run(folder.relative_to(self.root).as_posix() or self.root.name, folder))
                return
            if depth >= MAX_DEPTH:
                return
            for child in sorted(folder.iterdir()):
                # symlinks are not followed: nothing outside the root is served
                if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
                    walk(child, depth + 1)

        walk(self.root, 0)
        return found

    def get(self, run_id: str) -> Run:
        for run in self.runs():
            if run.id == run_id:
                return run
        raise FileNotFoundError(f"no run {run_id!r} is served here")

    def file(self, run_id: str, relative: str) -> Path:
        """The file `relative` inside run `run_id`, if the page may read it: a picture, metrics or config
        that resolves (links followed) to a place inside that run. FileNotFoundError otherwise, with the
        same message whether the file is missing or forbidden, so that nothing is learnt about the disk."""
        run = self.get(run_id)
        base = run.path.resolve()
        missing = FileNotFoundError(f"no file {relative!r} in run {run_id}")
        if not relative or "\x00" in relative or Path(relative).is_absolute():
            raise missing
        path = (base / relative).resolve()
        if not path.is_relative_to(base) or not path.is_file() or path.suffix.lower() not in READABLE:
            raise missing
        if any(part.startswith(".") for part in path.relative_to(base).parts):  # temp files, hidden files
            raise missing
        return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns {name: values}, read afresh (the trainer rewrites it whole, atomically, as a
    run goes on). Rows that do not parse are skipped; long runs are thinned to MAX_POINTS evenly."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    columns: dict[str, list[float]] = {}
    good = []
    for row in rows:
        try:
            values = {k: float(v) for k, v in row.items() if k}
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) for v in values.values()):
            good.append(values)
    if len(good) > MAX_POINTS:
        stride = len(good) / MAX_POINTS
        good = [good[int(i * stride)] for i in range(MAX_POINTS - 1)] + [good[-1]]
    for values in good:
        for k, v in values.items():
            columns.setdefault(k, []).append(v)
    return columns


def describe(run: Run) -> dict[str, Any]:
    """What the run browser shows of a run: its config, checkpoints, pictures and whether it has metrics."""
    found = find_checkpoints(run.path)
    info = read_json(found[-1] / "run.json") if found else {}
    model = read_json(found[-1] / "config.json") if found else {}
    pictures = sorted(p.name for p in run.path.iterdir()
                      if p.is_file() and p.suffix.lower() in (".png", ".gif", ".jpg", ".jpeg")
                      and not p.name.startswith("."))
    return {
        "id": run.id,
        "checkpoints": [{"name": p.name, "step": _step(p)} for p in found],
        "pictures": pictures,
        "has_metrics": (run.path / "metrics.csv").is_file(),
        "train_config": info.get("train_config", {}),
        "data": {k: info[k] for k in ("objective", "num_classes", "channels", "image_size", "conditional",
                                      "frames", "latent", "vae") if k in info},
        "model": model,
    }


def adapter_record(run: Run) -> dict[str, Any] | None:
    """The adapter record (base identity, LoRA settings, classes) of an adapter run's newest checkpoint; None
    for a run that is not one."""
    found = find_checkpoints(run.path)
    record = read_json(found[-1] / "run.json").get("adapter") if found else None
    return record if isinstance(record, dict) and isinstance(record.get("base"), dict) else None


def _step(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return None
