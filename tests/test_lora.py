"""Fine-tuning from a trained run (init=) and LoRA adapters (peft): the adapter equals the base at
initialisation and at scale 0, merging equals the unfused model, peft loads ditkit's adapter to the same
outputs, an adapter run resumes bit-identically, and remapped classes keep the base's rows bit for bit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditkit import lora
from ditkit.checkpoint import FILES
from ditkit.checksums import CheckpointError, write_checksums
from ditkit.cli import main
from ditkit.models import DiT, MMDiT, PixArtDiT, VideoDiT
from ditkit.pipeline import Pipeline
from ditkit.train import build_config, train

pytest.importorskip("peft")

TINY = dict(data="mnist", image_size=8, hidden_size=32, depth=2, num_heads=2, patch_size=2, batch_size=8,
            warmup_steps=1, log_every=1, samples_per_class=1, precision="fp32", save_every=2)
SAMPLE = ["sample.steps=2"]


def tiny_config(out: Path, **values) -> object:
    return build_config(overrides={**TINY, "out": str(out), **values}, assignments=SAMPLE)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 2-step flow run on the digits 0, 1, 2 (8x8)."""
    out = tmp_path_factory.mktemp("lora") / "base"
    train(tiny_config(out, steps=2, data_args={"classes": [0, 1, 2]}), progress=False)
    return out


@pytest.fixture(scope="module")
def adapter(base) -> Path:
    """A 3-step rank-2 adapter that adds digit 3 (10 images) to the base, with 2 replayed samples of 0 and 1."""
    out = base.parent / "adapter"
    train(tiny_config(out, steps=3, init=str(base), lora_rank=2, replay_per_class=2,
                      data_args={"classes": [2, 3], "per_class": 10}), progress=False)
    return out


def batch(n_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n_classes, 1, 8, 8, generator=g), torch.rand(n_classes, generator=g), torch.arange(n_classes)


