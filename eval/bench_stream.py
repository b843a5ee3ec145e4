"""How much of a training step the input pipeline costs, with and without the prefetch thread.

    python eval/bench_stream.py [--shards runs/data/shapes-train] [--seq-len 256 1024] [--compute-ms 0 50]
                                [--seconds 15] [--out runs/bench_stream.json]

The trainer's stream (`mmgen.training.data.TrainStream`: read shards, tokenise, pack rows) feeds a
consumer that stands in for the model step by sleeping `--compute-ms` per batch, as the host thread
does while a GPU computes. Without prefetch a step costs compute + packing; with `data.prefetch` the
packing runs in a thread during the compute, so a step costs about max(compute, packing) when a core is
free for it. On a CPU that trains on every core there is no free core: there `data.prefetch 0` is as
fast (measured in the issue notes). Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmgen.data.packing import PackingConfig
from mmgen.tokenization import load_tokenizer
from mmgen.training.data import TrainStream

ROOT = Path(__file__).resolve().parents[1]


def measure(shards: str, tokenizer, *, seq_len: int, batch_size: int, prefetch: int, compute_ms: float,
            seconds: float) -> dict:
    packing = PackingConfig(seq_len=seq_len, num_image_tokens=16, image_size=32, num_noisy_copies=1,
                            text_loss="assistant")  # fmt: skip
    stream = TrainStream(shards, tokenizer, packing, batch_size=batch_size, seed=0, prefetch=prefetch)
    try:
        next(stream)  # shard opening and thread start-up are not part of the steady state
        start, batches = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            next(stream)
            time.sleep(compute_ms / 1000)
            batches += 1
        elapsed = time.perf_counter() - start
    finally:
        stream.close()
    ms = 1000 * elapsed / batches
    return {"seq_len": seq_len, "batch_size": batch_size, "prefetch": prefetch, "compute_ms": compute_ms,
            "batches": batches, "ms_per_step": round(ms, 2), "input_ms_per_step": round(ms - compute_ms, 2)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=str(ROOT / "runs" / "data" / "shapes-train"))
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "shapes"))
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--compute-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    rows = []
    print(f"{'seq_len':>7} {'compute ms':>10} {'prefetch':>8} {'ms/step':>8} {'input ms/step':>13}")
    for seq_len in args.seq_len:
        for compute_ms in args.compute_ms:
            for prefetch in args.prefetch:
                r = measure(args.shards, tokenizer, seq_len=seq_len, batch_size=args.batch_size, prefetch=prefetch,
                            compute_ms=compute_ms, seconds=args.seconds)  # fmt: skip
                rows.append(r)
                print(f"{seq_len:>7} {compute_ms:>10g} {prefetch:>8} {r['ms_per_step']:>8.1f} "
                      f"{r['input_ms_per_step']:>13.1f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
