"""Image tokens in and out of the backbone (DESIGN.md §3): patchify, embeddings, output head.

- in:  latents (M, C, h, w) -> patches (M, N, C p^2) -> Linear -> + 2D sin-cos patch position
       + MLP(sinusoid(t_in)) + MLP(sinusoid(s_in))   (two separate time MLPs, IMM's "stride" time)
- out: final hidden (n, D) -> image head -> (n, C p^2) -> unpatchify -> G (M, C, h, w)

Sources: the sinusoidal timestep embedding + 2-layer SiLU MLP and the 2D sin-cos position
embedding follow DiT (Peebles & Xie 2023, arXiv 2212.09748, `models.py`: TimestepEmbedder,
get_2d_sincos_pos_embed); the adaLN residual-MLP head follows MAR's per-token head (Li et al.
2024, arXiv 2406.11838, "SimpleMLPAdaLN"). Written from the papers' descriptions.
The model knows nothing about noise schedules: t_in and s_in arrive already scaled (CONTRACTS §1).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(M, C, h, w) -> (M, N, C*p*p), patches in row-major order (patch_ids of CONTRACTS §2)."""
    M, C, h, w = latents.shape
    x = latents.reshape(M, C, h // p, p, w // p, p)  # (M, C, hp, p, wp, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (M, hp, wp, C, p, p)
    return x.reshape(M, (h // p) * (w // p), C * p * p)  # (M, N, C p^2)


def unpatchify(patches: torch.Tensor, p: int, channels: int, side: int) -> torch.Tensor:
    """(M, N, C*p*p) -> (M, C, side*p, side*p); inverse of `patchify` for a square latent."""
    M = patches.shape[0]
    x = patches.reshape(M, side, side, channels, p, p)  # (M, hp, wp, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (M, C, hp, p, wp, p)
    return x.reshape(M, channels, side * p, side * p)


def sinusoid(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(M,) float -> (M, dim) [cos | sin] features (DiT TimestepEmbedder.timestep_embedding).

    Computed in float32: t_in = 1000 t spans 0..1000 and needs the precision.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]  # (M, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (M, dim)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) fixed 2D sin-cos position embedding: half the channels encode the row,
    half the column (DiT get_2d_sincos_pos_embed). Patches in row-major order."""
    if dim % 4:
        raise ValueError(f"text_config.hidden_size ({dim}) must be divisible by 4 for the 2D sin-cos embedding")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)

    def axis(pos):
        out = pos.reshape(-1, 1).double() * omega[None]  # (N, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (N, dim/2)

    return torch.cat([axis(rows), axis(cols)], dim=1).float()  # (N, dim)


class TimeEmbedding(nn.Module):
    """sinusoid(t) -> Linear -> SiLU -> Linear (one per time input)."""

    def __init__(self, freq_dim: int, hidden_size: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        freq = sinusoid(values, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # (M, D)


class ImageInputEmbedding(nn.Module):
    """Latents + (t_in, s_in) -> per-patch input embeddings (M, N, D) and per-image condition (M, D)."""

    def __init__(self, patch_size: int, channels: int, side: int, hidden_size: int, freq_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.side = side
        self.proj = nn.Linear(channels * patch_size**2, hidden_size)
        self.t_embed = TimeEmbedding(freq_dim, hidden_size)
        self.s_embed = TimeEmbedding(freq_dim, hidden_size)
        # Fixed, not learned; not saved (a function of the config). MMGenPreTrainedModel._init_weights
        # recomputes it after from_pretrained's meta-device construction.
        self.register_buffer("pos_embed", sincos_2d(side, hidden_size), persistent=False)

    def condition(self, t_in: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        """(M,), (M,) -> (M, D): the time condition added to every patch and fed to an adaLN head."""
        return self.t_embed(t_in) + self.s_embed(s_in)

    def forward(self, latents: torch.Tensor, t_in: torch.Tensor, s_in: torch.Tensor):
        dtype = self.proj.weight.dtype
        patches = patchify(latents.to(dtype), self.patch_size)  # (M, N, C p^2)
        cond = self.condition(t_in, s_in)  # (M, D)
        x = self.proj(patches) + self.pos_embed.to(dtype)[None] + cond[:, None, :]  # (M, N, D)
        return x, cond


class LinearHead(nn.Module):
    """LayerNorm (no affine) -> Linear. `cond` is accepted and ignored (same call as the adaLN head)."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(h))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)) with (shift, scale, gate) = Linear(SiLU(cond))."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(cond).chunk(3, dim=-1)  # 3 x (n, width)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class AdaLNMLPHead(nn.Module):
    """Small per-token adaLN residual MLP (MAR SimpleMLPAdaLN), conditioned on the image's times."""

    def __init__(self, hidden_size: int, out_dim: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([AdaLNBlock(hidden_size) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)  # 2 x (n, D)
        return self.linear(_modulate(self.final_norm(h), shift, scale))


def build_image_head(kind: str, hidden_size: int, out_dim: int, depth: int) -> nn.Module:
    if kind == "linear":
        return LinearHead(hidden_size, out_dim)
    if kind == "adaln_mlp":
        return AdaLNMLPHead(hidden_size, out_dim, depth)
    raise ValueError(f"MMGenConfig.image_head must be 'linear' or 'adaln_mlp', got {kind!r}")
