"""ditkit's text-to-image models <-> diffusers: MMDiT <-> `SD3Transformer2DModel` and
PixArtDiT <-> `PixArtTransformer2DModel`, the same weights under diffusers' names.

The layouts differ in these places, all handled here:
- diffusers splits every fused qkv (ditkit's `qkv`, PixArt's cross-attention `kv`) into to_q/to_k/to_v;
- SD3's `AdaLayerNormContinuous` (final layer, last block's text stream) regresses (scale, shift), where
  ditkit's modulations regress (shift, scale) as DiT does: the two halves of those rows swap;
- MMDiT's position table is a fixed function of the config (diffusers stores it as a buffer);
- PixArtDiT's learned null caption has no diffusers counterpart: `to_diffusers` leaves it out and
  `from_diffusers` gives the model a freshly initialised one (for guidance with a converted diffusers
  model, use the encoded empty prompt as the unconditional context, as diffusers' pipelines do).
The maths are the same, including the timestep frequencies (flip_sin_to_cos=True, downscale_freq_shift=0).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ditkit.models.mmdit import MMDiT
from ditkit.models.pixart import PixArtDiT

PARAMS = ("weight", "bias")


def _require(name: str):
    try:
        import diffusers
    except ImportError:
        raise ValueError("the diffusers conversion needs diffusers: pip install 'ditkit[interop]'") from None
    return getattr(diffusers, name)


def _linear(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{p}": f"{theirs}.{p}" for p in PARAMS}


def _split(state: dict[str, Tensor], fused: str, names: list[str]) -> dict[str, Tensor]:
    """A fused projection's rows [q; k; v] (or [k; v]) -> one tensor per diffusers name."""
    out = {}
    for p in PARAMS:
        for name, tensor in zip(names, state[f"{fused}.{p}"].chunk(len(names), dim=0)):
            out[f"{name}.{p}"] = tensor
    return out


def _fuse(state: dict[str, Tensor], fused: str, names: list[str]) -> dict[str, Tensor]:
    return {f"{fused}.{p}": torch.cat([state[f"{n}.{p}"] for n in names]) for p in PARAMS}


