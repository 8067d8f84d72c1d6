"""MMDiT (SD3) and PixArtDiT (PixArt-alpha): behaviour, and parity with diffusers' SD3Transformer2DModel and
PixArtTransformer2DModel in both directions, on tiny configs with every weight random."""
import pytest
import torch

from ditkit.models import MMDiT, PixArtDiT

EXACT = 1e-5  # absolute, on outputs of order 1: float32 rounding of the same maths in another order

MMDIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
             context_dim=24, pooled_dim=20, pos_embed_max_size=8)
PIXART = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
              context_dim=24, caption_length=6)


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised modulations, gates, decoders and norms included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_gain = "norm" in name and p.ndim == 1 and name.endswith("weight")  # QK RMSNorm: around 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float(is_norm_gain))
    return module.eval()


def random_mmdit(seed: int = 0, **overrides) -> MMDiT:
    return perturb(MMDiT(**{**MMDIT, **overrides}), seed)


def random_pixart(seed: int = 0, **overrides) -> PixArtDiT:
    return perturb(PixArtDiT(**{**PIXART, **overrides}), seed)


def text_inputs(n: int = 3, size=(8, 12), length: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, *size, generator=g)
    t = torch.tensor([0.0, 37.5, 999.0])[:n]
    context = torch.randn(n, length, 24, generator=g)
    pooled = torch.randn(n, 20, generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, 2:] = False  # one caption of 2 real tokens, one of 5, one unpadded
    mask[1, 5:] = False
    return x, t, context, pooled, mask


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# MMDiT <-> diffusers SD3Transformer2DModel
# --------------------------------------------------------------------------------------------

def sd3_forward(peer, x, t, context, pooled):
    with torch.no_grad():
        return peer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (8, 12), (16, 6)])
def test_mmdit_to_diffusers_matches(qk_norm, size):
    pytest.importorskip("diffusers")
    from ditkit.interop.diffusers import to_diffusers

    model = random_mmdit(qk_norm=qk_norm, learn_sigma=size == (8, 12))
    peer = to_diffusers(model)
    assert type(peer).__name__ == "SD3Transformer2DModel"
    x, t, context, pooled, _ = text_inputs(size=size)
    with torch.no_grad():
        ours = model(x, t, context, pooled)
    assert ours.shape == (3, model.out_channels, *size)
    assert 0.1 < ours.abs().max() < 100  # outputs of order 1, so EXACT is a relative bound too
    assert gap(ours, sd3_forward(peer, x, t, context, pooled)) <= EXACT


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_mmdit_from_diffusers_matches_and_round_trips(qk_norm):
    diffusers = pytest.importorskip("diffusers")
    from ditkit.interop.diffusers import from_diffusers, to_diffusers

    torch.manual_seed(0)
    peer = perturb(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
        pos_embed_max_size=10, qk_norm=qk_norm), seed=3)
    model = from_diffusers(peer)
    assert isinstance(model, MMDiT) and model.config["qk_norm"] == (qk_norm == "rms_norm")
    x, t, context, pooled, _ = text_inputs(size=(6, 10))
    with torch.no_grad():
        ours = model(x, t, context, pooled)
    # diffusers' own position table (a persistent buffer) against ours, rebuilt from the config
    assert gap(ours, sd3_forward(peer, x, t, context, pooled)) <= EXACT
    back = to_diffusers(model).state_dict()
    theirs = peer.state_dict()
    assert sorted(back) == sorted(theirs)
    assert max(gap(back[k], theirs[k]) for k in theirs) <= 1e-6  # the table is recomputed, the rest copied


def test_mmdit_padded_mask_matches_diffusers_on_unpadded_captions():
    """diffusers' SD3 takes no mask: a masked padded batch must equal each caption run alone, unpadded."""
    pytest.importorskip("diffusers")
    from ditkit.interop.diffusers import to_diffusers

    model = random_mmdit(qk_norm=True)
    peer = to_diffusers(model)
    x, t, context, pooled, mask = text_inputs()
    with torch.no_grad():
        ours = model(x, t, context, pooled, context_mask=mask)
    for i in range(len(x)):
        real = int(mask[i].sum())
        alone = sd3_forward(peer, x[i:i + 1], t[i:i + 1], context[i:i + 1, :real], pooled[i:i + 1])
        assert gap(ours[i:i + 1], alone) <= EXACT


