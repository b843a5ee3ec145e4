"""Reading webdataset shards into documents: split by node and worker, bad data counted, resumable.

    reader = WebDocuments("shards/train-*.tar", resolution=32, shuffle=True, seed=0, epochs=None)
    loader = DataLoader(reader, batch_size=16, num_workers=2, collate_fn=collate_documents)
    for docs in loader:
        reader.observe(docs)              # main process: the positions of what was consumed
        ...train...; log(reader.stats)    # {"samples": ..., "documents": ..., "bad_image": ..., ...}
        save({"data": reader.state_dict()})
    # after a restart: reader.load_state_dict(saved["data"]) before building the DataLoader

Order. Epoch e visits the shards in a permutation fixed by (seed, e) (identity if shuffle=False).
The permutation is split by node (`webdataset.split_by_node`: rank r takes items r, r+R, ...) and
then by DataLoader worker (`webdataset.split_by_worker`), so every shard of an epoch is read by
exactly one worker of one node. Samples inside a shard come in tar order (no shuffle buffer: a
buffer would lose its contents on a restart). With resampled=True each worker instead draws
ceil(num_shards / num_workers_total) shards with replacement per epoch from an RNG seeded by
(seed, epoch, worker), an infinite stream when epochs=None.

Each shard is read by our own loop over its members (`mmgen.data.tar_shards`; `webdataset.gopen` opens local paths, `file:`,
`pipe:` and the remote schemes webdataset knows; Python's streaming `tarfile` walks it), grouped into
samples by key as webdataset does (consecutive members `KEY.ext`, suffix lower-cased). Owning the
grouping lets a sample with a repeated member be skipped as a whole, where webdataset keeps the first
copy. The node and worker split happen on our list of (shard index, start offset) before that,
because the position of a sample inside the epoch is what makes the state resumable.

Bad data (never fatal, each warned with shard, key and problem, and counted by kind in `stats`):
- `tar_errors`: a shard that cannot be opened or read to its end (not a tar, truncated, garbage,
  a failing pipe). Python's streaming tar reader stops silently at a cut or at garbage after the
  first member, so a local `.tar` is also checked by `tar_end_problem`. The samples before the damage
  are delivered; the sample being read at the damage (perhaps missing members) and the rest of the
  shard are not. A tar that ends right after a member, without the end-of-archive zero blocks, is
  valid and accepted silently. At most one per shard, and it does not hide the sample problems
  counted before it. A pipe or remote shard cannot be walked again: there only a cut inside a
  member is seen, and one at a header boundary ends the shard as if it were complete.
- one counter per sample problem of `mmgen.data.sample_format.PROBLEMS` (bad_json, bad_image,
  missing_image, bad_text, text_too_long, duplicate_member, duplicate_key, empty_document,
  invalid_sample; meanings in that module's docstring).

The counters add up: `samples` counts the tar samples read (good or bad), `documents` those delivered,
so samples == documents + sum(sample problems); `skipped` == sum(sample problems) + tar_errors, which
is everything not delivered (a tar error counts the damaged shard once, not the samples it lost).

Counters across DataLoader workers: a side channel. The counters live in a small int64 tensor in
shared memory, one row per local DataLoader worker (row 0 without workers), created with the reader
and inherited by the worker processes (fork or spawn). Each worker adds to its own row as it reads,
so `reader.stats` (a dict: `COUNTERS` + "skipped") in the main process is live, includes
bad data a worker met after its last good sample, and accumulates over iterations. Counts are per
training process (rank); sum across ranks yourself if you log globally.

Positions across workers: through the samples. Every document carries `doc["meta"]["_wds"]` =
{shard, key, worker, topology, position}; the main process calls `reader.observe(doc_or_docs)` on
what the trainer consumed (with num_workers=0 the reader also records positions itself while
iterating). A collate_fn that turns documents into tensors must keep these dicts (or call
observe on the documents first).

Resume guarantee. `state_dict()` describes exactly the observed samples: for each epoch the
shards finished and, for shards in progress, how many tar samples were consumed. A reader given
that state via `load_state_dict` reads every remaining sample of the stream exactly once: nothing
observed is repeated and nothing unobserved is skipped, whatever the new number of nodes/workers
(with the same topology each worker reads the rest of its own share in the uninterrupted order;
after a change the order may differ).
This is stronger than "within one shard". Samples a worker produced but the trainer never observed
(DataLoader prefetch) count as unread and come again after the restart. In resampled mode positions
are per worker, so a restart with a different number of workers starts a fresh epoch (sampling with
replacement has no "skipped" samples to lose). The state is JSON-serialisable.
One iteration per loaded state: iterating again starts again from the loaded state; to continue
instead, call `reader.load_state_dict(reader.state_dict())` first.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Iterable, Iterator

import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from mmgen.cli import UsageError
from mmgen.data.pairs import PairFormat
from mmgen.data.sample_format import MAX_TEXT_CHARS, PROBLEMS, SampleError, decode_sample
from mmgen.data.tar_shards import TarDamage, expand_shards, tar_members, tar_samples

STATE_VERSION = 1


class DataWarning(UserWarning):
    """A skipped sample or shard (filter with warnings.simplefilter if it floods a log)."""


class NoDocumentsError(UsageError):
    """A stream that can deliver nothing: every shard unreadable or without one good sample. Its
    message names the shards and the reader's counters; `mmgen.cli.run_cli` prints it as one line."""


