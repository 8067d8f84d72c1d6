"""The DiT model beyond parity: initialisation, non-square inputs, CFG, saving, bad input."""
import pytest
import torch

from ditkit.models import DiT, create_model

torch.manual_seed(0)


def tiny(**kw) -> DiT:
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return DiT(**{**cfg, **kw})


def inputs(model: DiT, n: int = 3):
    H, W = model.input_size
    return (torch.randn(n, model.in_channels, H, W), torch.randint(0, 1000, (n,)),
            torch.randint(0, model.num_classes, (n,)))


def test_initialisation_is_the_papers():
    model = tiny()
    for blk in model.blocks:
        assert torch.count_nonzero(blk.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(blk.adaLN_modulation[-1].bias) == 0
        assert blk.attn.qkv.bias.abs().max() == 0  # xavier weights, zero biases
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.final_layer.adaLN_modulation[-1].weight) == 0
    assert model.pos_embed.requires_grad is False
    big = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=1, num_heads=4, num_classes=1000)
    assert abs(big.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert abs(big.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    # xavier-uniform bound for qkv (fan_in 256, fan_out 768)
    bound = (6 / (256 + 768)) ** 0.5
    w = big.blocks[0].attn.qkv.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    # adaLN-Zero + zero final layer: the untrained model predicts exactly zero
    assert torch.count_nonzero(model(*inputs(model))) == 0


def test_learn_sigma_doubles_output_channels():
    model = tiny(learn_sigma=True)
    assert model(*inputs(model)).shape == (3, 8, 8, 8)
    model = tiny(learn_sigma=False)
    assert model(*inputs(model)).shape == (3, 4, 8, 8)


def test_non_square_16x24_forward_and_backward():
    model = DiT(input_size=(16, 24), patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    for p in model.parameters():  # leave the zero-init so gradients reach every layer
        p.data.add_(torch.randn_like(p) * 0.02)
    x, t, y = inputs(model, 2)
    out = model(x, t, y)
    assert out.shape == (2, 6, 16, 24)
    out.square().mean().backward()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    assert model.pos_embed.shape == (1, 4 * 6, 64)


def test_unpatchify_inverts_patchify_layout():
    model = DiT(input_size=(4, 6), patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                num_classes=2, learn_sigma=False)
    img = torch.arange(24.0).reshape(1, 1, 4, 6)
    # tokens in row-major patch order, each token the p x p patch flattened (row, col, channel)
    tokens = img.reshape(1, 1, 2, 2, 3, 2).permute(0, 2, 4, 3, 5, 1).reshape(1, 6, 4)
    assert torch.equal(model.unpatchify(tokens), img)


def test_forward_with_cfg_guides_all_channels_by_default_and_scale_one_is_conditional():
    model = tiny(learn_sigma=True)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    model.eval()
    x, t, _ = inputs(model, 2)
    y = torch.tensor([3, 7, 10, 10])
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    with torch.no_grad():
        cond, uncond = model(x, t, y[:2]), model(x, t, y[2:])
        out = model.forward_with_cfg(xx, tt, y, 2.5)
        one = model.forward_with_cfg(xx, tt, y, 1.0)
    expected = uncond[:, :4] + 2.5 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:2, :4], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2:, :4], out[:2, :4])  # the guided half is returned in both halves
    torch.testing.assert_close(out[:2, 4:], cond[:, 4:], atol=1e-6, rtol=0)  # learned variance passes through
    torch.testing.assert_close(out[2:, 4:], uncond[:, 4:], atol=1e-6, rtol=0)
    torch.testing.assert_close(one[:2], cond, atol=1e-5, rtol=0)


def test_label_dropout_uses_the_null_class_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    y = torch.tensor([1, 2, 3])
    assert torch.equal(model.y_embedder.token_drop(y), torch.full_like(y, 10))
    model.eval()
    emb = model.y_embedder(y, train=model.training)
    assert torch.equal(emb, model.y_embedder.embedding_table(y))


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny(input_size=(8, 12))
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = DiT.from_pretrained(tmp_path)
    assert loaded.input_size == (8, 12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_mismatched_checkpoint_names_the_keys():
    model = tiny()
    sd = model.state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.9.extra"] = torch.zeros(1)
    with pytest.raises(ValueError,
                       match=r"missing keys \(1\): blocks.1.mlp.fc2.bias.*unexpected keys \(1\): blocks.9.extra"):
        model.load_state_dict(sd)
    other = tiny(num_classes=20).state_dict()
    with pytest.raises(ValueError,
                       match="y_embedder.embedding_table.weight: checkpoint \\(21, 64\\) vs model \\(11, 64\\)"):
        model.load_state_dict(other)


LONG = torch.long


@pytest.mark.parametrize("make, match", [
    (lambda m: (torch.randn(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=LONG)), r"x must be \(N, 4, H, W\)"),
    (lambda m: (torch.randn(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=LONG)),
     r"built for input_size \(8, 8\)"),
    (lambda m: (torch.randn(2, 4, 9, 9), torch.zeros(2), torch.zeros(2, dtype=LONG)), "not divisible by patch size 2"),
    (lambda m: (torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([0, 11])),
     r"labels must be in 0..10; 10 is the null label"),
    (lambda m: (torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([-1, 0])), r"labels must be in 0..10"),
    (lambda m: (torch.randn(2, 4, 8, 8), torch.zeros(2, 1), torch.zeros(2, dtype=LONG)),
     r"t must be a 1-D tensor of 2"),
    (lambda m: (torch.randn(2, 4, 8, 8), torch.zeros(3), torch.zeros(2, dtype=LONG)), r"t must be a 1-D tensor of 2"),
    (lambda m: (torch.randn(2, 4, 8, 8), torch.zeros(2), torch.zeros(2)), "integer class labels"),
])
def test_bad_input_raises_value_error(make, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        model(*make(model))


def test_null_label_rejected_without_dropout():
    model = tiny(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="no null label"):
        model(torch.randn(1, 4, 8, 8), torch.zeros(1), torch.tensor([10]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="unknown block 'film'"):
        tiny(block="film")
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'.*DiT-S/2"):
        create_model("DiT-M/2")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    model = tiny()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t, y = inputs(model, 2)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cpu_half_precision_attention_path_matches_sdpa():
    from ditkit.models.layers import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    mask = torch.rand(2, 1, 1, 10) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        fast = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m).float()
        assert (fast - ref).abs().max() < 0.05  # bf16 rounding of inputs and output
        torch.testing.assert_close(attention(q, k, v, m), ref)  # fp32 takes SDPA itself
