"""Interpolants x_t = alpha_t * x + sigma_t * eps between data (t = 0) and noise (t = 1).

Notation follows Inductive Moment Matching (IMM; Zhou, Ermon & Song, ICML 2025,
arXiv 2503.07565), Sec. 2 and App. C:

    x_t       = alpha_t * x + sigma_t * eps,        eps ~ N(0, sigma_d^2 I)
    lambda_t  = log-SNR = 2 * log(alpha_t / sigma_t)
    eta_t     = sigma_t / alpha_t                    (monotone in t; used by the r(s, t) map)
    DDIM(x_t, x, s, t) = (alpha_s - sigma_s / sigma_t * alpha_t) * x + sigma_s / sigma_t * x_t
                                                    (IMM Eq. (8), the DDIM interpolant)

Two schedules: OT-FM (alpha = 1 - t, sigma = t) and cosine (alpha = cos(pi t / 2),
sigma = sin(pi t / 2)). All time arithmetic is float64; coefficients are cast to the data's
dtype only when they multiply tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = ["OTFM", "Cosine", "Interpolant", "as_time", "expand_like", "get_interpolant", "shift_time"]


def as_time(t, device=None) -> torch.Tensor:
    """Return ``t`` (float, sequence or tensor) as a float64 tensor on ``device``."""
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def shift_time(u, shift: float) -> torch.Tensor:
    """Map u in [0, 1] to shift u / (1 + (shift - 1) u): the timestep shift of SD3 (Esser et al. 2024,
    arXiv 2403.03206, Eq. (23)). shift > 1 moves times toward the noise end (t = 1), where the layout
    and the colours of an image are decided; the map fixes 0 and 1 and keeps the order. Float64."""
    u = as_time(u)
    if shift == 1.0:
        return u
    return shift * u / (1.0 + (shift - 1.0) * u)


def expand_like(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cast a float64 coefficient (scalar or (B,)) to x's dtype, shaped to broadcast over x."""
    coef = coef.to(device=x.device)
    if coef.ndim == 0:
        return coef.to(x.dtype)
    if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
        raise ValueError(
            f"time coefficient must be a scalar or have shape ({x.shape[0]},) to match x, "
            f"got {tuple(coef.shape)}"
        )
    # (B,) -> (B, 1, ..., 1) so it broadcasts over every element of an item
    return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Interpolant:
    """Base class: subclasses define alpha, sigma, their log-SNR derivative and eta^{-1}."""

    name = "base"

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def dlogsnr_dt(self, t) -> torch.Tensor:
        raise NotImplementedError

    def eta_inv(self, eta) -> torch.Tensor:
        raise NotImplementedError

    def logsnr(self, t) -> torch.Tensor:
        """lambda_t = 2 log(alpha_t / sigma_t) (float64)."""
        t = as_time(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def eta(self, t) -> torch.Tensor:
        """eta_t = sigma_t / alpha_t (float64), the noise-to-signal ratio."""
        t = as_time(t)
        return self.sigma(t) / self.alpha(t)

    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha_t x + sigma_t eps; ``t`` scalar or (B,)."""
        t = as_time(t, x.device)
        return expand_like(self.alpha(t), x) * x + expand_like(self.sigma(t), x) * eps

    def ddim(self, x_t: torch.Tensor, x: torch.Tensor, s, t) -> torch.Tensor:
        """DDIM(x_t, x, s, t), IMM Eq. (8): move x_t from time t to time s given the clean x.

        Coefficients are computed in float64; ``s``/``t`` are scalars or (B,).
        """
        s, t = as_time(s, x.device), as_time(t, x.device)
        ratio = self.sigma(s) / self.sigma(t)
        coef_x = self.alpha(s) - ratio * self.alpha(t)
        return expand_like(coef_x, x) * x + expand_like(ratio, x_t) * x_t


class OTFM(Interpolant):
    """Optimal-transport flow matching: alpha_t = 1 - t, sigma_t = t."""

    name = "ot_fm"

    def alpha(self, t) -> torch.Tensor:
        return 1.0 - as_time(t)

    def sigma(self, t) -> torch.Tensor:
        return as_time(t).clone()

    def dlogsnr_dt(self, t) -> torch.Tensor:
        # d/dt 2 log((1 - t) / t) = -2 / (t (1 - t))
        t = as_time(t)
        return -2.0 / (t * (1.0 - t))

    def eta_inv(self, eta) -> torch.Tensor:
        # eta = t / (1 - t)  <=>  t = eta / (1 + eta)
        eta = as_time(eta)
        return eta / (1.0 + eta)


class Cosine(Interpolant):
    """Cosine (trigonometric) schedule: alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2)."""

    name = "cosine"

    def alpha(self, t) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * as_time(t))

    def sigma(self, t) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * as_time(t))

    def dlogsnr_dt(self, t) -> torch.Tensor:
        # d/dt 2 log cot(pi t / 2) = -pi (tan + cot) = -2 pi / sin(pi t)
        t = as_time(t)
        return -2.0 * math.pi / torch.sin(math.pi * t)

    def eta_inv(self, eta) -> torch.Tensor:
        # eta = tan(pi t / 2)  <=>  t = (2 / pi) atan(eta)
        return (2.0 / math.pi) * torch.atan(as_time(eta))


_INTERPOLANTS = {"ot_fm": OTFM, "cosine": Cosine}


def get_interpolant(name: str) -> Interpolant:
    """Return the interpolant called ``name`` ("ot_fm" or "cosine")."""
    if name not in _INTERPOLANTS:
        raise ValueError(f"interpolant must be one of {sorted(_INTERPOLANTS)}, got {name!r}")
    return _INTERPOLANTS[name]()
