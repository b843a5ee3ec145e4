"""The 2-D benchmark: do a few IMM flow-map steps match many flow-matching steps?

One small MLP flow map G(x_in, t_in, s_in) is trained twice per dataset, with Inductive Moment
Matching (IMM; Zhou, Ermon & Song, ICML 2025, arXiv 2503.07565) and with flow matching (Lipman et al.,
ICLR 2023; Liu et al., ICLR 2023), with the same optimizer, steps and forward-evaluation budget per
training step. IMM is sampled by pushforward with N in {1, 2, 4, 8} jumps, flow matching by Euler with
N in {1, ..., 128} steps, all from the same starting noise. Samples are scored against fresh data with
sliced Wasserstein-2 and energy distance (eval/metrics2d.py); `floor` is the same metric between two
independent data samples of the same size. A particle ablation trains IMM with M in {1, 2, 4, 8}
(M = 1 is the consistency-model special case, IMM paper Sec. 5) on the first dataset.

    python eval/toy2d.py [--dataset ring|checkerboard|all] [--steps N] [--seed S] [--out DIR]

Writes DIR/results.json ({DATASET: {"imm": {NFE: {"swd", "energy"}}, "fm": {...}, "floor": {...},
"particles": {M: {NFE: {...}}}, "train": {...}}}, NFE and M keys as strings), DIR/results.md,
DIR/toy2d.png and DIR/config.json.

Equal compute: an IMM step on B items runs the network on B student inputs (with backward) and B
target inputs (no grad), i.e. 2B forward evaluations; flow matching gets batch 2B, i.e. also 2B
forward evaluations (all with backward). Measured times per step are reported beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the benchmark only writes files
import matplotlib.pyplot as plt
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/ is scripts, not a package
from metrics2d import distances, random_directions

from mmgen import sampling
from mmgen.objectives import get_objective

DATASETS = ("ring", "checkerboard")
IMM_NFES = (1, 2, 4, 8)
FM_NFES = (1, 2, 4, 8, 16, 32, 64, 128)
PARTICLES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy2DConfig:
    steps: int = 1500
    batch_size: int = 256  # IMM items per step (a multiple of every M); flow matching gets 2x (see top)
    lr: float = 3e-3
    ema_decay: float = 0.99  # samples come from the EMA weights (both objectives)
    width: int = 128
    depth: int = 3
    emb_dim: int = 64
    num_particles: int = 4
    k: int = 12
    sigma_data: float = 0.5
    num_eval: int = 4096  # samples per metric (generated, reference and floor sets alike)
    num_projections: int = 512
    seed: int = 0


# ----------------------------------------------------------------------------------------- data


def sample_data(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) samples of a toy distribution, scaled so each coordinate has std sigma_data = 0.5."""
    if name == "ring":
        # 8 Gaussians on a circle of radius 1, component std 0.1; per-coordinate std sqrt(1/2 + 0.01).
        k = torch.randint(0, 8, (n,), generator=generator)
        angle = k.double() * (2 * math.pi / 8)
        centers = torch.stack([angle.cos(), angle.sin()], dim=1)
        x = centers + 0.1 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        scale = 0.5 / math.sqrt(0.5 + 0.01)
    elif name == "checkerboard":
        # 4x4 board on [-2, 2]^2, the 8 cells with (i + j) even; each marginal is U(-2, 2), std 4/sqrt(12).
        i = torch.randint(0, 4, (n,), generator=generator)
        j = 2 * torch.randint(0, 2, (n,), generator=generator) + (i % 2)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        x = torch.stack([i, j], dim=1).double() - 2 + u
        scale = 0.5 / (4 / math.sqrt(12))
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return (scale * x).float()


# ---------------------------------------------------------------------------------------- model


def sinusoidal_embedding(t_in: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) times (already scaled by 1000) -> (B, dim) [cos, sin] features (DDPM/DiT style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t_in.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=1)


