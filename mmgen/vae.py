"""Frozen diffusers ``AutoencoderKL`` wrapper: images in [-1, 1] <-> normalised latents.

Notation (docs/design.md §7): sigma_data = 0.5 is the std the flow-map objectives assume for data.
A VAE latent z (C, h, w) is normalised per channel,

    z_norm = (z - latent_mean[c]) / latent_std[c] * sigma_data,

so that latents of the training data have std ~ sigma_data; :meth:`MMGenVAE.decode` inverts it.
``latent_mean`` / ``latent_std`` are buffers (saved in the state dict with the model that holds
this module); measure them on data with :meth:`MMGenVAE.compute_latent_stats`. When they are not
given, the VAE's own config supplies a default: ``latents_mean`` / ``latents_std`` if set, else
mean = ``shift_factor`` (or 0) and std = 1 / ``scaling_factor`` (Stable Diffusion's convention,
Rombach et al., 2022, arXiv 2112.10752: z * scaling_factor has unit variance).

The autoencoder itself is diffusers' ``AutoencoderKL`` (docs: huggingface.co/docs/diffusers,
"AutoencoderKL"): ``encode(x).latent_dist`` is a diagonal Gaussian posterior with ``.sample
(generator)`` and ``.mode()``; ``decode(z).sample`` is the image.

Pretrained VAEs load with :meth:`MMGenVAE.load_pretrained`, which calls
``AutoencoderKL.from_pretrained``: a local directory written by ``save_pretrained``, or, when the
Hub is reachable, a repo id such as ``stabilityai/sd-vae-ft-ema`` (weights at the repo root) or a
pipeline repo with ``subfolder="vae"``. Offline (``HF_HUB_OFFLINE=1``) only local paths and the
local cache work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["MMGenVAE", "tiny_vae_config"]


def tiny_vae_config(
    in_channels: int = 3,
    latent_channels: int = 4,
    downsample_factor: int = 4,
    base_channels: int = 16,
    image_size: int = 32,
    layers_per_block: int = 1,
    attention: bool = False,
) -> dict:
    """A small ``AutoencoderKL`` config (~0.2 M params with the defaults) for tests and CPU runs.

    ``downsample_factor`` must be a power of two (the number of encoder blocks is log2(factor)+1);
    ``base_channels`` must be a multiple of 8 (GroupNorm uses 8 groups).
    """
    if downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
        raise ValueError(f"downsample_factor must be a power of two >= 1, got {downsample_factor}")
    if base_channels < 8 or base_channels % 8:
        raise ValueError(f"base_channels must be a positive multiple of 8, got {base_channels}")
    if image_size % downsample_factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by downsample_factor={downsample_factor}"
        )
    num_blocks = int(math.log2(downsample_factor)) + 1
    channels = [base_channels * min(2**i, 2) for i in range(num_blocks)]
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": image_size,
        "mid_block_add_attention": attention,
    }


def _default_stats(config: Mapping, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) implied by an AutoencoderKL config (see module docstring)."""
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        return (torch.tensor(config["latents_mean"], dtype=torch.float32),
                torch.tensor(config["latents_std"], dtype=torch.float32))
    shift = config.get("shift_factor") or 0.0
    scale = config.get("scaling_factor") or 1.0
    return torch.full((channels,), float(shift)), torch.full((channels,), 1.0 / float(scale))


