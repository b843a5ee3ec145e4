"""Image-caption pairs as chat documents that teach both directions.

A pair (img2dataset layout: `KEY.jpg` + `KEY.txt` / `KEY.json`) has no chat roles. `decode_sample` marks it
(`meta["_pair"]`) and `PairFormat.apply` writes it in one of the shapes world's two layouts:

- text -> image: <|user|>caption<|end|><|assistant|> [image] <|end|>   (the image is a generation target)
- image -> text: <|user|> [image] <|end|><|assistant|>caption<|end|>   (the caption is learned text)

so both directions train under `data.loss_on: assistant` as well as "all", and the prompts `mmgen.generation`
writes (a user turn asking for an image; an image in a user turn, then the assistant) are the trained ones.
A share `text_to_image` of the pairs is read caption first (Transfusion, Zhou et al. 2024, puts the caption
first in 80% of its pairs). The draw hashes (seed, epoch, shard, key): a resumed stream draws what the
uninterrupted one did, and a pair can change direction from one epoch to the next.

A caption longer than `max_caption_tokens` tokens is cut to that many (the reader counts it as
`captions_cut`); `row_caption_budget` gives the budget that leaves the pair's image its room in a row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mmgen.data.packing import tokenize_document
from mmgen.tokenization import ASSISTANT_TOKEN, END_TOKEN, USER_TOKEN

DIRECTIONS = ("text_image", "image_text")


def pair_segments(caption: str, image, direction: str) -> list[dict]:
    """The chat segments of one pair (module docstring)."""
    if direction == "text_image":
        return [{"text": f"{USER_TOKEN}{caption}{END_TOKEN}{ASSISTANT_TOKEN}"}, {"image": image}, {"text": END_TOKEN}]
    if direction == "image_text":
        return [{"text": USER_TOKEN}, {"image": image}, {"text": f"{END_TOKEN}{ASSISTANT_TOKEN}{caption}{END_TOKEN}"}]
    raise ValueError(f"pair direction must be one of {DIRECTIONS}, not {direction!r}")


@dataclass(frozen=True)
class PairFormat:
    """How the reader writes pairs: the direction mix and the caption budget (module docstring)."""

    text_to_image: float  # share of pairs read caption first, the rest image first (default: mmgen.config)
    seed: int = 0
    max_caption_tokens: int | None = None  # None: captions are not cut
    tokenizer: Any = None  # counts caption tokens; needed with max_caption_tokens

    def __post_init__(self):
        if not 0.0 <= self.text_to_image <= 1.0:
            raise ValueError(f"pair text_to_image must be in [0, 1], got {self.text_to_image}")
        if self.max_caption_tokens is not None and (self.max_caption_tokens < 1 or self.tokenizer is None):
            raise ValueError(f"max_caption_tokens must be >= 1 and come with a tokenizer, got {self.max_caption_tokens}")

    def direction(self, epoch: int, shard: str, key: str) -> str:
        digest = hashlib.blake2b(f"{self.seed}/{epoch}/{shard}/{key}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
        return DIRECTIONS[0] if u < self.text_to_image else DIRECTIONS[1]

    def cut_caption(self, caption: str) -> tuple[str, bool]:
        """(the caption's first `max_caption_tokens` tokens as text, whether anything was cut)."""
        if self.max_caption_tokens is None:
            return caption, False
        offsets = self.tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= self.max_caption_tokens:
            return caption, False
        return caption[: offsets[self.max_caption_tokens - 1][1]], True

    def apply(self, document: dict, epoch: int) -> bool:
        """Rewrite a decoded pair (meta "_pair"; others are left alone) in its drawn direction, in place; sets
        meta["_pair"] to the direction. Returns whether its caption was cut."""
        meta = document["meta"]
        if "_pair" not in meta:
            return False
        caption = next(s["text"] for s in document["segments"] if "text" in s)
        image = next(s["image"] for s in document["segments"] if "image" in s)
        caption, cut = self.cut_caption(caption)
        meta["_pair"] = self.direction(epoch, meta["_wds"]["shard"], meta["_wds"]["key"])
        document["segments"] = pair_segments(caption, image, meta["_pair"])
        return cut


def row_caption_budget(tokenizer, packing) -> int | None:
    """The most caption tokens a pair can have and still fit one row of `packing` (a PackingConfig) whole, its
    image's noisy copies included, in either direction; None when not even an empty caption fits."""
    image = Image.new("RGB", (packing.image_size, packing.image_size))
    fixed = max(tokenize_document({"segments": pair_segments("", image, d)}, tokenizer, packing).cost(packing)
                for d in DIRECTIONS)  # fmt: skip
    return packing.seq_len - fixed if packing.seq_len > fixed else None
