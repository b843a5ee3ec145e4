"""Tokenise documents (docs/design.md §3) and pack them into fixed-length rows (docs/design.md §4).

A row, left to right:

    doc 0: <s> text ... <|boi|> N x <|image|> (clean) <|eoi|> text ... </s>
    doc 1: ...                                   (documents back to back, whole)
    noisy copies: for each image of the row in order, N IMAGE_NOISY tokens (the student copy); with
                  num_noisy_copies=2, then the same for IMAGE_TARGET (all student copies first, then all
                  target copies; consumers must locate copies by token_kind / image_ids / patch_ids)
    padding

Packing is greedy and order-preserving with one open row: a document goes into the open row if it fits,
counting the room its noisy copies need at the row end (cost = tokens + num_noisy_copies * N per image);
otherwise the row is closed and the document starts a new one. Documents are never split across rows, so
an image is never split and an image never loses its prompt. A document longer than a whole row is cut at
the last segment boundary that fits (counted in `num_truncated_documents`, the images cut away in
`num_dropped_images`); if not even its first segment fits, a first text segment is cut at a token
boundary, and a first image makes the document dropped (counted in both).

Per-token metadata (all (B, L) long): input_ids (the `<|image|>` id at every image token), position_ids
(per document from 0; every copy of an image at <|boi|>+1, <|eoi|> at <|boi|>+2), token_kind, document_ids
(-1 on padding), image_ids (flat index into the batch's image list), patch_ids (row-major 0..N-1),
prefix_end (noisy/target tokens: row index of their image's <|boi|>) and labels (UNshifted; -100 on padding,
image tokens, noisy copies, <|eoi|> (forced, not learned), the first token of each document (nothing in the
document predicts it) and, with text_loss="assistant", text outside assistant turns; <|boi|> keeps its
label so the model learns when to start an image).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from mmgen.data.image_transforms import image_to_tensor
from mmgen.data.latents import stack_images
from mmgen.data.sample_format import CachedLatent
from mmgen.layout import IGNORE_INDEX, METADATA_KEYS, TokenKind
from mmgen.tokenization import SHAPES_SPECIAL_IDS, SpecialIds

logger = logging.getLogger(__name__)

COUNTER_KEYS = ("num_documents", "num_truncated_documents", "num_dropped_images", "num_skipped_documents")


@dataclass(frozen=True)
class PackingConfig:
    seq_len: int  # L, tokens per row
    num_image_tokens: int  # N, tokens per image copy
    image_size: int  # images are resized + centre-cropped to image_size x image_size
    num_noisy_copies: int = 1  # 0 (understanding only / inference), 1 (student), 2 (student + IMM target)
    text_loss: str = "all"  # "all": every text token; "assistant": only inside <|assistant|> ... <|end|>
    # "all": every image gets noisy copies (is a generation target); "assistant": not the images inside a user
    # turn (<|user|> ... <|end|>), which the model reads but never draws (captioning, VQA inputs)
    image_loss: str = "all"
    add_bos: bool = True  # <s> at the start of each document
    add_eos: bool = True  # </s> at the end of each (untruncated) document
    # The ids written for <s>, <|boi|>, ...: the fixed ids of docs/design.md §2 (the shapes tokenizer) unless a
    # tokenizer with other ids is used (a pretrained LM's: `SpecialIds.from_tokenizer`).
    special_ids: SpecialIds = SHAPES_SPECIAL_IDS

    def __post_init__(self):
        if self.num_noisy_copies not in (0, 1, 2):
            raise ValueError(f"PackingConfig.num_noisy_copies must be 0, 1 or 2, got {self.num_noisy_copies}")
        for name in ("text_loss", "image_loss"):
            if getattr(self, name) not in ("all", "assistant"):
                raise ValueError(f"PackingConfig.{name} must be 'all' or 'assistant', got {getattr(self, name)!r}")
        if self.num_image_tokens < 1 or self.image_size < 1:
            raise ValueError("PackingConfig.num_image_tokens and image_size must be >= 1")
        if self.seq_len < 1:
            raise ValueError(f"PackingConfig.seq_len must be >= 1, got {self.seq_len}")


@dataclass
class TokenizedDocument:
    """One document as per-token lists, positions relative to the document; images not yet numbered."""

    input_ids: list[int]
    token_kind: list[int]
    position_ids: list[int]
    labels: list[int]
    local_image: list[int]  # index of the image within the document, -1 for text
    patch_ids: list[int]
    boi_offsets: list[int]  # per image: offset of its <|boi|> within the document
    images: list[torch.Tensor | CachedLatent]  # per image: (3, H, W) in [-1, 1], or its cached latent
    noisy: list[bool]  # per image: has noisy copies (a generation target); see PackingConfig.image_loss
    cuts: list[tuple[int, int]] = field(default_factory=list)  # (tokens, images) at each segment boundary
    truncated: bool = False
    dropped_images: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def cost(self, config: PackingConfig, num_tokens: int | None = None, num_images: int | None = None) -> int:
        """Row room this document (or its first `num_tokens` tokens holding `num_images` images) needs: its
        tokens plus its images' noisy copies."""
        n_tok = len(self.input_ids) if num_tokens is None else num_tokens
        noisy = sum(self.noisy[: len(self.images) if num_images is None else num_images])
        return n_tok + config.num_noisy_copies * config.num_image_tokens * noisy


