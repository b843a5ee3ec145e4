"""Inductive Moment Matching (IMM) as a pure loss function.

Zhou, Ermon & Song, "Inductive Moment Matching", ICML 2025, arXiv 2503.07565.
Notation (see also ``interpolants.py``):

    x        clean data, (B, ...); D = elements per item
    eps      noise ~ N(0, sigma_d^2 I), shared by x_t and x_r (same x, same eps)
    t > r >= s   times in [eps_min, T]; the flow map f_{s,t} jumps x_t to time s
    f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G(c_in(t) x_t, t, s)          (IMM Eq. (10))
        Euler-FM   : c_skip = 1, c_out = -(t - s) sigma_d         (OT-FM only; App. C.3)
        Simple-EDM : c_skip = (a_t a_s + s_t s_s) / (a_t^2 + s_t^2),
                     c_out  = -(a_s s_t - a_t s_s) sigma_d / sqrt(a_t^2 + s_t^2)
        c_in(t) = 1 / (sigma_d sqrt(a_t^2 + s_t^2))
    r(s, t) = max(s, min(t - delta, eta^{-1}(eta_t - (eta_max - eta_min) / 2^k)))   (App. C.1)
    kernel k(a, b) = exp(-w~ max(||a - b||_2, 1e-8) / D),  w~ = 1 / |c_out(s, t)|  (App. C.4)
        or, with kernel="gaussian", exp(-(w~ ||a - b||_2 / D)^2 / 2): the same length scale, squared
    MMD^2 per group of M particles: V-statistic mean(K_ss) + mean(K_tt) - 2 mean(K_st)  (Eq. (12))
    w(s, t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t / dt) alpha_t^a / (alpha_t^2 + sigma_t^2)
                                                                               (Eq. (13), App. C.5)
    loss = mean over groups of w(s, t) MMD^2(student f_{s,t}(x_t), target f_{s,r}(x_r))

The network is an opaque callable ``net(x_in, t_in, s_in, cond) -> G`` (docs/design.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .interpolants import as_time, expand_like, get_interpolant, shift_time

__all__ = [
    "IMMConfig",
    "c_in",
    "compute_r",
    "condition_chunks",
    "draw",
    "flow_map",
    "flow_map_coefficients",
    "group_mmd2",
    "imm_loss",
    "imm_weight",
    "kernel_weight",
    "network_output",
    "time_inputs",
]

_PARAMETERIZATIONS = ("euler_fm", "simple_edm")
_TIME_INPUTS = ("stride", "identity")
_PARTICLE_GROUPS = ("condition", "consecutive")
_KERNEL_MIN_DIST = 1e-8


@dataclass(frozen=True)
class IMMConfig:
    """Hyper-parameters of the IMM objective; defaults follow the paper's latent ImageNet recipe."""

    sigma_data: float = 0.5
    interpolant: str = "ot_fm"
    parameterization: str = "euler_fm"
    time_input: str = "stride"
    T: float = 0.994
    eps: float = 0.0
    k: int = 12
    delta: float = 1e-4
    a: float = 2.0
    b: float = 4.0
    num_particles: int = 4
    # Classifier-free guidance: the share of particle groups trained with the null condition (the caller's
    # drop_cond); > 0 needs a drop_cond whenever a condition is given.
    p_uncond: float = 0.1
    # How the training step forms particle groups: "condition" = only images with identical conditions (same
    # prompt prefix) share one (it passes group_ids); "consecutive" = any num_particles consecutive images.
    particle_groups: str = "consecutive"
    # Flow-matching groups (Shortcut models, Frans et al. 2024, arXiv 2410.12557): this fraction of
    # particle groups trains the s -> t limit of the flow map, sigma_d G(x_t, t, t) = eps - x, by
    # regression on the data instead of MMD; weighted by fm_weight. 0 = pure IMM (the paper).
    fm_fraction: float = 0.0
    fm_weight: float = 1.0
    # Timestep shift (SD3, arXiv 2403.03206): t = eps + (T - eps) shift_time(u, time_shift), u ~ U(0, 1),
    # for training times and the sampler's default grid alike. 1 = the paper's uniform t.
    time_shift: float = 1.0
    # The MMD kernel. "laplace" is the paper's. Its V-statistic pairs each student particle with the target
    # built from the same (x, eps); near that pair the Laplace kernel is linear in the distance, an L1-type
    # regression whose optimum is a median, not the mean the flow map needs, and each short jump of a
    # many-step sampler sharpens the modes. "gaussian" is quadratic there (docs/toy2d.md).
    kernel: str = "laplace"

    def __post_init__(self):
        get_interpolant(self.interpolant)  # validates the name
        if self.parameterization not in _PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {_PARAMETERIZATIONS}, got {self.parameterization!r}"
            )
        if self.parameterization == "euler_fm" and self.interpolant != "ot_fm":
            raise ValueError("parameterization 'euler_fm' requires interpolant 'ot_fm'")
        if self.time_input not in _TIME_INPUTS:
            raise ValueError(f"time_input must be one of {_TIME_INPUTS}, got {self.time_input!r}")
        if not 0.0 <= self.eps < self.T <= 1.0:
            raise ValueError(f"need 0 <= eps < T <= 1, got eps={self.eps}, T={self.T}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if not 0.0 <= self.fm_fraction <= 1.0 or self.fm_weight < 0:
            raise ValueError(f"need 0 <= fm_fraction <= 1 and fm_weight >= 0, got {self.fm_fraction}, {self.fm_weight}")
        if self.fm_fraction > 0 and self.parameterization != "euler_fm":
            raise ValueError("fm_fraction > 0 needs parameterization 'euler_fm' (sigma_d G is the velocity there)")
        if not self.time_shift > 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if self.k < 0 or self.delta < 0:
            raise ValueError(f"k and delta must be >= 0, got k={self.k}, delta={self.delta}")
        if self.particle_groups not in _PARTICLE_GROUPS:
            raise ValueError(f"particle_groups must be one of {_PARTICLE_GROUPS}, got {self.particle_groups!r}")
        if self.kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {tuple(_KERNELS)}, got {self.kernel!r}")


def time_inputs(t, s, time_input: str = "stride") -> tuple[torch.Tensor, torch.Tensor]:
    """Network time inputs (t_in, s_in) as float32: 1000 t and 1000 (t - s) or 1000 s."""
    if time_input not in _TIME_INPUTS:
        raise ValueError(f"time_input must be one of {_TIME_INPUTS}, got {time_input!r}")
    t, s = as_time(t), as_time(s)
    second = t - s if time_input == "stride" else s
    return (1000.0 * t).float(), (1000.0 * second).float()


def c_in(t, config) -> torch.Tensor:
    """Input preconditioning c_in(t) = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)), float64."""
    interp = get_interpolant(config.interpolant)
    t = as_time(t)
    return 1.0 / (config.sigma_data * torch.sqrt(interp.alpha(t) ** 2 + interp.sigma(t) ** 2))


def flow_map_coefficients(s, t, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(s, t), c_out(s, t)) in float64 for f = c_skip x_t + c_out G (IMM Eq. (10))."""
    s, t = as_time(s), as_time(t)
    sd = config.sigma_data
    if config.parameterization == "euler_fm":
        return torch.ones_like(t * s), -(t - s) * sd
    interp = get_interpolant(config.interpolant)
    a_t, s_t, a_s, s_s = interp.alpha(t), interp.sigma(t), interp.alpha(s), interp.sigma(s)
    norm2 = a_t**2 + s_t**2
    c_skip = (a_t * a_s + s_t * s_s) / norm2
    c_out = -(a_s * s_t - a_t * s_s) * sd / torch.sqrt(norm2)
    return c_skip, c_out


def _batch_times(t, x: torch.Tensor) -> torch.Tensor:
    """Times as float64 (B,) on x's device (scalars are broadcast to the batch)."""
    t = as_time(t, x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"times must be scalars or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def network_output(net, x_t: torch.Tensor, t, s, cond, config) -> torch.Tensor:
    """G = net(c_in(t) x_t, t_in, s_in, cond); ``config`` needs sigma_data, interpolant, time_input."""
    t, s = _batch_times(t, x_t), _batch_times(s, x_t)
    t_in, s_in = time_inputs(t, s, config.time_input)
    return net(expand_like(c_in(t, config), x_t) * x_t, t_in, s_in, cond)


def flow_map(net, x_t: torch.Tensor, t, s, cond, config) -> torch.Tensor:
    """f_{s,t}(x_t) (IMM Eq. (10)); returns exactly x_t for items with s == t."""
    return _flow_map_and_output(net, x_t, t, s, cond, config)[0]


def _flow_map_and_output(net, x_t: torch.Tensor, t, s, cond, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_{s,t}(x_t), G): the flow map and the network output it was built from."""
    t, s = _batch_times(t, x_t), _batch_times(s, x_t)
    g = network_output(net, x_t, t, s, cond, config)
    c_skip, c_out = flow_map_coefficients(s, t, config)
    out = expand_like(c_skip, x_t) * x_t + expand_like(c_out, g) * g
    # The boundary condition f_{t,t} = id holds exactly, whatever G is (even non-finite).
    same = (s == t).reshape(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, ..., 1)
    return torch.where(same, x_t, out), g


def compute_r(s, t, config) -> torch.Tensor:
    """r(s, t): constant decrement in eta, IMM App. C.1, float64.

    r = max(s, min(t - delta, eta^{-1}(eta_t - (eta(T) - eta(eps)) / 2^k))).
    """
    interp = get_interpolant(config.interpolant)
    s, t = as_time(s), as_time(t)
    eta_min = float(interp.eta(config.eps))  # python floats: no device of their own (t may be on a GPU)
    step = (float(interp.eta(config.T)) - eta_min) / 2.0**config.k
    # Clamp below at eta_min: OT-FM's eta^{-1}(e) = e / (1 + e) is not monotone for e < -1.
    r = interp.eta_inv(torch.clamp_min(interp.eta(t) - step, eta_min))
    return torch.maximum(s, torch.minimum(t - config.delta, r))


def imm_weight(s, t, config) -> torch.Tensor:
    """w(s, t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2).

    IMM Eq. (13) with the ELBO-style weighting of App. C.5; lambda_t = 2 log(alpha_t / sigma_t).
    Depends on t only; ``s`` is accepted for the paper's signature. Float64.
    """
    del s
    interp = get_interpolant(config.interpolant)
    t = as_time(t)
    alpha, sigma = interp.alpha(t), interp.sigma(t)
    return (
        0.5
        * torch.sigmoid(config.b - interp.logsnr(t))
        * (-interp.dlogsnr_dt(t))
        * alpha**config.a
        / (alpha**2 + sigma**2)
    )


def kernel_weight(s, t, config) -> torch.Tensor:
    """w~(s, t) = 1 / |c_out(s, t)| (Euler-FM: 1 / ((t - s) sigma_d)), float64 (App. C.4)."""
    _, c_out = flow_map_coefficients(s, t, config)
    return 1.0 / c_out.abs()


def _laplace_kernel(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = exp(-w~ max(||a_i - b_j||, 1e-8) / D) for (G, M, D) inputs -> (G, M, M)."""
    dim = a.shape[-1]
    diff = a[:, :, None, :] - b[:, None, :, :]  # (G, M, M, D)
    # sqrt(max(|d|^2, 1e-16)) == max(|d|, 1e-8) and has a finite gradient on the diagonal.
    dist = diff.pow(2).sum(-1).clamp_min(_KERNEL_MIN_DIST**2).sqrt()  # (G, M, M)
    return torch.exp(-weight[:, None, None] * dist / dim)


def _gaussian_kernel(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = exp(-(w~ ||a_i - b_j|| / D)^2 / 2) for (G, M, D) inputs -> (G, M, M)."""
    dim = a.shape[-1]
    sq = (a[:, :, None, :] - b[:, None, :, :]).pow(2).sum(-1)  # (G, M, M)
    return torch.exp(-0.5 * (weight[:, None, None] / dim) ** 2 * sq)


_KERNELS = {"laplace": _laplace_kernel, "gaussian": _gaussian_kernel}


def group_mmd2(student: torch.Tensor, target: torch.Tensor, weight, kernel: str = "laplace") -> torch.Tensor:
    """Per-group V-statistic MMD^2 (IMM Eq. (12)) with the Laplace (the paper's) or Gaussian kernel.

    student, target: (G, M, D); weight: w~ per group, (G,) or scalar. Returns (G,).
    Computed in at least float32 whatever the input dtype.
    """
    if student.shape != target.shape or student.ndim != 3:
        raise ValueError(
            f"student and target must both be (G, M, D), got {tuple(student.shape)} and {tuple(target.shape)}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, target = student.to(dtype), target.to(dtype)
    weight = as_time(weight, student.device).to(dtype).expand(student.shape[0])
    k = _KERNELS[kernel]
    k_ss = k(student, student, weight).mean(dim=(1, 2))
    k_tt = k(target, target, weight).mean(dim=(1, 2))
    k_st = k(student, target, weight).mean(dim=(1, 2))
    return k_ss + k_tt - 2.0 * k_st


def draw(fn, shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """``fn`` (torch.rand / torch.randn) drawn on the generator's device, then moved to ``device``.

    A CPU generator can thus drive CUDA training and gives the same numbers on every device.
    """
    rng_device = generator.device if generator is not None else device
    return fn(shape, generator=generator, dtype=dtype, device=rng_device).to(device)


def _sample_group_times(num_groups: int, config: IMMConfig, generator, device):
    """t ~ U(eps, T) (shifted by ``time_shift``), s ~ U(eps, t), r = r(s, t) per group, float64 (IMM Alg. 1)."""
    u = draw(torch.rand, (2, num_groups), generator, device, torch.float64)
    t = config.eps + (config.T - config.eps) * shift_time(u[0], config.time_shift)
    s = config.eps + (t - config.eps) * u[1]
    return t, s, compute_r(s, t, config)


def _dropped_condition(cond, item_group: torch.Tensor, num_groups: int, p_uncond: float, generator, drop_cond,
                       device):
    """Classifier-free-guidance dropout, one Bernoulli per particle group: a group is a set of samples of one
    distribution, the conditional or the unconditional one, and its student and target branches see the same
    condition (IMM's conditional training replaces the label of a sample for both branches)."""
    if cond is None or p_uncond <= 0.0:
        return cond
    if drop_cond is None:
        raise ValueError("p_uncond > 0 with a condition needs drop_cond(cond, mask) from the caller")
    mask = (draw(torch.rand, (num_groups,), generator, device) < p_uncond)[item_group]  # (B,)
    return drop_cond(cond, mask) if bool(mask.any()) else cond


def _grouped_mmd2(student, target, t, s, num_particles: int, config):
    """MMD^2 per group of M consecutive items; a leftover of >= 2 forms one smaller group.

    student, target: (B, ...). t, s: per sampled group, (ceil(B / M),). Returns
    (mmd2 (G,), number of groups G, number of excluded items).
    """
    batch = student.shape[0]
    num_full, leftover = divmod(batch, num_particles)
    student = student.reshape(batch, -1)  # (B, D)
    target = target.reshape(batch, -1)  # (B, D)
    used = num_full * num_particles
    weight = kernel_weight(s, t, config)
    parts = []
    if num_full:
        shape = (num_full, num_particles, student.shape[1])  # (G, M, D)
        parts.append(
            group_mmd2(student[:used].reshape(shape), target[:used].reshape(shape), weight[:num_full], config.kernel)
        )
    if leftover >= 2:
        shape = (1, leftover, student.shape[1])  # (1, L, D): the smaller last group
        parts.append(
            group_mmd2(student[used:].reshape(shape), target[used:].reshape(shape), weight[num_full:], config.kernel)
        )
    excluded = leftover if leftover == 1 else 0
    mmd2 = torch.cat(parts)
    return mmd2, mmd2.shape[0], excluded


def condition_chunks(group_ids: torch.Tensor, num_particles: int) -> list[list[int]]:
    """Particle groups from per-item condition ids: items with the same id, in order, cut into chunks
    of at most ``num_particles``; an item alone with its condition is a chunk of one."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(int(g), []).append(i)
    return [items[k:k + num_particles] for items in members.values() for k in range(0, len(items), num_particles)]


def _chunked_mmd2(student, target, t, s, chunks: list[list[int]], config):
    """MMD^2 per chunk (variable sizes, batched per size), in chunk order: (num_chunks,)."""
    flat_s, flat_t = student.reshape(student.shape[0], -1), target.reshape(target.shape[0], -1)
    weight = kernel_weight(s, t, config)
    mmd2 = flat_s.new_zeros(len(chunks), dtype=torch.promote_types(flat_s.dtype, torch.float32))
    for size in sorted({len(c) for c in chunks}):
        which = [j for j, c in enumerate(chunks) if len(c) == size]
        index = torch.tensor([chunks[j] for j in which], device=student.device)  # (G_size, size)
        which_t = torch.tensor(which, device=student.device)
        mmd2 = mmd2.index_put((which_t,), group_mmd2(flat_s[index], flat_t[index], weight[which_t], config.kernel))
    return mmd2


def imm_loss(net, x: torch.Tensor, cond=None, *, config: IMMConfig, generator=None, drop_cond=None,
             group_ids: torch.Tensor | None = None):
    """IMM training loss (IMM Alg. 1, Eq. (12)-(13)); returns (scalar loss, diagnostics dict).

    Particle groups: without ``group_ids``, groups of ``config.num_particles`` consecutive items
    share (s, r, t) (the paper's recipe for exchangeable samples). With ``group_ids`` (B,) (one id
    per distinct condition, e.g. per prompt), only items of the same condition form a group (at most
    ``num_particles`` each, one (s, r, t) per group); an item whose condition no other item shares
    is a group of one, whose MMD^2 = 2 - 2 k(student, target). This is the MMD on the joint
    (condition, image) space with a delta kernel on the condition: samples drawn under different
    prompts are not samples of one distribution; mixing them matches their mixture and leaves the
    condition to the paired student/target terms (which, measured, was enough on a two-class toy).
    With ``config.fm_fraction > 0`` that share of groups gets s = r = t and the flow-matching loss
    fm_weight * mean (G - (eps - x) / sigma_d)^2 instead of MMD^2 (their MMD^2 is 0 and left out of
    the mean). ``net`` is called
    exactly twice: the student f_{s,t}(x_t) with gradient, then the target f_{s,r}(x_r) with the same
    weights under ``torch.no_grad`` (a stop-gradient, not an EMA); both see the same condition, dropped to
    the null one for a whole group with probability ``p_uncond`` through ``drop_cond``. Every draw uses
    ``generator``.

    Diagnostics: mean_t, mean_t_minus_r, frac_r_eq_s (floats over loss groups), mmd2 (detached
    (G,) tensor), num_groups, num_excluded (a leftover single item is excluded, but still passes
    through ``net`` so a packed condition keeps its rows).
    """
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    batch, m = x.shape[0], config.num_particles
    if group_ids is None and batch < min(2, m):
        raise ValueError(
            f"x has batch size {batch}: IMM needs at least 2 items to form a group (num_particles={m})"
        )
    device = x.device
    chunks = None
    if group_ids is not None:
        if group_ids.shape != (batch,):
            raise ValueError(f"group_ids must have shape ({batch},), got {tuple(group_ids.shape)}")
        chunks = condition_chunks(group_ids, m)
        t, s, r = _sample_group_times(len(chunks), config, generator, device)
        item_group = torch.empty(batch, dtype=torch.long)
        for j, c in enumerate(chunks):
            item_group[c] = j
        item_group = item_group.to(device)
    else:
        t, s, r = _sample_group_times(-(-batch // m), config, generator, device)
        item_group = torch.arange(batch, device=device) // m  # (B,): group index of each item
    fm_group = torch.zeros(t.shape[0], dtype=torch.bool, device=device)
    if config.fm_fraction > 0:  # drawn only when used: pure IMM keeps its random stream
        fm_group = draw(torch.rand, (t.shape[0],), generator, device) < config.fm_fraction
        s, r = torch.where(fm_group, t, s), torch.where(fm_group, t, r)
    t_b, s_b, r_b = t[item_group], s[item_group], r[item_group]
    noise = config.sigma_data * draw(torch.randn, x.shape, generator, device, x.dtype)
    interp = get_interpolant(config.interpolant)
    x_t = interp.interpolate(x, noise, t_b)  # same x and noise for both branches
    x_r = interp.interpolate(x, noise, r_b)

    cond = _dropped_condition(cond, item_group, t.shape[0], config.p_uncond, generator, drop_cond, device)
    student, g = _flow_map_and_output(net, x_t, t_b, s_b, cond, config)  # g: for the FM groups
    with torch.no_grad():
        target = flow_map(net, x_r, r_b, s_b, cond, config)

    if chunks is not None:
        mmd2, num_groups, excluded = _chunked_mmd2(student, target, t, s, chunks, config), len(chunks), 0
    else:
        mmd2, num_groups, excluded = _grouped_mmd2(student, target, t, s, m, config)
    fm_items = fm_group[item_group]  # (B,), before the groups are cut to those in the loss
    t, s, r, fm_group = t[:num_groups], s[:num_groups], r[:num_groups], fm_group[:num_groups]
    weight = imm_weight(s, t, config).to(device=device, dtype=mmd2.dtype)
    imm_groups = ~fm_group
    loss = (weight * mmd2)[imm_groups].sum() / imm_groups.sum().clamp_min(1)
    if bool(fm_items.any()):
        velocity = (noise - x) / config.sigma_data  # eps - x in units of sigma_d (flow_matching.py)
        fm_loss = (g[fm_items].float() - velocity[fm_items].float()).pow(2).mean()
        loss = loss + config.fm_weight * fm_loss
    diagnostics = {
        "mean_t": t.mean().item(),
        "mean_t_minus_r": (t - r).mean().item(),
        "mmd2": mmd2.detach(),
        "frac_r_eq_s": (r == s).double().mean().item(),
        "num_groups": num_groups,
        "num_excluded": excluded,
        "mean_group_size": batch / num_groups if chunks is not None else float(m),
        "frac_fm_groups": fm_group.double().mean().item(),
    }
    return loss, diagnostics
