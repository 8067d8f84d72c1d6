"""Text-to-image end to end: captioned shapes -> MM-DiT on byte-encoder captions -> prompted samples that
follow their prompts (judged by pixel statistics), through the Python API and the CLI."""
from __future__ import annotations

import pytest
import torch

from ditkit.cli import main
from ditkit.data import load_dataset
from ditkit.data.shapes import COLOURS, POSITIONS, SHAPES
from ditkit.evaluate.shapes import describe, parse_caption, prompt_adherence
from ditkit.pipeline import Pipeline
from ditkit.sampling import CFG, sample
from ditkit.train import build_config, train

TINY = ["text_encoder=bytes", "text_max_length=40", "image_size=16", 'data_args={"n": 1200}', "hidden_size=64",
        "depth=2", "num_heads=4", "patch_size=4", "batch_size=32", "lr=2e-3", "warmup_steps=20", "precision=fp32",
        "save_every=100000", "samples_per_class=1", "sample.steps=4"]


def test_shapes_are_captioned_and_the_judge_reads_them():
    data = load_dataset("shapes", n=240, seed=3)
    assert data.images.shape == (240, 3, 32, 32) and not data.hflip  # a flip would swap left and right
    assert len(set(data.captions)) == len(COLOURS) * len(SHAPES) * len(POSITIONS)
    scores = prompt_adherence(data.images, data.captions)  # the judge on real images: its own ceiling
    assert scores["colour"] == scores["position"] == 1.0 and scores["shape"] >= 0.97
    assert describe(torch.full((3, 32, 32), -1.0)) is None
    assert parse_caption("a blue circle in the centre") == ("blue", "circle", "centre")
    many = load_dataset("shapes", n=20, max_objects=3, seed=1)
    assert any(" and " in c for c in many.captions)
    labelled = data.captions_as_labels()
    assert [labelled.class_names[k] for k in labelled.labels[:5]] == data.captions[:5]
    with pytest.raises(ValueError, match="unknown shapes option"):
        load_dataset("shapes", sizes=2)


@pytest.fixture(scope="module")
def trained_mmdit(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "run"
    train(build_config(None, {"out": str(out), "data": "shapes"}, ["text_model=mmdit", "steps=600", *TINY]),
          progress=False)
    return out


def test_prompted_samples_follow_the_prompt(trained_mmdit):
    """After 600 steps, samples of 40 different prompts have the prompted colour and position far more
    often than the same model's unconditional (null-prompt) samples: >= 0.8 each, and >= 0.4 above."""
    pipe = Pipeline.load(trained_mmdit)
    captions = pipe.info["class_names"]
    prompts = [captions[i] for i in torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))[:40]]
    table = pipe.with_prompts(prompts)
    scores = {}
    for name, y, cfg in (("prompted", torch.arange(40), 4.0), ("unconditional", torch.full((40,), 40), 1.0)):
        x = sample(table, pipe.objective, (40, 3, 16, 16), y=y, guidance=CFG(cfg), steps=10,
                   generator=torch.Generator().manual_seed(1), progress=False)
        scores[name] = prompt_adherence(x.clamp(-1, 1), prompts)
    for key in ("colour", "position"):
        assert scores["prompted"][key] >= 0.8, scores
        assert scores["prompted"][key] >= scores["unconditional"][key] + 0.4, scores


def test_cli_samples_a_prompt(trained_mmdit, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["sample", "--ckpt", str(trained_mmdit), "--prompt", "a blue circle at the bottom right",
                 "a red square at the top left", "--n-per-class", "2", "--steps", "4", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (2 * 18 + 2, 2 * 18 + 2)  # 2 prompts x 2 rows of 16 px, 2 px padding
    assert main(["sample", "--ckpt", str(trained_mmdit), "--class", "1", "--out", str(out)]) == 2
    assert "--prompt" in capsys.readouterr().err
