"""Whole attention heads as prunable units.

A multi-head self-attention layer projects its input to queries, keys and values
with one fused ``qkv`` Linear, splits them into ``num_heads`` heads, attends within
each head and mixes the heads' outputs with a ``proj`` Linear. A head is
independent of the others until ``proj``, so removing it (its rows of ``qkv``:
query, key and value; its columns of ``proj``) computes exactly what zeroing its
output before ``proj`` computes. pnp gates that input of ``proj`` per head, and
surgery cuts the head's channels and lowers the layer's ``num_heads``. The heads
kept keep their widths, so the attention scale is unchanged.

Two layouts of ``qkv``'s channels are recognised, from the layer's attributes
``qkv``, ``proj`` and ``num_heads``:

- stacked, ``[3, num_heads, head_dim]``: timm's ``Attention`` (ViT, DeiT and most
  of its transformers, with ``head_dim``) and Swin's ``WindowAttention`` (``qkv``'s
  width divided by three heads' worth). Parameters of the layer with one entry per
  head in their last dim (Swin's relative-position bias table) follow the heads.
- interleaved, ``[num_heads, key_dim + key_dim + val_dim]``: the layers that name
  their per-head widths ``key_dim`` and ``val_dim`` (TinyViT's and EfficientFormer's
  ``Attention``, after LeViT's), whose ``proj`` reads ``num_heads * val_dim``
  channels. Parameters with one entry per head in their first dim (the attention
  biases) follow the heads.

A layer whose widths fit neither layout is not taken for attention. The totals a
layer keeps as int attributes (``attn_dim``, ``out_dim``, ``val_attn_dim``,
``key_attn_dim``) follow the kept heads, and the copies of the biases it caches
(timm's ``attention_bias_cache``) are dropped. Groups built from a layout are proven by
surgery like every group through a reshape, so a layer that only looks like one (a
norm within heads, a gate, per-head tensors laid out otherwise) is left out with a
reason rather than cut wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

STACKED = "stacked"  # qkv channels [3, num_heads, head_dim]
INTERLEAVED = "interleaved"  # qkv channels [num_heads, key_dim + key_dim + val_dim]

# int attributes that hold a total width of the heads, and the per-head width each counts
_TOTAL_WIDTHS = {"attn_dim": "val_dim", "out_dim": "val_dim", "val_attn_dim": "val_dim", "key_attn_dim": "key_dim"}


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one attention layer live."""

    layer: str  # the attention module's qualified name
    qkv: str
    proj: str
    num_heads: int
    key_dim: int  # channels of one head's query, and of its key
    val_dim: int  # channels of one head's value, and of its share of proj's input
    kind: str  # how qkv's channels are laid out: STACKED or INTERLEAVED
    per_head: tuple[tuple[str, int], ...] = ()  # the layer's own parameters indexed by head: (name, dim)

    def qkv_heads(self) -> torch.Tensor:
        """Head of each ``qkv`` output channel."""
        heads = torch.arange(self.num_heads)
        if self.kind == INTERLEAVED:
            return heads.repeat_interleave(2 * self.key_dim + self.val_dim)
        return torch.cat([heads.repeat_interleave(width) for width in (self.key_dim, self.key_dim, self.val_dim)])

    def proj_heads(self) -> torch.Tensor:
        """Head of each ``proj`` input channel (laid out ``[num_heads, val_dim]``)."""
        return torch.arange(self.num_heads).repeat_interleave(self.val_dim)


def head_layout(module: nn.Module, name: str) -> HeadLayout | None:
    """The head layout of ``module`` when it is a fused-qkv attention layer, else None."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and _positive_int(heads)):
        return None
    if hasattr(module, "key_dim") or hasattr(module, "val_dim"):
        kind, head_axis = INTERLEAVED, 0
        key_dim, val_dim = getattr(module, "key_dim", None), getattr(module, "val_dim", None)
    else:
        kind, head_axis = STACKED, -1
        key_dim = getattr(module, "head_dim", None)
        if key_dim is None and qkv.out_features % (3 * heads) == 0:
            key_dim = qkv.out_features // (3 * heads)
        val_dim = key_dim
    if not (_positive_int(key_dim) and _positive_int(val_dim)):
        return None
    if qkv.out_features != heads * (2 * key_dim + val_dim) or proj.in_features != heads * val_dim:
        return None
    prefix = f"{name}." if name else ""
    per_head = tuple(
        (n, head_axis) for n, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[head_axis] == heads
    )
    return HeadLayout(name, prefix + "qkv", prefix + "proj", heads, key_dim, val_dim, kind, per_head)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def head_layouts(model: nn.Module) -> dict[str, HeadLayout]:
    """Every fused-qkv attention layer of ``model``, by the name of its ``qkv`` Linear."""
    layouts = {}
    for name, module in model.named_modules():
        layout = head_layout(module, name)
        if layout is not None:
            layouts[layout.qkv] = layout
    return layouts


def resize_attention(model: nn.Module, layouts: dict[str, HeadLayout], kept: dict[str, dict]) -> None:
    """Bring each attention layer in line with its cut ``qkv``: head count, total widths, per-head parameters.

    ``layouts`` are :func:`head_layouts` of the model before it was cut (same names);
    ``kept`` is the channel spec's ``{module: {"kept_out": [...], ...}}``. Surgery
    and artifact loading change the Linear layers; the layer's own ``num_heads``
    (and the totals it keeps, such as timm's ``attn_dim``) must follow, or its
    reshapes fail.
    """
    modules = dict(model.named_modules())
    for layout in layouts.values():
        kept_out = kept.get(layout.qkv, {}).get("kept_out")
        if kept_out is None:
            continue
        heads = sorted(set(layout.qkv_heads()[torch.as_tensor(kept_out, dtype=torch.long)].tolist()))
        module, proj = modules[layout.layer], modules[layout.proj]
        if proj.in_features != len(heads) * layout.val_dim:
            raise ValueError(
                f"attention layer {layout.layer!r} keeps {len(heads)} heads in qkv but "
                f"{proj.in_features / layout.val_dim:g} in proj; the channel spec does not describe this model"
            )
        for attr, per_head in _TOTAL_WIDTHS.items():
            width = getattr(layout, per_head)
            if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == layout.num_heads * width:
                setattr(module, attr, len(heads) * width)
        module.num_heads = len(heads)
        index = torch.tensor(heads, dtype=torch.long)
        for name, dim in layout.per_head:
            param = getattr(module, name)
            if param.shape[dim] == layout.num_heads:
                setattr(module, name, nn.Parameter(param.detach().index_select(dim, index.to(param.device)).contiguous(),
                                                   requires_grad=param.requires_grad))
        if isinstance(getattr(module, "attention_bias_cache", None), dict):
            module.attention_bias_cache = {}  # timm's per-device copies of the biases, taken before the cut

