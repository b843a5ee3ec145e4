"""Collect the runs of eval/gpu_check.sh into one JSON (and a PNG of the image-loss curves).

    python eval/gpu_summary.py runs/dev OUT.json [--plot OUT.png]

Per run directory: the last logged metrics (tokens/s, MFU, losses), the logged curve, the end-of-run
evaluation's summary when the run finished, and whether its export exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarize_run(run: Path) -> dict:
    r: dict = {"finished": (run / "final" / "model.safetensors").is_file()}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        logs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        logs = [x for x in logs if "loss" in x]
        if logs:
            keys = ("step", "loss", "loss_text", "loss_image", "tokens_per_s", "images_per_s", "mfu")
            r["last"] = {k: logs[-1].get(k) for k in keys}
            r["curve"] = [{k: x.get(k) for k in ("step", "loss_text", "loss_image", "tokens_per_s", "mfu")}
                          for x in logs]  # fmt: skip
    ev_path = run / "eval.json"
    if ev_path.is_file():
        ev = json.loads(ev_path.read_text())
        r["summary"] = ev.get("summary")
        r["caption_examples"] = ev.get("caption", {}).get("train", {}).get("examples")
    return r


def plot(results: dict, path: str) -> None:
    from mmgen.extras import pyplot

    plt = pyplot("eval/gpu_summary.py")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, prefix, title in (
        (axes[0], "fm_", "flow matching"),
        (axes[1], "imm", "IMM (+FM groups); pure IMM"),
    ):
        for name, r in sorted(results.items()):
            if name.startswith(prefix) and r.get("curve"):
                steps = [c["step"] for c in r["curve"]]
                ax.plot(
                    steps,
                    [c["loss_image"] for c in r["curve"]],
                    label=name + ("" if r["finished"] else " (stopped)"),
                )
        ax.set(title=title, xlabel="step", ylabel="image loss", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs")
    parser.add_argument("out")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    results = {run.name: summarize_run(run) for run in sorted(Path(args.runs).iterdir()) if run.is_dir()}
    for name, r in results.items():
        print(name, r.get("last", {}).get("step"), r.get("summary"))
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
