"""The second noisy copy of each image in a training forward: its inputs and the prefix it can reuse.

A packed training row can hold two noisy copies of an image: IMAGE_NOISY and IMAGE_TARGET tokens, each
reading the same text and clean images and seen by nobody else (mmgen/masks.py). The model treats the
second copy like the first; what it is for (IMM's target branch, f_{s,r}(x_r) without gradient) is the
objective's business. `TargetCopies` groups its inputs for `MMGenForConditionalGeneration.forward`;
with a `TargetPrefix` from the first pass only these tokens run, over the first pass's keys/values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache


@dataclass
class TargetCopies:
    """One second copy per image of the batch: latents (M, C, h, w) and time inputs t, s (M,) at its
    IMAGE_TARGET tokens; with `prefix` (a first pass's `target_prefix`), only these copies run, in the slots
    of the rows' IMAGE_NOISY tokens, over that pass's keys/values (`forward` says more)."""

    latents: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    prefix: TargetPrefix | None = None


@dataclass
class TargetPrefix:
    """What a training forward leaves for IMM's target copies (`forward(return_target_prefix=True)`).

    The target copy x_r is run with the same weights as the student, and nothing attends to noisy
    copies, so every TEXT/IMAGE_CLEAN token's keys and values are the same in both passes: the target
    pass needs to run only its own image tokens over them (like a cached image step). cache: the
    backbone's keys/values of the row's L + K columns (detached; the K appended null-context <|boi|>s of
    unconditional images included, so their target copies read the same null context as their student copies);
    hidden: the final hidden states (B, L + K, D), detached (prompt-reading heads read each image's <|boi|>);
    meta: [token_kind, document_ids, image_ids, patch_ids, prefix_end] of those columns, (B, L + K) each, with
    unconditional images' noisy copies pointing at their null <|boi|>; image_uncond: what the student saw."""

    cache: DynamicCache
    hidden: torch.Tensor
    meta: list
    image_uncond: torch.Tensor | None = None
