"""Whole attention heads as prunable units.

A multi-head self-attention layer projects its input to queries, keys and values
with one fused ``qkv`` Linear, splits them into ``num_heads`` heads of
``head_dim`` channels, attends within each head and mixes the heads' outputs with
a ``proj`` Linear. A head is independent of the others until ``proj``, so
removing it (its rows of ``qkv``: query, key and value; its columns of ``proj``)
computes exactly what zeroing its output before ``proj`` computes. pnp gates that
input of ``proj`` per head, and surgery cuts the head's channels and lowers the
layer's ``num_heads``. Keys and queries keep ``head_dim``, so the attention scale
is unchanged.

The layout recognised is timm's (``Attention`` of ViT, DeiT and most of its
transformers, Swin's ``WindowAttention``): attributes ``qkv``, ``proj`` and
``num_heads`` (``head_dim`` too, or ``qkv``'s width divided by three heads' worth),
with ``qkv`` producing ``[3, num_heads, head_dim]`` channels. The layer's own
parameters with one entry per head in their last dim (Swin's relative-position bias
table) are cut to the kept heads as well. Groups built from it are
proven by surgery like every group through a reshape, so a layer that only looks
like one (a norm within heads, a gate, per-head tensors laid out otherwise) is left
out with a reason rather than cut wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one attention layer live."""

    layer: str  # the attention module's qualified name
    qkv: str
    proj: str
    num_heads: int
    head_dim: int
    per_head: tuple[str, ...] = ()  # the layer's own parameters indexed by head in their last dim

    def qkv_heads(self) -> torch.Tensor:
        """Head of each ``qkv`` output channel (laid out ``[3, num_heads, head_dim]``)."""
        heads = torch.arange(self.num_heads).repeat_interleave(self.head_dim)
        return heads.repeat(3)

    def proj_heads(self) -> torch.Tensor:
        """Head of each ``proj`` input channel (laid out ``[num_heads, head_dim]``)."""
        return torch.arange(self.num_heads).repeat_interleave(self.head_dim)


def head_layout(module: nn.Module, name: str) -> HeadLayout | None:
    """The head layout of ``module`` when it is a fused-qkv attention layer, else None."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return None
    if dim is None and qkv.out_features % (3 * heads) == 0:
        dim = qkv.out_features // (3 * heads)
    if not (isinstance(dim, int) and dim > 0):
        return None
    if qkv.out_features != 3 * heads * dim or proj.in_features != heads * dim:
        return None
    prefix = f"{name}." if name else ""
    per_head = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[-1] == heads)
    return HeadLayout(name, prefix + "qkv", prefix + "proj", heads, dim, per_head)


def head_layouts(model: nn.Module) -> dict[str, HeadLayout]:
    """Every fused-qkv attention layer of ``model``, by the name of its ``qkv`` Linear."""
    layouts = {}
    for name, module in model.named_modules():
        layout = head_layout(module, name)
        if layout is not None:
            layouts[layout.qkv] = layout
    return layouts


def resize_attention(model: nn.Module, layouts: dict[str, HeadLayout], kept: dict[str, dict]) -> None:
    """Bring each attention layer in line with its cut ``qkv``: head count, ``attn_dim``, per-head parameters.

    ``layouts`` are :func:`head_layouts` of the model before it was cut (same names);
    ``kept`` is the channel spec's ``{module: {"kept_out": [...], ...}}``. Surgery
    and artifact loading change the Linear layers; the layer's own ``num_heads``
    (and timm's ``attn_dim``) must follow, or its reshapes fail.
    """
    modules = dict(model.named_modules())
    for layout in layouts.values():
        kept_out = kept.get(layout.qkv, {}).get("kept_out")
        if kept_out is None:
            continue
        width = layout.num_heads * layout.head_dim
        heads = sorted({int(i) // layout.head_dim for i in kept_out if int(i) < width})
        module = modules[layout.layer]
        if modules[layout.proj].in_features != len(heads) * layout.head_dim:
            raise ValueError(
                f"attention layer {layout.layer!r} keeps {len(heads)} heads in qkv but "
                f"{modules[layout.proj].in_features / layout.head_dim:g} in proj; the channel spec does not describe this model"
            )
        module.num_heads = len(heads)
        if isinstance(getattr(module, "head_dim", None), int):
            module.head_dim = layout.head_dim
        if isinstance(getattr(module, "attn_dim", None), int):
            module.attn_dim = len(heads) * layout.head_dim
        index = torch.tensor(heads, dtype=torch.long)
        for name in layout.per_head:
            param = getattr(module, name)
            if param.shape[-1] == layout.num_heads:
                setattr(module, name, nn.Parameter(param.detach().index_select(-1, index.to(param.device)).contiguous(),
                                                   requires_grad=param.requires_grad))
