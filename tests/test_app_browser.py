"""`ditkit serve` end to end in a real browser: the system's headless Chromium (Debian's `chromium` package),
driven by Playwright's Python package pointed at it; nothing is downloaded at run time.

The server runs as `python -m ditkit.cli serve` on a free port of 127.0.0.1, serving a tiny run trained here.
DITKIT_SERVE_RUN=DIR serves that run instead, and DITKIT_SERVE_SCREENSHOT=FILE.png keeps the screenshot
(the README's docs/images/serve.png is made so)."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.train import build_config, train

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]  # containers give /dev/shm little room
TINY = ["image_size=16", "hidden_size=32", "depth=1", "num_heads=2", "patch_size=4", "batch_size=16",
        "warmup_steps=1", "samples_per_class=1", "sample.steps=2", "precision=fp32", "log_every=2"]


def chromium() -> str:
    """The system Chromium; skips (fails under CI=true) when it or Playwright is missing."""
    path = os.environ.get("DITKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    problem = None
    if not os.path.isfile(path):
        problem = f"Chromium not found at {path}: apt-get install -y chromium (Debian/Ubuntu)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright's Python package is missing: pip install 'ditkit[test]'"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    browser = chromium()
    root = tmp_path_factory.mktemp("browser")
    run = os.environ.get("DITKIT_SERVE_RUN")
    if run is None:
        run = str(root / "tiny")
        torch.set_num_threads(1)
        train(build_config(None, {"data": "mnist", "out": run, "steps": 8}, TINY), progress=False)
    with serving(["--ckpt", run], root) as base:
        yield base, browser, root


@contextlib.contextmanager
def serving(what: list[str], root: Path):
    """`python -m ditkit.cli serve` on a free port, its log in root/server.log; yields its base URL."""
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ditkit.cli", "serve", *what, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.2)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.timeout(600)
def test_generate_in_the_browser_then_a_bad_value_shows_a_message(server):
    from playwright.sync_api import expect, sync_playwright

    base, executable, root = server
    shot = Path(os.environ.get("DITKIT_SERVE_SCREENSHOT", root / "serve.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(base + "/")
            page.wait_for_selector('#classes option[value="3"]', state="attached", timeout=60_000)
            page.select_option("#classes", "3")
            page.fill("#n", "4")
            page.get_by_role("button", name="Generate").click()
            page.wait_for_selector("img.result", timeout=300_000)
            expect(page.locator("#status")).to_contain_text("4 sample(s)")
            expect(page.locator("#error")).to_be_hidden()
            # the pictures the page shows: 4, of the model's size, not blank
            sources = page.locator("img.result").evaluate_all("imgs => imgs.map(i => i.src)")
            assert len(sources) == 4
            for src in sources:
                image = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("L"), dtype=np.int16)
                assert image.max() - image.min() > 0, "a generated image is blank"
            expect(page.get_by_role("link", name="download grid")).to_have_attribute("download", "samples-j1.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))

            page.fill("#steps", "0")  # a bad value: the page shows the server's message
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#error")).to_have_text("steps must be a whole number from 1 to 1000, got '0'")
            expect(page.get_by_role("button", name="Generate")).to_be_enabled()

            page.fill("#steps", "1")  # and the server goes on serving: one of every class, as a grid
            page.select_option("#classes", "all")
            page.fill("#n", "1")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#status")).to_contain_text("10 sample(s) — sampler heun, steps 1", timeout=300_000)
            expect(page.locator("#error")).to_be_hidden()
            expect(page.locator("#result-grid")).to_be_visible()
            assert page.locator("#result-grid").evaluate("img => img.complete && img.naturalWidth > 0")

            # editing: upload a picture, paint a stroke of mask over it, inpaint
            picture = root / "ring.png"
            ring = np.zeros((64, 64), np.uint8)
            yy, xx = np.mgrid[:64, :64]
            ring[np.abs(np.hypot(yy - 32, xx - 32) - 20) < 4] = 255
            Image.fromarray(ring).save(picture)
            page.get_by_role("button", name="Edit", exact=True).click()
            page.set_input_files("#image-file", str(picture))
            box = page.locator("#edit-mask").bounding_box()
            page.mouse.move(box["x"] + 40, box["y"] + 40)
            page.mouse.down()
            page.mouse.move(box["x"] + 200, box["y"] + 200, steps=8)
            page.mouse.up()
            page.fill("#n", "2")
            page.get_by_role("button", name="Edit image").click()
            expect(page.locator("#status")).to_contain_text("2 inpainted sample(s)", timeout=300_000)
            expect(page.locator("#status")).to_contain_text("strength 1")  # a mask: inpainting from noise
            expect(page.locator("#error")).to_be_hidden()
            assert errors == [], f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()
    assert Image.open(shot).size == (1280, 820)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """`ditkit serve --runs` over a video run trained with frame conditioning and tests/test_app.py's adapter runs
    (base, digits adding class 3, style and style2 on the same base, foreign on another)."""
    from test_app import adapter_runs, video_run

    browser = chromium()
    root = tmp_path_factory.mktemp("many")
    runs = root / "runs"
    torch.set_num_threads(1)
    video_run(runs / "clips", context=True)
    adapter_runs(runs)
    with serving(["--runs", str(runs)], root) as base:
        yield base, browser, root


def gif_frames(data: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("L")))
    return frames


def finished(page, text: str) -> None:
    """Wait for the request sent to end (Cancel disabled again), then: no error, and `text` in the status."""
    from playwright.sync_api import expect

    page.wait_for_function("() => document.getElementById('cancel').disabled", timeout=300_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    expect(page.locator("#status")).to_contain_text(text)


@pytest.mark.timeout(600)
def test_video_clips_play_from_an_uploaded_first_frame_and_adapters_are_picked(many):
    from playwright.sync_api import expect, sync_playwright

    base, executable, root = many
    shots = Path(os.environ.get("DITKIT_SERVE_SHOTS", root))
    shots.mkdir(parents=True, exist_ok=True)
    ring = np.zeros((16, 16), np.uint8)
    yy, xx = np.mgrid[:16, :16]
    ring[np.abs(np.hypot(yy - 7.5, xx - 7.5) - 5) < 1.5] = 255
    Image.fromarray(ring).save(root / "ring.png")
    Image.fromarray(np.stack([ring, ring // 2, 255 - ring], -1)).resize((40, 24)).save(root / "colour.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(base + "/")
            page.wait_for_selector('#run option[value="clips"]', state="attached", timeout=60_000)
            page.select_option("#run", "clips")
            expect(page.locator("#model-info")).to_contain_text("video run", timeout=60_000)
            expect(page.locator("#first-frame-row")).to_be_visible()
            expect(page.locator("#first-frame-form")).to_contain_text("trained with frame conditioning")
            expect(page.locator("#adapters-row")).to_be_hidden()
            page.set_input_files("#first-frame-file", str(root / "ring.png"))
            expect(page.locator("#first-frame-preview")).to_be_visible()
            page.select_option("#classes", "all")
            page.fill("#n", "1")
            page.fill("#steps", "2")
            page.get_by_role("button", name="Generate").click()
            finished(page, "10 sample(s)")
            expect(page.locator("#status")).to_contain_text("frame conditioning trained")
            expect(page.locator("#error")).to_be_hidden()
            expect(page.locator("#notes")).to_be_hidden()
            # the clips the page shows: animated GIFs that start with the upload, playing (the grid too)
            sources = page.locator("img.result").evaluate_all("imgs => imgs.map(i => i.src)")
            assert len(sources) == 10
            for src in sources:
                frames = gif_frames(page.request.get(src).body())
                assert len(frames) == 4 and np.array_equal(frames[0], ring)
            assert page.locator("#result-grid").evaluate("img => img.complete && img.naturalWidth > 0")
            grid = page.locator("#result-grid").evaluate("img => img.src")
            assert len(gif_frames(page.request.get(grid).body())) == 4
            page.screenshot(path=str(shots / "serve-video.png"))

            # a colour upload of another size: the clip starts with it fitted, and the page says what changed
            page.set_input_files("#first-frame-file", str(root / "colour.png"))
            page.select_option("#classes", "3")
            page.get_by_role("button", name="Generate").click()
            finished(page, "1 sample(s)")
            expect(page.locator("#notes")).to_contain_text("note: converted the image to grey")
            expect(page.locator("#notes")).to_contain_text("resized the 40x24 image to the model's 16x16")
            page.get_by_role("button", name="Remove").click()  # no first frame: the model draws every frame
            page.get_by_role("button", name="Generate").click()
            finished(page, "1 sample(s)")
            expect(page.locator("#status")).not_to_contain_text("frame conditioning")

            # an adapter run: the adapters on its base are listed, ticked with a weight, composed
            page.select_option("#run", "digits")
            expect(page.locator("#model-info")).to_contain_text("image run", timeout=60_000)
            expect(page.locator("#first-frame-row")).to_be_hidden()
            expect(page.locator("#lora-row")).to_be_visible()
            expect(page.locator("#adapters-row")).to_be_visible()
            assert page.locator("#adapter-list .name").all_inner_texts() == ["style", "style2"]
            page.get_by_label("use adapter style", exact=True).check()
            page.get_by_label("weight of adapter style", exact=True).fill("0.5")
            page.get_by_label("use adapter style2", exact=True).check()
            page.select_option("#classes", "all")
            page.fill("#n", "2")
            page.get_by_role("button", name="Generate").click()
            finished(page, "8 sample(s)")
            expect(page.locator("#status")).to_contain_text("adapters style 0.5, style2 1")
            expect(page.locator("#error")).to_be_hidden()
            page.screenshot(path=str(shots / "serve-adapters.png"))
            page.get_by_label("weight of adapter style", exact=True).fill("7")  # a bad weight: one line
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#error")).to_have_text("the weight of adapter style must be a number from -1 to 4, "
                                                        "got '7'")
            # a run whose adapter adds classes is listed on the others' page, but cannot be ticked
            page.select_option("#run", "style")
            expect(page.locator("#adapter-list .name")).to_have_text(["digits", "style2"], timeout=60_000)
            expect(page.get_by_label("use adapter digits", exact=True)).to_be_disabled()
            expect(page.get_by_label("use adapter style2", exact=True)).not_to_be_checked()  # a new run: none ticked
            expect(page.locator("#error")).to_be_hidden()
            expect(page.locator("#adapter-list")).to_contain_text("it adds classes of its own")
            page.screenshot(path=str(shots / "serve-adapters-listed.png"))
            assert errors == [], f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()
