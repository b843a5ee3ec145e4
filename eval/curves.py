"""Overlay the learning curves of several runs (exact accuracy against images seen) as one PNG + JSON.

    python eval/curves.py runs/default runs/default_fm --out docs/curves/default.png [--labels IMM FM]
        [--x images_seen|image_targets_seen|tokens_seen|train_seconds|step]

Each run must have been trained with `--eval.curve_every N` (it writes RUN/curve.jsonl;
`mmgen/training/curves.py`). The JSON beside the PNG holds every plotted point.
"""

import argparse
import json
from pathlib import Path

from mmgen.training.curves import plot_curves, read_curve

X_AXES = ("images_seen", "image_targets_seen", "tokens_seen", "train_seconds", "step")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories holding curve.jsonl")
    parser.add_argument("--out", required=True, help="PNG path (the JSON goes beside it)")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the directory names)")
    parser.add_argument("--x", choices=X_AXES, default="images_seen")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} given for {len(args.runs)} runs")
    missing = [r for r in args.runs if not (Path(r) / "curve.jsonl").is_file()]
    if missing:
        parser.error(f"no curve.jsonl in {missing} (train with --eval.curve_every N)")
    labels = args.labels or [Path(r).name for r in args.runs]
    out = plot_curves([Path(r) for r in args.runs], Path(args.out), labels=labels, x=args.x)
    data = {label: {"run": run, "points": read_curve(Path(run))} for label, run in zip(labels, args.runs)}
    out.with_suffix(".json").write_text(json.dumps({"x": args.x, "runs": data}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return out


if __name__ == "__main__":
    main()