COUNTERS = ("samples", "documents", "tar_errors", "captions_cut", *PROBLEMS)
MAX_LOCAL_WORKERS = 64


def collate_documents(batch: list[dict]) -> list[dict]:
    """DataLoader collate_fn that keeps documents as a list (PIL images do not stack)."""
    return batch


def _with_skipped(counts: torch.Tensor) -> dict[str, int]:
    totals = dict(zip(COUNTERS, counts.tolist()))
    return {**totals, "skipped": totals["tar_errors"] + sum(totals[p] for p in PROBLEMS)}


def _unread(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(g, start) for g, start in items if start >= 0]


def _split(items: list, topology: tuple[int, int], gid: int) -> list:
    """What webdataset.split_by_node then split_by_worker give global worker `gid` (checked in tests)."""
    world, num_workers = topology
    rank, worker = divmod(gid, num_workers)
    return items[rank::world][worker::num_workers]


class WebDocuments(torch.utils.data.IterableDataset):
    """Documents (docs/design.md §3) from webdataset shards; see the module docstring for the order,
    the bad-data counters, the worker mechanism and the resume guarantee.

    urls: see `expand_shards`. resolution: square image size after resize + centre crop (None keeps
    sizes). shuffle: permute shards per epoch. seed: for that permutation / resampling.
    epochs: number of epochs (None = forever). resampled: draw shards with replacement.
    pair_order: "text_image" | "image_text" for caption pairs, kept without chat roles when pairs=None.
    pairs: write each pair as a chat in a direction drawn per sample and epoch (`mmgen.data.pairs`).
    max_text_chars: a sample with a longer text or caption is skipped (`text_too_long`; None: no bound).
    latents: images with a cached latent come as `sample_format.CachedLatent` (`mmgen.data.latents`).
    """

    def __init__(
        self,
        urls: str | Iterable[str],
        *,
        resolution: int | None = 32,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        resampled: bool = False,
        pair_order: str = "text_image",
        max_text_chars: int | None = MAX_TEXT_CHARS,
        pairs: PairFormat | None = None,
        latents: bool = False,
    ):
        super().__init__()
        self.urls = expand_shards(urls)
        self.resolution, self.shuffle, self.seed = resolution, shuffle, seed
        self.epochs, self.resampled, self.pair_order = epochs, resampled, pair_order
        self.max_text_chars, self.pairs, self.latents = max_text_chars, pairs, latents
        self._base = self._empty_state()
        self._observed: dict[int, tuple[tuple[int, int], tuple[int, int, int]]] = {}  # gid -> (topology, position)
        # (local worker, counter) in shared memory: the side channel for counts (module docstring).
        self._counters = torch.zeros(MAX_LOCAL_WORKERS, len(COUNTERS), dtype=torch.int64).share_memory_()

    # ------------------------------------------------------------------------------ plans

    def _empty_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "mode": "resampled" if self.resampled else "epoch",
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_shards": len(self.urls),
            "epoch": 0,
            "done": {},
            "partial": {},
            "topology": None,
            "positions": {},
        }

    def _epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, start offset) of every shard of `epoch` (non-resampled) in visiting order, before
        splitting; start -1 marks a shard already read. Splitting the whole order, not what is left of it,
        keeps each worker's share of an epoch the same after a resume."""
        base = self._base
        if epoch < base["epoch"]:
            return []
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        done = set(base["done"].get(str(epoch), []))
        partial = base["partial"].get(str(epoch), {})
        return [(g, -1 if g in done else partial.get(str(g), 0)) for g in order]

    def _resampled_items(self, epoch: int, topology: tuple[int, int], gid: int) -> list[tuple[int, int]]:
        total = topology[0] * topology[1]
        rng = random.Random(f"{self.seed}/resampled/{epoch}/{gid}/{total}")
        items = [(rng.randrange(len(self.urls)), 0) for _ in range(math.ceil(len(self.urls) / total))]
        position = self._base["positions"].get(str(gid)) if self._base["topology"] == list(topology) else None
        if position is not None and position[0] == epoch:
            k, offset = position[1], position[2]
            items = [(g, offset if i == k else 0) for i, (g, _) in enumerate(items)][k:]
        return items

    def _first_epoch(self, topology: tuple[int, int]) -> int:
        base = self._base
        if not self.resampled:
            return base["epoch"]
        if base["topology"] is None:
            return 0
        epochs = [p[0] for p in base["positions"].values()]
        if base["topology"] == list(topology):
            return min(epochs)
        warnings.warn(
            "resampled stream resumed with a different number of workers: starting a fresh epoch", DataWarning
        )
        return max(epochs) + 1

    def _worker_items(self, epoch: int, topology: tuple[int, int], gid: int) -> list[tuple[int, int]]:
        if self.resampled:
            return self._resampled_items(epoch, topology, gid)
        return _unread(_split(self._epoch_items(epoch), topology, gid))

    # -------------------------------------------------------------------------- iteration

    def _count(self, row: int, name: str) -> None:
        # A numpy view of the shared tensor: ~0.1 us per add where tensor indexing costs ~50 us.
        if getattr(self, "_counts_view", None) is None:
            self._counts_view = self._counters.numpy()
        self._counts_view[row, COUNTERS.index(name)] += 1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_counts_view"] = None  # rebuilt in the worker, on the shared tensor it receives
        return state

    def _read_shard(self, url: str, start: int, row: int) -> Iterator[tuple[int, dict]]:
        """(tar samples consumed so far in this shard, document) for the good samples after `start`."""
        seen: set[str] = set()  # keys of this shard, also those before `start`
        try:
            for index, sample in enumerate(tar_samples(tar_members(url))):
                key = sample["__key__"]
                repeated = key in seen
                seen.add(key)
                if index < start:
                    continue
                self._count(row, "samples")
                try:
                    doc = self._decode(sample, repeated)
                except SampleError as exn:
                    self._count(row, exn.problem)
                    warnings.warn(f"{url}: key {key}: {exn.problem}: {exn}", DataWarning)
                    continue
                doc["meta"]["_wds"] = {"shard": url, "key": key}
                yield index + 1, doc
        except TarDamage as exn:
            self._count(row, "tar_errors")
            dropped = f"sample {exn.key} and " if exn.key else ""
            warnings.warn(f"{url}: unreadable tar data, {dropped}the rest of the shard skipped: {exn}", DataWarning)

    def _decode(self, sample: dict, repeated: bool) -> dict:
        if repeated:
            raise SampleError("duplicate_key", "an earlier sample of this shard has the same key")
        if "__duplicate__" in sample:
            raise SampleError("duplicate_member", f"member .{sample['__duplicate__']} occurs twice in the sample")
        return decode_sample(sample, resolution=self.resolution, pair_order=self.pair_order,
                             max_text_chars=self.max_text_chars, latents=self.latents)

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, num_workers = pytorch_worker_info()
        topology, gid = (world, num_workers), rank * num_workers + worker
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:
            self._observed.clear()
        if worker >= MAX_LOCAL_WORKERS:
            raise ValueError(f"at most {MAX_LOCAL_WORKERS} DataLoader workers per process")
        documents = 0
        epoch = first = self._first_epoch(topology)
        empty_epochs = 0
        while self.epochs is None or epoch < self.epochs:
            if self.resampled:
                share = items = self._resampled_items(epoch, topology, gid)
            else:  # the real webdataset splitters, so torch.distributed groups are honoured
                share = list(wds.split_by_worker(wds.split_by_node(self._epoch_items(epoch))))
                items = _unread(share)
            before = documents
            for k, (g, start) in enumerate(items):
                for offset, doc in self._read_shard(self.urls[g], start, worker):
                    self._count(worker, "documents")
                    documents += 1
                    position = (epoch, k, offset)
                    doc["meta"]["_wds"].update(worker=gid, topology=list(topology), position=list(position))
                    if self.pairs is not None and self.pairs.apply(doc, epoch):
                        self._count(worker, "captions_cut")
                    if in_main:
                        self._observed[gid] = (topology, position)
                    yield doc
            # Guard against a silent busy loop when every shard of this worker is bad (or it has none).
            # (an epoch this worker had finished before a resume is not empty)
            finished = bool(share) and not items
            empty_epochs = empty_epochs + 1 if epoch > first and documents == before and not finished else 0
            if self.epochs is None and empty_epochs >= (10 if self.resampled else 1):
                warnings.warn(
                    f"worker {gid}: {empty_epochs} whole epoch(s) gave no document "
                    f"({len(items)} shards); stopping this worker's infinite stream",
                    DataWarning,
                )
                return
            epoch += 1

    # ---------------------------------------------------------------------- observation

    def observe(self, docs: dict | Iterable[dict]) -> None:
        """Record (main process) the documents the trainer consumed: their worker's position."""
        for doc in [docs] if isinstance(docs, dict) else docs:
            info = doc["meta"]["_wds"]
            self._observed[info["worker"]] = (tuple(info["topology"]), tuple(info["position"]))

    @property
    def stats(self) -> dict[str, int]:
        """`COUNTERS` and "skipped" of this process and its DataLoader workers, live (module docstring)."""
        return _with_skipped(self._counters.sum(dim=0))

    def worker_stats(self, worker: int) -> dict[str, int]:
        """`stats` of one local DataLoader worker (0: the process itself when it has no workers), live."""
        return _with_skipped(self._counters[worker])

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """JSON-able position of everything observed so far (see the resume guarantee above)."""
        state = copy.deepcopy(self._base)
        if not self._observed:
            return state
        topologies = {t for t, _ in self._observed.values()}
        if len(topologies) != 1:
            raise RuntimeError(f"observed documents from several worker topologies {topologies}")
        topology = topologies.pop()
        if self.resampled:
            state["topology"] = list(topology)
            for gid, (_, position) in self._observed.items():
                state["positions"][str(gid)] = list(position)
            return state
        done = {int(e): set(v) for e, v in state["done"].items()}
        partial = {int(e): {int(g): o for g, o in v.items()} for e, v in state["partial"].items()}
        for gid, (_, (epoch, k, offset)) in self._observed.items():
            for e in range(self._base["epoch"], epoch + 1):
                items = self._worker_items(e, topology, gid)
                finished = items if e < epoch else items[:k]
                done.setdefault(e, set()).update(g for g, _ in finished)
                for g, _ in finished:
                    partial.get(e, {}).pop(g, None)
            shard = self._worker_items(epoch, topology, gid)[k][0]
            partial.setdefault(epoch, {})[shard] = offset
        first = self._base["epoch"]
        while len(done.get(first, ())) == len(self.urls):
            done.pop(first)
            partial.pop(first, None)
            first += 1
        state["epoch"] = first
        state["done"] = {str(e): sorted(v) for e, v in sorted(done.items()) if e >= first}
        state["partial"] = {
            str(e): {str(g): o for g, o in sorted(v.items())}
            for e, v in sorted(partial.items())
            if e >= first and v
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        expected = self._empty_state()
        for name in ("version", "mode", "seed", "shuffle", "num_shards"):
            if state.get(name) != expected[name]:
                raise ValueError(
                    f"loader state has {name}={state.get(name)!r} but this reader has "
                    f"{expected[name]!r}; build the reader with the same shards and settings"
                )
        self._base = copy.deepcopy(state)
        self._observed.clear()
