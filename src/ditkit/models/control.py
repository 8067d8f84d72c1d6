"""Structure control for DiT: a ControlNet-Transformer as in PixArt-delta (Chen et al. 2024, sec. 3.2),
after ControlNet (Zhang et al. 2023).

The base DiT stays frozen. A trainable copy of its first N blocks reads the image tokens plus the
patchified condition image; the output of copy i enters the frozen model after block i through a
zero-initialised linear projection. Before training every projection is zero, so the controlled model
is the base model bit for bit; training only ever adds the control signal on top of it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ditkit.data.conditions import check_condition, condition_channels
from ditkit.models.dit import _BLOCK_CLASSES, RECIPE_DEFAULTS, DiT
from ditkit.models.layers import PatchEmbed
from ditkit.models.pretrained import PretrainedMixin


class ControlBranch(PretrainedMixin, nn.Module):
    """The trainable part: condition embedder, copies of the base's first `num_blocks` blocks, and one
    zero-initialised projection per copy. Saved and loaded on its own (the base is referenced, not copied).

    condition: the kind of condition image it was trained on ("edges" or "lowres", see
    `ditkit.data.conditions`); the other arguments are the base DiT's.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, patch_size: int, in_channels: int,
                 block: str, num_blocks: int, condition: str, mlp: str = RECIPE_DEFAULTS["mlp"]):
        super().__init__()
        check_condition(condition)
        if num_blocks < 1:
            raise ValueError(f"a control branch needs at least 1 block, got num_blocks={num_blocks}")
        self.config = dict(hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, patch_size=patch_size,
                           in_channels=in_channels, block=block, num_blocks=num_blocks, condition=condition)
        if mlp != RECIPE_DEFAULTS["mlp"]:  # listed only when used, as DiT's config does
            self.config["mlp"] = mlp
        self.condition = condition
        self.condition_channels = condition_channels(condition, in_channels)
        # Zero-initialised (PixArt-delta's zero "before" projection): the copies first see the base's tokens.
        self.cond_embedder = PatchEmbed(patch_size, self.condition_channels, hidden_size)
        nn.init.zeros_(self.cond_embedder.proj.weight)
        self.blocks = nn.ModuleList([_BLOCK_CLASSES[block](hidden_size, num_heads, mlp_ratio, mlp=mlp)
                                     for _ in range(num_blocks)])
        self.zero_projs = nn.ModuleList([nn.Linear(hidden_size, hidden_size) for _ in range(num_blocks)])
        for proj in self.zero_projs:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    @classmethod
    def from_base(cls, base: DiT, num_blocks: int, condition: str) -> ControlBranch:
        """A branch for `base` whose blocks start as copies of the base's first `num_blocks`."""
        if not 1 <= num_blocks <= len(base.blocks):
            raise ValueError(f"control_blocks must be in 1..{len(base.blocks)} (the base's depth), got {num_blocks}")
        c = base.config
        # non-default recipe options; the MLP's kind is copied, the others would need the branch to carry them
        modern = {k: v for k, v in getattr(base, "recipe", {}).items() if k in c and k != "mlp"}
        if modern:  # the branch copies paper-style blocks (with the base's MLP)
            raise ValueError(f"structure control copies the paper's DiT blocks; this base uses {modern}")
        branch = cls(c["hidden_size"], c["num_heads"], c["mlp_ratio"], c["patch_size"], c["in_channels"],
                     c["block"], num_blocks, condition, mlp=c.get("mlp", RECIPE_DEFAULTS["mlp"]))
        branch.blocks.load_state_dict(base.blocks[:num_blocks].state_dict())
        return branch.to(base.pos_embed.device)


class ControlDiT(nn.Module):
    """A frozen DiT steered by a ControlBranch. `forward(x, t, y, condition)`: as DiT.forward, with the
    condition image (N, condition_channels, H, W) in [-1, 1]. `bind(condition)` gives the
    `model(x, t, y)` that samplers call."""

    def __init__(self, base: DiT, branch: ControlBranch):
        super().__init__()
        mismatched = [k for k, v in branch.config.items() if k in base.config and base.config[k] != v]
        if mismatched or branch.config["num_blocks"] > len(base.blocks):
            raise ValueError(f"control branch does not fit the base model: {', '.join(mismatched) or 'num_blocks'} "
                             f"differ ({branch.config} vs {base.config})")
        self.base = base.requires_grad_(False)
        self.branch = branch

    # the facts samplers and editing read off a model
    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def input_size(self) -> tuple[int, int]:
        return self.base.input_size

    @property
    def condition(self) -> str:
        return self.branch.condition

    def forward(self, x: Tensor, t: Tensor, y: Tensor, condition: Tensor,
                force_drop_ids: Tensor | None = None) -> Tensor:
        base, branch = self.base, self.branch
        base.check_inputs(x, t, y)
        want = (x.shape[0], branch.condition_channels, *x.shape[-2:])
        if tuple(condition.shape) != want:
            raise ValueError(f"condition must be {want} ({branch.condition} of the image), "
                             f"got {tuple(condition.shape)}")
        h = base.x_embedder(x) + base.pos_embed  # (N, T, D)
        t_emb = base.t_embedder(t)  # (N, D)
        y_emb = base.y_embedder(y, self.training, force_drop_ids)  # (N, D); label dropout trains CFG
        c = t_emb + y_emb
        cond_tokens = branch.cond_embedder(condition.to(h.dtype))  # (N, T, D)
        if base.block == "in_context":
            h = torch.cat([t_emb.unsqueeze(1), y_emb.unsqueeze(1), h], dim=1)  # (N, 2 + T, D)
            cond_tokens = nn.functional.pad(cond_tokens, (0, 0, 2, 0))  # nothing added to the t, y tokens
            block_cond = None
        elif base.block == "cross_attn":
            block_cond = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
        else:
            block_cond = c
        hc = h + cond_tokens
        for i, block in enumerate(base.blocks):
            h = block(h, block_cond)
            if i < len(branch.blocks):
                hc = branch.blocks[i](hc, block_cond)
                h = h + branch.zero_projs[i](hc)
        if base.block == "in_context":
            h = h[:, 2:]
        return base.unpatchify(base.final_layer(h, c))  # (N, out_channels, H, W)

    def bind(self, condition: Tensor) -> BoundControl:
        """This model with its condition image fixed, as `model(x, t, y)`."""
        return BoundControl(self, condition)


class BoundControl(nn.Module):
    """A ControlDiT with a fixed condition (N, Cc, H, W), called as `model(x, t, y)`. A batch k times the
    condition's (classifier-free guidance's [x; x]) gets the condition repeated k times."""

    def __init__(self, control: ControlDiT, condition: Tensor):
        super().__init__()
        if condition.ndim != 4:
            raise ValueError(f"condition must be (N, C, H, W), got shape {tuple(condition.shape)}")
        self.control, self.condition = control, condition
        self.num_classes, self.in_channels = control.num_classes, control.in_channels
        self.input_size = control.input_size

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        n = self.condition.shape[0]
        if x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} does not fit {n} condition image(s)")
        condition = self.condition.to(x.device).repeat(x.shape[0] // n, 1, 1, 1)
        return self.control(x, t, y, condition)
