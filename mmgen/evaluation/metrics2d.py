"""Sample-based distances between two point clouds in R^d (used by eval/toy2d.py).

- Sliced Wasserstein-2 (Rabin et al., 2011; Bonneel et al., 2015): project both clouds on P random
  unit directions, sort, and compare quantiles. We return sqrt(mean_p W2^2 of the 1-D projections),
  so the number has the units of x. It needs equal sample sizes (the 1-D W2 between two empirical
  measures of n points each is the mean squared gap between sorted values).
- Energy distance (Szekely & Rizzo, 2013): E = 2 E|X - Y| - E|X - X'| - E|Y - Y'| with the
  V-statistic (all pairs, diagonal included), so it is >= 0 for any two finite samples.

Both are biased upwards at finite n; compare against `floor`, the same metric between two
independent samples of the data at the same n.
"""

from __future__ import annotations

import torch


def random_directions(num_projections: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(P, d) unit vectors drawn uniformly on the sphere."""
    v = torch.randn(num_projections, dim, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced W2 between clouds x, y: (n, d) each, over `directions` (P, d)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced W2 needs equal sample sizes, got {tuple(x.shape)} and {tuple(y.shape)}")
    px = torch.sort(x.double() @ directions.T, dim=0).values  # (n, P)
    py = torch.sort(y.double() @ directions.T, dim=0).values  # (n, P)
    return float(((px - py) ** 2).mean().sqrt())


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance (V-statistic) between clouds x: (n, d) and y: (m, d)."""
    x, y = x.double(), y.double()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)


def distances(samples: torch.Tensor, reference: torch.Tensor, directions: torch.Tensor) -> dict[str, float]:
    """Both metrics of `samples` against `reference`, as the results.json leaf {"swd", "energy"}."""
    return {
        "swd": sliced_wasserstein2(samples, reference, directions),
        "energy": energy_distance(samples, reference),
    }