def _check_segments(document, where: str) -> list[dict]:
    if not isinstance(document, dict) or not isinstance(document.get("segments"), list):
        raise TypeError(f"{where}: a document is a dict with a 'segments' list")
    segments = document["segments"]
    if not segments:
        raise ValueError(f"{where}: 'segments' is empty")
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or len(seg.keys() & {"text", "image", "images"}) != 1:
            raise ValueError(f"{where}: segments[{i}] must have exactly one of 'text', 'image' or 'images'")
        if "images" in seg and (not isinstance(seg["images"], list) or not seg["images"]):
            raise ValueError(f"{where}: segments[{i}]['images'] must be a non-empty list of images")
        if "text" in seg and not isinstance(seg["text"], str):
            raise ValueError(
                f"{where}: segments[{i}]['text'] must be a str, got {type(seg['text']).__name__}"
            )
    return segments


def tokenize_document(
    document: dict, tokenizer, config: PackingConfig, where: str = "document"
) -> TokenizedDocument:
    """Segments -> tokens: text through the tokenizer (inline special tokens parsed), each image as
    <|boi|> N x <|image|> <|eoi|>. Raises ValueError naming `where` for malformed documents."""
    segments = _check_segments(document, where)
    texts = [seg["text"] for seg in segments if "text" in seg]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    N, sid = config.num_image_tokens, config.special_ids
    doc = TokenizedDocument([], [], [], [], [], [], [], [], [])
    pos = 0
    in_user = False  # inside <|user|> ... <|end|>: images there are inputs, not generation targets

    def add(token_id: int, kind: TokenKind, position: int, image: int = -1, patch: int = -1):
        nonlocal in_user
        if token_id == sid.user:
            in_user = True
        elif token_id in (sid.end, sid.assistant):
            in_user = False
        doc.input_ids.append(token_id)
        doc.token_kind.append(int(kind))
        doc.position_ids.append(position)
        doc.local_image.append(image)
        doc.patch_ids.append(patch)

    if config.add_bos:
        add(sid.bos, TokenKind.TEXT, pos)
        pos += 1
    doc.cuts.append((len(doc.input_ids), 0))
    for i, seg in enumerate(segments):
        if "text" in seg:
            ids = next(encoded)
            if any(t in (sid.boi, sid.eoi, sid.image) for t in ids):
                raise ValueError(f"{where}: segments[{i}] text contains <|boi|>, <|eoi|> or <|image|>; "
                                 "images must be {'image': ...} segments")  # fmt: skip
            for t in ids:
                add(t, TokenKind.TEXT, pos)
                pos += 1
        else:
            k = len(doc.images)  # the slot's first sample: its clean copy is what later tokens see
            samples = seg["images"] if "images" in seg else [seg["image"]]
            target = config.image_loss == "all" or not in_user
            for image in samples:  # a cached latent (mmgen.data.latents) goes to the batch as it is
                doc.images.append(image if isinstance(image, CachedLatent)
                                  else image_to_tensor(image, config.image_size, where=f"{where}: segments[{i}]"))
                doc.boi_offsets.append(len(doc.input_ids))
                doc.noisy.append(target)
            add(sid.boi, TokenKind.TEXT, pos)
            for p in range(N):  # one shared position for the whole image (docs/design.md §4)
                add(sid.image, TokenKind.IMAGE_CLEAN, pos + 1, image=k, patch=p)
            add(sid.eoi, TokenKind.TEXT, pos + 2)
            pos += 3
        doc.cuts.append((len(doc.input_ids), len(doc.images)))
    if config.add_eos:
        add(sid.eos, TokenKind.TEXT, pos)
        doc.cuts.append((len(doc.input_ids), len(doc.images)))
    doc.labels = _labels(doc.input_ids, doc.token_kind, config.text_loss, sid)
    return doc


def _labels(input_ids: list[int], token_kind: list[int], text_loss: str, sid: SpecialIds) -> list[int]:
    labels = []
    in_assistant = False
    for j, (t, kind) in enumerate(zip(input_ids, token_kind)):
        # j == 0: nothing in the document predicts its first token.
        learned = kind == TokenKind.TEXT and t != sid.eoi and j > 0
        if text_loss == "assistant":
            learned = learned and in_assistant
            if t == sid.assistant:
                in_assistant = True
            elif t == sid.end:
                in_assistant = False
        labels.append(t if learned else IGNORE_INDEX)
    return labels


