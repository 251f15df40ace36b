"""pnp: learned filter pruning for PyTorch.

A pruner network learns which filters of a trained target to remove; one-shot
surgery removes them, leaving a smaller dense model.
"""

from pnp.core.artifacts import ArtifactError, export_onnx, load_pruned, save_pruned
from pnp.core.builders import build_model, register_builder, registered_builders
from pnp.core.cost import CostModel, Latency, ModelCost, count_flops_params, measure_latency
from pnp.core.gating import GatedModel
from pnp.core.groups import (
    ChannelGroup,
    ChannelGroups,
    ChannelMember,
    UntraceableModelError,
    check_keep_ratio,
    find_channel_groups,
    keep_from_ratio,
    legalize_keep,
)
from pnp.core.losses import PrunerLoss, feature_distillation_loss, kd_loss
from pnp.core.pruner import PrunerNetwork
from pnp.core.readout import KeepScores, decide_keep
from pnp.core.surgery import ChannelSpec, SurgeryMismatchError, apply_surgery, verify_surgery

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "export_onnx",
    "load_pruned",
    "save_pruned",
    "ChannelGroup",
    "ChannelGroups",
    "ChannelMember",
    "ChannelSpec",
    "CostModel",
    "GatedModel",
    "KeepScores",
    "Latency",
    "ModelCost",
    "PrunerLoss",
    "PrunerNetwork",
    "SurgeryMismatchError",
    "UntraceableModelError",
    "apply_surgery",
    "build_model",
    "check_keep_ratio",
    "count_flops_params",
    "decide_keep",
    "feature_distillation_loss",
    "find_channel_groups",
    "kd_loss",
    "keep_from_ratio",
    "legalize_keep",
    "measure_latency",
    "register_builder",
    "registered_builders",
    "verify_surgery",
]
