"""Building blocks shared by ditkit's transformers: patch embedding, fixed sin-cos positions,
timestep and label embedders, attention, MLP and adaLN modulation.

Parameter names follow the original DiT so its checkpoints load unchanged
(`proj`, `mlp.0`/`mlp.2`, `embedding_table`, `qkv`, `fc1`/`fc2`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`32 -> (32, 32)`; `(16, 24) -> (16, 24)`."""
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"expected an int or an (H, W) pair, got {size!r}")
    return size  # type: ignore[return-value]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with per-sample (N, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Fixed sin-cos positions (Vaswani et al.; 2D as in MAE/DiT: first half of the channels encodes the
# column coordinate, second half the row coordinate; tokens in row-major order).
# --------------------------------------------------------------------------------------------

def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) as [sin(pos * w), cos(pos * w)], w = 10000^(-2i/embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """Positions for an (h, w) token grid -> (h * w, embed_dim) float32, row-major tokens."""
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    h, w = to_2tuple(grid_size)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def sincos_2d_stretched(embed_dim: int, grid_size: int | tuple[int, int], base_size: int,
                        scale: float = 1.0) -> np.ndarray:
    """`sincos_2d` with each axis's coordinates stretched to span a `base_size` grid: index i of an
    n-token axis sits at i * base_size / n / scale (PixArt and SD3 position any resolution this way,
    so a grid of the training size gets integer positions / scale)."""
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    h, w = to_2tuple(grid_size)
    # float32 in this order, as the published implementations compute them
    row_pos = np.arange(h, dtype=np.float32) / np.float32(h / base_size) / np.float32(scale)
    col_pos = np.arange(w, dtype=np.float32) / np.float32(w / base_size) / np.float32(scale)
    rows, cols = np.meshgrid(row_pos, col_pos, indexing="ij")
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def sincos_3d(embed_dim: int, grid_size: tuple[int, int, int]) -> np.ndarray:
    """Positions for an (f, h, w) spacetime token grid -> (f * h * w, embed_dim) float32, tokens in
    (frame, row, column) order: 3/4 of the channels are the 2D embedding of (row, column), 1/4 the 1D
    embedding of the frame, so every frame of a clip carries the image model's spatial code."""
    if embed_dim % 16:
        raise ValueError(f"3D sin-cos embedding needs a dimension divisible by 16, got {embed_dim}")
    f, h, w = (int(s) for s in grid_size)
    spatial = sincos_2d(embed_dim // 4 * 3, (h, w))  # (h * w, 3D/4)
    temporal = sincos_1d(embed_dim // 4, np.arange(f, dtype=np.float32)).astype(np.float32)  # (f, D/4)
    emb = np.concatenate([np.tile(spatial, (f, 1)), np.repeat(temporal, h * w, axis=0)], axis=1)
    return emb


def sincos_image_frame(embed_dim: int, grid_size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Positions for an (f, h, w) spacetime token grid as an image model places each frame: (spatial, frame),
    each (f * h * w, embed_dim) float32 in (frame, row, column) order. `spatial` is the image DiT's 2D table
    (`sincos_2d` over all channels) on every frame; `frame` the 1D code of the frame index over all channels,
    to be added with a learned weight (so a model started from an image DiT can begin with it at zero)."""
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    f, h, w = (int(s) for s in grid_size)
    spatial = np.tile(sincos_2d(embed_dim, (h, w)), (f, 1))
    frame = sincos_1d(embed_dim, np.arange(f, dtype=np.float32)).astype(np.float32)  # (f, D)
    return spatial, np.repeat(frame, h * w, axis=0)


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Patchify: (N, C, H, W) -> (N, T, D), T = (H / p) * (W / p), one linear map per p x p patch."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)
        # A conv with stride = kernel is a linear layer on flattened patches: initialise it as one.
        nn.init.xavier_uniform_(self.proj.weight.view(hidden_size, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of PatchEmbed's token layout: (N, h * w, p * p * C) -> (N, C, h * p, w * p)."""
    (h, w), p = grid, patch_size
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, channels))
    return x.reshape(x.shape[0], channels, h * p, w * p)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): sinusoidal frequencies, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """(N,) possibly fractional timesteps -> (N, dim) as [cos(t * f), sin(t * f)], f = max_period^(-i/half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        weight = self.mlp[0].weight  # a method on a quantized Linear, which takes float32 input
        return self.mlp(t_freq.to(weight.dtype) if isinstance(weight, Tensor) else t_freq)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row `num_classes` is the null label used for classifier-free guidance;
    it exists only when label dropout is enabled (as in the original), and training drops labels to it."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replace labels by the null label with probability `dropout_prob` (or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Transformer layers
# --------------------------------------------------------------------------------------------

def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (N, heads, T, d) tensors; `mask` True where attention is allowed.

    PyTorch's SDPA everywhere except bf16/fp16 on the CPU, where its kernels' forward and backward are several
    times slower than two matmuls and a softmax for DiT-sized heads (benchmarks/train_throughput.py, the attention
    table). The softmax runs in the scores' dtype: the CPU kernel computes in float32 and rounds its output once
    (the forward values of a float32 softmax rounded to bf16; the backward within bf16 rounding of it), without
    casting the (N, heads, T, T) scores to float32 and back in each direction."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# --------------------------------------------------------------------------------------------
# 2D rotary position embedding (RoPE; Su et al. 2021, axial 2D form as in LightningDiT / FiT): the first
# half of each head's channels is rotated by the token's column, the second half by its row, so q . k
# depends on the two tokens' offset only.
# --------------------------------------------------------------------------------------------

def rope_2d_tables(head_dim: int, grid_size: int | tuple[int, int], theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (h * w, head_dim) float32 for row-major tokens of an (h, w) grid. Each half of the
    channels is [a1, a2] with pairs (a1_j, a2_j) turned by pos * w_j, w_j = theta^(-2j / (head_dim / 2))."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    h, w = to_2tuple(grid_size)
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half / 2,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    col_angles = cols.reshape(-1, 1) * freqs  # (T, half / 2)
    row_angles = rows.reshape(-1, 1) * freqs
    angles = torch.cat([col_angles, col_angles, row_angles, row_angles], dim=1)  # (T, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope_2d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (..., T, head_dim) queries or keys by `rope_2d_tables`; when T exceeds the table (extra
    conditioning tokens in front), the leading T - len(cos) tokens are left as they are."""
    extra = x.shape[-2] - cos.shape[0]
    if extra < 0:
        raise ValueError(f"RoPE table covers {cos.shape[0]} tokens, got {x.shape[-2]}")
    head, x_grid = x[..., :extra, :], x[..., extra:, :]
    a1, a2, b1, b2 = x_grid.chunk(4, dim=-1)
    rotated = torch.cat([-a2, a1, -b2, b1], dim=-1)
    out = (x_grid * cos + rotated * sin).to(x.dtype)
    return torch.cat([head, out], dim=-2) if extra else out


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (frames, rows, columns) of 3D RoPE: each axis an even share, the spatial axes equal,
    the frames the rest (Wan's split: 2 * (d // 6) each for rows and columns)."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def rope_3d_tables(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0) -> Tensor:
    """(f * h * w, 2 * head_dim) float32 [cos | sin] for tokens in (frame, row, column) order: the channels of
    each axis (`rope_axes`) are pairs (x_j, x_j + half) turned by position * theta^(-2j / channels)."""
    if head_dim % 2 or min(rope_axes(head_dim)) < 2:
        raise ValueError(f"3D RoPE needs an even head dimension of at least 6, got {head_dim}")
    positions = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    angles = []
    for size, pos in zip(rope_axes(head_dim), positions):
        freqs = theta ** (-torch.arange(0, size, 2, dtype=torch.float64) / size)  # (size / 2,)
        a = pos.reshape(-1, 1) * freqs
        angles.append(torch.cat([a, a], dim=1))
    angles = torch.cat(angles, dim=1)  # (T, head_dim)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def apply_rope_3d(x: Tensor, table: Tensor) -> Tensor:
    """Rotate (N, heads, T, head_dim) queries or keys by a `rope_3d_tables` table (T, 2 * head_dim), or one per
    clip or window (N, T, 2 * head_dim)."""
    cos, sin = table.to(x.dtype).chunk(2, dim=-1)
    if cos.ndim == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    parts = x.split(list(rope_axes(x.shape[-1])), dim=-1)
    rotated = torch.cat([torch.cat([-p[..., p.shape[-1] // 2:], p[..., : p.shape[-1] // 2]], dim=-1)
                         for p in parts], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by PyTorch's SDPA
    (flash / memory-efficient kernels where the device has them; see `attention`).

    Options (off by default, which is the original DiT): qk_norm, an RMSNorm with a learned gain on each
    head's queries and keys (`q_norm`, `k_norm`); rope_grid, the (h, w) token grid of 2D rotary positions
    applied to queries and keys (tables are buffers, not saved)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 rope_grid: tuple[int, int] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.rope = rope_grid is not None
        if self.rope:
            cos, sin = rope_2d_tables(head_dim, rope_grid)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """`rope`: a 3D RoPE table for these tokens (`rope_3d_tables`; the VideoDiT passes one per layout)."""
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope_2d(q, self.rope_cos, self.rope_sin), apply_rope_2d(k, self.rope_cos, self.rope_sin)
        if rope is not None:
            q, k = apply_rope_3d(q, rope), apply_rope_3d(k, rope)
        x = attention(q.to(v.dtype), k.to(v.dtype), v)  # (N, heads, T, D / heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x (N, T, D) to a context (N, L, D), via SDPA."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """`mask` (N, L) bool, True where the context token is real; padded tokens get no attention."""
        N, T, D = x.shape
        L, H = context.shape[1], self.num_heads
        q = self.q(x).reshape(N, T, H, D // H).transpose(1, 2)
        k, v = self.kv(context).reshape(N, L, 2, H, D // H).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()
        x = attention(q, k, v, attn_mask)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU (tanh approximation, as DiT) -> Linear. `approximate="none"`
    is the exact (erf) GELU: the same function within 1e-3, and on a CPU in bf16 a training step of the demo
    model is about 1.1x faster with it (benchmarks/train_throughput.py)."""

    def __init__(self, dim: int, hidden_dim: int, approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020, as LLaMA and LightningDiT use it): w3(silu(x W1) * (x W2)), W1 and
    W2 fused as `w12`. The hidden width is 2/3 of the plain MLP's (rounded up to a multiple of 8), which
    keeps the parameter count about equal."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        hidden = -(-int(2 * hidden_dim / 3) // 8) * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight over the last dimension.
    Applied to each head's queries and keys ("QK-norm"), it bounds the attention logits, which keeps
    large text-to-image transformers stable in mixed precision (SD3, section 5.3.2). `affine=False`
    (a norm that adaLN modulates) has no weight."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # the mean of squares in float32 even under bf16 autocast
        out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return out if self.weight is None else out * self.weight
