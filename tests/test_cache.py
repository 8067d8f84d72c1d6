"""Block caching in the sampling layer: exactness at threshold 0, reuse counts, bad input;
and the other model-running options of `ditkit.sample` (precision, compile)."""
import pytest
import torch

import ditkit
from ditkit.sampling import CFG
from ditkit.sampling.cache import BlockCache
from ditkit.diffusion import FlowMatching
from ditkit.models import DiT


def tiny_dit(block="adaln_zero", seed=0):
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=3, num_heads=4, num_classes=3,
                learn_sigma=False, block=block)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def draw(model, **kw):
    y = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    return ditkit.sample(model, FlowMatching(), noise.shape, y=y, noise=noise, guidance=CFG(3.0), sampler="heun",
                         steps=8, progress=False, **kw)


@pytest.mark.parametrize("block", ["adaln_zero", "adaln"])
def test_threshold_zero_is_exactly_the_uncached_model(block):
    model = tiny_dit(block)
    assert torch.equal(draw(model, cache=0.0), draw(model))
    cached = BlockCache(model, 0.0)
    draw(cached)
    assert cached.calls == cached.block_evals == 16  # Heun 8 steps: 2 calls a step, every one runs the blocks


def test_reuse_counts_and_the_reused_residual():
    model = tiny_dit()
    cache = BlockCache(model, 0.1)
    x, y = torch.randn(2, 2, 8, 8), torch.tensor([0, 1])
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        first = cache(x, t, y)
        again = cache(x, t, y)  # nothing changed: the residual is reused, and gives the same output
        assert (cache.calls, cache.block_evals) == (2, 1) and torch.allclose(first, again, atol=1e-6)
        far = cache(-x, torch.tensor([50.0, 50.0]), y)  # a large change: the blocks run again
        assert cache.block_evals == 2 and torch.allclose(far, model(-x, torch.tensor([50.0, 50.0]), y), atol=1e-6)
        cache(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]))  # a new batch shape: blocks run
        assert cache.block_evals == 3


def test_a_threshold_skips_block_evaluations_and_stays_close():
    model = tiny_dit()
    counts = {}
    for threshold in (0.0, 0.05, 0.3):
        cache = BlockCache(model, threshold)
        out = draw(cache)
        counts[threshold] = cache.block_evals
        if threshold == 0.0:
            reference = out
    assert counts[0.0] == 16 and counts[0.3] < counts[0.05] < 16
    assert (out - reference).abs().mean() < 0.1 * reference.abs().mean()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "fast"])
def test_bad_thresholds_are_one_clear_error(bad):
    with pytest.raises(ValueError, match="cache threshold must be"):
        draw(tiny_dit(), cache=bad)


def test_cache_needs_an_adaln_dit_and_no_compile():
    with pytest.raises(ValueError, match="cache= reuses adaLN-modulated DiT blocks"):
        draw(tiny_dit("in_context"), cache=0.1)
    with pytest.raises(ValueError, match="cannot be combined"):
        draw(tiny_dit(), cache=0.1, compile=True)


def test_bf16_precision_keeps_guidance_in_float32_and_stays_close():
    model = tiny_dit()
    reference, low = draw(model), draw(model, precision="bf16")
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()
    with pytest.raises(ValueError, match="precision must be one of"):
        draw(model, precision="int8")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        draw(model, precision="fp16")


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(ValueError, match="compile=True needs a C\\+\\+ compiler"):
        draw(tiny_dit(), compile=True)


def test_run_options_resolve_to_sample_keywords():
    """A run records cache/precision/compile in its sample section; precision None means "as trained"."""
    from ditkit.pipeline import Pipeline

    def defaults(train_config):
        info = {"objective": "flow", "train_config": train_config, "num_classes": 3}
        return Pipeline(model=tiny_dit(), objective=FlowMatching(), info=info).defaults

    recorded = {"sampler": "heun", "steps": 8, "cfg_scale": 3.0, "cache": None, "precision": None, "compile": False}
    assert defaults({"precision": "bf16", "sample": recorded})["precision"] == "bf16"
    assert defaults({"precision": "fp32", "sample": recorded})["precision"] is None
    chosen = {**recorded, "cache": 0.08, "precision": "fp32", "compile": True}
    got = defaults({"precision": "bf16", "sample": chosen})
    assert (got["cache"], got["precision"], got["compile"]) == (0.08, "fp32", True)
    old = defaults({"precision": "bf16", "sampler": "heun", "sample_steps": 8, "cfg_scale": 3.0})
    assert "precision" not in old  # runs written before these options sample as they always did (fp32)
