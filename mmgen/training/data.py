"""The training stream of one process: shards -> documents -> packed batches, resumable exactly.

Documents come from `WebDocuments` (split by node and DataLoader worker, bad samples skipped and
counted) and are packed by `DocumentPacker` into rows of `seq_len` tokens with one student noisy
copy per image at the row end (docs/design.md §4).

Workers (`num_workers` > 0): reading, decoding and packing all run in DataLoader worker processes, each
on its own share of the shards (`mmgen.training.packed_batches`); the training process only receives
whole batches, in worker order. With `num_workers` = 0 the same code runs in this process.

Exact resume: every batch arrives with where its worker stands after it (the reader position of the
batch's last document; the packer's open row is not delivered). `state_dict()` is the reader state of
those positions for the last batch *received* from each worker, and whose turn is next, so a resumed
stream re-reads exactly the undelivered documents and yields the batches an uninterrupted run would. That needs each worker to read
the same share again, so the number of workers must not change between save and resume (refused).

Prefetch (`prefetch` > 0): a background thread takes up to `prefetch` batches ahead while the trainer
computes (without workers it also reads and packs them, as Python in this process). Resume stays exact:
the state is that of what the trainer received, and batches taken but not received come again.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from mmgen.cli import UsageError
from mmgen.config import DataSection
from mmgen.data.latents import LatentMismatchError, LatentSpec
from mmgen.data.packing import COUNTER_KEYS, PackingConfig
from mmgen.data.pairs import PairFormat, row_caption_budget
from mmgen.data.webdata import NoDocumentsError, WebDocuments
from mmgen.training.packed_batches import PackedBatches


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
        settings = {"resolution": packing.image_size, "shuffle": True, "seed": seed, "epochs": None, "pairs": pairs,
                    "latents": latents is not None}
        self.reader = WebDocuments(urls, **settings)  # iterated by the workers (or here)
        self._book = WebDocuments(urls, **settings)  # never iterated: turns received positions into a state
        if latents is not None:
            latents.check_manifests(self.reader.urls)
        self.batches = PackedBatches(self.reader, tokenizer, packing, batch_size=batch_size, latents=latents)
        self.num_workers = num_workers
        self.prefetch = prefetch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._source: Iterator[tuple[dict, dict]] | None = None
        self._last: dict[int, dict] = {}  # worker -> where it stands after its last received batch
        self._next_worker = 0  # whose batch comes next
        self._packer_base = dict.fromkeys(COUNTER_KEYS, 0)  # packer counters of the run before a resume
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
        return sorted(self._shards)

    def _open(self) -> Iterator[tuple[dict, dict]]:
        if self.num_workers == 0:
            return iter(self.batches)
        loader = torch.utils.data.DataLoader(self.batches, batch_size=None, num_workers=self.num_workers,
                                             persistent_workers=False)  # fmt: skip
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch == 0:
            batch, after = self._next_item()
        else:
            if self._stop.is_set():
                raise RuntimeError("this TrainStream was closed (or its prefetch thread failed); build a new one")
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._produce, name="mmgen-prefetch", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            batch, after = item
        if "refused" in after:  # a worker met cached latents this run cannot use: one line, from here
            self.close()
            raise LatentMismatchError(after["refused"])
        self._last[after["worker"]] = after
        self._next_worker = (after["worker"] + 1) % max(1, self.num_workers)
        self._shards.update(after["new_shards"])
        return batch

    def _next_item(self) -> tuple[dict, dict]:
        if self._source is None:
            self._source = self._open()
        try:
            return next(self._source)
        except StopIteration:  # the reader ends its endless stream only after an epoch without a document
            counters = ", ".join(f"{k}={v}" for k, v in self.reader.stats.items() if v) or "nothing read"
            raise NoDocumentsError(f"no training documents from shards {self.urls!r} "
                                   f"({len(self.reader.urls)} files); reader counters: {counters}") from None

    def _produce(self) -> None:
        """Prefetch thread: take batches ahead; errors go to the consumer."""
        try:
            while not self._stop.is_set():
                item = self._next_item()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001  (StopIteration too: re-raised in the consumer thread)
            self._queue.put(exc)

    def close(self) -> None:
        """Stop the prefetch thread and the workers (idempotent); the stream cannot be iterated afterwards."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._source = None  # a DataLoader iterator shuts its workers down when dropped

    @property
    def stats(self) -> dict:
        """Reader counters (bad samples by kind) and packer counters (truncations, dropped images), as of the
        last batch the trainer received from each worker."""
        received = self._last.values()
        reader = {k: sum(after["reader"][k] for after in received) for k in self.reader.stats}
        packer = {k: self._packer_base[k] + sum(after["packer"][k] for after in received) for k in COUNTER_KEYS}
        return {**reader, **packer}

    def state_dict(self) -> dict:
        self._book.observe([{"meta": {"_wds": after["position"]}} for after in self._last.values()])
        packer = {k: v for k, v in self.stats.items() if k in COUNTER_KEYS}
        return {"reader": self._book.state_dict(), "packer_stats": packer, "num_workers": self.num_workers,
                "next_worker": self._next_worker}

    def load_state_dict(self, state: dict) -> None:
        if self._source is not None:
            raise RuntimeError("load_state_dict must be called before the first batch")
        saved = state.get("num_workers", self.num_workers)  # states written before workers packed: any
        if saved != self.num_workers:
            raise UsageError(f"the data stream was saved with data.num_workers={saved} and this run has "
                             f"{self.num_workers}: resume with data.num_workers {saved} (each worker packs its "
                             f"own share of the shards)")
        self.reader.load_state_dict(state["reader"])
        self._book.load_state_dict(state["reader"])
        self._packer_base = {k: int(state["packer_stats"].get(k, 0)) for k in COUNTER_KEYS}
        self._next_worker = self.batches.first_worker = int(state.get("next_worker", 0))
