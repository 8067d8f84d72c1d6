"""The fine-tuning demo, judged: accuracy and FD ratio (ditkit's digit classifier) of MNIST samples of a subset of
digits, against real images of the same digits: FD(samples, held-out digits) / FD(as many training images of
those digits, held-out digits).

    ditkit train --config configs/mnist_lora.yaml --out runs/mnist_lora
    ditkit sample --ckpt runs/mnist_lora --class 8 9 --n-per-class 500 --out new.npz
    ditkit sample --ckpt runs/mnist_lora --class 0 1 2 3 4 5 6 7 --n-per-class 125 --out old.npz
    ditkit sample --ckpt runs/mnist_lora/base --class 0 1 2 3 4 5 6 7 --n-per-class 125 --out base_old.npz
    python benchmarks/lora_quality.py new.npz old.npz base_old.npz [--markdown]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from common import Table, add_markdown_flag

from ditkit.data import load_dataset
from ditkit.evaluate.classifier import accuracy, load_classifier
from ditkit.evaluate.metrics import _classifier_features, frechet_distance_from_features


def judge(path: str, model: torch.nn.Module) -> tuple[list[int], float, float, float]:
    """(digits, accuracy, FD, real-vs-real FD) of the samples in `path` (ditkit sample's .npz)."""
    z = np.load(path)
    x, y = torch.from_numpy(z["images"]).float(), torch.from_numpy(z["labels"]).long()
    digits = sorted(set(y.tolist()))
    train, held = load_dataset("mnist", split="train"), load_dataset("mnist", split="heldout")
    real = train.images[torch.isin(train.labels, torch.tensor(digits))]
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:len(x)]]
    heldout = held.images[torch.isin(held.labels, torch.tensor(digits))]
    f_s, f_r, f_h = (_classifier_features(model, a, 500) for a in (x, real, heldout))
    return digits, accuracy(model, x, y), frechet_distance_from_features(f_s, f_h), \
        frechet_distance_from_features(f_r, f_h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="+", help="FILE.npz from ditkit sample")
    add_markdown_flag(parser)
    args = parser.parse_args()
    model = load_classifier().eval()
    table = Table(["samples", "digits", "n", "accuracy", "FD", "real-vs-real", "ratio"], args.markdown)
    for path in args.samples:
        digits, acc, fd, base = judge(path, model)
        n = len(np.load(path)["labels"])
        table.add(path, " ".join(map(str, digits)), n, f"{acc:.1%}", f"{fd:.3f}", f"{base:.3f}", f"{fd / base:.2f}x")
    table.finish()


if __name__ == "__main__":
    main()
