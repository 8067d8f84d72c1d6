"""Sample metrics: Fréchet distance against closed forms, k-NN precision/recall and Inception Score on
constructed cases, `evaluate` with a random-weights classifier, and `ditkit eval` (nothing trains)."""
from __future__ import annotations

import json
import math
import re
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ditkit.cli import main
from ditkit.data import load_dataset
from ditkit.evaluate import (evaluate, feature_stats, frechet_distance, frechet_distance_from_features,
                             inception_score, precision_recall)
from ditkit.evaluate.classifier import CACHE_NAME, DigitClassifier, accuracy

MNIST_KEYS = {"num_samples", "classifier_heldout_accuracy", "accuracy", "fd_classifier",
              "fd_classifier_real_baseline", "precision", "recall"}


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_frechet_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(16, generator=g), torch.randn(16, generator=g)
    a, b = torch.rand(16, generator=g) + 0.1, torch.rand(16, generator=g) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected.item(), rel=1e-6)


def test_frechet_commuting_and_singular_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: (S1 S2)^(1/2) = Q diag(sqrt(ab)) Q^T
    q = random_orthogonal(8, 1)
    a = torch.tensor([4.0, 1, 0.25, 9, 0, 0, 2, 3], dtype=torch.float64)  # rank-deficient on purpose
    b = torch.tensor([1.0, 1, 1, 1, 1, 0, 0.5, 3], dtype=torch.float64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu = torch.zeros(8, dtype=torch.float64)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    # zero eigenvalues come back as ~1e-16, whose square roots (~1e-8) bound the accuracy here
    assert frechet_distance(mu, s1, mu + 1, s2) == pytest.approx(expected + 8, abs=1e-6)
    assert frechet_distance(mu, s1, mu + 1, s2) == pytest.approx(frechet_distance(mu + 1, s2, mu, s1), abs=1e-6)


def test_frechet_from_features_zero_and_symmetric():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 32, generator=g) @ torch.randn(32, 32, generator=g)
    y = torch.randn(200, 32, generator=g) * 2 + 1
    assert abs(frechet_distance_from_features(x, x)) < 1e-6
    assert frechet_distance_from_features(x, y) == pytest.approx(frechet_distance_from_features(y, x), rel=1e-9)
    mu, sigma = feature_stats(x.numpy())
    assert torch.allclose(sigma, torch.from_numpy(np.cov(x.numpy().astype(np.float64), rowvar=False)))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(x[:1])


def test_precision_recall_constructed_cases():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(400, 8, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # real: two far-apart modes; fake: only the first -> every fake is realistic, half the reals covered
    # (2-d, k=5: in higher dimensions a few hundred k-NN balls leave gaps even inside one Gaussian)
    modes = torch.cat([torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 50])
    fake = torch.randn(300, 2, generator=g)
    precision, recall = precision_recall(modes, fake, k=5, chunk=64)  # small chunks exercise the chunking
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(real[:3], real, k=3)


def test_inception_score_closed_forms():
    assert inception_score(torch.zeros(100, 10)) == pytest.approx((1.0, 0.0), abs=1e-9)
    k = 7
    onehot = torch.full((70, k), -math.inf)
    onehot[torch.arange(70), torch.arange(70) % k] = 0.0  # each split of 7 uses every class once
    mean, std = inception_score(onehot, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(5, 3), splits=10)


@pytest.fixture(scope="module")
def heldout():
    return load_dataset("mnist", split="heldout")


@pytest.fixture()
def random_classifier(tmp_path, monkeypatch):
    """A random-weights classifier saved where load_classifier looks, so nothing trains."""
    torch.manual_seed(0)
    model = DigitClassifier().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / CACHE_NAME))
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path))
    return model


def test_evaluate_mnist_with_random_classifier(random_classifier, heldout):
    x, y = heldout.images[:200], heldout.labels[:200]
    with pytest.warns(UserWarning, match="biased"):  # 100 samples < 128 feature dimensions
        evaluate(x[:100], y[:100])
    metrics = evaluate(x, y)
    assert set(metrics) == MNIST_KEYS
    assert metrics["accuracy"] == accuracy(random_classifier, x, y)
    assert metrics["classifier_heldout_accuracy"] == accuracy(random_classifier, heldout.images, heldout.labels)
    assert metrics["precision"] == 1.0  # the samples are held-out images themselves
    assert all(math.isfinite(v) for v in metrics.values())
    assert "accuracy" not in evaluate(x, None, classifier=random_classifier)


@pytest.mark.parametrize("images, labels, match", [
    (torch.zeros(10, 3, 32, 32), None, r"\(N, 1, 32, 32\)"),
    (torch.full((10, 1, 32, 32), 2.0), None, r"\[-1, 1\]"),
    (torch.zeros(1, 1, 32, 32), None, "at least 2"),
    (torch.zeros(10, 1, 32, 32), torch.full((10,), 10), "0..9"),
    (torch.zeros(10, 1, 32, 32), torch.zeros(9, dtype=torch.long), "labels must be"),
])
def test_evaluate_rejects_bad_input(images, labels, match):
    with pytest.raises(ValueError, match=match):
        evaluate(images, labels, classifier=DigitClassifier())


