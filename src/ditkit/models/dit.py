"""DiT: "Scalable Diffusion Models with Transformers" (Peebles & Xie, ICCV 2023).

Patchify -> transformer blocks conditioned on timestep + class -> final layer -> unpatchify.
State-dict keys match the original implementation, so its released checkpoints load unchanged.
The four conditioning designs of the paper's Figure 3 are selected by `block=`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ditkit.models.layers import (
    Attention,
    CrossAttention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    modulate,
    sincos_2d,
    to_2tuple,
)
from ditkit.models.pretrained import PretrainedMixin

BLOCKS = ("adaln_zero", "adaln", "cross_attn", "in_context")
# The modern-recipe options (LightningDiT, Yao et al. 2025); the first of each is the paper's DiT.
MLPS = ("gelu", "gelu_erf", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POS_EMBEDS = ("sincos", "rope", "sincos+rope")
RECIPE_DEFAULTS = dict(mlp="gelu", norm="layernorm", qk_norm=False, pos_embed="sincos")
GUIDANCE_EMBED_SCALE = 10.0  # the guidance embedder reads (w - 1) x this: w in [1, 4] spans 0..30


def _norm(hidden_size: int, affine: bool, kind: str = "layernorm") -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(hidden_size, eps=1e-6, affine=affine)
    return nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)


def _zero_output_embedder(hidden_size: int) -> TimestepEmbedder:
    """A timestep embedder whose output layer starts at zero: an added input that changes nothing until trained."""
    embedder = TimestepEmbedder(hidden_size)
    nn.init.zeros_(embedder.mlp[2].weight)
    return embedder


def _check_guidance_range(guidance_range: tuple[float, float] | None) -> tuple[float, float] | None:
    if guidance_range is None:
        return None
    if len(guidance_range) != 2 or not 1.0 <= guidance_range[0] <= guidance_range[1]:
        raise ValueError(f"guidance_range must be (lo, hi) with 1 <= lo <= hi, got {guidance_range}")
    return float(guidance_range[0]), float(guidance_range[1])


def check_recipe(mlp: str, norm: str, pos_embed: str) -> None:
    for value, name, allowed in ((mlp, "mlp", MLPS), (norm, "norm", NORMS), (pos_embed, "pos_embed", POS_EMBEDS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")


def _init_linears(module: nn.Module) -> None:
    """The transformer default: xavier-uniform weights, zero biases, for every Linear inside `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TransformerBlock(nn.Module):
    """The pre-norm parts every design shares: LayerNorm -> self-attention, LayerNorm -> MLP. The norms
    carry their own affine parameters only when nothing else modulates them."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, affine: bool, *, mlp: str = "gelu",
                 norm: str = "layernorm", qk_norm: bool = False, rope_grid: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = _norm(hidden_size, affine, norm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, rope_grid=rope_grid)
        self.norm2 = _norm(hidden_size, affine, norm)
        hidden = int(hidden_size * mlp_ratio)
        if mlp == "swiglu":
            self.mlp = SwiGLU(hidden_size, hidden)
        else:
            self.mlp = Mlp(hidden_size, hidden, approximate="none" if mlp == "gelu_erf" else "tanh")


class DiTBlock(TransformerBlock):
    """adaLN-Zero block: shift, scale and a gate for each residual branch, regressed from c = t + y;
    the regression is zero-initialised so every block starts as the identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **options):
        super().__init__(hidden_size, num_heads, mlp_ratio, affine=False, **options)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        _init_linears(self)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x (N, T, D), c (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class AdaLNBlock(TransformerBlock):
    """adaLN block (paper's Fig. 3, without "-Zero"): shift and scale regressed from c = t + y,
    no gates, ordinary initialisation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **options):
        super().__init__(hidden_size, num_heads, mlp_ratio, affine=False, **options)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size))
        _init_linears(self)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x (N, T, D), c (N, D)
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class CrossAttentionBlock(TransformerBlock):
    """Standard pre-LN ViT block with a cross-attention layer after self-attention; the image tokens
    attend to the length-2 sequence [t, y] (paper's Fig. 3, "Cross-Attention")."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **options):
        super().__init__(hidden_size, num_heads, mlp_ratio, affine=True, **options)
        self.norm_cross = _norm(hidden_size, True, options.get("norm", "layernorm"))
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        _init_linears(self)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x (N, T, D), c (N, 2, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), c)
        x = x + self.mlp(self.norm2(x))
        return x


class InContextBlock(TransformerBlock):
    """Standard pre-LN ViT block, unmodified: t and y enter as two extra tokens of the sequence
    (paper's Fig. 3, "In-Context Conditioning")."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **options):
        super().__init__(hidden_size, num_heads, mlp_ratio, affine=True, **options)
        _init_linears(self)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:  # x (N, 2 + T, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


_BLOCK_CLASSES = {
    "adaln_zero": DiTBlock,
    "adaln": AdaLNBlock,
    "cross_attn": CrossAttentionBlock,
    "in_context": InContextBlock,
}


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear decoder to p * p * out_channels values per token;
    zero-initialised so the untrained model predicts zero."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = _norm(hidden_size, False, norm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _check_dit_args(input_size: int | tuple[int, int], patch_size: int, num_classes: int, block: str, mlp: str,
                    norm: str, pos_embed: str) -> tuple[int, int]:
    """The checked (H, W) of a DiT's arguments; one ValueError naming the first bad one."""
    if block not in _BLOCK_CLASSES:
        raise ValueError(f"unknown block {block!r}: expected one of {', '.join(BLOCKS)}")
    check_recipe(mlp, norm, pos_embed)
    H, W = to_2tuple(input_size)
    if H % patch_size or W % patch_size:
        raise ValueError(f"input_size {(H, W)} is not divisible by patch_size {patch_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (use 1 for an unconditional model), got {num_classes}")
    return H, W


class DiT(PretrainedMixin, nn.Module):
    """Diffusion Transformer, class-conditional.

    `forward(x, t, y)`: x (N, C, H, W) noisy input, t (N,) timesteps (0..1000 units, may be fractional),
    y (N,) class labels in 0..num_classes-1 (num_classes = null label, when label dropout is enabled).
    Returns (N, out_channels, H, W): the prediction, followed by C variance channels when `learn_sigma`.

    Modern-recipe options, each off by default (the paper's model, keys and outputs unchanged):
    mlp "swiglu" (gated feed-forward) or "gelu_erf" (the exact GELU: faster than the paper's tanh form on a
    CPU in bf16), norm "rmsnorm" (RMSNorm in blocks and final layer), qk_norm (RMSNorm
    on queries and keys), pos_embed "rope" (2D rotary positions instead of the sin-cos table) or
    "sincos+rope" (both). Non-default options are recorded in `config`, so `from_pretrained` rebuilds them.

    guidance_range (lo, hi): a guidance-scale embedder (a timestep embedder reading (w - 1) x
    GUIDANCE_EMBED_SCALE, zero-initialised output, added to the time embedding), so one model is told the
    CFG scale w it should produce (`forward(..., guidance=w)`; iMF's guidance conditioning), trained on
    scales in [lo, hi]. Absent by default: the paper's keys unchanged.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block: str = "adaln_zero",
        interval_embed: bool = False,
        interval_scale: float = 1.0,
        mlp: str = "gelu",
        norm: str = "layernorm",
        qk_norm: bool = False,
        pos_embed: str = "sincos",
        guidance_range: tuple[float, float] | None = None,
    ):
        super().__init__()
        H, W = _check_dit_args(input_size, patch_size, num_classes, block, mlp, norm, pos_embed)
        self.recipe = dict(mlp=mlp, norm=norm, qk_norm=qk_norm, pos_embed=pos_embed)
        self.config = dict(
            input_size=input_size if isinstance(input_size, int) else [H, W],
            patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, block=block,
        )
        # options are listed only when they differ from the paper's, so the paper's config.json stays as it is
        self.config.update({k: v for k, v in self.recipe.items() if v != RECIPE_DEFAULTS[k]})
        if interval_embed:
            self.config["interval_embed"] = True
            if interval_scale != 1.0:
                self.config["interval_scale"] = interval_scale
        self.guidance_range = _check_guidance_range(guidance_range)
        self.config.update({"guidance_range": list(self.guidance_range)} if self.guidance_range else {})
        self.interval_scale, self.input_size, self.patch_size = interval_scale, (H, W), patch_size
        self.in_channels, self.out_channels = in_channels, in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes, self.block = learn_sigma, num_classes, block
        self.grid_size = (H // patch_size, W // patch_size)
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # a second timestep embedder for the interval t - r of two-time (MeanFlow) models; its output layer
        # starts at zero so that a flow-matching checkpoint (the r = t case) loads unchanged
        self.interval_embedder = _zero_output_embedder(hidden_size) if interval_embed else None
        self._init_pos_embed(hidden_size, pos_embed)
        self.block_options = dict(mlp=mlp, norm=norm, qk_norm=qk_norm,
                                  rope_grid=self.grid_size if "rope" in pos_embed else None)
        self.blocks = nn.ModuleList(
            [_BLOCK_CLASSES[block](hidden_size, num_heads, mlp_ratio, **self.block_options) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm)
        # built last, so the other weights draw the same initial values with or without it; its output layer
        # starts at zero, so a fresh model is the unguided one at every scale
        self.guidance_embedder = _zero_output_embedder(hidden_size) if guidance_range is not None else None

    def _init_pos_embed(self, hidden_size: int, pos_embed: str) -> None:
        """The fixed 2D sin-cos table: a Parameter (not a buffer) because the original checkpoints store it.
        With RoPE alone the table stays (zeros, so checkpoints keep one layout) and is not added."""
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.add_pos_embed = pos_embed != "rope"
        if self.add_pos_embed:
            self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(hidden_size, self.grid_size)).unsqueeze(0))

    # ----------------------------------------------------------------------------------------
    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p * p * C) -> (N, C, H, W)."""
        p, C = self.patch_size, self.out_channels
        h, w = self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], C, h * p, w * p)

    def check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        """Raise ValueError naming what was expected when x, t or y do not fit this model."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_size:
            H, W = x.shape[-2:]
            p = self.patch_size
            why = f" (and {H}x{W} is not divisible by patch size {p})" if H % p or W % p else ""
            raise ValueError(f"x is {H}x{W} but this model was built for input_size {self.input_size}{why}")
        N = x.shape[0]
        if t.ndim != 1 or t.shape[0] != N:
            raise ValueError(f"t must be a 1-D tensor of {N} timesteps (one per sample), got shape {tuple(t.shape)}")
        if y.ndim != 1 or y.shape[0] != N:
            raise ValueError(f"y must be a 1-D tensor of {N} labels (one per sample), got shape {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if N and y.device.type != "meta" and not torch.compiler.is_compiling():
            top = self.num_classes if self.y_embedder.dropout_prob > 0 else self.num_classes - 1
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi > top:
                null = (f"; {self.num_classes} is the null label" if top == self.num_classes
                        else "; this model has no null label (class_dropout_prob = 0)")
                raise ValueError(f"labels must be in 0..{top}{null}; got values in {lo}..{hi}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None,
                interval: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        """`force_drop_ids` (N,), 1 where the label is replaced by the null label: lets a trainer draw label
        dropout from its own seeded generator instead of the global RNG. `interval` (N,): t - r of a
        two-time model (built with interval_embed=True), in t's units. `guidance` (N,): the CFG scale w of a
        model built with guidance_range (None: w = 1)."""
        self.check_inputs(x, t, y)
        x = self.embed_tokens(x)  # (N, T, D)
        t_emb = self.embed_time(t, interval, guidance)  # (N, D)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t_emb + y_emb
        if self.block == "in_context":
            x = torch.cat([t_emb.unsqueeze(1), y_emb.unsqueeze(1), x], dim=1)  # (N, 2 + T, D)
            block_cond = None
        elif self.block == "cross_attn":
            block_cond = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
        else:
            block_cond = c
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, block_cond, use_reentrant=False)
            else:
                x = block(x, block_cond)
        if self.block == "in_context":
            x = x[:, 2:]
        x = self.final_layer(x, c)  # (N, T, p * p * out_channels)
        return self.unpatchify(x)

    def embed_tokens(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, T, D) patch tokens, with the sin-cos positions unless RoPE alone places them."""
        x = self.x_embedder(x)
        return x + self.pos_embed if self.add_pos_embed else x

    def embed_time(self, t: Tensor, interval: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        """(N, D) embedding of t, plus that of the interval t - r for a two-time model and that of the guidance
        scale for a model built with guidance_range."""
        t_emb = self.t_embedder(t)
        if self.guidance_embedder is not None:
            w = torch.ones_like(t) if guidance is None else guidance.to(t.device)
            t_emb = t_emb + self.guidance_embedder((w - 1.0) * GUIDANCE_EMBED_SCALE)
        elif guidance is not None:
            raise ValueError("this DiT has no guidance-scale input: build it with guidance_range=(lo, hi) to pass "
                             "guidance=")
        if interval is None:
            return t_emb
        if self.interval_embedder is None:
            raise ValueError("this DiT takes one time: build it with interval_embed=True to pass interval=")
        return t_emb + self.interval_embedder(interval * self.interval_scale)

    def forward_with_cfg(
        self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, guided_channels: int | None = None
    ) -> Tensor:
        """Classifier-free guidance in one batched pass, as the original's sampling loop expects.

        The batch is [conditional half; unconditional half]; only the first half of `x` is used.
        The prediction channels are guided: eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond),
        on the first `guided_channels` of them (None: all `in_channels`; 3 reproduces the original,
        which guides three channels); the remaining channels (incl. learned variance) pass through.
        The guided half is returned in both halves of the batch.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        g = self.in_channels if guided_channels is None else guided_channels
        if not 0 < g <= self.out_channels:
            raise ValueError(f"guided_channels must be in 1..{self.out_channels}, got {guided_channels}")
        eps, rest = out[:, :g], out[:, g:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# --------------------------------------------------------------------------------------------
# The zoo: the paper's Table 1 configurations x patch sizes 2, 4, 8.
# --------------------------------------------------------------------------------------------

ZOO_CONFIGS: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
ZOO: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": dict(cfg, patch_size=p) for size, cfg in ZOO_CONFIGS.items() for p in (2, 4, 8)
}


def list_models() -> list[str]:
    """Names of the model zoo, e.g. "DiT-XL/2"."""
    return list(ZOO)


def create_model(name: str, **overrides) -> DiT:
    """Build a zoo model ("DiT-S/2" ... "DiT-XL/8"); keyword overrides replace any constructor argument
    (defaults are the paper's ImageNet-256 latent setting: 32x32x4 input, 1000 classes, learned sigma)."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(ZOO)}")
    return DiT(**{**ZOO[name], **overrides})
