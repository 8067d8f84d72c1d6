"""File writing that never leaves a half-written file behind: write to a temp file, then rename."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    A crash or exception leaves any existing `path` untouched and removes the temp file. A failed write
    (no space, no permission, a read-only disk) is a WriteError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(path, err) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; files get the usual permissions
        os.replace(tmp_path, path)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(path, err) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


class WriteError(OSError):
    """A file could not be written: one line naming the file and the cause. An OSError (with the cause's
    errno), so code that catches OSError still does."""

    def __init__(self, path: str | os.PathLike, err: BaseException, what: str = ""):
        code = getattr(err, "errno", None)
        if code is None:  # safetensors reports the OS error inside its message: "... Os { code: 28, ..."
            found = re.search(r"code: (\d+)", str(err))
            code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code else (getattr(err, "strerror", None) or str(err).strip() or
                                                  type(err).__name__)
        if code == errno.EROFS:
            reason += " (a read-only location)"
        elif code in (errno.EACCES, errno.EPERM):
            reason += " (no write permission)"
        elif code in (errno.ENOSPC, errno.EDQUOT):
            reason += " (free some space, or write elsewhere)"
        self.path = Path(path)
        super().__init__(code, f"cannot write {what}{path}: {reason}")

    def __str__(self) -> str:
        return str(self.strerror)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _writable_error(path: Path, err: OSError) -> ValueError:
    reason = err.strerror or type(err).__name__
    if err.errno == errno.EROFS:
        reason += " (a read-only location)"
    elif err.errno in (errno.EACCES, errno.EPERM):
        reason += " (no write permission)"
    return ValueError(f"cannot write to {path}: {reason}")


def check_writable(path: str | os.PathLike, folder: bool = False, what: str = "--out") -> None:
    """Raise a clear ValueError now, before any work, if `path` cannot be written later: a file where a
    folder is needed (or, unless `folder`, a folder where the file should go), or an unwritable location.
    Creates nothing: the nearest existing folder is probed with a temporary file."""
    path = Path(path)
    if path.exists() and (not path.is_dir() if folder else path.is_dir()):
        kind = "a file" if folder else "a directory"
        raise ValueError(f"{what} {path} is {kind}: expected {'a directory' if folder else 'a file name'}")
    existing = path if folder and path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)  # os.access lies on read-only mounts
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise _writable_error(existing, err) from None


def prepare_dir(path: str | os.PathLike, what: str = "--out") -> list[Path]:
    """Make sure `path` is a writable directory, creating it (and missing parents); returns the
    directories created, deepest last, so that a caller failing later can remove them again
    (`remove_empty_dirs`). Problems are a clear ValueError (see `check_writable`)."""
    path = Path(path)
    check_writable(path, folder=True, what=what)
    created = [p for p in reversed((path, *path.parents)) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_empty_dirs(created)
        raise _writable_error(path, err) from None
    return created


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove the directories of a `prepare_dir` result that are still empty, deepest first."""
    for p in reversed(dirs):
        try:
            p.rmdir()
        except OSError:  # not empty (something was written there after all) or already gone
            break
