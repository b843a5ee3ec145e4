"""Specification tests for mmgen.objectives: golden values and properties of IMM
(Zhou, Ermon & Song, ICML 2025, arXiv 2503.07565) and the flow-matching baseline."""

import pytest
import torch

from mmgen.objectives import FlowMatchingConfig, IMMConfig, get_interpolant, get_objective
from mmgen.objectives.flow_matching import flow_matching_loss
from mmgen.objectives.imm import (
    c_in,
    compute_r,
    flow_map,
    group_mmd2,
    imm_loss,
    imm_weight,
    kernel_weight,
)

F64 = torch.float64

# Golden values at OT-FM, sigma_d = 0.5, eps = 0, T = 0.994, k = 12, s = t / 2.
GOLDEN_T = [0.05, 0.2, 0.5, 0.8, 0.95, 0.994]
GOLDEN_R_NO_DELTA = [0.025, 0.1732490076, 0.4896798040, 0.7983689677, 0.9498986802, 0.9939985436]
GOLDEN_R_DELTA = [0.025, 0.1732490076, 0.4896798040, 0.7983689677, 0.9498986802, 0.9939]
GOLDEN_W_A1 = [2.9032587150, 5.6865085749, 3.9280551602, 1.8361334218, 1.1630698072, 1.0181804018]
GOLDEN_W_A2 = [2.7580957792, 4.5492068599, 1.9640275801, 0.3672266844, 0.0581534904, 0.0061090824]
GOLDEN_KERNEL_W = [80.0, 20.0, 8.0, 5.0, 4.2105263158, 4.0241448692]


def _golden_times():
    t = torch.tensor(GOLDEN_T, dtype=F64)
    return t / 2, t


def _assert_rel(actual, expected, rel=1e-8):
    expected = torch.tensor(expected, dtype=F64)
    assert actual.dtype == F64
    torch.testing.assert_close(actual, expected, rtol=rel, atol=0.0)


def test_r_mapping_matches_golden_without_delta():
    s, t = _golden_times()
    _assert_rel(compute_r(s, t, IMMConfig(delta=0.0)), GOLDEN_R_NO_DELTA)


def test_r_mapping_matches_golden_with_delta():
    s, t = _golden_times()
    _assert_rel(compute_r(s, t, IMMConfig(delta=1e-4)), GOLDEN_R_DELTA)


@pytest.mark.parametrize("a, golden", [(1.0, GOLDEN_W_A1), (2.0, GOLDEN_W_A2)])
def test_weighting_matches_golden(a, golden):
    s, t = _golden_times()
    _assert_rel(imm_weight(s, t, IMMConfig(a=a, b=4.0)), golden)


def test_euler_fm_kernel_weight_is_one_over_stride_times_sigma_data():
    s, t = _golden_times()
    _assert_rel(kernel_weight(s, t, IMMConfig()), GOLDEN_KERNEL_W)


def _golden_mmd_sets():
    g = torch.arange(2, dtype=F64)[:, None, None]
    m = torch.arange(4, dtype=F64)[None, :, None]
    d = torch.arange(6, dtype=F64)[None, None, :]
    student = torch.sin(1 + g + 0.7 * m + 0.3 * d)  # (2, 4, 6)
    target = torch.cos(0.5 + 0.9 * g + 0.4 * m + 0.2 * d)  # (2, 4, 6)
    return student, target, torch.tensor([0.2, 0.1], dtype=F64), torch.tensor([0.9, 0.3], dtype=F64)


def test_group_mmd_and_losses_match_golden():
    student, target, s, t = _golden_mmd_sets()
    weight = kernel_weight(s, t, IMMConfig())
    _assert_rel(weight, [1 / 0.35, 10.0])
    mmd2 = group_mmd2(student, target, weight)
    _assert_rel(mmd2, [0.13309789423, 0.28245824012], rel=1e-9)
    loss_a1 = (imm_weight(s, t, IMMConfig(a=1.0)) * mmd2).mean()
    loss_a2 = (imm_weight(s, t, IMMConfig(a=2.0)) * mmd2).mean()
    _assert_rel(loss_a1, 0.8282174215, rel=1e-8)
    _assert_rel(loss_a2, 0.5256595914, rel=1e-8)


