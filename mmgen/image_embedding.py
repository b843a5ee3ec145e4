"""Image tokens in and out of the backbone (docs/design.md §6): patchify, embeddings, output head.

- in:  latents (M, C, h, w) -> patches (M, N, C p^2) -> Linear -> + 2D sin-cos patch position
       + MLP(sinusoid(t_in)) + MLP(sinusoid(s_in))   (two separate time MLPs, IMM's "stride" time)
- out: final hidden (n, D) -> image head -> (n, C p^2) -> unpatchify -> G (M, C, h, w)
- or (image_head "unet", below): U-Net down blocks latents -> (M, N, D) and up blocks with skips
  (M, N, D) -> G, FiLM-conditioned on the times and the prompt state at <|boi|> (Transfusion)

Sources: the sinusoidal timestep embedding + 2-layer SiLU MLP and the 2D sin-cos position
embedding follow DiT (Peebles & Xie 2023, arXiv 2212.09748, `models.py`: TimestepEmbedder,
get_2d_sincos_pos_embed); the adaLN residual-MLP head follows MAR's per-token head (Li et al.
2024, arXiv 2406.11838, "SimpleMLPAdaLN"). Written from the papers' descriptions.
The model knows nothing about noise schedules: t_in and s_in arrive already scaled
(`mmgen.objectives.imm.time_inputs`; docs/design.md §7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(M, C, h, w) -> (M, N, C*p*p), patches in row-major order (the packer's patch_ids, docs/design.md §4)."""
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
    """Small per-token adaLN residual MLP (MAR SimpleMLPAdaLN), conditioned on the image's times.

    With `prompt=True` ("adaln_prompt") the condition also holds a projection of the final hidden state at
    the image's <|boi|> (`forward(..., prompt=(M, D))`), as DiT's adaLN carries the class (Peebles & Xie
    2023, arXiv 2212.09748) and as this repo's U-Net decoder reads the prompt; the projection starts at
    zero, so the head starts as the time-only one."""

    def __init__(self, hidden_size: int, out_dim: int, depth: int, prompt: bool = False):
        super().__init__()
        self.prompt_proj = nn.Linear(hidden_size, hidden_size) if prompt else None
        if self.prompt_proj is not None:
            self.prompt_proj.zero_init = True  # starts as the time-only head
        self.blocks = nn.ModuleList([AdaLNBlock(hidden_size) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, h: torch.Tensor, cond: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """h (M, N, D) or (n, D); cond of the same shape; prompt (M, D) with `prompt=True` (else unused)."""
        if self.prompt_proj is not None:
            if prompt is None:
                raise ValueError("the adaln_prompt head needs the prompt state (final hidden state at <|boi|>)")
            cond = cond + self.prompt_proj(prompt.to(cond.dtype))[:, None, :]
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)  # 2 x (n, D)
        return self.linear(_modulate(self.final_norm(h), shift, scale))


def build_image_head(kind: str, hidden_size: int, out_dim: int, depth: int) -> nn.Module:
    if kind == "linear":
        return LinearHead(hidden_size, out_dim)
    if kind in ("adaln_mlp", "adaln_prompt"):
        return AdaLNMLPHead(hidden_size, out_dim, depth, prompt=kind == "adaln_prompt")
    raise ValueError(f"MMGenConfig.image_head must be 'linear', 'adaln_mlp' or 'adaln_prompt' here, got {kind!r}")


# --------------------------------------------------------------------------- U-Net patch codec
#
# Transfusion (Zhou et al. 2024, arXiv 2408.11039, §3 and §4.3) replaces the linear patch embedding and
# head with U-Net down blocks (latent -> one vector per patch) and up blocks (with skip connections from
# the down blocks) around the shared transformer, and finds them better at every model size: the
# convolutions bring a locality prior the transformer has to learn otherwise. Our conditioning follows
# it: the conv blocks see only the image's times (FiLM, as in DDPM/ADM ResBlocks); everything the prompt
# says reaches the image through the transformer's tokens, so every attention rule still holds.


def _conv_init(conv: nn.Module) -> None:
    """PyTorch's default Conv init (uniform +-1/sqrt(fan_in)) through `init`, which keeps loaded weights."""
    from transformers import initialization as init

    fan_in = conv.weight.shape[1] * conv.weight[0, 0].numel()
    if isinstance(conv, nn.ConvTranspose2d):  # weight (in, out, k, k): fan_in over the output side
        fan_in = conv.weight.shape[0] * conv.weight[0, 0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    init.uniform_(conv.weight, -bound, bound)
    init.uniform_(conv.bias, -bound, bound)


class FiLMResBlock(nn.Module):
    """x + conv(SiLU(FiLM(GN(conv(SiLU(GN(x))))))) with (scale, shift) = Linear(SiLU(cond)) (ADM ResBlock)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)  # 2 x (M, ch, 1, 1)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


def unet_channels(width: int, patch_size: int) -> list[int]:
    """Channels of the U-Net levels above the token grid: latent side, side/2, ... (log2(p) levels; one
    level at the token grid's own resolution when p = 1)."""
    if patch_size < 1 or patch_size & (patch_size - 1):
        raise ValueError(f"the U-Net image codec needs a power-of-two patch_size, got {patch_size}")
    levels = max(int(math.log2(patch_size)), 1)
    return [width * min(2**i, 2) for i in range(levels)]


class UNetImageEncoder(nn.Module):
    """Latents + (t_in, s_in) -> tokens (M, N, D) and a context (cond (M, D), skips) for the decoder.

    conv3x3 -> [FiLM ResBlock -> stride-2 conv] per level (the last one lands on the patch grid, in D
    channels) -> + 2D sin-cos position + time condition, as the linear embedding adds them.
    """

    def __init__(self, patch_size: int, channels: int, side: int, hidden_size: int, freq_dim: int, width: int):
        super().__init__()
        self.side = side
        chans = unet_channels(width, patch_size)
        self.t_embed = TimeEmbedding(freq_dim, hidden_size)
        self.s_embed = TimeEmbedding(freq_dim, hidden_size)
        self.conv_in = nn.Conv2d(channels, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(FiLMResBlock(c, hidden_size) for c in chans)
        outs = chans[1:] + [hidden_size]
        stride = 2 if patch_size > 1 else 1
        self.downs = nn.ModuleList(
            nn.Conv2d(c, o, 3, stride=stride, padding=1) for c, o in zip(chans, outs)
        )
        self.register_buffer("pos_embed", sincos_2d(side, hidden_size), persistent=False)

    def condition(self, t_in: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        return self.t_embed(t_in) + self.s_embed(s_in)

    def forward(self, latents: torch.Tensor, t_in: torch.Tensor, s_in: torch.Tensor):
        dtype = self.conv_in.weight.dtype
        cond = self.condition(t_in, s_in)  # (M, D)
        h = self.conv_in(latents.to(dtype))
        skips = []
        for block, down in zip(self.blocks, self.downs):
            h = block(h, cond)
            skips.append(h)
            h = down(h)
        tokens = h.flatten(2).transpose(1, 2)  # (M, N, D), row-major patches
        tokens = tokens + self.pos_embed.to(tokens.dtype)[None] + cond[:, None, :].to(tokens.dtype)
        return tokens, (cond, tuple(skips))


class UNetImageDecoder(nn.Module):
    """Final hidden states of an image's N tokens (M, N, D) + the encoder's context + the prompt state
    (M, D) -> G (M, C, h, w).

    LayerNorm -> back to the patch grid -> [transposed conv up (+ the encoder's skip) -> FiLM ResBlock]
    per level -> GN -> SiLU -> conv3x3 (zero-initialised: G starts at 0, as DiT's final layer).
    The up blocks' FiLM reads the time condition plus a projection of the prompt state: the final hidden
    state at the image's <|boi|>, which has read the whole prompt and nothing after it (DiT conditions every
    block on the class the same way). On the single-shape stand-in of `eval/codec_probe.py` it raised
    single-object accuracy well above up blocks that see the prompt only through the tokens (docs/findings.md).
    """

    def __init__(self, patch_size: int, channels: int, side: int, hidden_size: int, width: int):
        super().__init__()
        self.side = side
        chans = unet_channels(width, patch_size)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        ins = chans[1:] + [hidden_size]
        if patch_size > 1:
            self.ups = nn.ModuleList(nn.ConvTranspose2d(i, c, 4, stride=2, padding=1) for c, i in zip(chans, ins))
        else:
            self.ups = nn.ModuleList(nn.Conv2d(i, c, 1) for c, i in zip(chans, ins))
        self.blocks = nn.ModuleList(FiLMResBlock(c, hidden_size) for c in chans)
        self.prompt_proj = nn.Linear(hidden_size, hidden_size)
        self.norm_out = nn.GroupNorm(8, chans[0])
        self.conv_out = nn.Conv2d(chans[0], channels, 3, padding=1)
        self.conv_out.zero_init = True  # G starts at zero (DiT's zero-initialised final layer)

    def forward(self, hidden: torch.Tensor, context, prompt: torch.Tensor) -> torch.Tensor:
        cond, skips = context
        if prompt is None:
            raise ValueError("the U-Net image decoder needs the prompt state (final hidden at <|boi|>), got None")
        M, _, D = hidden.shape
        h = self.norm(hidden).transpose(1, 2).reshape(M, D, self.side, self.side)
        dtype = self.conv_out.weight.dtype
        cond = cond.to(h.dtype) + self.prompt_proj(prompt.to(self.prompt_proj.weight.dtype)).to(h.dtype)
        for up, block, skip in zip(reversed(self.ups), reversed(self.blocks), reversed(skips)):
            h = block(up(h) + skip.to(h.dtype), cond)
        return self.conv_out(F.silu(self.norm_out(h))).to(dtype)


def unet_conv_flops(channels: int, side: int, hidden_size: int, width: int, patch_size: int) -> tuple[float, float]:
    """Forward FLOPs (2 x multiply-adds) of the convolutions of one image: (encoder, decoder)."""
    chans = unet_channels(width, patch_size)
    S = side * patch_size  # latent side
    res = [S // 2**i for i in range(len(chans))]  # resolution of each level
    conv = lambda cin, cout, k, hw: 2.0 * cin * cout * k * k * hw * hw
    blocks = sum(2 * conv(c, c, 3, r) for c, r in zip(chans, res))
    outs = chans[1:] + [hidden_size]
    enc = conv(channels, chans[0], 3, S) + blocks
    dec = conv(chans[0], channels, 3, S) + blocks
    for c, o, r in zip(chans, outs, res):
        r_out = r // 2 if patch_size > 1 else r
        enc += conv(c, o, 3, r_out)
        dec += conv(o, c, 4, r_out) if patch_size > 1 else conv(o, c, 1, r)  # transposed: input resolution
    return enc, dec
