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
transformers): attributes ``qkv``, ``proj``, ``num_heads`` and ``head_dim``, with
``qkv`` producing ``[3, num_heads, head_dim]`` channels. Groups built from it are
proven by surgery like every group through a reshape, so a layer that only looks
like one (extra per-head tensors, a norm across heads) is left out with a reason
rather than cut wrongly.
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
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return None
    if not (isinstance(heads, int) and isinstance(dim, int) and heads > 0 and dim > 0):
        return None
    if qkv.out_features != 3 * heads * dim or proj.in_features != heads * dim:
        return None
    prefix = f"{name}." if name else ""
    return HeadLayout(name, prefix + "qkv", prefix + "proj", heads, dim)


def head_layouts(model: nn.Module) -> dict[str, HeadLayout]:
    """Every fused-qkv attention layer of ``model``, by the name of its ``qkv`` Linear."""
    layouts = {}
    for name, module in model.named_modules():
        layout = head_layout(module, name)
        if layout is not None:
            layouts[layout.qkv] = layout
    return layouts


def resize_attention(model: nn.Module) -> None:
    """Set each attention layer's head count to what its cut ``qkv`` and ``proj`` hold.

    Surgery and artifact loading change the Linear layers; the layer's own
    ``num_heads`` (and timm's ``attn_dim``) must follow, or its reshapes fail.
    """
    for name, module in model.named_modules():
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        heads, dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)):
            continue
        if not isinstance(dim, int) or dim <= 0 or qkv.out_features % (3 * dim) or proj.in_features % dim:
            continue
        kept = qkv.out_features // (3 * dim)
        if kept == heads:
            continue
        if proj.in_features != kept * dim:
            raise ValueError(
                f"attention layer {name!r} keeps {kept} heads in qkv but {proj.in_features // dim} in proj; "
                "the channel spec does not describe this model"
            )
        module.num_heads = kept
        if isinstance(getattr(module, "attn_dim", None), int):
            module.attn_dim = kept * dim
