"""Pruned-model artifacts, and export to ONNX.

An artifact is a directory with ``model.safetensors`` (the pruned weights) and
``channels.json`` (the builder of the original architecture, the channels each
changed layer kept, and the state dict's per-module versions). :func:`load_pruned`
builds the original, shrinks each listed layer on its own and loads the weights:
no dependency graph is traced and the model is never run, so loading needs
neither example inputs nor the pruning code's tracer.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from pnp.core.builders import build_model, builder_allowed
from pnp.core.groups import run_model
from pnp.core.attention import head_layouts, resize_attention
from pnp.core.handlers import handler_for, shrink_module
from pnp.core.sections import resize_sections
from pnp.core.surgery import ChannelSpec

FORMAT = "pnp.pruned/1"
WEIGHTS_FILE = "model.safetensors"
CHANNELS_FILE = "channels.json"
_ALIASES_KEY = "pnp.aliases"  # safetensors header entry: {state-dict name: name of the tensor it shares}
_SIDES = (("kept_out", "out_channels"), ("kept_in", "in_channels"))


class ArtifactError(ValueError):
    """A pruned-model artifact cannot be written or read as asked."""


# ---------------------------------------------------------------- save


def save_pruned(
    model: nn.Module,
    directory: str | os.PathLike,
    builder: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    spec: ChannelSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a pruned-model artifact in ``directory`` and return its path.

    ``builder`` and ``builder_kwargs`` rebuild the *original* architecture (see
    :func:`pnp.core.builders.build_model`); without a builder, :func:`load_pruned`
    must be given one. ``spec`` defaults to ``model.pnp_channel_spec``; a model
    without one is saved as unpruned. ``builder_kwargs`` and ``metadata`` must
    hold JSON values only. The directory appears complete or not at all: it is
    written beside its destination and renamed into place. An existing non-empty
    directory is replaced only with ``overwrite=True``, and only if it holds a
    previous artifact.
    """
    directory = Path(directory)
    if builder is not None and (not isinstance(builder, str) or ":" not in builder):
        raise ArtifactError(
            f"builder {builder!r} is not a builder name: use 'torchvision:<name>', 'timm:<name>', 'pnp:<name>' "
            "or 'module:function'"
        )
    if builder_kwargs is not None and not isinstance(builder_kwargs, Mapping):
        raise ArtifactError(f"builder_kwargs must be a dict of keyword arguments, got {type(builder_kwargs).__name__}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ArtifactError(f"metadata must be a dict, got {type(metadata).__name__}")
    if spec is None:
        spec = getattr(model, "pnp_channel_spec", None) or ChannelSpec({}, {}, {}, {})
    if not isinstance(spec, ChannelSpec):
        raise ArtifactError(f"spec must be a ChannelSpec (as apply_surgery attaches), got {type(spec).__name__}")

    state = model.state_dict()
    channels = {
        "format": FORMAT,
        "builder": builder,
        "builder_kwargs": _to_json(builder_kwargs or {}, "builder_kwargs"),
        "modules": _module_entries(model, spec),
        "groups": {name: [int(i) for i in kept] for name, kept in spec.groups.items()},
        "group_sizes": {name: int(size) for name, size in spec.group_sizes.items()},
        "adjustments": {name: str(what) for name, what in spec.adjustments.items()},
        # {module: {attribute: new value}}: split sizes and slice bounds the module holds (pnp.core.sections)
        "section_sizes": _to_json(spec.section_sizes, "spec.section_sizes"),
        "metadata": _to_json(metadata or {}, "metadata"),
        # {module prefix: {"version": ...}}: modules' _load_from_state_dict read their version from it
        "state_dict_metadata": _to_json(dict(getattr(state, "_metadata", {})), "the state dict's _metadata"),
    }
    text = json.dumps(channels, indent=2, allow_nan=False)
    # index lists on one line; a raw newline after "[" is never inside a JSON string
    text = re.sub(r"\[\n[\d,\s-]*\]", lambda m: json.dumps(json.loads(m.group())), text)
    text = re.sub(r"\{\n\s*(\"version\": \d+)\n\s*\}", r"{\1}", text) + "\n"  # a module's version on its line
    tensors, aliases = _weights_to_save(state)
    _check_destination(directory, overwrite)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(directory, "tmp")
    staging.mkdir()
    try:
        with open(staging / CHANNELS_FILE, "w", encoding="utf-8") as f:
            f.write(text)
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={_ALIASES_KEY: json.dumps(aliases)})
        # safetensors creates its file readable by the owner only; give it the usual permissions
        os.chmod(staging / WEIGHTS_FILE, os.stat(staging / CHANNELS_FILE).st_mode & 0o777)
        for name in (WEIGHTS_FILE, CHANNELS_FILE):
            _fsync(staging / name)
        _fsync(staging)
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _to_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON data, or an error naming the first part JSON cannot store."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArtifactError(f"{where} is {value}, which JSON cannot store; use a finite number or a string")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ArtifactError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; JSON keys must be strings"
                )
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ArtifactError(
        f"{where} is a {type(value).__name__} ({value!r:.60}), which JSON cannot store; "
        "use only str, int, float, bool, None, lists and dicts (convert it, e.g. with str())"
    )


