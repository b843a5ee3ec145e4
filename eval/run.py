"""Evaluate a model export: every evaluation suite, one command, numbers + report + plots.

    python eval/run.py --model runs/default/final [--steps 1,2,4,8] [--cfg 1.0,2.0] [--num-samples 20]
                       [--out runs/eval/default] [--quick]

Suites (each module's docstring has the details):
- ShapeEval (mmgen/evaluation/shapeeval.py): GenEval's six tasks on held-out ("heldout") and training-distribution
  ("train") prompts, at every step count x guidance scale; validity rate and off-palette share.
- ShapeFD / ShapeKID (mmgen/evaluation/shapefd.py) of the same images against true renders of the prompts' scenes,
  with the real-vs-real floor at the same sample size.
- Understanding (mmgen/evaluation/understanding.py): captioning exact match and per attribute, VQA by question type.
- Interleaved (mmgen/evaluation/interleaved.py): multi-turn programs, images and answers against the accumulated
  scene, image-emission precision/recall (at the largest --steps <= 4 and the first --cfg).
- Perplexity of held-out shapes text, training tokens/s and MFU, image latency per step count with and
  without the cached prefix (mmgen/evaluation/speed.py). On a GPU the same command runs unchanged (bf16 autocast for
  training, the model's attention implementation, e.g. flex, for inference).
Every accuracy has a 95% Wilson interval; seeds and sample counts are in results.json.

Generation and judging talk through files: OUT/runs/<suite>/.../{images/, metadata.jsonl, scores.jsonl};
`python eval/judge.py OUT` re-judges them later. Writes OUT/results.json, OUT/report.md, OUT/*.png and
OUT/config.json. `--quick` is the CI mode: a handful of samples per suite, seconds on a tiny model.
A bad argument (a missing model directory, `--steps 0`, ...) is one line `error: ...` naming it, exit
status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from mmgen.cli import ArgumentParser, UsageError, run_cli
from mmgen.data.shapes import Scene, render
from mmgen.evaluation import report, speed
from mmgen.evaluation.interleaved import generate_interleaved_run, programs
from mmgen.evaluation.judge import judge_all
from mmgen.evaluation.quick import TEST_SEED
from mmgen.evaluation.shapeeval import generate_t2i_run, prompt_set, write_jsonl
from mmgen.evaluation.understanding import generate_understanding_run, understanding_items
from mmgen.loading import check_device, check_model_source, load_export

SPLITS = ("heldout", "train")
SUITES = ("speed", "interleaved", "understanding")  # the ones --skip can leave out


def setting_name(num_steps: int, guidance: float) -> str:
    return f"steps{num_steps}_cfg{guidance:g}"


def config_hash(model_dir: Path) -> str:
    """SHA-256 of the export's config.json, canonicalised (key order and whitespace do not matter)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def counts_for(args) -> dict:
    n = args.num_samples
    if args.quick:
        return {"per_task": n or 1, "captions": 3, "vqa": 6, "programs": 2, "perplexity_docs": 4,
                "train_rows": 2, "train_steps": 1, "latency_prefix": 32, "latency_repeats": 1, "reference": 14}  # fmt: skip
    n = n or 20
    return {"per_task": n, "captions": 5 * n, "vqa": 10 * n, "programs": 2 * n, "perplexity_docs": 64,
            "train_rows": 8, "train_steps": 3, "latency_prefix": 256, "latency_repeats": 2, "reference": 7 * n}  # fmt: skip