def test_the_run_records_its_base_and_classes_and_keeps_only_the_adapter(base, adapter):
    step = sorted((adapter / "checkpoints").iterdir())[-1]
    info = json.loads((step / "run.json").read_text())
    assert info["class_names"] == ["0", "1", "2", "3"]
    assert info["adapter"]["classes"]["mapping"] == [0, 1, 2, None]  # the null row moves behind the new class
    assert info["adapter"]["lora"]["token_rows"] == [3]
    assert Path(info["adapter"]["base"]["path"]) == sorted((base / "checkpoints").iterdir())[-1].resolve()
    assert all("lora_" in k or "trainable_tokens" in k for k in load_file(str(step / "ema.safetensors")))
    assert {p.name for p in (adapter / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}


def test_remapping_keeps_the_shared_rows_bit_identical(base, adapter):
    base_table = Pipeline.load(base).model.y_embedder.embedding_table.weight  # rows 0..2, then the null row
    model = lora.merge(Pipeline.load(adapter).model)
    table = model.y_embedder.embedding_table.weight
    assert table.shape[0] == 5
    assert torch.equal(table[:3], base_table[:3])
    assert torch.equal(table[4], base_table[3])  # the null row, moved to the end
    rows = lora.remapped_rows(base_table, 3, [0, 1, 2, None], null=True, new_init="mean")
    assert torch.equal(rows[3], base_table[:3].mean(0))


def test_adapter_equals_the_base_at_initialisation_and_at_scale_0(base, adapter):
    plain = lora.base_module(adapter)
    x, t, y = batch()
    expected = plain(x, t, y)
    lora.add_adapter(plain, lora.lora_config(4, None, lora.lora_targets(plain), token_rows=[3]))
    assert torch.equal(plain(x, t, y), expected)  # LoRA B = 0 and the new row starts as the base's own
    pipe = Pipeline.load(adapter)
    base_out = Pipeline.load(base).model(x[:3], t[:3], y[:3])
    pipe.scale_adapter(0.0)
    assert torch.equal(pipe.model(x[:3], t[:3], y[:3]), base_out)  # the shared classes: the base exactly
    pipe.scale_adapter(1.0)
    assert not torch.equal(pipe.model(x[:3], t[:3], y[:3]), base_out)


def test_merge_equals_the_unfused_model(adapter, tmp_path):
    pipe = Pipeline.load(adapter)
    x, t, y = batch()
    unfused = pipe.model(x, t, y)
    assert main([*f"merge {adapter} --out {tmp_path / 'merged'}".split()]) == 0
    merged = Pipeline.load(tmp_path / "merged").model
    assert type(merged.blocks[0].attn.qkv) is torch.nn.Linear
    assert (merged(x, t, y) - unfused).abs().max() < 1e-5


def test_peft_loads_the_adapter_to_the_same_outputs(adapter):
    from peft import PeftModel

    x, t, y = batch()
    ours = Pipeline.load(adapter).model(x, t, y)
    theirs = PeftModel.from_pretrained(lora.base_module(adapter), str(adapter / "adapter"))
    assert torch.equal(theirs(x, t, y), ours)


def test_an_adapter_run_resumes_bit_identically(base, tmp_path):
    values = dict(init=str(base), lora_rank=2, data_args={"classes": [2, 3], "per_class": 10})
    train(tiny_config(tmp_path / "once", steps=4, **values), progress=False)
    train(tiny_config(tmp_path / "twice", steps=2, **values), progress=False)
    train(tiny_config(tmp_path / "twice", steps=4, **values), resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "once/checkpoints/step_00000004" / name))
        b = load_file(str(tmp_path / "twice/checkpoints/step_00000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_starts_from_the_base(base, tmp_path):
    train(tiny_config(tmp_path / "full", steps=1, init=str(base), lr=1e-9, data_args={"classes": [1, 3]}),
          progress=False)
    info = json.loads(next((tmp_path / "full/checkpoints").iterdir()).joinpath("run.json").read_text())
    assert "adapter" not in info and info["init"]["classes"]["names"] == ["0", "1", "2", "3"]
    ours = Pipeline.load(tmp_path / "full").model.blocks[0].attn.qkv.weight
    assert (ours - Pipeline.load(base).model.blocks[0].attn.qkv.weight).abs().max() < 1e-6


def test_several_adapters_combine_with_weights(adapter, base, tmp_path):
    style = tmp_path / "style"  # an adapter on the base's own classes (no new rows): it combines with another
    train(tiny_config(style, steps=2, lr=0.05, init=str(base), lora_rank=2,
                      data_args={"classes": [0, 1], "per_class": 4}), progress=False)
    x, t, y = batch()
    alone = Pipeline.load(adapter).model(x, t, y)
    assert torch.equal(Pipeline.load(adapter, adapters={str(style): 0.0}).model(x, t, y), alone)
    both = Pipeline.load(adapter, adapters={str(style): 0.5}).model
    assert not torch.equal(both(x, t, y), alone)
    fused = lora.merge(Pipeline.load(adapter, adapters={str(style): 0.5}).model)
    assert (fused(x, t, y) - both(x, t, y)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="may not add classes"):
        Pipeline.load(style, adapters={str(adapter): 1.0})


@pytest.mark.parametrize("kind", ["pixart", "mmdit", "video", "cross_attn"])
def test_every_model_kind_takes_an_adapter_equal_to_it_at_initialisation(kind):
    torch.manual_seed(0)
    arch = dict(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, patch_size=2)
    g = torch.Generator().manual_seed(0)
    if kind == "pixart":
        model, args = PixArtDiT(context_dim=16, caption_length=4, **arch), (torch.randn(2, 4, 16, generator=g),)
    elif kind == "mmdit":
        model = MMDiT(context_dim=16, pooled_dim=16, **arch)
        args = (torch.randn(2, 4, 16, generator=g), torch.randn(2, 16, generator=g))
    elif kind == "video":
        model, args = VideoDiT(num_frames=2, num_classes=3, **arch), (torch.tensor([0, 2]),)
    else:
        model, args = DiT(block="cross_attn", num_classes=3, **arch), (torch.tensor([0, 2]),)
    x = torch.randn(2, 1, 2, 8, 8, generator=g) if kind == "video" else torch.randn(2, 1, 8, 8, generator=g)
    t = torch.rand(2, generator=g)
    model.eval()
    expected = model(x, t, *args)
    modules = lora.lora_targets(model, ["attention", "mlp"] + (["modulation"] if kind != "cross_attn" else []))
    assert any("qkv" in m for m in modules) and any("fc1" in m for m in modules)
    lora.add_adapter(model, lora.lora_config(2, None, modules))
    assert torch.equal(model(x, t, *args), expected)
    for module in model.modules():  # a trained adapter: B no longer zero
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    adapted = model(x, t, *args)
    assert (lora.merge(model)(x, t, *args) - adapted).abs().max() < 1e-5


def test_bad_adapter_input(base, adapter, tmp_path):
    model = lora.base_module(adapter)
    with pytest.raises(ValueError, match="valid ones are the groups attention, mlp, modulation"):
        lora.lora_targets(model, ["nonsense"])
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        tiny_config(tmp_path / "r", init=str(base), lora_rank=0)
    with pytest.raises(ValueError, match="more than once"):
        tiny_config(tmp_path / "r", init=str(base), classes="1,2,1")
    with pytest.raises(ValueError, match="set init=RUN"):
        tiny_config(tmp_path / "r", lora_rank=4)
    with pytest.raises(ValueError, match="hidden_size: the base has 32, this config 64"):
        train(tiny_config(tmp_path / "arch", steps=1, init=str(base), hidden_size=64, data_args={"classes": [1]}),
              progress=False)
    # the base changed or went away: the adapter refuses, naming both checksums / the recorded path
    moved, base_copy = tmp_path / "copy", tmp_path / "base_copy"
    shutil.copytree(adapter, moved)
    shutil.copytree(sorted((base / "checkpoints").iterdir())[-1], base_copy)
    step = sorted((moved / "checkpoints").iterdir())[-1]
    info = json.loads((step / "run.json").read_text())
    info["adapter"]["base"]["path"] = str(base_copy)
    (step / "run.json").write_text(json.dumps(info))
    write_checksums(step, FILES)
    Pipeline.load(moved)  # the same base elsewhere: fine
    weights = base_copy / info["adapter"]["base"]["weights"]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match=f"sha256 {info['adapter']['base']['sha256'][:16]}.*now has sha256"):
        Pipeline.load(moved)
    shutil.rmtree(base_copy)
    with pytest.raises(FileNotFoundError, match=f"the run recorded {base_copy}"):
        Pipeline.load(moved)


def test_the_cli_samples_with_a_scale(adapter, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(adapter), "--class", "3", "--n-per-class", "1", "--steps", "2",
                 "--lora-scale", "0.5", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["sample", "--ckpt", str(adapter.parent / "base"), "--steps", "2", "--lora-scale", "0.5",
                 "--out", str(tmp_path / "b.png")]) == 2
    assert "lora_scale applies to adapter runs" in capsys.readouterr().err


def test_the_web_page_offers_the_scale_of_an_adapter_run(adapter, base):
    from ditkit.app.engine import facts
    from ditkit.app.params import generate_args

    adapted = facts(Pipeline.load(adapter))
    assert adapted["adapter"] and not facts(Pipeline.load(base))["adapter"]
    assert generate_args({"lora_scale": "0.5", "classes": "3"}, adapted)["lora_scale"] == 0.5
    with pytest.raises(ValueError, match="LoRA scale"):
        generate_args({"lora_scale": "9"}, adapted)


def test_an_original_dit_pt_file_is_a_base(tmp_path):
    torch.manual_seed(0)
    original = DiT(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, patch_size=2, num_classes=10,
                   learn_sigma=True)
    torch.save(original.state_dict(), tmp_path / "tiny.pt")
    out = tmp_path / "from_pt"
    train(tiny_config(out, steps=1, objective="ddpm", init=str(tmp_path / "tiny.pt"), lora_rank=2,
                      data_args={"classes": [3, 4], "per_class": 4}), progress=False)
    info = json.loads(next((out / "checkpoints").iterdir()).joinpath("run.json").read_text())
    assert info["adapter"]["base"]["weights"] == "tiny.pt" and info["adapter"]["lora"]["token_rows"] is None
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 4])
    ours = Pipeline.load(out)
    ours.scale_adapter(0.0)
    assert torch.equal(ours.model(x, t, y), original.eval()(x, t, y))  # digits 3, 4 are the base's own rows


