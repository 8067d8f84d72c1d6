"""PixArt-alpha: "Fast Training of Diffusion Transformer for Photorealistic Text-to-Image Synthesis"
(Chen et al., ICLR 2024).

A DiT whose class embedding is replaced by cross-attention to caption tokens, and whose per-block adaLN
MLPs are replaced by adaLN-single: one shared MLP maps the timestep embedding to 6 x D modulation values,
and each block adds its own learned `scale_shift_table` (6, D). Block: self-attention, cross-attention to
the caption, MLP. Captions dropped in training (and the unconditional side of guidance) use a learned
null caption.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ditkit.models.dit import TransformerBlock, _init_linears, _norm
from ditkit.models.layers import (
    CrossAttention,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_2d_stretched,
    unpatchify,
)
from ditkit.models.mmdit import check_text_conditioned_inputs
from ditkit.models.pretrained import PretrainedMixin


class CaptionEmbedder(nn.Module):
    """Caption tokens (N, L, context_dim) -> (N, L, D) by a 2-layer GELU MLP. Holds the learned null
    caption `y_embedding` (caption_length, context_dim); training replaces captions by it with
    probability `dropout_prob` (or where force_drop_ids == 1)."""

    def __init__(self, context_dim: int, hidden_size: int, caption_length: int, dropout_prob: float):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.y_proj = nn.Sequential(
            nn.Linear(context_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.y_embedding = nn.Parameter(torch.randn(caption_length, context_dim) / context_dim**0.5)
        for layer in (self.y_proj[0], self.y_proj[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def token_drop(self, context: Tensor, mask: Tensor | None,
                   force_drop_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Replace dropped captions by the null caption, whose tokens are all real."""
        if context.shape[1] != self.y_embedding.shape[0]:
            raise ValueError(f"caption dropout needs captions of caption_length = {self.y_embedding.shape[0]} "
                             f"tokens (pad them and pass context_mask), got {context.shape[1]}")
        if force_drop_ids is None:
            drop = torch.rand(context.shape[0], device=context.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(context.device) == 1
        context = torch.where(drop[:, None, None], self.y_embedding.to(context.dtype), context)
        return context, None if mask is None else mask.bool() | drop[:, None]

    def forward(self, context: Tensor, mask: Tensor | None, train: bool,
                force_drop_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            context, mask = self.token_drop(context, mask, force_drop_ids)
        return self.y_proj(context), mask


class PixArtBlock(TransformerBlock):
    """adaLN-single block: shift, scale and gate of both residual branches are the shared timestep
    modulation plus this block's `scale_shift_table`; cross-attention (unmodulated, unnormalised input,
    zero-initialised output) sits between self-attention and the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio, affine=False)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        _init_linears(self)
        nn.init.zeros_(self.cross_attn.proj.weight)
        nn.init.zeros_(self.cross_attn.proj.bias)

    def forward(self, x: Tensor, y: Tensor, t6: Tensor, mask: Tensor | None) -> Tensor:
        """x (N, T, D), y (N, L, D) caption, t6 (N, 6 * D) shared modulation, mask (N, L) or None."""
        mod = self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class T2IFinalLayer(nn.Module):
    """LayerNorm modulated by the raw timestep embedding plus a learned (2, D) table, then a zero-
    initialised linear decoder to p * p * out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _norm(hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # x (N, T, D), t (N, D)
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixArtDiT(PretrainedMixin, nn.Module):
    """PixArt-alpha text-to-image DiT.

    `forward(x, t, context, context_mask=None, force_drop_ids=None)`: x (N, C, H, W) with H and W multiples
    of the patch size, t (N,) timesteps in 0..1000 units (may be fractional; the numbers a diffusers PixArt
    transformer takes), context (N, L, context_dim) caption tokens, context_mask (N, L) True for real tokens
    (at least one per caption; padded tokens are never attended to). `force_drop_ids` (N,), 1 where the
    caption is replaced by the null caption (lets a trainer draw caption dropout from its own generator).
    Returns (N, out_channels, H, W), out_channels = 2C when `learn_sigma`. The null caption has
    `caption_length` tokens; caption dropout needs captions padded to that length.

    Positions are sin-cos, computed for each input's token grid with coordinates stretched so that each
    axis spans `input_size / patch_size` positions, divided by `interpolation_scale` (PixArt's scheme for
    other resolutions and aspect ratios).
    """

    def __init__(
        self,
        input_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        caption_length: int = 120,
        caption_dropout_prob: float = 0.1,
        interpolation_scale: float = 1.0,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if caption_length < 1:
            raise ValueError(f"caption_length must be >= 1, got {caption_length}")
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, context_dim=context_dim,
            caption_length=caption_length, caption_dropout_prob=caption_dropout_prob,
            interpolation_scale=interpolation_scale, learn_sigma=learn_sigma,
        )
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.context_dim = context_dim
        self.base_size = input_size // patch_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))  # adaLN-single
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.zeros_(self.t_block[1].bias)
        self.y_embedder = CaptionEmbedder(context_dim, hidden_size, caption_length, caption_dropout_prob)
        # positions of the training grid, kept; other grids are computed when they come
        self.register_buffer("pos_embed", self._positions((self.base_size, self.base_size)), persistent=False)
        self.blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)

    def _positions(self, grid: tuple[int, int]) -> Tensor:
        c = self.config
        table = sincos_2d_stretched(c["hidden_size"], grid, self.base_size, c["interpolation_scale"])
        return torch.from_numpy(table).unsqueeze(0)  # (1, h * w, D)

    def null_condition(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The unconditional input for classifier-free guidance: the learned null caption as
        (context (N, caption_length, context_dim), context_mask (N, caption_length) all True)."""
        null = self.y_embedder.y_embedding
        mask = torch.ones(batch_size, null.shape[0], dtype=torch.bool, device=null.device)
        return null.detach()[None].expand(batch_size, -1, -1), mask

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None,
                force_drop_ids: Tensor | None = None) -> Tensor:
        grid = check_text_conditioned_inputs(self, x, t, context, context_mask)
        if (context_mask is not None and context_mask.device.type != "meta" and not torch.compiler.is_compiling()
                and not context_mask.bool().any(dim=1).all()):
            raise ValueError("a caption has no real token (its context_mask row is all False): "
                             "use null_condition() for an unconditional sample")
        pos = self.pos_embed if grid == (self.base_size, self.base_size) else self._positions(grid).to(self.pos_embed)
        x = self.x_embedder(x) + pos  # (N, T, D)
        t = self.t_embedder(t)  # (N, D)
        t6 = self.t_block(t)  # (N, 6 * D)
        y, mask = self.y_embedder(context, context_mask, self.training, force_drop_ids)  # (N, L, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, t6, mask, use_reentrant=False)
            else:
                x = block(x, y, t6, mask)
        x = self.final_layer(x, t)  # (N, T, p * p * out_channels)
        return unpatchify(x, self.patch_size, self.out_channels, grid)
