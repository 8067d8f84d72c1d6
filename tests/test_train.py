"""Training: exact resume after SIGKILL, 2-process DDP equivalence, outputs, schedules, config files.

Bad input to `ditkit train` and the other commands is one table in test_cli_errors.py."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditkit.train import TrainConfig, build_config, train
from ditkit import checkpoint as ckpt
from ditkit.train.ema import EMA
from ditkit.train.trainer import lr_at

# A run small enough for CI: 2-channel 8x8 patterns, a 2-block DiT.
TINY = ["--data", "patterns", "image_size=8", "channels=2", "hidden_size=64", "depth=2", "num_heads=4",
        "patch_size=2", "batch_size=16", "warmup_steps=5", "log_every=1", "samples_per_class=1",
        "sample.steps=2", "precision=fp32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ditkit(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ditkit.cli", *args], capture_output=True, text=True, env=ENV, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"ditkit {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def weights(run: Path, name: str) -> dict:
    return load_file(str(ckpt.latest_checkpoint(run) / name))


def losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


RESUME_ARGS = ["train", *TINY, "--steps", "24", "--save-every", "12", "hidden_size=128"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    ditkit(*RESUME_ARGS, "--out", str(out))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = weights(a, name), weights(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs after resume"
    assert losses(a) == losses(b)


def start_and_wait_for_step_12(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ditkit.cli", *RESUME_ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not ckpt.step_dir(out, 12).exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.002)
    return proc


def test_resume_after_sigkill_is_bit_identical(tmp_path, straight_run):
    killed = tmp_path / "killed"
    proc = start_and_wait_for_step_12(killed)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not ckpt.step_dir(killed, 24).exists(), "killed too late: the run had already finished"
    assert [p.name for p in ckpt.list_checkpoints(killed)] == ["step_00000012"]

    ditkit(*RESUME_ARGS, "--out", str(killed), "--resume")  # its stale run lock is taken over
    assert_same_run(straight_run, killed)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path, straight_run, sig, code):
    """Ctrl-C / SIGTERM: the step in progress finishes, a checkpoint of it is written and named, the
    exit status is 128 + signal; resuming from it matches a run never interrupted, bit for bit."""
    out = tmp_path / "run"
    proc = start_and_wait_for_step_12(out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    saved = ckpt.list_checkpoints(out)[-1]
    step = int(saved.name.split("_")[1])
    assert 12 <= step < 24, f"interrupted too late (step {step}): the run had already finished"
    assert f"interrupted by {sig.name} at step {step}: checkpoint written to {saved}" in err
    assert "Traceback" not in err
    ckpt.verify(saved)  # an ordinary, complete checkpoint
    assert not (out / "train.lock").exists()  # the lock is released on the way out

    ditkit(*RESUME_ARGS, "--out", str(out), "--resume")
    assert_same_run(straight_run, out)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    run = tmp_path / "run"
    ditkit("train", *TINY, "--steps", "6", "--save-every", "3", "--out", str(run))
    newest = ckpt.step_dir(run, 6) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="step_00000006/model.safetensors is truncated or corrupt"):
        assert ckpt.latest_checkpoint(run) == ckpt.step_dir(run, 3)
    proc = ditkit("train", *TINY, "--steps", "6", "--save-every", "3", "--out", str(run), "--resume")
    assert "truncated or corrupt" in proc.stderr
    ckpt.verify(ckpt.step_dir(run, 6))  # step 6 re-trained from step 3 and saved whole


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, sharding):
    """torchrun, gloo, 2 CPU processes, same global batch: same loss trajectory within 1e-4 and the same
    final weights within 1e-4 (only float summation order differs), with DDP and with FSDP2."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", *TINY, "--steps", "8", "--save-every", "8"]
    ditkit(*args, "--out", str(one))
    port = {"ddp": "29517", "fsdp": "29518"}[sharding]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "-m", "ditkit.cli", *args, f"fsdp={sharding == 'fsdp'}", "--out", str(two)],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint:") == 1  # one process reports
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa, wb = weights(one, "model.safetensors"), weights(two, "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_outputs_of_a_run(tmp_path, capsys):
    from ditkit.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--save-every", "2", "keep_last=1", "--out", str(run)]) == 0
    assert f"samples.png:    {run / 'samples.png'}" in capsys.readouterr().out
    for name in ("config.json", "metrics.csv", "loss_curve.png", "samples.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004"]  # keep_last=1
    files = sorted(p.name for p in ckpt.step_dir(run, 4).iterdir())
    assert files == ["checksums.json", "config.json", "ema.safetensors", "model.safetensors", "run.json",
                     "train_state.safetensors"]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*"))
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run), "--n-per-class", "2", "--steps", "2", "--out", str(out)]) == 0
    import numpy as np

    arr = np.load(out)
    assert arr["images"].shape == (8, 2, 8, 8) and arr["labels"].tolist() == [0, 1, 2, 3] * 2
    assert arr["images"].min() >= -1 and arr["images"].max() <= 1
    png = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(run), "--class", "1", "3", "--n-per-class", "2", "--steps", "2", "--no-ema",
                 "--out", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size == (2 * 10 + 2, 2 * 10 + 2)  # 2 classes x 2 rows of 8px tiles, 2px padding
    folder = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(run), "--class", "1", "3", "--n-per-class", "2", "--steps", "2",
                 "--out", f"{folder}/"]) == 0
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [
        "1/00000.png", "1/00002.png", "3/00001.png", "3/00003.png"]


