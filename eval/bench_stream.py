"""How fast the input path makes batches, and how much of a training step it costs, vs DataLoader workers.

    python eval/bench_stream.py [--shards runs/data/shapes-train] [--num-workers 0 1 2] [--compute-ms 0 50]
                                [--stand-in sleep|matmul] [--seconds 15] [--out docs/speed/bench_stream.json]

The trainer's stream (`mmgen.training.data.TrainStream`: read shards, decode, tokenise, pack rows) feeds a
consumer that stands in for the model step for `--compute-ms` per batch: a sleep, as the host thread
waits while a GPU computes, or a loop of small matmuls that keeps this process's core busy. compute_ms 0
measures the input path alone (batches/s). With `num_workers` 0 a step costs compute + input; with
workers the input runs in other processes during the compute, so the time the trainer waits for its next
batch (`input_share` of the step) drops when a core is free for them. Prints a table and writes the rows
as JSON and a plot beside it (.png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmgen.data.packing import PackingConfig
from mmgen.tokenization import load_tokenizer
from mmgen.training.data import TrainStream

ROOT = Path(__file__).resolve().parents[1]


def stand_in(kind: str, compute_ms: float):
    """A callable that takes about compute_ms: a sleep, or a matmul count calibrated here once."""
    if kind == "sleep" or compute_ms == 0:
        return lambda: time.sleep(compute_ms / 1000)
    a = torch.randn(128, 128)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        a @ a
        n += 1
    count = max(1, round(n * compute_ms / 200))

    def matmuls():
        for _ in range(count):
            a @ a

    return matmuls


def measure(shards: str, tokenizer, *, seq_len: int, batch_size: int, num_workers: int, compute_ms: float,
            kind: str, seconds: float) -> dict:
    packing = PackingConfig(seq_len=seq_len, num_image_tokens=16, image_size=32, num_noisy_copies=1,
                            text_loss="assistant")  # fmt: skip
    step = stand_in(kind, compute_ms)
    stream = TrainStream(shards, tokenizer, packing, batch_size=batch_size, seed=0, num_workers=num_workers)
    try:
        next(stream)  # worker start-up and shard opening are not part of the steady state
        start, waited, batches = time.perf_counter(), 0.0, 0
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            next(stream)
            waited += time.perf_counter() - t
            step()
            batches += 1
        elapsed = time.perf_counter() - start
    finally:
        stream.close()
    return {"num_workers": num_workers, "compute_ms": compute_ms, "stand_in": kind, "seq_len": seq_len,
            "batch_size": batch_size, "batches": batches, "batches_per_s": round(batches / elapsed, 2),
            "ms_per_step": round(1000 * elapsed / batches, 2), "input_ms_per_step": round(1000 * waited / batches, 2),
            "input_share": round(waited / elapsed, 3)}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for compute_ms in sorted({r["compute_ms"] for r in rows}):
        mine = [r for r in rows if r["compute_ms"] == compute_ms]
        workers = [r["num_workers"] for r in mine]
        label = "input alone" if compute_ms == 0 else f"{compute_ms:g} ms {mine[0]['stand_in']}"
        left.plot(workers, [r["batches_per_s"] for r in mine], "o-", label=label)
        right.plot(workers, [r["input_share"] for r in mine], "o-", label=label)
    left.set(xlabel="data.num_workers", ylabel="batches/s", title="batches per second")
    right.set(xlabel="data.num_workers", ylabel="share of the step", title="waiting for input", ylim=(0, 1.05))
    for ax in (left, right):
        ax.set_xticks(sorted({r["num_workers"] for r in rows}))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=str(ROOT / "runs" / "data" / "shapes-train"))
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "shapes"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compute-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--stand-in", choices=("sleep", "matmul"), default="sleep")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", default=None, help="JSON file; the plot is written beside it (.png)")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    rows = []
    print(f"{'compute ms':>10} {'workers':>7} {'batches/s':>9} {'ms/step':>8} {'input ms/step':>13} {'input share':>11}")
    for compute_ms in args.compute_ms:
        for num_workers in args.num_workers:
            r = measure(args.shards, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                        num_workers=num_workers, compute_ms=compute_ms, kind=args.stand_in, seconds=args.seconds)
            rows.append(r)
            print(f"{compute_ms:>10g} {num_workers:>7} {r['batches_per_s']:>9.1f} {r['ms_per_step']:>8.1f} "
                  f"{r['input_ms_per_step']:>13.1f} {r['input_share']:>11.2f}", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        plot(rows, out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
