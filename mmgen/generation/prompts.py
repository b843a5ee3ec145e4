"""What a generation call returns (TextDelta, GeneratedImage, Finished) and how prompts become a
left-padded batch of token ids (`collate_prompts`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from mmgen.layout import MODEL_INPUT_KEYS, TokenKind


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
