"""sha256 checksums of a checkpoint directory's files, kept in its `checksums.json`.

Written whenever a checkpoint or `save_pretrained` directory is saved and checked on every load, so a
file damaged or truncated afterwards is refused with one clear line (a CheckpointError) instead of
loading as garbage weights (all-black samples) or failing deep inside safetensors. A large file is
hashed once per process while its size, inode and times stay the same: a run directory's newest
checkpoint is verified when it is found and again when its weights are read, at the cost of one hash.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from collections.abc import Iterable

from ditkit.io import write_text_atomic

CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, or from another run)."""


MEMO_BYTES = 64 << 20  # files at least this large are hashed once; smaller ones always (it is cheap)
_hashes: dict[tuple, str] = {}  # (path, size, inode, mtime_ns, ctime_ns) -> sha256


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if key in _hashes:
        return _hashes[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if st.st_size >= MEMO_BYTES:
        _hashes[key] = h.hexdigest()
    return h.hexdigest()


def read_checksums(directory: str | os.PathLike) -> dict[str, str] | None:
    """{file name: sha256} of `directory`, or None when it has no checksums.json."""
    path = Path(directory) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path} is corrupt (not a mapping of file names to checksums)")
    return sums


def write_checksums(directory: str | os.PathLike, names: Iterable[str]) -> None:
    """Record the checksums of `names` (files in `directory`) in its checksums.json, keeping the
    entries of other files already there."""
    directory = Path(directory)
    sums = read_checksums(directory) or {}
    sums.update({name: sha256(directory / name) for name in names})
    write_text_atomic(directory / CHECKSUMS, json.dumps(sums, indent=2, sort_keys=True) + "\n")


def verify_files(directory: str | os.PathLike, names: Iterable[str], required: bool = False) -> None:
    """Raise CheckpointError if one of `names` is missing from `directory` or differs from its recorded
    checksum. Files without a record pass unless `required` (then checksums.json must exist and list
    every weights file; a JSON file's entry may be deleted by someone who edits the file by hand)."""
    directory = Path(directory)
    sums = read_checksums(directory)
    if sums is None and required:
        raise CheckpointError(f"{directory} has no {CHECKSUMS} (incomplete checkpoint)")
    for name in names:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        expected = (sums or {}).get(name)
        if expected is None:
            if required and not name.endswith(".json"):  # a JSON file edited on purpose may drop its entry
                raise CheckpointError(f"{path} has no checksum in {directory / CHECKSUMS}")
            continue
        if sha256(path) != expected:
            edited = f"; if you edited it on purpose, delete its entry in {CHECKSUMS}" if name.endswith(".json") else ""
            raise CheckpointError(f"{path} is truncated or corrupt (checksum mismatch{edited})")
