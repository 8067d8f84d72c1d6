"""The one in-memory dataset type every source produces, and batch augmentation."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class ImageDataset:
    """images (N, C, H, W) float32 in [-1, 1]; labels (N,) long in 0..num_classes-1.

    An unconditional dataset has `conditional=False`, num_classes = 1 and every label 0: a model built
    from it still gets a null label (1) for its classifier-free guidance machinery, and nothing needs
    to assume 1000 classes.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    hflip: bool = False  # whether random horizontal flips are a valid augmentation (not for digits)
    conditional: bool = True  # whether labels carry meaning
    captions: list[str] | None = None  # one text per image, for text-conditioned models

    layout: ClassVar[tuple[str, ...]] = ("N", "C", "H", "W")  # the axes of `images` (VideoDataset: clips)

    def __post_init__(self) -> None:
        if self.images.ndim != len(self.layout) or self.labels.shape != (len(self.images),):
            raise ValueError(f"images must be ({', '.join(self.layout)}) with one label each, "
                             f"got {tuple(self.images.shape)} "
                             f"and {tuple(self.labels.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.captions)} captions for {len(self.images)} images: give one caption per image")
        if not self.class_names:
            self.class_names = [str(k) for k in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: Tensor) -> ImageDataset:
        """The images at `index` (indices or a boolean mask), with the same classes."""
        captions = None if self.captions is None else [self.captions[i] for i in torch.arange(len(self))[index]]
        return replace(self, images=self.images[index], labels=self.labels[index], captions=captions)

    def captions_as_labels(self) -> ImageDataset:
        """Label k = the k-th distinct caption (sorted): text models then use the label machinery (label
        dropout for guidance, per-class sample grids) with the captions as class names."""
        if self.captions is None:
            raise ValueError("this dataset has no captions")
        names = sorted(set(self.captions))
        index = {name: k for k, name in enumerate(names)}
        labels = torch.tensor([index[c] for c in self.captions])
        return replace(self, labels=labels, num_classes=len(names), class_names=names, conditional=True)

    def as_unconditional(self) -> ImageDataset:
        """The same images as one class: every label 0, num_classes 1, conditional False."""
        return replace(self, labels=torch.zeros_like(self.labels), num_classes=1, class_names=["all"],
                       conditional=False, captions=None)

    def with_channels(self, channels: int) -> ImageDataset:
        """Repeat a 1-channel set to `channels`, or reject a conversion that would invent colour."""
        if channels == self.channels:
            return self
        if self.channels != 1:
            raise ValueError(f"cannot convert {self.channels}-channel images to {channels} channels")
        return replace(self, images=self.images.repeat(1, channels, 1, 1))


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image of a batch (N, C, H, W) left-right with probability 1/2, drawn from `generator`.

    The draw happens on the generator's device, so a CPU generator serves a GPU batch reproducibly.
    """
    flip = torch.rand(len(x), generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
