"""Starting a VideoDiT from a trained image DiT ("inflation": Latte starts from a pretrained image DiT,
AnimateDiff inflates an image model), so that video training begins from a model that already draws frames.

`inflate(image_dit, video_dit)` copies the image model's weights into the video model's spatial parts and
makes everything temporal start as the identity, so the inflated model begins as the image model applied to
every frame on its own:

- patch embedding: the Conv2d patch kernel becomes the tubelet's Conv3d kernel, spread evenly over its
  `patch_t` frames (each frame's share divided by `patch_t`), so a tubelet of one repeated frame embeds as
  that frame did;
- timestep and label embedders (the same classes, and the same null class for guidance);
- blocks: with "factorized" attention the spatial blocks (even indices) take the image blocks in order and
  the temporal blocks (odd indices) start with zero adaLN-Zero gates, the identity; with "full" or
  "windowed" attention every block takes the image block of its index (those blocks mix frames from the
  start, so only clips of one repeated frame start exactly as the image model);
- final layer: the decoder of one p x p patch, repeated for each of the tubelet's `patch_t` frames;
- positions: the video model must place tokens as the image model does (pos_embed "image+frame"): the
  image's 2D table on every frame, and the frame code's weight `frame_gate` at zero.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditkit import checkpoint as ckpt
from ditkit.models.dit import DiT
from ditkit.models.layers import sincos_2d
from ditkit.models.video import VideoDiT

# the VideoDiT's blocks: adaLN-Zero, the paper's tanh GELU MLP, LayerNorm, no QK-norm
VIDEO_RECIPE = dict(mlp="gelu", norm="layernorm", qk_norm=False, pos_embed="sincos")


def spatial_block_indices(video_dit: VideoDiT) -> list[int]:
    """The video blocks that take the image blocks, in order (all of them unless attention is factorized)."""
    depth = len(video_dit.blocks)
    return list(range(0, depth, 2)) if video_dit.attention == "factorized" else list(range(depth))


def _depth_needed(video_dit: VideoDiT, image_depth: int) -> int:
    return 2 * image_depth if video_dit.attention == "factorized" else image_depth


def inflation_mismatches(image_dit: nn.Module, video_dit: VideoDiT) -> list[str]:
    """What keeps `video_dit` from starting as `image_dit` frame by frame, one phrase each (empty: nothing)."""
    if type(image_dit) is not DiT:
        return [f"the image model must be a class-conditional DiT, got a {type(image_dit).__name__}"]
    image_heads, video_heads = image_dit.blocks[0].attn.num_heads, video_dit.blocks[0].attn.num_heads
    facts = {
        "hidden_size": (video_dit.hidden_size, image_dit.config["hidden_size"]),
        "num_heads": (video_heads, image_heads),
        "patch_size": (video_dit.patch_size, image_dit.patch_size),
        "mlp_ratio": (video_dit.config["mlp_ratio"], image_dit.config["mlp_ratio"]),
        "in_channels": (video_dit.in_channels, image_dit.in_channels),
        "out_channels (learn_sigma)": (video_dit.out_channels, image_dit.out_channels),
        "num_classes": (video_dit.num_classes, image_dit.num_classes),
        "null class (class_dropout_prob > 0)": (video_dit.y_embedder.dropout_prob > 0,
                                                image_dit.y_embedder.dropout_prob > 0),
        "block": ("adaln_zero", image_dit.block),
        "two-time interval embedder": (False, image_dit.interval_embedder is not None),
        **{f"{key} (a VideoDiT's; train the image run with {key}={value})": (value, image_dit.recipe[key])
           for key, value in VIDEO_RECIPE.items()},
    }
    wrong = [f"{name} {ours} vs the image model's {theirs}" for name, (ours, theirs) in facts.items()
             if ours != theirs]
    depth, image_depth = len(video_dit.blocks), len(image_dit.blocks)
    if depth != _depth_needed(video_dit, image_depth):
        factorized = video_dit.attention == "factorized"
        wrong.append(f"depth {depth} vs the image model's {image_depth}" + (
            f" (factorized attention needs depth {2 * image_depth}: a temporal block after each image block)"
            if factorized else ""))
    if video_dit.pos_embed != "image+frame":
        wrong.append(f"pos_embed {video_dit.pos_embed} (inflating needs pos_embed image+frame, which places "
                     f"tokens as the image model does)")
    table = torch.from_numpy(sincos_2d(image_dit.pos_embed.shape[-1], image_dit.grid_size))
    if image_dit.recipe["pos_embed"] == "sincos" and not torch.equal(image_dit.pos_embed[0].cpu().float(), table):
        wrong.append("the image model's position table is not the 2D sin-cos code")
    return wrong


@torch.no_grad()
def inflate(image_dit: DiT, video_dit: VideoDiT) -> VideoDiT:
    """Copy `image_dit`'s weights into `video_dit` (in place, returned) as the module docstring says.

    Raises one ValueError naming every mismatch (sizes, heads, patch, MLP, classes, depth, positions)."""
    wrong = inflation_mismatches(image_dit, video_dit)
    if wrong:
        raise ValueError(f"cannot start this VideoDiT from the image DiT: {'; '.join(wrong)}")
    pt = video_dit.patch_t
    kernel = image_dit.x_embedder.proj.weight  # (D, C, p, p) -> (D, C, p_t, p, p)
    video_dit.x_embedder.proj.weight.copy_(kernel.unsqueeze(2).expand(-1, -1, pt, -1, -1) / pt)
    video_dit.x_embedder.proj.bias.copy_(image_dit.x_embedder.proj.bias)
    video_dit.t_embedder.load_state_dict(image_dit.t_embedder.state_dict())
    video_dit.y_embedder.load_state_dict(image_dit.y_embedder.state_dict())
    spatial = spatial_block_indices(video_dit)
    for i, block in enumerate(video_dit.blocks):
        if i in spatial:
            block.load_state_dict(image_dit.blocks[spatial.index(i)].state_dict())
        else:  # a temporal block: zero shift, scale and gates, so that it passes its input through
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
    final, image_final = video_dit.final_layer, image_dit.final_layer
    final.adaLN_modulation.load_state_dict(image_final.adaLN_modulation.state_dict())
    # decoder rows are (frame of the tubelet, row, column, channel): one patch's rows per frame
    final.linear.weight.copy_(image_final.linear.weight.repeat(pt, 1))
    final.linear.bias.copy_(image_final.linear.bias.repeat(pt))
    video_dit.frame_gate.zero_()
    return video_dit


def load_image_dit(path: str | Path, objective: str, flow_time_scale: float) -> tuple[DiT, dict[str, Any]]:
    """The image DiT of a ditkit run or checkpoint directory (its EMA weights), for a video run trained with
    `objective` and `flow_time_scale`; and the record of it for run.json: the checkpoint's path and the
    sha256 of the weights file read. One clear error when it is not an image DiT of the same objective."""
    found = ckpt.resolve_checkpoint(path)
    config = ckpt.read_json(found / "config.json")
    if config.get("model_type", "DiT") != "DiT":
        raise ValueError(f"init_image={path}: {found} holds a {config['model_type']}, not an image DiT")
    if not (found / "run.json").is_file():
        raise ValueError(f"init_image={path}: {found} has no run.json to say how it was trained: give a ditkit "
                         f"image run or one of its checkpoints")
    info = ckpt.read_json(found / "run.json")
    theirs = (info.get("objective"), info.get("train_config", {}).get("flow_time_scale", flow_time_scale))
    if theirs != (objective, flow_time_scale):
        raise ValueError(f"init_image={path}: {found} was trained with objective={theirs[0]} and flow_time_scale="
                         f"{theirs[1]}; this run has objective={objective} and flow_time_scale={flow_time_scale:g}: "
                         f"start from an image run of the same objective")
    record = ckpt.weights_record(found)
    return DiT.from_pretrained(found, weights_name=record["weights"]), record
