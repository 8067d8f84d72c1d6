"""Original DiT checkpoint files -> ditkit: both formats, config inference, refusal of code-running pickles."""
import argparse
import json

import pytest
import torch

from ditkit.cli import main
from ditkit.interop.official import convert_official, infer_config, load_official
from ditkit.models import DiT, create_model

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10,
             learn_sigma=True)


def random_dit(seed: int = 0, **overrides) -> DiT:
    """A small DiT whose zero-initialised layers are randomised too, so every weight matters."""
    torch.manual_seed(seed)
    model = DiT(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model


def inputs(model: DiT, n: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, model.in_channels, *model.input_size, generator=g)
    return x, torch.tensor([3.0, 500.0, 999.0])[:n], torch.tensor([0, 7, 9])[:n]


def assert_same_outputs(a: DiT, b: DiT) -> None:
    x, t, y = inputs(a)
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


def test_released_state_dict_loads_with_inferred_config(tmp_path):
    model = random_dit()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_official(path, num_heads=4)
    assert {k: loaded.config[k] for k in SMALL} == SMALL
    assert loaded.config["class_dropout_prob"] > 0  # the null row is there
    assert_same_outputs(model, loaded)


def test_training_checkpoint_with_namespace_args_takes_ema_by_default(tmp_path):
    model, ema = random_dit(0), random_dit(1)
    opt = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model="DiT-custom", image_size=16, num_classes=10, global_seed=0, vae="ema")
    path = tmp_path / "0001000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    assert_same_outputs(ema, load_official(path, num_heads=4))
    assert_same_outputs(model, load_official(path, num_heads=4, ema=False))


def test_heads_come_from_the_zoo_or_must_be_given():
    with torch.device("meta"):  # shapes only: a DiT-XL/2 without allocating its weights
        xl = create_model("DiT-XL/2").state_dict()
        odd = DiT(**SMALL).state_dict()
    config = infer_config(xl)
    assert (config["depth"], config["hidden_size"], config["num_heads"], config["patch_size"]) == (28, 1152, 16, 2)
    assert (config["input_size"], config["in_channels"], config["num_classes"]) == (32, 4, 1000)
    assert config["learn_sigma"] and config["class_dropout_prob"] > 0
    assert config["mlp_ratio"] == 4.0
    with pytest.raises(ValueError, match="--num-heads"):
        infer_config(odd)
    assert infer_config(odd, num_heads=4)["num_heads"] == 4


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_official(path)
    assert not marker.exists()
    assert main(["convert", "--from-official", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists()


def test_not_a_checkpoint_and_missing_file_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_official(junk)
    with pytest.raises(FileNotFoundError, match="DiT-XL-2-256x256.pt"):
        load_official(tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError, match="x_embedder.proj.weight"):
        load_official(wrong)


def test_convert_cli_writes_a_directory_that_from_pretrained_and_sample_paper_read(tmp_path, monkeypatch):
    model = random_dit(learn_sigma=True, num_classes=10)
    src = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "converted"
    assert main(["convert", "--from-official", str(src), "--num-heads", "4", "--out", str(out)]) == 0
    assert_same_outputs(model, DiT.from_pretrained(out).eval())
    assert json.loads((out / "run.json").read_text())["objective"] == "ddpm"
    # a second convert into the same directory refuses rather than overwrite
    with pytest.raises(ValueError, match="not empty"):
        convert_official(src, out, num_heads=4)
    # --paper: 250 DDPM steps with CFG 4 on 3 channels; 4-channel latents are written to .npz
    import ditkit.pipeline
    from ditkit.sampling import CFG

    calls, real_sample = [], ditkit.pipeline.sample
    monkeypatch.setattr(ditkit.pipeline, "sample", lambda *a, **kw: calls.append(kw) or real_sample(*a, **kw))
    npz = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(out), "--paper", "--class", "1", "--n-per-class", "1",
                 "--out", str(npz)]) == 0
    import numpy as np

    (kw,) = calls
    assert (kw["sampler"], kw["steps"], kw["guidance"], kw["guided_channels"]) == ("ddpm", 250, CFG(4.0), 3)
    arrays = np.load(npz)
    assert arrays["images"].shape == (1, 4, 8, 8) and np.isfinite(arrays["images"]).all()
