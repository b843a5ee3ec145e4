"""Samplers as pure ``torch.no_grad`` functions (docs/design.md §8).

Notation as in ``mmgen.objectives`` (IMM: Zhou, Ermon & Song, ICML 2025, arXiv 2503.07565):
a grid T = t_0 > t_1 > ... > t_N = eps (uniform in t unless given), the flow map
f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G, and starting noise eps ~ N(0, sigma_d^2 I).

- ``pushforward``: x_{t_{i+1}} = f_{t_{i+1}, t_i}(x_{t_i})                    (IMM Alg. 2)
- ``restart``:     x_eps^(i) = f_{eps, t_i}(x_{t_i}); x_{t_{i+1}} = alpha x_eps^(i) + sigma eps'
                   with fresh noise eps' from the generator                  (IMM Alg. 3)
- ``euler``:       x_{t_{i+1}} = x_{t_i} - (t_i - t_{i+1}) sigma_d G(c_in x_{t_i}, t_i, s = t_i)
                   for a flow-matching net (velocity = sigma_d G)
All start from x_{t_0} = sigma_{t_0} * noise: the noise part of x_{t_0} = alpha x + sigma eps,
whose data part alpha_{t_0} x (alpha_T = 0.006 for OT-FM) is unknown and replaced by its mean 0.

Classifier-free guidance acts on G: G(null) + w (G(cond) - G(null)), so a step costs one network
call, or two when w != 1. ``null_cond`` is passed to ``net`` as is (None means unconditional).
Per-sample seeding (EDM-style): ``generator`` may be a sequence of per-sample Generators, and
sample i then draws only from generator i, so its noise is the same whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from mmgen.objectives.imm import flow_map_coefficients, network_output
from mmgen.objectives.interpolants import as_time, expand_like, get_interpolant, shift_time

__all__ = ["SAMPLERS", "euler", "initial_noise", "pushforward", "restart", "sample", "time_grid"]


def initial_noise(shape, generator=None, sigma_data: float = 0.5, *, dtype=torch.float32, device=None):
    """Noise ~ N(0, sigma_data^2) of ``shape`` = (B, ...).

    ``generator``: None (global RNG), one ``torch.Generator``, or a sequence of B Generators
    (sample i draws only from generator i, so it gets the same noise whatever B is).
    """
    shape = tuple(shape)
    if isinstance(generator, Sequence):
        if len(shape) == 0 or len(generator) != shape[0]:
            raise ValueError(
                f"generator: got {len(generator)} per-sample generators for shape {shape}; "
                "need one per sample (shape[0])"
            )
        rows = [
            torch.randn(shape[1:], generator=g, dtype=dtype, device=device or g.device) for g in generator
        ]
        return sigma_data * torch.stack(rows) if rows else torch.empty(shape, dtype=dtype, device=device)
    if device is None and generator is not None:
        device = generator.device
    return sigma_data * torch.randn(shape, generator=generator, dtype=dtype, device=device)


def time_grid(num_steps: int, config, times=None) -> torch.Tensor:
    """The float64 grid t_0 > ... > t_N from config.T to config.eps, or ``times``.

    Uniform in u, mapped through the objective's ``time_shift`` (SD3's shift; 1 = uniform in t).
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if times is None:
        if config.time_shift == 1.0:  # the paper's grid, bit for bit
            return torch.linspace(config.T, config.eps, num_steps + 1, dtype=torch.float64)
        u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return config.eps + (config.T - config.eps) * shift_time(u, config.time_shift)
    grid = as_time(times).cpu()
    if grid.ndim != 1 or grid.shape[0] != num_steps + 1:
        raise ValueError(
            f"times must be 1-D with num_steps + 1 = {num_steps + 1} entries, got {list(grid.shape)}"
        )
    if not (grid[:-1] > grid[1:]).all() or grid[-1] < 0 or grid[0] > 1:
        raise ValueError(f"times must decrease strictly within [0, 1], got {grid.tolist()}")
    return grid