def test_mmdit_padded_tokens_are_ignored_and_real_ones_matter():
    model = random_mmdit()
    x, t, context, pooled, mask = text_inputs()
    noisy = context.clone()
    noisy[~mask] = 100.0  # padding content must not leak into the result
    with torch.no_grad():
        a = model(x, t, context, pooled, mask)
        b = model(x, t, noisy, pooled, mask)
        c = model(x, t, context, pooled)  # unmasked: the padding is read
    assert gap(a, b) == 0.0
    assert gap(a[:2], c[:2]) > 1e-3
    assert gap(a[2], c[2]) <= 1e-6  # the unpadded caption is unaffected by its all-True mask


def test_mmdit_null_condition_and_cfg_pair_batch():
    model = random_mmdit()
    x, t, context, pooled, mask = text_inputs()
    null_ctx, null_pooled, null_mask = model.null_condition(3, length=context.shape[1])
    assert null_ctx.shape == context.shape and null_pooled.shape == pooled.shape and null_mask.all()
    assert not null_ctx.any() and not null_pooled.any()
    with torch.no_grad():
        pair = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null_ctx]),
                     torch.cat([pooled, null_pooled]), torch.cat([mask, null_mask]))
        cond = model(x, t, context, pooled, mask)
        uncond = model(x, t, null_ctx, null_pooled)
    assert gap(pair[:3], cond) <= 1e-5 and gap(pair[3:], uncond) <= 1e-5
    assert gap(cond, uncond) > 1e-3  # the text conditions the output


def test_mmdit_last_block_updates_only_the_image_stream_and_every_weight_learns():
    model = random_mmdit()
    last = model.blocks[-1].context_stream
    assert last.pre_only and not hasattr(last, "mlp") and not hasattr(last, "proj")
    assert last.adaLN_modulation[-1].out_features == 2 * 32
    x, t, context, pooled, mask = text_inputs()
    model.train()
    model(x, t, context, pooled, mask).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []  # every parameter is in the graph (DDP without find_unused_parameters)


def test_mmdit_positions_are_centre_crops_of_one_table():
    model = MMDiT(**{**MMDIT, "pos_embed_max_size": 6})
    full = model.cropped_pos_embed((6, 6)).reshape(6, 6, -1)
    assert torch.equal(model.cropped_pos_embed((2, 4)).reshape(2, 4, -1), full[2:4, 1:5])
    # the training grid (input_size / patch = 4 tokens) spans the table: coordinates step 4 / 6; channel 0
    # is sin(column), channel D/2 sin(row)
    step = torch.tensor(4 / 6).sin()
    assert torch.allclose(full[0, 1, 0], step) and torch.allclose(full[1, 0, 16], step)
    assert full[0, 1, 16] == 0 and full[1, 0, 0] == 0


def test_mmdit_fresh_model_predicts_zero():
    """adaLN-Zero and the zero-initialised decoder: an untrained model outputs exactly zero."""
    torch.manual_seed(0)
    model = MMDiT(**MMDIT).eval()
    x, t, context, pooled, mask = text_inputs()
    with torch.no_grad():
        assert not model(x, t, context, pooled, mask).any()


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros(3, 3, 8, 8)), "x must be"),
    (dict(x=torch.zeros(3, 4, 8, 7)), "not divisible"),
    (dict(x=torch.zeros(3, 4, 8, 18)), "pos_embed_max_size"),
    (dict(t=torch.zeros(2)), "t must be"),
    (dict(context=torch.zeros(3, 6, 25)), "context_dim"),
    (dict(pooled=torch.zeros(3, 19)), "pooled must be"),
    (dict(context_mask=torch.ones(3, 5, dtype=torch.bool)), "context_mask must be"),
])
def test_mmdit_bad_inputs_raise_one_clear_error(bad, message):
    model = MMDiT(**MMDIT)
    x, t, context, pooled, mask = text_inputs(size=(8, 8))
    args = dict(x=x, t=t, context=context, pooled=pooled, context_mask=mask) | bad
    with pytest.raises(ValueError, match=message):
        model(**args)


# --------------------------------------------------------------------------------------------
# PixArtDiT <-> diffusers PixArtTransformer2DModel
# --------------------------------------------------------------------------------------------

def pixart_forward(peer, x, t, context, mask=None):
    with torch.no_grad():
        return peer(hidden_states=x, encoder_hidden_states=context, timestep=t, encoder_attention_mask=mask).sample


