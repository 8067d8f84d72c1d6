"""A seeded fuzz test of the command line and the config surface: random combinations of flags, `key=value`
overrides and config files of the wrong types, ranges and shapes. Each must end in exit 0 or exactly one
`ditkit CMD: error: ...` line, never a traceback, and never change an existing run's files.

The generator is seeded (the same cases every run) and bounded (COUNT cases, well under a minute). A train
command that passes every check stops where training would begin (`build_run` is replaced), after its data
and model were built where they are small; sampling and editing run for real on the tiny shipped run.
"""
from __future__ import annotations

import json
import random
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ditkit.train.trainer
from ditkit.cli import main
from ditkit.config import config_keys

SEED = 30
COUNT = 300
OLD_RUN = Path(__file__).parent / "data" / "old_run"

VALUES = ["0", "1", "2", "-1", "3.5", "1e9", "-1e-3", "nan", "inf", "x", "", "true", "false", "null", "none",
          "[1, 2]", "[2, 1]", "[1]", "{}", '{"a": 1}', "{", "DiT-S/8", "flow", "ddpm", "heun", "fp16", "0.5"]
FILE_VALUES = [0, 1, -5, 2.5, 1e12, float("nan"), True, "ten", "", None, [], [1, 2], [0.8, 0.1], {}, {"x": 1},
               "patterns", "DiT-B/4", "euler"]
FLAGS = {  # train flags and the values drawn for them
    "--data": ["patterns", "nowhere", "{tmp}/a_file", "{tmp}/images", "{tmp}/empty"],
    "--model": ["custom", "DiT-S/8", "DiT-Q/2", "x"],
    "--objective": ["flow", "ddpm", "meanflow"],
    "--steps": ["0", "1", "-3", "x", "5"],
    "--minutes": ["0", "-1", "0.5", "nan"],
    "--batch-size": ["0", "3", "4", "-2"],
    "--seed": ["0", "-1", "x"],
    "--save-every": ["0", "1", "-1"],
    "--sample-every": ["0", "-1", "2"],
    "--precision": ["fp32", "bf16", "fp8"],
    "--control": ["edges", "depth"],
    "--base": ["{run}", "{tmp}/nothing", "{tmp}/a_file"],
}
SWITCHES = ["--compile", "--grad-checkpoint", "--unconditional"]
SAMPLE_FLAGS = {
    "--steps": ["0", "1", "2", "-1", "x"],
    "--sampler": ["euler", "heun", "ddim", "sde", "bogus"],
    "--cfg": ["1", "2.5", "-1", "nan", "x"],
    "--class": ["0", "3", "4", "-1", "0 1"],
    "--n-per-class": ["1", "0", "-2"],
    "--cache": ["0.1", "2", "-1"],
    "--precision": ["fp32", "bf16", "fp8"],
    "--seed": ["0", "-5"],
    "--prompt": ["'a red square'"],
}
SAMPLE_OUTS = ["{tmp}/x.png", "{tmp}/x.npz", "{tmp}/x.gif", "{tmp}/x.jpg", "{tmp}/d/", "{tmp}/a_file/x.png"]
EDIT_FLAGS = {"--strength": ["0", "0.5", "1", "2", "-1"], "--class": ["0", "9", "-1"], "--n": ["1", "0", "2"],
              "--scale": ["1", "0", "3"], "--jump-length": ["1", "0"], "--jump-n-sample": ["1", "-1"],
              "--steps": ["1", "2", "0"], "--mask": ["{tmp}/in.png", "{tmp}/missing.png", "{tmp}/notes.txt"]}


