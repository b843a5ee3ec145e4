"""Packed batches made where the documents are read: in a DataLoader worker, or in the training process.

Each worker of a `torch.utils.data.DataLoader(PackedBatches(...), batch_size=None, num_workers=W)` reads
its own share of the shards (`WebDocuments` splits them by node, then by worker), decodes them, packs
whole batches with its own `DocumentPacker` and yields `(batch, after)`: `after` says where this worker
stands once the batch is delivered. The DataLoader yields the workers' batches in turn (worker 0, 1, ...,
0, ...), so the training process only keeps, per worker, the `after` of its last received batch.

`after` = {"worker": local worker id (0 without workers),
           "position": reader position (`doc["meta"]["_wds"]`) of the batch's last document,
           "packer": the worker's packer counters over its delivered batches,
           "reader": the worker's reader counters when the batch was packed,
           "new_shards": shards the worker started reading since its previous batch}

A resumed stream must also go on with the worker whose turn was next: the DataLoader always starts with
its worker 0, so `first_worker` renumbers the workers (DataLoader worker i reads the share of worker
(i + first_worker) mod W, and `after["worker"]` is that number).

Why the last document's position is the resume point: the packer holds an open row, so a worker has
read past its last batch. The documents after that position were read but not delivered; a resumed
reader reads them again and the worker packs the same batches an uninterrupted run would.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

import torch

from mmgen.data.latents import LatentMismatchError, LatentSpec
from mmgen.data.packing import DocumentPacker, PackingConfig
from mmgen.data.webdata import WebDocuments


class PackedBatches(torch.utils.data.IterableDataset):
    """(batch, after) pairs from this worker's share of `reader` (module docstring)."""

    def __init__(self, reader: WebDocuments, tokenizer, packing: PackingConfig, *, batch_size: int,
                 first_worker: int = 0, latents: LatentSpec | None = None):
        super().__init__()
        self.reader, self.tokenizer, self.packing, self.batch_size = reader, tokenizer, packing, batch_size
        self.first_worker, self.latents = first_worker, latents

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = torch.utils.data.get_worker_info()
        worker = 0
        if info is not None:
            worker = (info.id + self.first_worker) % info.num_workers
            # the reader splits by webdataset's worker info, which takes these over the DataLoader's
            # (this is a worker process: the variables end with it)
            os.environ["WORKER"], os.environ["NUM_WORKERS"] = str(worker), str(info.num_workers)
        packer = DocumentPacker(self.tokenizer, self.packing, batch_size=self.batch_size, drop_last=True)
        positions: deque[dict] = deque()  # reader positions from the last delivered document on
        new_shards: set[str] = set()

        def documents() -> Iterator[dict]:
            for doc in self.reader:
                if self.latents is not None:
                    self.latents.check_document(doc)
                where = doc["meta"]["_wds"]
                positions.append(dict(where))
                new_shards.add(where["shard"])
                yield doc

        try:
            yield from self._batches(packer, documents(), positions, new_shards, worker)
        except LatentMismatchError as err:  # sent as a value: raised in a worker it would arrive as a traceback
            yield None, {"refused": str(err)}

    def _batches(self, packer, documents, positions, new_shards, worker) -> Iterator[tuple[dict, dict]]:
        first = 0  # packer stream index of positions[0]
        for batch in packer.iter_batches(documents):
            while first < packer.resume_index - 1:
                positions.popleft()
                first += 1
            after = {"worker": worker, "position": positions[0], "packer": dict(packer.stats),
                     "reader": self.reader.worker_stats(worker), "new_shards": sorted(new_shards)}  # fmt: skip
            new_shards.clear()
            yield batch, after