class MMGenVAE(nn.Module):
    """Frozen ``AutoencoderKL`` plus per-channel latent normalisation to std ~ ``sigma_data``.

    The module stays in eval mode and without gradients whatever the parent module does
    (``train()`` is overridden); ``encode`` and ``decode`` run under ``torch.no_grad``.
    """

    def __init__(
        self,
        vae,
        latent_mean: torch.Tensor | None = None,
        latent_std: torch.Tensor | None = None,
        sigma_data: float = 0.5,
        range_tolerance: float = 1e-3,
    ):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.vae = vae
        self.sigma_data = float(sigma_data)
        self.range_tolerance = float(range_tolerance)
        C = self.latent_channels
        default_mean, default_std = _default_stats(vae.config, C)
        self.register_buffer("latent_mean", torch.empty(C))
        self.register_buffer("latent_std", torch.empty(C))
        self.set_latent_stats(
            default_mean if latent_mean is None else latent_mean,
            default_std if latent_std is None else latent_std,
        )
        self.vae.requires_grad_(False)
        self.vae.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Mapping, **kwargs) -> MMGenVAE:
        """Build a (randomly initialised) AutoencoderKL from a config dict, offline.

        ``kwargs`` go to ``__init__`` (latent_mean, latent_std, sigma_data, range_tolerance).
        """
        from diffusers import AutoencoderKL

        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict of AutoencoderKL arguments, got {type(config).__name__}")
        return cls(AutoencoderKL.from_config(dict(config)), **kwargs)

    @classmethod
    def load_pretrained(cls, name_or_path: str, *, subfolder: str | None = None,
                        latent_mean=None, latent_std=None, sigma_data: float = 0.5,
                        **from_pretrained_kwargs) -> MMGenVAE:
        """Load pretrained AutoencoderKL weights (local dir or Hub repo id; see module docstring).

        E.g. ``MMGenVAE.load_pretrained("stabilityai/sd-vae-ft-ema")`` when the Hub is reachable,
        or ``load_pretrained("some/pipeline", subfolder="vae")``. Latent stats default to the
        VAE config's own (``scaling_factor``); pass measured ones for best normalisation.
        """
        from diffusers import AutoencoderKL

        if subfolder is not None:
            from_pretrained_kwargs["subfolder"] = subfolder
        vae = AutoencoderKL.from_pretrained(name_or_path, **from_pretrained_kwargs)
        return cls(vae, latent_mean=latent_mean, latent_std=latent_std, sigma_data=sigma_data)

    def config_dict(self) -> dict:
        """JSON-serialisable AutoencoderKL config (for ``MMGenConfig.vae_config``)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.vae.config.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ properties
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def in_channels(self) -> int:
        return int(self.vae.config.in_channels)

    def train(self, mode: bool = True) -> MMGenVAE:
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    # ------------------------------------------------------------------ normalisation
    def set_latent_stats(self, mean, std) -> None:
        """Set the per-channel latent mean/std (shape (latent_channels,), std > 0)."""
        C = self.latent_channels
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        for name, t in (("latent_mean", mean), ("latent_std", std)):
            if t.shape != (C,):
                raise ValueError(f"{name} must have shape ({C},) (latent_channels), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} must be finite")
        if (std <= 0).any():
            raise ValueError(f"latent_std must be > 0, got {std.tolist()}")
        with torch.no_grad():
            self.latent_mean.copy_(mean)
            self.latent_std.copy_(std)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, h, w) -> normalised latents with std ~ sigma_data (float32)."""
        mean = self.latent_mean.float()[None, :, None, None]  # (1, C, 1, 1)
        std = self.latent_std.float()[None, :, None, None]
        return (z.float() - mean) / std * self.sigma_data

    def denormalize(self, z_norm: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (float32)."""
        mean = self.latent_mean.float()[None, :, None, None]  # (1, C, 1, 1)
        std = self.latent_std.float()[None, :, None, None]
        return z_norm.float() / self.sigma_data * std + mean

    # ------------------------------------------------------------------ encode / decode
    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError("images must be a floating-point tensor (B, C, H, W) in [-1, 1]")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels but the VAE expects in_channels={self.in_channels}"
            )
        H, W = images.shape[-2:]
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} is not divisible by the VAE downsample_factor={f}")
        lo, hi = float(images.min()), float(images.max())
        tol = self.range_tolerance
        if lo < -1 - tol or hi > 1 + tol:
            raise ValueError(
                f"images must be in [-1, 1] (tolerance {tol}), got values in [{lo:.4g}, {hi:.4g}]"
            )

    def _raw_latents(self, images, sample: bool, generator) -> torch.Tensor:
        param = next(self.vae.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        posterior = self.vae.encode(x).latent_dist
        return posterior.sample(generator=generator) if sample else posterior.mode()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C_in, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f), images' dtype.

        ``sample=True`` draws from the posterior (with ``generator``); otherwise its mode (mean).
        """
        self._check_images(images)
        return self.normalize(self._raw_latents(images, sample, generator)).to(images.dtype)

    @torch.no_grad()
    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) in [-1, 1] -> the posterior's mode before normalisation (float32): what a
        latent cache stores, since ``normalize`` of it is what ``encode`` returns."""
        self._check_images(images)
        return self._raw_latents(images, False, None).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, C_in, h*f, w*f) clamped to [-1, 1]."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("latents must be a floating-point tensor (B, C, h, w)")
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must have shape (B, latent_channels={self.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )
        param = next(self.vae.parameters())
        z = self.denormalize(latents).to(device=param.device, dtype=param.dtype)
        return self.vae.decode(z).sample.clamp(-1, 1).to(latents.dtype)

    @torch.no_grad()
    def compute_latent_stats(self, images: Iterable[torch.Tensor] | torch.Tensor, sample: bool = False,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) of the RAW latents over batches of images (population std).

        ``images``: one tensor (B, C_in, H, W) or an iterable of such batches. Accumulates in
        float64. Pass the result to :meth:`set_latent_stats`.
        """
        batches = [images] if isinstance(images, torch.Tensor) else images
        C = self.latent_channels
        total = torch.zeros(C, dtype=torch.float64)
        total_sq = torch.zeros(C, dtype=torch.float64)
        count = 0
        for batch in batches:
            self._check_images(batch)
            z = self._raw_latents(batch, sample, generator).double().cpu()  # (B, C, h, w)
            z = z.transpose(0, 1).reshape(C, -1)  # (C, B*h*w)
            total += z.sum(dim=1)
            total_sq += (z * z).sum(dim=1)
            count += z.shape[1]
        if count == 0:
            raise ValueError("images is empty: no batch to compute latent stats from")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp(min=0)
        return mean.float(), var.sqrt().float()
