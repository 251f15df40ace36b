"""Named model builders, so a saved model can be rebuilt without its training code.

A builder name is ``"torchvision:<name>"`` (any torchvision classification
model), ``"timm:<name>"`` (any model of ``timm.list_models()``, with the
``pnp[timm]`` extra), ``"pnp:<name>"`` (a builder registered with
:func:`register_builder`) or ``"package.module:function"`` (an importable function
of the user's). torchvision and timm models are built untrained: no weights are
downloaded.

A builder named by a *file* (an artifact's ``channels.json``) is only used when it
is on the allow-list (:func:`builder_allowed`): ``pnp:``, ``torchvision:`` and
``timm:`` builders, and ``"package.module:function"`` names that code has allowed with
:func:`allow_builder`. pnp never imports or calls a function because a file says so.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_builder(name: str):
    """Register ``fn`` as the builder ``"pnp:<name>"``."""

    def decorator(fn: Callable[..., nn.Module]):
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"builder 'pnp:{name}' is already registered")
        _BUILDERS[name] = fn
        return fn

    return decorator


_ALLOWED: set[str] = set()
SAFE_SOURCES = ("pnp", "torchvision", "timm")


def allow_builder(name: str) -> str:
    """Let artifacts name the builder ``"package.module:function"`` (its code is trusted from now on)."""
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(f"builder {name!r} is not of the form 'package.module:function'")
    _ALLOWED.add(name)
    return name


def builder_allowed(name) -> bool:
    """True when a file may name ``name`` as its builder (see the module docstring)."""
    return isinstance(name, str) and (name.split(":", 1)[0] in SAFE_SOURCES or name in _ALLOWED)


def registered_builders() -> list[str]:
    _load_pnp_models()
    return sorted(f"pnp:{n}" for n in _BUILDERS)


def _load_pnp_models() -> None:
    try:
        importlib.import_module("pnp.models")
    except ModuleNotFoundError as exc:  # the core works without the model zoo
        if exc.name != "pnp.models":
            raise


def build_model(builder: str, **kwargs) -> nn.Module:
    """Build a model from its builder name and keyword arguments."""
    if not isinstance(builder, str) or ":" not in builder:
        raise ValueError(
            f"builder {builder!r} is not of the form 'torchvision:<name>', 'timm:<name>', 'pnp:<name>' "
            "or 'module:function'"
        )
    source, name = builder.split(":", 1)
    if source == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(f"builder {builder!r}: torchvision has no classification model {name!r}")
        kwargs.setdefault("weights", None)
        return torchvision.models.get_model(name, **kwargs)
    if source == "timm":
        return _build_timm(builder, name, kwargs)
    if source == "pnp":
        _load_pnp_models()
        if name not in _BUILDERS:
            raise ValueError(f"builder {builder!r} is not registered; known: {registered_builders()}")
        return _BUILDERS[name](**kwargs)
    try:
        fn = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"builder {builder!r} cannot be imported: {exc}") from None
    return fn(**kwargs)


# ---------------------------------------------------------------- timm

# pnp's builders take the data's in_channels and input_size (pnp.cli's model.data_kwargs); timm calls them so
_TIMM_NAMES = {"in_channels": "in_chans", "input_size": "img_size"}


def _import_timm(what: str):
    try:
        import timm
    except ImportError:
        raise ImportError(f"{what} needs the timm package: pip install 'pnp[timm]'") from None
    return timm


def timm_name_error(name: str) -> str | None:
    """Why ``timm:<name>`` names no model pnp can build, or None when it names one."""
    try:
        timm = _import_timm(f"builder 'timm:{name}'")
    except ImportError as exc:
        return str(exc)
    known = timm.list_models()
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; close names: {', '.join(close)}" if close else "; timm.list_models() lists the names"
    return f"timm has no model {name!r}{hint}"


def _build_timm(builder: str, name: str, kwargs: dict[str, Any]):
    timm = _import_timm(f"builder {builder!r}")
    why = timm_name_error(name)
    if why is not None:
        raise ValueError(f"builder {builder!r}: {why}")
    kwargs = dict(kwargs)
    for ours, theirs in _TIMM_NAMES.items():
        if ours in kwargs and theirs in kwargs:
            raise ValueError(f"builder {builder!r} was given both {ours}= and timm's {theirs}=; give one of them")
    if "in_channels" in kwargs:
        kwargs["in_chans"] = kwargs.pop("in_channels")
    if "input_size" in kwargs:
        size = kwargs.pop("input_size")
        # timm marks the models whose constructor takes img_size (and fixes the input to it) in their
        # pretrained config; the others pool globally and take any image size
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = size
    if kwargs.get("pretrained"):
        # a builder named by an artifact must not fetch anything; its weights are loaded from the file anyway
        raise ValueError(
            f"builder {builder!r} builds timm models untrained; leave out pretrained=True (to prune pretrained "
            "weights, make the model with timm.create_model and pass this builder name to save_pruned)"
        )
    kwargs["pretrained"] = False
    return timm.create_model(name, **kwargs)


def timm_preprocessing(name: str) -> dict[str, Any]:
    """The input preprocessing timm's pretrained config gives model ``name`` (``{}`` if it has none).

    ``mean`` and ``std`` per channel, ``input_size`` as ``[channels, height, width]``, and
    the resize ``interpolation`` and ``crop_pct`` of timm's evaluation transform: what
    images fed to the model's pretrained weights were prepared with. Every model the
    ``timm:`` builder makes carries the same config as ``model.pretrained_cfg``.
    """
    why = timm_name_error(name)
    if why is not None:
        raise ValueError(f"timm_preprocessing({name!r}): {why}")
    cfg = _import_timm("timm_preprocessing").models.get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return {
        "mean": [float(m) for m in cfg.mean],
        "std": [float(s) for s in cfg.std],
        "input_size": [int(n) for n in cfg.input_size],
        "interpolation": cfg.interpolation,
        "crop_pct": float(cfg.crop_pct),
    }
