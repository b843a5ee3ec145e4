"""Flow-matching baseline with the same call shape as ``imm.imm_loss``.

Conditional OT flow matching (Lipman et al., ICLR 2023, arXiv 2210.02747; Liu et al.,
rectified flow, arXiv 2209.03003) with the interpolant x_t = (1 - t) x + t eps,
eps ~ N(0, sigma_d^2 I), whose conditional velocity is d x_t / dt = eps - x.

The network is parameterised exactly like IMM's Euler-FM flow map evaluated at s = t
(IMM App. C.3): sigma_d * G(c_in(t) x_t, 1000 t, s_in) predicts the velocity, so
f_{s,t}(x_t) = x_t - (t - s) sigma_d G is one Euler step and the same network can be
sampled with ``mmgen.sampling.euler``. The regression is on G, i.e. on the velocity in
units of sigma_d:  loss = mean || G - (eps - x) / sigma_d ||^2.

Times: t ~ U(0, 1) ("uniform") or t = sigmoid(n), n ~ N(logit_mean, logit_std^2)
("logit_normal"; Esser et al., SD3, arXiv 2403.03206, Sec. 3.1), then SD3's timestep shift
t -> shift t / (1 + (shift - 1) t) when ``time_shift`` != 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .imm import _dropped_condition, draw, network_output
from .interpolants import get_interpolant, shift_time

__all__ = ["FlowMatchingConfig", "flow_matching_loss", "sample_fm_times"]

_TIME_SAMPLING = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Hyper-parameters of the flow-matching baseline.

    ``interpolant``/``parameterization`` are fixed (OT-FM, Euler-FM) and present so that
    ``imm.network_output`` and the samplers read this config like an ``IMMConfig``.
    ``T``/``eps`` are the ends of the Euler sampling grid.
    """

    sigma_data: float = 0.5
    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_input: str = "stride"
    p_uncond: float = 0.1  # classifier-free guidance: the share of items trained with the null condition
    time_shift: float = 1.0  # SD3's timestep shift of the training times and the Euler grid (1 = none)
    T: float = 1.0
    eps: float = 0.0
    interpolant: str = "ot_fm"
    parameterization: str = "euler_fm"

    def __post_init__(self):
        if self.time_sampling not in _TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {_TIME_SAMPLING}, got {self.time_sampling!r}")
        if self.time_input not in ("stride", "identity"):
            raise ValueError(f"time_input must be 'stride' or 'identity', got {self.time_input!r}")
        if self.interpolant != "ot_fm" or self.parameterization != "euler_fm":
            raise ValueError("flow matching supports only interpolant 'ot_fm' with 'euler_fm'")
        if self.sigma_data <= 0 or self.logit_std <= 0 or not self.time_shift > 0:
            raise ValueError("sigma_data, logit_std and time_shift must be > 0")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if not 0.0 <= self.eps < self.T <= 1.0:
            raise ValueError(f"need 0 <= eps < T <= 1, got eps={self.eps}, T={self.T}")


def sample_fm_times(batch: int, config: FlowMatchingConfig, generator=None, device=None):
    """Training times t in (0, 1), float64 (B,), then shifted by ``time_shift``."""
    if config.time_sampling == "uniform":
        u = draw(torch.rand, (batch,), generator, device, torch.float64)
    else:
        n = draw(torch.randn, (batch,), generator, device, torch.float64)
        u = torch.sigmoid(config.logit_mean + config.logit_std * n)
    return shift_time(u, config.time_shift)


def flow_matching_loss(
    net, x: torch.Tensor, cond=None, *, config: FlowMatchingConfig, generator=None, drop_cond=None
):
    """Flow-matching loss; returns (scalar loss, diagnostics) like ``imm_loss``.

    One network call per item, with second time s = t. Condition dropout with probability
    ``p_uncond`` through ``drop_cond``. Diagnostics: mean_t, num_items.
    """
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    batch, device = x.shape[0], x.device
    t = sample_fm_times(batch, config, generator, device)
    noise = config.sigma_data * draw(torch.randn, x.shape, generator, device, x.dtype)
    x_t = get_interpolant("ot_fm").interpolate(x, noise, t)
    items = torch.arange(batch, device=device)  # every item is its own sample: one Bernoulli each
    cond = _dropped_condition(cond, items, batch, config.p_uncond, generator, drop_cond, device)
    g = network_output(net, x_t, t, t, cond, config)
    target = (noise - x) / config.sigma_data  # velocity eps - x in units of sigma_d
    loss = (g.float() - target.float()).pow(2).mean()
    return loss, {"mean_t": t.mean().item(), "num_items": batch}
