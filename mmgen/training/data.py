"""The training stream of one process: shards -> documents -> packed batches, resumable exactly.

Documents come from `WebDocuments` (split by node and DataLoader worker, bad samples skipped and
counted) and are packed by `DocumentPacker` into rows of `seq_len` tokens with one student noisy
copy per image at the row end (CONTRACTS.md §2).

Exact resume: the packer holds an open row, so the reader's position is ahead of what the trainer
has consumed. We remember each document's reader position (`meta["_wds"]`) in stream order and,
at a checkpoint, hand the reader the position of the last document the packer has *delivered* in
a batch. A resumed stream therefore re-reads exactly the undelivered documents and packs the same
batches an uninterrupted run would (with the same number of nodes and workers; see the reader's
guarantee in `mmgen/data/webdata.py`).

Prefetch (`prefetch` > 0): a background thread reads and packs up to `prefetch` batches ahead while
the trainer computes (packing is Python in this process; on a GPU it otherwise stalls every step).
The thread snapshots the stream's state right after packing each batch, and `state_dict()` / `stats`
return the snapshot of the last batch the trainer *received*, so resume stays exact: batches that were
packed but not consumed are packed again by the resumed stream.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from mmgen.config import DataSection
from mmgen.data.latents import LatentSpec
from mmgen.data.packing import COUNTER_KEYS, DocumentPacker, PackingConfig
from mmgen.data.pairs import PairFormat, row_caption_budget
from mmgen.data.webdata import NoDocumentsError, WebDocuments


def ensure_shapes_shards(out_dir: str | Path, *, num_docs: int, resolution: int, seed: int,
                         samples_per_shard: int = 1000, tasks: tuple[str, ...] | list[str] = (),
                         max_objects: int = 4, particles: int = 1, t2i_max_objects: int | None = None) -> Path:
    """Write the shapes-world training shards once: kept when the manifest says they were made with the
    same settings, rebuilt (with a message) when it says otherwise. `tasks`, `max_objects`, `particles`,
    `t2i_max_objects`: see :class:`mmgen.data.make_shards.ShapesSource`."""
    from mmgen.data.make_shards import ShapesSource, make_shards

    out = Path(out_dir)
    manifest = out / "train-manifest.json"
    want = {"num_docs": num_docs, "seed": seed, "resolution": resolution, "samples_per_shard": samples_per_shard,
            "tasks": list(tasks) or None, "max_objects": max_objects, "particles": particles,
            "t2i_max_objects": t2i_max_objects}  # fmt: skip
    if manifest.is_file():
        older = {"max_objects": 4, "particles": 1, "t2i_max_objects": None}  # what manifests without them meant
        have = {**older, **json.loads(manifest.read_text()).get("config", {})}
        changed = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if not changed:
            return out
        print(f"{out}: shards were made with other settings {changed} (was, now); rebuilding", file=sys.stderr)
        manifest.unlink()
    for shard in out.glob("train-*.tar"):  # of other settings, or of a build that was interrupted
        shard.unlink()
    source = ShapesSource(num_docs=num_docs, seed=seed, resolution=resolution, tasks=tuple(tasks),
                          max_objects=max_objects, particles=particles, t2i_max_objects=t2i_max_objects)
    make_shards(source, out, split="train", samples_per_shard=samples_per_shard)
    return out


class TrainStream:
    """Batches for this process; `state_dict()` / `load_state_dict()` give exact resume."""

    def __init__(self, urls, tokenizer, packing: PackingConfig, *, batch_size: int, seed: int,
                 num_workers: int = 0, prefetch: int = 0, pair_text_to_image: float = DataSection.pair_text_to_image,
                 max_caption_tokens: int | None = None, latents: LatentSpec | None = None):
        """pair_text_to_image: share of image-caption pairs read caption first, the rest image first (as chats,
        `mmgen.data.pairs`); max_caption_tokens: longer pair captions are cut (None: what leaves the image its
        room in a row); latents: the run's VAE, whose latents cached in the shards replace their images (others
        are refused, `mmgen.data.latents`; None: images only)."""
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.urls = urls
        budget = row_caption_budget(tokenizer, packing) if max_caption_tokens is None else max_caption_tokens
        pairs = PairFormat(pair_text_to_image, seed, budget, tokenizer if budget is not None else None)
        self.reader = WebDocuments(urls, resolution=packing.image_size, shuffle=True, seed=seed, epochs=None,
                                   pairs=pairs, latents=latents is not None)
        self.latents = latents
        if latents is not None:
            latents.check_manifests(self.reader.urls)
        self.packer = DocumentPacker(tokenizer, packing, batch_size=batch_size, drop_last=True)
        self.num_workers = num_workers
        self.prefetch = prefetch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._received: dict | None = None  # prefetch: snapshot taken right after the last received batch
        self._positions: deque[dict] = deque()  # reader positions of documents not yet delivered (+ the last one)
        self._first = 0  # stream index of self._positions[0]
        self._batches: Iterator[dict] | None = None
        self._shards: set = set()  # shards this process has read from (logged: ranks read disjoint shards)

    @classmethod
    def from_config(cls, urls, tokenizer, packing: PackingConfig, data: DataSection, seed: int,
                    latents: LatentSpec | None = None) -> TrainStream:
        """The stream a run's `data` section asks for (batch size, workers, prefetch, the pairs' format)."""
        return cls(urls, tokenizer, packing, batch_size=data.batch_size, seed=seed, num_workers=data.num_workers,
                   prefetch=data.prefetch, pair_text_to_image=data.pair_text_to_image,
                   max_caption_tokens=data.max_caption_tokens, latents=latents)

    @property
    def shards_read(self) -> list:
        if self._received is not None:
            return self._received["shards_read"]
        return sorted(self._shards)

    def _documents(self) -> Iterator[dict]:
        source = self.reader
        if self.num_workers > 0:
            source = torch.utils.data.DataLoader(
                self.reader, batch_size=None, num_workers=self.num_workers, persistent_workers=False
            )
        for doc in source:
            if self.latents is not None:  # here, not in a worker: a refusal is one line from the trainer
                self.latents.check_document(doc)
            info = doc["meta"]["_wds"]
            self._positions.append(dict(info))
            self._shards.add(info["shard"])
            yield doc

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch == 0:
            return self._next_batch()
        if self._stop.is_set():
            raise RuntimeError("this TrainStream was closed (or its prefetch thread failed); build a new one")
        if self._thread is None:
            self._received = {"state": self._state_now(), "stats": self._stats_now(), "shards_read": []}
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, name="mmgen-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._received = item
        return batch

    def _next_batch(self) -> dict:
        if self._batches is None:
            self._batches = self.packer.iter_batches(self._documents())
        try:
            batch = next(self._batches)
        except StopIteration:  # the reader ends its endless stream only after an epoch without a document
            counters = ", ".join(f"{k}={v}" for k, v in self.reader.stats.items() if v) or "nothing read"
            raise NoDocumentsError(f"no training documents from shards {self.urls!r} "
                                   f"({len(self.reader.urls)} files); reader counters: {counters}") from None
        # keep only the positions from the last delivered document on
        while self._first < self.packer.resume_index - 1:
            self._positions.popleft()
            self._first += 1
        return batch

    def _produce(self) -> None:
        """Prefetch thread: pack batches and snapshot the state after each; errors go to the consumer."""
        try:
            while not self._stop.is_set():
                batch = self._next_batch()
                snapshot = {"state": self._state_now(), "stats": self._stats_now(),
                            "shards_read": sorted(self._shards)}
                while not self._stop.is_set():
                    try:
                        self._queue.put((batch, snapshot), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001  (StopIteration too: re-raised in the consumer thread)
            self._queue.put(exc)

    def close(self) -> None:
        """Stop the prefetch thread (idempotent); the stream cannot be iterated afterwards."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)

    @property
    def stats(self) -> dict:
        """Reader counters (bad samples by kind) and packer counters (truncations, dropped images), as of the
        last batch the trainer received."""
        if self._received is not None:
            return dict(self._received["stats"])
        return self._stats_now()

    def _stats_now(self) -> dict:
        return {**self.reader.stats, **self.packer.stats}

    def state_dict(self) -> dict:
        if self._received is not None:  # prefetching: the thread owns the reader and packer
            return self._received["state"]
        return self._state_now()

    def _state_now(self) -> dict:
        delivered = self.packer.resume_index
        if delivered > 0:
            self.reader.observe({"meta": {"_wds": self._positions[delivered - 1 - self._first]}})
        return {"reader": self.reader.state_dict(), "packer_stats": dict(self.packer.stats)}

    def load_state_dict(self, state: dict) -> None:
        if self._batches is not None:
            raise RuntimeError("load_state_dict must be called before the first batch")
        self.reader.load_state_dict(state["reader"])
        self.packer.stats = {k: int(state["packer_stats"].get(k, 0)) for k in COUNTER_KEYS}
