"""Faults that would lose work or tell the user something untrue: overrides given on resume, a diverging run,
a failed write (full disk, no permission), images Pillow refuses, image folders of mixed sizes, a time budget
that ends between log points or before the first step. Every run here is tiny (hidden 32, a few steps) and
nothing races the clock or a signal: where a budget matters, the trainer's clock is replaced."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import ditkit.checkpoint
import ditkit.train.trainer
from ditkit import checkpoint as ckpt
from ditkit.cli import main
from ditkit.io import WriteError, write_text_atomic

OLD_RUN = Path(__file__).parent / "data" / "old_run"
TINY = ["--data", "patterns", "image_size=8", "channels=2", "hidden_size=32", "depth=1", "num_heads=2",
        "patch_size=2", "batch_size=8", "precision=fp32", "warmup_steps=1", "log_every=1", "samples_per_class=1",
        "sample.steps=2"]


def error_line(capsys) -> str:
    """The command's one `ditkit ...: error:` line (warnings and notes aside); fails on more than one."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("warning: ", "note: "))
             and not ln.startswith("train:")]
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


def all_finite(folder: Path) -> bool:
    """Every floating tensor of every checkpoint under `folder` finite (the Python RNG's unset Gaussian is NaN
    by design and is not state of the model)."""
    for f in folder.rglob("*.safetensors"):
        for name, value in load_file(str(f)).items():
            if value.is_floating_point() and not name.startswith("rng.") and not torch.isfinite(value).all():
                return False
    return True


# ------------------------------------------------------------------------------------------------
# Overrides on resume apply to that invocation only
# ------------------------------------------------------------------------------------------------

def test_resume_overrides_apply_to_that_invocation_only(tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(OLD_RUN, out)
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "minutes=30", "log_every=2"]) == 0
    printed = capsys.readouterr().out
    assert "for this invocation only (the run's saved config keeps its own): minutes=30.0, log_every=2" in printed
    assert "steps=3: the run's new length (was 2), saved in its config" in printed
    saved = json.loads((out / "config.json").read_text())
    newest = json.loads((ckpt.step_dir(out, 3) / "run.json").read_text())["train_config"]
    for config in (saved, newest):
        assert config["minutes"] is None and config["log_every"] == 10 and config["steps"] == 3
    # the next plain --resume (what the Ctrl-C message says to run) trains as the run was configured
    assert main(["train", "--out", str(out), "--resume", "--steps", "4"]) == 0
    assert "for this invocation only" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Divergence
# ------------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_with_one_line_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *TINY, "lr=1e4", "--steps", "40", "--save-every", "1", "--out", str(out)])
    line = error_line(capsys)
    assert code == 2 and line.startswith("ditkit train: error: training diverged at step 2: the loss reached ")
    assert "the last good step was 1" in line and f"{ckpt.step_dir(out, 1)}, is kept" in line
    assert "lower lr (this one: lr=10000)" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000001"] and all_finite(out)
    assert ckpt.latest_checkpoint(out) == ckpt.step_dir(out, 1)  # --resume continues from the last good one
    assert not (out / "train.lock").exists()


def test_mostly_non_finite_steps_stop_the_run_and_nan_state_is_never_written(tmp_path, monkeypatch, capsys):
    """From step 3 on every gradient is NaN: the updates are skipped (the weights stay finite, the EMA too)
    until half of the last 20 steps were skipped; then the run stops, with nothing after step 2 saved."""
    step = ditkit.train.trainer.train_step

    def poisoned(run):
        if run.step >= 2:
            run.objective.training_losses = lambda *a, **k: {"loss": torch.full((1,), float("nan"),
                                                                                  requires_grad=True)}
        return step(run)

    monkeypatch.setattr(ditkit.train.trainer, "train_step", poisoned)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "40", "--save-every", "2", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "training diverged at step 12: 10 of the last 12 steps had a non-finite loss or gradients" in line
    assert "the last good step was 2" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002"] and all_finite(out)


