"""Training-free caching for multi-step sampling (FORA, Selvaraju et al. 2024; TeaCache, Liu et al. 2024).

Between neighbouring sampler calls a DiT's blocks change their input by little, so the residual they add,
blocks(h) - h, can be reused. TeaCache's signal decides when: the relative L1 change of the first block's
timestep-modulated input, modulate(norm1(h), shift(c), scale(c)), which sees both the state and the
timestep. The changes since the last full evaluation are summed; while the sum stays below `threshold` the
cached residual is added to the new embedding instead of running the blocks (embedding and final layer
always run). threshold 0 never reuses: the outputs are exactly the uncached model's.

This lives in the sampling layer (`ditkit.sample(..., cache=threshold)`), around the model: the model's
own forward is unchanged.
"""
from __future__ import annotations

from torch import Tensor, nn

from ditkit.models.dit import DiT
from ditkit.models.layers import modulate

CACHE_BLOCKS = ("adaln_zero", "adaln")  # designs whose first block has a timestep-modulated input


def check_threshold(threshold: float) -> float:
    """The threshold as a float, or ValueError unless 0 <= threshold <= 1."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"cache threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"cache threshold must be in [0, 1] (0: no reuse; 0.05-0.3 typical), got {threshold}")
    return value


class BlockCache(nn.Module):
    """`model` (a DiT with adaLN blocks) called as the model, reusing the blocks' residual across calls.

    Counters: `calls` (forward calls) and `block_evals` (calls that ran the blocks). A change of batch
    shape (e.g. leaving a CFG interval) forces a full evaluation; `reset()` starts a new trajectory.
    """

    def __init__(self, model: nn.Module, threshold: float):
        super().__init__()
        if not isinstance(model, DiT) or model.block not in CACHE_BLOCKS:
            what = f"a {model.block} DiT" if isinstance(model, DiT) else f"a {type(model).__name__}"
            raise ValueError(f"cache= reuses adaLN-modulated DiT blocks ({' or '.join(CACHE_BLOCKS)}); "
                             f"this model is {what}: sample it without cache")
        self.model, self.threshold = model, check_threshold(threshold)
        self.num_classes = model.num_classes
        self.calls = self.block_evals = 0
        self.reset()

    def reset(self) -> None:
        self._previous: Tensor | None = None
        self._residual: Tensor | None = None
        self._accumulated = 0.0

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None,
                interval: Tensor | None = None) -> Tensor:
        m = self.model
        m.check_inputs(x, t, y)
        h = m.embed_tokens(x)  # (N, T, D)
        c = m.embed_time(t, interval) + m.y_embedder(y, m.training, force_drop_ids)  # (N, D)
        first = m.blocks[0]
        shift, scale = first.adaLN_modulation(c).chunk(6 if m.block == "adaln_zero" else 4, dim=1)[:2]
        signal = modulate(first.norm1(h), shift, scale).float()
        reuse = False
        if self._previous is not None and self._previous.shape == signal.shape and self.threshold > 0:
            self._accumulated += ((signal - self._previous).abs().mean() / self._previous.abs().mean()).item()
            reuse = self._accumulated < self.threshold
        self._previous = signal
        self.calls += 1
        if reuse:
            out = h + self._residual.to(h.dtype)
        else:
            out = h
            for block in m.blocks:
                out = block(out, c)
            self._residual, self._accumulated = out - h, 0.0
            self.block_evals += 1
        return m.unpatchify(m.final_layer(out, c))
