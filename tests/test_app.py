"""`ditkit serve` without a browser: the run index and its file gate, the checks of every parameter and
upload, the job queue, and the HTTP API of a server on a free local port (a tiny run trained here)."""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="ditkit serve needs the app extra: pip install 'ditkit[app]'")
uvicorn = pytest.importorskip("uvicorn", reason="ditkit serve needs the app extra: pip install 'ditkit[app]'")

from ditkit.app import is_local, serve  # noqa: E402
from ditkit.app import params  # noqa: E402
from ditkit.pipeline import Cancelled  # noqa: E402
from ditkit.app.jobs import JobBoard, QueueFull  # noqa: E402
from ditkit.app.runs import MAX_POINTS, RunIndex, describe, read_metrics  # noqa: E402
from ditkit.app.server import create_app  # noqa: E402
from ditkit.cli import main  # noqa: E402
from ditkit.train import build_config, train  # noqa: E402

# 16x16 MNIST, one DiT block with 4x4 patches, a few steps: seconds on one core
TINY = ["image_size=16", "hidden_size=32", "depth=1", "num_heads=2", "patch_size=4", "batch_size=16",
        "warmup_steps=1", "samples_per_class=1", "sample.steps=2", "precision=fp32", "log_every=2"]
FACTS = {"kind": "image", "num_classes": 10, "class_names": [str(k) for k in range(10)], "conditional": True,
         "image_size": [16, 16], "channels": 1, "samplers": ["heun", "euler", "sde"], "defaults": {}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    torch.set_num_threads(1)
    train(build_config(None, {"data": "mnist", "out": str(root / "group" / "tiny"), "steps": 6, "save_every": 3},
                       TINY), progress=False)
    return root


@contextlib.contextmanager
def served(app):
    """The app on a free port of 127.0.0.1, in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON or bytes) of a GET, or a POST of `body` as JSON."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers={**hdrs, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, payload, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, payload, kind = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, json.loads(payload) if "json" in kind else payload


def wait(base: str, job: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, state = call(f"{base}/api/jobs/{job}")
        assert status == 200
        if state["status"] in ("done", "error", "cancelled"):
            return state
        assert time.monotonic() < deadline, f"job {job} still {state['status']}"
        time.sleep(0.05)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------------
# Runs and the file gate
# ------------------------------------------------------------------------------------------------

def test_runs_are_found_below_the_root_and_served_one_at_a_time(runs, tmp_path):
    index = RunIndex(runs=runs)
    assert [r.id for r in index.runs()] == ["group/tiny"]
    run = index.get("group/tiny")
    assert [p.name for p in (run.path / "checkpoints").iterdir() if not p.name.startswith(".")] == \
        ["step_00000003", "step_00000006"]
    assert run.checkpoint(None).name == "step_00000006" and run.checkpoint("step_00000003").name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="no checkpoint 'step_9'"):
        run.checkpoint("step_9")
    single = RunIndex(ckpt=runs / "group" / "tiny")
    assert [r.id for r in single.runs()] == ["tiny"]
    alone = RunIndex(ckpt=runs / "group" / "tiny" / "checkpoints" / "step_00000003")  # a checkpoint directory
    assert alone.get("step_00000003").checkpoint(None).name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        RunIndex(ckpt=tmp_path)
    with pytest.raises(ValueError, match="one run"):
        RunIndex()


def test_the_default_checkpoint_is_the_one_ditkit_sample_uses(runs, tmp_path):
    """The newest that verifies: a damaged newest checkpoint is still listed, but not loaded by default."""
    import shutil

    run_dir = tmp_path / "tiny"
    shutil.copytree(runs / "group" / "tiny", run_dir)
    ema = run_dir / "checkpoints" / "step_00000006" / "ema.safetensors"
    with open(ema, "r+b") as f:
        f.truncate(ema.stat().st_size - 16)
    run = RunIndex(ckpt=run_dir).get("tiny")
    assert [c["name"] for c in describe(run)["checkpoints"]] == ["step_00000003", "step_00000006"]
    assert run.checkpoint(None).name == "step_00000003" and run.checkpoint("step_00000006").name == "step_00000006"


def test_only_files_inside_a_served_run_are_readable(runs, tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (root / "a" / "samples.png").write_bytes(b"png")
    (root / "a" / ".hidden.png").write_bytes(b"png")
    (root / "a" / "model.safetensors").write_bytes(b"weights")
    (root / "secret.png").write_bytes(b"outside the run")
    (root / "a" / "link.png").symlink_to(root / "secret.png")
    (root / "b").symlink_to(runs / "group")  # a link to runs elsewhere is not followed
    index = RunIndex(runs=root)
    assert [r.id for r in index.runs()] == ["a"]
    assert index.file("a", "samples.png") == (root / "a" / "samples.png").resolve()
    assert index.file("a", "metrics.csv").name == "metrics.csv"
    for bad in ("../secret.png", "link.png", str(root / "secret.png"), "model.safetensors", ".hidden.png",
                "missing.png", "", "a\x00.png", "../../../../etc/passwd"):
        with pytest.raises(FileNotFoundError, match="no file"):
            index.file("a", bad)
    with pytest.raises(FileNotFoundError, match="no run"):
        index.file("b", "samples.png")


def test_metrics_are_read_afresh_skipping_bad_rows_and_thinned(tmp_path):
    path = tmp_path / "metrics.csv"
    assert read_metrics(path) == {}
    path.write_text("step,loss\n1,2.0\n2,oops\n3,nan\n4,1.5\n")
    assert read_metrics(path) == {"step": [1.0, 4.0], "loss": [2.0, 1.5]}
    path.write_text("step,loss\n" + "".join(f"{i},{1 / i}\n" for i in range(1, 5001)))  # the run went on
    columns = read_metrics(path)
    assert len(columns["step"]) == MAX_POINTS and columns["step"][0] == 1 and columns["step"][-1] == 5000
    assert columns["step"] == sorted(columns["step"])


# ------------------------------------------------------------------------------------------------
# Parameters and uploads
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"steps": 0}, "steps must be a whole number from 1 to 1000, got 0"),
    ({"steps": "2.5"}, "steps must be a whole number"),
    ({"steps": "many"}, "steps must be a whole number"),
    ({"cfg": -1}, "CFG scale must be a number from 0 to 100, got -1"),
    ({"cfg": "nan"}, "CFG scale must be a number"),
    ({"classes": "10"}, "class '10' is out of range: this model has classes 0..9"),
    ({"classes": [-1]}, "class -1 is out of range"),
    ({"sampler": "ddpm"}, "sampler must be one of heun, euler, sde"),
    ({"cfg_interval": [0.8, 0.2]}, "guidance interval must have lo <= hi"),
    ({"cfg_interval": [0, 2]}, "guidance interval must be a number from 0 to 1"),
    ({"n": 0}, "number of samples must be a whole number from 1 to 64"),
    ({"n": 10, "classes": "all"}, "at most 64 images per request: 10 samples x 10 classes is 100"),
    ({"seed": -3}, "seed must be a whole number"),
])
def test_bad_generate_parameters_are_one_clear_line(body, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        params.generate_args(body, FACTS)
    assert "\n" not in str(err.value)


def test_generate_parameters_become_pipeline_arguments():
    args = params.generate_args({"classes": "3", "n": "4", "sampler": "euler", "steps": "7", "cfg": "2.5",
                                 "cfg_interval": ["0.1", "0.9"], "seed": "11"}, FACTS)
    assert args == {"classes": [3], "n_per_class": 4, "sampler": "euler", "steps": 7, "cfg": 2.5,
                    "cfg_interval": (0.1, 0.9), "seed": 11}
    blank = params.generate_args({"classes": "all", "steps": "", "cfg": None, "sampler": ""}, FACTS)
    assert blank == {"classes": list(range(10)), "n_per_class": 1, "seed": 0}  # None: the run's own settings
    text = params.generate_args({"prompts": "a red square\n\n a blue circle "}, {**FACTS, "kind": "text"})
    assert text["prompts"] == ["a red square", "a blue circle"]
    with pytest.raises(ValueError, match="enter a prompt"):
        params.generate_args({"prompts": "  "}, {**FACTS, "kind": "text"})
    with pytest.raises(ValueError, match="control run"):
        params.generate_args({}, {**FACTS, "kind": "control"})
    uncond = params.generate_args({"cfg": 3, "classes": "4"}, {**FACTS, "conditional": False})
    assert uncond["classes"] is None and "cfg" not in uncond


def test_uploads_are_validated_resized_and_limited():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    body = {"image": data_url(rgb), "strength": "0.3", "classes": "2"}
    args = params.edit_args(body, FACTS)
    assert args["image"].shape == (1, 1, 16, 16) and args["image"].min() >= -1 and args["image"].max() <= 1
    assert args["strength"] == 0.3 and args["class_label"] == 2 and "mask" not in args
    colour = params.edit_args({"image": data_url(rgb, "JPEG")}, {**FACTS, "channels": 3, "image_size": [8, 12]})
    assert colour["image"].shape == (1, 3, 8, 12)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # left half: regenerate
    args = params.edit_args({"image": data_url(rgb), "mask": data_url(mask)}, FACTS)
    assert args["mask"].shape == (1, 1, 16, 16)
    assert args["mask"][..., :8].eq(1).all() and args["mask"][..., 8:].eq(0).all()
    png = data_url(rgb).split(",", 1)[1]
    truncated = "data:image/png;base64," + png[: len(png) // 2 // 4 * 4]
    cases = [
        ({"image": truncated}, "the image could not be read as an image"),
        ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, "the image could not be read as an image"),
        ({"image": "data:image/png;base64,@@@"}, "not valid base64"),
        ({"image": "A" * (params.MAX_UPLOAD_BYTES * 2)}, "the image is too large: at most 8 MB"),
        ({"image": data_url(Image.new("L", (5000, 10)))}, "at most 4096 pixels a side"),
        ({"image": data_url(rgb), "mask": data_url(Image.new("L", (16, 16), 0))}, "the mask is empty"),
        ({"image": data_url(rgb), "strength": 1.5}, "strength must be a number from 0 to 1"),
        ({}, "upload an image"),
    ]
    for body, message in cases:
        with pytest.raises(ValueError, match=message):
            params.edit_args(body, FACTS)
    with pytest.raises(ValueError, match="latent run"):
        params.edit_args({"image": data_url(rgb)}, {**FACTS, "channels": 4})


# ------------------------------------------------------------------------------------------------
# The queue: one job at a time per model, in order, bounded; cancel
# ------------------------------------------------------------------------------------------------

def test_jobs_run_one_at_a_time_per_model_in_order_from_a_bounded_queue():
    board = JobBoard(queue_size=2)
    gate = threading.Event()
    active, peak, order, lock = [0], [0], [], threading.Lock()

    def work(name):
        def run(job):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            gate.wait(30)
            with lock:
                active[0] -= 1
                order.append(name)
            return name
        return run

    first = board.submit("model", work("first"))
    while first.status != "running":
        time.sleep(0.01)
    second, third = board.submit("model", work("second")), board.submit("model", work("third"))
    assert (second.position, third.position) == (1, 2)
    with pytest.raises(QueueFull, match="the queue for this model is full \\(2 waiting\\)"):
        board.submit("model", work("fourth"))
    board.cancel(second.id)  # still queued: never runs
    assert second.status == "cancelled" and third.position == 1
    gate.set()
    deadline = time.monotonic() + 30
    while third.status != "done":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert order == ["first", "third"] and peak[0] == 1 and third.result == "third"


def test_a_running_job_stops_at_its_next_step_when_cancelled():
    board = JobBoard()
    started = threading.Event()

    def work(job):
        for step in range(1, 1000):
            job.progress(step, 1000, torch.zeros(1, 1, 4, 4), lambda x: b"png")
            started.set()
            time.sleep(0.01)
        return "finished"

    job = board.submit("model", work)
    assert started.wait(30)
    board.cancel(job.id)
    deadline = time.monotonic() + 30
    while job.status == "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.status == "cancelled" and job.result is None and job.step < 999
    with pytest.raises(Cancelled):
        job.progress(1, 2, None, lambda x: b"")


def test_failures_in_a_job_are_one_line_and_the_worker_goes_on():
    board = JobBoard()

    def bad(job):
        raise ValueError("steps must be\n>= 1")

    def bug(job):
        raise KeyError("oops")

    jobs = [board.submit("m", bad), board.submit("m", bug), board.submit("m", lambda job: 42)]
    deadline = time.monotonic() + 30
    while jobs[-1].status != "done":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert jobs[0].error == "steps must be >= 1"
    assert jobs[1].error == "internal error (KeyError): 'oops'" and jobs[2].result == 42


# ------------------------------------------------------------------------------------------------
# Binding
# ------------------------------------------------------------------------------------------------

def test_only_a_local_host_is_bound_without_an_explicit_flag(runs, monkeypatch, capsys):
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1") and is_local("127.0.0.2")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5") and not is_local("example.com")
    run = runs / "group" / "tiny"
    with pytest.raises(ValueError, match="--host 0.0.0.0 would serve beyond this machine.*--allow-remote"):
        serve(ckpt=run, host="0.0.0.0")
    assert main(["serve", "--ckpt", str(run), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ditkit serve: error: --host 0.0.0.0" in err
    calls = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: calls.append((self.config.host, self.config.port)))
    free = free_port()
    serve(ckpt=run, host="0.0.0.0", port=free, allow_remote=True)
    out, err = capsys.readouterr()
    assert calls == [("0.0.0.0", free)]
    assert "WARNING: serving on 0.0.0.0" in err and f"open http://0.0.0.0:{free}/" in out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve(ckpt=run, port=free_port())
        assert calls[-1][0] == "127.0.0.1" and "WARNING" not in capsys.readouterr().err
        assert main(["serve", "--ckpt", str(run), "--port", str(port)]) == 2
        assert f"ditkit serve: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one run or a folder of runs, not both
        main(["serve", "--ckpt", str(run), "--runs", str(runs)])


# ------------------------------------------------------------------------------------------------
# The HTTP API
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(runs):
    with served(create_app(runs=runs, queue_size=4, device="cpu")) as base:
        yield base


def test_page_runs_model_and_files_over_http(server):
    status, page = call(f"{server}/")
    assert status == 200 and b'<button id="generate"' in page and b">Generate</button>" in page
    assert call(f"{server}/static/app.js")[0] == 200
    assert call(f"{server}/static/../__init__.py")[0] == 404
    status, data = call(f"{server}/api/runs")
    (run,) = data["runs"]
    assert run["id"] == "group/tiny" and [c["step"] for c in run["checkpoints"]] == [3, 6]
    assert run["pictures"] == ["loss_curve.png", "samples.png"] and run["train_config"]["hidden_size"] == 32
    status, model = call(f"{server}/api/model?run=group/tiny")
    assert status == 200 and model["checkpoint"] == "step_00000006"
    assert (model["kind"], model["num_classes"], model["image_size"], model["channels"]) == ("image", 10, [16, 16], 1)
    assert model["samplers"][0] == model["defaults"]["sampler"] == "heun"
    status, metrics = call(f"{server}/api/metrics?run=group/tiny")
    assert metrics["columns"]["step"] == [2.0, 4.0, 6.0] and len(metrics["columns"]["loss"]) == 3
    status, png = call(f"{server}/api/file?run=group/tiny&path=samples.png")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, data = call(f"{server}/api/file?run=group/tiny&path=../../../etc/passwd")
    assert status == 404 and data == {"error": "no file '../../../etc/passwd' in run group/tiny"}
    assert call(f"{server}/api/file?run=group/tiny&path=checkpoints/step_00000006/model.safetensors")[0] == 404
    assert call(f"{server}/api/model?run=nope")[1] == {"error": "no run 'nope' is served here"}
    assert call(f"{server}/nowhere")[1] == {"error": "no such page"}
    status, data = call(f"{server}/api/runs", headers={"Host": "attacker.example"})  # DNS rebinding
    assert status == 400


def test_generate_over_http_gives_previews_then_images_at_the_models_size(server):
    body = {"run": "group/tiny", "classes": "3", "n": 2, "steps": 4, "cfg": 2, "seed": 5}
    status, job = call(f"{server}/api/generate", body)
    assert status == 202 and job["status"] in ("queued", "running")
    state = wait(server, job["job"])
    assert state["status"] == "done" and state["labels"] == [3, 3] and state["total"] == 4 and state["ncol"] == 1
    assert state["settings"]["steps"] == 4 and state["settings"]["cfg"] == 2
    assert state["previews"] >= 1 and call(f"{server}/api/jobs/{job['job']}/preview")[1][:4] == b"\x89PNG"
    images = []
    for url in state["images"]:
        status, png = call(server + url)
        image = np.asarray(Image.open(io.BytesIO(png)))
        assert status == 200 and image.shape == (16, 16)
        images.append(image)
    assert images[0].std() > 0 and not np.array_equal(images[0], images[1])
    status, grid = call(server + state["grid"])
    assert Image.open(io.BytesIO(grid)).size == (16 + 4, 2 * 18 + 2)  # 1 column (one class), 2 rows, 2px padding
    # the same request again: the same pictures (seeded)
    again = wait(server, call(f"{server}/api/generate", body)[1]["job"])
    assert call(server + again["images"][0])[1] == call(server + state["images"][0])[1]
    # the raw weights of the older checkpoint also sample
    older = {**body, "checkpoint": "step_00000003", "ema": False}
    older = wait(server, call(f"{server}/api/generate", older)[1]["job"])
    assert older["status"] == "done"


@pytest.mark.parametrize("body, message", [
    ({"steps": 0}, "steps must be a whole number from 1 to 1000, got 0"),
    ({"cfg": -1}, "CFG scale must be a number from 0 to 100, got -1"),
    ({"classes": "12"}, "class '12' is out of range: this model has classes 0..9"),
    ({"checkpoint": "step_1"}, "run group/tiny has no checkpoint 'step_1'"),
    ({"ema": "maybe"}, "ema must be true or false, got 'maybe'"),
])
def test_bad_requests_get_a_message_and_the_server_keeps_serving(server, body, message):
    status, data = call(f"{server}/api/generate", {"run": "group/tiny", "steps": 2, **body})
    assert status in (400, 404) and data == {"error": message}
    status, job = call(f"{server}/api/generate", {"run": "group/tiny", "steps": 1, "n": 1, "classes": "0"})
    assert status == 202 and wait(server, job["job"])["status"] == "done"


def test_malformed_and_oversized_requests_are_refused(server):
    url = f"{server}/api/generate"
    assert call(url, raw=b"{not json")[1] == {"error": "the request is not valid JSON"}
    assert call(url, raw=b"[1, 2]")[1] == {"error": "the request must be a JSON object"}
    status, data = call(url, raw=b'{"run": "group/tiny"}', headers={"Content-Type": "text/plain"})
    assert status == 400 and data == {"error": "send the request as application/json"}
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/generate")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(40 * 2**20))  # refused before the body is read
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 400 and "the request is too large" in json.loads(response.read())["error"]
    conn.close()
    assert call(f"{server}/api/jobs/j999")[1]["error"].startswith("no job 'j999'")


def test_edit_over_http_keeps_the_unmasked_pixels(server):
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))  # right half regenerated
    body = {"run": "group/tiny", "image": data_url(picture), "mask": data_url(mask), "classes": "7", "n": 2,
            "steps": 3}
    state = wait(server, call(f"{server}/api/edit", body)[1]["job"])
    assert state["status"] == "done" and state["labels"] == [7, 7] and state["settings"]["strength"] == 1.0
    original = np.asarray(picture)
    for url in state["images"]:
        edited = np.asarray(Image.open(io.BytesIO(call(server + url)[1])))
        # inpainting ends on the image itself where the mask keeps it: exactly, after the uint8 round trip
        assert np.array_equal(edited[:, :8], original[:, :8])
        assert not np.array_equal(edited[:, 8:], original[:, 8:])
    status, data = call(f"{server}/api/edit", {**body, "image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="})
    assert status == 400 and data["error"].startswith("the image could not be read as an image")
    img2img = wait(server, call(f"{server}/api/edit", {**body, "mask": None, "strength": 0.5})[1]["job"])
    assert img2img["status"] == "done" and img2img["settings"]["strength"] == 0.5


def test_queued_jobs_report_their_place_and_cancel(server):
    long = {"run": "group/tiny", "steps": 1000, "n": 1, "classes": "1"}
    first = call(f"{server}/api/generate", long)[1]
    second = call(f"{server}/api/generate", long)[1]
    assert second["position"] >= 1
    assert call(f"{server}/api/jobs/{second['job']}/cancel", {})[1]["status"] == "cancelled"
    call(f"{server}/api/jobs/{first['job']}/cancel", {})
    assert wait(server, first["job"])["status"] == "cancelled"
    status, data = call(f"{server}/api/jobs/{first['job']}/grid")
    assert status == 404 and "it is cancelled" in data["error"]


def test_closing_the_app_ends_its_streams_and_stops_its_jobs(runs):
    app = create_app(runs=runs, device="cpu")
    with served(app) as base:
        job = call(f"{base}/api/generate", {"run": "group/tiny", "steps": 1000, "n": 4, "classes": "all"})[1]
        with urllib.request.urlopen(f"{base}/api/jobs/{job['job']}/events", timeout=60) as stream:
            while b"running" not in stream.readline():  # sampling has begun
                pass
            app.state.app.close()  # what Ctrl+C does before the server stops
            stream.read()  # the stream ends, though the job was running
        assert app.state.app.board.wait_idle(timeout=30)
        state = call(f"{base}/api/jobs/{job['job']}")[1]
        assert state["status"] == "cancelled" and state["step"] < 1000


def test_events_stream_the_job_until_it_ends(server):
    job = call(f"{server}/api/generate", {"run": "group/tiny", "steps": 3, "n": 1, "classes": "2"})[1]
    with urllib.request.urlopen(f"{server}/api/jobs/{job['job']}/events", timeout=60) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["status"] == "done" and events[-1]["images"]
    assert all(e["status"] in ("queued", "running", "done") for e in events)


def test_samples_become_one_picture_each_and_a_grid():
    from types import SimpleNamespace

    from ditkit.app.pictures import Result

    images = torch.linspace(-1, 1, 6 * 16).reshape(6, 1, 4, 4)
    result = Result.of(SimpleNamespace(images=images, labels=torch.arange(6), ncol=3, settings={"steps": 2}))
    assert result.media == "image/png" and result.labels == list(range(6)) and len(result.images) == 6
    first = np.asarray(Image.open(io.BytesIO(result.images[0])))
    assert first.shape == (4, 4) and np.array_equal(first, ((images[0, 0] + 1) * 127.5).round().byte().numpy())
    assert Image.open(io.BytesIO(result.grid)).size == (3 * 6 + 2, 2 * 6 + 2)  # 3 columns, 2 rows, 2px padding
    clips = torch.rand(2, 1, 5, 4, 4) * 2 - 1  # (N, C, F, H, W): animated GIFs
    result = Result.of(SimpleNamespace(images=clips, labels=torch.tensor([1, 2]), ncol=2, settings={}))
    assert result.media == "image/gif" and len(result.images) == 2
    assert Image.open(io.BytesIO(result.images[1])).n_frames == 5 and Image.open(io.BytesIO(result.grid)).n_frames == 5


# ------------------------------------------------------------------------------------------------
# Text-to-image and video runs
# ------------------------------------------------------------------------------------------------

SMALL = ["image_size=16", "hidden_size=32", "depth=1", "num_heads=2", "patch_size=4", "warmup_steps=1",
         "samples_per_class=1", "sample.steps=2", "precision=fp32"]


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinds")
    torch.set_num_threads(1)
    train(build_config(None, {"data": "shapes", "out": str(root / "text"), "steps": 2},
                       ["text_model=mmdit", "text_encoder=bytes", "text_max_length=40", 'data_args={"n": 64}',
                        "batch_size=8", *SMALL]), progress=False)
    train(build_config(None, {"data": "moving_mnist", "out": str(root / "video"), "steps": 2},
                       ["frames=4", 'data_args={"n_clips": 200}', "batch_size=4", *SMALL]), progress=False)
    video_run(root / "context", context=True)
    return root


def video_run(out: Path, context: bool) -> Path:
    """A 2-step 16x16, 4-frame moving-MNIST run; `context`: trained with frame conditioning (context_share)."""
    train(build_config(None, {"data": "moving_mnist", "out": str(out), "steps": 2},
                       ["frames=4", 'data_args={"n_clips": 64, "motion": "class"}', "batch_size=4", *SMALL,
                        *(["context_share=0.5"] if context else [])]), progress=False)
    return out


def gif_frames(data: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("L")))
    return frames


def test_text_runs_take_prompts_and_video_runs_give_clips(other_runs):
    with served(create_app(runs=other_runs, device="cpu")) as base:
        text = call(f"{base}/api/model?run=text")[1]
        assert text["kind"] == "text" and text["channels"] == 3 and len(text["class_names"]) == text["num_classes"]
        status, data = call(f"{base}/api/generate", {"run": "text", "prompts": "", "steps": 1})
        assert status == 400 and data == {"error": "enter a prompt: this is a text-to-image run"}
        body = {"run": "text", "prompts": "a red circle in the centre\na blue square at the top left", "n": 2,
                "steps": 1}
        state = wait(base, call(f"{base}/api/generate", body)[1]["job"])
        assert state["status"] == "done" and state["labels"] == [0, 1, 0, 1] and state["ncol"] == 2
        assert np.asarray(Image.open(io.BytesIO(call(base + state["images"][0])[1]))).shape == (16, 16, 3)
        video = call(f"{base}/api/model?run=video")[1]
        assert video["kind"] == "video" and video["frames"] == 4
        state = wait(base, call(f"{base}/api/generate", {"run": "video", "classes": "5", "n": 1, "steps": 1,
                                                         "frames": 6})[1]["job"])
        assert state["status"] == "done" and state["media"] == "image/gif" and state["labels"] == [5]
        clip = Image.open(io.BytesIO(call(base + state["images"][0])[1]))
        assert clip.format == "GIF" and clip.n_frames == 6  # the frames asked for, not the 4 trained on
        status, data = call(f"{base}/api/edit", {"run": "video", "image": "x"})
        assert status == 400 and data == {"error": "editing works on image runs; this is a video run"}


def test_a_video_run_takes_an_uploaded_first_frame_that_starts_every_clip(other_runs):
    rng = np.random.default_rng(3)
    digit = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))
    with served(create_app(runs=other_runs, device="cpu")) as base:
        assert call(f"{base}/api/model?run=context")[1]["first_frame"] == "trained"
        assert call(f"{base}/api/model?run=video")[1]["first_frame"] == "inpaint"
        assert call(f"{base}/api/model?run=text")[1]["first_frame"] is None
        body = {"run": "context", "classes": "3 5", "n": 2, "steps": 2, "first_frame": data_url(digit)}
        state = wait(base, call(f"{base}/api/generate", body)[1]["job"])
        assert state["status"] == "done" and state["labels"] == [3, 5, 3, 5] and state["notes"] == []
        assert state["settings"]["frame_conditioning"] == "trained"
        for url in state["images"]:  # each clip's first frame is the upload, pixel for pixel; the rest are drawn
            frames = gif_frames(call(base + url)[1])
            assert len(frames) == 4 and np.array_equal(frames[0], np.asarray(digit))
            assert not np.array_equal(frames[1], frames[0])
        # a run without frame conditioning keeps it too, by the training-free form, and says so
        state = wait(base, call(f"{base}/api/generate", {**body, "run": "video", "classes": "1", "n": 1})[1]["job"])
        assert state["settings"]["frame_conditioning"] == "inpaint"
        assert any("training-free" in n for n in state["notes"])
        assert np.array_equal(gif_frames(call(base + state["images"][0])[1])[0], np.asarray(digit))
        # colour of another size: converted and resized, as `ditkit sample --first-frame` does, with its notes
        colour = Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
        state = wait(base, call(f"{base}/api/generate", {**body, "first_frame": data_url(colour, "JPEG")})[1]["job"])
        assert state["status"] == "done"
        assert any("converted the image to grey" in n for n in state["notes"])
        assert any("resized the 24x40 image to the model's 16x16" in n for n in state["notes"])
        for bad, message in [
            ("data:image/png;base64,bm90IGFuIGltYWdl", "the first frame could not be read as an image"),
            (data_url(Image.new("L", (5000, 8))), "the first frame is 5000x8: at most 4096 pixels"),
            (12, "the first frame must be sent as a data URL"),
        ]:
            status, data = call(f"{base}/api/generate", {**body, "first_frame": bad})
            assert status == 400 and data["error"].startswith(message)
        status, data = call(f"{base}/api/generate", {"run": "text", "prompts": "a red circle",
                                                     "first_frame": data_url(digit)})
        assert status == 400 and data == {"error": "a first frame starts a clip: it applies to video runs, and this "
                                                   "is a text run"}
    frame = params.frame_tensor(Image.new("RGBA", (5, 7), (0, 0, 0, 0)))  # transparent: white, at its own size
    assert frame.shape == (1, 3, 7, 5) and frame.eq(1).all()


# ------------------------------------------------------------------------------------------------
# Adapter runs: further adapters on the same base, with weights
# ------------------------------------------------------------------------------------------------

def adapter_runs(root: Path) -> Path:
    """Under `root`: base (8x8 digits 0-2), its adapters digits (adds class 3), style and style2 (the base's
    own classes), and foreign, an adapter on another base (base2); tests/test_lora.py's tiny settings."""
    pytest.importorskip("peft")
    from test_lora import tiny_config

    torch.set_num_threads(1)
    for base in ("base", "base2"):
        train(tiny_config(root / base, steps=2, seed=len(base), data_args={"classes": [0, 1, 2]}), progress=False)
    adapters = {"digits": ("base", [2, 3], 10), "style": ("base", [0, 1], 4), "style2": ("base", [1, 2], 4),
                "foreign": ("base2", [0, 1], 4)}
    for name, (base, classes, per_class) in adapters.items():
        train(tiny_config(root / name, steps=2, lr=0.05, init=str(root / base), lora_rank=2,
                          data_args={"classes": classes, "per_class": per_class}), progress=False)
    return root


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> Path:
    return adapter_runs(tmp_path_factory.mktemp("adapters"))


def test_adapter_parameters_are_checked():
    adapted = {**FACTS, "adapter": True}
    assert params.adapter_weights({"a": "0.5", "b": 1}, adapted) == {"a": 0.5, "b": 1.0}
    assert params.adapter_weights(None, FACTS) == {} and params.adapter_weights({}, FACTS) == {}
    for value, facts, message in [
        ({"a": 1}, FACTS, "further adapters combine with an adapter run"),
        ([["a", 1]], adapted, "adapters must be an object {run: weight}, got list"),
        ({"a": "heavy"}, adapted, "the weight of adapter a must be a number from -1 to 4, got 'heavy'"),
        ({"a": 5}, adapted, "the weight of adapter a must be a number from -1 to 4"),
        ({str(i): 1 for i in range(9)}, adapted, "at most 8 further adapters at once, got 9"),
    ]:
        with pytest.raises(ValueError, match=message.replace("{", "\\{").replace("}", "\\}")):
            params.adapter_weights(value, facts)


def test_the_page_lists_adapters_on_the_same_base_and_composes_them_with_weights(lora_runs):
    from ditkit.checkpoint import resolve_checkpoint
    from ditkit.images import to_uint8
    from ditkit.pipeline import Pipeline

    app = create_app(runs=lora_runs, device="cpu")
    with served(app) as base:
        model = call(f"{base}/api/model?run=digits")[1]
        assert model["adapter"] and model["class_names"] == ["0", "1", "2", "3"]
        # the adapter runs on digits' base: not base itself, not foreign (another base)
        assert model["adapter_choices"] == [{"run": "style", "why": None}, {"run": "style2", "why": None}]
        choices = call(f"{base}/api/model?run=style")[1]["adapter_choices"]
        assert [c["run"] for c in choices] == ["digits", "style2"] and "adds classes of its own" in choices[0]["why"]
        assert call(f"{base}/api/model?run=base")[1]["adapter_choices"] == []

        def pictures(body):
            state = wait(base, call(f"{base}/api/generate", {"run": "digits", "classes": "0 3", "n": 1,
                                                             "steps": 2, **body})[1]["job"])
            assert state["status"] == "done", state
            return [np.asarray(Image.open(io.BytesIO(call(base + url)[1]))) for url in state["images"]]

        def expected(adapters):
            pipe = Pipeline.load(lora_runs / "digits", device="cpu",
                                 adapters={str(lora_runs / k): w for k, w in adapters.items()} or None)
            clips = pipe.generate(classes=[0, 3], steps=2, progress=False).images
            return [image[..., 0] for image in to_uint8(clips)]

        digit = data_url(Image.fromarray(np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8)))

        def edited():
            state = wait(base, call(f"{base}/api/edit", {"run": "digits", "image": digit, "classes": "3",
                                                         "steps": 2, "strength": 0.6})[1]["job"])
            return call(base + state["images"][0])[1]

        before = edited()  # an edit uses the run's adapter as trained, whatever scale a generate set before it
        assert wait(base, call(f"{base}/api/generate", {"run": "digits", "steps": 1, "lora_scale": 0})[1]["job"])[
            "status"] == "done"
        assert edited() == before
        alone = pictures({})
        assert all(np.array_equal(a, b) for a, b in zip(alone, expected({})))
        state = wait(base, call(f"{base}/api/generate", {"run": "digits", "steps": 1,
                                                         "adapters": {"style2": 1.0, "style": "0.5"}})[1]["job"])
        assert state["settings"]["adapters"] == "style 0.5, style2 1"
        both = pictures({"adapters": {"style2": 1.0, "style": "0.5"}})
        assert all(np.array_equal(a, b) for a, b in zip(both, expected({"style": 0.5, "style2": 1.0})))
        assert not all(np.array_equal(a, b) for a, b in zip(both, alone))
        # another weight: the same composed pipeline, weighed again (no reload); weight 0 is digits alone
        zero = pictures({"adapters": {"style": 0, "style2": 0}})
        assert all(np.array_equal(a, b) for a, b in zip(zero, alone))
        assert all(np.array_equal(a, b) for a, b in zip(pictures({"adapters": {"style": 0.5, "style2": 1}}), both))
        composed = tuple(str(resolve_checkpoint((lora_runs / k).resolve())) for k in ("style", "style2"))
        assert [key[2] for key in app.state.app.pipes._pipes if key[2]] == [composed]  # one load for both weights
        for run, adapters, status, message in [
            ("digits", {"foreign": 1}, 400, "adapter foreign was trained on another base ("),
            ("digits", {"nope": 1}, 404, "no run 'nope' is served here"),
            ("digits", {"digits": 1}, 400, "adapter digits is the run loaded: its own adapter's weight is the LoRA "
                                           "scale"),
            ("digits", {"base": 1}, 400, "adapter base is not an adapter run"),
            ("digits", {"style": 9}, 400, "the weight of adapter style must be a number from -1 to 4, got 9"),
            ("style", {"digits": 1}, 400, "a further adapter may not add classes"),
            ("base", {"style": 1}, 400, "further adapters combine with an adapter run"),
        ]:
            got, data = call(f"{base}/api/generate", {"run": run, "steps": 1, "adapters": adapters})
            assert got == status and message in data["error"], (adapters, data)
        assert "adapters combine only on the same base" in call(f"{base}/api/generate", {
            "run": "digits", "adapters": {"foreign": 1}})[1]["error"]
