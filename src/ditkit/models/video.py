"""Video DiT: one transformer over spacetime patches (the design Sora's report describes).

A clip (N, C, F, H, W) is cut into p_t x p x p tubelets (ViViT), each a token; fixed 3D sin-cos positions
are computed for the actual (F / p_t, H / p, W / p) grid, so a model runs on other frame counts and sizes
than it was built for. The blocks are DiT's adaLN-Zero blocks (timestep + class); only which tokens
attend to which changes with `attention`:

- "full": every block attends over all f * h * w tokens (cost grows with (f h w)^2).
- "factorized": blocks alternate spatial attention (the h * w tokens of one frame) and temporal attention
  (the f tokens at one position), as Latte's first variant; cost (f h w) (h w + f).
- "windowed": local (w_t, w_h, w_w) boxes of tokens, shifted by half a box in every other block so that
  neighbouring boxes exchange information (Swin); cost (f h w) * box size.

Text conditioning (cross-attention) waits for `ditkit.text`; this model is class-conditional.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ditkit.models.dit import DiTBlock, FinalLayer
from ditkit.models.layers import (
    Attention,
    LabelEmbedder,
    TimestepEmbedder,
    rope_3d_tables,
    sincos_3d,
    sincos_image_frame,
    to_2tuple,
)
from ditkit.models.pretrained import PretrainedMixin

ATTENTIONS = ("full", "factorized", "windowed")
POS_EMBEDS = ("sincos3d", "image+frame")
Grid = tuple[int, int, int]


@functools.lru_cache(maxsize=32)
def _positions(hidden_size: int, grid: Grid) -> Tensor:
    return torch.from_numpy(sincos_3d(hidden_size, grid)).unsqueeze(0)  # (1, T, D)


@functools.lru_cache(maxsize=32)
def _rope_table(head_dim: int, grid: Grid) -> Tensor:
    return rope_3d_tables(head_dim, grid)


@functools.lru_cache(maxsize=32)
def _image_frame_positions(hidden_size: int, grid: Grid) -> tuple[Tensor, Tensor]:
    spatial, frame = sincos_image_frame(hidden_size, grid)
    return torch.from_numpy(spatial).unsqueeze(0), torch.from_numpy(frame).unsqueeze(0)  # (1, T, D) each


def _check_video_args(size: tuple[int, int], patch_size: int, patch_t: int, num_frames: int, num_classes: int,
                      hidden_size: int, attention: str, window: tuple[int, ...], pos_embed: str) -> None:
    """One ValueError naming the first bad VideoDiT argument."""
    H, W = size
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}: expected one of {', '.join(ATTENTIONS)}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"unknown pos_embed {pos_embed!r}: expected one of {', '.join(POS_EMBEDS)}")
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be 3 positive sizes (frames, rows, columns) in tokens, got {window}")
    if min(patch_size, patch_t, num_frames) < 1 or H % patch_size or W % patch_size:
        raise ValueError(f"need positive patch sizes and frames, and input_size {(H, W)} divisible by "
                         f"patch_size {patch_size}; got patch_t {patch_t}, num_frames {num_frames}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (use 1 for an unconditional model), got {num_classes}")
    if hidden_size % (16 if pos_embed == "sincos3d" else 4):
        raise ValueError(f"hidden_size must be divisible by {16 if pos_embed == 'sincos3d' else 4} "
                         f"({pos_embed} positions), got {hidden_size}")


# --------------------------------------------------------------------------------------------
# Attention within boxes of the token grid. Full, spatial and temporal attention are the boxes
# (f, h, w), (1, h, w) and (f, 1, 1): one mechanism serves every mode.
# --------------------------------------------------------------------------------------------

def to_windows(x: Tensor, grid: Grid, window: Grid) -> Tensor:
    """(N, f * h * w, D) tokens in (frame, row, column) order -> (N * boxes, a * b * c, D), one row per
    (a, b, c) box; the grid must be divisible by the box."""
    (f, h, w), (a, b, c) = grid, window
    N, _, D = x.shape
    x = x.reshape(N, f // a, a, h // b, b, w // c, c, D).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, a * b * c, D)


def from_windows(x: Tensor, grid: Grid, window: Grid) -> Tensor:
    """The inverse of `to_windows`: (N * boxes, a * b * c, D) -> (N, f * h * w, D)."""
    (f, h, w), (a, b, c) = grid, window
    D = x.shape[-1]
    x = x.reshape(-1, f // a, h // b, w // c, a, b, c, D).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, f * h * w, D)


def window_attention(attn: Attention, x: Tensor, grid: Grid, window: Grid, shift: Grid = (0, 0, 0),
                     rope: Tensor | None = None) -> Tensor:
    """`attn` applied within each `window` box of the token grid, after rolling the grid by -`shift`
    (cyclically, without Swin's mask: a wrapped box joins tokens from opposite edges, which the position
    embedding tells apart). `rope`: the grid's 3D RoPE table (T, 2 * head_dim), arranged as the tokens are."""
    if window == grid:
        return attn(x, rope=rope)
    N, T, D = x.shape
    dims = (1, 2, 3)
    if any(shift):
        x = x.reshape(N, *grid, D).roll([-s for s in shift], dims=dims).reshape(N, T, D)
    if rope is not None:  # each box's tokens keep their own positions: the table takes the tokens' path
        table = rope.unsqueeze(0)
        if any(shift):
            table = table.reshape(1, *grid, -1).roll([-s for s in shift], dims=dims).reshape(1, T, -1)
        rope = to_windows(table, grid, window).repeat(N, 1, 1)
    x = from_windows(attn(to_windows(x, grid, window), rope=rope), grid, window)
    if any(shift):
        x = x.reshape(N, *grid, D).roll(list(shift), dims=dims).reshape(N, T, D)
    return x


