"""Generation for evaluation: many text-to-image prompts or captions in batches, one seed per item."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache

from mmgen.cli import text_problem
from mmgen.generation.image import decode_latents, generate_image
from mmgen.generation.interleaved import generate_interleaved
from mmgen.generation.prompts import TextDelta, caption_prompt, collate_prompts, t2i_prompt
from mmgen.layout import MODEL_INPUT_KEYS, TokenKind


def _chunks(n: int, size: int | None):
    size = size or n
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def generate_images_for_prompts(
    model,
    processor,
    prompts: Sequence[str],
    *,
    num_steps: int = 4,
    guidance=1.0,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = 32,
    return_latents: bool = False,
    sampler: str | None = None,
):
    """Text -> image: each prompt as a t2i chat turn, a forced <|boi|>, N flow-map steps; list of PIL images.

    Batched over prompts with left padding; image i depends only on (prompt i, seeds[i]) (default seed i).
    With `return_latents`, returns (images, latents (n, C, h, w)). `sampler` as in `generate_image`
    (None: the objective's own; "euler" integrates an IMM model's s = t velocity instead).
    """
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    for i, prompt in enumerate(prompts):  # refused before any work, naming the prompt
        problem = text_problem(prompt) if isinstance(prompt, str) else f"a {type(prompt).__name__}, not text"
        if problem:
            raise ValueError(f"prompt {i} {prompt!r:.60}: {problem}")
    images, latents = [], []
    for chunk in _chunks(len(prompts), batch_size):
        batch = collate_prompts(model, processor, [t2i_prompt(prompts[i]) for i in chunk], append_boi=True)
        cache = DynamicCache(config=model.config.text_config)
        model(
            **{k: batch[k] for k in MODEL_INPUT_KEYS},
            clean_latents=batch["clean_latents"],
            cache=cache,
            logits_to_keep=1,
        )
        lat = generate_image(
            model,
            cache,
            image_position=batch["position_ids"][:, -1] + 1,
            cache_attention_mask=batch["token_kind"] != TokenKind.PAD,
            num_steps=num_steps,
            guidance=guidance,
            generators=[torch.Generator().manual_seed(int(seeds[i])) for i in chunk],
            sampler=sampler,
        )
        images += decode_latents(model, lat)
        latents.append(lat.cpu())
    return (images, torch.cat(latents)) if return_latents else images


@torch.no_grad()
def caption_images(
    model,
    processor,
    images,
    question: str = "Describe the image.",
    *,
    max_new_tokens: int = 48,
    batch_size: int | None = 32,
) -> list[str]:
    """Image -> text, greedy: "<|user|>" image question "<|end|><|assistant|>", decoded until <|end|>."""
    texts = [""] * len(images)
    for chunk in _chunks(len(images), batch_size):
        prompts = [caption_prompt(images[i], question) for i in chunk]
        for part in generate_interleaved(
            model, processor, prompts, max_new_tokens=max_new_tokens, allow_images=False
        ):
            if isinstance(part, TextDelta):
                texts[chunk[part.row]] += part.text
    return texts
