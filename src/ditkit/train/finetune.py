"""Fine-tuning from a trained model (`init=`): the kind that wraps any other (`ditkit.train.kinds`), so the
loop, EMA, bf16, checkpoints and exact resume are the trainer's own.

    in full   every weight trains, started from the base's (its label table remapped to the run's classes)
    LoRA      lora_rank=R: peft adapters on the frozen base's attention and MLP layers (lora_targets), the
              label rows of new classes trained in full; checkpoints hold only those tensors, run.json the
              base's path and sha256, and OUT/adapter the adapter in peft's format

Classes are matched by name: shared ones keep their rows bit for bit, new ones start from the base's null row
(or the mean row), and the null row moves to the end. `replay_per_class` adds the base's own samples of the
classes the data lacks (prior preservation), drawn once from the run's seed and cached in OUT/replay.safetensors.
`init=CONFIG_FILE` trains that run first into OUT/base, as a two-phase one-step run does.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ditkit import checkpoint as ckpt
from ditkit import lora
from ditkit.config import BASE_DIR, class_list, is_config_file
from ditkit.data import ImageDataset
from ditkit.io import atomic_path
from ditkit.train.phases import train_first_phase

REPLAY_FILE = "replay.safetensors"


def relabel(data: ImageDataset, names: list[str]) -> ImageDataset:
    """`data` with labels indexing the label set `names` (every class of the data must be in it)."""
    absent = [n for n in data.class_names if n not in names]
    if absent:
        raise ValueError(f"classes={','.join(names)} leaves out the data's class(es) {', '.join(absent)}: add them")
    index = torch.tensor([names.index(n) for n in data.class_names], dtype=torch.long)
    return dataclasses.replace(data, labels=index[data.labels], num_classes=len(names), class_names=list(names))


class FinetuneKind:
    """Another kind (image, video, text), started from the base `c.init`; everything not defined here is the
    wrapped kind's."""

    def __init__(self, inner: Any, c: Any):
        self.inner, self.c = inner, c
        self.base, self.identity, self.facts = lora.load_source(c.init, num_heads=c.num_heads)
        self.mapping: list[int | None] | None = None
        self.lora: dict[str, Any] | None = None
        self.trainable: set[str] = set()
        check_time_scale(c, self.facts)
        data = inner.data
        if lora.label_table(self.base) is not None and data.conditional and data.captions is None:
            base_names = list(self.facts["class_names"])
            names = class_list(c.classes) or base_names + [n for n in data.class_names if n not in base_names]
            self.mapping = lora.class_mapping(base_names, names)
            inner.data = relabel(data, names)
            if c.replay_per_class:
                inner.data = with_replay(c, inner.data, data.class_names, base_names, self.identity["path"])
        elif data.captions is not None and c.classes is None and c.replay_per_class:
            if not self.facts.get("info", {}).get("conditional"):
                raise ValueError(f"replay_per_class on a text run draws the base's training captions: init={c.init} "
                                 f"records none (its data had no caption set, e.g. multi-object shapes)")
            inner.data = with_caption_replay(c, data, list(self.facts["class_names"]), self.identity["path"])
        elif c.classes is not None or c.replay_per_class:
            raise ValueError(f"classes and replay_per_class remap class labels: init={c.init} holds a "
                             f"{type(self.base).__name__} without a class table, or the data is not class-labelled")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def build(self) -> nn.Module:
        """The inner kind's model with the base's weights; with lora_rank, the adapter injected and all else
        frozen."""
        c = self.c
        model = self.inner.build()
        target = self.inner.saved(model)
        lora.load_base_into(target, self.base, self.mapping, c.new_class_init, c.init)
        if c.lora_rank is None:
            return model
        lora.require_peft("lora_rank")
        rows = [i for i, k in enumerate(self.mapping or []) if k is None]
        targets = [t.strip() for t in c.lora_targets.split(",") if t.strip()] if c.lora_targets else None
        self.lora = {"rank": c.lora_rank, "alpha": c.lora_alpha if c.lora_alpha is not None else float(c.lora_rank),
                     "modules": lora.lora_targets(target, targets), "token_rows": rows or None}
        model.requires_grad_(False)
        lora.add_adapter(target, lora.config_from_record(self.lora))
        self.trainable = {n for n, p in target.named_parameters() if p.requires_grad}
        return model

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a checkpoint holds: a LoRA run's adapter tensors only."""
        return {k: v for k, v in state.items() if k in self.trainable} if self.lora else state

    def load_checkpoint(self, module: nn.Module, state: dict[str, Tensor]) -> None:
        if not self.lora:
            module.load_state_dict(state)
            return
        if set(state) != self.trainable:
            raise ckpt.CheckpointError(f"the checkpoint's adapter does not match this config's (rank, targets or "
                                       f"classes differ): {sorted(set(state) ^ self.trainable)[:4]}")
        module.load_state_dict(state, strict=False)

    def run_info(self) -> dict[str, Any]:
        info = self.inner.run_info()
        names = self.inner.data.class_names
        classes = None if self.mapping is None else {"names": names, "mapping": self.mapping,
                                                     "base_names": list(self.facts["class_names"]),
                                                     "new_class_init": self.c.new_class_init}
        record = {"base": self.identity, "classes": classes}
        info["init"] = record
        if self.lora:
            info["adapter"] = {**record, "lora": self.lora}
        return info

    def sample_grid(self, path: Path, ema_model: nn.Module, objective: Any, device: torch.device,
                    seed: int) -> None:
        """The inner kind's grid; a base class the data lacks shows a blank image in the row of real ones. An
        adapter is sampled fused into a copy of the model: the same outputs, without peft's extra matmuls."""
        if self.lora:
            ema_model = lora.merge(copy.deepcopy(ema_model))
        data = self.inner.data
        absent = [k for k in range(data.num_classes) if not bool((data.labels == k).any())]
        if absent:
            blank = torch.full((len(absent), *data.images.shape[1:]), -1.0, dtype=data.images.dtype)
            self.inner.data = dataclasses.replace(data, images=torch.cat([data.images, blank]),
                                                  labels=torch.cat([data.labels, torch.tensor(absent)]))
        try:
            self.inner.sample_grid(path, ema_model, objective, device, seed)
        finally:
            self.inner.data = data

    def save_guide(self, ema_model: nn.Module, out: Path) -> None:
        if not self.lora:  # an adapted model is not a plain DiT to keep as a guide
            self.inner.save_guide(ema_model, out)


