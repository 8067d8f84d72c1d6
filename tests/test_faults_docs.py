"""Every Python block of the guides (docs/*.md) runs as written, page by page and in order, in a folder that
holds what a reader of the page has made by then: `runs/demo` (a tiny run of the demo's data, 2 steps), the
images the editing guide names, the samples the evaluation guide judges. The README's blocks run in
test_docs.py.

Not run: the blocks in NOT_RUN, each with the reason (the released 675M-parameter weights and a VAE are not
part of a test). What the page-level stand-ins replace is named in `stand_ins`."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOT_RUN = {
    ("interop.md", 0): "loads the released DiT-XL/2 checkpoint and the SD VAE, downloads a test cannot make",
    ("fine-tuning.md", 0): "loads an adapter run that the bash block above trains; tests/test_lora.py loads one "
                           "into peft the same way",
    ("video.md", 0): "samples a trained image-to-video run; the video guide's runs are covered by test_video*.py",
}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.DOTALL)


PAGES = sorted(p.name for p in DOCS.glob("*.md") if python_blocks(p))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """runs/demo as the guides expect it, tiny: the demo's data (MNIST-5k, grey, 32x32), 8x8 patches, 2 steps."""
    from ditkit.config import build_config
    from ditkit.train import train

    root = tmp_path_factory.mktemp("docs")
    train(build_config(None, {"data": "mnist", "image_size": 32, "patch_size": 8, "hidden_size": 32, "depth": 1,
                              "num_heads": 2, "steps": 2, "batch_size": 4, "out": str(root / "runs" / "demo"),
                              "precision": "fp32", "samples_per_class": 1, "sample": {"steps": 2}}),
          progress=False)
    return root / "runs" / "demo"


def stand_ins(folder: Path, demo: Path, monkeypatch) -> None:
    """What the pages' readers have by the time they reach a block: the inputs the bash blocks above it
    make or name (seven.png and its mask, samples.npz), a digit classifier (random weights: nothing trains
    here), and a web server that returns instead of serving until Ctrl-C."""
    import uvicorn

    from ditkit.evaluate.classifier import CACHE_NAME, DigitClassifier
    from ditkit.pipeline import Pipeline

    (folder / "runs").mkdir()
    (folder / "runs" / "demo").symlink_to(demo, target_is_directory=True)
    seven = np.zeros((32, 32), np.uint8)
    seven[6:9, 8:24], seven[9:27, 20:23] = 255, 255
    Image.fromarray(seven).save(folder / "seven.png")
    half = np.zeros((32, 32), np.uint8)
    half[16:] = 255
    Image.fromarray(half).save(folder / "bottom_half.png")
    pipe = Pipeline.load(demo)
    pipe.save(pipe.generate(n_per_class=2, steps=2, progress=False), folder / "samples.npz")
    torch.manual_seed(0)
    classifier = DigitClassifier().eval()
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(folder / CACHE_NAME))
    monkeypatch.setenv("DITKIT_CACHE", str(folder))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *args, **kwargs: None)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_the_guides_python_runs_as_written(page, demo_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stand_ins(tmp_path, demo_run, monkeypatch)
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    blocks = python_blocks(DOCS / page)
    ran = 0
    for k, block in enumerate(blocks):
        if (page, k) in NOT_RUN:
            continue
        exec(compile(block, f"docs/{page} block {k}", "exec"), {})  # noqa: S102 (our own docs)
        ran += 1
    assert ran or all((page, k) in NOT_RUN for k in range(len(blocks)))


def test_every_block_not_run_exists_and_says_why():
    for (page, k), reason in NOT_RUN.items():
        assert k < len(python_blocks(DOCS / page)) and len(reason) > 20, (page, k)
