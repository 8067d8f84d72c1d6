"""Bad input to the CLI, as one table: each case runs `ditkit.cli.main(argv)` in this process and checks exit
status 2, exactly one line `ditkit CMD: error: ...` holding the expected text, no traceback, and that nothing
on disk changed. To cover a new case, add a row.

A row is (id, setup or None, command line, expected). The command line is split as a shell would split it,
after the placeholders are filled in: {tmp} the case's own folder (holding the files `workspace` writes),
{run} a copy of tests/data/old_run there (a finished 2-step conditional flow run: 4 classes, hidden 32,
batch 4), {uncond} an unconditional run shared by the module. `expected` is a fragment of the error line, or a
compiled regex (its placeholders are filled in escaped). A setup builds what its case needs under {tmp}, or
patches the process (a read-only location, a missing extra). A few cases also run through the real entry
point in a subprocess, where the exit status and the absence of a traceback are the process's own.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
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
from ditkit.train import build_config

OLD_RUN = Path(__file__).parent / "data" / "old_run"
STEP = "checkpoints/step_00000002"
TINY = ("--data patterns image_size=8 channels=2 hidden_size=32 depth=2 num_heads=2 patch_size=2 batch_size=8 "
        "warmup_steps=1 log_every=1 samples_per_class=1 sample.steps=2 precision=fp32 --steps 1")
R = re.compile


# ---- setups: build what a case needs under `tmp` (and patch the process where the case says so)

def _damaged_checkpoint(tmp: Path, mp) -> None:
    shutil.copytree(tmp / "run" / STEP, tmp / "ck")
    ema = tmp / "ck" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-64:] = b"\xff" * 64  # weights become NaN: the file still parses, only the checksum sees it
    ema.write_bytes(bytes(data))


def _truncated_checkpoint(tmp: Path, mp) -> None:
    shutil.copytree(tmp / "run" / STEP, tmp / "ck")
    ema = tmp / "ck" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:300])


def _truncated_pretrained(tmp: Path, mp) -> None:
    """A save_pretrained directory without checksums: safetensors itself must fail cleanly."""
    DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
        num_classes=2).save_pretrained(tmp / "ck")
    (tmp / "ck" / "checksums.json").unlink()
    weights = tmp / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])


def _damaged_run(tmp: Path, mp) -> None:
    (tmp / "run" / STEP / "ema.safetensors").write_bytes(b"junk")


def _pixart(tmp: Path, mp) -> None:
    PixArtDiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, context_dim=8,
              caption_length=4).save_pretrained(tmp / "pixart")


def _control(tmp: Path, mp) -> None:
    base = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=2)
    base.save_pretrained(tmp / "base")
    ControlBranch.from_base(base, 1, "edges").save_pretrained(tmp / "control")
    (tmp / "control" / "run.json").write_text(json.dumps({"objective": "flow",
                                                          "base_checkpoint": str(tmp / "base")}))


def _no_onnx(tmp: Path, mp) -> None:
    for name in ("onnx", "onnxruntime"):
        mp.setitem(sys.modules, name, None)  # `import onnx` fails as when it is not installed


def _read_only(tmp: Path, mp) -> None:
    """Every write probe fails as on a read-only filesystem (chmod does not stop root, who runs CI)."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    mp.setattr(ditkit.io, "tempfile", types.SimpleNamespace(mkstemp=refuse))


def _locked(tmp: Path, mp) -> None:
    (tmp / "busy").mkdir()
    owner = {"pid": os.getppid(), "host": socket.gethostname(), "started": time.time()}  # a live process
    (tmp / "busy" / "train.lock").write_text(json.dumps(owner))


def _nested_classes(tmp: Path, mp) -> None:
    for cls in ("cat", "dog"):
        (tmp / "pets" / cls / "2019").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "pets" / cls / "2019" / "a.png")


def _no_sigma(tmp: Path, mp) -> None:
    """An original-format checkpoint of a model that predicts the noise only (no learned sigma)."""
    import torch

    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=2,
                learn_sigma=False)
    torch.save(model.state_dict(), tmp / "nosig.pt")


