"""The trainer's stream (mmgen/training/data.py): prefetching packs ahead in a thread, yet yields the same
batches as the plain stream and checkpoints the state of what the trainer received, so resume is exact."""

import json
import time
from pathlib import Path

import pytest
import torch

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


def _stream(shards, tokenizer, prefetch):
    return TrainStream(shards, tokenizer, PACKING, batch_size=2, seed=0, prefetch=prefetch)


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
        assert ahead._queue.full() and ahead.packer.resume_index > plain.packer.resume_index
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

    def broken(documents):
        raise ValueError("document 7 of shard x: bad segment")
        yield

    stream.packer.iter_batches = broken
    with pytest.raises(ValueError, match="document 7"):
        next(stream)
    with pytest.raises(RuntimeError, match="closed"):  # not a hang on a queue nobody fills
        next(stream)
    with pytest.raises(ValueError, match="prefetch"):
        _stream(shards, tokenizer, -1)


def test_stream_benchmark_writes_one_row_per_setting(shards, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    import bench_stream

    out = tmp_path / "bench.json"
    rows = bench_stream.main(["--shards", shards, "--seq-len", "128", "--compute-ms", "0", "5", "--prefetch", "0",
                              "1", "--seconds", "0.3", "--out", str(out)])  # fmt: skip
    assert [(r["compute_ms"], r["prefetch"]) for r in rows] == [(0, 0), (0, 1), (5, 0), (5, 1)]
    assert all(r["batches"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert json.loads(out.read_text()) == rows


class _KindRecordingStream(TrainStream):
    """The trainer's stream, noting the kind (meta "task") of each document it reads, in stream order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kinds: list[str] = []

    def _documents(self):
        for doc in super()._documents():
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
    stream = _KindRecordingStream.from_config(shards, tokenizer, packing, cfg.data, seed=cfg.run.seed)
    while stream.packer.resume_index < num_docs:  # one epoch's worth of delivered documents
        next(stream)
    delivered = stream.kinds[:stream.packer.resume_index]
    assert stream.stats["num_skipped_documents"] == stream.stats["num_dropped_images"] == 0
    assert set(delivered) == set(TASKS)
    items = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["data"]["tasks"]
    weights = {item.split("=")[0]: float(item.split("=")[1]) if "=" in item else TASK_WEIGHTS[item]
               for item in items}  # fmt: skip
    n = len(delivered)
    for kind, w in weights.items():
        p = w / sum(weights.values())
        assert abs(delivered.count(kind) / n - p) < 4 * math.sqrt(p * (1 - p) / n), (kind, delivered.count(kind), n)