def _module_entries(model: nn.Module, spec: ChannelSpec) -> dict[str, dict[str, Any]]:
    """The spec's kept indices per layer, checked against ``model``, with the layers' new widths."""
    modules = dict(model.named_modules())
    entries = {}
    for name, sides in sorted(spec.modules.items()):
        module = modules.get(name)
        handler = handler_for(module) if module is not None else None
        if handler is None:
            what = "has no such module" if module is None else f"has it as a {type(module).__name__}, without channels"
            raise ArtifactError(
                f"spec.modules names {name!r}, but the model {what}; "
                "pass the spec that apply_surgery attached to this model"
            )
        widths = {"out_channels": handler.get_out_channels(module), "in_channels": handler.get_in_channels(module)}
        entry: dict[str, Any] = {}
        for side, width_key in _SIDES:
            if side not in sides:
                continue
            kept = [int(i) for i in sides[side]]
            if len(kept) != widths[width_key]:
                raise ArtifactError(
                    f"spec.modules[{name!r}].{side} keeps {len(kept)} channels, but the layer has "
                    f"{widths[width_key]} {width_key}; the spec does not describe this model "
                    "(was it pruned again after surgery?)"
                )
            entry[side] = kept
            entry[width_key] = widths[width_key]
        entries[name] = entry
    return entries


