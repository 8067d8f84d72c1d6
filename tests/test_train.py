"""Training: exact resume after SIGKILL, 2-process DDP equivalence, outputs, bad input."""
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
from ditkit.train import checkpoint as ckpt
from ditkit.train.ema import EMA
from ditkit.train.trainer import lr_at

# A run small enough for CI: 2-channel 8x8 patterns, a 2-block DiT.
TINY = ["--data", "patterns", "image_size=8", "channels=2", "hidden_size=64", "depth=2", "num_heads=4",
        "patch_size=2", "batch_size=16", "warmup_steps=5", "log_every=1", "samples_per_class=1",
        "sample_steps=2", "precision=fp32"]
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


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["train", *TINY, "--steps", "24", "--save-every", "12", "hidden_size=128"]
    ditkit(*args, "--out", str(straight))

    proc = subprocess.Popen([sys.executable, "-m", "ditkit.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not ckpt.step_dir(killed, 12).exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not ckpt.step_dir(killed, 24).exists(), "killed too late: the run had already finished"
    assert [p.name for p in ckpt.list_checkpoints(killed)] == ["step_00000012"]

    ditkit(*args, "--out", str(killed), "--resume")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(straight, name), weights(killed, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    assert losses(straight) == losses(killed)


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


def test_outputs_of_a_run(tmp_path):
    run = tmp_path / "run"
    proc = ditkit("train", *TINY, "--steps", "4", "--save-every", "2", "keep_last=1", "--out", str(run))
    assert "samples.png" in proc.stdout
    for name in ("config.json", "metrics.csv", "loss_curve.png", "samples.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004"]  # keep_last=1
    files = sorted(p.name for p in ckpt.step_dir(run, 4).iterdir())
    assert files == ["checksums.json", "config.json", "ema.safetensors", "model.safetensors", "run.json",
                     "train_state.safetensors"]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*"))
    out = tmp_path / "s.npz"
    ditkit("sample", "--ckpt", str(run), "--n-per-class", "2", "--steps", "2", "--out", str(out))
    import numpy as np

    arr = np.load(out)
    assert arr["images"].shape == (8, 2, 8, 8) and arr["labels"].tolist() == [0, 1, 2, 3] * 2
    assert arr["images"].min() >= -1 and arr["images"].max() <= 1
    png = tmp_path / "grid.png"
    ditkit("sample", "--ckpt", str(run), "--class", "1", "3", "--n-per-class", "2", "--steps", "2", "--no-ema",
           "--out", str(png))
    from PIL import Image

    assert Image.open(png).size == (2 * 10 + 2, 2 * 10 + 2)  # 2 classes x 2 rows of 8px tiles, 2px padding
    folder = tmp_path / "samples"
    ditkit("sample", "--ckpt", str(run), "--class", "1", "3", "--n-per-class", "2", "--steps", "2",
           "--out", f"{folder}/")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [
        "1/00000.png", "1/00002.png", "3/00001.png", "3/00003.png"]
    for args, match in [(["--out", str(tmp_path / "x.jpg")], "must end in .png"),
                        (["--class", "7", "--out", str(png)],
                         r"--class \[7\] out of range: this model has classes 0..3"),
                        (["--ckpt", str(tmp_path / "missing"), "--out", str(png)], "no usable checkpoint")]:
        ckpt_args = [] if "--ckpt" in args else ["--ckpt", str(run)]
        proc = ditkit("sample", *ckpt_args, *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert __import__("re").search(match, proc.stderr), proc.stderr


@pytest.mark.parametrize("args, match", [
    (["--data", "nowhere"], "unknown data source 'nowhere'"),
    (["--data", "patterns", "learning_rate=1"], "unknown config key.*'learning_rate'.*the keys are: data"),
    (["--data", "patterns", "--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
    (["--data", "patterns", "steps=many"], "steps expects an int"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, match):
    proc = ditkit("train", *args, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert __import__("re").search(match, proc.stderr), proc.stderr
    assert not (tmp_path / "r" / ckpt.CHECKPOINTS).exists()


def test_resume_with_a_different_config_is_refused_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    ditkit("train", *TINY, "--steps", "2", "--out", str(run))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = ditkit("train", *TINY, "--steps", "2", "hidden_size=32", "--out", str(run), "--resume", check=False)
    assert proc.returncode == 2 and "different config (hidden_size: saved 64 vs now 32)" in proc.stderr
    proc = ditkit("train", *TINY, "--steps", "2", "--out", str(run), check=False)
    assert proc.returncode == 2 and "pass --resume" in proc.stderr
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


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
