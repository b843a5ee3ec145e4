"""The 2-D benchmark: do a few IMM flow-map steps match many flow-matching steps?

One small MLP flow map G(x_in, t_in, s_in) is trained three times per dataset: with Inductive Moment
Matching (IMM; Zhou, Ermon & Song, ICML 2025, arXiv 2503.07565) and the paper's Laplace kernel, with IMM
and a Gaussian kernel, and with flow matching (Lipman et al., ICLR 2023; Liu et al., ICLR 2023), with the
same optimizer, steps and forward-evaluation budget per training step. IMM is sampled by pushforward with
N in {1, 2, 4, 8, 16} jumps, flow matching by Euler with N in {1, ..., 128} steps, all from the same
starting noise. Samples are scored against fresh data with sliced Wasserstein-2 and energy distance
(mmgen/evaluation/metrics2d.py); `floor` is the same metric between two independent data samples of the same size.

    python eval/toy2d.py [--dataset ring|checkerboard|all] [--steps N] [--seed S] [--out DIR]
                         [--set width=256 lr=1e-3 ...] [--imm fm_fraction=0.5 a=1 ...]
    python eval/toy2d.py --ablation particles [--seeds 0 1 2] [--out DIR]

The first writes DIR/results.json ({DATASET: {"imm": {NFE: {"swd", "energy"}}, "imm_gaussian": {...},
"fm": {...}, "floor": {...}, "train": {...}}}, NFE keys as strings), DIR/results.md, DIR/toy2d.png and
DIR/config.json. The second trains IMM (Gaussian kernel) on the ring with M in {1, 2, 4, 8} particles
per group (M = 1 is the consistency-model special case, IMM paper Sec. 5), once per seed, and writes
DIR/particles.json ({M: {NFE: {"swd": mean, "ci95": [lo, hi], "values": [per seed]}}}), particles.md
and particles.png.

Equal compute: an IMM step on B items runs the network on B student inputs (with backward) and B
target inputs (no grad), i.e. 2B forward evaluations; flow matching gets batch 2B, i.e. also 2B
forward evaluations (all with backward). Measured times per step are reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmgen.evaluation.metrics2d import distances
from mmgen.extras import pyplot
from mmgen.objectives.imm import IMMConfig

plt = pyplot("eval/toy2d.py")  # on the Agg backend: the script only writes files

from mmgen.evaluation.toy2d import (
    DATASETS,
    IMM_NFES,
    LABELS,
    METHODS,
    PARTICLES,
    Toy2DConfig,
    eval_sets,
    particle_ablation,
    run_dataset,
)

# -------------------------------------------------------------------------------------- outputs


def markdown_table(results: dict) -> str:
    lines = []
    for dataset, r in results.items():
        lines += [f"### {dataset}", "", "| method | NFE | SWD2 | energy |", "|---|---|---|---|"]
        lines.append(f"| data floor | - | {r['floor']['swd']:.4f} | {r['floor']['energy']:.5f} |")
        for key in METHODS:
            for n, m in r[key].items():
                lines.append(f"| {LABELS[key]} | {n} | {m['swd']:.4f} | {m['energy']:.5f} |")
        if "ring_spread" in r:
            keys = list(r["ring_spread"]["data"])
            lines += ["", "Ring spread (where the distance comes from):", ""]
            lines += ["| samples | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for name, d in r["ring_spread"].items():
                lines.append(f"| {name} | " + " | ".join(f"{d[k]:.4f}" for k in keys) + " |")
        lines += ["", "| run | batch | s/step | net calls/step | forward evals/step | final loss |"]
        lines.append("|---|---|---|---|---|---|")
        for name, s in r["train"].items():
            lines.append(
                f"| {name} | {s['batch_size']} | {s['sec_per_step'] * 1e3:.2f} ms | {s['net_calls_per_step']:.0f}"
                f" | {s['forward_evals_per_step']:.0f} | {s['final_loss']:.4g} |"
            )
        lines.append("")
    return "\n".join(lines)


def particles_table(ablation: dict, floor: float, seeds) -> str:
    lines = [f"IMM on the ring, SWD2 mean over seeds {list(seeds)} [95% interval] (data floor {floor:.4f}):", "",
             "| M | " + " | ".join(f"NFE {n}" for n in IMM_NFES) + " |", "|---" * (len(IMM_NFES) + 1) + "|"]
    for m, sweep_m in ablation.items():
        cells = [f"{c['swd']:.4f} [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" for c in sweep_m.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_particles(ablation: dict, floor: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for m, sweep_m in ablation.items():
        mean = [sweep_m[str(n)]["swd"] for n in IMM_NFES]
        lo = [sweep_m[str(n)]["ci95"][0] for n in IMM_NFES]
        hi = [sweep_m[str(n)]["ci95"][1] for n in IMM_NFES]
        ax.plot(IMM_NFES, mean, "o-", ms=3, label=f"M = {m}")
        ax.fill_between(IMM_NFES, lo, hi, alpha=0.15)
    ax.axhline(floor, color="gray", ls="--", lw=1, label="data floor")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps (NFE)", ylabel="SWD2", title="IMM particles, ring")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict, plots: dict, path: Path) -> None:
    """Per dataset: one row of scatters (data, IMM Laplace@N, IMM Gaussian@N, FM@N) and SWD / energy
    against NFE."""
    shown = {"imm": IMM_NFES, "imm_gaussian": IMM_NFES, "fm": (1, 2, 4, 8, 32, 128)}
    cols = 1 + sum(map(len, shown.values()))
    fig, axes = plt.subplots(2 * len(results), cols, figsize=(1.6 * cols, 3.6 * len(results)), squeeze=False)
    short = {"imm": "IMM-L", "imm_gaussian": "IMM-G", "fm": "FM"}
    for row, (dataset, r) in enumerate(results.items()):
        p = plots[dataset]
        panels = [("data", p["data"])] + [(f"{short[k]} {n}", p[k][n]) for k, nfes in shown.items() for n in nfes]
        for ax, (title, x) in zip(axes[2 * row], panels):
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, rasterized=True)
            ax.set(xlim=(-1.4, 1.4), ylim=(-1.4, 1.4), xticks=[], yticks=[], aspect="equal")
            ax.set_title(title, fontsize=8)
        axes[2 * row, 0].set_ylabel(dataset)
        curve_axes = axes[2 * row + 1]
        for ax in curve_axes[2:]:
            ax.axis("off")
        for ax, metric in zip(curve_axes[:2], ("swd", "energy")):
            for key in METHODS:
                nfes = [int(n) for n in r[key]]
                ax.plot(nfes, [r[key][str(n)][metric] for n in nfes], "o-", label=short[key], ms=3)
            ax.axhline(r["floor"][metric], color="gray", ls="--", lw=1, label="data floor")
            ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{dataset} {metric}")
            ax.tick_params(labelsize=6)
        curve_axes[0].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Toy2DConfig, datasets: tuple[str, ...], out: Path) -> dict:
    """The whole benchmark: train, score, and write results.json/.md, config.json and toy2d.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results, plots, start = {}, {}, time.perf_counter()
    with tqdm(total=len(METHODS) * len(datasets) * cfg.steps, unit="step") as bar:
        for dataset in datasets:
            results[dataset], plots[dataset] = run_dataset(dataset, cfg, bar=bar)
    wall = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "wall_seconds": wall}, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    plot(results, plots, out / "toy2d.png")
    return results


