"""FID Inception: layout compatible with pytorch-fid's pt_inception checkpoint, TF pooling quirks, strict loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ditkit.evaluate.inception import FIDInceptionV3, load_inception

# torchvision documents 27,161,264 parameters for inception_v3 with its aux head and 1000 classes; without
# the aux head (3,326,696) and with 1008 classes (+8 * 2049) that is the FID network's 23,850,960.
FID_INCEPTION_PARAMS = 23_850_960


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    torch.manual_seed(0)
    net = FIDInceptionV3()
    # Non-default BatchNorm state, so a loader that dropped buffers would change the outputs.
    g = torch.Generator().manual_seed(1)
    for name, buf in net.state_dict().items():
        if name.endswith(("running_mean", "bn.bias")):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
        elif name.endswith(("running_var", "bn.weight")):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 75, 75, generator=torch.Generator().manual_seed(2)) * 2 - 1


def test_outputs(model: FIDInceptionV3, images: torch.Tensor):
    with torch.no_grad():
        features, logits = model(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and (features >= 0).all()  # mean of ReLU outputs
    assert features.abs().sum() > 0
    torch.testing.assert_close(logits, model.fc(features))


def test_layout_matches_checkpoint():
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMS
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Conv2d_4a_3x3.bn.running_var"] == (192,)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6b.branch7x7dbl_2.conv.weight"] == (128, 128, 7, 1)
    assert shapes["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any(k.startswith("AuxLogits") for k in shapes)
    assert not any(k.startswith(("Conv", "Mixed")) and ".conv.bias" in k for k in shapes)
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_pool_branches_follow_tensorflow(model: FIDInceptionV3):
    """The last 192/64 channels of each mixed block are its pool branch: TF-style average (padding not
    counted) everywhere except Mixed_7c, which max-pools."""
    g = torch.Generator().manual_seed(3)
    avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # noqa: E731
    mx = lambda x: F.max_pool2d(x, 3, stride=1, padding=1)  # noqa: E731
    for name, cin, pool in [("Mixed_5c", 256, avg), ("Mixed_6b", 768, avg),
                            ("Mixed_7b", 1280, avg), ("Mixed_7c", 2048, mx)]:
        block = getattr(model, name)
        x = torch.randn(1, cin, 5, 5, generator=g)
        with torch.no_grad():
            out = block(x)
            expected = block.branch_pool(pool(x))
        torch.testing.assert_close(out[:, -expected.shape[1]:], expected, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_round_trip(model: FIDInceptionV3, images: torch.Tensor, tmp_path, fmt: str):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"inception.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        # Older BatchNorm checkpoints carry no num_batches_tracked; those must load too.
        save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(path))
    loaded = load_inception(path)
    assert not loaded.training
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            assert torch.equal(a, b)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_inception(tmp_path / "nope.pth")


@pytest.mark.parametrize("edit, key", [
    (lambda s: s.pop("Mixed_6c.branch7x7_2.conv.weight"), "Mixed_6c.branch7x7_2.conv.weight"),
    (lambda s: s.update({"fc.weight": torch.zeros(1000, 2048)}), "fc.weight"),
    (lambda s: s.update({"AuxLogits.fc.weight": torch.zeros(1000, 768)}), "AuxLogits.fc.weight"),
])
def test_mismatched_state_dict(tmp_path, edit, key: str):
    state = FIDInceptionV3().state_dict()
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="pytorch-fid") as err:
        load_inception(path)
    assert key in str(err.value)


_unpickled = []


class Payload:
    """Stands in for a malicious checkpoint: unpickling it would run __setstate__."""

    def __init__(self):
        self.armed = True

    def __setstate__(self, state):
        _unpickled.append(state)


def test_arbitrary_pickle_refused(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"fc.weight": Payload()}, path)
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        load_inception(path)
    assert not _unpickled


def test_non_mapping_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_inception(path)