def write_reference(out: Path, n: int, resolution: int) -> None:
    """True renders of an independent prompt set (another seed): the real side of the real-vs-real floor."""
    ref = out / "runs" / "reference"
    (ref / "images").mkdir(parents=True, exist_ok=True)
    items = prompt_set("heldout", max(1, n // 7 + 1), seed=TEST_SEED + 7)[:n]
    rows = []
    for i, item in enumerate(items):
        name = f"images/{i:05d}.png"
        render(Scene.from_dict(item["scene"]), resolution).save(ref / name)
        rows.append({**item, "image": name})
    write_jsonl(ref / "metadata.jsonl", rows)


def parse_list(flag: str, text: str, kind, lo, what: str) -> list:
    """`--steps 1,2,4` -> [1, 2, 4]; UsageError naming `flag` unless every item is a `kind` >= `lo`."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(math.isnan(v) or v < lo for v in values):
        raise UsageError(f"{flag}: expected comma-separated {what} >= {lo}, got {text!r}")
    return values


def parse_args(argv=None) -> tuple[argparse.Namespace, list[int], list[float], set[str]]:
    """The command line, checked (UsageError naming the flag of any bad value): (args, step counts,
    guidance scales, suites to skip)."""
    p = ArgumentParser(prog="eval/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a save_pretrained export (model + processor)")
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    p.add_argument("--cfg", default="1.0", help="comma-separated guidance scales")
    p.add_argument("--num-samples", type=int, default=None, help="prompts per ShapeEval task per split (default 20)")
    p.add_argument("--out", default=None, help="output dir (default runs/eval/<model dir name's parent>)")
    p.add_argument("--quick", action="store_true", help="CI mode: a few samples per suite")
    p.add_argument("--seed", type=int, default=0, help="noise seed of sample 0 (sample i uses seed + i)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: on the shared 2-core box two OpenMP threads spin "
                   "against other processes, see eval/bench_generation.py; 0 = torch's choice)")  # fmt: skip
    p.add_argument("--skip", default="", help=f"comma-separated suites to skip: {','.join(SUITES)}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    steps = parse_list("--steps", args.steps, int, 1, "whole numbers")
    scales = parse_list("--cfg", args.cfg, float, 0.0, "numbers")
    for flag, value, lo in (("--num-samples", args.num_samples, 1), ("--batch-size", args.batch_size, 1),
                            ("--threads", args.threads, 0)):  # fmt: skip
        if value is not None and value < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {value}")
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SUITES):
        raise UsageError(f"--skip: unknown suite(s) {sorted(skip - set(SUITES))}; known: {list(SUITES)}")
    check_model_source(args.model)
    if not Path(args.model).is_dir():  # results hash the export's config.json: a local export only
        raise UsageError(f"no such model directory: {args.model}")
    check_device(args.device)
    return args, steps, scales, skip


def main(argv=None) -> dict:
    """Run every suite; returns the results (also written to OUT/results.json)."""
    args, steps, scales, skip = parse_args(argv)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    out = Path(args.out or Path("runs/eval") / (model_dir.parent.name or model_dir.name))
    counts = counts_for(args)
    timing: dict = {}
    t0 = time.perf_counter()

    def tick(name):
        timing[name] = round(time.perf_counter() - t0 - sum(timing.values()), 2)
        print(f"[eval] {name} done ({timing[name]:.1f} s)", flush=True)

    model, processor = load_export(str(model_dir), args.device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create it ({err.strerror or err})") from None
    res = model.config.image_size
    tick("load")

    for split in SPLITS:
        prompts = prompt_set(split, counts["per_task"])
        for n in steps:
            for w in scales:
                generate_t2i_run(model, processor, prompts, out / "runs" / "t2i" / split / setting_name(n, w),
                                 num_steps=n, guidance=w, seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    write_reference(out, counts["reference"], res)
    tick("t2i_generation")
    if "understanding" not in skip:
        items = understanding_items("heldout", counts["captions"], counts["vqa"], resolution=res)
        generate_understanding_run(model, processor, items, out / "runs" / "understanding", resolution=res,
                                   batch_size=args.batch_size)  # fmt: skip
        tick("understanding_generation")
    inter_steps = max([n for n in steps if n <= 4] or [min(steps)])
    if "interleaved" not in skip:
        progs = programs("heldout", counts["programs"])
        generate_interleaved_run(model, processor, progs, out / "runs" / "interleaved" /
                                 setting_name(inter_steps, scales[0]), num_steps=inter_steps, guidance=scales[0],
                                 seed=args.seed, batch_size=args.batch_size)  # fmt: skip
        tick("interleaved_generation")

    results = {
        "model": str(model_dir), "config_hash": config_hash(model_dir), "objective": model.config.objective,
        "steps": steps, "guidance": scales, "interleaved_setting": setting_name(inter_steps, scales[0]),
        "seeds": {"noise_seed_of_sample_0": args.seed, "prompt_seed": TEST_SEED, "understanding_seeds":
                  [TEST_SEED + 2, TEST_SEED + 3], "programs_seed": TEST_SEED + 4, "reference_seed": TEST_SEED + 7,
                  "perplexity_seed": TEST_SEED + 6, "train_batch_seed": TEST_SEED + 5},
        "sample_counts": counts, "quick": args.quick,
    }  # fmt: skip
    results.update(judge_all(out))
    tick("judging")
    results["perplexity"] = speed.perplexity(model, processor, num_docs=counts["perplexity_docs"])
    tick("perplexity")
    if "speed" not in skip:
        results["speed"] = {
            "training": speed.training_throughput(model, processor, rows=counts["train_rows"],
                                                  steps=counts["train_steps"], seed=args.seed),
            "image_latency": speed.image_latency(model, prefix=counts["latency_prefix"], steps=steps,
                                                 guidance=scales[0], repeats=counts["latency_repeats"]),
        }  # fmt: skip
        if model.config.objective == "imm":  # the baseline of the target branch: a second full forward
            results["speed"]["training_full_target"] = speed.training_throughput(
                model, processor, rows=counts["train_rows"], steps=counts["train_steps"], seed=args.seed,
                target_pass="full")
        tick("speed")
    results["environment"] = {"device": str(args.device), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
    results["timing_s"] = timing
    (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report.write_report(results, out)
    tick("report")
    results["timing_s"] = timing
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"[eval] wrote {out / 'results.json'}, {out / 'report.md'} in {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