SETUPS = {f.__name__.lstrip("_"): f for f in (
    _damaged_checkpoint, _truncated_checkpoint, _truncated_pretrained, _damaged_run, _pixart, _control, _no_onnx,
    _read_only, _locked, _nested_classes, _no_sigma)}

NEW = "--out {tmp}/new"
PNG = "--out {tmp}/x.png"
READ_ONLY = "Read-only file system (a read-only location)"

CASES = [
    # config values: a zero is a value (then validated), not "not given"; files are type-checked like key=value
    ("train-steps-0", None, f"train --data patterns --steps 0 {NEW}", "steps must be >= 1, got 0"),
    ("train-batch-size-0", None, f"train --data patterns --batch-size 0 {NEW}", "batch_size must be >= 1, got 0"),
    ("train-key-not-an-int", None, f"train --data patterns steps=many {NEW}", "steps expects an int, got 'many'"),
    ("train-bad-data-args-json", None, f"train {TINY} 'data_args={{\"n\": 3' {NEW}",
     "data_args expects a mapping (JSON object) as JSON"),
    ("file-quoted-bool", None, f"train --config {{tmp}}/quoted_bool.yaml {NEW}",
     "quoted_bool.yaml: unconditional expects true or false, got the string 'false'"),
    ("file-yaml-string-for-int", None, f"train --config {{tmp}}/ten.yaml {NEW}",
     "ten.yaml: steps expects an int, got the string 'ten'"),
    ("file-json-string-for-int", None, f"train --config {{tmp}}/ten.json {NEW}",
     "ten.json: steps expects an int, got the string 'ten'"),
    ("file-broken-yaml", None, f"train --config {{tmp}}/broken.yaml {NEW}",
     R(r"broken.yaml line 2, column \d+: not valid YAML")),
    ("file-broken-json", None, f"train --config {{tmp}}/broken.json {NEW}",
     R(r"broken.json line 1, column \d+: not valid JSON")),
    ("file-a-list", None, f"train --config {{tmp}}/list.yaml {NEW}", "list.yaml must hold a mapping of config keys"),
    ("file-missing", None, "train --config {tmp}/missing.yaml", "config file {tmp}/missing.yaml not found"),
    # config keys: the sampling section is nested; a flat sampling key names its nested form, a typo its match
    ("key-unknown-lists-the-keys", None, f"train --data patterns learning_rate=1 {NEW}",
     "unknown config key 'learning_rate'; the keys are: data, image_size,"),
    ("key-typo", None, f"train --data patterns hidden_sise=64 {NEW}",
     "unknown config key 'hidden_sise': did you mean hidden_size?"),
    ("key-flat-sampling", None, f"train --data patterns cfg_scale=3 {NEW}",
     "unknown config key 'cfg_scale': did you mean sample.cfg_scale?"),
    ("key-flat-sample-steps", None, f"train --data patterns sample_steps=2 {NEW}",
     "unknown config key 'sample_steps': did you mean sample.steps?"),
    ("key-flat-sampling-in-a-file", None, f"train --config {{tmp}}/flat.yaml {NEW}",
     "flat.yaml: unknown config keys 'sampler' (did you mean sample.sampler?), 'shift' (did you mean sample.shift?)"),
    ("key-sample-not-a-mapping", None, f"train --config {{tmp}}/sample_scalar.yaml {NEW}",
     "sample_scalar.yaml: sample is the sampling section: a mapping in a file"),
    ("key-sample-typo", None, f"train --data patterns sample.stesp=2 {NEW}",
     "unknown config key 'sample.stesp': did you mean sample.steps?"),
    ("key-sample-unknown", None, f"train --data patterns sample.wiggle=1 {NEW}", "unknown config key 'sample.wiggle'"),
    ("train-unknown-data", None, f"train --data nowhere {NEW}", "unknown data source 'nowhere'"),
    ("train-unknown-model", None, f"train --data patterns --model DiT-Q/2 {NEW}", "unknown model 'DiT-Q/2'"),
    ("train-nested-class-folders", "nested_classes", f"train --data {{tmp}}/pets {NEW}",
     "subfolders of class folders are not searched: cat, dog hold only folders"),
    # resume reads the run's config; identity fields cannot change; a finished run needs a larger --steps
    ("resume-other-hidden-size", None, "train --out {run} --resume hidden_size=64",
     "different config (hidden_size: saved 32 vs now 64)"),
    ("resume-other-batch-size", None, "train --out {run} --resume --batch-size 8",
     "different config (batch_size: saved 4 vs now 8)"),
    ("resume-finished", None, "train --out {run} --resume", "already at step 2 of steps=2: pass --steps N with N > 2"),
    ("resume-fewer-steps", None, "train --out {run} --resume --steps 1", "already at step 2 of steps=1"),
    ("resume-nothing", None, "train --out {tmp}/nothing --resume", "--resume: no usable checkpoint in {tmp}/nothing"),
    ("train-over-a-run", None, "train --data patterns --out {run}", "already holds checkpoints: pass --resume"),
    # one training process per run directory
    ("train-run-in-use", "locked", f"train {TINY} --out {{tmp}}/busy",
     f"busy is in use by another training run (pid {os.getppid()} on {socket.gethostname()}"),
    # a run that has not written its first checkpoint yet: the lock is the reason, not "no checkpoint"
    ("resume-run-in-use-before-its-first-checkpoint", "locked", "train --out {tmp}/busy --resume",
     f"busy is in use by another training run (pid {os.getppid()} on {socket.gethostname()}"),
    # OS errors are one line too
    ("train-out-is-a-file", None, f"train {TINY} --out {{tmp}}/a_file",
     "--out {tmp}/a_file is a file: expected a directory"),
    ("train-out-under-a-file", None, "train --data patterns --out {tmp}/a_file/run",
     "a_file is a file, not a directory"),
    ("train-out-read-only", "read_only", f"train {TINY} --out {{tmp}}/r", READ_ONLY),
    ("sample-out-under-a-file", None, "sample --ckpt {run} --out {tmp}/a_file/x.png",
     "a_file is a file, not a directory"),
    ("sample-out-folder-is-a-file", None, "sample --ckpt {run} --out {tmp}/a_file/", "a_file/ is a file, not a folder"),
    ("sample-out-read-only", "read_only", f"sample --ckpt {{run}} {PNG}", READ_ONLY),
    # sampling arguments
    ("sample-n-per-class-negative", None, f"sample --ckpt {{run}} --n-per-class -3 {PNG}",
     "n_per_class must be >= 1, got -3"),
    ("sample-frames-of-an-image-run", None, f"sample --ckpt {{run}} --frames 8 {PNG}",
     "frames applies to video runs only (this is an image run)"),
    ("sample-class-of-unconditional", None, f"sample --ckpt {{uncond}} --class 1 {PNG}",
     "this run is unconditional (it has no classes)"),
    ("sample-class-out-of-range", None, f"sample --ckpt {{run}} --class 4 {PNG}",
     "--class [4] out of range: this model has classes 0..3"),
    ("sample-steps-0", None, f"sample --ckpt {{run}} --steps 0 {PNG}", "steps must be >= 1, got 0"),
    ("sample-sampler-of-another-objective", None, f"sample --ckpt {{run}} --sampler ddim {PNG}",
     "unknown sampler 'ddim' for FlowMatching"),
    ("sample-out-jpg", None, "sample --ckpt {run} --out {tmp}/x.jpg", "--out must end in .png"),
    ("sample-gif-of-an-image-run", None, "sample --ckpt {run} --out {tmp}/x.gif", "holds an image model"),
    ("sample-no-run", None, f"sample --ckpt {{tmp}}/nothing {PNG}", "no usable checkpoint in"),
    ("sample-paper-of-a-flow-run", None, f"sample --ckpt {{run}} --paper {PNG}",
     "--paper reproduces the original's DDPM sampling"),
    # damaged checkpoints are refused on every path, never sampled
    ("sample-ckpt-dir-damaged-ema", "damaged_checkpoint", f"sample --ckpt {{tmp}}/ck {PNG}",
     "ck/ema.safetensors is truncated or corrupt (checksum mismatch)"),
    ("sample-ckpt-dir-truncated-ema", "truncated_checkpoint", f"sample --ckpt {{tmp}}/ck {PNG}",
     "ck/ema.safetensors is truncated or corrupt"),
    ("sample-pretrained-dir-truncated-no-checksums", "truncated_pretrained", f"sample --ckpt {{tmp}}/ck {PNG}",
     "model.safetensors is truncated or corrupt ("),
    ("sample-run-every-checkpoint-damaged", "damaged_run", f"sample --ckpt {{run}} {PNG}",
     "all 1 of its checkpoint(s) are damaged; the newest: {run}/checkpoints/step_00000002/ema.safetensors is "
     "truncated or corrupt"),
    # edit
    ("edit-class-of-unconditional", None, f"edit --ckpt {{uncond}} --image {{tmp}}/in.png --class 1 {PNG}",
     "--class 1: this run is unconditional"),
    ("edit-missing-image", None, f"edit --ckpt {{run}} --image {{tmp}}/missing.png {PNG}",
     "image {tmp}/missing.png not found"),
    ("edit-strength-2", None, f"edit --ckpt {{run}} --image {{tmp}}/in.png --strength 2 {PNG}",
     "strength must be in [0, 1]"),
    ("edit-n-0", None, f"edit --ckpt {{run}} --image {{tmp}}/in.png --n 0 {PNG}", "n must be >= 1, got 0"),
    # export and convert: missing extras are named before any work; models they do not cover are named
    ("export-damaged-ema", "damaged_checkpoint", "export --ckpt {tmp}/ck --out {tmp}/m.onnx",
     "ema.safetensors is truncated or corrupt"),
    ("export-without-onnx", "no_onnx", "export --ckpt {run} --out {tmp}/m.onnx",
     "ditkit export needs onnx, onnxruntime, which are not installed: pip install 'ditkit[interop]'"),
    ("export-pixart", "pixart", "export --ckpt {tmp}/pixart --out {tmp}/m.onnx",
     "ONNX export covers class-conditional image DiTs (inputs x, t, y); this run holds a PixArtDiT"),
    ("export-control", "control", "export --ckpt {tmp}/control --out {tmp}/m.onnx", "this run holds a ControlDiT"),
    ("convert-empty-file", None, "convert --from-official {tmp}/empty.pt --out {tmp}/c", "empty.pt is empty (0 bytes)"),
    ("convert-text-file", None, "convert --from-official {tmp}/notes.txt --out {tmp}/c",
     "notes.txt is not a readable PyTorch checkpoint: it starts with b'hell'"),
    ("convert-a-directory", None, "convert --from-official {tmp}/folder --out {tmp}/c",
     "folder is a directory: pass the checkpoint file itself"),
    ("convert-out-is-a-file", None, "convert --from-official {tmp}/empty.pt --out {tmp}/a_file",
     "a_file is a file: expected a directory"),
    ("convert-without-learned-sigma", "no_sigma", "convert --from-official {tmp}/nosig.pt --out {tmp}/c --num-heads 2",
     "nosig.pt predicts 4 channels for 4 input channels: the noise alone, without the learned sigma channels"),
    ("convert-out-read-only", "read_only", "convert --from-official {tmp}/x.pt --out {tmp}/c", READ_ONLY),
    # eval
    ("eval-text-file", None, "eval --samples {tmp}/notes.txt",
     "notes.txt is not an .npz file (it starts with b'hello,'"),
]


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory) -> Path:
    from ditkit.train import train

    out = tmp_path_factory.mktemp("uncond") / "run"
    train(build_config(None, {"out": str(out), "data": "patterns", "steps": 1, "unconditional": True},
                       ["image_size=8", "hidden_size=32", "depth=1", "num_heads=2", "batch_size=4",
                        "precision=fp32", "samples_per_class=1", "sample.steps=1"]), progress=False)
    return out