class FlowMapMLP(nn.Module):
    """G(x_in, t_in, s_in, cond) for 2-D data: residual MLP with two separate time embeddings.

    As the transformer's image head (DESIGN.md Sec. 3): MLP(sinusoid(t_in)) + MLP(sinusoid(s_in)),
    separate MLPs, added to the hidden state of every block. `cond` is ignored (unconditional).
    """

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, emb_dim: int = 64):
        super().__init__()
        self.emb_dim = emb_dim
        self.inp = nn.Linear(dim, width)
        self.t_mlp = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.s_mlp = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x_in, t_in, s_in, cond=None):
        emb = self.t_mlp(sinusoidal_embedding(t_in, self.emb_dim))
        emb = emb + self.s_mlp(sinusoidal_embedding(s_in, self.emb_dim))  # (B, width)
        h = self.inp(x_in.float())  # (B, width)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h).to(x_in.dtype)


class CountingNet:
    """Wraps a net to count calls and per-item forward evaluations (rows)."""

    def __init__(self, net):
        self.net, self.calls, self.rows = net, 0, 0

    def __call__(self, x_in, t_in, s_in, cond=None):
        self.calls += 1
        self.rows += x_in.shape[0]
        return self.net(x_in, t_in, s_in, cond)


def ring_spread(x: torch.Tensor) -> dict[str, float]:
    """Why a ring sample is off: radius, within-mode spread, mass between modes, mode-weight imbalance."""
    radius = x.double().norm(dim=1)
    angle = torch.atan2(x[:, 1], x[:, 0]).double() / (2 * math.pi / 8)  # mode centres at integers
    offset = angle - angle.round()
    counts = torch.bincount(angle.round().long() % 8, minlength=8).double()
    return {
        "radius_mean": float(radius.mean()),
        "radial_std": float(radius.std()),
        "tangential_std": float((offset * (2 * math.pi / 8) * radius).std()),
        "between_modes": float((offset.abs() > 0.3).double().mean()),  # data: ~2%
        "mode_weight_cv": float(counts.std() / counts.mean()),  # data: ~0.03 at n = 4096 (sampling noise)
    }


# ------------------------------------------------------------------------------------- training


def make_net(cfg: Toy2DConfig) -> FlowMapMLP:
    return FlowMapMLP(width=cfg.width, depth=cfg.depth, emb_dim=cfg.emb_dim)


def objective_overrides(objective: str, cfg: Toy2DConfig, num_particles: int) -> dict:
    if objective == "imm":
        return {"sigma_data": cfg.sigma_data, "num_particles": num_particles, "k": cfg.k}
    return {"sigma_data": cfg.sigma_data}


