"""A small CNN digit classifier trained by ditkit on the MNIST-5k training split: it judges whether
generated digits are recognisable and of the requested class. Trained once from a fixed seed, cached
as safetensors in the user's cache directory."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ditkit.io import atomic_path

CACHE_NAME = "mnist_classifier_v2.safetensors"


class DigitClassifier(nn.Module):
    """(N, 1, 32, 32) in [-1, 1] -> 10 logits; `features` gives the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.fc = nn.Linear(128 * 4, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def cache_dir() -> Path:
    root = os.environ.get("DITKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ditkit")
    return Path(root).expanduser()


def train_classifier(seed: int = 0, epochs: int = 12, batch_size: int = 64) -> DigitClassifier:
    """Train on the MNIST-5k training split with small random shifts; deterministic from `seed`."""
    from ditkit.data import load_mnist

    data = load_mnist(32, split="train")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(data) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(len(data) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = data.images[idx]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()  # shift augmentation
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def load_classifier(retrain: bool = False) -> DigitClassifier:
    """The cached classifier (trained and cached on first use, about a minute on 2 CPU cores)."""
    path = cache_dir() / CACHE_NAME
    model = DigitClassifier()
    if path.is_file() and not retrain:
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    model = train_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return model


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of (N, 1, 32, 32) images classified as their label."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size].float())
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)
