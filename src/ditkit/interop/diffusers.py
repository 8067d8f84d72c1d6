"""ditkit DiT <-> diffusers' `DiTTransformer2DModel`: the same weights under diffusers' names.

The layouts differ in three places: diffusers splits the fused qkv projection into to_q/to_k/to_v; it
keeps a timestep + label embedder inside every block (a converted model holds copies of ditkit's one
shared embedder, and the final layer reads block 0's); its fixed sin-cos positions are a buffer.

One difference is in the maths, not the names: diffusers' sinusoidal timestep embedding spaces its
frequencies as 10000^(-i / (half - 1)) where DiT uses 10000^(-i / half) (`downscale_freq_shift=1`). A
converted model therefore gives slightly different outputs on the same weights (measured in
tests/test_interop_diffusers.py: a max gap of order 1e-1 on random weights); everything else is exact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ditkit.interop import diffusers_text
from ditkit.models.dit import DiT


def _require_diffusers():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise ValueError("the diffusers conversion needs diffusers: pip install 'ditkit[interop]'") from None
    return DiTTransformer2DModel


def _renames(depth: int) -> dict[str, str]:
    """ditkit name -> diffusers name, for every tensor that maps one to one."""
    names = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
             "final_layer.linear": "proj_out_2"}
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        names.update({f"{b}.adaLN_modulation.1": f"{d}.norm1.linear", f"{b}.attn.proj": f"{d}.attn1.to_out.0",
                      f"{b}.mlp.fc1": f"{d}.ff.net.0.proj", f"{b}.mlp.fc2": f"{d}.ff.net.2"})
    return {f"{k}.{p}": f"{v}.{p}" for k, v in names.items() for p in ("weight", "bias")}


def _embedder_renames(block: int) -> dict[str, str]:
    emb = f"transformer_blocks.{block}.norm1.emb"
    names = {f"t_embedder.mlp.{a}.{p}": f"{emb}.timestep_embedder.linear_{b}.{p}"
             for a, b in ((0, 1), (2, 2)) for p in ("weight", "bias")}
    names["y_embedder.embedding_table.weight"] = f"{emb}.class_embedder.embedding_table.weight"
    return names


def diffusers_config(model: DiT) -> dict[str, Any]:
    """The DiTTransformer2DModel constructor arguments of the same architecture."""
    c = model.config
    problems = []
    if model.block != "adaln_zero":
        problems.append(f"block {model.block!r} (diffusers' DiT has adaLN-Zero blocks only)")
    if model.input_size[0] != model.input_size[1]:
        problems.append(f"input size {model.input_size} (diffusers' DiT is square)")
    if c["mlp_ratio"] != 4.0:
        problems.append(f"mlp_ratio {c['mlp_ratio']} (diffusers' DiT uses 4)")
    if c["class_dropout_prob"] <= 0:
        problems.append("no null label (class_dropout_prob = 0; diffusers' label table always has one)")
    if problems:
        raise ValueError(f"this DiT has no diffusers equivalent: {'; '.join(problems)}")
    heads = c["num_heads"]
    return dict(num_attention_heads=heads, attention_head_dim=c["hidden_size"] // heads,
                in_channels=model.in_channels, out_channels=model.out_channels, num_layers=c["depth"],
                sample_size=model.input_size[0], patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes,
                norm_type="ada_norm_zero", activation_fn="gelu-approximate", norm_elementwise_affine=False,
                norm_eps=1e-6)


@torch.no_grad()
def to_diffusers(model: DiT):
    """A diffusers DiTTransformer2DModel holding `model`'s weights (see the module note on timesteps).
    MMDiT and PixArtDiT go to SD3 / PixArt transformers (`ditkit.interop.diffusers_text`)."""
    if not isinstance(model, DiT):
        return diffusers_text.to_diffusers(model)
    peer = _require_diffusers()(**diffusers_config(model))
    ours, depth = model.state_dict(), model.config["depth"]
    state = {theirs: ours[k] for k, theirs in _renames(depth).items()}
    for i in range(depth):
        state.update({theirs: ours[k] for k, theirs in _embedder_renames(i).items()})
        for p in ("weight", "bias"):
            q, k, v = ours[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)  # rows [q; k; v]
            for name, tensor in (("to_q", q), ("to_k", k), ("to_v", v)):
                state[f"transformer_blocks.{i}.attn1.{name}.{p}"] = tensor
    peer.load_state_dict(state, strict=True)
    peer.pos_embed.pos_embed.copy_(model.pos_embed)  # a non-persistent buffer: not in the state dict
    return peer.to(model.pos_embed.device).eval()


@torch.no_grad()
def from_diffusers(peer) -> DiT:
    """A ditkit DiT with the weights of a diffusers DiTTransformer2DModel (e.g. one loaded with
    `DiTTransformer2DModel.from_pretrained(DIR, subfolder="transformer")`).

    Its per-block timestep and label embedders must be copies of one another (as in every converted
    checkpoint); a model whose blocks learned different embedders has no ditkit equivalent. DiT's
    LayerNorms use eps 1e-6; a diffusers config with another `norm_eps` (its default is 1e-5) differs in
    the second norm of each block by that much. SD3 and PixArt transformers become MMDiT / PixArtDiT.
    """
    if type(peer).__name__ in ("SD3Transformer2DModel", "PixArtTransformer2DModel"):
        return diffusers_text.from_diffusers(peer)
    c = peer.config
    expected = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True}
    wrong = [f"{k}={c[k]!r}" for k, v in expected.items() if c[k] != v]
    if wrong or c.out_channels not in (c.in_channels, 2 * c.in_channels):
        raise ValueError(f"not a DiT in diffusers' layout: {', '.join(wrong) or f'out_channels {c.out_channels}'}")
    theirs: dict[str, Tensor] = peer.state_dict()
    for i in range(1, c.num_layers):
        for k, name in _embedder_renames(i).items():
            if not torch.equal(theirs[name], theirs[_embedder_renames(0)[k]]):
                raise ValueError(f"block {i}'s embedder differs from block 0's ({name}): ditkit's DiT shares one "
                                 "timestep and label embedder across blocks")
    model = DiT(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                hidden_size=c.num_attention_heads * c.attention_head_dim, depth=c.num_layers,
                num_heads=c.num_attention_heads, num_classes=c.num_embeds_ada_norm,
                learn_sigma=c.out_channels == 2 * c.in_channels)
    state = {k: theirs[name] for k, name in _renames(c.num_layers).items()}
    state.update({k: theirs[name] for k, name in _embedder_renames(0).items()})
    for i in range(c.num_layers):
        for p in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [theirs[f"transformer_blocks.{i}.attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v")])
    state["pos_embed"] = peer.pos_embed.pos_embed.detach().to(torch.float32).cpu()
    model.load_state_dict({k: v.float().cpu() for k, v in state.items()})
    return model.eval()
