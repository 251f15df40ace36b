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


class PerHeadAttention(torch.nn.Module):
    """TinyViT's layout: ``qkv``'s rows grouped by head (query, key, value of head 0, then of head 1, ...),
    ``proj`` reading ``out_dim`` channels, and a learned bias per head and token offset (heads in dim 0),
    cached per device in eval mode. Unlike timm's, the cache is not cleared by ``.eval()``, so a copy
    that survived the cut shows."""

    def __init__(self, dim: int, key_dim: int, val_dim: int, num_heads: int, tokens: int):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.out_dim = num_heads * val_dim
        self.qkv = torch.nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        self.proj = torch.nn.Linear(self.out_dim, dim)
        self.attention_biases = torch.nn.Parameter(torch.randn(num_heads, tokens))
        positions = torch.arange(tokens)
        self.register_buffer("offsets", (positions[:, None] - positions[None, :]).abs(), persistent=False)
        self.attention_bias_cache = {}

    def biases(self, device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.offsets]
        return self.attention_bias_cache.setdefault(str(device), self.attention_biases[:, self.offsets])

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.key_dim**-0.5 + self.biases(x.device)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.out_dim))


class PerHeadTransformer(torch.nn.Module):
    """Tokens ``[batch, 6, 8]``: an embedding, one residual :class:`PerHeadAttention` with 3 heads, a classifier."""

    def __init__(self, key_dim: int, val_dim: int):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.attn = PerHeadAttention(16, key_dim, val_dim, num_heads=3, tokens=6)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        return self.head(x + self.attn(x))


def per_head_transformer(key_dim: int, val_dim: int) -> PerHeadTransformer:
    torch.manual_seed(0)
    return PerHeadTransformer(key_dim, val_dim).eval()


def test_head_layout_tells_per_head_qkv_from_stacked_and_refuses_what_fits_neither():
    from pnp.core.attention import INTERLEAVED, STACKED, head_layout

    attn = per_head_transformer(key_dim=2, val_dim=3).attn
    layout = head_layout(attn, "attn")
    assert (layout.kind, layout.num_heads, layout.key_dim, layout.val_dim) == (INTERLEAVED, 3, 2, 3)
    assert layout.qkv_heads().tolist() == [0] * 7 + [1] * 7 + [2] * 7
    assert layout.proj_heads().tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert layout.per_head == (("attention_biases", 0),)

    vit_attn = vit()[0].blocks[0].attn  # 3 heads of 64: queries, then keys, then values
    stacked = head_layout(vit_attn, "attn")
    assert (stacked.kind, stacked.key_dim, stacked.val_dim) == (STACKED, 64, 64)
    assert stacked.qkv_heads().tolist() == ([0] * 64 + [1] * 64 + [2] * 64) * 3

    attn.val_dim = 4  # qkv and proj no longer hold 3 heads of (2 + 2 + 4) and 4 channels
    assert head_layout(attn, "attn") is None
    del attn.key_dim, attn.val_dim  # nor [3, 3 heads, 7 channels] (qkv has 21, not 63)
    assert head_layout(attn, "attn") is None


@pytest.mark.parametrize("key_dim, val_dim", [(4, 4), (4, 6)])
def test_per_head_qkv_heads_are_cut_exactly_with_their_biases_and_reload(key_dim, val_dim, gated_output, tmp_path):
    """Each head's query, key and value rows of qkv and its columns of proj go together; the biases follow."""
    model = per_head_transformer(key_dim, val_dim)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)  # eval mode: the layer caches its biases for all 3 heads
    groups = find_channel_groups(model, x, prove=True)
    heads = groups["attn.qkv"]
    assert (heads.size, heads.unit) == (3, "head"), groups.excluded
    assert {(m.module, m.side) for m in heads.members} == {("attn.qkv", "out"), ("attn.proj", "in")}
    keep = {"attn.qkv": torch.tensor([True, False, True])}  # the middle head goes

    pruned = apply_surgery(model, groups, keep, x, verify=True).eval()

    attn, original = pruned.attn, model.attn
    width = 2 * key_dim + val_dim
    rows = torch.cat([torch.arange(width), torch.arange(2 * width, 3 * width)])  # heads 0 and 2
    assert (attn.num_heads, attn.out_dim) == (2, 2 * val_dim)
    assert torch.equal(attn.qkv.weight, original.qkv.weight[rows])
    columns = torch.cat([torch.arange(val_dim), torch.arange(2 * val_dim, 3 * val_dim)])
    assert torch.equal(attn.proj.weight, original.proj.weight[:, columns])
    assert torch.equal(attn.attention_biases, original.attention_biases[[0, 2]])
    with torch.no_grad():
        actual = pruned(x)
    torch.testing.assert_close(actual, gated_output(model, groups, keep, x), rtol=1e-4, atol=1e-5)
    cost, counted = CostModel(groups), count_flops_params(pruned, x)
    assert float(cost.params(keep)) == counted.params
    assert float(cost.flops(keep)) == pytest.approx(counted.flops, rel=1e-6)

    save_pruned(pruned, tmp_path / "model", builder="test_transformers:per_head_transformer",
                builder_kwargs={"key_dim": key_dim, "val_dim": val_dim})
    loaded = load_pruned(tmp_path / "model", trust_builder=True).eval()
    assert (loaded.attn.num_heads, loaded.attn.out_dim) == (2, 2 * val_dim)
    assert torch.equal(loaded.attn.attention_biases, attn.attention_biases)
    with torch.no_grad():
        assert torch.equal(loaded(x), actual)


def test_tiny_vit_heads_are_prunable_units(randomize_norms, gated_output, tmp_path):
    """timm's TinyViT lays qkv out head by head, with biases per head in dim 0 and out_dim in its forward."""
    kwargs = {**DATA, "input_size": 64}
    torch.manual_seed(0)
    model = randomize_norms(build_model("timm:tiny_vit_5m_224", **kwargs).eval(), seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    groups = find_channel_groups(model, x, prove=True)
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Attention"}
    assert len(layers) == 10
    for name, attn in layers.items():
        heads = groups[f"{name}.qkv"]
        assert (heads.size, heads.unit) == (attn.num_heads, "head"), groups.excluded.get(f"{name}.qkv")
    keep = {g.name: torch.arange(g.size) != 1 for g in groups if g.unit == "head"}  # head 1 of every layer goes

    pruned = apply_surgery(model, groups, keep, x, verify=True).eval()

    attn, original = pruned.stages[2].blocks[0].attn, model.stages[2].blocks[0].attn
    assert (attn.num_heads, attn.out_dim) == (original.num_heads - 1, original.out_dim - original.val_dim)
    assert torch.equal(attn.attention_biases, original.attention_biases[[0, 2, 3, 4]])
    with torch.no_grad():
        actual = pruned(x)
    expected = gated_output(model, groups, keep, x)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(expected.abs().max())))
    save_pruned(pruned, tmp_path / "tiny_vit", builder="timm:tiny_vit_5m_224", builder_kwargs=kwargs)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "tiny_vit").eval()(x), actual)