@pytest.fixture
def workspace(tmp_path) -> Path:
    """The case's folder: a copy of the old run and small files of the wrong kind or contents."""
    shutil.copytree(OLD_RUN, tmp_path / "run")
    files = {"quoted_bool.yaml": 'data: patterns\nunconditional: "false"\n',
             "ten.yaml": 'data: patterns\nsteps: "ten"\n',
             "ten.json": '{"data": "patterns", "steps": "ten"}', "broken.yaml": "data: patterns\nsteps: 1: 2\n",
             "broken.json": '{"data": patterns}', "list.yaml": "- data\n- steps\n",
             "flat.yaml": "data: patterns\nsampler: heun\nshift: 2.0\n", "sample_scalar.yaml": "sample: 20\n",
             "a_file": "not a folder\n", "notes.txt": "hello, not a checkpoint\n", "empty.pt": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "folder").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    return tmp_path


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for root in roots for p in sorted(root.rglob("*"))}


def fill(text: str, places: dict[str, Path], escape=lambda s: s) -> str:
    for name, path in places.items():
        text = text.replace(f"{{{name}}}", escape(str(path)))
    return text


@pytest.mark.parametrize("setup, command, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(setup, command, expected, workspace, uncond_run, monkeypatch,
                                                   capsys):
    places = {"tmp": workspace, "run": workspace / "run", "uncond": uncond_run}
    if setup:
        SETUPS[setup](workspace, monkeypatch)
    argv = shlex.split(fill(command, places))
    before = snapshot(workspace, uncond_run)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(f"ditkit {argv[0]}: error: "), err
    if isinstance(expected, re.Pattern):
        assert re.search(fill(expected.pattern, places, re.escape), lines[0]), err
    else:
        assert fill(expected, places) in lines[0], err
    assert snapshot(workspace, uncond_run) == before, "a failed command changed files on disk"


