"""Interleaved generation: text decoded on a KV cache, images as N flow-map jumps on the cached prefix.

DESIGN.md §6, issue 6 §1. One batch of conversations shares one `DynamicCache` (B rows, left
padding). Every row owns a key-validity mask `key_mask` (B, P): True where a cached column is a real
token of that row. Each engine tick feeds one token per live row (a sampled text token, or a
pending `<|boi|>` / `<|eoi|>`) in one backbone call. Rows that just fed `<|boi|>` then run their image:

    net(x_in, t_in, s_in, ctx) = model.image_step(ctx.cache, x_in, t_in, s_in, ...)      (CONTRACTS §1)
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
reference: the whole packed sequence with a noisy copy recomputed without cache at every step.

Mixed batches: rows in text mode and rows that start an image share each tick's token call; while
image rows run their flow-map steps the text rows wait (they do not decode in parallel with those
steps). A clean append is one call over all live rows: rows without an image get N masked columns
(holes), so every row keeps the same cache length. Per-row seeds (one `torch.Generator` per row,
used for its text sampling and its image noise), guidance scales and step counts make each row's
result independent of the rest of the batch (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from mmgen.cli import text_problem
from mmgen.layout import MODEL_INPUT_KEYS, TokenKind
from mmgen.masks import to_additive
from mmgen.objectives import objective_config
from mmgen.sampling import initial_noise, sample

__all__ = [
    "Finished",
    "GeneratedImage",
    "TextDelta",
    "caption_images",
    "caption_prompt",
    "collate_prompts",
    "decode_latents",
    "generate_image",
    "generate_images_for_prompts",
    "generate_interleaved",
    "naive_generate_image",
    "t2i_prompt",
]

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# ------------------------------------------------------------------------------------------------ parts


@dataclass
class TextDelta:
    """New text of row `row` (decoded incrementally; concatenating the deltas gives the reply's text)."""

    row: int
    text: str


@dataclass
class GeneratedImage:
    """A finished image of row `row`: PIL image and its normalised latent (C, h, w)."""

    row: int
    image: Image.Image
    latent: torch.Tensor


@dataclass
class Finished:
    """Row `row` stopped: reason "end" (<|end|>), "eos" (</s>) or "length" (max_new_tokens)."""

    row: int
    reason: str
    token_ids: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------------- prompts and batches


def t2i_prompt(prompt: str) -> str:
    """The training chat format of a text-to-image document up to the image (shapes_docs._t2i)."""
    return f"<|user|>{prompt}<|end|><|assistant|>"


def caption_prompt(image: Image.Image, question: str = "Describe the image.") -> dict:
    """The training chat format of a caption / VQA document up to the answer (shapes_docs._caption)."""
    return {"segments": [{"text": "<|user|>"}, {"image": image}, {"text": f"{question}<|end|><|assistant|>"}]}


def _is_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, int) for v in x)


def _as_batch(inputs) -> tuple[list, bool]:
    """messages | segments doc | str | ids | tensor, or a list of those -> (list of prompts, is_ids)."""
    if isinstance(inputs, torch.Tensor):
        rows = inputs[None] if inputs.dim() == 1 else inputs
        return [r.tolist() for r in rows], True
    if _is_ids(inputs):
        return [list(inputs)], True
    if isinstance(inputs, (str, dict)):
        return [inputs], False
    if (
        isinstance(inputs, (list, tuple))
        and inputs
        and all(isinstance(m, dict) and "role" in m for m in inputs)
    ):
        return [list(inputs)], False  # one conversation
    if isinstance(inputs, (list, tuple)) and inputs:
        items = list(inputs)
        if all(_is_ids(x) for x in items):
            return items, True
        return items, False
    raise TypeError(f"generation: cannot read prompts from {type(inputs).__name__}")


def _ids_encoding(ids: list[int]) -> dict:
    """Metadata (1, L) of a text-only document given as token ids."""
    L = len(ids)
    minus = torch.full((1, L), -1, dtype=torch.long)
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.arange(L)[None],
        "token_kind": torch.full((1, L), int(TokenKind.TEXT)),
        "document_ids": torch.zeros(1, L, dtype=torch.long),
        "image_ids": minus,
        "patch_ids": minus.clone(),
        "prefix_end": minus.clone(),
        "images": torch.zeros(0, 3, 1, 1),
    }


