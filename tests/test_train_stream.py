"""The trainer's stream (mmgen/training/data.py): DataLoader workers read and pack whole batches and a
prefetch thread takes batches ahead, yet a checkpoint is the state of what the trainer received, so resume
is exact."""

import json
import time
from pathlib import Path

import pytest
import torch

from mmgen.cli import UsageError
from mmgen.data.make_shards import main as make_shards
from mmgen.data.packing import PackingConfig
from mmgen.tokenization import load_tokenizer
from mmgen.training.data import TrainStream

TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes"
PACKING = PackingConfig(seq_len=128, num_image_tokens=16, image_size=32, num_noisy_copies=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream_shards")
    make_shards(["--source", "shapes", "--num-docs", "120", "--out", str(out), "--split", "train", "--seed", "3",
                 "--resolution", "32", "--samples-per-shard", "30"])  # fmt: skip
    return str(out / "train-*.tar")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER))


def _stream(shards, tokenizer, prefetch, num_workers=0):
    return TrainStream(shards, tokenizer, PACKING, batch_size=2, seed=0, prefetch=prefetch, num_workers=num_workers)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_prefetching_stream_yields_the_plain_batches_and_checkpoints_what_was_received(shards, tokenizer):
    plain, ahead = _stream(shards, tokenizer, 0), _stream(shards, tokenizer, 3)
    try:
        for _ in range(4):
            assert _same(next(plain), next(ahead))
        deadline = time.monotonic() + 30  # let the thread fill its queue: it has then packed past batch 4
        while not ahead._queue.full() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ahead._queue.full() and ahead.reader.stats["documents"] > plain.reader.stats["documents"]
        assert ahead.state_dict() == plain.state_dict()  # ... but the checkpoint is that of batch 4
        assert ahead.stats == plain.stats
        state = ahead.state_dict()
        expected = [next(plain) for _ in range(3)]
    finally:
        ahead.close()
    resumed = _stream(shards, tokenizer, 2)
    resumed.load_state_dict(state)
    try:
        assert all(_same(want, next(resumed)) for want in expected)
    finally:
        resumed.close()


def test_prefetch_thread_errors_reach_the_trainer(shards, tokenizer, tmp_path):
    stream = _stream(shards, tokenizer, 2)

    def broken():
        raise ValueError("document 7 of shard x: bad segment")
        yield

    stream.batches.reader = broken()
    with pytest.raises(ValueError, match="document 7"):
        next(stream)
    with pytest.raises(RuntimeError, match="closed"):  # not a hang on a queue nobody fills
        next(stream)
    with pytest.raises(ValueError, match="prefetch"):
        _stream(shards, tokenizer, -1)


@pytest.mark.parametrize("num_workers,prefetch", [(0, 0), (2, 0), (2, 2)])
def test_workers_pack_batches_that_a_resumed_stream_continues_exactly(shards, tokenizer, num_workers, prefetch):
    """34 batches, a checkpoint (with two workers: one in the second epoch, the other still in the first),
    12 more: the resumed stream yields the uninterrupted stream's batches, and the packer counters continue
    over the checkpoint."""
    whole = _stream(shards, tokenizer, prefetch, num_workers)
    try:
        expected = [next(whole) for _ in range(46)]
    finally:
        whole.close()
    head = _stream(shards, tokenizer, prefetch, num_workers)
    try:
        for want in expected[:34]:
            assert _same(want, next(head))
        state = json.loads(json.dumps(head.state_dict()))
        assert head.stats["num_documents"] == sum(b["num_documents"] for b in expected[:34])
    finally:
        head.close()
    resumed = _stream(shards, tokenizer, prefetch, num_workers)
    resumed.load_state_dict(state)
    try:
        for want in expected[34:]:
            assert _same(want, next(resumed))
        assert resumed.stats["num_documents"] == sum(b["num_documents"] for b in expected)
    finally:
        resumed.close()