def run_particles(cfg: Toy2DConfig, seeds: tuple[int, ...], out: Path, particles=PARTICLES) -> dict:
    """The particle ablation: write particles.json/.md/.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tqdm(total=len(seeds) * len(particles) * cfg.steps, unit="step") as bar:
        ablation = particle_ablation(cfg, seeds, particles, bar=bar)
    reference, floor_set, _, directions = eval_sets("ring", cfg)
    floor = distances(floor_set, reference, directions)["swd"]
    result = {"kernel": cfg.kernel, "seeds": list(seeds), "floor_swd": floor, "particles": ablation,
              "config": dataclasses.asdict(cfg), "wall_seconds": time.perf_counter() - start}
    (out / "particles.json").write_text(json.dumps(result, indent=2))
    (out / "particles.md").write_text(particles_table(ablation, floor, seeds))
    plot_particles(ablation, floor, out / "particles.png")
    return result


def _parse_fields(pairs: list[str], config_class) -> dict:
    """["width=256", "lr=1e-3"] -> {"width": 256, "lr": 0.001}, typed by the dataclass field's default."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    out = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in fields or name in ("imm", "steps", "seed"):
            allowed = sorted(set(fields) - {"imm", "steps", "seed"})
            raise ValueError(f"{pair!r}: expected FIELD=VALUE with FIELD one of {allowed}")
        kind = type(fields[name].default)
        try:
            out[name] = kind(text) if kind is not bool else text.lower() in ("1", "true", "yes")
        except ValueError as err:
            raise ValueError(f"{pair!r}: {name} expects a {kind.__name__}") from err
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=(*DATASETS, "all"), default="all")
    parser.add_argument("--ablation", choices=("particles",), default=None,
                        help="instead of the benchmark: IMM (Gaussian kernel) with M = 1, 2, 4, 8 over --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the ablation")
    parser.add_argument("--steps", type=int, default=Toy2DConfig.steps, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/toy2d"))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Toy2DConfig fields")
    parser.add_argument("--imm", nargs="*", default=[], metavar="FIELD=VALUE", help="IMMConfig fields (IMM runs)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        overrides = _parse_fields(args.set, Toy2DConfig)
        imm = tuple(_parse_fields(args.imm, IMMConfig).items())
    except ValueError as err:
        parser.error(str(err))
    # One thread: for a 150k-parameter MLP a second thread barely helps on an idle machine, and on the shared
    # 2-core box (other jobs running) two OpenMP threads were measured 10-50x slower than one.
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.ablation == "particles":
        cfg = Toy2DConfig(**{"kernel": "gaussian", **overrides, "steps": args.steps, "seed": args.seed, "imm": imm})
        result = run_particles(cfg, tuple(args.seeds), args.out)
        print(particles_table(result["particles"], result["floor_swd"], args.seeds))
        print(f"wrote {args.out}/particles.json, particles.md, particles.png in {time.perf_counter() - start:.0f} s")
        return result
    cfg = Toy2DConfig(**{**overrides, "steps": args.steps, "seed": args.seed, "imm": imm})
    results = run(cfg, DATASETS if args.dataset == "all" else (args.dataset,), args.out)
    print(markdown_table(results))
    print(
        f"wrote {args.out}/results.json, results.md, config.json, toy2d.png in {time.perf_counter() - start:.0f} s"
    )
    return results


if __name__ == "__main__":
    main()
