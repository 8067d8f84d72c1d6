"""MM-DiT: the multimodal diffusion transformer of Stable Diffusion 3
("Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", Esser et al., ICML 2024).

Image tokens and text tokens keep separate weights (adaLN-Zero modulation, QKV, output projection, MLP)
and meet in one joint attention over the concatenated sequence. The global conditioning vector is the
timestep embedding plus an MLP of the pooled text embedding. The last block updates only the image
stream. Positions are cropped from a larger fixed table, so any resolution up to the table's size works.

Unconditional input (classifier-free guidance): zero text tokens and a zero pooled vector, as SD3 drops
a text encoder by zeroing its output; `null_condition` builds them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ditkit.models.dit import FinalLayer, _init_linears, _norm
from ditkit.models.layers import (
    Mlp,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    attention,
    modulate,
    sincos_2d_stretched,
    unpatchify,
)
from ditkit.models.pretrained import PretrainedMixin


def check_text_conditioned_inputs(model: nn.Module, x: Tensor, t: Tensor, context: Tensor,
                                  context_mask: Tensor | None) -> tuple[int, int]:
    """Raise ValueError naming what was expected when x, t, context or the mask do not fit `model`
    (which has `in_channels`, `patch_size` and `context_dim`); return the token grid (h, w)."""
    C, p, name = model.in_channels, model.patch_size, type(model).__name__
    if x.ndim != 4 or x.shape[1] != C:
        raise ValueError(f"x must be (N, {C}, H, W), got shape {tuple(x.shape)}")
    N, H, W = x.shape[0], x.shape[2], x.shape[3]
    if H % p or W % p:
        raise ValueError(f"x is {H}x{W}, not divisible by {name}'s patch size {p}: crop or pad it")
    if t.ndim != 1 or t.shape[0] != N:
        raise ValueError(f"t must be a 1-D tensor of {N} timesteps (one per sample), got shape {tuple(t.shape)}")
    if context.ndim != 3 or context.shape[0] != N or context.shape[2] != model.context_dim:
        raise ValueError(f"context must be (N={N}, L, {model.context_dim}) text tokens, got shape "
                         f"{tuple(context.shape)}: build the model with context_dim equal to the text encoder's width")
    if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
        raise ValueError(f"context_mask must be (N, L) = {tuple(context.shape[:2])}, True for real tokens, "
                         f"got shape {tuple(context_mask.shape)}")
    return H // p, W // p


class JointStream(nn.Module):
    """One modality's weights in an MM-DiT block: adaLN-Zero modulation, QKV (with optional per-head
    QK RMSNorm), output projection and MLP. A `pre_only` stream (the text stream of the last block) only
    supplies keys and values: its modulation is a shift and scale, and it has no output path."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.num_heads = num_heads
        self.pre_only = pre_only
        self.norm1 = _norm(hidden_size, affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        # The queries of a pre-only stream are computed and dropped: SD3 checkpoints store them.
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = _norm(hidden_size, affine=False)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        _init_linears(self)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        """x (N, T, D), c (N, D) -> q, k, v (N, heads, T, D / heads) and the modulation for `post_attention`."""
        mod = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        N, T, D = x.shape
        qkv = self.qkv(modulate(self.norm1(x), mod[0], mod[1]))
        q, k, v = qkv.reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v, mod

    def post_attention(self, x: Tensor, attn_out: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        """Gated residual updates of x (N, T, D) from its share of the joint attention output (N, T, D)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa.unsqueeze(1) * self.proj(attn_out)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Two streams, one attention: softmax over the keys of both sequences, image tokens first."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, last: bool):
        super().__init__()
        self.x_stream = JointStream(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.context_stream = JointStream(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=last)

    def forward(self, x: Tensor, context: Tensor, c: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x (N, T, D), context (N, L, D), c (N, D), mask (N, 1, 1, T + L) or None -> updated (x, context);
        the context is None after the last block."""
        T = x.shape[1]
        qx, kx, vx, mod_x = self.x_stream.pre_attention(x, c)
        qc, kc, vc, mod_c = self.context_stream.pre_attention(context, c)
        k, v = torch.cat([kx, kc], dim=2), torch.cat([vx, vc], dim=2)  # (N, heads, T + L, D / heads)
        q = qx if self.context_stream.pre_only else torch.cat([qx, qc], dim=2)
        out = attention(q, k, v, mask)
        out = out.transpose(1, 2).flatten(2)  # (N, T [+ L], D)
        x = self.x_stream.post_attention(x, out[:, :T], mod_x)
        if self.context_stream.pre_only:
            return x, None
        return x, self.context_stream.post_attention(context, out[:, T:], mod_c)


class MMDiT(PretrainedMixin, nn.Module):
    """MM-DiT for text-to-image diffusion / flow matching.

    `forward(x, t, context, pooled, context_mask=None)`: x (N, C, H, W) with H and W multiples of the patch
    size (at most `pos_embed_max_size` patches each way), t (N,) timesteps in 0..1000 units (may be
    fractional; the same numbers a diffusers SD3 transformer takes), context (N, L, context_dim) text
    tokens, pooled (N, pooled_dim) pooled text embedding, context_mask (N, L) True for real tokens (padded
    tokens are never attended to). Returns (N, out_channels, H, W), out_channels = 2C when `learn_sigma`.

    Positions: a fixed sin-cos table of pos_embed_max_size^2 entries whose coordinates are stretched so
    that `input_size / patch_size` tokens span it; an input takes the centred crop of its own grid size.
    """

    def __init__(
        self,
        input_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        hidden_size: int = 1536,
        depth: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        pos_embed_max_size: int | None = 192,
        qk_norm: bool = False,
        learn_sigma: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        base = input_size // patch_size
        max_size = base if pos_embed_max_size is None else pos_embed_max_size
        if max_size < base:
            raise ValueError(f"pos_embed_max_size {max_size} is smaller than the {base} patches of input_size")
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, context_dim=context_dim, pooled_dim=pooled_dim,
            pos_embed_max_size=pos_embed_max_size, qk_norm=qk_norm, learn_sigma=learn_sigma,
        )
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        self.pos_embed_max_size = max_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.pooled_embedder = nn.Sequential(
            nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        _init_linears(self.pooled_embedder)
        _init_linears(self.context_embedder)
        table = sincos_2d_stretched(hidden_size, max_size, base_size=base)
        # a fixed function of the config: not saved, rebuilt by the constructor
        self.register_buffer("pos_embed", torch.from_numpy(table).reshape(max_size, max_size, hidden_size),
                             persistent=False)
        self.blocks = nn.ModuleList(
            [MMDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, last=i == depth - 1) for i in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def cropped_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """The centred (h, w) crop of the position table, as (1, h * w, D)."""
        (h, w), M = grid, self.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2
        return self.pos_embed[top:top + h, left:left + w].reshape(1, h * w, -1)

    def null_condition(self, batch_size: int, length: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """The unconditional input for classifier-free guidance: (context (N, L, context_dim) zeros,
        pooled (N, pooled_dim) zeros, context_mask (N, L) all True), on the model's device and dtype.
        Train with it in place of dropped captions, then guide against it."""
        ref = self.context_embedder.weight
        context = ref.new_zeros(batch_size, length, self.context_dim)
        pooled = ref.new_zeros(batch_size, self.pooled_dim)
        return context, pooled, torch.ones(batch_size, length, dtype=torch.bool, device=ref.device)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor,
                context_mask: Tensor | None = None) -> Tensor:
        grid = check_text_conditioned_inputs(self, x, t, context, context_mask)
        if max(grid) > self.pos_embed_max_size:
            raise ValueError(f"x is {tuple(x.shape[-2:])}: {grid} patches, more than the position table's "
                             f"{self.pos_embed_max_size} per side; build the model with a larger pos_embed_max_size")
        if pooled.ndim != 2 or tuple(pooled.shape) != (x.shape[0], self.pooled_dim):
            raise ValueError(f"pooled must be (N={x.shape[0]}, {self.pooled_dim}), got shape {tuple(pooled.shape)}")
        x = self.x_embedder(x) + self.cropped_pos_embed(grid)  # (N, T, D)
        context = self.context_embedder(context)  # (N, L, D)
        c = self.t_embedder(t) + self.pooled_embedder(pooled)  # (N, D)
        mask = None
        if context_mask is not None:
            image_keys = context_mask.new_ones(x.shape[0], x.shape[1], dtype=torch.bool)
            mask = torch.cat([image_keys, context_mask.bool()], dim=1)[:, None, None, :]  # (N, 1, 1, T + L)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, context = checkpoint(block, x, context, c, mask, use_reentrant=False)
            else:
                x, context = block(x, context, c, mask)
        x = self.final_layer(x, c)  # (N, T, p * p * out_channels)
        return unpatchify(x, self.patch_size, self.out_channels, grid)