def test_mmd_of_a_set_with_itself_is_zero():
    student = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    mmd2 = group_mmd2(student, student.clone(), torch.tensor([1.0, 5.0, 50.0], dtype=F64))
    assert torch.equal(mmd2, torch.zeros(3, dtype=F64))
    other = group_mmd2(student, student + 0.1, torch.tensor([1.0, 5.0, 50.0], dtype=F64))
    assert (other > 0).all()


def test_gaussian_kernel_mmd_matches_its_formula():
    student, target, s, t = _golden_mmd_sets()
    weight = kernel_weight(s, t, IMMConfig())
    k = lambda a, b, w: torch.exp(-0.5 * (w * (a[:, None] - b[None]).norm(dim=-1) / a.shape[-1]) ** 2)
    expected = [
        k(a, a, w).mean() + k(b, b, w).mean() - 2 * k(a, b, w).mean() for a, b, w in zip(student, target, weight)
    ]
    _assert_rel(group_mmd2(student, target, weight, kernel="gaussian"), torch.stack(expected).tolist(), rel=1e-12)
    assert torch.equal(group_mmd2(student, student.clone(), weight, "gaussian"), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="kernel"):
        IMMConfig(kernel="cosine")


def test_paired_kernel_term_regresses_to_the_median_with_laplace_and_the_mean_with_gaussian():
    """Where student particle i meets the target made from its own (x, eps), 1 - k(a, y) is the loss of a
    regression of a on y: the Laplace kernel is linear in |a - y| near 0 (optimum: the median of y), the
    Gaussian quadratic (optimum: the mean), which is what a flow map's short jumps need."""
    y = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 6.0], dtype=F64)[:, None, None]  # mean 1.33, median 0.5
    weight = torch.tensor([0.05], dtype=F64)  # a wide kernel: both are in their small-distance regime
    best = {}
    for kernel in ("laplace", "gaussian"):
        a = torch.zeros(1, 1, 1, dtype=F64, requires_grad=True)
        opt = torch.optim.Adam([a], lr=0.05)
        for _ in range(800):
            # M = 1 groups: the V-statistic MMD^2 is 2 (1 - k(a, y))
            loss = torch.stack([group_mmd2(a, yi[None], weight, kernel) for yi in y]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        best[kernel] = float(a.detach())
    assert 0.0 <= best["laplace"] <= 1.0  # a median of y
    assert best["gaussian"] == pytest.approx(float(y.mean()), abs=0.05)


@pytest.mark.parametrize(
    "parameterization, interpolant",
    [("euler_fm", "ot_fm"), ("simple_edm", "ot_fm"), ("simple_edm", "cosine")],
)
def test_flow_map_at_equal_times_is_exactly_identity(parameterization, interpolant):
    config = IMMConfig(parameterization=parameterization, interpolant=interpolant)
    x = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.994], dtype=F64)
    junk = lambda x_in, t_in, s_in, cond: torch.full_like(x_in, float("nan"))
    assert torch.equal(flow_map(junk, x, t, t, None, config), x)
    s = t * 0.5
    assert torch.isnan(flow_map(junk, x, t, s, None, config)[1:]).all()


