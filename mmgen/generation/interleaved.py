"""Interleaved generation: text decoded on a KV cache, images as N flow-map jumps on the cached prefix.

One batch of conversations shares one `DynamicCache` (B rows, left
padding). Every row owns a key-validity mask `key_mask` (B, P): True where a cached column is a real
token of that row. Each engine tick feeds one token per live row (a sampled text token, or a
pending `<|boi|>` / `<|eoi|>`) in one backbone call. Rows that just fed `<|boi|>` then run their image:

    net(x_in, t_in, s_in, ctx) = model.image_step(ctx.cache, x_in, t_in, s_in, ...)
    latents = mmgen.sampling.sample(net, noise, ctx, null_cond=null_ctx, ...)          (IMM pushforward,
                                                                                      FM Euler)

The N image tokens attend to the row's valid cached prefix and to themselves; the cache is never
extended by noisy tokens. Classifier-free guidance evaluates the same step on `null_ctx`, a tiny
cache holding only a context-free `<|boi|>` at the image's `<|boi|>` position -- the null context
that training shows unconditional copies (`MMGenForConditionalGeneration._add_null_context`). The
finished latent is run once as a clean copy and appended (`append_clean_image`); `<|eoi|>` is fed
on the next tick and text decoding continues.

Cost of an image: num_steps passes over N tokens (x2 with guidance, plus a 1-token null cache) and
one clean pass over N tokens, independent of the prefix length. `naive_generate_image` is the
reference (image.py): the whole packed sequence with a noisy copy recomputed without cache at every step.

Mixed batches: rows in text mode and rows that start an image share each tick's token call; while
image rows run their flow-map steps the text rows wait (they do not decode in parallel with those
steps). A clean append is one call over all live rows: rows without an image get N masked columns
(holes), so every row keeps the same cache length. Per-row seeds (one `torch.Generator` per row,
used for its text sampling and its image noise), guidance scales and step counts make each row's
result independent of the rest of the batch (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from mmgen.generation.image import decode_latents, generate_image, per_row, select_rows
from mmgen.generation.prompts import Finished, GeneratedImage, TextDelta, collate_prompts
from mmgen.layout import MODEL_INPUT_KEYS, TokenKind
from mmgen.masks import to_additive

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

def _process_logits(logits, seen, *, temperature, top_k, top_p, repetition_penalty):
    """(V,) float logits -> processed logits (repetition penalty CTRL-style, temperature, top-k, top-p)."""
    if repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(seen), device=logits.device)
        s = logits[ids]
        logits[ids] = torch.where(s > 0, s / repetition_penalty, s * repetition_penalty)
    if temperature <= 0:
        return logits
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@dataclass
class _Row:
    index: int  # the caller's row number
    generator: torch.Generator
    num_steps: int
    guidance: float
    seen: set
    pending: list = field(default_factory=list)  # tokens to feed before sampling again (<|boi|>, <|eoi|>)
    count: int = 0  # sampled (or forced) new tokens
    run: list = field(default_factory=list)  # text tokens since the last image
    emitted: str = ""
    tokens: list = field(default_factory=list)


def _decode_step(model, cache, key_mask, tokens, positions):
    """Feed one token per row; returns logits (B, V). Keys: the row's valid cache columns + itself."""
    B = tokens.shape[0]
    allowed = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)[:, None, None, :]  # (B, 1, 1, P + 1)
    dtype = model.get_input_embeddings().weight.dtype
    out = model(
        input_ids=tokens[:, None],
        position_ids=positions[:, None],
        attention_mask=to_additive(allowed, dtype),
        cache=cache,
        use_cache=True,
    )
    return out.logits[:, -1].float()