def random_config_file(rng: random.Random, folder: Path, k: int) -> str:
    """A YAML or JSON file: a mapping of real and misspelt keys with values of any type, or the wrong shape."""
    keys = config_keys()
    shape = rng.random()
    if shape < 0.1:
        body: object = rng.choice([[1, 2], "just text", 7, None])
    else:
        body = {}
        for _ in range(rng.randint(1, 4)):
            key = rng.choice(keys)
            if rng.random() < 0.15:
                key = key[:-1] + "z"  # a typo
            if key.startswith("sample.") and rng.random() < 0.5:
                body.setdefault("sample", {})
                if isinstance(body["sample"], dict):
                    body["sample"][key[len("sample."):]] = rng.choice(FILE_VALUES)
                continue
            body[key] = rng.choice(FILE_VALUES)
        body.setdefault("data", "patterns")
    if rng.random() < 0.5:
        path = folder / f"c{k}.json"
        text = json.dumps(body) if rng.random() < 0.9 else json.dumps(body)[:-1]
    else:
        import yaml

        path = folder / f"c{k}.yaml"
        text = yaml.safe_dump(body) if rng.random() < 0.9 else "data: [unclosed\n"
    path.write_text(text)
    return str(path)


VALID = ["lr=1e-3", "sample.steps=3", "log_every=5", "ema_decay=0.99", "save_every=3", "minutes=0.5", "seed=3",
         "sample.cfg_scale=1.5", "keep_last=2", "--steps 5", "--batch-size 4", "--precision fp32", "--unconditional"]
TINY = ["--data", "patterns", "image_size=8", "hidden_size=32", "depth=1", "num_heads=2", "patch_size=2"]


def train_case(rng: random.Random, folder: Path, k: int) -> list[str]:
    """A new run or a resume of the shipped one: a third of them valid apart from at most one valid change,
    the rest with random flags, overrides and config files."""
    resume = rng.random() < 0.3
    argv = ["train", "--out", "{run}", "--resume"] if resume else ["train", "--out", "{tmp}/new", *TINY]
    if rng.random() < 0.35:
        change = rng.choice(VALID)
        if resume and change in ("--batch-size 4", "--precision fp32", "--unconditional", "lr=1e-3",
                                 "ema_decay=0.99", "seed=3"):
            change = "log_every=5"  # identity fields cannot change on resume
        return argv + (["--steps", "5"] if resume else []) + shlex.split(change)
    if not resume:
        argv[2] = rng.choice(["{tmp}/new", "{tmp}/a_file", "{run}", "{tmp}/a_file/run"])
    if rng.random() < 0.3:
        argv += ["--config", random_config_file(rng, folder, k)]
    for flag in rng.sample(sorted(FLAGS), rng.randint(0, 3)):
        argv += [flag, rng.choice(FLAGS[flag])]
    argv += rng.sample(SWITCHES, rng.randint(0, 1))
    keys = config_keys()
    for _ in range(rng.randint(0, 4)):
        key = rng.choice(keys)
        if rng.random() < 0.1:
            key = key.replace("_", "", 1) if "_" in key else key + "s"
        argv.append(f"{key}={rng.choice(VALUES)}")
    return argv


def sample_case(rng: random.Random) -> list[str]:
    argv = ["sample", "--ckpt", rng.choice(["{run}", "{run}", "{run}", "{tmp}/nothing", "{tmp}/a_file"])]
    for flag in rng.sample(sorted(SAMPLE_FLAGS), rng.randint(0, 4)):
        argv += [flag, *shlex.split(rng.choice(SAMPLE_FLAGS[flag]))]
    if "--steps" not in argv:
        argv += ["--steps", "2"]
    if "--n-per-class" not in argv:
        argv += ["--n-per-class", "1"]
    if rng.random() < 0.1:
        argv.append("--paper")
    return argv + ["--out", rng.choice(SAMPLE_OUTS)]


def edit_case(rng: random.Random) -> list[str]:
    argv = ["edit", "--ckpt", "{run}", "--image", rng.choice(["{tmp}/in.png", "{tmp}/in.png", "{tmp}/notes.txt",
                                                             "{tmp}/missing.png"])]
    for flag in rng.sample(sorted(EDIT_FLAGS), rng.randint(0, 4)):
        argv += [flag, rng.choice(EDIT_FLAGS[flag])]
    if "--steps" not in argv:
        argv += ["--steps", "2"]
    return argv + ["--out", rng.choice(["{tmp}/o.png", "{tmp}/o.npz", "{tmp}/od/", "{tmp}/a_file/o.png"])]


