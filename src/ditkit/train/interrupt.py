"""Ctrl-C (SIGINT) and SIGTERM during training: finish the current step, save a checkpoint, stop.

    with catch_interrupts() as stop:
        ...                      # a signal here (set-up, before any step) stops at once, nothing saved
        stop.arm()
        while step < steps:
            ...one step, periodic checkpoint...
            if stop.should_stop(dist):
                break
        ...save the checkpoint of `step`...
        if stop.requested:
            raise stop.interrupted(step, checkpoint)

The first signal only sets a flag (and says so on stderr); the loop ends after the step in progress,
so the checkpoint is an ordinary one and resuming from it is bit-identical to a run never stopped.
A second Ctrl-C aborts at once (KeyboardInterrupt, nothing more saved). The caller then raises
TrainingInterrupted, a KeyboardInterrupt that carries the checkpoint and the conventional exit status
128 + signal: 130 for SIGINT, 143 for SIGTERM (what batch schedulers send before they kill a job).
Handlers can only be installed in the main thread; elsewhere signals keep their usual behaviour.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal. `checkpoint` is the checkpoint written (None if it stopped before
    the first step); `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None,
                 out: str | os.PathLike | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        if checkpoint is None:
            message = f"interrupted by {name} before the first step: nothing to save"
        else:
            message = (f"interrupted by {name} at step {step}: checkpoint written to {checkpoint}; "
                       f"continue with: ditkit train --out {out if out is not None else checkpoint.parents[1]} "
                       "--resume")
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class Interrupts:
    """The state of one training run's signal handling (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a first SIGINT/SIGTERM has arrived."""
        return self.signum is not None

    def arm(self) -> None:
        """From now on the first signal lets the step finish (before: it stops at once)."""
        self.armed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:  # the second Ctrl-C: the user means it
            os.write(2, b"\nsecond interrupt: aborting now, without saving\n")
            raise KeyboardInterrupt
        if self.requested:  # a repeated SIGTERM: the first one is being handled
            return
        self.signum = signum
        if not self.armed:
            raise TrainingInterrupted(signum)
        hint = " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""
        os.write(2, f"\n{name}: finishing the current step and saving a checkpoint{hint}\n".encode())

    def should_stop(self, dist: Any = None) -> bool:
        """Whether to stop after this step. Under torch.distributed (`dist.enabled`) every process must
        stop at the same step, so the flags are combined across processes (any one signalled stops all)."""
        if dist is None or not getattr(dist, "enabled", False):
            return self.requested
        import torch
        import torch.distributed as torch_dist

        flag = torch.tensor(float(self.requested), device=dist.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        if flag.item() > 0 and not self.requested:
            self.signum = signal.SIGTERM  # another process was signalled (torchrun forwards SIGTERM)
        return flag.item() > 0

    def interrupted(self, step: int, checkpoint: Path | None,
                    out: str | os.PathLike | None = None) -> TrainingInterrupted:
        """The exception to raise once the checkpoint of `step` is written."""
        assert self.signum is not None
        return TrainingInterrupted(self.signum, step, checkpoint, out)

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def catch_interrupts() -> Interrupts:
    """A context manager that installs the SIGINT/SIGTERM handlers for a training run."""
    return Interrupts()
