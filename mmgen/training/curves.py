"""Learning curves: exact accuracy against images seen, measured during a run on a fixed prompt set.

Every `eval.curve_every` steps the training loop calls `curve_point` with the EMA weights: one image per
prompt for the same single-object and two-object prompts of the train split (`t2i_prompts` on the test
seed: scenes and seeds the shards never use), prompt i drawn from seed i, at each step count of
`eval.curve_num_steps`, and greedy captions of the same fresh renders each time. Each point is one line of
`RUN/curve.jsonl` ({"step", "images_seen", "image_targets_seen", "tokens_seen", "seconds", and per metric
{"accuracy", "n", "ci95"}}); `plot_curves` draws one or several runs' files as a PNG, so recipes are
compared at equal images (x) on the same prompts (y):

    python eval/curves.py runs/default runs/default_fm --out docs/curves/default.png
"""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.evaluation.quick import accuracy, caption_scores, partial_rates, t2i_prompts, t2i_scores
from mmgen.extras import pyplot

CURVE_FILE = "curve.jsonl"


def curve_point(model, processor, *, num_samples: int, num_steps: tuple[int, ...], resolution: int) -> dict:
    """{metric: accuracy dict} for single@K, two@K (K in num_steps; with the judge's partial verdicts) and
    caption, on the fixed prompt set."""
    out = {}
    for groups, name in ((1, "single"), (2, "two")):
        prompts = t2i_prompts("train", groups, num_samples)
        for steps in num_steps:
            scores = t2i_scores(model, processor, prompts, num_steps=steps, resolution=resolution)
            out[f"{name}@{steps}"] = {**accuracy([s["overall"] for s in scores]), "partial": partial_rates(scores)}
    flags, _ = caption_scores(model, processor, "train", num_samples, resolution=resolution)
    out["caption"] = accuracy(flags)
    return out


def append_point(run_dir: Path, point: dict) -> None:
    with open(Path(run_dir) / CURVE_FILE, "a") as f:
        f.write(json.dumps(point) + "\n")


def read_curve(run_dir: Path) -> list[dict]:
    """The run's points in step order; a point logged again after a resume replaces the earlier one."""
    path = Path(run_dir) / CURVE_FILE
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            by_step[point["step"]] = point
    return [by_step[k] for k in sorted(by_step)]


def metrics_of(points: list[dict]) -> list[str]:
    names = []
    for p in points:
        names += [k for k, v in p.items() if isinstance(v, dict) and "accuracy" in v and k not in names]
    return names


def plot_curves(run_dirs: list[Path], out: Path, labels: list[str] | None = None, x: str = "images_seen") -> Path:
    """One panel per metric, accuracy (with its 95% interval) against `x`, one line per run."""
    plt = pyplot("the learning-curve plot")
    runs = [(label, read_curve(d)) for label, d in zip(labels or [Path(d).name for d in run_dirs], run_dirs)]
    names = []
    for _, points in runs:
        names += [m for m in metrics_of(points) if m not in names]
    if not names:
        raise ValueError(f"no curve points in {[str(d) for d in run_dirs]} (train with --eval.curve_every N)")
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0 + 0.25 * len(runs)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for ax, name in zip(axes[0], names):
        for i, (label, points) in enumerate(runs):  # one colour per run in every panel
            pts = [p for p in points if name in p]
            if not pts:
                continue
            xs = [p[x] for p in pts]
            ys = [p[name]["accuracy"] for p in pts]
            lo = [p[name]["ci95"][0] for p in pts]
            hi = [p[name]["ci95"][1] for p in pts]
            colour = colours[i % len(colours)]
            handles[label] = ax.plot(xs, ys, marker="o", ms=3, color=colour, label=label)[0]
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.12)
        ax.set_title(name)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact accuracy (95% interval)")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(handles) - 1) // 3), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
