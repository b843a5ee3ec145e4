"""Collect the results of `eval/gpu_ladder.sh` runs into one JSON and a bar chart.

    python eval/gpu_ladder_report.py --phase "stopped at 400 s=DIR1" --phase "resumed=DIR2" \
        --out docs/gpu/h200_unet_ladder.json [--note "..."]

Each DIR is an unpacked `results.tgz` (`res/`): `quick_NAME.json` (eval/quick_t2i.py) and, where present,
`metrics_NAME.jsonl` (the run's training log: its last step and throughput) and `export_NAME.log` (a run
stopped at the deadline: the checkpoint step it was exported from). The PNG (same name as --out)
shows exact accuracy of single-object prompts at 4 and 8 steps, two-object prompts at 8 and captions, per
run and phase, with 95% Wilson intervals.
"""

import argparse
import json
import re
from pathlib import Path

SHOWN = ("single@4", "single@8", "two@8", "caption")


def collect(directory: Path) -> dict:
    runs = {}
    for q in sorted(directory.glob("quick_*.json")):
        name = q.stem.removeprefix("quick_")
        quick = json.loads(q.read_text())
        entry = {"quick_t2i": quick}
        metrics = directory / f"metrics_{name}.jsonl"
        if metrics.is_file():
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if lines:
                last = lines[-1]
                entry["train_last_logged"] = {k: last[k] for k in ("step", "loss_text", "loss_image", "lr",
                                                                 "tokens_per_s", "images_per_s", "mfu") if k in last}
        export = directory / f"export_{name}.log"  # stopped at the deadline: exported from this checkpoint
        if export.is_file():
            found = re.search(r"resumed from \S+ at step (\d+)", export.read_text(errors="replace"))
            if found:
                entry["exported_step"] = int(found.group(1))
        runs[name] = entry
    if not runs:
        raise SystemExit(f"{directory}: no quick_*.json (expected an unpacked results.tgz of eval/gpu_ladder.sh)")
    return runs


def plot(phases: dict, path: Path) -> None:
    from mmgen.extras import pyplot

    plt = pyplot("eval/gpu_ladder_report.py")

    names = sorted({n for runs in phases.values() for n in runs})
    bars = [(label, n) for label in phases for n in names if n in phases[label]]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(bars)), 4.2))
    width = 0.8 / len(SHOWN)
    for k, key in enumerate(SHOWN):
        xs, ys, lo, hi = [], [], [], []
        for i, (label, n) in enumerate(bars):
            r = phases[label][n]["quick_t2i"].get(key)
            if r is None:
                continue
            xs.append(i + (k - (len(SHOWN) - 1) / 2) * width)
            ys.append(r["accuracy"])
            lo.append(r["accuracy"] - r["ci95"][0])
            hi.append(r["ci95"][1] - r["accuracy"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=key)
    ax.set_xticks(range(len(bars)))
    step = lambda label, n: f"\nstep {phases[label][n]['exported_step']}" if "exported_step" in phases[label][n] else ""
    ax.set_xticklabels([f"{n}\n{label}{step(label, n)}" for label, n in bars], fontsize=7)
    ax.set_ylabel("exact accuracy (train-split prompts)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(SHOWN))
    ax.set_title("eval/gpu_ladder.sh on one GPU: runs trained at once, scored by eval/quick_t2i.py", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", action="append", required=True, help="LABEL=DIR (repeatable, in order)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    phases = {}
    for spec in args.phase:
        label, sep, directory = spec.partition("=")
        if not sep:
            parser.error(f"--phase {spec!r}: expected LABEL=DIR")
        phases[label] = collect(Path(directory))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"note": args.note, "phases": phases}
    out.write_text(json.dumps(result, indent=1))
    plot(phases, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
