"""ONNX export: dynamic batch, onnxruntime equal to PyTorch within 1e-4; half-precision sampling on a GPU."""
import pytest
import torch

pytest.importorskip("onnxruntime")

from ditkit.cli import main  # noqa: E402
from ditkit.interop.onnx import export_onnx, max_onnx_error, onnx_session  # noqa: E402
from ditkit.models import DiT  # noqa: E402

TOL = 1e-4


def random_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    model = DiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                          num_classes=10), **overrides}).eval()
    with torch.no_grad():  # the zero-initialised layers too, or the output would be all zeros
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("overrides", [dict(), dict(input_size=(8, 12), learn_sigma=False, block="in_context")])
def test_onnx_matches_pytorch_at_several_batch_sizes(tmp_path, overrides):
    model = random_dit(**overrides)
    path = export_onnx(model, tmp_path / "dit.onnx")
    session = onnx_session(path)
    for batch in (1, 3, 7):  # exported with batch 2: the batch dimension is dynamic
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, model.in_channels, *model.input_size, generator=g)
        t = torch.rand(batch, generator=g) * 999
        y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)  # incl. the null label
        (out,) = session.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
        with torch.no_grad():
            ref = model(x, t, y)
        assert out.shape == tuple(ref.shape)
        assert ref.abs().max() > 0.1  # a real signal, not zeros
        assert (torch.from_numpy(out) - ref).abs().max().item() <= TOL
    assert max_onnx_error(model, path) <= TOL


def test_export_cli_from_a_checkpoint_directory(tmp_path, capsys):
    model = random_dit()
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "model.onnx"
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file() and "max abs difference" in capsys.readouterr().out
    assert max_onnx_error(model, out) <= TOL
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model.bin")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_fp16_needs_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: test_fp16_sampling_on_gpu covers --precision fp16")
    random_dit().save_pretrained(tmp_path / "ckpt")
    assert main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--precision", "fp16",
                 "--out", str(tmp_path / "s.npz")]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 sampling is a GPU feature")
def test_fp16_sampling_on_gpu(tmp_path):
    import numpy as np

    random_dit().save_pretrained(tmp_path / "ckpt")
    outs = {}
    for flag in ([], ["--precision", "fp16"]):
        out = tmp_path / f"s{len(flag)}.npz"  # s0: fp32, s2: fp16
        assert main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--class", "1", "2", "--n-per-class", "2",
                     "--steps", "20", "--out", str(out), *flag]) == 0
        outs[len(flag)] = np.load(out)["images"]
    # same noise, same sampler: float16 drifts but stays close (latents of order 1)
    assert np.isfinite(outs[2]).all() and np.abs(outs[2] - outs[0]).max() < 0.1
