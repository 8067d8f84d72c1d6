"""Text models behind the class-label interface: label k = prompt k of a fixed, pre-encoded list, and
label P (= number of prompts) = no prompt. The one sampler (and its classifier-free guidance), the
trainer's label dropout and EMA then serve text models unchanged.

The null prompt is the model's own: MM-DiT's zero tokens and zero pooled vector (as SD3 drops a text
encoder), PixArt's learned null caption.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ditkit.models import MMDiT, PixArtDiT
from ditkit.text import TextEncoder


class PromptTable(nn.Module):
    """`forward(x, t, y, force_drop_ids=None)`: the text model conditioned on prompt y (0..P-1), or on
    no prompt where y == P or force_drop_ids == 1."""

    def __init__(self, model: MMDiT | PixArtDiT, tokens: Tensor, mask: Tensor, pooled: Tensor):
        super().__init__()
        if not isinstance(model, (MMDiT, PixArtDiT)):
            raise ValueError(f"PromptTable wraps an MMDiT or a PixArtDiT, got {type(model).__name__}")
        if tokens.shape[-1] != model.context_dim:
            raise ValueError(f"the prompts were encoded to width {tokens.shape[-1]} but the model takes "
                             f"context_dim {model.context_dim}: use the text encoder it was trained with")
        self.model = model
        self.num_classes = len(tokens)
        self.in_channels, self.learn_sigma = model.in_channels, model.learn_sigma
        self.input_size = (model.config["input_size"],) * 2
        # persistent=False: a checkpoint holds the model only; the table is rebuilt from the prompts
        self.register_buffer("tokens", tokens, persistent=False)  # (P, L, context_dim)
        self.register_buffer("mask", mask.bool(), persistent=False)  # (P, L)
        self.register_buffer("pooled", pooled, persistent=False)  # (P, pooled_dim)

    @classmethod
    def encode(cls, model: MMDiT | PixArtDiT, encoder: TextEncoder, prompts: Sequence[str]) -> PromptTable:
        """Encode `prompts` once with the model's text encoder and wrap the model."""
        if not prompts:
            raise ValueError("no prompts given")
        tokens, mask, pooled = encoder.encode(list(prompts))
        device = next(model.parameters()).device
        return cls(model, tokens.to(device), mask.to(device), pooled.to(device))

    @property
    def grad_checkpointing(self) -> bool:
        return self.model.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        self.model.grad_checkpointing = value

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if y.shape != (x.shape[0],) or int(y.min()) < 0 or int(y.max()) > self.num_classes:
            raise ValueError(f"y must be (N,) prompt indices in 0..{self.num_classes} ({self.num_classes} = no "
                             f"prompt), got {tuple(y.shape)}")
        drop = y == self.num_classes
        if force_drop_ids is not None:
            drop = drop | (force_drop_ids == 1)
        k = y.clamp(max=self.num_classes - 1)
        context, mask = self.tokens[k], self.mask[k]
        if isinstance(self.model, PixArtDiT):
            return self.model(x, t, context, mask, force_drop_ids=drop.long())
        null_context, null_pooled, _ = self.model.null_condition(1)
        context = torch.where(drop[:, None, None], null_context.to(context), context)
        pooled = torch.where(drop[:, None], null_pooled.to(self.pooled), self.pooled[k])
        return self.model(x, t, context, pooled, mask | drop[:, None])