def collate_prompts(
    model, processor, prompts, *, add_generation_prompt: bool = True, append_boi: bool = False
):
    """Prompts -> one left-padded packed batch: metadata (B, L), `clean_latents` (M, C, h, w) or None.

    Each prompt goes through `processor` (so inference rows match training rows token for token), or is
    taken as token ids when every prompt is a list of ints (text only). `append_boi` ends each row
    with <|boi|> (a forced image). Image ids are renumbered across the batch.
    """
    cfg = model.config
    items, is_ids = _as_batch(prompts)
    encs = []
    for p in items:
        if is_ids:
            if cfg.image_token_id in p:
                raise ValueError("token-id prompts are text only; pass messages/segments to include images")
            enc = _ids_encoding(p)
        else:
            enc = processor(p, add_generation_prompt=add_generation_prompt)
        if append_boi:
            enc = _append_token(enc, cfg.boi_token_id)
        encs.append(enc)
    L = max(e["input_ids"].shape[1] for e in encs)
    pad = {
        "input_ids": cfg.pad_token_id,
        "position_ids": 0,
        "token_kind": int(TokenKind.PAD),
        "document_ids": -1,
        "image_ids": -1,
        "patch_ids": -1,
        "prefix_end": -1,
    }
    batch, offset, images = {k: [] for k in MODEL_INPUT_KEYS}, 0, []
    for e in encs:
        n = e["input_ids"].shape[1]
        for k in MODEL_INPUT_KEYS:
            v = e[k][0].long()
            if k == "image_ids":
                v = torch.where(v >= 0, v + offset, v)
            batch[k].append(torch.cat([v.new_full((L - n,), pad[k]), v]))  # left padding
        offset += e["images"].shape[0]
        images.append(e["images"])
    device = model.get_input_embeddings().weight.device
    out = {k: torch.stack(v).to(device) for k, v in batch.items()}
    out["clean_latents"] = None
    if offset:
        pixels = torch.cat([im for im in images if im.shape[0]]).float().to(device)
        out["clean_latents"] = model.vae.encode(pixels)  # (M, C, h, w), as training encodes (posterior mode)
    return out


def _append_token(enc: dict, token_id: int) -> dict:
    """One more TEXT token at the end of a (1, L) document encoding."""
    out = dict(enc)
    last = lambda k: enc[k][:, -1:]
    new = {
        "input_ids": torch.tensor([[token_id]]),
        "position_ids": last("position_ids") + 1,
        "token_kind": torch.tensor([[int(TokenKind.TEXT)]]),
        "document_ids": last("document_ids"),
        "image_ids": torch.tensor([[-1]]),
        "patch_ids": torch.tensor([[-1]]),
        "prefix_end": torch.tensor([[-1]]),
    }
    if int(enc["token_kind"][0, -1]) == int(TokenKind.IMAGE_CLEAN):  # cannot happen after a chat prompt
        raise ValueError("a prompt cannot end inside an image")
    for k, v in new.items():
        out[k] = torch.cat([enc[k].long(), v], dim=1)
    return out


# ------------------------------------------------------------------------------------------ the image


@dataclass
class _Context:
    """The condition handed to the sampler: a prefix cache and where the image sits in it."""

    cache: DynamicCache
    image_position: torch.Tensor  # (B,)
    mask: torch.Tensor | None  # (B, P) valid prefix keys, None = all
    prompt: torch.Tensor | None = None  # (B, D) final hidden at <|boi|> (U-Net codec), once per image


def _cached_net(model):
    """The model's cached image step as the sampler's `net(x_in, t_in, s_in, cond)` (CONTRACTS §1)."""
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


def _select_rows(cache: DynamicCache, rows: torch.Tensor, config) -> DynamicCache:
    """A new DynamicCache holding only `rows` of `cache` (a copy; the original is untouched)."""
    data = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=data, config=config)


def _per_row(value, B: int, name: str) -> list:
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
    steps, scales = _per_row(num_steps, B, "num_steps"), _per_row(guidance, B, "guidance")
    out = torch.empty_like(noise)
    for key in sorted(set(zip(steps, scales))):
        idx = [i for i in range(B) if (steps[i], scales[i]) == key]
        rows = torch.tensor(idx, device=device)
        sub = cache if len(idx) == B else _select_rows(cache, rows, cfg.text_config)
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


# ------------------------------------------------------------------------------------------ text decoding


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
    seeds = [seed + i for i in range(B)] if isinstance(seed, int) else _per_row(seed, B, "seed")
    steps, scales, forced = (
        _per_row(v, B, n)
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
    sub = cache if len(image_rows) == len(rows) else _select_rows(cache, idx, cfg.text_config)
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


# ------------------------------------------------------------------------------------- evaluation helpers


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