def test_evaluate_non_mnist_reference_needs_inception(tmp_path):
    np.savez(tmp_path / "ref.npz", images=np.zeros((10, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="--inception-weights"):
        evaluate(torch.zeros(10, 3, 16, 16), reference=str(tmp_path / "ref.npz"))


class TinyInception(nn.Module):
    """Stands in for the FID Inception net: (N, 3, H, W) -> (pool features (N, 2048), logits (N, 1008))."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Linear(3, 2048)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        assert x.shape[1] == 3  # grey images must arrive repeated to 3 channels
        f = self.pool(x.mean((2, 3)))
        return f, self.fc(f)


def test_evaluate_inception_plumbing(tmp_path, monkeypatch):
    fake = types.ModuleType("ditkit.evaluate.inception")
    fake.load_inception = lambda path: TinyInception()
    monkeypatch.setitem(sys.modules, "ditkit.evaluate.inception", fake)
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"stand-in")
    g = torch.Generator().manual_seed(4)
    ref = torch.rand(40, 1, 16, 16, generator=g) * 2 - 1
    np.savez(tmp_path / "ref.npz", images=ref.numpy())
    with pytest.warns(UserWarning, match="biased"):
        metrics = evaluate(ref.clone(), reference=str(tmp_path / "ref.npz"), inception_weights=weights)
    assert set(metrics) == {"num_samples", "fid", "inception_score", "inception_score_std"}
    assert abs(metrics["fid"]) < 1e-6 and metrics["inception_score"] >= 1.0
    with pytest.raises(FileNotFoundError, match="Inception weights"):
        evaluate(ref, reference=str(tmp_path / "ref.npz"), inception_weights=tmp_path / "missing.pth")


def test_cli_eval_of_clips_reports_them_beside_real_clips(random_classifier, tmp_path, capsys):
    """`ditkit eval CLIPS.npz` (positional) on a video run's samples gives the clip metrics with real-clip baselines."""
    from ditkit.data import make_moving_mnist

    clips = make_moving_mnist(n_clips=24, frames=4, motion="class", split="heldout", seed=3)
    path = tmp_path / "clips.npz"
    np.savez(path, images=clips.images.numpy(), labels=clips.labels.numpy())
    assert main(["eval", str(path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("frame_accuracy", "clip_consistency", "motion"):
        assert 0.0 <= metrics[key] <= 1.0 and f"{key}_real" in metrics
    assert metrics["motion"] == metrics["motion_real"] == 1.0  # real clips move by the rule
    assert main(["eval", str(path)]) == 0
    assert "real clips" in capsys.readouterr().out
    assert main(["eval"]) == 2
    assert "no samples given" in capsys.readouterr().err


def test_cli_eval_json_and_table(random_classifier, heldout, tmp_path, capsys):
    path = tmp_path / "s.npz"
    np.savez(path, images=heldout.images[:150].numpy(), labels=heldout.labels[:150].numpy())
    assert main(["eval", "--samples", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert set(json.loads(out)) == MNIST_KEYS
    assert '"num_samples": 150,' in out  # a count, written as an int (was 150.0)
    assert main(["eval", "--samples", str(path)]) == 0
    table = capsys.readouterr().out
    assert "FD-classifier" in table and "real-vs-real baseline" in table and "recall" in table


@pytest.mark.parametrize("arrays, match", [
    (None, "no such file"),
    ({"pictures": np.zeros((4, 1, 32, 32), np.float32)}, "no `images` array"),
    ({"images": np.zeros((4, 32, 32), np.float32)}, r"\(N, 1, 32, 32\)"),
])
def test_cli_eval_bad_input_exit_2(arrays, match, tmp_path, capsys):
    path = tmp_path / "s.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    assert main(["eval", "--samples", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditkit eval: error:") and len(err.strip().splitlines()) == 1
    assert re.search(match, err)


def test_sample_folder_round_trip(tmp_path):
    """Images written one PNG each come back within 8-bit rounding, with integer labels (10 after 9, not
    after 1) and at the first image's size and mode; unlabelled folders give no labels."""
    from ditkit.evaluate import load_samples
    from ditkit.images import save_image_folder

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, torch.arange(12)
    save_image_folder(tmp_path / "labelled", images, labels)
    loaded, got = load_samples(tmp_path / "labelled")
    assert loaded.shape == (12, 1, 8, 8) and sorted(got.tolist()) == list(range(12))
    assert (loaded - images[got]).abs().max() <= 1 / 127.5 + 1e-6  # each image under its own label
    rgb = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    save_image_folder(tmp_path / "plain", rgb)
    loaded, got = load_samples(tmp_path / "plain")
    assert got is None and (loaded - rgb).abs().max() <= 1 / 127.5 + 1e-6
    (tmp_path / "named" / "cat").mkdir(parents=True)
    save_image_folder(tmp_path / "named" / "cat", rgb)
    with pytest.raises(ValueError, match="integer label"):
        load_samples(tmp_path / "named")


def test_cli_sample_folder_then_eval(random_classifier, heldout, tmp_path, capsys):
    """`ditkit eval` reads a folder of PNGs (as `ditkit sample --out DIR/` writes) like the same .npz."""
    from ditkit.images import save_image_folder

    images, labels = heldout.images[:150], heldout.labels[:150]
    save_image_folder(tmp_path / "samples", images, labels)
    np.savez(tmp_path / "s.npz", images=images.numpy(), labels=labels.numpy())
    assert main(["eval", "--samples", str(tmp_path / "samples"), "--json"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--json"]) == 0
    from_npz = json.loads(capsys.readouterr().out)
    assert set(from_folder) == MNIST_KEYS and from_folder["accuracy"] == from_npz["accuracy"]
    assert from_folder["fd_classifier"] == pytest.approx(from_npz["fd_classifier"], rel=0.05, abs=0.05)