def other_case(rng: random.Random) -> list[str]:
    return rng.choice([
        ["flops", "--input-size", rng.choice(["8", "0", "-4", "7"]), "--in-channels", rng.choice(["4", "0", "-1"]),
         "--num-classes", rng.choice(["10", "0", "-1"]), *rng.sample(["--json"], rng.randint(0, 1))],
        ["eval", rng.choice(["{tmp}/notes.txt", "{tmp}/missing.npz", "{tmp}/empty", "{tmp}/a_file"])],
        ["convert", "--from-official", rng.choice(["{tmp}/notes.txt", "{tmp}/empty.pt", "{tmp}/empty"]),
         "--out", rng.choice(["{tmp}/c", "{tmp}/a_file"])],
        ["train", rng.choice(["--steps", "--out", "--bogus", "--resume=3"])],
        [rng.choice(["bogus", "sample", "edit"])],
    ])


def make_cases(folder: Path) -> list[list[str]]:
    """COUNT command lines, always the same ones; the config files they name are written into `folder`."""
    rng = random.Random(SEED)
    cases = []
    for k in range(COUNT):
        pick = rng.random()
        if pick < 0.5:
            cases.append(train_case(rng, folder, k))
        elif pick < 0.7:
            cases.append(sample_case(rng))
        elif pick < 0.85:
            cases.append(edit_case(rng))
        else:
            cases.append(other_case(rng))
    return cases


class ReachedTraining(SystemExit):
    """Raised where training would begin: every check passed (exit status 0)."""


def stop_before_training(c, dist, start):
    from ditkit.train.kinds import make_kind

    if c.model == "custom" and c.hidden_size <= 64 and c.depth <= 2 and (c.image_size or 32) <= 8:
        make_kind(c).build()  # the data and the model a small config asks for really exist
    raise ReachedTraining(0)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(OLD_RUN, tmp / "run")
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "notes.txt").write_text("hello, not an image\n")
    (tmp / "empty.pt").write_text("")
    (tmp / "empty").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "in.png")
    for cls in ("a", "b"):
        (tmp / "images" / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp / "images" / cls / "0.png")
    return tmp


def test_random_commands_end_in_success_or_one_error_line(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)  # a train command without --out writes runs/demo here
    monkeypatch.setattr(ditkit.train.trainer, "build_run", stop_before_training)
    run_before = snapshot(workspace / "run")
    failures, codes = [], []
    for k, case in enumerate(make_cases(workspace)):
        argv = [a.replace("{tmp}", str(workspace)).replace("{run}", str(workspace / "run")) for a in case]
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own exit, or ReachedTraining
            code = exit_.code
        err = capsys.readouterr().err
        codes.append((argv[0], code))
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("warning: ", "note: "))
                 and not ln.startswith(("train:", "sampling:", "editing:", "\r"))]
        ok = code in (0, 2) and "Traceback" not in err
        if code == 2:
            ok = ok and len(lines) == 1 and lines[0].startswith(f"ditkit {argv[0]}: error: ") or (
                len(lines) == 1 and lines[0].startswith("ditkit: error: "))
        if not ok:
            failures.append(f"case {k}: ditkit {shlex.join(argv)}\n  exit {code}\n  {err.strip()[-600:]}")
        if snapshot(workspace / "run") != run_before:
            failures.append(f"case {k}: ditkit {shlex.join(argv)} changed the existing run's files")
            shutil.rmtree(workspace / "run")
            shutil.copytree(OLD_RUN, workspace / "run")
        for leftover in ("new", "c", "d", "od", "runs"):
            shutil.rmtree(workspace / leftover, ignore_errors=True)
    assert not failures, f"{len(failures)} of {COUNT} cases failed:\n" + "\n".join(failures[:15])
    # the cases reach both ends: a fuzz that only ever fails at the first check would test little
    for command in ("train", "sample", "edit"):
        ends = [code for name, code in codes if name == command]
        assert ends.count(0) >= 0.1 * len(ends) and ends.count(2) >= 0.3 * len(ends), (command, ends)