def check_time_scale(c: Any, facts: dict[str, Any]) -> None:
    """The base must be trained with the run's objective and fed time at its scale."""
    saved = (facts.get("info") or {}).get("train_config", {})
    if facts.get("objective") not in (None, c.objective):
        raise ValueError(f"init={c.init} was trained with objective={facts['objective']}: fine-tune it with the "
                         f"same objective (objective={facts['objective']})")
    scale = saved.get("flow_time_scale", c.flow_time_scale)
    if scale != c.flow_time_scale:
        raise ValueError(f"init={c.init} was trained with flow_time_scale={scale:g}: set flow_time_scale={scale:g}")


def with_replay(c: Any, data: ImageDataset, own: list[str], base_names: list[str], base: str) -> ImageDataset:
    """`data` plus replay_per_class samples of each base class that the data lacks, drawn from the base
    (the run's seed), as DreamBooth's prior preservation does; drawn once and kept in OUT/replay.safetensors."""
    wanted = [n for n in data.class_names if n in base_names and n not in own]
    if not wanted:
        return data
    images, labels = cached_replay(c, ",".join(wanted), lambda: draw_replay(
        c, base, [base_names.index(n) for n in wanted], [data.class_names.index(n) for n in wanted]))
    return dataclasses.replace(data, images=torch.cat([data.images, images.to(data.images)]),
                               labels=torch.cat([data.labels, labels]))


