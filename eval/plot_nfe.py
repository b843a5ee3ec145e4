"""Quality vs network evaluations: IMM and its flow-matching twin on one plot: does IMM
at a few steps reach the quality its twin needs many steps for?

    python eval/run.py --model runs/default/final    --steps 1,2,4,8                --out runs/eval/default
    python eval/run.py --model runs/default_fm/final --steps 1,2,4,8,16,32,64       --out runs/eval/default_fm
    python eval/plot_nfe.py runs/eval/default runs/eval/default_fm --out runs/eval/nfe

(the two models: `accelerate launch training/train.py --config configs/default.yaml` and
`... --config configs/default_fm.yaml`, same backbone and budget). Plots ShapeEval overall accuracy
(held-out prompts, 95% CI) and ShapeFD (with its real-vs-real floor) against NFE = num_steps x (2 with
guidance != 1) for each result dir; writes OUT/nfe.png and OUT/nfe.json (the plotted numbers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmgen.extras import pyplot

plt = pyplot("eval/plot_nfe.py")  # on the Agg backend: the script only writes files


def curves(results: dict, split: str = "heldout") -> dict:
    """{guidance: [(nfe, overall, ci_lo, ci_hi, shapefd, floor)]} of one results.json, sorted by NFE."""
    out: dict = {}
    for name, r in results["shapeeval"][split].items():
        steps, cfg = name.split("_cfg")
        n, w = int(steps.removeprefix("steps")), float(cfg)
        fd = results.get("shapefd", {}).get(split, {}).get(name, {})
        nfe = n * (2 if w != 1.0 else 1)
        out.setdefault(w, []).append((nfe, r["overall"], *r["overall_ci95"], fd.get("shapefd"), fd.get("floor_shapefd")))
    return {w: sorted(v) for w, v in out.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result_dirs", nargs="+", help="eval/run.py output dirs (e.g. IMM, then flow matching)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--out", default="runs/eval/nfe")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(11, 4))
    data = {}
    for d in args.result_dirs:
        results = json.loads((Path(d) / "results.json").read_text())
        label = f"{results['objective']} ({Path(d).name})"
        data[label] = {str(w): v for w, v in curves(results, args.split).items()}
        for w, pts in curves(results, args.split).items():
            xs = [q[0] for q in pts]
            ys = [q[1] for q in pts]
            ax_acc.errorbar(xs, ys, yerr=[[y - q[2] for y, q in zip(ys, pts)], [q[3] - y for y, q in zip(ys, pts)]],
                            marker="o", capsize=3, label=f"{label}, cfg {w:g}")  # fmt: skip
            line = ax_fd.plot(xs, [q[4] for q in pts], marker="o", label=f"{label}, cfg {w:g}")[0]
            ax_fd.plot(xs, [q[5] for q in pts], ls="--", color=line.get_color(), lw=0.8)
    for ax, ylabel in ((ax_acc, f"ShapeEval overall ({args.split})"), (ax_fd, "ShapeFD (dashed: real-vs-real floor)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    ax_acc.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(out / "nfe.png", dpi=120)
    plt.close(fig)
    (out / "nfe.json").write_text(json.dumps(data, indent=2))
    print(f"wrote {out / 'nfe.png'} and {out / 'nfe.json'}")
    return data


if __name__ == "__main__":
    main()
