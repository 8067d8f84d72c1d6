"""Bad input to the CLI, as one table (issue 16): each case runs `ditkit.cli.main(argv)` and checks the exit
status, the one-line error (a fragment of it), and that nothing on disk changed. To add a case, add a row;
a row may name a setup that builds what it needs under {tmp} (and may patch the process, e.g. to make a
location read-only or an extra missing). Placeholders: {tmp} (this case's folder), {run} (a tiny trained
run shared by the module, read-only)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ditkit.io
from ditkit.cli import main
from ditkit.models import DiT, PixArtDiT
from ditkit.models.control import ControlBranch

TINY = ["--data", "patterns", "image_size=8", "channels=2", "hidden_size=32", "depth=2", "num_heads=2",
        "patch_size=2", "batch_size=8", "warmup_steps=1", "log_every=1", "samples_per_class=1",
        "sample_steps=2", "precision=fp32"]
STEP = "checkpoints/step_00000002"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shared") / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


# ---- setups: build what a case needs under `tmp` (and patch the process where the case says so)

def _damaged_checkpoint(tmp: Path, run: Path, mp) -> None:
    shutil.copytree(run / STEP, tmp / "ck")
    ema = tmp / "ck" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-64:] = b"\xff" * 64  # weights become NaN: the file still parses, only the checksum sees it
    ema.write_bytes(bytes(data))


def _truncated_checkpoint(tmp: Path, run: Path, mp) -> None:
    shutil.copytree(run / STEP, tmp / "ck")
    ema = tmp / "ck" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:300])


def _truncated_pretrained(tmp: Path, run: Path, mp) -> None:
    """A save_pretrained directory from before checksums existed: safetensors itself must fail cleanly."""
    DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
        num_classes=2).save_pretrained(tmp / "ck")
    (tmp / "ck" / "checksums.json").unlink()
    weights = tmp / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])


def _damaged_run(tmp: Path, run: Path, mp) -> None:
    shutil.copytree(run, tmp / "run")
    (tmp / "run" / STEP / "ema.safetensors").write_bytes(b"junk")


def _pixart(tmp: Path, run: Path, mp) -> None:
    PixArtDiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, context_dim=8,
              caption_length=4).save_pretrained(tmp / "pixart")


def _control(tmp: Path, run: Path, mp) -> None:
    base = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=2)
    base.save_pretrained(tmp / "base")
    ControlBranch.from_base(base, 1, "edges").save_pretrained(tmp / "control")
    (tmp / "control" / "run.json").write_text(json.dumps({"objective": "flow",
                                                          "base_checkpoint": str(tmp / "base")}))


def _no_onnx(tmp: Path, run: Path, mp) -> None:
    for name in ("onnx", "onnxruntime"):
        mp.setitem(sys.modules, name, None)  # `import onnx` fails as when it is not installed


def _bad_files(tmp: Path, run: Path, mp) -> None:
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "notes.txt").write_text("hello, not a checkpoint\n")
    (tmp / "folder").mkdir()
    (tmp / "afile").write_text("a file where a folder is needed\n")


def _read_only(tmp: Path, run: Path, mp) -> None:
    """Every write probe fails as on a read-only filesystem (chmod does not stop root, who runs CI)."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    mp.setattr(ditkit.io, "tempfile", types.SimpleNamespace(mkstemp=refuse))


def _locked(tmp: Path, run: Path, mp) -> None:
    (tmp / "busy").mkdir()
    owner = {"pid": os.getppid(), "host": socket.gethostname(), "started": time.time()}  # a live process
    (tmp / "busy" / "train.lock").write_text(json.dumps(owner))


def _nested_classes(tmp: Path, run: Path, mp) -> None:
    for cls in ("cat", "dog"):
        (tmp / "pets" / cls / "2019").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "pets" / cls / "2019" / "a.png")


SETUPS = {f.__name__.lstrip("_"): f for f in (
    _damaged_checkpoint, _truncated_checkpoint, _truncated_pretrained, _damaged_run, _pixart, _control, _no_onnx,
    _bad_files, _read_only, _locked, _nested_classes)}

SAMPLE_OUT = ["--out", "{tmp}/s.png"]

