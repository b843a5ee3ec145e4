"""Hand-built packed rows for the model tests (the real packer is mmgen/data/packing.py).

Layout per docs/design.md §4: documents back to back (text, <|boi|>, N clean image tokens, <|eoi|>),
then the noisy copies of every image of the row (student, then target), then padding.
"""

from __future__ import annotations

import torch

from mmgen.configuration_mmgen import MMGenConfig
from mmgen.masks import TokenKind

KEYS = ("input_ids", "position_ids", "token_kind", "document_ids", "image_ids", "patch_ids", "prefix_end", "labels")


def tiny_config(**overrides) -> MMGenConfig:
    return MMGenConfig(**overrides)


def pack(rows, config: MMGenConfig, *, num_noisy_copies: int = 1, seed: int = 0, text_ids=None,
         with_labels: bool = False):
    """rows: list (batch) of documents; a document is a list of ("t", n) text runs and ("i",) images.

    Returns (batch: dict of (B, L) long tensors, images: list of (row, boi index, image position)).
    `labels` (UNshifted, -100 off text) is in the batch only with `with_labels`.
    Text ids are drawn from a seeded generator (or taken in order from `text_ids`).
    """
    g = torch.Generator().manual_seed(seed)
    N = config.num_image_tokens
    vocab = config.text_config.vocab_size
    supply = iter(text_ids) if text_ids is not None else None
    out_rows, images = [], []
    for r, docs in enumerate(rows):
        cols = {k: [] for k in KEYS}

        def add(tok, pos, kind, doc, img=-1, pid=-1, pe=-1, label=-100, cols=cols):
            for k, v in zip(KEYS, (tok, pos, int(kind), doc, img, pid, pe, label)):
                cols[k].append(v)

        row_images = []
        for d, segments in enumerate(docs):
            p = 0
            for seg in segments:
                if seg[0] == "t":
                    for _ in range(seg[1]):
                        tok = next(supply) if supply else int(torch.randint(16, vocab, (1,), generator=g))
                        add(tok, p, TokenKind.TEXT, d, label=tok)
                        p += 1
                else:
                    boi = len(cols["input_ids"])
                    add(config.boi_token_id, p, TokenKind.TEXT, d, label=config.boi_token_id)
                    p += 1
                    image = len(images)
                    images.append((r, boi, p))
                    row_images.append((image, boi, p, d))
                    for n in range(N):
                        add(config.image_token_id, p, TokenKind.IMAGE_CLEAN, d, image, n)
                    add(config.eoi_token_id, p + 1, TokenKind.TEXT, d)
                    p += 2
        for kind in (TokenKind.IMAGE_NOISY, TokenKind.IMAGE_TARGET)[:num_noisy_copies]:
            for image, boi, p, d in row_images:
                for n in range(N):
                    add(config.image_token_id, p, kind, d, image, n, boi)
        out_rows.append(cols)
    L = max(len(c["input_ids"]) for c in out_rows)
    pad_values = dict(zip(KEYS, (config.pad_token_id, 0, int(TokenKind.PAD), -1, -1, -1, -1, -100)))
    batch = {
        k: torch.tensor([c[k] + [pad_values[k]] * (L - len(c[k])) for c in out_rows], dtype=torch.long)
        for k in KEYS
        if with_labels or k != "labels"
    }
    return batch, images


def latents_for(config: MMGenConfig, num_images: int, seed: int = 0):
    """Clean latents (std sigma_data) and a student copy x_in with (t_in, s_in), seeded."""
    g = torch.Generator().manual_seed(seed)
    C, h = config.latent_channels, config.latent_size
    clean = config.sigma_data * torch.randn(num_images, C, h, h, generator=g)
    t = torch.rand(num_images, generator=g) * 0.9 + 0.05
    s = t * torch.rand(num_images, generator=g)
    x_t = (1 - t)[:, None, None, None] * clean + t[:, None, None, None] * config.sigma_data * torch.randn(
        clean.shape, generator=g
    )
    c_in = 1 / (config.sigma_data * torch.sqrt((1 - t) ** 2 + t**2))
    return {
        "clean_latents": clean,
        "noisy_latents": c_in[:, None, None, None] * x_t,
        "noisy_t": 1000 * t,
        "noisy_s": 1000 * (t - s),
    }