def truncate_document(doc: TokenizedDocument, budget: int, config: PackingConfig) -> TokenizedDocument | None:
    """The longest prefix of `doc` cut at a segment boundary whose cost fits `budget`; a first text segment
    is cut at a token boundary if no segment fits; None when nothing (beyond <s>) fits."""
    keep = None
    for n_tok, n_img in reversed(doc.cuts):
        if doc.cost(config, n_tok, n_img) <= budget and n_tok > doc.cuts[0][0]:
            keep = (n_tok, n_img)
            break
    if keep is None:
        start = doc.cuts[0][0]
        first_is_text = len(doc.cuts) > 1 and doc.cuts[1][1] == 0
        if not first_is_text or budget <= start:
            return None
        keep = (min(budget, doc.cuts[1][0]), 0)
    n_tok, n_img = keep
    return TokenizedDocument(
        input_ids=doc.input_ids[:n_tok],
        token_kind=doc.token_kind[:n_tok],
        position_ids=doc.position_ids[:n_tok],
        labels=doc.labels[:n_tok],
        local_image=doc.local_image[:n_tok],
        patch_ids=doc.patch_ids[:n_tok],
        boi_offsets=doc.boi_offsets[:n_img],
        images=doc.images[:n_img],
        noisy=doc.noisy[:n_img],
        cuts=[c for c in doc.cuts if c[0] <= n_tok],
        truncated=True,
        dropped_images=len(doc.images) - n_img,
    )


@dataclass
class _Row:
    docs: list[TokenizedDocument] = field(default_factory=list)
    used: int = 0  # tokens + reserved noisy-copy room
    end_index: int = 0  # stream index one past the last document consumed for this row (resume point)
    counters: dict = field(default_factory=lambda: dict.fromkeys(COUNTER_KEYS, 0))


def build_batch(
    rows: list[list[TokenizedDocument]], config: PackingConfig, seq_len: int | None = None
) -> dict:
    """Materialise rows of documents into the batch dict of docs/design.md §4 (B = len(rows), L = seq_len)."""
    L = config.seq_len if seq_len is None else seq_len
    N, C = config.num_image_tokens, config.num_noisy_copies
    B = len(rows)
    out = {k: torch.full((B, L), -1, dtype=torch.long) for k in METADATA_KEYS}
    out["input_ids"].fill_(config.special_ids.pad)
    out["position_ids"].fill_(0)
    out["token_kind"].fill_(int(TokenKind.PAD))
    out["labels"].fill_(IGNORE_INDEX)
    images: list[torch.Tensor] = []
    for b, docs in enumerate(rows):
        at = 0
        row_images = []  # (global image id, row index of <|boi|>, position, document id)
        for d, doc in enumerate(docs):
            n = len(doc)
            first_image = len(images)
            sl = slice(at, at + n)
            out["input_ids"][b, sl] = torch.tensor(doc.input_ids)
            out["position_ids"][b, sl] = torch.tensor(doc.position_ids)
            out["token_kind"][b, sl] = torch.tensor(doc.token_kind)
            out["labels"][b, sl] = torch.tensor(doc.labels)
            out["document_ids"][b, sl] = d
            local = torch.tensor(doc.local_image)
            out["image_ids"][b, sl] = torch.where(local >= 0, local + first_image, local)
            out["patch_ids"][b, sl] = torch.tensor(doc.patch_ids)
            for k, boi in enumerate(doc.boi_offsets):
                if doc.noisy[k]:
                    row_images.append((first_image + k, at + boi, doc.position_ids[boi] + 1, d))
            images.extend(doc.images)
            at += n
        for kind in (TokenKind.IMAGE_NOISY, TokenKind.IMAGE_TARGET)[:C]:
            for image_id, boi_index, position, d in row_images:
                sl = slice(at, at + N)
                out["input_ids"][b, sl] = config.special_ids.image
                out["position_ids"][b, sl] = position
                out["token_kind"][b, sl] = int(kind)
                out["document_ids"][b, sl] = d
                out["image_ids"][b, sl] = image_id
                out["patch_ids"][b, sl] = torch.arange(N)
                out["prefix_end"][b, sl] = boi_index
                at += N
        if at > L:
            raise ValueError(f"packing: row {b} needs {at} tokens, more than seq_len={L}")
    out.update(stack_images(images, config.image_size))
    out["image_uncond"] = torch.zeros(len(images), dtype=torch.bool)  # the objective sets CFG dropout
    return out


