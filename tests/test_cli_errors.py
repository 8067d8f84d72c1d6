"""Bad input through the CLI: exit code 2, one line `ditkit CMD: error: ...`, and nothing on disk changed.

CASES is one table: add a row (argv with {placeholders}, a regex the error line must match) to cover a new case.
Placeholders: {run} a finished 2-step conditional run (a copy of tests/data/old_run), {uncond} an unconditional
run, {ws} the workspace folder holding the files made by `workspace` below.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditkit.cli import main
from ditkit.train import build_config

OLD_RUN = Path(__file__).parent / "data" / "old_run"

CASES = [
    # 16.3: a zero is a value (then validated), not "not given"
    ("train --data patterns --steps 0 --out {ws}/new", r"steps must be >= 1, got 0"),
    ("train --data patterns --batch-size 0 --out {ws}/new", r"batch_size must be >= 1, got 0"),
    # 16.4: file values are type-checked like key=value; malformed files name file and line
    ("train --config {ws}/quoted_bool.yaml --out {ws}/new",
     r"quoted_bool.yaml: unconditional expects true or false, got the string 'false'"),
    ("train --config {ws}/ten.yaml --out {ws}/new", r"ten.yaml: steps expects an int, got the string 'ten'"),
    ("train --config {ws}/ten.json --out {ws}/new", r"ten.json: steps expects an int, got the string 'ten'"),
    ("train --config {ws}/broken.yaml --out {ws}/new", r"broken.yaml line 2, column \d+: not valid YAML"),
    ("train --config {ws}/broken.json --out {ws}/new", r"broken.json line 1, column \d+: not valid JSON"),
    ("train --config {ws}/list.yaml --out {ws}/new", r"list.yaml must hold a mapping of config keys"),
    ("train --config {ws}/missing.yaml", r"config file .*missing.yaml not found"),
    ("train --data patterns learning_rate=1 --out {ws}/new", r"unknown config key\(s\) 'learning_rate'"),
    ("train --data patterns sample.wiggle=1 --out {ws}/new", r"unknown config key\(s\) 'sample.wiggle'"),
    # 16.7: resume reads the run's config; identity fields cannot change; a finished run needs a larger --steps
    ("train --out {run} --resume hidden_size=64", r"different config \(hidden_size: saved 32 vs now 64\)"),
    ("train --out {run} --resume --batch-size 8", r"different config \(batch_size: saved 4 vs now 8\)"),
    ("train --out {run} --resume", r"already at step 2 of steps=2: pass --steps N with N > 2"),
    ("train --out {run} --resume --steps 1", r"already at step 2 of steps=1"),
    ("train --out {ws}/nothing --resume", r"--resume: no usable checkpoint in .*nothing"),
    ("train --data patterns --out {run}", r"already holds checkpoints: pass --resume"),
    # 16.9: OS errors are one line too
    ("train --data patterns --out {ws}/a_file", r"--out .*a_file is a file, not a run directory"),
    ("train --data patterns --out {ws}/a_file/run", r"Not a directory: .*a_file"),
    ("sample --ckpt {run} --out {ws}/a_file/x.png", r"File exists: .*a_file|Not a directory: .*a_file"),
    ("sample --ckpt {run} --n-per-class -3 --out {ws}/x.png", r"n_per_class must be >= 1, got -3"),
    ("sample --ckpt {run} --frames 8 --out {ws}/x.png", r"frames applies to video runs only \(this is an image run\)"),
    ("sample --ckpt {uncond} --class 1 --out {ws}/x.png", r"this run is unconditional \(it has no classes\)"),
    ("sample --ckpt {run} --class 4 --out {ws}/x.png", r"--class \[4\] out of range: this model has classes 0..3"),
    ("sample --ckpt {run} --steps 0 --out {ws}/x.png", r"steps must be >= 1, got 0"),
    ("sample --ckpt {run} --sampler ddim --out {ws}/x.png", r"unknown sampler 'ddim' for FlowMatching"),
    ("sample --ckpt {run} --out {ws}/x.jpg", r"--out must end in .png"),
    ("sample --ckpt {run} --out {ws}/x.gif", r"holds an image model"),
    ("sample --ckpt {ws}/nothing --out {ws}/x.png", r"no usable checkpoint in"),
    ("sample --ckpt {run} --paper --out {ws}/x.png", r"--paper reproduces the original's DDPM sampling"),
    ("edit --ckpt {uncond} --image {ws}/in.png --class 1 --out {ws}/x.png", r"--class 1: this run is unconditional"),
    ("edit --ckpt {run} --image {ws}/missing.png --out {ws}/x.png", r"image .*missing.png not found"),
    ("edit --ckpt {run} --image {ws}/in.png --strength 2 --out {ws}/x.png", r"strength must be in \[0, 1\]"),
    ("edit --ckpt {run} --image {ws}/in.png --n 0 --out {ws}/x.png", r"n must be >= 1, got 0"),
]


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory) -> Path:
    from ditkit.train import train

    out = tmp_path_factory.mktemp("uncond") / "run"
    train(build_config(None, {"out": str(out), "data": "patterns", "steps": 1, "unconditional": True},
                       ["image_size=8", "hidden_size=32", "depth=1", "num_heads=2", "batch_size=4",
                        "precision=fp32", "samples_per_class=1", "sample_steps=1"]), progress=False)
    return out


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(OLD_RUN, ws / "run")
    (ws / "quoted_bool.yaml").write_text('data: patterns\nunconditional: "false"\n')
    (ws / "ten.yaml").write_text('data: patterns\nsteps: "ten"\n')
    (ws / "ten.json").write_text('{"data": "patterns", "steps": "ten"}')
    (ws / "broken.yaml").write_text("data: patterns\nsteps: 1: 2\n")
    (ws / "broken.json").write_text('{"data": patterns}')
    (ws / "list.yaml").write_text("- data\n- steps\n")
    (ws / "a_file").write_text("not a folder\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ws / "in.png")
    return ws


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, match", CASES, ids=[c[0].split(" --out")[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(argv, match, workspace, uncond_run, capsys):
    args = argv.format(ws=workspace, run=workspace / "run", uncond=uncond_run).split()
    before = snapshot(workspace, uncond_run)
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"ditkit {args[0]}: error: "), err
    assert re.search(match, err), err
    assert "0..0" not in err
    assert snapshot(workspace, uncond_run) == before, "a failed command changed files"


def test_zero_flags_override_the_config_file(tmp_path, monkeypatch):
    """`--seed 0` beats the file's seed; `--unconditional` given or not differs from false."""
    import ditkit.train

    (tmp_path / "c.yaml").write_text("data: patterns\nseed: 5\nsteps: 7\n")
    seen = []
    monkeypatch.setattr(ditkit.train, "train", lambda c, resume=False: seen.append(c) or 1 / 0)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--seed", "0"]) == 1  # 1 / 0: a "bug"
    assert seen[0].seed == 0 and seen[0].steps == 7 and seen[0].unconditional is False


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
                     "samples_per_class=1", "sample_steps=1"])
    assert code == 0 and (out / "samples.png").is_file() and not (out / "loss_curve.png").exists()