@torch.no_grad()
def generate_interleaved(
    model,
    processor,
    messages_or_input_ids,
    *,
    max_new_tokens: int = 256,
    num_steps=4,
    guidance=1.0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed=0,
    force_image=False,
    allow_images: bool = True,
    add_generation_prompt: bool = True,
) -> Iterator[TextDelta | GeneratedImage | Finished]:
    """Yield the parts of each row's reply as they are produced: TextDelta, GeneratedImage, then Finished.

    messages_or_input_ids: one conversation (messages, a segments document, a string, token ids) or a list
    of them (a batch). temperature 0 = greedy. seed: int (row i uses seed + i) or one seed per row.
    num_steps / guidance: scalar or per row. force_image: bool or per row -- the reply starts with an image.
    Stops a row at <|end|> or </s> (neither is fed or shown) or after `max_new_tokens` new tokens.
    """
    cfg = model.config
    batch = collate_prompts(
        model, processor, messages_or_input_ids, add_generation_prompt=add_generation_prompt
    )
    B = batch["input_ids"].shape[0]
    seeds = [seed + i for i in range(B)] if isinstance(seed, int) else per_row(seed, B, "seed")
    steps, scales, forced = (
        per_row(v, B, n)
        for v, n in ((num_steps, "num_steps"), (guidance, "guidance"), (force_image, "force_image"))
    )
    rows = [
        _Row(
            i,
            torch.Generator().manual_seed(int(seeds[i])),
            int(steps[i]),
            float(scales[i]),
            set(batch["input_ids"][i][batch["token_kind"][i] == TokenKind.TEXT].tolist()),
            pending=[cfg.boi_token_id] if forced[i] else [],
        )
        for i in range(B)
    ]
    cache = DynamicCache(config=cfg.text_config)
    out = model(
        **{k: batch[k] for k in MODEL_INPUT_KEYS},
        clean_latents=batch["clean_latents"],
        cache=cache,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1].float()  # (B, V)
    key_mask = batch["token_kind"] != TokenKind.PAD  # (B, P)
    next_pos = batch["position_ids"][:, -1] + 1  # (B,)
    banned = [cfg.pad_token_id, cfg.image_token_id] + ([] if allow_images else [cfg.boi_token_id])
    stops = {cfg.end_token_id: "end", cfg.eos_token_id: "eos"}
    tokenizer = processor.tokenizer if processor is not None else None

    while rows:
        tokens, finished = [], []
        for j, row in enumerate(rows):
            if row.pending:
                tok = row.pending.pop(0)
                row.count += tok == cfg.boi_token_id  # a forced <|boi|> counts, the closing <|eoi|> does not
            elif row.count >= max_new_tokens:
                finished.append((j, "length"))
                continue
            else:
                scores = logits[j].clone()
                scores[banned] = float("-inf")
                scores = _process_logits(
                    scores,
                    row.seen,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    repetition_penalty=repetition_penalty,
                )
                if temperature <= 0:
                    tok = int(scores.argmax())
                else:
                    tok = int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=row.generator))
                row.count += 1
            if tok in stops:
                finished.append((j, stops[tok]))
                continue
            tokens.append((j, tok))
        for j, reason in finished:
            yield from _text_delta(tokenizer, rows[j], final=True)
            yield Finished(rows[j].index, reason, rows[j].tokens)
        if finished:  # drop finished rows from the batch (and from the cache)
            keep = [j for j, _ in tokens]
            idx = torch.tensor(keep, device=key_mask.device)
            if not keep:
                return
            cache.batch_select_indices(idx)
            key_mask, next_pos, logits = key_mask[idx], next_pos[idx], logits[idx]
            rows = [rows[j] for j in keep]
            tokens = [(i, tok) for i, (_, tok) in enumerate(tokens)]
        ids = torch.tensor([tok for _, tok in tokens], device=key_mask.device)
        logits = _decode_step(model, cache, key_mask, ids, next_pos)
        key_mask = torch.cat([key_mask, key_mask.new_ones(len(rows), 1)], dim=1)
        image_rows = [j for j, tok in tokens if tok == cfg.boi_token_id]
        for j, tok in tokens:
            row = rows[j]
            row.tokens.append(tok)
            row.seen.add(tok)
            if tok in (cfg.boi_token_id, cfg.eoi_token_id):
                yield from _text_delta(tokenizer, row, final=True)
                row.run, row.emitted = [], ""
                continue
            row.run.append(tok)
            yield from _text_delta(tokenizer, row)
        next_pos = next_pos + 1
        if image_rows:
            yield from _run_images(model, rows, image_rows, cache, key_mask, next_pos)
            key_mask = torch.cat(
                [key_mask, _image_columns(key_mask, image_rows, cfg.num_image_tokens)], dim=1
            )
            next_pos = (
                next_pos
                + torch.isin(
                    torch.arange(len(rows), device=next_pos.device),
                    torch.tensor(image_rows, device=next_pos.device),
                ).long()
            )


def _text_delta(tokenizer, row: _Row, final: bool = False):
    """Yield the row's new text. Byte-fallback pieces (<0x..>) decode to U+FFFD until their character is
    complete (and the decoder may rewrite the whole byte run), so text is shown only up to the last
    non-byte piece, and in full at the end of the run: the deltas always concatenate to the decoded run."""
    if tokenizer is None or not row.run:
        return
    cut = len(row.run)
    if not final:
        pieces = tokenizer.convert_ids_to_tokens(row.run)
        while cut and _BYTE_PIECE.fullmatch(pieces[cut - 1]):
            cut -= 1
    text = tokenizer.decode(row.run[:cut], skip_special_tokens=False)
    if len(text) > len(row.emitted) and text.startswith(row.emitted):
        yield TextDelta(row.index, text[len(row.emitted) :])
        row.emitted = text


def _image_columns(key_mask, image_rows, N):
    """Validity of the N appended clean-image columns: True for rows with an image, holes elsewhere."""
    cols = key_mask.new_zeros(key_mask.shape[0], N)
    cols[image_rows] = True
    return cols


def _run_images(model, rows, image_rows, cache, key_mask, next_pos):
    """Sample the images of `image_rows` (their <|boi|> is the last cached column), yield them, then append
    every image as a clean copy (one call over all rows; holes for the others) and queue <|eoi|>."""
    cfg = model.config
    idx = torch.tensor(image_rows, device=key_mask.device)
    sub = cache if len(image_rows) == len(rows) else select_rows(cache, idx, cfg.text_config)
    latents = generate_image(
        model,
        sub,
        image_position=next_pos[idx],
        cache_attention_mask=key_mask[idx],
        num_steps=[rows[j].num_steps for j in image_rows],
        guidance=[rows[j].guidance for j in image_rows],
        generators=[rows[j].generator for j in image_rows],
    )
    for j, pil, lat in zip(image_rows, decode_latents(model, latents), latents):
        yield GeneratedImage(rows[j].index, pil, lat.cpu())
        rows[j].pending.append(cfg.eoi_token_id)
    full = latents.new_zeros(len(rows), *latents.shape[1:])
    full[idx] = latents
    model.append_clean_image(
        cache,
        full.to(model.get_input_embeddings().weight.dtype),
        image_position=next_pos,
        cache_attention_mask=key_mask,
    )