@pytest.mark.parametrize("name", ["ot_fm", "cosine"])
def test_ddim_is_self_consistent(name):
    interp = get_interpolant(name)
    gen = torch.Generator().manual_seed(2)
    x, x_t = torch.randn(4, 6, generator=gen, dtype=F64), torch.randn(4, 6, generator=gen, dtype=F64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.99], dtype=F64)
    r, s = 0.7 * t, 0.2 * t
    two_jumps = interp.ddim(interp.ddim(x_t, x, r, t), x, s, r)
    torch.testing.assert_close(two_jumps, interp.ddim(x_t, x, s, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ot_fm", "cosine"])
def test_ddim_from_x_t_gives_x_r_with_the_same_noise(name):
    interp = get_interpolant(name)
    gen = torch.Generator().manual_seed(3)
    x, noise = torch.randn(4, 6, generator=gen, dtype=F64), torch.randn(4, 6, generator=gen, dtype=F64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.99], dtype=F64)
    r = 0.6 * t
    x_t = interp.alpha(t)[:, None] * x + interp.sigma(t)[:, None] * noise
    expected = interp.alpha(r)[:, None] * x + interp.sigma(r)[:, None] * noise
    torch.testing.assert_close(interp.ddim(x_t, x, r, t), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ot_fm", "cosine"])
def test_eta_inverse_and_logsnr_derivative(name):
    interp = get_interpolant(name)
    t = torch.linspace(0.01, 0.99, 17, dtype=F64)
    torch.testing.assert_close(interp.eta_inv(interp.eta(t)), t, rtol=1e-12, atol=1e-12)
    h = 1e-6
    numeric = (interp.logsnr(t + h) - interp.logsnr(t - h)) / (2 * h)
    torch.testing.assert_close(interp.dlogsnr_dt(t), numeric, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("delta", [0.0, 1e-4])
@pytest.mark.parametrize("interpolant, parameterization", [("ot_fm", "euler_fm"), ("cosine", "simple_edm")])
def test_r_lies_in_s_to_t(delta, interpolant, parameterization):
    config = IMMConfig(delta=delta, interpolant=interpolant, parameterization=parameterization)
    gen = torch.Generator().manual_seed(4)
    t = config.T * torch.rand(2000, generator=gen, dtype=F64)
    s = t * torch.rand(2000, generator=gen, dtype=F64)
    r = compute_r(s, t, config)
    assert (r >= s).all() and (r < t).all()
    assert (r == s).any() and (r > s).any()  # both branches of the max are exercised


class RecordingNet(torch.nn.Module):
    """A tiny parametric net that records every call's inputs and grad mode."""

    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim + 2, dim)
        self.calls = []

    def forward(self, x_in, t_in, s_in, cond):
        flat = x_in.reshape(x_in.shape[0], -1)  # (B, D)
        times = torch.stack([t_in, s_in], dim=1) / 1000  # (B, 2)
        out = self.lin(torch.cat([flat, times.to(flat.dtype)], dim=1)).reshape(x_in.shape)
        record = {"x_in": x_in.detach(), "t_in": t_in, "s_in": s_in, "cond": cond}
        self.calls.append({**record, "grad": torch.is_grad_enabled(), "out": out})
        return out


def _batch(b=8, shape=(2, 3), seed=0):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed))


def test_imm_calls_net_twice_and_no_gradient_reaches_the_target():
    torch.manual_seed(0)
    net, x = RecordingNet(6), _batch()
    loss, _ = imm_loss(net, x, config=IMMConfig(), generator=torch.Generator().manual_seed(0))
    assert len(net.calls) == 2
    student, target = net.calls
    assert student["grad"] and student["out"].requires_grad
    assert not target["grad"] and not target["out"].requires_grad
    # The target is the same network at (r, s): same s, earlier first time.
    assert (target["t_in"] < student["t_in"]).all()
    torch.testing.assert_close(student["t_in"] - student["s_in"], target["t_in"] - target["s_in"])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_imm_groups_share_times_and_both_branches_use_the_same_noise():
    net, x = RecordingNet(6), _batch(b=8)
    config = IMMConfig(num_particles=4)
    imm_loss(net, x, config=config, generator=torch.Generator().manual_seed(5))
    student, target = net.calls
    t = student["t_in"].double() / 1000
    assert torch.equal(t[:4], t[:1].expand(4)) and torch.equal(t[4:], t[4:5].expand(4))
    assert t[0] != t[4]
    r = target["t_in"].double() / 1000
    interp = get_interpolant("ot_fm")
    # x_in = c_in(t) x_t; recover the noise from each branch: eps = (x_t - alpha x) / sigma.
    x_t = student["x_in"].double() / c_in(t, config)[:, None, None]
    x_r = target["x_in"].double() / c_in(r, config)[:, None, None]
    noise_t = (x_t - interp.alpha(t)[:, None, None] * x) / interp.sigma(t)[:, None, None]
    noise_r = (x_r - interp.alpha(r)[:, None, None] * x) / interp.sigma(r)[:, None, None]
    torch.testing.assert_close(noise_t, noise_r, rtol=1e-3, atol=1e-4)
    assert 0.3 < noise_t.std().item() < 0.7  # eps ~ N(0, sigma_d^2), sigma_d = 0.5