def train(objective: str, dataset: str, cfg: Toy2DConfig, *, num_particles: int | None = None, bar=None):
    """Train one flow map; returns (EMA net, objective config, training stats dict)."""
    num_particles = cfg.num_particles if num_particles is None else num_particles
    loss_fn, obj_config = get_objective(objective, **objective_overrides(objective, cfg, num_particles))
    torch.manual_seed(cfg.seed)  # weight init
    net = make_net(cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss_gen = torch.Generator().manual_seed(cfg.seed + 2)
    batch = cfg.batch_size if objective == "imm" else 2 * cfg.batch_size  # equal forward evals per step
    counter = CountingNet(net)
    losses, t0 = [], None
    warmup = min(20, cfg.steps // 2)  # exclude the first steps (allocator warm-up) from the timing
    for step in range(cfg.steps):
        if step == warmup:
            t0, calls0, rows0 = time.perf_counter(), counter.calls, counter.rows
        x = sample_data(dataset, batch, data_gen)
        loss, _ = loss_fn(counter, x, None, config=obj_config, generator=loss_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema_decay)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
    timed = cfg.steps - warmup
    stats = {
        "steps": cfg.steps,
        "batch_size": batch,
        "num_particles": num_particles if objective == "imm" else None,
        "sec_per_step": (time.perf_counter() - t0) / timed,
        "net_calls_per_step": (counter.calls - calls0) / timed,
        "forward_evals_per_step": (counter.rows - rows0) / timed,  # per-item network evaluations
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
    }
    return ema, obj_config, stats


# ----------------------------------------------------------------------------------- evaluation


def generate(objective: str, net, obj_config, num_steps: int, noise: torch.Tensor) -> torch.Tensor:
    if objective == "imm":
        return sampling.pushforward(net, noise, None, num_steps=num_steps, config=obj_config)
    return sampling.euler(net, noise, None, num_steps=num_steps, config=obj_config)


def sweep(objective, net, obj_config, nfes, noise, reference, directions):
    """{str(NFE): {"swd", "energy"}} and the samples {NFE: (n, 2)} for plotting."""
    scores, samples = {}, {}
    for n in nfes:
        x = generate(objective, net, obj_config, n, noise)
        samples[n] = x
        scores[str(n)] = distances(x, reference, directions)
    return scores, samples


def eval_sets(dataset: str, cfg: Toy2DConfig):
    """Fixed reference set, floor set, starting noise and projection directions for one dataset."""
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    reference = sample_data(dataset, cfg.num_eval, gen)
    floor_set = sample_data(dataset, cfg.num_eval, gen)
    noise = sampling.initial_noise((cfg.num_eval, 2), gen, cfg.sigma_data)  # same noise for every N
    directions = random_directions(cfg.num_projections, 2, gen)
    return reference, floor_set, noise, directions


def run_dataset(dataset: str, cfg: Toy2DConfig, *, particles: tuple[int, ...] = (), bar=None):
    """Train and score both objectives (and the particle ablation) on one dataset."""
    reference, floor_set, noise, directions = eval_sets(dataset, cfg)
    result = {"floor": distances(floor_set, reference, directions), "train": {}, "particles": {}}
    plots = {"data": floor_set}
    for objective, key, nfes in (("imm", "imm", IMM_NFES), ("flow_matching", "fm", FM_NFES)):
        if bar is not None:
            bar.set_description(f"{dataset}: {key}")
        net, obj_config, stats = train(objective, dataset, cfg, bar=bar)
        result[key], plots[key] = sweep(objective, net, obj_config, nfes, noise, reference, directions)
        result["train"][key] = stats
    if dataset == "ring":  # diagnostics for the closing note: where the distance above the floor comes from
        result["ring_spread"] = {"data": ring_spread(floor_set)}
        result["ring_spread"].update({f"imm_{n}": ring_spread(x) for n, x in plots["imm"].items()})
        result["ring_spread"].update({f"fm_{n}": ring_spread(plots["fm"][n]) for n in (2, 8, 32, 128)})
    for m in particles:
        if m == cfg.num_particles:
            result["particles"][str(m)] = result["imm"]
            continue
        if bar is not None:
            bar.set_description(f"{dataset}: imm M={m}")
        net, obj_config, stats = train("imm", dataset, cfg, num_particles=m, bar=bar)
        result["particles"][str(m)], samples = sweep(
            "imm", net, obj_config, IMM_NFES, noise, reference, directions
        )
        if "ring_spread" in result:
            result["ring_spread"].update({f"imm_M{m}_{n}": ring_spread(samples[n]) for n in (1, 8)})
        result["train"][f"imm_M{m}"] = stats
    return result, plots


# -------------------------------------------------------------------------------------- outputs


def markdown_table(results: dict) -> str:
    lines = []
    for dataset, r in results.items():
        lines += [f"### {dataset}", "", "| method | NFE | SWD2 | energy |", "|---|---|---|---|"]
        lines.append(f"| data floor | - | {r['floor']['swd']:.4f} | {r['floor']['energy']:.5f} |")
        for key, name in (("imm", "IMM pushforward"), ("fm", "FM Euler")):
            for n, m in r[key].items():
                lines.append(f"| {name} | {n} | {m['swd']:.4f} | {m['energy']:.5f} |")
        if r["particles"]:
            lines += ["", "IMM particle ablation (SWD2 / energy):", ""]
            lines.append("| M | " + " | ".join(f"NFE {n}" for n in IMM_NFES) + " |")
            lines.append("|---" * (len(IMM_NFES) + 1) + "|")
            for m, sweep_m in r["particles"].items():
                cells = [f"{sweep_m[str(n)]['swd']:.4f} / {sweep_m[str(n)]['energy']:.5f}" for n in IMM_NFES]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
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


def plot(results: dict, plots: dict, path: Path) -> None:
    """Per dataset: one row of scatters (data, IMM@N, FM@N) and SWD / energy against NFE."""
    cols = 1 + len(IMM_NFES) + len(FM_NFES)
    fig, axes = plt.subplots(2 * len(results), cols, figsize=(1.8 * cols, 3.8 * len(results)), squeeze=False)
    for row, (dataset, r) in enumerate(results.items()):
        p = plots[dataset]
        panels = [("data", p["data"])] + [(f"IMM {n}", p["imm"][n]) for n in IMM_NFES]
        panels += [(f"FM {n}", p["fm"][n]) for n in FM_NFES]
        for ax, (title, x) in zip(axes[2 * row], panels):
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, rasterized=True)
            ax.set(xlim=(-1.4, 1.4), ylim=(-1.4, 1.4), xticks=[], yticks=[], aspect="equal")
            ax.set_title(title, fontsize=8)
        axes[2 * row, 0].set_ylabel(dataset)
        curve_axes = axes[2 * row + 1]
        for ax in curve_axes[2:]:
            ax.axis("off")
        for ax, metric in zip(curve_axes[:2], ("swd", "energy")):
            for key, label in (("imm", "IMM"), ("fm", "FM")):
                nfes = [int(n) for n in r[key]]
                ax.plot(nfes, [r[key][str(n)][metric] for n in nfes], "o-", label=label, ms=3)
            for m, sweep_m in r["particles"].items():
                if int(m) != 4:
                    ax.plot(
                        IMM_NFES, [sweep_m[str(n)][metric] for n in IMM_NFES], ":", lw=1, label=f"IMM M={m}"
                    )
            ax.axhline(r["floor"][metric], color="gray", ls="--", lw=1, label="data floor")
            ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{dataset} {metric}")
            ax.tick_params(labelsize=6)
        curve_axes[0].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Toy2DConfig, datasets: tuple[str, ...], out: Path, *, particles=PARTICLES) -> dict:
    """The whole benchmark: train, score, and write results.json/.md, config.json and toy2d.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    num_runs = 2 * len(datasets) + len([m for m in particles if m != cfg.num_particles])
    results, plots, start = {}, {}, time.perf_counter()
    with tqdm(total=num_runs * cfg.steps, unit="step") as bar:
        for i, dataset in enumerate(datasets):  # the particle ablation runs on the first dataset
            results[dataset], plots[dataset] = run_dataset(
                dataset, cfg, particles=particles if i == 0 else (), bar=bar
            )
    wall = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "wall_seconds": wall}, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    plot(results, plots, out / "toy2d.png")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=(*DATASETS, "all"), default="all")
    parser.add_argument("--steps", type=int, default=Toy2DConfig.steps, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/toy2d"))
    args = parser.parse_args(argv)
    # One thread: for a 150k-parameter MLP a second thread barely helps on an idle machine, and on the shared
    # 2-core box (other jobs running) two OpenMP threads were measured 10-50x slower than one.
    torch.set_num_threads(1)
    cfg = Toy2DConfig(steps=args.steps, seed=args.seed)
    start = time.perf_counter()
    results = run(cfg, DATASETS if args.dataset == "all" else (args.dataset,), args.out)
    print(markdown_table(results))
    print(
        f"wrote {args.out}/results.json, results.md, config.json, toy2d.png in {time.perf_counter() - start:.0f} s"
    )
    return results


if __name__ == "__main__":
    main()
