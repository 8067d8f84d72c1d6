"""One training process per run directory: `OUT/train.lock` holds the owner's pid, host and start time.

A second `ditkit train` on the same --out refuses with one line naming the first. A lock left by a process
that died without cleaning up (SIGKILL, power loss) is stale: on the same host a pid that no longer runs
is taken over with a warning; a lock from another host cannot be checked and is reported with the
command that clears it. Under torchrun only RANK 0 takes the lock, the other processes run under it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from ditkit.io import prepare_dir, remove_empty_dirs
from ditkit.notes import warn

LOCK = "train.lock"


class RunLocked(ValueError):
    """The run directory is in use by another training process."""


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's contents; {} for an unreadable (half-written or damaged) lock, None when it is gone."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = ""
    if isinstance(started, (int, float)):
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}{when}"


def _start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), where /proc tells (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def is_stale(owner: dict[str, Any]) -> bool:
    """True when the lock's owner is known to be gone: same host, and its pid is not running, or is
    running a process that started after the lock was written (the pid was reused, e.g. a restarted
    container), or is this very process (a lock left by an earlier process that had our pid)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid() or not _alive(pid):
        return True
    started, locked = _start_time(pid), owner.get("started")
    # 30 s of slack: /proc's start times drift from the wall clock by seconds (we saw 6 s on a VM); the
    # owner itself always starts before it writes its lock, so only a clearly later start means reuse
    return started is not None and isinstance(locked, (int, float)) and started > locked + 30


def _try_create(path: Path, me: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _locked(out: str | os.PathLike, path: Path, owner: dict[str, Any]) -> RunLocked:
    hint = (f"wait for it to finish, or choose another --out; if that process is gone, delete {path}"
            if owner.get("host") != socket.gethostname() else
            "wait for it to finish (or stop it), or choose another --out")
    return RunLocked(f"{out} is in use by another training run ({_describe(owner)}): {hint}")


def check_unlocked(out: str | os.PathLike) -> None:
    """RunLocked if a live process holds the lock of run directory `out` (taking nothing): what a command
    that fails for another reason reports first, when the cause is a run still in progress there."""
    path = Path(out) / LOCK
    owner = _read(path)
    if owner and not is_stale(owner):
        raise _locked(out, path, owner)


def acquire(out: str | os.PathLike) -> Path:
    """Take the lock of run directory `out` (created if needed); RunLocked if a live process holds it."""
    path = Path(out) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(10):  # a few rounds: a stale lock may be replaced by a racing process meanwhile
        if _try_create(path, me):
            return path
        owner = _read(path)
        if owner is None:  # released between our attempt and the read
            continue
        if owner == {}:  # being written right now, or damaged: give the writer a moment
            time.sleep(0.05)
            owner = _read(path)
            if owner is None:
                continue
        if owner and is_stale(owner):
            # move the stale lock aside (one racer wins the rename), then check it was the stale one
            aside = path.with_name(f"{LOCK}.stale.{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = _read(aside)
            if moved == owner:
                aside.unlink(missing_ok=True)
                warn(f"{out}: taking over the stale lock of {_describe(owner)}, which is no longer running")
                continue
            with contextlib.suppress(OSError):  # we moved a fresh lock of a racing process: put it back
                os.link(aside, path)
            aside.unlink(missing_ok=True)
            owner = moved or owner
        raise _locked(out, path, owner)
    raise RunLocked(f"{out}: could not take the lock {path} (other processes keep replacing it)")


def release(path: Path) -> None:
    """Remove our lock file (only if it is still ours)."""
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[Path | None]:
    """Hold the lock of run directory `out` for the block. Creates `out` (a clear ValueError if it is a
    file or cannot be written); directories it created and that stayed empty are removed on exit, so a
    run that fails before writing anything leaves nothing behind. Under torchrun, RANK != 0 takes no lock."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    created = prepare_dir(out)
    try:
        path = acquire(out)
    except BaseException:
        remove_empty_dirs(created)
        raise
    try:
        yield path
    finally:
        release(path)
        remove_empty_dirs(created)
