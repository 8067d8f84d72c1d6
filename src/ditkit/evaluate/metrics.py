"""Sample-quality metrics: Fréchet distance, k-NN precision/recall, Inception Score, and `evaluate`.

On MNIST the features are the penultimate layer (128-d) of ditkit's own digit classifier, so every
number is computed offline: FD-classifier (samples vs the held-out split), a real-vs-real FD baseline
(training split vs held-out split) that gives the FD its scale, precision/recall (Kynkäänniemi et al.
2019) and, for class-conditional samples, the classifier's accuracy on them. Inception FID and
Inception Score need the user's pytorch-fid Inception weights.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ditkit.data import load_dataset
from ditkit.data.folder import list_images, load_folder
from ditkit.evaluate.classifier import DigitClassifier, accuracy, load_classifier
from ditkit.notes import warn

RANGE_SLACK = 1e-3  # samples are clamped to [-1, 1]; allow float rounding from other writers


def feature_stats(features: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    f = torch.as_tensor(features).to(torch.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 (a covariance needs two), got {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def _sqrt_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues are rounding, clipped."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor | np.ndarray, sigma1: Tensor | np.ndarray,
                     mu2: Tensor | np.ndarray, sigma2: Tensor | np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians.

    S1 S2 is not symmetric, but it has the same eigenvalues as sqrt(S1) S2 sqrt(S1), which is symmetric
    PSD, so the trace of its square root is a sum of square roots of clipped real eigenvalues: stable
    in float64 even for singular covariances, with no scipy.
    """
    mu1, mu2 = (torch.as_tensor(m).to(torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).to(torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"expected means (D,) and covariances (D, D) of one D, got {tuple(mu1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    root1 = _sqrt_psd(s1)
    m = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)  # a true distance is >= 0; rounding can leave -1e-12


def frechet_distance_from_features(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _min_over_chunks(a: Tensor, b: Tensor, reduce: Callable[[Tensor], Tensor], chunk: int) -> Tensor:
    """reduce(cdist(a_chunk, b)) for row chunks of a: never holds more than chunk x len(b) distances."""
    return torch.cat([reduce(torch.cdist(a[i:i + chunk], b)) for i in range(0, len(a), chunk)])


def _knn_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    # the k+1-th smallest distance, because each point is its own nearest neighbour at distance 0
    return _min_over_chunks(x, x, lambda d: d.topk(k + 1, dim=1, largest=False).values[:, k], chunk)


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> float:
    """Fraction of points inside at least one ball (centre, radius)."""
    inside = _min_over_chunks(points, centres, lambda d: (d <= radii).any(1), chunk)
    return inside.sum().item() / len(inside)


@torch.no_grad()
def precision_recall(real_features: Tensor | np.ndarray, fake_features: Tensor | np.ndarray, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of (N, D) fake vs (M, D) real features.

    Each set's manifold is the union of balls around its points with radius the distance to the k-th
    nearest neighbour; precision is the fraction of fakes inside the real manifold, recall the fraction
    of reals inside the fake manifold. Distances are computed `chunk` rows at a time (5k x 5k fits).
    """
    real = torch.as_tensor(real_features).float()
    fake = torch.as_tensor(fake_features).float()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (M, D) real and (N, D) fake features, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"k-NN precision/recall needs k >= 1 and more than k={k} points in each set, "
                         f"got {len(real)} real and {len(fake)} fake")
    real_radii, fake_radii = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)
    return _coverage(fake, real, real_radii, chunk), _coverage(real, fake, fake_radii, chunk)


def inception_score(logits: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) from (N, K) logits: mean and std over `splits` parts.

    1 when every prediction is the same; K when predictions are confident and the K classes equally used.
    """
    logits = torch.as_tensor(logits).to(torch.float64)
    if logits.ndim != 2 or splits < 1 or len(logits) < splits:
        raise ValueError(f"expected (N, K) logits with N >= splits={splits}, got {tuple(logits.shape)}")
    log_p = logits.log_softmax(1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_py = part.exp().mean(0).log()
        # 0 * log 0 is 0: one-hot rows give -inf log-probabilities where p is 0
        kl = torch.where(part.isfinite(), part.exp() * (part - log_py), torch.zeros_like(part)).sum(1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def load_samples(path: str | os.PathLike, image_size: int | None = None,
                 channels: int | None = None) -> tuple[Tensor, Tensor | None]:
    """`images` (N, C, H, W) in [-1, 1] and, if present, `labels` (N,) from samples on disk.

    path: an .npz written by `ditkit sample --out FILE.npz` (arrays `images`, optional `labels`), or a
    folder of images as `ditkit sample --out DIR/` writes it (DIR/<label>/*.png; labels are the subfolder
    names, which must then be integers) or any DIR/*.png (no labels). Folder images are centre-cropped
    and resized to `image_size` with `channels` (default: the first image's shorter side and mode).
    """
    path = Path(path)
    if path.is_dir():
        return _load_sample_folder(path, image_size, channels)
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path} (expected an .npz with an `images` array, "
                                f"or a folder of images)")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith(b"PK\x03\x04"):  # an .npz is a zip archive; anything else np.load calls a pickle
        raise ValueError(f"{path} is not an .npz file (it starts with {head!r}, not a zip archive): expected "
                         f"images (N, C, H, W) in [-1, 1] as `ditkit sample --out FILE.npz` writes, or a folder")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:  # np.load raises several types for a file that is not an npz
        raise ValueError(f"{path} is not a readable .npz file ({err})") from err
    if "images" not in arrays:
        raise ValueError(f"{path} has no `images` array (found: {', '.join(sorted(arrays)) or 'nothing'}); "
                         f"expected images (N, C, H, W) in [-1, 1] as `ditkit sample --out FILE.npz` writes")
    images = torch.from_numpy(np.asarray(arrays["images"], dtype=np.float32))
    labels = torch.from_numpy(np.asarray(arrays["labels"])).long() if "labels" in arrays else None
    return images, labels


def _load_sample_folder(root: Path, image_size: int | None, channels: int | None) -> tuple[Tensor, Tensor | None]:
    if image_size is None or channels is None:
        first = list_images(root)[0][0][0]  # the first file load_folder reads; no image is a ValueError
        with Image.open(first) as im:
            image_size = image_size or min(im.size)
            channels = channels or (1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
    data = load_folder(root, image_size=image_size, channels=channels)
    if not data.conditional:
        return data.images, None
    if not all(name.isdigit() for name in data.class_names):
        raise ValueError(f"{root}: class subfolders must be named by integer label (0, 1, ...) for labelled "
                         f"samples, got {', '.join(data.class_names[:5])}; put unlabelled samples directly in {root}")
    names = torch.tensor([int(name) for name in data.class_names])
    return data.images, names[data.labels]


def _check_images(images: Tensor, what: str, shape: tuple[int, ...] | None = None) -> Tensor:
    images = torch.as_tensor(images).float()
    if images.ndim != 4 or shape is not None and tuple(images.shape[1:]) != shape:
        want = f"(N, {', '.join(map(str, shape))})" if shape else "(N, C, H, W)"
        raise ValueError(f"{what} must be {want}, got {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"{what}: need at least 2 images (a Fréchet distance needs a covariance), got {len(images)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} contain NaN or inf values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(f"{what} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return images.clamp(-1, 1)


def _warn_if_few(n: int, dim: int, what: str) -> None:
    # FD stays defined (the covariance is singular, not invalid) but is strongly biased upward
    if n < dim:
        warn(f"{what}: {n} images for {dim}-d features; the Fréchet distance is strongly biased "
             f"with fewer images than feature dimensions (use thousands)", stacklevel=3)


@torch.no_grad()
def _batched(fn: Callable[[Tensor], object], images: Tensor, batch_size: int, device: torch.device) -> list:
    return [fn(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]


def _classifier_features(model: DigitClassifier, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat(_batched(model.features, images, batch_size, torch.device("cpu")))


def _inception_outputs(model: torch.nn.Module, images: Tensor, batch_size: int,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Inception takes 1- or 3-channel images, got {images.shape[1]} channels")
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    outputs = _batched(model, images, batch_size, device)
    return torch.cat([o[0].cpu() for o in outputs]), torch.cat([o[1].cpu() for o in outputs])


def _load_reference(reference: str, samples: Tensor) -> Tensor:
    if reference.endswith(".npz"):
        return _check_images(load_samples(reference)[0], f"reference {reference}")
    if Path(reference).is_dir():
        _, c, h, w = samples.shape
        if h != w or c not in (1, 3):
            raise ValueError(f"a folder reference is loaded at the samples' size, which must be square with 1 or "
                             f"3 channels, got samples {tuple(samples.shape)}")
        return load_dataset(reference, image_size=h, channels=c).images
    raise ValueError(f"unknown reference {reference!r}: expected mnist, a directory of images or a FILE.npz")


def _classifier_metrics(samples: Tensor, labels: Tensor | None, classifier: DigitClassifier | None, k: int,
                        batch_size: int) -> dict[str, float]:
    """The digit classifier's metrics of `evaluate` (reference "mnist")."""
    metrics: dict[str, float] = {}
    _warn_if_few(len(samples), 128, "samples")
    model = (classifier or load_classifier()).eval()
    train, heldout = load_dataset("mnist", split="train"), load_dataset("mnist", split="heldout")
    metrics["classifier_heldout_accuracy"] = accuracy(model, heldout.images, heldout.labels)
    if labels is not None:
        metrics["accuracy"] = accuracy(model, samples, labels.long())
    f_fake = _classifier_features(model, samples, batch_size)
    f_held = _classifier_features(model, heldout.images, batch_size)
    # FD is biased upward by small sets, so the baseline uses as many training images as there are
    # samples (a fixed random subset): then the two numbers differ by quality, not by set size
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:len(samples)]
    f_train = _classifier_features(model, train.images[pick], batch_size)
    metrics["fd_classifier"] = frechet_distance_from_features(f_fake, f_held)
    metrics["fd_classifier_real_baseline"] = frechet_distance_from_features(f_train, f_held)
    metrics["precision"], metrics["recall"] = precision_recall(f_held, f_fake, k=k)
    return metrics


def evaluate(samples: Tensor, labels: Tensor | None = None, reference: str = "mnist",
             inception_weights: str | os.PathLike | None = None, classifier: DigitClassifier | None = None,
             k: int = 3, batch_size: int = 250, device: str | torch.device | None = None) -> dict[str, float]:
    """Every metric that applies to `samples` (N, C, H, W) in [-1, 1] against `reference`.

    reference "mnist" (samples (N, 1, 32, 32)): classifier_heldout_accuracy, fd_classifier (samples vs
    the held-out split), fd_classifier_real_baseline (as many training images as samples, up to all
    4,500, vs the held-out split), precision,
    recall (k-NN on the classifier's features, vs the held-out split) and, given labels, accuracy.
    `classifier` defaults to the cached `load_classifier()`.
    A directory of images or FILE.npz reference needs `inception_weights`.
    With `inception_weights` (the pytorch-fid `pt_inception` state dict): fid (vs the reference),
    inception_score and inception_score_std (10 splits).
    Fewer samples than feature dimensions (128, or 2048 for Inception) gives a warning: FD is then
    strongly biased. Bad input raises ValueError saying what was expected.
    """
    reference = os.fspath(reference)
    mnist = reference == "mnist"
    samples = _check_images(samples, "samples", (1, 32, 32) if mnist else None)
    if not mnist and inception_weights is None:
        raise ValueError(f"reference {reference!r} is not mnist: its metrics need --inception-weights FILE "
                         f"(the pytorch-fid pt_inception state dict); the digit classifier only judges MNIST")
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise FileNotFoundError(f"no such Inception weights file: {inception_weights}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (len(samples),) or labels.is_floating_point():
            raise ValueError(f"labels must be integers of shape ({len(samples)},), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if mnist and not (0 <= int(labels.min()) and int(labels.max()) < 10):
            raise ValueError(f"mnist labels must lie in 0..9, got {int(labels.min())}..{int(labels.max())}")
    if len(samples) <= k:
        raise ValueError(f"need more than k={k} samples for precision/recall, got {len(samples)}")

    metrics: dict[str, float] = {"num_samples": len(samples)}  # a count: an int in the JSON too
    if mnist:
        metrics.update(_classifier_metrics(samples, labels, classifier, k, batch_size))
    if inception_weights is not None:
        from ditkit.evaluate.inception import load_inception  # the Inception net is only built on request

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ref_images = load_dataset("mnist", split="heldout").images if mnist else _load_reference(reference, samples)
        _warn_if_few(min(len(samples), len(ref_images)), 2048, "Inception FID")
        net = load_inception(os.fspath(inception_weights)).to(dev).eval()
        pool_fake, logits_fake = _inception_outputs(net, samples, batch_size, dev)
        pool_real, _ = _inception_outputs(net, ref_images, batch_size, dev)
        metrics["fid"] = frechet_distance_from_features(pool_fake, pool_real)
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(
            logits_fake, splits=min(10, len(samples)))
    return metrics
