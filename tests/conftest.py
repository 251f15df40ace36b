"""Fixtures shared by the core tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


def randomize_norm_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters.

    Freshly built models have mean 0, variance 1, weight 1 and bias 0, which hide
    bugs that drop a channel's shift or scale in the wrong place.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                    module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    module.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def gated_outputs(model: nn.Module, groups, keep, *inputs):
    """``model``'s outputs on ``inputs`` with each group gated by ``keep`` (its hooks removed afterwards)."""
    from pnp.core.gating import GatedModel

    gated = GatedModel(model, groups)
    try:
        with torch.no_grad():
            return gated(*inputs, masks={name: k.float() for name, k in keep.items()})
    finally:
        gated.remove()


@pytest.fixture(scope="session")
def gated_output():
    """The function :func:`gated_outputs`, to compare a pruned model with the gated original."""
    return gated_outputs


@pytest.fixture(scope="session")
def randomize_norms():
    """The function :func:`randomize_norm_layers`, for tests that build their own models."""
    return randomize_norm_layers


class SmallResidualCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block, a pooled Linear classifier."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(y)))
        x = self.relu(self.head(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def small_cnn():
    """``(model, example input)``: a seeded :class:`SmallResidualCNN` in eval mode with random BN stats."""
    torch.manual_seed(0)
    model = randomize_norm_layers(SmallResidualCNN().eval())
    return model, torch.randn(2, 3, 16, 16)


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """Run the tests' small tensors on one thread.

    Threads cost more than they save on tensors this small, and on a busy machine
    OpenMP threads waiting for each other make a test many times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