def test_save_checkpoint_refuses_non_finite_state_and_writes_nothing(tmp_path):
    good = {"w": torch.ones(2)}
    for model, ema, opt in (({"w": torch.tensor([1.0, float("nan")])}, good, {}),
                            (good, {"w": torch.tensor([float("inf")])}, {}),
                            (good, good, {"0": {"exp_avg": torch.tensor([float("nan")])}})):
        with pytest.raises(ckpt.NonFiniteState, match="hold non-finite values"):
            ckpt.save_checkpoint(tmp_path, 1, {}, {}, model, ema, {"state": opt, "param_groups": []}, {}, {}, 3)
    assert not tmp_path.joinpath("checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# Failed writes: one line naming the path and the cause, no temporary files, earlier checkpoints intact
# ------------------------------------------------------------------------------------------------

def _fail_second_checkpoint(monkeypatch, error: BaseException) -> None:
    """The second checkpoint's weights file is half written, then the disk 'fails' with `error`."""
    real, calls = ditkit.checkpoint.save_file, []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if "step_00000002" in filename:
            Path(filename).write_bytes(b"\0" * 100)
            raise error
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ditkit.checkpoint, "save_file", failing)


@pytest.mark.parametrize("error, cause", [
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                     'left on device" })'), "No space left on device (free some space, or write elsewhere)"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (free some space, or write elsewhere)"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied (no write permission)"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system (a read-only location)"),
], ids=["safetensors-full", "oserror-full", "permission", "read-only"])
def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_earlier_one(error, cause, tmp_path, monkeypatch,
                                                                          capsys):
    _fail_second_checkpoint(monkeypatch, error)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--save-every", "1", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert line == f"ditkit train: error: cannot write checkpoint {ckpt.step_dir(out, 2)}: {cause}"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]  # no .tmp left behind
    ckpt.verify(ckpt.step_dir(out, 1))
    assert not (out / "train.lock").exists()


def test_a_failed_atomic_write_names_the_file_and_removes_its_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")

    def full(self, text, *args, **kwargs):
        Path.write_bytes(self, b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError) as info:
        write_text_atomic(target, "new\n")
    monkeypatch.undo()
    assert str(info.value) == f"cannot write {target}: No space left on device (free some space, or write elsewhere)"
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"] and target.read_text() == "old\n"


# ------------------------------------------------------------------------------------------------
# Images Pillow refuses
# ------------------------------------------------------------------------------------------------

def _image(path: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)
    return path


