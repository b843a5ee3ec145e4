"""Training objectives as pure functions with one call shape (docs/design.md §7).

    loss, diagnostics = loss_fn(net, x, cond, generator=..., drop_cond=...)

``OBJECTIVES`` is the one registry: name -> (loss function, config dataclass). Each config dataclass is
the one home of its objective's settings and defaults; the run config embeds it and an exported model
stores it as name + plain dict (``MMGenConfig.objective`` / ``objective_params``), which
``objective_config`` turns back into the dataclass. ``get_objective(name, **overrides)`` returns
``(loss_fn, config)`` with the config bound.
"""

from __future__ import annotations

import dataclasses
import functools

from .flow_matching import FlowMatchingConfig, flow_matching_loss
from .imm import IMMConfig, flow_map, imm_loss, network_output
from .interpolants import get_interpolant

__all__ = [
    "OBJECTIVES",
    "FlowMatchingConfig",
    "IMMConfig",
    "config_class",
    "flow_map",
    "flow_matching_loss",
    "get_interpolant",
    "get_objective",
    "imm_loss",
    "network_output",
    "objective_config",
]

OBJECTIVES = {"imm": (imm_loss, IMMConfig), "flow_matching": (flow_matching_loss, FlowMatchingConfig)}


def config_class(name: str) -> type:
    """The config dataclass of the objective ``name``; ValueError naming the known ones otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective name must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name][1]


def objective_config(name: str, params: dict | None = None, *, sigma_data: float | None = None,
                     where: str = "objective_params"):
    """The objective's frozen config from its name and a plain dict of fields (unset fields take the
    dataclass defaults); ``sigma_data``, when given, is set too (a model config keeps it in a field of
    its own). A bad key or value is a one-line ValueError that begins with ``where``, naming the key."""
    cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    params = dict(params or {})
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for objective {name!r}; valid keys: {sorted(fields)}")
    if sigma_data is not None:
        params["sigma_data"] = sigma_data
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        message = str(err)
        named = message.split(" ", 1)[0] in fields  # most checks begin with the field's name
        raise ValueError(f"{where}.{message}" if named else f"{where}: {message}") from None


def get_objective(name: str, **overrides):
    """Return ``(loss_fn, config)`` for ``name`` in ``OBJECTIVES``.

    ``overrides`` set fields of the objective's config; an unknown field is an error naming it.
    ``loss_fn(net, x, cond=None, *, generator=None, drop_cond=None)`` has the config bound.
    """
    config = objective_config(name, overrides, where=name)
    return functools.partial(OBJECTIVES[name][0], config=config), config
