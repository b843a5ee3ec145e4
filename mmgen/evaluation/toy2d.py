"""The 2-D benchmark's pieces: datasets, a small MLP flow map, training with IMM or flow matching at
equal compute, sampling and scoring (its command, tables and plots: eval/toy2d.py).

IMM: Zhou, Ermon & Song, "Inductive Moment Matching", ICML 2025, arXiv 2503.07565. Flow matching:
Lipman et al., ICLR 2023; Liu et al., ICLR 2023.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
from torch import nn

from mmgen import sampling
from mmgen.evaluation.metrics2d import distances, random_directions
from mmgen.objectives import get_objective

DATASETS = ("ring", "checkerboard")
IMM_NFES = (1, 2, 4, 8, 16)
FM_NFES = (1, 2, 4, 8, 16, 32, 64, 128)
PARTICLES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy2DConfig:
    steps: int = 1500
    batch_size: int = 256  # IMM items per step (a multiple of every M); flow matching gets 2x (see top)
    lr: float = 1e-3
    ema_decay: float = 0.99  # samples come from the EMA weights (both objectives)
    width: int = 128
    depth: int = 3
    emb_dim: int = 64
    num_particles: int = 4
    kernel: str = "laplace"  # IMM's MMD kernel (the paper's); the benchmark also runs "gaussian"
    k: int = 12
    imm: tuple[tuple[str, object], ...] = ()  # further IMMConfig fields, e.g. (("fm_fraction", 0.5),)
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

    As the transformer's image embedding (docs/design.md §6): MLP(sinusoid(t_in)) + MLP(sinusoid(s_in)),
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
        return {"sigma_data": cfg.sigma_data, "num_particles": num_particles, "k": cfg.k, "kernel": cfg.kernel,
                **dict(cfg.imm)}
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


METHODS = {  # results key -> (objective, kernel of IMM's MMD, steps of the sampler)
    "imm": ("imm", "laplace", IMM_NFES),
    "imm_gaussian": ("imm", "gaussian", IMM_NFES),
    "fm": ("flow_matching", "laplace", FM_NFES),
}
LABELS = {"imm": "IMM pushforward (Laplace kernel)", "imm_gaussian": "IMM pushforward (Gaussian kernel)",
          "fm": "FM Euler"}


def run_dataset(dataset: str, cfg: Toy2DConfig, *, bar=None):
    """Train and score every method of METHODS on one dataset."""
    reference, floor_set, noise, directions = eval_sets(dataset, cfg)
    result = {"floor": distances(floor_set, reference, directions), "train": {}}
    plots = {"data": floor_set}
    for key, (objective, kernel, nfes) in METHODS.items():
        if bar is not None:
            bar.set_description(f"{dataset}: {key}")
        net, obj_config, stats = train(objective, dataset, dataclasses.replace(cfg, kernel=kernel), bar=bar)
        result[key], plots[key] = sweep(objective, net, obj_config, nfes, noise, reference, directions)
        result["train"][key] = stats
    if dataset == "ring":  # where the distance above the floor comes from
        result["ring_spread"] = {"data": ring_spread(floor_set)}
        for key in ("imm", "imm_gaussian"):
            result["ring_spread"].update({f"{key}_{n}": ring_spread(x) for n, x in plots[key].items()})
        result["ring_spread"].update({f"fm_{n}": ring_spread(plots["fm"][n]) for n in (2, 8, 32, 128)})
    return result, plots


def mean_ci95(values: list[float]) -> tuple[float, list[float]]:
    """Mean and Student-t 95% interval over seeds (the half-width uses t_{0.975, n-1})."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, [mean, mean]
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    t975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}.get(n - 1, 2.2)
    half = t975 * sd / n**0.5
    return mean, [mean - half, mean + half]


def particle_ablation(cfg: Toy2DConfig, seeds: tuple[int, ...], particles=PARTICLES, bar=None) -> dict:
    """IMM (cfg.kernel) on the ring with M particles per group, once per seed (weights, data and loss
    noise all follow the seed; the evaluation sets stay those of cfg.seed): {M: {NFE: summary}}."""
    reference, _, noise, directions = eval_sets("ring", cfg)
    swd = {m: {n: [] for n in IMM_NFES} for m in particles}
    for seed in seeds:
        for m in particles:
            if bar is not None:
                bar.set_description(f"ring: M={m} seed {seed}")
            net, obj_config, _ = train("imm", "ring", dataclasses.replace(cfg, seed=seed), num_particles=m, bar=bar)
            scores, _ = sweep("imm", net, obj_config, IMM_NFES, noise, reference, directions)
            for n in IMM_NFES:
                swd[m][n].append(scores[str(n)]["swd"])
    out = {}
    for m in particles:
        out[str(m)] = {}
        for n in IMM_NFES:
            mean, ci = mean_ci95(swd[m][n])
            out[str(m)][str(n)] = {"swd": mean, "ci95": ci, "values": swd[m][n]}
    return out