def test_two_workers_take_turns_on_disjoint_shards(shards, tokenizer):
    """Shards of 30 documents; two batches hold about 12 of them."""
    alone, pair = _stream(shards, tokenizer, 0), _stream(shards, tokenizer, 0, num_workers=2)
    try:
        next(pair)
        assert len(pair.shards_read) == 1
        next(pair)
        assert len(pair.shards_read) == 2  # the second batch is the other worker's, from its own shard
        next(alone), next(alone)
        assert len(alone.shards_read) == 1
    finally:
        pair.close()


def test_resuming_with_another_number_of_workers_is_refused_naming_the_setting(shards, tokenizer):
    state = _stream(shards, tokenizer, 0, num_workers=2).state_dict()
    with pytest.raises(UsageError, match=r"data\.num_workers=2 .* has 0"):
        _stream(shards, tokenizer, 0).load_state_dict(state)


def test_stream_benchmark_writes_one_row_per_setting_and_a_plot(shards, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    import bench_stream

    out = tmp_path / "bench.json"
    rows = bench_stream.main(["--shards", shards, "--seq-len", "128", "--compute-ms", "0", "5", "--num-workers", "0",
                              "1", "--stand-in", "matmul", "--seconds", "0.3", "--out", str(out)])  # fmt: skip
    assert [(r["compute_ms"], r["num_workers"]) for r in rows] == [(0, 0), (0, 1), (5, 0), (5, 1)]
    assert all(r["batches"] > 0 and r["ms_per_step"] > 0 and 0 <= r["input_share"] <= 1 for r in rows)
    assert json.loads(out.read_text()) == rows
    assert out.with_suffix(".png").stat().st_size > 0


class _KindRecordingReader:
    """The trainer's reader, noting the kind (meta "task") of each document it reads, in stream order."""

    def __init__(self, reader):
        self.reader, self.kinds = reader, []

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def __iter__(self):
        for doc in self.reader:
            self.kinds.append(doc["meta"]["task"])
            yield doc


def test_the_default_configs_document_mix_reaches_the_trainer_with_every_kind(tmp_path, tokenizer):
    """configs/default.yaml's data section (tasks, particles, t2i_max_objects, seq_len, loss_on) through
    train.py's shard preparation into the trainer's batches, on 200 documents: every kind of document is
    delivered, none is skipped or loses an image, and each kind's share is its weight in the YAML within
    four binomial standard deviations."""
    import math

    import yaml
    from train_helpers import ROOT, MainProcess, load_script

    from mmgen.data.shapes_docs import TASK_WEIGHTS, TASKS
    from mmgen.training.vae_stage import VAETrainConfig

    train = load_script("training/train.py")
    num_docs = 200
    cfg = train.parse_args(["--data.shapes_dir", str(tmp_path / "shards"), "--data.num_docs", str(num_docs),
                            "--data.samples_per_shard", "100", "--model.vae", str(tmp_path / "unused")])  # fmt: skip
    shards = train.prepare_inputs(cfg, MainProcess())
    factor = VAETrainConfig().downsample_factor  # stage 1's latents
    packing = PackingConfig(seq_len=cfg.data.seq_len, image_size=cfg.model.image_size, num_noisy_copies=1,
                            num_image_tokens=(cfg.model.image_size // factor // cfg.model.patch_size) ** 2,
                            text_loss=cfg.data.loss_on, image_loss=cfg.data.loss_on)  # fmt: skip
    stream = TrainStream.from_config(shards, tokenizer, packing, cfg.data, seed=cfg.run.seed)
    recorder = stream.batches.reader = _KindRecordingReader(stream.batches.reader)
    while len(recorder.kinds) < num_docs:  # one epoch's worth of documents read by the trainer's stream
        next(stream)
    delivered = recorder.kinds[:num_docs]
    assert stream.stats["num_skipped_documents"] == stream.stats["num_dropped_images"] == 0
    assert set(delivered) == set(TASKS)
    items = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["data"]["tasks"]
    weights = {item.split("=")[0]: float(item.split("=")[1]) if "=" in item else TASK_WEIGHTS[item]
               for item in items}  # fmt: skip
    n = len(delivered)
    for kind, w in weights.items():
        p = w / sum(weights.values())
        assert abs(delivered.count(kind) / n - p) < 4 * math.sqrt(p * (1 - p) / n), (kind, delivered.count(kind), n)
