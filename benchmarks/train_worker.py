"""A training worker for benchmarks/train_throughput.py: the demo run of whichever ditkit is on the path (this
checkout, or an earlier commit's tree through PYTHONPATH), stepped on request. It imports nothing else of this
checkout, so an earlier commit's package runs as it was.

    python benchmarks/train_worker.py CONFIG [--fix-sampler]

It first prints {"ready": the package's folder, "batch", "tokens": per sample}, then answers lines "N" on stdin
(N more steps) with one JSON line {"seconds", "losses"} each on stdout.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def fixed_next(self) -> torch.Tensor:
    """An EpochSampler.next that takes exactly batch_size indices (patched into an earlier commit's sampler)."""
    idx, count = [], 0
    while count < self.batch_size:
        if self.position >= self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        take = min(self.batch_size - count, self.n - self.position)
        idx.append(self._perm[self.position:self.position + take])
        self.position += take
        count += take
    return torch.cat(idx)


def worker(config: str, fix_sampler: bool) -> None:
    """Build the demo run in a temporary directory, then answer lines "N" on stdin with one JSON line on stdout:
    the seconds of N more steps and their losses."""
    import ditkit
    from ditkit.train import build_config, distributed, trainer

    if fix_sampler:
        trainer.EpochSampler.next = fixed_next
    with tempfile.TemporaryDirectory() as out:
        run = trainer.build_run(build_config(config, {"out": out}), distributed.setup(), None)
        run.model.train()
        c, shape = run.c, run.kind.data.images.shape[2:]  # (H, W), or (F, H, W) for clips
        tokens = (shape[-2] // c.patch_size) * (shape[-1] // c.patch_size)
        if len(shape) == 3:
            tokens *= shape[0] // getattr(c, "patch_t", 1)
        print(json.dumps({"ready": str(Path(ditkit.__file__).parents[1]), "batch": c.batch_size, "tokens": tokens}),
              flush=True)
        for line in sys.stdin:
            losses, start = [], time.perf_counter()
            for _ in range(int(line)):
                loss, _ = trainer.train_step(run)
                losses.append(float(loss))
            print(json.dumps({"seconds": time.perf_counter() - start, "losses": losses}), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1], "--fix-sampler" in sys.argv[2:])