def per_token(m: Tensor, tokens: int) -> Tensor:
    """A modulation for `tokens` tokens in (frame, row, column) order: (N, D) -> (N, 1, D), shared by all of
    a clip's tokens; per frame group (N, f, D) -> (N, tokens, D), each group's row on its own tokens."""
    if m.ndim == 2:
        return m.unsqueeze(1)
    N, f, D = m.shape
    return m.unsqueeze(2).expand(N, f, tokens // f, D).reshape(N, tokens, D)


class SpaceTimeBlock(DiTBlock):
    """DiT's adaLN-Zero block whose self-attention runs within boxes of the spacetime token grid.
    The modulation and MLP act per token, so they are unchanged (and so are the parameter names); the
    condition c is one (N, D) row per clip or one (N, f, D) row per frame group of tokens (per-frame times)."""

    def forward(self, x: Tensor, c: Tensor, grid: Grid, window: Grid, shift: Grid,
                rope: Tensor | None = None) -> Tensor:  # x (N, T, D)
        mods = (per_token(m, x.shape[1]) for m in self.adaLN_modulation(c).chunk(6, dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = self.norm1(x) * (1 + scale_msa) + shift_msa  # modulate(), with the modulation per token
        x = x + gate_msa * window_attention(self.attn, h, grid, window, shift, rope)
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


class TubeletEmbed(nn.Module):
    """Spacetime patchify: (N, C, F, H, W) -> (N, T, D), T = (F / p_t)(H / p)(W / p), one linear map per
    p_t x p x p tubelet, tokens in (frame, row, column) order."""

    def __init__(self, patch_t: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        kernel = (patch_t, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel, bias=True)
        # A conv with stride = kernel is a linear layer on flattened tubelets: initialise it as one.
        nn.init.xavier_uniform_(self.proj.weight.view(hidden_size, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VideoDiT(PretrainedMixin, nn.Module):
    """Diffusion Transformer over video, class-conditional.

    `forward(x, t, y)`: x (N, C, F, H, W) noisy clips, t (N,) timesteps (0..1000 units) or (N, F), one per
    frame, y (N,) labels in 0..num_classes-1 (num_classes = null label, when label dropout is enabled). A
    per-frame t conditions on given frames (Wan 2.2's TI2V): a frame given clean has t = 0, and its tokens say
    so through their own adaLN modulation (one condition per frame group of tokens); the frames of one
    tubelet share a time, so given frames fill whole tubelets (the first patch_t frames, not the first alone).
    A t whose frames all hold their clip's time computes exactly what that (N,) t does. Returns
    (N, out_channels, F, H, W). `input_size` and `num_frames` are the training shape (what sampling
    draws by default); any F >= 1 and any H, W divisible by `patch_size` are accepted. F = 1 is an image,
    so images and clips can be trained together; frames are padded to a multiple of `patch_t` by
    repeating the last one, and the output is cut back to F.
    `window`: the (frames, rows, columns) box of tokens of "windowed" attention, clipped to the grid.
    `pos_embed`: "sincos3d" (fixed; 3/4 of the channels the 2D code of (row, column), 1/4 the frame's) or
    "image+frame" (the image DiT's 2D table on every frame, plus the frame's 1D code times `frame_gate`, a
    learned per-channel weight that starts at zero: a model inflated from an image DiT, `ditkit.models.inflate`,
    then starts as that image model applied frame by frame).
    `rope`: also rotate every attention's queries and keys by their token's (frame, row, column) (3D RoPE, as
    Wan and HunyuanVideo do; `models.layers.rope_3d_tables`), so attention scores depend on the offset between
    tokens: what a digit looks like, and how far it moves in a frame, is learnt once for every place.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        num_frames: int = 8,
        patch_size: int = 2,
        patch_t: int = 1,
        in_channels: int = 1,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 10,
        learn_sigma: bool = False,
        attention: str = "full",
        window: tuple[int, int, int] | list[int] = (2, 4, 4),
        pos_embed: str = "sincos3d",
        rope: bool = False,
    ):
        super().__init__()
        H, W = to_2tuple(input_size)
        window = tuple(int(s) for s in window)
        _check_video_args((H, W), patch_size, patch_t, num_frames, num_classes, hidden_size, attention, window,
                          pos_embed)
        self.config = dict(
            input_size=input_size if isinstance(input_size, int) else [H, W], num_frames=num_frames,
            patch_size=patch_size, patch_t=patch_t, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, attention=attention, window=list(window),
        )
        if pos_embed != "sincos3d":  # listed only when set, so the default's config.json stays as it is
            self.config["pos_embed"] = pos_embed
        if rope:
            self.config["rope"] = True
        self.rope = rope
        self.pos_embed = pos_embed
        self.input_size = (H, W)
        self.num_frames = num_frames
        self.patch_size, self.patch_t = patch_size, patch_t
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.attention = attention
        self.window = window
        self.grad_checkpointing = False

        self.x_embedder = TubeletEmbed(patch_t, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList([SpaceTimeBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        # a p x p decoder with p_t * C channels is a p_t x p x p tubelet decoder (see `unpatchify`)
        self.final_layer = FinalLayer(hidden_size, patch_size, patch_t * self.out_channels)
        self.frame_gate = nn.Parameter(torch.zeros(hidden_size)) if pos_embed == "image+frame" else None

    def positions(self, grid: Grid, device: torch.device) -> Tensor:
        """(1, f * h * w, D) positions of the token grid `grid` (see `pos_embed`)."""
        dtype = self.x_embedder.proj.weight.dtype
        if self.frame_gate is None:
            return _positions(self.hidden_size, grid).to(device=device, dtype=dtype)
        spatial, frame = (p.to(device=device, dtype=dtype) for p in _image_frame_positions(self.hidden_size, grid))
        return spatial + frame * self.frame_gate.to(dtype)

    # ----------------------------------------------------------------------------------------
    def block_window(self, i: int, grid: Grid) -> tuple[Grid, Grid]:
        """The token box block `i` attends within on `grid`, and its cyclic shift."""
        f, h, w = grid
        if self.attention == "full":
            return grid, (0, 0, 0)
        if self.attention == "factorized":
            return ((1, h, w) if i % 2 == 0 else (f, 1, 1)), (0, 0, 0)
        box = tuple(min(b, g) for b, g in zip(self.window, grid))
        # shift odd blocks by half a box along every axis that has more than one box
        shift = tuple(b // 2 if i % 2 and g > b else 0 for b, g in zip(box, grid))
        return box, shift  # type: ignore[return-value]

    def unpatchify(self, x: Tensor, grid: Grid) -> Tensor:
        """(N, T, p * p * p_t * C) -> (N, C, f * p_t, h * p, w * p)."""
        f, h, w = grid
        p, pt, C = self.patch_size, self.patch_t, self.out_channels
        x = x.reshape(x.shape[0], f, h, w, pt, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], C, f * pt, h * p, w * p)

    def check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        """Raise ValueError naming what was expected when x, t or y do not fit this model."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be clips (N, {self.in_channels}, F, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"frames of {H}x{W} are not divisible by patch size {self.patch_size}")
        if self.attention == "windowed":
            grid = (-(-x.shape[2] // self.patch_t), H // self.patch_size, W // self.patch_size)
            box = tuple(min(b, g) for b, g in zip(self.window, grid))
            if any(g % b for g, b in zip(grid, box)):
                raise ValueError(f"the token grid {grid} (frames, rows, columns) is not divisible by the "
                                 f"attention window {box}: choose frames and sizes that are, or another window")
        N, F = x.shape[0], x.shape[2]
        if t.shape not in ((N,), (N, F)) or y.shape != (N,):
            raise ValueError(f"t must be ({N},) (one time per clip) or ({N}, {F}) (one per frame) and y ({N},), "
                             f"got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        top = self.num_classes if self.y_embedder.dropout_prob > 0 else self.num_classes - 1
        if N and y.device.type != "meta" and not torch.compiler.is_compiling():
            if int(y.min()) < 0 or int(y.max()) > top:
                raise ValueError(f"labels must be in 0..{top} ({self.num_classes} is the null label when "
                                 f"class_dropout_prob > 0); got values in {int(y.min())}..{int(y.max())}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """`force_drop_ids` (N,), 1 where the label is replaced by the null label (see DiT.forward)."""
        self.check_inputs(x, t, y)
        frames = x.shape[2]
        pad = -frames % self.patch_t
        if pad:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        grid = (x.shape[2] // self.patch_t, x.shape[3] // self.patch_size, x.shape[4] // self.patch_size)
        pos = self.positions(grid, x.device)
        x = self.x_embedder(x) + pos  # (N, T, D), T = f * h * w
        rope = _rope_table(self.blocks[0].attn.head_dim, grid).to(x.device) if self.rope else None
        t = self.group_times(t, frames)
        label = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        if t.ndim == 1:
            c = self.t_embedder(t) + label  # (N, D)
        else:  # one condition per frame group, (N, f, D)
            c = self.t_embedder(t.flatten()).unflatten(0, t.shape) + label.unsqueeze(1)
        for i, block in enumerate(self.blocks):
            window, shift = self.block_window(i, grid)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, grid, window, shift, rope, use_reentrant=False)
            else:
                x = block(x, c, grid, window, shift, rope)
        x = self.final(x, c)  # (N, T, p * p * p_t * out_channels)
        return self.unpatchify(x, grid)[:, :, :frames]

    def group_times(self, t: Tensor, frames: int) -> Tensor:
        """The time of each frame group of tokens: (N,) as given; a per-frame t (N, F) -> (N, f), one time per
        tubelet (its frames must agree: given frames fill whole tubelets), or (N,) when every frame of each clip
        has its clip's time, so that such a t runs the per-clip path exactly."""
        if t.ndim == 1:
            return t
        pad = -frames % self.patch_t
        if pad:
            t = torch.cat([t, t[:, -1:].expand(-1, pad)], dim=1)
        groups = t.reshape(t.shape[0], -1, self.patch_t)
        if torch.compiler.is_compiling() or t.device.type == "meta":
            return groups[:, :, 0]
        if not torch.equal(groups, groups[:, :, :1].expand_as(groups)):
            raise ValueError(f"a tubelet of patch_t={self.patch_t} frames has one time: per-frame times must be "
                             f"equal within each group of {self.patch_t} frames (give whole tubelets clean)")
        if torch.equal(groups, groups[:, :1, :1].expand_as(groups)):
            return t[:, 0].contiguous()
        return groups[:, :, 0]

    def final(self, x: Tensor, c: Tensor) -> Tensor:
        """The final layer, its adaLN modulation per clip (c (N, D)) or per frame group (c (N, f, D))."""
        layer = self.final_layer
        if c.ndim == 2:
            return layer(x, c)
        shift, scale = (per_token(m, x.shape[1]) for m in layer.adaLN_modulation(c).chunk(2, dim=-1))
        return layer.linear(layer.norm_final(x) * (1 + scale) + shift)


class GivenFrames(nn.Module):
    """A VideoDiT whose clips' first k frames are given: every call puts `frames` (n, C, k, H, W) in place of
    those frames of its input and calls the model at time 0 on them (per-frame t), whatever the sampler's
    state holds there. A batch of m * n clips (e.g. CFG's doubled batch) takes the n given clips m times over.
    k must fill whole tubelets of the model's patch_t frames."""

    def __init__(self, model: nn.Module, frames: Tensor):
        super().__init__()
        if frames.ndim != 5 or frames.shape[1] != model.in_channels:
            raise ValueError(f"given frames must be clips (n, {model.in_channels}, k, H, W), got shape "
                             f"{tuple(frames.shape)}")
        if frames.shape[2] % model.patch_t:
            raise ValueError(f"{frames.shape[2]} given frame(s) with patch_t={model.patch_t}: a tubelet of "
                             f"{model.patch_t} frames has one time, so give a multiple of {model.patch_t} frames")
        self.model, self.frames = model, frames

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        n, k = self.frames.shape[0], self.frames.shape[2]
        if x.shape[0] % n or x.shape[2] <= k:
            raise ValueError(f"{n} clip(s) of {k} given frame(s) do not fit a batch of shape {tuple(x.shape)}")
        given = self.frames.to(x).repeat(x.shape[0] // n, 1, 1, 1, 1)
        x = torch.cat([given, x[:, :, k:]], dim=2)
        t = torch.cat([torch.zeros_like(t)[:, None].expand(-1, k), t[:, None].expand(-1, x.shape[2] - k)], dim=1)
        return self.model(x, t, *args, **kwargs)
