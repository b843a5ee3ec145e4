"""One image from a cached prefix: `generate_image` runs the flow-map sampler on the prefix's KV cache;
`naive_generate_image` is the reference that recomputes the whole packed sequence at every step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from mmgen.layout import MODEL_INPUT_KEYS, TokenKind
from mmgen.objectives import objective_config
from mmgen.sampling import initial_noise, sample


@dataclass
class _Context:
    """The condition handed to the sampler: a prefix cache and where the image sits in it."""

    cache: DynamicCache
    image_position: torch.Tensor  # (B,)
    mask: torch.Tensor | None  # (B, P) valid prefix keys, None = all
    prompt: torch.Tensor | None = None  # (B, D) final hidden at <|boi|> (U-Net codec), once per image


def _cached_net(model):
    """The model's cached image step as the sampler's `net(x_in, t_in, s_in, cond)` (docs/design.md §7)."""
    dtype = model.get_input_embeddings().weight.dtype

    def net(x_in, t_in, s_in, ctx: _Context):
        g = model.image_step(
            ctx.cache,
            x_in.to(dtype),
            t_in,
            s_in,
            image_position=ctx.image_position,
            cache_attention_mask=ctx.mask,
            prompt_state=ctx.prompt,
        )
        return g.to(x_in.dtype)

    return net


def select_rows(cache: DynamicCache, rows: torch.Tensor, config) -> DynamicCache:
    """A new DynamicCache holding only `rows` of `cache` (a copy; the original is untouched)."""
    data = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=data, config=config)


def per_row(value, B: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple, torch.Tensor)) else [value] * B
    if len(values) != B:
        raise ValueError(f"{name}: got {len(values)} values for {B} rows")
    return [v.item() if isinstance(v, torch.Tensor) else v for v in values]


@torch.no_grad()
def generate_image(
    model,
    cache: DynamicCache,
    *,
    image_position,
    cache_attention_mask=None,
    num_steps,
    guidance=1.0,
    generators=None,
    noise=None,
    sampler: str | None = None,
) -> torch.Tensor:
    """Latents (B, C, h, w) of one image per row, sampled on a prefix `cache` ending at each row's <|boi|>.

    image_position: int or (B,) = <|boi|> position + 1; cache_attention_mask: (B, P) valid prefix keys;
    num_steps, guidance: scalars or one per row (rows are grouped by (num_steps, guidance));
    generators: one Generator per row (or None: global RNG) for the noise, unless `noise` (B, C, h, w) is
    given. The sampler follows `model.config.objective` (imm: pushforward, flow_matching: euler) unless
    `sampler` names one. The cache is read, never extended.
    """
    cfg = model.config
    B = cache.layers[0].keys.shape[0]
    device = model.get_input_embeddings().weight.device
    shape = (B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    if noise is None:
        gens = list(generators) if generators is not None else None
        noise = initial_noise(shape, gens, cfg.sigma_data).to(device)  # drawn on the generators' device
    position = torch.as_tensor(image_position, device=device, dtype=torch.long).reshape(-1).expand(B)
    steps, scales = per_row(num_steps, B, "num_steps"), per_row(guidance, B, "guidance")
    out = torch.empty_like(noise)
    for key in sorted(set(zip(steps, scales))):
        idx = [i for i in range(B) if (steps[i], scales[i]) == key]
        rows = torch.tensor(idx, device=device)
        sub = cache if len(idx) == B else select_rows(cache, rows, cfg.text_config)
        mask = None if cache_attention_mask is None else cache_attention_mask[rows]
        prompt = model.prompt_state(sub, image_position=position[rows], cache_attention_mask=mask)
        ctx = _Context(sub, position[rows], mask, prompt)
        null = None
        if (
            key[1] != 1.0
        ):  # the unconditional branch sees only a context-free <|boi|> (training's null context)
            null_cache = model.null_context_cache(len(idx), boi_position=position[rows] - 1)
            null = _Context(null_cache, position[rows], None,
                            model.prompt_state(null_cache, image_position=position[rows]))
        gens = [generators[i] for i in idx] if generators is not None else None
        extra = {"generator": gens} if (sampler == "restart") else {}
        out[rows] = sample(
            _cached_net(model),
            noise[rows],
            ctx,
            objective_name=cfg.objective,
            num_steps=int(key[0]),
            config=objective_config(cfg.objective, cfg.objective_params, sigma_data=cfg.sigma_data),
            sampler=sampler,
            guidance=float(key[1]),
            null_cond=null,
            **extra,
        )
    return out


@torch.no_grad()
def naive_generate_image(
    model, batch: dict, *, num_steps: int, guidance: float = 1.0, generators=None, noise=None
) -> torch.Tensor:
    """Reference sampler without cache: every step runs the whole packed rows plus a noisy copy.

    batch: `collate_prompts(..., append_boi=True)` output (rows end with <|boi|>). The noisy copy of the
    new image (N tokens, kind IMAGE_NOISY, prefix_end = the <|boi|>) is appended to each row, exactly the
    training layout; the unconditional branch sets `image_uncond` (the model adds the null context).
    """
    cfg = model.config
    B, L = batch["input_ids"].shape
    N, device = cfg.num_image_tokens, batch["input_ids"].device
    M = 0 if batch["clean_latents"] is None else batch["clean_latents"].shape[0]
    shape = (B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    if noise is None:
        noise = initial_noise(shape, list(generators) if generators is not None else None, cfg.sigma_data).to(
            device
        )
    col = lambda v: torch.as_tensor(v, device=device).reshape(-1, 1).expand(B, N)
    copy = {
        "input_ids": col(cfg.image_token_id),
        "position_ids": col(batch["position_ids"][:, -1] + 1),
        "token_kind": col(int(TokenKind.IMAGE_NOISY)),
        "document_ids": col(batch["document_ids"][:, -1]),
        "image_ids": col(M + torch.arange(B, device=device)),
        "patch_ids": torch.arange(N, device=device).expand(B, N),
        "prefix_end": col(L - 1),
    }
    row = {k: torch.cat([batch[k], copy[k]], dim=1) for k in MODEL_INPUT_KEYS}  # (B, L + N)
    clean = None
    if M:
        clean = torch.cat([batch["clean_latents"], batch["clean_latents"].new_zeros(B, *shape[1:])])
    dtype = model.get_input_embeddings().weight.dtype

    def net(x_in, t_in, s_in, uncond: bool):
        pad = lambda x: torch.cat([x.new_zeros(M, *x.shape[1:]), x])
        out = model(
            **row,
            clean_latents=clean,
            noisy_latents=pad(x_in.to(dtype)),
            noisy_t=pad(t_in),
            noisy_s=pad(s_in),
            image_uncond=torch.arange(M + B, device=device) >= (M if uncond else M + B),
        )
        return out.image_outputs[M:].to(x_in.dtype)

    null = True if guidance != 1.0 else None
    return sample(
        net,
        noise,
        False,
        objective_name=cfg.objective,
        num_steps=num_steps,
        config=objective_config(cfg.objective, cfg.objective_params, sigma_data=cfg.sigma_data),
        guidance=guidance,
        null_cond=null,
    )


def decode_latents(model, latents: torch.Tensor) -> list[Image.Image]:
    """Normalised latents (B, C, h, w) -> RGB PIL images through the model's VAE."""
    from mmgen.data.image_transforms import tensor_to_image

    return [tensor_to_image(x) for x in model.vae.decode(latents.float()).cpu()]
