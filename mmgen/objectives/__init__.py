"""Training objectives as pure functions with one call shape (CONTRACTS.md §1).

    loss, diagnostics = loss_fn(net, x, cond, generator=..., drop_cond=...)

``get_objective(name, **overrides)`` returns ``(loss_fn, config)`` with the config bound.
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
    "flow_map",
    "flow_matching_loss",
    "get_interpolant",
    "get_objective",
    "imm_loss",
    "network_output",
]

OBJECTIVES = {"imm": (imm_loss, IMMConfig), "flow_matching": (flow_matching_loss, FlowMatchingConfig)}


def get_objective(name: str, **overrides):
    """Return ``(loss_fn, config)`` for ``name`` in {"imm", "flow_matching"}.

    ``overrides`` set fields of the objective's config; an unknown field is an error naming it.
    ``loss_fn(net, x, cond=None, *, generator=None, drop_cond=None)`` has the config bound.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective name must be one of {sorted(OBJECTIVES)}, got {name!r}")
    loss, config_cls = OBJECTIVES[name]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} field(s) {unknown}; valid fields: {sorted(fields)}")
    config = config_cls(**overrides)
    return functools.partial(loss, config=config), config