def test_imm_loss_is_deterministic_given_the_generator():
    net, x = RecordingNet(6), _batch()
    l1, d1 = imm_loss(net, x, config=IMMConfig(), generator=torch.Generator().manual_seed(7))
    l2, d2 = imm_loss(net, x, config=IMMConfig(), generator=torch.Generator().manual_seed(7))
    l3, _ = imm_loss(net, x, config=IMMConfig(), generator=torch.Generator().manual_seed(8))
    assert torch.equal(l1, l2) and torch.equal(d1["mmd2"], d2["mmd2"])
    assert not torch.equal(l1, l3)


@pytest.mark.parametrize("num_particles", [2, 4, 8])
def test_imm_loss_is_finite_for_several_group_sizes(num_particles):
    net, x = RecordingNet(6), _batch(b=16)
    config = IMMConfig(num_particles=num_particles)
    loss, diag = imm_loss(net, x, config=config, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert diag["num_groups"] == 16 // num_particles and diag["mmd2"].shape == (16 // num_particles,)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_imm_loss_is_finite_near_T():
    net, x = RecordingNet(6), _batch(b=8)
    config = IMMConfig(eps=0.9935, T=0.994)  # t, s, r all within 5e-4 of T
    loss, diag = imm_loss(net, x, config=config, generator=torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss)
    assert 0.9935 <= diag["mean_t"] <= 0.994
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_leftover_items_form_a_smaller_group():
    net, x = RecordingNet(6), _batch(b=10)
    _, diag = imm_loss(net, x, config=IMMConfig(num_particles=4), generator=torch.Generator().manual_seed(0))
    assert diag["num_groups"] == 3 and diag["num_excluded"] == 0
    t = net.calls[0]["t_in"]
    assert torch.equal(t[8:], t[8:9].expand(2)) and t[8] != t[4]


def test_a_single_leftover_item_is_excluded_and_counted():
    net, x = RecordingNet(6), _batch(b=9)
    loss, diag = imm_loss(
        net, x, config=IMMConfig(num_particles=4), generator=torch.Generator().manual_seed(0)
    )
    assert diag["num_groups"] == 2 and diag["num_excluded"] == 1
    assert net.calls[0]["x_in"].shape[0] == 9  # the excluded item still goes through the net
    assert loss.ndim == 0 and torch.isfinite(loss)
    # The excluded item does not influence the loss (the net treats items independently).
    x_moved = x.clone()
    x_moved[8] += 100.0
    moved, _ = imm_loss(
        net, x_moved, config=IMMConfig(num_particles=4), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(moved, loss)
    x_moved[7] += 1.0
    moved, _ = imm_loss(
        net, x_moved, config=IMMConfig(num_particles=4), generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(moved, loss)


def test_batch_too_small_for_any_group_is_an_error():
    with pytest.raises(ValueError, match="batch size 1"):
        imm_loss(RecordingNet(6), _batch(b=1), config=IMMConfig())


def test_condition_dropout_drops_whole_groups_for_both_branches():
    """A dropped particle group is a sample of the unconditional distribution: its student and its target
    both see the null condition, and the groups' other members are never mixed with conditional ones."""
    net, x = RecordingNet(6), _batch(b=16)
    cond = torch.arange(16)
    seen = []

    def drop_cond(c, mask):
        seen.append(mask.clone())
        return torch.where(mask, torch.full_like(c, -1), c)

    config = IMMConfig(p_uncond=0.5, num_particles=4)
    imm_loss(net, x, cond, config=config, generator=torch.Generator().manual_seed(0), drop_cond=drop_cond)
    student, target = net.calls
    (mask,) = seen
    assert 0 < mask.sum() < 16
    groups = mask.reshape(4, 4)  # consecutive groups of M = 4
    assert (groups.all(1) | ~groups.any(1)).all()  # all or none of a group
    assert torch.equal(student["cond"], torch.where(mask, -1, cond))
    assert torch.equal(target["cond"], student["cond"])
    with pytest.raises(ValueError, match="drop_cond"):
        imm_loss(net, x, cond, config=config)


def test_diagnostics_report_times_and_r_equal_s_fraction():
    net, x = RecordingNet(6), _batch(b=16)
    _, diag = imm_loss(
        net, x, config=IMMConfig(num_particles=2, k=0), generator=torch.Generator().manual_seed(0)
    )
    # k = 0 makes the eta decrement the whole range, so r collapses to s for every group.
    assert diag["frac_r_eq_s"] == 1.0
    assert 0 < diag["mean_t_minus_r"] < diag["mean_t"] < 0.994
    _, diag = imm_loss(
        net, x, config=IMMConfig(num_particles=2, k=20), generator=torch.Generator().manual_seed(0)
    )
    assert diag["frac_r_eq_s"] == 0.0 and diag["mean_t_minus_r"] < 1e-3


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="euler_fm"):
        IMMConfig(interpolant="cosine", parameterization="euler_fm")
    with pytest.raises(ValueError, match="time_input"):
        IMMConfig(time_input="half")
    with pytest.raises(ValueError, match="num_particles"):
        IMMConfig(num_particles=0)
    with pytest.raises(ValueError, match="interpolant"):
        get_interpolant("linear")


def test_get_objective_binds_config_and_rejects_unknown_fields():
    loss_fn, config = get_objective("imm", num_particles=2, a=1.0)
    assert isinstance(config, IMMConfig) and config.num_particles == 2 and config.a == 1.0
    net = RecordingNet(6)
    loss, diag = loss_fn(net, _batch(b=4), generator=torch.Generator().manual_seed(0))
    assert diag["num_groups"] == 2 and torch.isfinite(loss)
    _, fm_config = get_objective("flow_matching", time_sampling="logit_normal")
    assert isinstance(fm_config, FlowMatchingConfig)
    with pytest.raises(ValueError, match="num_particle"):
        get_objective("imm", num_particle=2)
    with pytest.raises(ValueError, match="objective name"):
        get_objective("gan")


def test_flow_matching_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
    """For data = mu, eps = (x_t - (1 - t) mu) / t, so the exact v-target eps - mu is known."""
    config = FlowMatchingConfig()
    mu = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    calls = []

    def oracle(x_in, t_in, s_in, cond):
        calls.append(s_in)
        t = t_in.double() / 1000
        x_t = x_in / c_in(t, config)[:, None]
        noise = (x_t - (1 - t)[:, None] * mu) / t[:, None]
        return (noise - mu) / config.sigma_data

    x = mu.expand(64, 3).clone()
    loss, _ = flow_matching_loss(oracle, x, config=config, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and torch.equal(calls[0], torch.zeros(64))  # stride s_in = 1000 (t - t)
    assert loss < 1e-6
    wrong = lambda x_in, t_in, s_in, cond: -oracle(x_in, t_in, s_in, cond)
    bad, _ = flow_matching_loss(wrong, x, config=config, generator=torch.Generator().manual_seed(0))
    assert bad > 1.0


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_flow_matching_times_lie_in_unit_interval(time_sampling):
    config = FlowMatchingConfig(time_sampling=time_sampling)
    net = RecordingNet(6)
    loss, diag = flow_matching_loss(
        net, _batch(b=256), config=config, generator=torch.Generator().manual_seed(0)
    )
    t = net.calls[0]["t_in"] / 1000
    assert (t > 0).all() and (t < 1).all() and torch.isfinite(loss)
    assert abs(diag["mean_t"] - 0.5) < 0.06
    spread = t.std().item()
    assert (spread < 0.25) if time_sampling == "logit_normal" else (spread > 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_imm_loss_on_image_shaped_low_precision_batches(dtype):
    """(B, C, H, W) items in bf16: times stay float64, the MMD is computed in float32."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).to(dtype)
    net = lambda x_in, t_in, s_in, cond: conv(x_in) + (s_in / 1000).to(dtype)[:, None, None, None]
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    loss, diag = imm_loss(net, x, config=IMMConfig(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    assert diag["mmd2"].shape == (2,)
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


def test_simple_edm_cosine_loss_is_finite_and_identity_time_input_passes_s():
    net, x = RecordingNet(6), _batch(b=8)
    config = IMMConfig(parameterization="simple_edm", interpolant="cosine", time_input="identity")
    loss, _ = imm_loss(net, x, config=config, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    student, target = net.calls
    assert torch.equal(student["s_in"], target["s_in"])  # identity: 1000 s, shared by both branches
    assert (student["s_in"] < student["t_in"]).all() and (student["s_in"] >= 0).all()


def test_flow_matching_groups_regress_the_velocity_at_s_equal_t():
    """fm_fraction = 1: every group is a flow-matching group, so the loss is fm_weight times the FM
    regression of G(x_t, t, t) onto (eps - x) / sigma_d, with eps recovered from the student input."""
    net, x = RecordingNet(6), _batch(b=8)
    config = IMMConfig(num_particles=4, fm_fraction=1.0, fm_weight=0.3)
    loss, diag = imm_loss(net, x, config=config, generator=torch.Generator().manual_seed(3))
    student = net.calls[0]
    assert torch.all(student["s_in"] == 0) and diag["frac_fm_groups"] == 1.0  # stride t - s = 0
    t = student["t_in"].double() / 1000
    interp = get_interpolant("ot_fm")
    x_t = student["x_in"].double() / c_in(t, config)[:, None, None]
    eps = (x_t - interp.alpha(t)[:, None, None] * x) / interp.sigma(t)[:, None, None]
    expected = 0.3 * (student["out"].double() - (eps - x) / config.sigma_data).pow(2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=1e-5)
    loss.backward()  # the regression reaches the network
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def _ot_fm_imm_weight(t, a=2.0, b=4.0):
    """IMM Eq. (13) with App. C.5 for OT-FM by hand: alpha = 1 - t, sigma = t, lambda = 2 log((1 - t) / t),
    -d lambda / dt = 2 / (t (1 - t))."""
    lam = 2 * torch.log((1 - t) / t)
    return 0.5 * torch.sigmoid(b - lam) * 2 / (t * (1 - t)) * (1 - t) ** a / ((1 - t) ** 2 + t**2)


def _laplace_mmd2(student, target, w, dim):
    """V-statistic MMD^2 of two (M, D) sets with k(a, b) = exp(-w ||a - b|| / D) (IMM Eq. (12), App. C.4)."""
    def k(a, b):
        return torch.exp(-w * torch.cdist(a, b) / dim).mean()

    return k(student, student) + k(target, target) - 2 * k(student, target)


def test_mixed_groups_average_mmd_over_the_imm_groups_and_add_the_flow_matching_term():
    """fm_fraction = 0.5 (the default config's): the IMM term is the mean of w(s, t) MMD^2 over the IMM
    groups only (the flow-matching groups' MMD^2 is 0 and left out of the mean), plus fm_weight times the
    velocity regression over the flow-matching groups' items. Reference rebuilt from the recorded network
    calls with the OT-FM / Euler-FM formulas written out here."""
    torch.manual_seed(0)
    net, x = RecordingNet(6), _batch(b=8)
    sd, m = 0.5, 2
    config = IMMConfig(num_particles=m, fm_fraction=0.5, fm_weight=0.3, sigma_data=sd)
    loss, diag = imm_loss(net, x, config=config, generator=torch.Generator().manual_seed(9))
    assert diag["frac_fm_groups"] == 0.5  # this seed draws two IMM and two flow-matching groups
    student, target = net.calls
    t = student["t_in"].double() / 1000
    s = t - student["s_in"].double() / 1000  # stride time input: s_in = 1000 (t - s)
    r = target["t_in"].double() / 1000

    def decoded(call, time):  # x_in = c_in x_t, c_in = 1 / (sigma_d sqrt(alpha^2 + sigma^2))
        return call["x_in"].double() * (sd * torch.sqrt((1 - time) ** 2 + time**2))[:, None, None]

    x_t, x_r = decoded(student, t), decoded(target, r)
    g_t, g_r = student["out"].detach().double(), target["out"].double()
    f_student = x_t - ((t - s) * sd)[:, None, None] * g_t  # Euler-FM flow map, IMM App. C.3
    f_target = x_r - ((r - s) * sd)[:, None, None] * g_r
    imm_terms, fm_items = [], []
    for group in range(0, 8, m):
        items = slice(group, group + m)
        if s[group] == t[group]:
            fm_items.append(items)
            continue
        mmd2 = _laplace_mmd2(f_student[items].reshape(m, -1), f_target[items].reshape(m, -1),
                             1 / ((t[group] - s[group]) * sd), 6)
        imm_terms.append(_ot_fm_imm_weight(t[group]) * mmd2)
    assert len(imm_terms) == 2 and len(fm_items) == 2
    eps = torch.cat([((x_t - (1 - t)[:, None, None] * x.double()) / t[:, None, None])[i] for i in fm_items])
    velocity = (eps - torch.cat([x.double()[i] for i in fm_items])) / sd
    fm = (torch.cat([g_t[i] for i in fm_items]) - velocity).pow(2).mean()
    imm = sum(imm_terms) / len(imm_terms)
    assert imm > 0.1 * 0.3 * fm  # the IMM term is not negligible beside the flow-matching one
    torch.testing.assert_close(loss.double(), imm + 0.3 * fm, rtol=1e-4, atol=0.0)


def test_flow_matching_groups_need_the_euler_parameterisation():
    with pytest.raises(ValueError, match="euler_fm"):
        IMMConfig(fm_fraction=0.5, parameterization="simple_edm", interpolant="cosine")
    with pytest.raises(ValueError, match="fm_fraction"):
        IMMConfig(fm_fraction=1.5)


@pytest.mark.parametrize("objective", ["imm", "flow_matching"])
def test_time_shift_moves_training_times_toward_noise(objective):
    """SD3's shift (arXiv 2403.03206): shift 3 maps the median u = 0.5 to t = 0.75; shift 1 is the paper's."""
    times = {}
    for shift in (1.0, 3.0):
        loss_fn, config = get_objective(objective, time_shift=shift, **({"num_particles": 2} if objective == "imm" else {}))
        net = RecordingNet(6)
        loss, _ = loss_fn(net, _batch(b=512), generator=torch.Generator().manual_seed(0))
        times[shift] = net.calls[0]["t_in"].double() / 1000
        assert torch.isfinite(loss) and (times[shift] >= 0).all() and (times[shift] <= config.T).all()
    assert abs(times[1.0].median().item() - 0.5) < 0.08
    assert abs(times[3.0].median().item() - 0.75) < 0.08
    with pytest.raises(ValueError, match="time_shift"):
        get_objective(objective, time_shift=0.0)
