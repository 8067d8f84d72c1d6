"""The paper's conditioning designs (Fig. 3), the zoo, and its FLOP/parameter table."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import reference_path
from ditkit.evaluate.flops import count_params, dit_example_inputs, forward_gflops, zoo_table
from ditkit.models import create_model, list_models
from ditkit.models.dit import BLOCKS, DiT


@pytest.mark.parametrize("block", BLOCKS)
def test_each_design_fits_a_fixed_batch(block):
    """Regress a fixed target from fixed (x, t, y): the loss must fall by >= 20x in 300 AdamW steps."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=64, depth=2, num_heads=4,
                num_classes=4, learn_sigma=False, block=block)
    x, t, y = torch.randn(8, 2, 8, 8), torch.randint(0, 1000, (8,)), torch.arange(8) % 4
    target = torch.randn(8, 2, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    model.train()
    losses = []
    for _ in range(300):
        loss = (model(x, t, y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, f"{block}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_in_context_drops_condition_tokens_and_cross_attn_attends_to_two():
    torch.manual_seed(0)
    for block in ("in_context", "cross_attn"):
        model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                    num_classes=3, block=block)
        out = model(torch.randn(2, 2, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 2]))
        assert out.shape == (2, 4, 8, 8)


def test_design_flop_relation_at_xl2():
    """Paper: cross-attention adds roughly 15% GFLOPs over adaLN-Zero at DiT-XL/2; in-context about equal."""
    gflops = {}
    for block in BLOCKS:
        with torch.device("meta"):
            model = create_model("DiT-XL/2", block=block)
        gflops[block] = forward_gflops(model, dit_example_inputs(model))
    assert 1.12 < gflops["cross_attn"] / gflops["adaln_zero"] < 1.19
    assert abs(gflops["in_context"] / gflops["adaln_zero"] - 1) < 0.02
    assert abs(gflops["adaln"] / gflops["adaln_zero"] - 1) < 0.01


def test_zoo_matches_the_papers_table():
    paper = json.loads(reference_path("paper_tables.json").read_text())
    table = zoo_table()
    assert list(table) == list_models() and len(table) == 12
    for name, row in table.items():
        ref = paper["gflops_256px"][name]
        assert abs(row["gflops"] / ref - 1) < 0.01, f"{name}: {row['gflops']:.3f} vs paper {ref}"
        size = name.split("-")[1].split("/")[0]
        ref_params = paper["configs"][size]["params_millions"] * 1e6
        assert abs(row["params"] / ref_params - 1) < 0.01, f"{name}: {row['params']} params vs paper {ref_params:.0f}"


def test_params_counted_on_meta_equal_a_real_model():
    model = create_model("DiT-S/8", input_size=32, in_channels=4)
    with torch.device("meta"):
        meta = create_model("DiT-S/8", input_size=32, in_channels=4)
    assert count_params(model) == count_params(meta)


def test_flops_cli_json():
    out = subprocess.run([sys.executable, "-m", "ditkit.cli", "flops", "--json"], capture_output=True, text=True,
                         check=True)
    table = json.loads(out.stdout)
    assert set(table) == set(list_models())
    assert all(set(v) == {"params", "gflops"} and isinstance(v["params"], int) for v in table.values())
    assert abs(table["DiT-XL/2"]["gflops"] - 118.64) < 1.2