def _guided_g(net, x, t, s, cond, config, guidance: float, null_cond):
    """G with classifier-free guidance G(null) + w (G(cond) - G(null)); 1 or 2 net calls."""
    g = network_output(net, x, t, s, cond, config)
    if guidance == 1.0:
        return g
    g_null = network_output(net, x, t, s, null_cond, config)
    return g_null + guidance * (g - g_null)


def _guided_flow_map(net, x, t, s, cond, config, guidance, null_cond):
    """f_{s,t}(x) (IMM Eq. (10)) with guided G, for scalar times t > s."""
    g = _guided_g(net, x, t, s, cond, config, guidance, null_cond)
    c_skip, c_out = flow_map_coefficients(t=t, s=s, config=config)
    return expand_like(c_skip, x) * x + expand_like(c_out, g) * g


def _start(noise: torch.Tensor, grid: torch.Tensor, config) -> torch.Tensor:
    """x_{t_0} = sigma_{t_0} * noise."""
    return expand_like(get_interpolant(config.interpolant).sigma(grid[0]), noise) * noise


@torch.no_grad()
def pushforward(net, noise, cond=None, *, num_steps, config, times=None, guidance=1.0, null_cond=None):
    """IMM pushforward sampling (Alg. 2): N flow-map jumps along the grid; N (or 2N) net calls."""
    grid = time_grid(num_steps, config, times)
    x = _start(noise, grid, config)
    for t, s in pairwise(grid):
        x = _guided_flow_map(net, x, t, s, cond, config, guidance, null_cond)
    return x


@torch.no_grad()
def restart(net, noise, cond=None, *, num_steps, config, generator, guidance=1.0, null_cond=None, times=None):
    """IMM restart sampling (Alg. 3): jump to t_N, re-noise to t_{i+1} with fresh noise; N net calls.

    ``generator`` (one Generator or per-sample Generators) supplies every fresh noise draw.
    """
    grid = time_grid(num_steps, config, times)
    interp = get_interpolant(config.interpolant)
    x = _start(noise, grid, config)
    end = grid[-1]
    x_end = _guided_flow_map(net, x, grid[0], end, cond, config, guidance, null_cond)
    for t_next in grid[1:-1]:
        # drawn on the generator's device (per-sample noise is device-independent), then moved
        fresh = initial_noise(x.shape, generator, config.sigma_data, dtype=x.dtype).to(x.device)
        x = interp.interpolate(x_end, fresh, t_next)
        x_end = _guided_flow_map(net, x, t_next, end, cond, config, guidance, null_cond)
    return x_end


@torch.no_grad()
def euler(net, noise, cond=None, *, num_steps, config, guidance=1.0, null_cond=None, times=None):
    """Euler integration of a flow-matching net: velocity sigma_d G at (t, s = t); N net calls."""
    grid = time_grid(num_steps, config, times)
    x = _start(noise, grid, config)
    for t, t_next in pairwise(grid):
        g = _guided_g(net, x, t, t, cond, config, guidance, null_cond)
        x = x - expand_like((t - t_next) * config.sigma_data, g) * g
    return x


SAMPLERS = {"pushforward": pushforward, "restart": restart, "euler": euler}
_DEFAULT_SAMPLER = {"imm": "pushforward", "flow_matching": "euler"}


def sample(net, noise, cond=None, *, objective_name, num_steps, config, sampler=None, **kwargs):
    """Dispatch by objective: imm -> pushforward (or ``sampler="restart"``), flow_matching -> euler.

    ``kwargs`` go to the sampler (guidance, null_cond, times, and generator for restart).
    """
    if objective_name not in _DEFAULT_SAMPLER:
        raise ValueError(f"objective_name must be one of {sorted(_DEFAULT_SAMPLER)}, got {objective_name!r}")
    name = sampler or _DEFAULT_SAMPLER[objective_name]
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](net, noise, cond, num_steps=num_steps, config=config, **kwargs)