ARCH = "image_size=8 hidden_size=32 depth=2 num_heads=2 patch_size=2 batch_size=8 precision=fp32 --steps 1"


@pytest.mark.parametrize("args, expected", [
    ("--init {base} --lora-rank 0", "lora_rank must be >= 1"),
    ("--init {base} --lora-rank 2 " + ARCH + " data_args={{\"classes\":[1]}} --lora-targets fc9",
     "unknown LoRA target 'fc9' for a DiT: the valid ones are the groups attention, mlp, modulation or the modules"),
    ("--init {base} --classes 0 1 0", "lists 0 more than once"),
    ("--init {base} " + ARCH.replace("hidden_size=32", "hidden_size=48") + " data_args={{\"classes\":[1]}}",
     "hidden_size: the base has 32, this config 48"),
    ("--init {tmp}/nothing", "no such run, checkpoint directory, diffusers directory or .pt file"),
    ("--lora-rank 4", "set init=RUN"),
])
def test_bad_fine_tuning_input_is_one_line(base, tmp_path, capsys, args, expected):
    argv = ["train", "--out", str(tmp_path / "out"), *args.format(base=base, tmp=tmp_path).split()]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditkit train: error: ") and expected in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_config_file_as_init_is_trained_first_into_out_base(tmp_path):
    tiny = {**TINY, "steps": 2, "sample": {"steps": 2}}
    (tmp_path / "base.json").write_text(json.dumps({**tiny, "data_args": {"classes": [0, 1]}}))
    (tmp_path / "lora.json").write_text(json.dumps({**tiny, "init": "base.json", "lora_rank": 2,
                                                    "data_args": {"classes": [2], "per_class": 8}}))
    out = tmp_path / "run"
    config = build_config(str(tmp_path / "lora.json"), {"out": str(out)})
    train(config, progress=False)
    assert (out / "base" / "finished.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert Pipeline.load(out).class_names == ["0", "1", "2"]
    main(["train", "--config", str(tmp_path / "lora.json"), "--out", str(out), "--resume", "--steps", "3"])
    assert (out / "checkpoints" / "step_00000003").is_dir()  # phase 1 is not trained again


def test_a_diffusers_directory_is_a_base(tmp_path):
    from ditkit.interop.diffusers import to_diffusers

    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    original = DiT(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, patch_size=2, num_classes=10,
                   learn_sigma=True).eval()
    to_diffusers(original).save_pretrained(tmp_path / "hf")
    out = tmp_path / "from_hf"
    train(tiny_config(out, steps=1, objective="ddpm", init=str(tmp_path / "hf"), lora_rank=2,
                      data_args={"classes": [3, 4], "per_class": 4}), progress=False)
    info = json.loads(next((out / "checkpoints").iterdir()).joinpath("run.json").read_text())
    assert info["adapter"]["base"]["weights"] == "diffusion_pytorch_model.safetensors"
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 4])
    ours = Pipeline.load(out)
    ours.scale_adapter(0.0)
    torch.testing.assert_close(ours.model(x, t, y), original(x, t, y), atol=1e-5, rtol=0)


