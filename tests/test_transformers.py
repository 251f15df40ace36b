"""Transformers: every MLP hidden unit and every whole attention head is prunable, exactly; the residual stream is left out with its reason."""

from __future__ import annotations

import re

import pytest
import torch

timm = pytest.importorskip("timm")

from pnp.core.artifacts import load_pruned, save_pruned  # noqa: E402
from pnp.core.builders import build_model  # noqa: E402
from pnp.core.cost import CostModel, count_flops_params  # noqa: E402
from pnp.core.groups import find_channel_groups  # noqa: E402
from pnp.core.surgery import apply_surgery  # noqa: E402
from test_torchvision_models import random_keep  # noqa: E402

DATA = {"in_channels": 3, "num_classes": 10, "input_size": 32}


def vit(name: str = "vit_tiny_patch16_224", randomize_norms=None, **kwargs):
    """An untrained two-block ViT on 32 px images (patch 8) and its example input."""
    torch.manual_seed(0)
    model = build_model(f"timm:{name}", **DATA, patch_size=8, depth=2, **kwargs).eval()
    if randomize_norms is not None:
        model = randomize_norms(model, seed=1)
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_every_mlp_unit_and_attention_head_is_prunable(name):
    model, x = vit(name)
    groups = find_channel_groups(model, x, prove=True)

    for i, block in enumerate(model.blocks):
        heads = groups[f"blocks.{i}.attn.qkv"]
        assert (heads.size, heads.unit) == (block.attn.num_heads, "head")
        assert {(m.module, m.side) for m in heads.members} == {(f"blocks.{i}.attn.qkv", "out"), (f"blocks.{i}.attn.proj", "in")}
        mlp = groups[f"blocks.{i}.mlp.fc1"]
        assert (mlp.size, mlp.unit) == (block.mlp.fc1.out_features, "channel")
    # the embedding width is the residual stream, normalised by every block's LayerNorm
    assert set(groups.excluded) == {"head", "blocks.1.mlp.fc2"}
    assert re.search(r"LayerNorm .*normalises across channels", groups.excluded["blocks.1.mlp.fc2"])
    assert "model's output" in groups.excluded["head"]


def test_pruned_vit_matches_the_gated_vit_and_reloads(randomize_norms, gated_output, tmp_path):
    model, x = vit(randomize_norms=randomize_norms)
    groups = find_channel_groups(model, x)
    keep = random_keep(groups, seed=3, low=0.3, high=0.7)
    keep["blocks.0.attn.qkv"] = torch.tensor([True, False, True])  # the middle head goes

    pruned = apply_surgery(model, groups, keep, x, verify=True).eval()

    assert pruned.blocks[0].attn.num_heads == 2 and pruned.blocks[0].attn.qkv.out_features == 2 * 3 * 64
    assert pruned.blocks[0].attn.proj.in_features == 2 * 64
    with torch.no_grad():
        actual = pruned(x)
    expected = gated_output(model, groups, keep, x)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(expected.abs().max())))

    # a head costs its query, key and value rows and its columns of proj
    cost, counted = CostModel(groups), count_flops_params(pruned, x)
    assert float(cost.params(keep)) == pytest.approx(counted.params, rel=1e-6)
    assert float(cost.flops(keep)) == pytest.approx(counted.flops, rel=1e-6)

    save_pruned(pruned, tmp_path / "vit", builder="timm:vit_tiny_patch16_224",
                builder_kwargs={**DATA, "patch_size": 8, "depth": 2})
    loaded = load_pruned(tmp_path / "vit")
    assert loaded.blocks[0].attn.num_heads == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), actual)


def test_attention_whose_heads_reach_a_norm_is_left_out_with_the_layer_named():
    """With qk_norm, each head's queries and keys pass a LayerNorm that pnp does not cut head by head."""
    model, x = vit(qk_norm=True)
    groups = find_channel_groups(model, x)
    why = groups.excluded["blocks.0.attn.qkv"]
    assert "attention layer 'blocks.0.attn'" in why and "q_norm" in why
    assert groups["blocks.0.mlp.fc1"].size == model.blocks[0].mlp.fc1.out_features  # the MLP is still prunable


@pytest.mark.parametrize("criterion", ["l1", "magnitude"])
def test_criteria_score_whole_heads(criterion):
    """Weight inheritance and the criteria baselines rank heads as units, one score per head."""
    from pnp.core.criteria import channel_importance
    from pnp.core.readout import reselect_keep

    model, x = vit()
    groups = find_channel_groups(model, x)
    scores = channel_importance(model, groups, criterion)
    assert scores["blocks.0.attn.qkv"].shape == (model.blocks[0].attn.num_heads,)
    keep = {g.name: torch.arange(g.size) < max(1, g.size // 2) for g in groups}
    chosen, _ = reselect_keep(groups, keep, scores)
    pruned = apply_surgery(model, groups, chosen, x, verify=True)
    assert pruned.blocks[0].attn.num_heads == 1


def test_pipeline_prunes_a_vit_under_a_flops_budget(tmp_path):
    """pnp-pipeline end to end on a small ViT: heads and MLP units cut, the budget met, the model reloads."""
    from test_pipeline import compose_config, quick_overrides, write_fashion_mnist

    from pnp.cli.main import run

    out = tmp_path / "run"
    overrides = quick_overrides(write_fashion_mnist(tmp_path / "fashion"), out) + [
        "model=timm", "model.name=vit_tiny_patch16_224", "+model.kwargs.patch_size=7", "+model.kwargs.depth=2",
        "+model.kwargs.embed_dim=32", "+model.kwargs.num_heads=4", "train.optimizer=adam", "train.lr=0.002",
        "readout.budget=0.5",
    ]
    report = run("pipeline", compose_config("pipeline", overrides), out)

    assert report["after"]["flops"] <= 0.5 * report["before"]["flops"]
    pruned = load_pruned(out / "finetune" / "model")
    widths = [(b.attn.num_heads, b.mlp.fc1.out_features) for b in pruned.blocks]
    assert sum(h for h, _ in widths) + sum(u for _, u in widths) < 2 * 4 + 2 * 128, widths
    with torch.no_grad():
        assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_swin_heads_cut_with_their_bias_table_and_reload(randomize_norms, gated_output, tmp_path):
    """Swin's window attention: no head_dim attribute and a relative-position bias table with a column per head."""
    kwargs = {**DATA, "input_size": 64, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4)}
    torch.manual_seed(0)
    model = randomize_norms(build_model("timm:swin_tiny_patch4_window7_224", **kwargs).eval(), seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    groups = find_channel_groups(model, x, prove=True)
    heads = [g for g in groups if g.unit == "head"]
    assert [g.size for g in heads] == [2, 2, 4, 4], groups.excluded
    keep = {g.name: torch.arange(g.size) == g.size - 1 for g in heads}  # the last head of every layer

    pruned = apply_surgery(model, groups, keep, x, verify=True).eval()

    table = model.layers[1].blocks[1].attn.relative_position_bias_table
    assert torch.equal(pruned.layers[1].blocks[1].attn.relative_position_bias_table, table[:, 3:])
    with torch.no_grad():
        actual = pruned(x)
    expected = gated_output(model, groups, keep, x)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(expected.abs().max())))
    assert float(CostModel(groups).params(keep)) == count_flops_params(pruned, x).params
    save_pruned(pruned, tmp_path / "swin", builder="timm:swin_tiny_patch4_window7_224", builder_kwargs=kwargs)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "swin")(x), actual)
