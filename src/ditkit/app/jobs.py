"""Sampling requests as jobs: one worker thread per model runs them one at a time, in order, from a bounded
queue; each job holds its progress (step, latest x0 preview) and its result for the page to fetch."""
from __future__ import annotations

import collections
import itertools
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ditkit.pipeline import Cancelled

QUEUE_SIZE = 8  # waiting requests per model; more are refused with a message
KEEP_JOBS = 32  # finished jobs whose pictures stay fetchable
PREVIEW_INTERVAL = 0.2  # seconds between two preview pictures (each is a PNG encode)
TERMINAL = ("done", "error", "cancelled")


class QueueFull(Exception):
    """The model's queue holds QUEUE_SIZE requests already."""


@dataclass
class Job:
    id: str
    key: str  # the model (checkpoint) it runs on: one job at a time per key
    work: Callable[[Job], Any]  # runs the job; gets the job for its progress callback
    status: str = "queued"  # queued | running | done | error | cancelled
    step: int = 0
    total: int = 0
    preview: bytes | None = None
    preview_count: int = 0
    error: str | None = None
    result: Any = None
    version: int = 0  # bumped on every change, for the event stream
    position: int = 0  # requests ahead of it (queued jobs; 0 = next or running)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    _last_preview: float = 0.0

    def touch(self) -> None:
        self.version += 1

    def progress(self, step: int, total: int, preview: Tensor | None, encode: Callable[[Tensor], bytes]) -> None:
        """The Pipeline callback: record the step, encode a preview now and then, stop if cancelled."""
        if self.cancel_requested.is_set():
            raise Cancelled("cancelled from the page")
        self.step, self.total = int(step), int(total)
        now = time.monotonic()
        if preview is not None and (now - self._last_preview >= PREVIEW_INTERVAL or step >= total):
            self.preview, self.preview_count, self._last_preview = encode(preview), self.preview_count + 1, now
        self.touch()

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "step": self.step, "total": self.total,
                "position": self.position, "previews": self.preview_count, "error": self.error}


class Worker:
    """Runs one model's jobs in arrival order on its own thread."""

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="ditkit-serve-worker").start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(f"the queue for this model is full ({self.queue_size} waiting): try again shortly")
            self.waiting.append(job)
            self._number()
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        with self.cond:
            job.cancel_requested.set()
            if job in self.waiting:  # never started: done with at once
                self.waiting.remove(job)
                job.status = "cancelled"
                self._number()
            job.touch()

    def _number(self) -> None:
        ahead = 1 if self.running is not None else 0
        for i, job in enumerate(self.waiting):
            job.position = ahead + i
            job.touch()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                job = self.running = self.waiting.popleft()
                job.status, job.position = "running", 0
                self._number()
                job.touch()
            try:
                job.result = job.work(job)
                job.status = "done"
            except Cancelled:
                job.status = "cancelled"
            except (ValueError, FileNotFoundError) as err:  # bad input found by the Pipeline: the page says why
                job.status, job.error = "error", one_line(err)
            except Exception as err:  # a bug: the page gets one line, the server's log the traceback
                traceback.print_exc(file=sys.stderr)
                job.status, job.error = "error", f"internal error ({type(err).__name__}): {one_line(err)}"
            with self.cond:
                self.running = None
                self._number()
                job.touch()


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:500]


class JobBoard:
    """Every job by id; a worker per model key; the newest KEEP_JOBS finished jobs kept."""

    def __init__(self, queue_size: int = QUEUE_SIZE, keep: int = KEEP_JOBS):
        self.queue_size, self.keep = queue_size, keep
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.workers: dict[str, Worker] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def submit(self, key: str, work: Callable[[Job], Any]) -> Job:
        with self._lock:
            worker = self.workers.get(key)
            if worker is None:
                worker = self.workers[key] = Worker(self.queue_size)
            job = Job(id=f"j{next(self._ids)}", key=key, work=work)
            worker.submit(job)  # QueueFull propagates: the job is not recorded
            self.jobs[job.id] = job
            finished = [j for j in self.jobs.values() if j.status in TERMINAL]
            for old in finished[:max(0, len(finished) - self.keep)]:
                del self.jobs[old.id]
            return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise FileNotFoundError(f"no job {job_id!r} (finished jobs are kept for a while, then dropped)")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        self.workers[job.key].cancel(job)
        return job

    def cancel_all(self) -> None:
        with self._lock:
            for job in list(self.jobs.values()):
                if job.status not in TERMINAL:
                    self.workers[job.key].cancel(job)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker is running a job (after cancel_all: each stops at its next step)."""
        deadline = time.monotonic() + timeout
        while any(w.running is not None or w.waiting for w in self.workers.values()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