# id, setup (or None), argv, exit status, fragment of the error line
CASES = [
    # item 2: damaged checkpoints are refused on every path, never sampled
    ("sample-ckpt-dir-damaged-ema", "damaged_checkpoint", ["sample", "--ckpt", "{tmp}/ck", *SAMPLE_OUT], 2,
     "ck/ema.safetensors is truncated or corrupt (checksum mismatch)"),
    ("sample-ckpt-dir-truncated-ema", "truncated_checkpoint", ["sample", "--ckpt", "{tmp}/ck", *SAMPLE_OUT], 2,
     "ck/ema.safetensors is truncated or corrupt"),
    ("sample-pretrained-dir-truncated-no-checksums", "truncated_pretrained",
     ["sample", "--ckpt", "{tmp}/ck", *SAMPLE_OUT], 2, "model.safetensors is truncated or corrupt ("),
    ("sample-run-every-checkpoint-damaged", "damaged_run", ["sample", "--ckpt", "{tmp}/run", *SAMPLE_OUT], 2,
     "all 1 of its checkpoint(s) are damaged; the newest: {tmp}/run/checkpoints/step_00000002/ema.safetensors is "
     "truncated or corrupt"),
    ("export-damaged-ema", "damaged_checkpoint", ["export", "--ckpt", "{tmp}/ck", "--out", "{tmp}/m.onnx"], 2,
     "ema.safetensors is truncated or corrupt"),
    # item 8: missing extras are named before any work
    ("export-without-onnx", "no_onnx", ["export", "--ckpt", "{run}", "--out", "{tmp}/m.onnx"], 2,
     "ditkit export needs onnx, onnxruntime, which are not installed: pip install 'ditkit[interop]'"),
    # item 9: tracebacks that were
    ("export-pixart", "pixart", ["export", "--ckpt", "{tmp}/pixart", "--out", "{tmp}/m.onnx"], 2,
     "ONNX export covers class-conditional image DiTs (inputs x, t, y); this run holds a PixArtDiT"),
    ("export-control", "control", ["export", "--ckpt", "{tmp}/control", "--out", "{tmp}/m.onnx"], 2,
     "this run holds a ControlDiT"),
    ("convert-empty-file", "bad_files", ["convert", "--from-official", "{tmp}/empty.pt", "--out", "{tmp}/c"], 2,
     "empty.pt is empty (0 bytes)"),
    ("convert-text-file", "bad_files", ["convert", "--from-official", "{tmp}/notes.txt", "--out", "{tmp}/c"], 2,
     "notes.txt is not a readable PyTorch checkpoint: it starts with b'hell'"),
    ("convert-a-directory", "bad_files", ["convert", "--from-official", "{tmp}/folder", "--out", "{tmp}/c"], 2,
     "folder is a directory: pass the checkpoint file itself"),
    ("convert-out-is-a-file", "bad_files", ["convert", "--from-official", "{tmp}/empty.pt", "--out", "{tmp}/afile"],
     2, "afile is a file: expected a directory"),
    ("convert-out-read-only", "read_only", ["convert", "--from-official", "{tmp}/x.pt", "--out", "{tmp}/c"], 2,
     "Read-only file system (a read-only location)"),
    ("sample-out-under-a-file", "bad_files", ["sample", "--ckpt", "{run}", "--out", "{tmp}/afile/s.png"], 2,
     "afile is a file, not a directory"),
    ("sample-out-folder-is-a-file", "bad_files", ["sample", "--ckpt", "{run}", "--out", "{tmp}/afile/"], 2,
     "afile/ is a file, not a folder"),
    ("sample-out-read-only", "read_only", ["sample", "--ckpt", "{run}", *SAMPLE_OUT], 2,
     "Read-only file system (a read-only location)"),
    ("train-out-is-a-file", "bad_files", ["train", *TINY, "--steps", "1", "--out", "{tmp}/afile"], 2,
     "afile is a file: expected a directory"),
    ("train-out-read-only", "read_only", ["train", *TINY, "--steps", "1", "--out", "{tmp}/r"], 2,
     "Read-only file system (a read-only location)"),
    # item 6: one training process per run directory
    ("train-run-in-use", "locked", ["train", *TINY, "--steps", "1", "--out", "{tmp}/busy"], 2,
     f"busy is in use by another training run (pid {os.getppid()} on {socket.gethostname()}"),
    # item 11: wording
    ("eval-text-file", "bad_files", ["eval", "--samples", "{tmp}/notes.txt"], 2,
     "notes.txt is not an .npz file (it starts with b'hello,'"),
    ("train-bad-data-args-json", None, ["train", *TINY, 'data_args={"n": 3', "--out", "{tmp}/r"], 2,
     "data_args expects a mapping (JSON object) as JSON"),
    ("train-nested-class-folders", "nested_classes", ["train", "--data", "{tmp}/pets", "--out", "{tmp}/r"], 2,
     "subfolders of class folders are not searched: cat, dog hold only folders"),
]


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("setup, argv, code, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(setup, argv, code, fragment, run, tmp_path, monkeypatch, capsys):
    if setup:
        SETUPS[setup](tmp_path, run, monkeypatch)
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{run}", str(run))

    argv, fragment = [fill(a) for a in argv], fill(fragment)
    before = snapshot(tmp_path, run)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    errors = [line for line in lines if line.startswith(f"ditkit {argv[0]}: error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    assert snapshot(tmp_path, run) == before, "a failed command changed files on disk"


def test_the_table_covers_every_setup():
    assert {c[1] for c in CASES if c[1]} == set(SETUPS)