def _weights_to_save(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU copies of the state dict's tensors, each shared tensor stored once.

    A state-dict entry that is the very tensor of an earlier entry (tied weights)
    becomes an alias of it; an entry that only overlaps another's memory is
    copied, since safetensors refuses to store overlapping tensors.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of_view: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(
                f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor; "
                "save_pruned stores tensors only (safetensors)"
            )
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and view in first_of_view:
            aliases[name] = first_of_view[view]
            continue
        first_of_view[view] = name
        overlaps = tensor.numel() > 0 and storage in storages
        storages.add(storage)
        tensor = tensor.to("cpu").contiguous()
        tensors[name] = tensor.clone() if overlaps else tensor
    return tensors, aliases


def _check_destination(directory: Path, overwrite: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; save_pruned writes a directory there, so choose another path")
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"{directory} already holds {entries[:5]}; pass overwrite=True to replace the artifact there, "
            "or choose another directory"
        )
    if CHANNELS_FILE not in entries:
        raise FileExistsError(
            f"{directory} holds {entries[:5]} but no {CHANNELS_FILE}, so it is not a pruned-model artifact; "
            "overwrite=True replaces only a previous artifact, so choose another directory"
        )


def _sibling(directory: Path, purpose: str) -> Path:
    """A hidden, unused path beside ``directory`` (the same filesystem, so renames are atomic)."""
    return directory.with_name(f".{directory.name}.{purpose}-{uuid.uuid4().hex[:12]}")


def _move_into_place(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``; an existing one is moved aside first and restored on failure."""
    if not directory.exists():
        os.rename(staging, directory)
    else:
        # No portable call swaps two directories at once; this leaves one rename's gap.
        previous = _sibling(directory, "old")
        os.rename(directory, previous)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(previous, directory)
            raise
        shutil.rmtree(previous, ignore_errors=True)
    _fsync(directory.parent)


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk, so a crash after the rename cannot leave empty files."""
    if path.is_dir():
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # some platforms (Windows) cannot open directories
            return
    else:
        fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- load


def load_pruned(
    directory: str | os.PathLike,
    builder: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    trust_builder: bool | str = False,
) -> nn.Module:
    """Rebuild the pruned model saved in ``directory``, in eval mode.

    The original architecture is built with the artifact's builder; ``builder``
    replaces it and ``builder_kwargs`` override the saved keyword arguments one by
    one. A builder read from the artifact must be on pnp's allow-list
    (:func:`pnp.core.builders.builder_allowed`: ``pnp:``, ``torchvision:``, ``timm:``,
    or allowed in code with :func:`pnp.core.builders.allow_builder`); otherwise
    ``trust_builder=True`` (or that builder's name) opts in for this call. Every layer
    listed in ``channels.json`` is shrunk to its kept channels, then the weights are
    loaded strictly (in the precision they were saved in, with the module versions
    they were saved with) and the model is moved to ``map_location``. The model carries
    ``pnp_channel_spec`` (a :class:`ChannelSpec`) and ``pnp_metadata``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise ArtifactError(f"pruned-model directory {str(directory)!r} {what}; pass the directory that save_pruned wrote")
    if builder_kwargs is not None and not isinstance(builder_kwargs, Mapping):
        raise ArtifactError(f"builder_kwargs must be a dict of keyword arguments, got {type(builder_kwargs).__name__}")
    channels = _read_channels(directory / CHANNELS_FILE)
    state = _read_weights(directory / WEIGHTS_FILE)

    from_file = builder is None
    builder = channels["builder"] if builder is None else builder
    if from_file and builder is not None and not (trust_builder is True or trust_builder == builder
                                                  or builder_allowed(builder)):
        raise ArtifactError(
            f"{CHANNELS_FILE} in {directory} names the builder {builder!r}, which is not on pnp's allow-list "
            "('pnp:<name>', 'torchvision:<name>', 'timm:<name>', or names allowed with "
            "pnp.core.builders.allow_builder); "
            "pnp does not import or call a function because a file names it. If you trust this artifact, pass "
            f"trust_builder=True (or builder={builder!r}) to load_pruned"
        )
    if builder is None:
        raise ArtifactError(
            f"{CHANNELS_FILE} in {directory} has no builder (it was saved without one); pass "
            "builder='torchvision:<name>', 'timm:<name>', 'pnp:<name>' or 'package.module:function' to load_pruned"
        )
    kwargs = {**channels["builder_kwargs"], **(builder_kwargs or {})}
    try:
        model = build_model(builder, **kwargs)
    except Exception as exc:
        raise ArtifactError(
            f"could not build the original model with builder {builder!r} and builder_kwargs {kwargs}: {exc}; "
            "pass builder=... and builder_kwargs=... that build the unpruned architecture"
        ) from exc

    _shrink_to_spec(model, channels["modules"], channels["section_sizes"], builder)
    _load_weights(model, state, channels["state_dict_metadata"], builder)
    model.to(map_location)
    model.eval()
    model.pnp_channel_spec = ChannelSpec(
        modules={
            name: {side: entry[side] for side, _ in _SIDES if side in entry} for name, entry in channels["modules"].items()
        },
        groups=channels["groups"],
        group_sizes=channels["group_sizes"],
        adjustments=channels["adjustments"],
        section_sizes=channels["section_sizes"],
    )
    model.pnp_metadata = channels["metadata"]
    return model


def _read_channels(path: Path) -> dict[str, Any]:
    """``channels.json``, with every field the loader relies on checked."""
    if not path.is_file():
        raise ArtifactError(
            f"{path.name} is missing from {path.parent}, so it is not a pruned-model artifact; "
            f"pass a directory written by save_pruned (it holds {CHANNELS_FILE} and {WEIGHTS_FILE})"
        )
    try:
        channels = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"{CHANNELS_FILE} in {path.parent} is not valid JSON ({exc}); the file is damaged, save the model again"
        ) from None
    if not isinstance(channels, dict):
        raise ArtifactError(f"{CHANNELS_FILE} holds a JSON {type(channels).__name__}, not an object; save the model again")
    fmt = channels.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith(FORMAT.split("/")[0] + "/"):
            why = f"this version of pnp reads only {FORMAT!r}; load it with the pnp that wrote it, or upgrade pnp"
        else:
            why = f"save_pruned writes {FORMAT!r}, so the file was not written by it"
        raise ArtifactError(f"{CHANNELS_FILE} has format {fmt!r}: {why}")

    # artifacts written before pnp kept the state dict's metadata have no "state_dict_metadata"
    nullable = {"builder": (str, type(None)), "state_dict_metadata": (dict, type(None))}
    fields = {key: channels.setdefault(key, None) for key in nullable}
    for key in ("builder_kwargs", "modules", "groups", "group_sizes", "adjustments", "section_sizes", "metadata"):
        fields[key] = channels.setdefault(key, {})
    for key, value in fields.items():
        if not isinstance(value, nullable.get(key, dict)):
            raise ArtifactError(
                f"{CHANNELS_FILE} field {key!r} is a JSON {type(value).__name__} ({value!r:.60}); "
                "the file is damaged, save the model again"
            )
    for name, entry in channels["modules"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(
                f"{CHANNELS_FILE} modules[{name!r}] is {entry!r:.60}, not an object with kept_out/kept_in lists"
            )
    for name, entry in channels["section_sizes"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(
                f"{CHANNELS_FILE} section_sizes[{name!r}] is {entry!r:.60}, not an object such as "
                '{"splits": [6, 7]}; the file is damaged, save the model again'
            )
    for prefix, entry in (channels["state_dict_metadata"] or {}).items():
        if not isinstance(entry, dict):
            raise ArtifactError(
                f"{CHANNELS_FILE} state_dict_metadata[{prefix!r}] is {entry!r:.60}, not an object such as "
                '{"version": 1}; the file is damaged, save the model again'
            )
    return channels


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The saved tensors, tied ones restored as the same tensor."""
    if not path.is_file():
        raise ArtifactError(
            f"{path.name} is missing from {path.parent}; the weights were not saved or were removed, "
            "save the model again with save_pruned"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads(header.get(_ALIASES_KEY, "{}"))
        for name, source in aliases.items():
            state[name] = state[source]
    except Exception as exc:
        raise ArtifactError(
            f"{path.name} in {path.parent} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "save the model again with save_pruned"
        ) from exc
    return state


def _shrink_to_spec(
    model: nn.Module, spec_modules: dict[str, dict[str, Any]], section_sizes: dict[str, dict[str, Any]], builder: str
) -> None:
    """Shrink every listed layer to its kept channels, layer by layer (no graph), and set the sizes modules hold."""
    modules = dict(model.named_modules())
    layouts = head_layouts(model)  # read before the cut, as surgery read them
    for name, entry in spec_modules.items():
        where = f"{CHANNELS_FILE} modules[{name!r}]"
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=1)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise ArtifactError(
                f"{where}: the model built by {builder!r} has no module {name!r}{hint}; "
                "pass the builder and builder_kwargs of the original model"
            )
        handler = handler_for(module)
        if handler is None:
            raise ArtifactError(f"{where}: {name!r} is a {type(module).__name__}, which has no channels to shrink")
        widths = {"kept_out": handler.get_out_channels(module), "kept_in": handler.get_in_channels(module)}
        kept = {
            side: _check_kept(entry[side], widths[side], f"{where}.{side}", builder) for side, _ in _SIDES if side in entry
        }
        try:
            shrink_module(module, kept.get("kept_out"), kept.get("kept_in"))
        except ValueError as exc:
            raise ArtifactError(f"{where}: {exc}") from exc
    try:
        resize_attention(model, layouts, spec_modules)
        resize_sections(model, section_sizes)
    except ValueError as exc:
        raise ArtifactError(f"{CHANNELS_FILE}: {exc}") from exc


def _check_kept(kept: Any, width: int, where: str, builder: str) -> list[int]:
    if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise ArtifactError(
            f"{where} is {kept!r:.60}, not a list of channel indices; the file is damaged, save the model again"
        )
    if not kept:
        raise ArtifactError(f"{where} is empty; every layer must keep at least one channel")
    outside = [i for i in kept if not 0 <= i < width]
    if outside:
        raise ArtifactError(
            f"{where} holds indices {outside[:5]} outside 0..{width - 1}: the layer built by {builder!r} has "
            f"{width} channels; pass the builder and builder_kwargs of the original model"
        )
    if len(set(kept)) != len(kept):
        raise ArtifactError(f"{where} lists some channels more than once; the file is damaged, save the model again")
    return kept


def _load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], versions: dict[str, dict] | None, builder: str
) -> None:
    """Load ``state`` strictly, with ``versions`` as its ``_metadata`` (the rebuilt model's own when None)."""
    expected = model.state_dict()
    wrong = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    if wrong:
        name = wrong[0]
        raise ArtifactError(
            f"{WEIGHTS_FILE}: tensor {name!r} has shape {tuple(state[name].shape)}, but the model rebuilt from "
            f"{CHANNELS_FILE} with {builder!r} expects {tuple(expected[name].shape)} ({len(wrong)} tensor(s) differ); "
            "the weights and channels.json do not belong together, or the builder or builder_kwargs differ from "
            "the original's"
        )
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        raise ArtifactError(
            f"{WEIGHTS_FILE} does not match the model built by {builder!r}: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}; pass the builder and builder_kwargs of the original model"
        )
    saved_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(saved_dtypes) == 1:
        model.to(saved_dtypes.pop())  # the model comes back in the precision it was saved in
    state = OrderedDict(state)
    state._metadata = OrderedDict(expected._metadata if versions is None else versions)
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- ONNX


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file at ``path`` and return the path.

    ``example_inputs`` is what the model is called with: a tensor, a tuple of
    tensors or a dict of keyword tensors. The model must return a tensor or a
    tuple of tensors. With ``dynamic_batch`` the first dimension of every input
    and output is left free. Opsets below 18 are written by torch's TorchScript
    exporter, since the torch.export-based one implements only 18 and above. The
    file is written beside ``path``, checked with ``onnx.checker`` and renamed
    into place, so a failed export leaves any existing file as it was.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError("export_onnx needs the onnx package: pip install 'pnp[export]'") from None
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 7:
        raise ArtifactError(f"opset {opset!r} is not an ONNX opset version; use an integer such as 17 or 18")
    path = Path(path)
    if isinstance(example_inputs, Mapping):
        args, kwargs, input_names = (), dict(example_inputs), list(example_inputs)
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        kwargs, input_names = {}, ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]

    was_training = model.training
    model.eval()  # an exported model is for inference: BatchNorm uses its running statistics
    staging = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:12]}.onnx")
    try:
        with torch.no_grad():
            outputs = run_model(model, example_inputs)
        output_names = _output_names(outputs)
        _export(model, args, kwargs, staging, input_names, output_names, opset, dynamic_batch)
        onnx.checker.check_model(str(staging), full_check=True)
        _fsync(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)
    return path