def test_an_adapter_trains_on_images_of_another_size(base, tmp_path):
    """The base was trained on 8x8 digits; an adapter run on 12x12 ones recomputes the fixed positions for
    the larger grid (DiT's sin-cos table is a function of the grid) and samples at 12x12."""
    out = tmp_path / "larger"
    train(tiny_config(out, steps=1, image_size=12, init=str(base), lora_rank=2, data_args={"classes": [1]}),
          progress=False)
    pipe = Pipeline.load(out, device="cpu")
    assert pipe.image_size == (12, 12) and pipe.model.pos_embed.shape[1] == 36
    assert pipe.generate(classes=[0], steps=2, progress=False).images.shape == (1, 1, 12, 12)


def test_a_text_adapter_replays_the_base_captions_the_data_lacks(tmp_path):
    """replay_per_class on a text run: the base's own samples of each of its training captions that the
    adapter's data lacks join the data with those captions (prior preservation for a new caption word)."""
    from ditkit.train.finetune import REPLAY_FILE

    text = dict(data="shapes", text_model="pixart", text_encoder="bytes", text_max_length=24, image_size=8,
                hidden_size=32, depth=2, num_heads=2, patch_size=4, batch_size=8, warmup_steps=1, precision="fp32",
                samples_per_class=1, save_every=100)
    base = tmp_path / "base"
    train(build_config(overrides={**text, "out": str(base), "steps": 1,
                                  "data_args": {"n": 30, "colours": ["red", "blue"]}}, assignments=SAMPLE),
          progress=False)
    out = tmp_path / "yellow"
    c = build_config(overrides={**text, "out": str(out), "steps": 1, "init": str(base), "lora_rank": 2,
                                "replay_per_class": 1, "data_args": {"n": 15, "colours": ["yellow"]}},
                     assignments=SAMPLE)
    from ditkit.train.finetune import finetune_kind
    from ditkit.train.kinds import make_kind

    data = finetune_kind(c, make_kind(c)).data
    assert len(data.images) == 15 + 30 and data.num_classes == 45 == len(data.class_names)
    assert sum("yellow" in t for t in data.captions) == 15 and sum("red" in t for t in data.captions) == 15
    assert [data.class_names[k] for k in data.labels] == data.captions
    train(c, progress=False)
    assert (out / REPLAY_FILE).is_file() and Pipeline.load(out, device="cpu").info["adapter"]