def test_checkpoint_that_does_not_match_the_model(tmp_path):
    from ditkit.models import DiT

    run = tmp_path / "run"
    ditkit("train", *TINY, "--steps", "2", "--out", str(run))
    path = ckpt.latest_checkpoint(run)
    other = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=4)
    with pytest.raises(ValueError, match="shape mismatches"):
        other.load_state_dict(load_file(str(path / "model.safetensors")))


def test_lr_schedule_and_ema_warmup():
    c = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(c, 0) == pytest.approx(1e-4)
    assert lr_at(c, 9) == pytest.approx(1e-3)
    assert lr_at(c, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(c, 110) == pytest.approx(1e-4)
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(model, 0)
    torch.testing.assert_close(ema.model.weight, 0.1 * before + 0.9 * model.weight)


def test_a_time_budget_fits_the_cosine_so_it_ends_with_the_budget(tmp_path, monkeypatch):
    # a fake clock: every step takes 0.05 s, so minutes=0.1 (6 s) holds 120 steps of steps=1000; fitted at
    # step 20 (1 s spent) the cosine ends at 20 + 0.97 * 5 s / 0.05 s = 117, and the run ends at its floor
    from ditkit.train import trainer

    clock = {"now": 0.0}
    real_step = trainer.train_step

    def timed_step(run):
        clock["now"] += 0.05
        return real_step(run)

    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(trainer, "train_step", timed_step)
    args = [a for a in TINY[2:] if not a.startswith(("batch_size", "warmup"))]
    c = build_config(None, {"data": "patterns", "out": str(tmp_path / "fit")},
                     [*args, "batch_size=2", "warmup_steps=5", "steps=1000", "minutes=0.1", "min_lr_ratio=0.1",
                      "save_every=100"])
    result = train(c, progress=False)
    assert result.steps in (120, 121)  # the clock is checked before each step (0.05 sums are inexact)
    rows = list(csv.DictReader(open(tmp_path / "fit" / "metrics.csv")))
    lr = {int(float(r["step"])): float(r["lr"]) for r in rows}
    assert lr[60] == pytest.approx(lr_at(c, 59, 117)) and lr[60] < lr_at(c, 59)
    assert lr[118] == pytest.approx(c.lr * 0.1)  # the floor, reached inside the budget
    # the fitted end is saved with the checkpoints, so a resumed run keeps it
    assert ckpt.load_train_state(ckpt.step_dir(tmp_path / "fit", 100))[1]["schedule"] == {"steps": 1000, "ends_at": 117}
    import shutil

    shutil.rmtree(ckpt.step_dir(tmp_path / "fit", result.steps))
    train(c, resume=True, progress=False)  # from step 100: the saved end, not a new fit
    rows = list(csv.DictReader(open(tmp_path / "fit" / "metrics.csv")))
    lr = {int(float(r["step"])): float(r["lr"]) for r in rows}
    assert lr[110] == pytest.approx(lr_at(c, 109, 117)) and lr[150] == pytest.approx(c.lr * 0.1)


def test_fp16_and_bf16_steps_run_and_stay_finite(tmp_path):
    for precision in ("fp16", "bf16"):
        c = build_config(None, {"data": "patterns", "out": str(tmp_path / precision)},
                         [a for a in TINY[2:] if not a.startswith("precision")] + [f"precision={precision}", "steps=3"])
        result = train(c, progress=False)
        assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))


def test_config_files_in_configs_parse():
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        build_config(str(path))


def test_mnist_config_file_is_the_demo_default():
    """configs/mnist.yaml documents the main job: it must equal the TrainConfig defaults (but `out`)."""
    path = Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"
    from_file = build_config(str(path)).to_dict()
    defaults = TrainConfig().to_dict()
    from_file.pop("out"), defaults.pop("out")
    assert from_file == {**defaults, "sample": {**defaults["sample"], "sampler": "heun"}}


def test_wall_clock_budget_stops_early_and_saves(tmp_path):
    c = build_config(None, {"data": "patterns", "out": str(tmp_path / "r"), "minutes": 0.02},
                     [a for a in TINY[2:]] + ["steps=100000", "save_every=100000"])
    result = train(c, progress=False)
    assert 0 < result.steps < 100000
    assert result.checkpoint == ckpt.step_dir(tmp_path / "r", result.steps)
    ckpt.verify(result.checkpoint)


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    c = build_config(None, {"data": "patterns", "out": str(tmp_path / "r")}, TINY[2:] + ["tensorboard=true"])
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(c, progress=False)
    assert not (tmp_path / "r").exists()