def _truncated(path: Path) -> Path:
    """A 16x16 PNG of noise (so that it does not compress to nothing), cut off halfway."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["bomb", "truncated"])
def test_edit_with_an_image_pillow_refuses_is_one_line_naming_it(kind, tmp_path, monkeypatch, capsys):
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 = 64 pixels: over twice the limit
    image = _image(tmp_path / "in.png") if kind == "bomb" else _truncated(tmp_path / "in.png")
    code = main(["edit", "--ckpt", str(OLD_RUN), "--image", str(image), "--out", str(tmp_path / "o.png")])
    line = error_line(capsys)
    expected = ("is refused by Pillow as a possible decompression bomb" if kind == "bomb" else
                "cannot be read as an image (image file is truncated")
    assert code == 2 and line.startswith(f"ditkit edit: error: --image {image} {expected}"), line
    assert not (tmp_path / "o.png").exists()


def test_eval_of_a_folder_whose_first_image_is_a_bomb_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    first = _image(tmp_path / "s" / "0" / "00000.png")
    assert main(["eval", "--samples", str(tmp_path / "s")]) == 2
    assert f"--samples {tmp_path / 's'}: its first image {first} is refused by Pillow" in error_line(capsys)


def test_a_data_folder_lists_every_unreadable_file_and_how_many_were_used(tmp_path, monkeypatch):
    from ditkit.data.folder import load_folder
    from ditkit.notes import DitkitWarning

    for k in range(3):
        _image(tmp_path / "a" / f"{k}.png", (8, 8))
    big = _image(tmp_path / "a" / "big.png", (32, 32))
    cut = _truncated(tmp_path / "a" / "cut.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 32x32 is over twice that; 16x16 and 8x8 are not
    with pytest.warns(DitkitWarning) as record:
        data = load_folder(tmp_path / "a", image_size=8, channels=3)
    assert len(data) == 3
    message = str(record[0].message)
    assert message.startswith("skipped 2 unreadable image(s) of 5, using the other 3: ")
    assert f"{big} (DecompressionBombError)" in message and f"{cut} (OSError)" in message


# ------------------------------------------------------------------------------------------------
# Image folders of mixed sizes and modes
# ------------------------------------------------------------------------------------------------

def test_a_mixed_folder_says_what_size_and_channels_it_was_loaded_as(tmp_path, capsys):
    from ditkit.data import load_dataset
    from ditkit.data.folder import load_folder

    _image(tmp_path / "m" / "a.png", (28, 28), "L")
    _image(tmp_path / "m" / "b.png", (64, 48), "RGB")
    data = load_dataset(str(tmp_path / "m"))
    assert tuple(data.images.shape) == (2, 3, 32, 32)
    err = capsys.readouterr().err
    assert (f"note: {tmp_path / 'm'}: images of size 28x28, 64x48 and mode L, RGB, loaded as 32x32 (the default "
            "image_size; centre-cropped and resized) and RGB (the default channels=3); choose others with "
            "image_size=N and channels=1 (grey) or 3 (RGB)") in err
    load_folder(tmp_path / "m", image_size=16, channels=3)  # both chosen: nothing to say
    assert "note:" not in capsys.readouterr().err
    for k in range(2):
        _image(tmp_path / "same" / f"{k}.png", (32, 32))
    load_dataset(str(tmp_path / "same"))  # already 32x32 RGB: nothing changed, nothing to say
    assert "note:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# A time budget that ends between log points, or before the first step
# ------------------------------------------------------------------------------------------------

def _budget_ends_after(monkeypatch, steps: int) -> None:
    """The wall-clock budget 'runs out' once `steps` steps are done: no real clock is raced."""
    monkeypatch.setattr(ditkit.train.trainer, "out_of_time", lambda run, start_time: run.step >= steps)


def test_a_budget_ending_between_log_points_logs_the_last_step(tmp_path, monkeypatch, capsys):
    _budget_ends_after(monkeypatch, 3)
    out = tmp_path / "run"
    assert main(["train", *TINY, "log_every=10", "--steps", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("trained 3 steps") and "final loss nan" not in printed
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[-1].startswith("3,") and len(rows) == 2
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"]


def test_a_budget_ending_before_the_first_step_fails_and_saves_nothing(tmp_path, monkeypatch, capsys):
    _budget_ends_after(monkeypatch, 0)
    out = tmp_path / "run"
    assert main(["train", *TINY, "minutes=0.001", "--steps", "50", "--out", str(out)]) == 2
    assert error_line(capsys).startswith("ditkit train: error: minutes=0.001 ran out before the first step: "
                                         "nothing was trained or saved")
    assert ckpt.list_checkpoints(out) == [] and not (out / "train.lock").exists()


def test_interrupted_before_the_first_step_saves_nothing(tmp_path, monkeypatch, capsys):
    """A signal that arrives once the loop is armed but before a step: exit 143, no step-0 checkpoint."""
    from ditkit.train.interrupt import Interrupts

    monkeypatch.setattr(Interrupts, "should_stop", lambda self, dist=None: setattr(self, "signum", 15) or True)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "5", "--out", str(out)]) == 143
    assert "interrupted by SIGTERM before the first step: nothing to save" in capsys.readouterr().err
    assert ckpt.list_checkpoints(out) == []