class DocumentPacker:
    """Streaming packer: documents in, batches of `batch_size` rows out (order preserved).

    Resume: `state_dict()` after a batch gives the stream index of the first document not yet delivered
    in a batch and the counters of delivered batches; a new packer given `load_state_dict(state)` and the
    SAME document stream from its start skips that many documents and continues with identical batches.
    """

    def __init__(self, tokenizer, config: PackingConfig, batch_size: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"DocumentPacker.batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.config = tokenizer, config
        self.batch_size, self.drop_last = batch_size, drop_last
        self.stats = dict.fromkeys(COUNTER_KEYS, 0)  # totals over delivered batches
        self.resume_index = 0

    @classmethod
    def from_processor(cls, processor, *, seq_len: int, batch_size: int, num_noisy_copies: int = 1, **kwargs):
        kwargs.setdefault("special_ids", processor.special_ids)
        config = PackingConfig(seq_len=seq_len, num_image_tokens=processor.num_image_tokens,
                               image_size=processor.image_size, num_noisy_copies=num_noisy_copies, **kwargs)  # fmt: skip
        return cls(processor.tokenizer, config, batch_size)

    def state_dict(self) -> dict:
        return {"resume_index": self.resume_index, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.resume_index = int(state["resume_index"])
        self.stats = {k: int(state["stats"].get(k, 0)) for k in COUNTER_KEYS}

    def iter_rows(self, documents: Iterable[dict]) -> Iterator[_Row]:
        """Closed rows, in order. Malformed documents are skipped with a warning and counted."""
        cfg = self.config
        row = _Row()
        consumed = self.resume_index
        for index, document in enumerate(documents):
            if index < self.resume_index:
                continue
            counters = dict.fromkeys(COUNTER_KEYS, 0)
            try:
                doc = tokenize_document(document, self.tokenizer, cfg, where=f"document {index}")
            except (ValueError, TypeError) as exn:
                logger.warning("packing: skipped %s", exn)
                doc, counters["num_skipped_documents"] = None, 1
            if doc is not None and doc.cost(cfg) > cfg.seq_len:
                n_images = len(doc.images)
                doc = truncate_document(doc, cfg.seq_len, cfg)
                counters["num_truncated_documents"] = 1
                counters["num_dropped_images"] = n_images if doc is None else doc.dropped_images
            if doc is not None:
                if row.used + doc.cost(cfg) > cfg.seq_len:
                    row.end_index = index
                    yield row
                    row = _Row()
                row.docs.append(doc)
                row.used += doc.cost(cfg)
                counters["num_documents"] = 1
            for k in COUNTER_KEYS:
                row.counters[k] += counters[k]
            consumed = index + 1
        row.end_index = consumed
        if row.docs or any(row.counters.values()):
            yield row  # a row without documents only carries counters (documents all skipped or dropped)

    def iter_batches(self, documents: Iterable[dict]) -> Iterator[dict]:
        """Batch dicts (see `build_batch`) with per-batch counters (ints, keys COUNTER_KEYS) added."""
        pending: list[_Row] = []
        for row in self.iter_rows(documents):
            if not row.docs:  # the stream's last row, counters only
                if pending:
                    for k in COUNTER_KEYS:
                        pending[-1].counters[k] += row.counters[k]
                    pending[-1].end_index = row.end_index
                else:
                    for k in COUNTER_KEYS:
                        self.stats[k] += row.counters[k]
                    self.resume_index = row.end_index
                continue
            pending.append(row)
            if len(pending) == self.batch_size:
                yield self._deliver(pending)
                pending = []
        if pending and not self.drop_last:
            yield self._deliver(pending)

    def _deliver(self, rows: list[_Row]) -> dict:
        batch = build_batch([r.docs for r in rows], self.config)
        for k in COUNTER_KEYS:
            batch[k] = sum(r.counters[k] for r in rows)
            self.stats[k] += batch[k]
        self.resume_index = rows[-1].end_index
        return batch


def collate_documents(
    documents: list[dict], tokenizer, config: PackingConfig, num_rows: int | None = None
) -> dict:
    """Pack a finite list of documents into one batch: as many rows as needed, or exactly `num_rows` (extra
    rows are all padding). For a DataLoader: `collate_fn=functools.partial(collate_documents, tokenizer=...,
    config=...)`."""
    all_rows = list(DocumentPacker(tokenizer, config, batch_size=1).iter_rows(documents))
    rows = [r for r in all_rows if r.docs]
    if num_rows is not None:
        if len(rows) > num_rows:
            raise ValueError(f"collate_documents: the documents need {len(rows)} rows, num_rows={num_rows}")
        rows += [_Row() for _ in range(num_rows - len(rows))]
    batch = build_batch([r.docs for r in rows], config)
    for k in COUNTER_KEYS:
        batch[k] = sum(r.counters[k] for r in all_rows)
    return batch
