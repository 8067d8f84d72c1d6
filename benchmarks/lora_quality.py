"""The fine-tuning demo, judged with ditkit's digit classifier: for each fine-tuned run, accuracy and FD ratio
of its samples of the new digits (against real images of them: FD(samples, held-out digits) / FD(as many
training images of those digits, held-out digits)), accuracy on the old digits next to the base's own
(forgetting), and the size of what the run trained as a share of the base's weights file.

    ditkit train --config configs/mnist_lora.yaml --out runs/mnist_lora
    ditkit sample --ckpt runs/mnist_lora --class 8 9 --n-per-class 500 --out new.npz
    ditkit sample --ckpt runs/mnist_lora --class 0 1 2 3 4 5 6 7 --n-per-class 125 --out old.npz
    ditkit sample --ckpt runs/mnist_lora/base --class 0 1 2 3 4 5 6 7 --n-per-class 125 --out base_old.npz
    python benchmarks/lora_quality.py --base runs/mnist_lora/base base_old.npz \\
        --run LoRA runs/mnist_lora new.npz old.npz [--run NAME RUN NEW.npz OLD.npz ...] [--markdown]

A run's trained file is its adapter (OUT/adapter/adapter_model.safetensors) or, fine-tuned in full, its
newest checkpoint's EMA weights. The last row judges the first run's real training images of the new digits,
repeated to as many samples: the score of a model that only reproduced them. Plain sample files
(`python benchmarks/lora_quality.py FILE.npz ...`) are judged one per row.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import Table, add_markdown_flag

from ditkit import checkpoint as ckpt
from ditkit.data import load_dataset
from ditkit.evaluate.classifier import accuracy, load_classifier
from ditkit.evaluate.metrics import _classifier_features, frechet_distance_from_features
from ditkit.lora import ADAPTER_DIR


def judge(path: str | tuple[torch.Tensor, torch.Tensor], model: torch.nn.Module) -> tuple[list[int], int, float,
                                                                                       float, float]:
    """(digits, n, accuracy, FD, real-vs-real FD) of the samples in `path` (ditkit sample's .npz, or images
    in [-1, 1] and digit labels)."""
    if isinstance(path, str):
        z = np.load(path)
        x, y = torch.from_numpy(z["images"]).float(), torch.from_numpy(z["labels"]).long()
    else:
        x, y = path
    digits = sorted(set(y.tolist()))
    train, held = load_dataset("mnist", split="train"), load_dataset("mnist", split="heldout")
    real = train.images[torch.isin(train.labels, torch.tensor(digits))]
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:len(x)]]
    heldout = held.images[torch.isin(held.labels, torch.tensor(digits))]
    f_s, f_r, f_h = (_classifier_features(model, a, 500) for a in (x, real, heldout))
    return digits, len(x), accuracy(model, x, y), frechet_distance_from_features(f_s, f_h), \
        frechet_distance_from_features(f_r, f_h)


def training_images(run: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real images `run` was trained on (its MNIST data_args), repeated to `n`: what a model that only
    reproduced them would score."""
    config = json.loads((Path(run) / "config.json").read_text())
    data = load_dataset("mnist", **config.get("data_args") or {})
    x, y = data.images, torch.tensor([int(data.class_names[k]) for k in data.labels])
    repeat = -(-n // len(x))
    return x.repeat(repeat, 1, 1, 1)[:n], y.repeat(repeat)[:n]


def trained_share(run: str) -> tuple[float, float]:
    """(MB, share of the base's weights file) of what the fine-tuned `run` trained."""
    step = ckpt.resolve_checkpoint(run)
    base = json.loads((step / "run.json").read_text())["init"]["base"]
    base_file = Path(base["path"]) / base["weights"] if Path(base["path"]).is_dir() else Path(base["path"])
    adapter = Path(run) / ADAPTER_DIR / "adapter_model.safetensors"
    own = adapter if adapter.is_file() else step / ckpt.weights_file(step, True)
    return own.stat().st_size / 1e6, own.stat().st_size / base_file.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="*", help="FILE.npz from ditkit sample, judged one per row")
    parser.add_argument("--base", nargs=2, metavar=("RUN", "OLD.npz"),
                        help="the base run and its samples of the old digits")
    parser.add_argument("--run", nargs=4, action="append", default=[], metavar=("NAME", "RUN", "NEW.npz", "OLD.npz"),
                        help="a fine-tuned run and its samples of the new and the old digits (repeatable)")
    add_markdown_flag(parser)
    args = parser.parse_args()
    if not args.samples and not args.run:
        parser.error("give sample files, or --base RUN OLD.npz and --run NAME RUN NEW.npz OLD.npz")
    if args.run and not args.base:
        parser.error("--run compares with the base: give --base RUN OLD.npz too")
    model = load_classifier().eval()
    if args.samples:
        table = Table(["samples", "digits", "n", "accuracy", "FD", "real-vs-real", "ratio"], args.markdown)
        for path in args.samples:
            digits, n, acc, fd, base = judge(path, model)
            table.add(path, " ".join(map(str, digits)), n, f"{acc:.1%}", f"{fd:.3f}", f"{base:.3f}",
                      f"{fd / base:.2f}x")
        table.finish()
    if not args.run:
        return
    table = Table(["run", "trained file", "share of base", "new digits", "n", "new accuracy", "new FD ratio",
                   "old accuracy", "old change"], args.markdown)
    _, _, base_acc, _, _ = judge(args.base[1], model)
    table.add("base", "-", "-", "-", "-", "-", "-", f"{base_acc:.1%}", "-")
    for name, run, new, old in args.run:
        mb, share = trained_share(run)
        digits, n, acc, fd, real = judge(new, model)
        _, _, old_acc, _, _ = judge(old, model)
        table.add(name, f"{mb:.2f} MB", f"{share:.1%}", " ".join(map(str, digits)), n, f"{acc:.1%}",
                  f"{fd / real:.2f}x", f"{old_acc:.1%}", f"{100 * (old_acc - base_acc):+.1f} points")
    name, run, new, _ = args.run[0]
    digits, n, acc, fd, real = judge(training_images(run, len(np.load(new)["labels"])), model)
    table.add(f"{name}'s training images, repeated", "-", "-", " ".join(map(str, digits)), n, f"{acc:.1%}",
              f"{fd / real:.2f}x", "-", "-")
    table.finish()


if __name__ == "__main__":
    main()
