"""The trainer's and the model's fast paths against their plain forms: the CPU bf16 attention (softmax in bf16),
the EMA as one foreach lerp, the epoch sampler's batches, the step's profiler scopes, and int8 (dynamically
quantized) Linear layers in a DiT."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models import DiT
from ditkit.models.layers import attention
from ditkit.train import build_config, distributed, trainer
from ditkit.train.ema import EMA
from ditkit.train.trainer import EpochSampler

BF16_EPS = 2.0 ** -8  # bf16's relative rounding step


def float_softmax_attention(q, k, v, mask=None):
    """The plain form: the bf16 scores cast to float32 for the softmax, the probabilities cast back."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


def qkv(dtype, shape=(4, 3, 16, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_bf16_attention_matches_the_float32_softmax_form(masked):
    mask = None
    if masked:
        mask = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., 0] = True  # every query sees at least one key
    fast, plain = qkv(torch.bfloat16), qkv(torch.bfloat16)
    out_fast, out_plain = attention(*fast, mask), float_softmax_attention(*plain, mask)
    scale = out_plain.float().abs().max()
    assert (out_fast.float() - out_plain.float()).abs().max() <= 2 * BF16_EPS * scale
    grad = torch.randn(out_plain.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    out_fast.backward(grad)
    out_plain.backward(grad)
    for a, b in zip(fast, plain):
        g_scale = b.grad.float().abs().max()
        assert (a.grad.float() - b.grad.float()).abs().max() <= 4 * BF16_EPS * g_scale


def test_fp32_attention_is_sdpa_exactly():
    q, k, v = qkv(torch.float32)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    return DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=3,
               learn_sigma=False)


def test_ema_update_is_the_per_tensor_lerp_exactly():
    model = tiny_dit()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # frozen parameters are not averaged
    ema = EMA(model, decay=0.9, warmup=True)
    plain = copy.deepcopy(ema.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, step=3)
    decay = ema.decay_at(3)
    with torch.no_grad():
        for p, q in zip(model.parameters(), plain.parameters()):
            if p.requires_grad:
                q.lerp_(p, 1 - decay)
    for (name, a), b in zip(ema.model.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(ema.model.blocks[0].attn.qkv.weight, tiny_dit().blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("n, batch", [(10, 4), (12, 4), (3, 5)])
def test_epoch_sampler_draws_batch_size_indices_and_each_epoch_visits_every_index(n, batch):
    sampler = EpochSampler(n, batch, seed=7)
    drawn = torch.cat([sampler.next() for _ in range(6)])
    assert len(drawn) == 6 * batch
    for e in range(len(drawn) // n):  # the stream is the epochs' permutations back to back
        assert sorted(drawn[e * n:(e + 1) * n].tolist()) == list(range(n))
    state = sampler.state()
    assert state["epoch"] * n + state["position"] == 6 * batch
    again = EpochSampler(n, batch, seed=7, **state)
    assert torch.equal(again.next(), sampler.next())


def test_a_train_step_names_its_phases_for_the_profiler(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    c = build_config(None, {"out": str(tmp_path)}, ["data=patterns", "image_size=8", "channels=2", "hidden_size=32",
                                                   "depth=1", "num_heads=2", "patch_size=2", "batch_size=4"])
    run = trainer.build_run(c, distributed.setup(), None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(run)
    names = {e.key for e in prof.key_averages()}
    assert {"train.draw", "train.model", "train.update", "train.ema"} <= names
    assert run.step == 1


def test_int8_dynamic_quantized_dit_runs_close_to_float32():
    model = tiny_dit().eval()
    with torch.no_grad():  # adaLN-Zero starts at zero output: give the blocks something to compute
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10.0, 200.0, 500.0, 900.0]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        ref, out = model(x, t, y), quantized(x, t, y)
    assert not torch.equal(out, ref)  # the quantized layers did run
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
