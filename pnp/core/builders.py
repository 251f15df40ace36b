"""Named model builders, so a saved model can be rebuilt without its training code.

A builder name is ``"torchvision:<name>"`` (any torchvision classification
model), ``"pnp:<name>"`` (a builder registered with :func:`register_builder`) or
``"package.module:function"`` (an importable function of the user's).

A builder named by a *file* (an artifact's ``channels.json``) is only used when it
is on the allow-list (:func:`builder_allowed`): ``pnp:`` and ``torchvision:``
builders, and ``"package.module:function"`` names that code has allowed with
:func:`allow_builder`. pnp never imports or calls a function because a file says so.
"""

from __future__ import annotations

import importlib
from typing import Callable

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
SAFE_SOURCES = ("pnp", "torchvision")


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
            f"builder {builder!r} is not of the form 'torchvision:<name>', 'pnp:<name>' or 'module:function'"
        )
    source, name = builder.split(":", 1)
    if source == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(f"builder {builder!r}: torchvision has no classification model {name!r}")
        kwargs.setdefault("weights", None)
        return torchvision.models.get_model(name, **kwargs)
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