def _swap_halves(state: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    """(shift, scale) rows <-> (scale, shift) rows of a 2 x D modulation Linear, renamed src -> dst."""
    return {f"{dst}.{p}": torch.cat(state[f"{src}.{p}"].chunk(2, dim=0)[::-1]) for p in PARAMS}


def _check_mlp_ratio(model, problems: list[str]) -> None:
    if model.config["mlp_ratio"] != 4.0:
        problems.append(f"mlp_ratio {model.config['mlp_ratio']} (diffusers' feed-forward is 4x wide)")


# --------------------------------------------------------------------------------------------
# MMDiT <-> SD3Transformer2DModel
# --------------------------------------------------------------------------------------------

def _mmdit_renames(depth: int, qk_norm: bool) -> dict[str, str]:
    """ditkit name -> SD3 name, for the tensors that map one to one."""
    names = {
        **_linear("x_embedder.proj", "pos_embed.proj"),
        **_linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        **_linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        **_linear("pooled_embedder.0", "time_text_embed.text_embedder.linear_1"),
        **_linear("pooled_embedder.2", "time_text_embed.text_embedder.linear_2"),
        **_linear("context_embedder", "context_embedder"),
        **_linear("final_layer.linear", "proj_out"),
    }
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        names.update(_linear(f"{b}.x_stream.adaLN_modulation.1", f"{d}.norm1.linear"))
        names.update(_linear(f"{b}.x_stream.proj", f"{d}.attn.to_out.0"))
        names.update(_linear(f"{b}.x_stream.mlp.fc1", f"{d}.ff.net.0.proj"))
        names.update(_linear(f"{b}.x_stream.mlp.fc2", f"{d}.ff.net.2"))
        if qk_norm:
            names.update({f"{b}.x_stream.q_norm.weight": f"{d}.attn.norm_q.weight",
                          f"{b}.x_stream.k_norm.weight": f"{d}.attn.norm_k.weight",
                          f"{b}.context_stream.q_norm.weight": f"{d}.attn.norm_added_q.weight",
                          f"{b}.context_stream.k_norm.weight": f"{d}.attn.norm_added_k.weight"})
        if i < depth - 1:  # the last block's text stream has no output path, and a (scale, shift) norm
            names.update(_linear(f"{b}.context_stream.adaLN_modulation.1", f"{d}.norm1_context.linear"))
            names.update(_linear(f"{b}.context_stream.proj", f"{d}.attn.to_add_out"))
            names.update(_linear(f"{b}.context_stream.mlp.fc1", f"{d}.ff_context.net.0.proj"))
            names.update(_linear(f"{b}.context_stream.mlp.fc2", f"{d}.ff_context.net.2"))
    return names


def _mmdit_qkv(i: int) -> list[tuple[str, list[str]]]:
    d = f"transformer_blocks.{i}.attn"
    return [(f"blocks.{i}.x_stream.qkv", [f"{d}.to_q", f"{d}.to_k", f"{d}.to_v"]),
            (f"blocks.{i}.context_stream.qkv", [f"{d}.add_q_proj", f"{d}.add_k_proj", f"{d}.add_v_proj"])]


def _mmdit_swapped(depth: int) -> list[tuple[str, str]]:
    """(ditkit, SD3) names of the modulations whose halves are in the other order."""
    return [("final_layer.adaLN_modulation.1", "norm_out.linear"),
            (f"blocks.{depth - 1}.context_stream.adaLN_modulation.1",
             f"transformer_blocks.{depth - 1}.norm1_context.linear")]


def sd3_config(model: MMDiT) -> dict[str, Any]:
    """The SD3Transformer2DModel constructor arguments of the same architecture."""
    c = model.config
    problems: list[str] = []
    _check_mlp_ratio(model, problems)
    if problems:
        raise ValueError(f"this MMDiT has no diffusers equivalent: {'; '.join(problems)}")
    heads = c["num_heads"]
    return dict(sample_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
                num_layers=c["depth"], attention_head_dim=c["hidden_size"] // heads, num_attention_heads=heads,
                joint_attention_dim=c["context_dim"], caption_projection_dim=c["hidden_size"],
                pooled_projection_dim=c["pooled_dim"], out_channels=model.out_channels,
                pos_embed_max_size=model.pos_embed_max_size, qk_norm="rms_norm" if c["qk_norm"] else None)


@torch.no_grad()
def mmdit_to_diffusers(model: MMDiT):
    """A diffusers SD3Transformer2DModel holding `model`'s weights; same outputs for the same inputs
    (diffusers' SD3 takes no text mask: give it the unpadded captions)."""
    peer = _require("SD3Transformer2DModel")(**sd3_config(model))
    ours, depth = model.state_dict(), model.config["depth"]
    state = {theirs: ours[k] for k, theirs in _mmdit_renames(depth, model.config["qk_norm"]).items()}
    for fused, names in (pair for i in range(depth) for pair in _mmdit_qkv(i)):
        state.update(_split(ours, fused, names))
    for k, theirs in _mmdit_swapped(depth):
        state.update(_swap_halves(ours, k, theirs))
    state["pos_embed.pos_embed"] = model.pos_embed.reshape(1, -1, model.pos_embed.shape[-1])
    peer.load_state_dict(state, strict=True)
    return peer.to(model.pos_embed.device).eval()


@torch.no_grad()
def mmdit_from_diffusers(peer) -> MMDiT:
    """A ditkit MMDiT with the weights of a diffusers SD3Transformer2DModel (SD3 / SD3-medium layout;
    SD3.5's dual-attention blocks have no MMDiT equivalent)."""
    c = peer.config
    problems = []
    if tuple(c.dual_attention_layers or ()):
        problems.append(f"dual_attention_layers {tuple(c.dual_attention_layers)} (SD3.5's extra self-attention)")
    if c.qk_norm not in (None, "rms_norm"):
        problems.append(f"qk_norm {c.qk_norm!r} (MMDiT supports rms_norm or none)")
    hidden = c.num_attention_heads * c.attention_head_dim
    if c.caption_projection_dim != hidden:
        problems.append(f"caption_projection_dim {c.caption_projection_dim} != width {hidden}")
    if c.out_channels not in (None, c.in_channels, 2 * c.in_channels):
        problems.append(f"out_channels {c.out_channels} for {c.in_channels} input channels")
    if c.pos_embed_max_size is None:
        problems.append("no pos_embed_max_size (MMDiT crops positions from a fixed table)")
    if problems:
        raise ValueError(f"not convertible to MMDiT: {'; '.join(problems)}")
    model = MMDiT(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels, hidden_size=hidden,
                  depth=c.num_layers, num_heads=c.num_attention_heads, context_dim=c.joint_attention_dim,
                  pooled_dim=c.pooled_projection_dim, pos_embed_max_size=c.pos_embed_max_size,
                  qk_norm=c.qk_norm == "rms_norm", learn_sigma=c.out_channels == 2 * c.in_channels)
    theirs: dict[str, Tensor] = {k: v.float().cpu() for k, v in peer.state_dict().items()}
    depth = c.num_layers
    state = {k: theirs[name] for k, name in _mmdit_renames(depth, model.config["qk_norm"]).items()}
    for fused, names in (pair for i in range(depth) for pair in _mmdit_qkv(i)):
        state.update(_fuse(theirs, fused, names))
    for k, name in _mmdit_swapped(depth):
        state.update(_swap_halves(theirs, name, k))
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# PixArtDiT <-> PixArtTransformer2DModel
# --------------------------------------------------------------------------------------------

def _pixart_renames(depth: int) -> dict[str, str]:
    """ditkit name -> diffusers PixArt name, for the tensors that map one to one."""
    names = {
        **_linear("x_embedder.proj", "pos_embed.proj"),
        **_linear("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
        **_linear("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
        **_linear("t_block.1", "adaln_single.linear"),
        **_linear("y_embedder.y_proj.0", "caption_projection.linear_1"),
        **_linear("y_embedder.y_proj.2", "caption_projection.linear_2"),
        **_linear("final_layer.linear", "proj_out"),
        "final_layer.scale_shift_table": "scale_shift_table",
    }
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        names[f"{b}.scale_shift_table"] = f"{d}.scale_shift_table"
        names.update(_linear(f"{b}.attn.proj", f"{d}.attn1.to_out.0"))
        names.update(_linear(f"{b}.cross_attn.q", f"{d}.attn2.to_q"))
        names.update(_linear(f"{b}.cross_attn.proj", f"{d}.attn2.to_out.0"))
        names.update(_linear(f"{b}.mlp.fc1", f"{d}.ff.net.0.proj"))
        names.update(_linear(f"{b}.mlp.fc2", f"{d}.ff.net.2"))
    return names


def _pixart_fused(i: int) -> list[tuple[str, list[str]]]:
    d = f"transformer_blocks.{i}"
    return [(f"blocks.{i}.attn.qkv", [f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v"]),
            (f"blocks.{i}.cross_attn.kv", [f"{d}.attn2.to_k", f"{d}.attn2.to_v"])]


def pixart_config(model: PixArtDiT) -> dict[str, Any]:
    """The PixArtTransformer2DModel constructor arguments of the same architecture (no additional
    resolution / aspect-ratio conditions)."""
    c = model.config
    problems: list[str] = []
    _check_mlp_ratio(model, problems)
    if problems:
        raise ValueError(f"this PixArtDiT has no diffusers equivalent: {'; '.join(problems)}")
    heads = c["num_heads"]
    return dict(num_attention_heads=heads, attention_head_dim=c["hidden_size"] // heads,
                in_channels=c["in_channels"], out_channels=model.out_channels, num_layers=c["depth"],
                cross_attention_dim=c["hidden_size"], attention_bias=True, sample_size=c["input_size"],
                patch_size=c["patch_size"], activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                interpolation_scale=c["interpolation_scale"], use_additional_conditions=False,
                caption_channels=c["context_dim"])


@torch.no_grad()
def pixart_to_diffusers(model: PixArtDiT):
    """A diffusers PixArtTransformer2DModel holding `model`'s weights (all but the null caption, which
    diffusers has no place for); same outputs for the same inputs, masks included
    (`encoder_attention_mask`)."""
    peer = _require("PixArtTransformer2DModel")(**pixart_config(model))
    ours, depth = model.state_dict(), model.config["depth"]
    state = {theirs: ours[k] for k, theirs in _pixart_renames(depth).items()}
    for fused, names in (pair for i in range(depth) for pair in _pixart_fused(i)):
        state.update(_split(ours, fused, names))
    peer.load_state_dict(state, strict=True)
    return peer.to(model.pos_embed.device).eval()


@torch.no_grad()
def pixart_from_diffusers(peer, caption_length: int = 120, caption_dropout_prob: float = 0.1) -> PixArtDiT:
    """A ditkit PixArtDiT with the weights of a diffusers PixArtTransformer2DModel (PixArt-alpha / sigma
    without the additional size conditions). Its null caption is freshly initialised (see module note)."""
    c = peer.config
    expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False}
    problems = [f"{k}={c[k]!r}" for k, v in expected.items() if c[k] != v]
    hidden = c.num_attention_heads * c.attention_head_dim
    if peer.use_additional_conditions:
        problems.append("use_additional_conditions (resolution / aspect-ratio embedders)")
    if c.caption_channels is None:
        problems.append("no caption_projection (caption_channels None)")
    if c.cross_attention_dim != hidden:
        problems.append(f"cross_attention_dim {c.cross_attention_dim} != width {hidden}")
    if peer.out_channels not in (c.in_channels, 2 * c.in_channels):
        problems.append(f"out_channels {peer.out_channels} for {c.in_channels} input channels")
    if problems:
        raise ValueError(f"not convertible to PixArtDiT: {'; '.join(problems)}")
    scale = c.interpolation_scale if c.interpolation_scale is not None else max(c.sample_size // 64, 1)
    model = PixArtDiT(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                      hidden_size=hidden, depth=c.num_layers, num_heads=c.num_attention_heads,
                      context_dim=c.caption_channels, caption_length=caption_length,
                      caption_dropout_prob=caption_dropout_prob, interpolation_scale=float(scale),
                      learn_sigma=peer.out_channels == 2 * c.in_channels)
    theirs: dict[str, Tensor] = {k: v.float().cpu() for k, v in peer.state_dict().items()}
    state = {k: theirs[name] for k, name in _pixart_renames(c.num_layers).items()}
    for fused, names in (pair for i in range(c.num_layers) for pair in _pixart_fused(i)):
        state.update(_fuse(theirs, fused, names))
    state["y_embedder.y_embedding"] = model.y_embedder.y_embedding.detach().clone()
    model.load_state_dict(state)
    return model.eval()


def to_diffusers(model: MMDiT | PixArtDiT):
    """MMDiT -> SD3Transformer2DModel, PixArtDiT -> PixArtTransformer2DModel."""
    if isinstance(model, MMDiT):
        return mmdit_to_diffusers(model)
    if isinstance(model, PixArtDiT):
        return pixart_to_diffusers(model)
    raise ValueError(f"no text-to-image diffusers counterpart for {type(model).__name__}: expected MMDiT or PixArtDiT")


def from_diffusers(peer) -> MMDiT | PixArtDiT:
    """SD3Transformer2DModel -> MMDiT, PixArtTransformer2DModel -> PixArtDiT (default null-caption settings)."""
    name = type(peer).__name__
    if name == "SD3Transformer2DModel":
        return mmdit_from_diffusers(peer)
    if name == "PixArtTransformer2DModel":
        return pixart_from_diffusers(peer)
    raise ValueError(f"cannot convert a diffusers {name}: expected SD3Transformer2DModel or PixArtTransformer2DModel")