def test_the_table_covers_every_setup_and_names_each_case_once():
    assert {c[1] for c in CASES if c[1]} == set(SETUPS)
    assert len({c[0] for c in CASES}) == len(CASES) and len({c[1:3] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("args, match", [
    (["train", "--data", "nowhere", "--out", "{tmp}/r"], "ditkit train: error: unknown data source 'nowhere'"),
    (["sample", "--ckpt", "{tmp}/missing", "--out", "{tmp}/x.png"], "ditkit sample: error: no usable checkpoint"),
    (["sample", "--ckpt", "{tmp}/missing", "--out", "{tmp}/x.png", "--half"], "unrecognized arguments: --half"),
])
def test_the_real_entry_point_exits_2_without_a_traceback(args, match, tmp_path):
    """Through `python -m ditkit.cli` (what the console script runs): the process's own status and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ditkit.cli", *(a.replace("{tmp}", str(tmp_path)) for a in args)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert match in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir()), "a failed command wrote files"


def test_zero_flags_override_the_config_file(tmp_path, monkeypatch):
    """`--seed 0` beats the file's seed; `--unconditional` given or not differs from false."""
    import ditkit.train

    (tmp_path / "c.yaml").write_text("data: patterns\nseed: 5\nsteps: 7\nsample:\n  steps: 3\n")
    seen = []
    monkeypatch.setattr(ditkit.train, "train", lambda c, resume=False: seen.append(c) or 1 / 0)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--seed", "0"]) == 1  # 1 / 0: a "bug"
    assert seen[0].seed == 0 and seen[0].steps == 7 and seen[0].unconditional is False
    assert seen[0].sample.steps == 3


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import ditkit.cli

    def broken(args):
        raise RuntimeError("internal inconsistency")

    monkeypatch.setattr(ditkit.cli, "cmd_flops", broken)
    assert main(["flops"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: internal inconsistency" in err and "please report it" in err


def test_a_failing_loss_curve_plot_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    import ditkit.train.trainer

    def no_plot(*args, **kwargs):
        raise RuntimeError("plotting the loss curve needs matplotlib")

    monkeypatch.setattr(ditkit.train.trainer, "save_loss_curve", no_plot)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="the loss curve was not drawn"):
        code = main(["train", "--data", "patterns", "--steps", "1", "--out", str(out), "image_size=8",
                     "hidden_size=32", "depth=1", "num_heads=2", "batch_size=4", "precision=fp32",
                     "samples_per_class=1", "sample.steps=1"])
    assert code == 0 and (out / "samples.png").is_file() and not (out / "loss_curve.png").exists()