def with_caption_replay(c: Any, data: ImageDataset, base_captions: list[str], base: str) -> ImageDataset:
    """A text run's `data` plus replay_per_class samples of each of the base's training captions that the
    data lacks, drawn from the base with those captions (prior preservation for a new caption word); the
    captions join the data's class names."""
    have = set(data.captions)
    wanted = [t for t in base_captions if t not in have]
    if not wanted:
        return data
    first = len(data.class_names)
    images, labels = cached_replay(c, "\n".join(wanted), lambda: draw_caption_replay(c, base, wanted, first))
    return dataclasses.replace(data, images=torch.cat([data.images, images.to(data.images)]),
                               labels=torch.cat([data.labels, labels]), num_classes=first + len(wanted),
                               class_names=[*data.class_names, *wanted],
                               captions=[*data.captions, *(wanted[int(k) - first] for k in labels)])


def cached_replay(c: Any, what: str, draw: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The replayed (images, labels) of `what`, from OUT/replay.safetensors when it holds them for these
    settings, else drawn and written there."""
    path = Path(c.out) / REPLAY_FILE
    key = f"{c.replay_per_class}:{what}:{c.seed}"
    cached = load_file(str(path)) if path.is_file() else {}
    if cached and cached.get("key") is not None and bytes(cached["key"].tolist()).decode() == key:
        return cached["images"], cached["labels"]
    images, labels = draw()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous(), "labels": labels,
                   "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(tmp))
    return images, labels


def _replay_pipeline(c: Any, base: str, what: str) -> Any:
    from ditkit.pipeline import Pipeline

    pipe = Pipeline.load(base)
    if pipe.info.get("latent"):
        raise ValueError("replay_per_class draws images from the base: a latent run's base is not supported")
    print(f"replay: drawing {c.replay_per_class} samples of each of {what}", flush=True)
    return pipe


@torch.no_grad()
def draw_replay(c: Any, base: str, base_classes: list[int], labels: list[int]) -> tuple[Tensor, Tensor]:
    """The base's samples of `base_classes` (its own sampling settings), labelled `labels` in the new set."""
    pipe = _replay_pipeline(c, base, f"{len(base_classes)} base classes")
    samples = pipe.generate(classes=base_classes, n_per_class=c.replay_per_class, seed=c.seed, progress=False)
    index = {b: k for b, k in zip(base_classes, labels)}
    y = torch.tensor([index[int(b)] for b in torch.tensor(base_classes).repeat(c.replay_per_class)])
    return samples.images.float().clamp(-1, 1), y


@torch.no_grad()
def draw_caption_replay(c: Any, base: str, captions: list[str], first: int) -> tuple[Tensor, Tensor]:
    """The base's samples of `captions` (its own sampling settings), labelled first + the caption's index."""
    pipe = _replay_pipeline(c, base, f"{len(captions)} base captions")
    samples = pipe.generate(prompts=captions, n_per_class=c.replay_per_class, seed=c.seed, progress=False)
    return samples.images.float().clamp(-1, 1), samples.labels.long() + first


def finetune_kind(c: Any, kind: Any) -> Any:
    """The kind a run trains: `kind` itself, or wrapped to start from init=."""
    return kind if c.init is None else FinetuneKind(kind, c)


def train_init_base(c: Any, resume: bool, progress: bool, train: Callable[..., Any]) -> tuple[Any, bool]:
    """init=CONFIG_FILE: train that run into OUT/base first (init_minutes if set, this run's seed), then
    return the config with init= that run, and whether the fine-tune resumes. A run stopped in the first
    phase resumes there; one past it skips it."""
    if not is_config_file(c.init):
        return c, resume
    out = train_first_phase("init", c.init, Path(c.out) / BASE_DIR, {"seed": c.seed, "minutes": c.init_minutes},
                            f"the base run {c.init}", "fine-tuning from its newest checkpoint", progress, train)
    return dataclasses.replace(c, init=str(out)), resume and bool(ckpt.list_checkpoints(c.out))


def write_adapter(c: Any, checkpoint: Path | None) -> None:
    """A LoRA run's adapter in peft's format (OUT/adapter), from its newest checkpoint's EMA tensors."""
    if c.lora_rank is not None and checkpoint is not None:
        lora.export_adapter(checkpoint, Path(c.out) / lora.ADAPTER_DIR)
