"""Channel sections whose sizes a module holds: fixed-size splits and slices.

Some modules cut their input's channels into sections of sizes written in the
module: timm's ``MixedConv2d`` (MixNet) splits it with ``torch.split(x, self.splits, 1)``
and runs one convolution per section; GhostNet's module keeps the first channels of
a concatenation, ``cat([x1, x2], 1)[:, :self.out_chs]``. torch-pruning follows the
channels through the split or the slice, but the module's attribute keeps the old
sizes once channels are removed: the split's sizes no longer add up, or the slice
keeps the wrong channels.

While a model is traced, every split with fixed sizes and every slice of channels
is attributed to the innermost module running it (:func:`record_section_owners`). A
split's sizes held by exactly one attribute of that module (a list or tuple equal to
them), or a slice bound that cuts channels held by exactly one (an int equal to it),
becomes a :class:`SizeAttribute`. Groups whose channels pass through it carry each
channel's position in the split or sliced tensor; the channel spec carries the
attribute's new value (what each section keeps, or how many kept channels lie below
the bound), and surgery and artifact loading set it (:func:`resize_sections`).

Handled: ``torch.split`` with a list of sizes and ``x[:, a:b]`` with step 1, both on
the channel dimension. A split or slice whose sizes no attribute holds is left as
it is (its groups are proven by surgery, as every group through a split or slice
is); several attributes holding them leave the group out, since pnp cannot tell
which one the module reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

_INT64_MAX = 2**63 - 1  # a slice to the end saves this end; negative bounds are saved as 2**64 + bound
_SECTIONING = ("SplitWithSizesBackward", "SliceBackward")  # autograd nodes of a split with sizes, of a slice


@dataclass(frozen=True)
class SizeAttribute:
    """An attribute of a module that holds a split's section sizes or a slice's bound.

    ``call`` tells apart the splits and slices one module makes (in the order it runs
    them): each resizes the attribute on its own, and all must agree.
    """

    module: str  # qualified name of the module whose forward splits or slices
    attr: str
    value: int | tuple[int, ...]  # the split's sizes, or the slice's bound
    call: int = 0

    def resized(self, removed: set[int]) -> int | list[int]:
        """The value once the channels at positions ``removed`` (of the split or sliced tensor) are gone."""
        if isinstance(self.value, int):
            return self.value - sum(1 for p in removed if p < self.value)
        sizes, start = [], 0
        for size in self.value:
            sizes.append(size - sum(1 for p in removed if start <= p < start + size))
            start += size
        return sizes


@contextlib.contextmanager
def record_section_owners(model: nn.Module, record: dict):
    """Note, in ``record``, the innermost module running each split or slice: ``{grad_fn: module}``."""
    running: list[nn.Module] = []

    def enter(module, args):
        running.append(module)

    def leave(module, args, output):
        if running and running[-1] is module:
            running.pop()

    class _Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            grad_fn = first.grad_fn if isinstance(first, torch.Tensor) else None
            if running and grad_fn is not None and grad_fn.name().startswith(_SECTIONING):
                record.setdefault(grad_fn, running[-1])
            return out

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with _Recorder():
            yield record
    finally:
        for h in handles:
            h.remove()


def size_attributes(grad_fn, module: nn.Module, name: str, call: int) -> tuple[SizeAttribute, ...] | str:
    """The attributes of ``module`` (named ``name``) that a split or slice of channels reads its sizes from.

    Empty when the op does not cut channels into fixed sizes, or no attribute holds
    them; a reason string when several attributes could.
    """
    dims = tuple(int(d) for d in grad_fn._saved_self_sym_sizes)
    dim = int(grad_fn._saved_dim) % len(dims)
    if grad_fn.name().startswith(_SECTIONING[0]):
        if dim != 1:
            return ()
        wanted = [tuple(int(s) for s in grad_fn._saved_split_sizes)]
    else:
        # the channel dim as torch-pruning maps slices: of a map [N, C, H, W] or a batch [N, C], of tokens [N, L, C]
        if dim != (2 if len(dims) == 3 else 1) or len(dims) not in (2, 3, 4):
            return ()
        start, end, step = (int(getattr(grad_fn, f"_saved_{k}")) for k in ("start", "end", "step"))
        if step != 1 or start > _INT64_MAX or end > _INT64_MAX:
            return ()  # strided, or counted from the end: left to the proof by surgery
        wanted = [b for b in (start, end) if 0 < b < dims[dim]]
    found = []
    for value in wanted:
        holders = [attr for attr, held in vars(module).items() if not attr.startswith("_") and _holds(held, value)]
        if len(holders) > 1:
            return (f"the sizes {list(value) if isinstance(value, tuple) else value} of a split or slice of its "
                    f"channels in {name!r} are held by several attributes ({', '.join(holders)}), and pnp cannot "
                    "tell which one the module reads")
        if not holders:
            return ()
        found.append(SizeAttribute(name, holders[0], value, call))
    return tuple(found)


def _holds(held, value) -> bool:
    if isinstance(value, int):
        return type(held) is int and held == value
    return (isinstance(held, (list, tuple)) and all(type(v) is int for v in held)
            and tuple(held) == value)


def resize_sections(model: nn.Module, sizes: dict[str, dict[str, int | list[int]]]) -> None:
    """Set each module attribute of ``sizes`` (``{module: {attribute: new value}}``) after its channels were cut.

    Surgery and artifact loading call it with the channel spec's ``section_sizes``;
    raises ValueError naming the module and attribute when ``model`` has no such
    attribute or it holds something else (a model other than the one the spec describes).
    """
    modules = dict(model.named_modules())
    for name, attrs in sizes.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"section sizes name module {name!r}, which the model does not have")
        for attr, new in attrs.items():
            held = getattr(module, attr, None)
            if isinstance(new, int) and not isinstance(new, bool):
                fits = type(held) is int and 0 <= new <= held
            else:
                fits = (isinstance(new, list) and isinstance(held, (list, tuple)) and len(new) == len(held)
                        and all(type(n) is int and type(h) is int and 0 <= n <= h for n, h in zip(new, held)))
            if not fits:
                raise ValueError(
                    f"section sizes set {name}.{attr} to {new!r}, but the model's {type(module).__name__} holds "
                    f"{held!r} there; the sizes do not describe this model"
                )
            setattr(module, attr, new if isinstance(new, int) else type(held)(new))