@pytest.mark.parametrize("size", [(8, 8), (8, 12), (12, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_pixart_to_diffusers_matches(size, masked):
    pytest.importorskip("diffusers")
    from ditkit.interop.diffusers import to_diffusers

    model = random_pixart(interpolation_scale=2.0 if size == (12, 4) else 1.0)
    peer = to_diffusers(model)
    assert type(peer).__name__ == "PixArtTransformer2DModel"
    x, t, context, _, mask = text_inputs(size=size)
    mask = mask if masked else None
    with torch.no_grad():
        ours = model(x, t, context, mask)
    assert ours.shape == (3, 8, *size)
    assert 0.1 < ours.abs().max() < 100
    assert gap(ours, pixart_forward(peer, x, t, context, mask)) <= EXACT


def test_pixart_from_diffusers_matches_and_round_trips():
    diffusers = pytest.importorskip("diffusers")
    from ditkit.interop.diffusers import from_diffusers, to_diffusers

    torch.manual_seed(0)
    peer = perturb(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=3,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24, use_additional_conditions=False,
        norm_eps=1e-6), seed=5)
    model = from_diffusers(peer)
    assert isinstance(model, PixArtDiT) and not model.learn_sigma
    x, t, context, _, mask = text_inputs(size=(10, 6))
    with torch.no_grad():
        ours = model(x, t, context, mask)
    assert gap(ours, pixart_forward(peer, x, t, context, mask)) <= EXACT
    back, theirs = to_diffusers(model).state_dict(), peer.state_dict()
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_pixart_padded_tokens_are_ignored():
    model = random_pixart()
    x, t, context, _, mask = text_inputs()
    noisy = context.clone()
    noisy[~mask] = 100.0
    with torch.no_grad():
        a, b, c = model(x, t, context, mask), model(x, t, noisy, mask), model(x, t, context)
    assert gap(a, b) == 0.0
    assert gap(a[:2], c[:2]) > 1e-3


def test_pixart_null_caption_is_what_caption_dropout_uses():
    model = random_pixart()
    x, t, context, _, mask = text_inputs()
    null_ctx, null_mask = model.null_condition(3)
    assert null_ctx.shape == (3, 6, 24) and null_mask.all()
    drop = torch.tensor([1, 0, 1])
    with torch.no_grad():
        dropped = model(x, t, context, mask, force_drop_ids=drop)
        uncond = model(x, t, null_ctx, null_mask)
        cond = model(x, t, context, mask)
    assert gap(dropped[0], uncond[0]) <= 1e-6 and gap(dropped[2], uncond[2]) <= 1e-6
    assert gap(dropped[1], cond[1]) <= 1e-6
    assert gap(cond, uncond) > 1e-3
    # the null caption is learned: caption dropout in training sends it gradient
    model.train()
    model(x, t, context, mask, force_drop_ids=drop).square().mean().backward()
    assert model.y_embedder.y_embedding.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_pixart_caption_dropout_needs_caption_length_tokens():
    model = random_pixart()
    x, t, context, _, _ = text_inputs(length=4)
    with pytest.raises(ValueError, match="caption_length = 6"):
        model(x, t, context, force_drop_ids=torch.tensor([1, 0, 0]))


def test_pixart_fresh_model_predicts_zero():
    torch.manual_seed(0)
    model = PixArtDiT(**PIXART).eval()
    x, t, context, _, mask = text_inputs()
    with torch.no_grad():
        assert not model(x, t, context, mask).any()


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros(3, 4, 9, 8)), "not divisible"),
    (dict(context=torch.zeros(3, 6, 16)), "context_dim"),
    (dict(context_mask=torch.ones(3, 6, 1, dtype=torch.bool)), "context_mask must be"),
    (dict(context_mask=torch.zeros(3, 6, dtype=torch.bool)), "no real token"),
])
def test_pixart_bad_inputs_raise_one_clear_error(bad, message):
    model = PixArtDiT(**PIXART)
    x, t, context, _, mask = text_inputs()
    with pytest.raises(ValueError, match=message):
        model(**(dict(x=x, t=t, context=context, context_mask=mask) | bad))


# --------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: random_mmdit(qk_norm=True, learn_sigma=True), random_pixart])
def test_save_and_load_round_trip(make, tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    x, t, context, pooled, mask = text_inputs()
    args = (x, t, context, pooled, mask) if isinstance(model, MMDiT) else (x, t, context, mask)
    with torch.no_grad():
        assert torch.equal(model(*args), loaded(*args))
    with pytest.raises(ValueError, match="holds a"):
        (PixArtDiT if isinstance(model, MMDiT) else MMDiT).from_pretrained(tmp_path)


def test_conversion_rejects_what_diffusers_cannot_hold():
    pytest.importorskip("diffusers")
    from ditkit.interop.diffusers import to_diffusers

    for model in (MMDiT(**{**MMDIT, "mlp_ratio": 2.0}), PixArtDiT(**{**PIXART, "mlp_ratio": 2.0})):
        with pytest.raises(ValueError, match="mlp_ratio"):
            to_diffusers(model)
