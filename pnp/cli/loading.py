"""Models a command is pointed at: trained targets and pruned models, with errors that name the field.

A target is given as a ``pnp-train`` run directory (or a pipeline directory), a
saved model directory (``channels.json`` + ``model.safetensors``), a
``.safetensors`` state dict, or a Lightning ``.ckpt`` / torch ``.pt`` file, read
with ``torch.load(weights_only=True)``. Its weights are loaded into the
architecture the config's ``model`` section builds; a checkpoint of another
architecture is an error naming both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from pnp.cli.config import ConfigError
from pnp.core.artifacts import CHANNELS_FILE, ArtifactError, load_pruned
from pnp.core.builders import build_model

MODEL_DIR = "model"
# where a saved model sits inside the directories pnp's commands write
_MODEL_PLACES = (".", MODEL_DIR, f"train/{MODEL_DIR}")
_PRUNED_PLACES = (".", MODEL_DIR, f"finetune/{MODEL_DIR}", f"prune/{MODEL_DIR}")


def find_saved_model(path: Path, places=_MODEL_PLACES) -> Path | None:
    for place in places:
        candidate = path / place
        if (candidate / CHANNELS_FILE).is_file():
            return candidate.resolve()
    return None


def load_target(field: str, value: str, builder: str, builder_kwargs: Mapping[str, Any]) -> nn.Module:
    """Build ``builder(**builder_kwargs)`` and load the weights at ``value`` into it (eval mode)."""
    path = Path(value).expanduser()
    if path.is_dir():
        saved = find_saved_model(path)
        if saved is None:
            raise ConfigError(
                field, value,
                f"holds no saved model (looked for {CHANNELS_FILE} in {', '.join(_MODEL_PLACES)}); "
                "pass a pnp-train run directory or a checkpoint file",
            )
        try:
            model = load_pruned(saved, builder=builder, builder_kwargs=dict(builder_kwargs))
        except ArtifactError as exc:
            raise ConfigError(field, value, f"the model saved in {saved} does not fit model.builder={builder!r}: {exc}") from None
        return model
    state = _read_state_dict(field, value, path)
    model = build_model(builder, **builder_kwargs)
    _load_state_dict(model, state, field, value, builder)
    return model.eval()


def _read_state_dict(field: str, value: str, path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConfigError(field, value, f"is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(field, value, f"cannot be read as a weights-only torch checkpoint ({first})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        # a Lightning checkpoint of pnp's ClassifierModule: the network is its `model` attribute
        state = obj["state_dict"]
        inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return inner or dict(state)
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ConfigError(field, value, "holds neither a state dict nor a Lightning checkpoint")


def _load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], field: str, value: str, builder: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)} in the checkpoint but {tuple(expected[k].shape)} in the model"
                         + (f" ({len(wrong)} tensors differ)" if len(wrong) > 1 else ""))
        if missing:
            parts.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
        raise ConfigError(
            field, value,
            f"this checkpoint does not fit the model built by model.builder={builder!r}: {'; '.join(parts)}. "
            "Choose the model config it was trained with (e.g. model=lenet5)",
        )
    model.load_state_dict(state, strict=True)


def load_pruned_model(field: str, value: str, trusted_builder: str | None = None) -> nn.Module:
    """The pruned model at ``value``: a pnp-prune / pnp-finetune / pipeline directory or a saved model.

    Its builder must be on pnp's allow-list, or be ``trusted_builder`` (the command's ``model.builder``).
    """
    path = Path(value).expanduser()
    saved = find_saved_model(path, _PRUNED_PLACES) if path.is_dir() else None
    if saved is None:
        raise ConfigError(
            field, value,
            f"holds no saved pruned model (looked for {CHANNELS_FILE} in {', '.join(_PRUNED_PLACES)}); "
            "pass a pnp-prune run directory",
        )
    try:
        return load_pruned(saved, trust_builder=trusted_builder or False)
    except ArtifactError as exc:
        raise ConfigError(field, value, str(exc)) from None


def read_keep_file(field: str, value: str, groups) -> dict[str, torch.Tensor]:
    """Keep decisions from JSON: ``{"groups": {name: [kept indices] or [bools]}}`` or the inner mapping."""
    try:
        data = json.loads(Path(value).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(field, value, f"is not a readable JSON file ({exc})") from None
    decisions = data.get("groups", data) if isinstance(data, dict) else None
    if not isinstance(decisions, dict):
        raise ConfigError(field, value, 'must hold {"groups": {group name: [kept channel indices]}}')
    keep = {}
    for name, entry in decisions.items():
        if name not in groups:
            raise ConfigError(field, value, groups.unknown_group_message(name))
        size = groups[name].size
        if isinstance(entry, list) and entry and all(isinstance(v, bool) for v in entry):
            mask = torch.tensor(entry, dtype=torch.bool)
        elif isinstance(entry, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
            bad = [i for i in entry if not 0 <= i < size]
            if bad:
                raise ConfigError(field, value, f"group {name!r} has {size} channels; indices {bad[:5]} are outside 0..{size - 1}")
            mask = torch.zeros(size, dtype=torch.bool)
            mask[entry] = True
        else:
            raise ConfigError(field, value, f"group {name!r} must list kept channel indices (or one bool per channel)")
        keep[name] = mask
    try:
        return groups.check_keep(keep)
    except (KeyError, ValueError) as exc:
        raise ConfigError(field, value, str(exc).strip("'\"")) from None