def _output_names(outputs) -> list[str]:
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, (tuple, list)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return [f"output_{i}" for i in range(len(outputs))]
    raise ArtifactError(
        f"export_onnx exports models that return a tensor or a tuple of tensors; this one returns "
        f"{type(outputs).__name__}: wrap it in a module that returns the tensors to export"
    )


# torch warns that its TorchScript exporter is deprecated; pnp picks it on purpose for opset < 18.
_LEGACY_EXPORT_WARNINGS = ("You are using the legacy TorchScript-based ONNX export", "The feature will be removed")


def _export(model, args, kwargs, path, input_names, output_names, opset, dynamic_batch) -> None:
    if opset < 18:  # the torch.export-based exporter implements opset 18 and above only
        dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
        options = {"dynamo": False, "dynamic_axes": dynamic_axes if dynamic_batch else None}
    else:
        batch = torch.export.Dim("batch")
        if kwargs:
            shapes = {k: {0: batch} if isinstance(v, torch.Tensor) else None for k, v in kwargs.items()}
        else:
            shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
        # external_data=False: one self-contained file, which the checker and the rename expect
        options = {
            "dynamo": True,
            "dynamic_shapes": shapes if dynamic_batch else None,
            "external_data": False,
            "verbose": False,
        }
    with warnings.catch_warnings():
        for message in _LEGACY_EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(
            model,
            args,
            str(path),
            kwargs=kwargs or None,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            **options,
        )
