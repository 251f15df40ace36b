"""ONNX export of pruned models: the file runs in onnxruntime and computes what torch computes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from pnp.core.artifacts import export_onnx
from pnp.core.groups import find_channel_groups, keep_from_ratio
from pnp.core.surgery import apply_surgery

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def prune(model: nn.Module, x: torch.Tensor) -> nn.Module:
    groups = find_channel_groups(model, x)
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_surgery(model, groups, keep, x).eval()


@pytest.fixture(scope="module")
def pruned(x):
    return prune(torchvision.models.resnet18(num_classes=10).eval(), x)


@pytest.fixture(scope="module")
def pruned_small(x):
    """A pruned conv-BN-ReLU stack with a residual add: quicker to export than resnet18."""

    class SmallNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x):
            x = self.stem(x)
            return self.head(torch.relu(x + self.block(x)))

    model = SmallNet().eval()
    for bn in (model.stem[1], model.block[1]):  # non-trivial statistics, so BatchNorm folding shows
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return prune(model, x)


def run_onnx(path, batch: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: batch.numpy()})[0]


def torch_outputs(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(batch).numpy()


def test_pruned_model_runs_in_onnxruntime_with_any_batch_size(pruned, x, tmp_path):
    pruned.train()  # export must use inference behaviour and give the model back as it was
    path = export_onnx(pruned, tmp_path / "pruned.onnx", x)
    assert pruned.training
    pruned.eval()

    assert path == tmp_path / "pruned.onnx"
    assert [op.version for op in onnx.load(str(path)).opset_import if op.domain in ("", "ai.onnx")] == [17]
    for batch in (x, torch.randn(4, 3, 32, 32)):
        np.testing.assert_allclose(run_onnx(path, batch), torch_outputs(pruned, batch), atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx"]


def test_opset_18_export_matches_torch(pruned_small, tmp_path):
    assert pruned_small.head[2].in_features < 16
    batch = torch.randn(3, 3, 32, 32)
    path = export_onnx(pruned_small, tmp_path / "pruned.onnx", batch[:1], opset=18)

    assert [op.version for op in onnx.load(str(path)).opset_import if op.domain in ("", "ai.onnx")] == [18]
    np.testing.assert_allclose(run_onnx(path, batch), torch_outputs(pruned_small, batch), atol=1e-4, rtol=0)


def test_fixed_batch_export_records_the_example_shape(pruned_small, x, tmp_path):
    path = export_onnx(pruned_small, tmp_path / "pruned.onnx", x, dynamic_batch=False)

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 32, 32]
    np.testing.assert_allclose(run_onnx(path, x), torch_outputs(pruned_small, x), atol=1e-4, rtol=0)


def test_failed_export_leaves_an_existing_file_untouched(x, tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("forward failed")

    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(RuntimeError, match="forward failed"):
        export_onnx(Broken(), target, x)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
