"""Training convolutions in channels-last memory format.

oneDNN on a CPU (and cuDNN on recent GPUs) runs convolutions faster on
channels-last tensors: measured on a 2-core CPU at batch 128, one training step
is x1.7 faster on LeNet-5, x1.3 on ResNet-20 and x1.9 on MobileNetV2. Both the
4-D weights and the image batches must be in that layout to gain. Every training
loop pnp runs uses it (``trainer.channels_last``): the Lightning stages, the
weight-inheritance look-ahead and the teacher's outputs computed once for distillation.

One case is left to the usual layout: a strided 1x1 convolution over 2 to 15
input channels, which pruned ResNets' shortcuts often become. oneDNN's
channels-last kernel for its weight gradient writes past its workspace when the
input channels are fewer than its channel block (8 with AVX2, 16 with AVX-512;
oneDNN issue #6035): measured here, heap corruption or a hang with 2 to 7
channels. A model holding such a layer trains in the usual layout, and says so.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn as nn
from lightning_utilities.core.apply_func import apply_to_collection

# the trainer section's default (trainer.channels_last) and the Lightning modules' alike
CHANNELS_LAST = True


def channels_last_hazard(model: nn.Module) -> str | None:
    """Why ``model`` must not train channels-last (a layer oneDNN's kernels mistrain in it), or None."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) != (1, 1) or max(module.stride) == 1:
            continue
        channels = module.in_channels // module.groups
        if 1 < channels < 16:
            return (f"{name!r} is a strided 1x1 convolution over {channels} input channels, whose channels-last "
                    "weight gradient oneDNN computes wrongly below 16 channels (oneDNN issue #6035)")
    return None


def forward_layout(channels_last: bool = CHANNELS_LAST) -> torch.memory_format:
    """The memory format a model only run forward is given: every layout computes a forward pass right."""
    return torch.channels_last if channels_last else torch.contiguous_format


def training_layout(model: nn.Module, channels_last: bool = CHANNELS_LAST) -> torch.memory_format:
    """The memory format ``model`` trains in: channels-last when asked and safe for it (:func:`channels_last_hazard`)."""
    return forward_layout(channels_last and channels_last_hazard(model) is None)


def in_layout(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``x`` in ``layout`` if it is a 4-D image batch; other tensors as they are."""
    return x.contiguous(memory_format=layout) if x.dim() == 4 else x


def channels_last_batch(batch):
    """``batch`` with every 4-D tensor in channels-last memory format (others as they are)."""
    return apply_to_collection(batch, torch.Tensor, lambda t: in_layout(t, torch.channels_last))


class ChannelsLastModule(pl.LightningModule):
    """A LightningModule that fits, validates and tests in channels-last layout when ``channels_last`` is set.

    The module's 4-D weights change layout when a run starts (before the
    optimizers are made, so they follow) and every batch is converted once it is
    on the device. When the run ends the weights get the usual contiguous layout
    back, so whatever is pruned, measured or saved afterwards sees ordinary
    tensors. Values are the same in either layout; only the speed differs (so a
    LightningDataModule that overrides ``on_after_batch_transfer``, which then
    takes precedence, only gives up the batches' part of the gain).
    """

    def __init__(self, channels_last: bool = CHANNELS_LAST):
        super().__init__()
        self.channels_last = bool(channels_last)
        self._in_channels_last = False

    def setup(self, stage: str) -> None:
        self._in_channels_last = False
        if not self.channels_last:
            return
        hazard = channels_last_hazard(self)
        if hazard is not None:
            if self._trainer is None or self.trainer.is_global_zero:
                print(f"[pnp] training in the usual memory layout, not channels-last: {hazard}", flush=True)
            return
        self.to(memory_format=torch.channels_last)
        self._in_channels_last = True

    def teardown(self, stage: str) -> None:
        if self._in_channels_last:
            self.to(memory_format=torch.contiguous_format)
            self._in_channels_last = False

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return channels_last_batch(batch) if self._in_channels_last else batch
