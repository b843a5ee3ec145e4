"""Specification tests for mmgen.sampling: call counts, guidance, per-sample
seeding, restart noise, and convergence to analytic answers with exact oracle networks."""

import math

import pytest
import torch

from mmgen.objectives import FlowMatchingConfig, IMMConfig, get_interpolant
from mmgen.objectives.imm import c_in, flow_map_coefficients
from mmgen.sampling import euler, initial_noise, pushforward, restart, sample, time_grid

F64 = torch.float64
CONFIGS = {
    "euler_fm": IMMConfig(),
    "simple_edm_cosine": IMMConfig(parameterization="simple_edm", interpolant="cosine"),
}


def _decode_times(x_in, t_in, s_in, config):
    """Recover (x_t, t, s) from the network inputs (docs/design.md §7: the stride time input)."""
    t = t_in.double() / 1000
    s = t - s_in.double() / 1000
    x_t = x_in.double() / c_in(t, config).reshape(-1, *([1] * (x_in.ndim - 1)))
    return x_t, t, s


def gaussian_flow_map_oracle(mu, scale, config):
    """A net whose flow map is the exact probability-flow map for data ~ N(mu, scale^2 I).

    With x_t = alpha_t x + sigma_t eps, the marginal is N(alpha_t mu, std_t^2 I), std_t^2 =
    alpha_t^2 scale^2 + sigma_t^2 sigma_d^2, and the ODE map is affine:
    f_{s,t}(x_t) = alpha_s mu + std_s / std_t (x_t - alpha_t mu). scale = 0 is a point mass.
    G is solved from f = c_skip x_t + c_out G.
    """
    interp = get_interpolant(config.interpolant)

    def std(t):
        return torch.sqrt(interp.alpha(t) ** 2 * scale**2 + interp.sigma(t) ** 2 * config.sigma_data**2)

    def net(x_in, t_in, s_in, cond):
        x_t, t, s = _decode_times(x_in, t_in, s_in, config)
        col = (-1, *([1] * (x_in.ndim - 1)))
        mean_t, mean_s = interp.alpha(t).reshape(col) * mu, interp.alpha(s).reshape(col) * mu
        f = mean_s + (std(s) / std(t)).reshape(col) * (x_t - mean_t)
        c_skip, c_out = flow_map_coefficients(s, t, config)
        return ((f - c_skip.reshape(col) * x_t) / c_out.reshape(col)).to(x_in.dtype)

    return net


class CountingNet:
    """Wraps a net and records the condition of every call."""

    def __init__(self, inner):
        self.inner, self.conds = inner, []

    def __call__(self, x_in, t_in, s_in, cond):
        self.conds.append(cond)
        return self.inner(x_in, t_in, s_in, cond)


def _linear_net(x_in, t_in, s_in, cond):
    return 0.5 * x_in + 1e-4 * t_in[:, None]


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
@pytest.mark.parametrize("sampler", ["pushforward", "restart", "euler"])
def test_sampler_calls_network_once_per_step_and_twice_with_guidance(num_steps, sampler):
    noise = initial_noise((3, 2), torch.Generator().manual_seed(0))
    config = FlowMatchingConfig() if sampler == "euler" else IMMConfig()
    extra = {"generator": torch.Generator().manual_seed(1)} if sampler == "restart" else {}
    fn = {"pushforward": pushforward, "restart": restart, "euler": euler}[sampler]
    net = CountingNet(_linear_net)
    fn(net, noise, "c", num_steps=num_steps, config=config, **extra)
    assert net.conds == ["c"] * num_steps
    net = CountingNet(_linear_net)
    fn(net, noise, "c", num_steps=num_steps, config=config, guidance=3.0, null_cond="null", **extra)
    assert net.conds == ["c", "null"] * num_steps


def test_guidance_combines_conditional_and_unconditional_outputs():
    config = IMMConfig()
    noise = torch.zeros(2, 3)

    def net(x_in, t_in, s_in, cond):
        return torch.full_like(x_in, 1.0 if cond == "c" else -2.0)

    out = pushforward(net, noise, "c", num_steps=1, config=config, guidance=4.0, null_cond="null")
    guided = -2.0 + 4.0 * (1.0 - (-2.0))  # G(null) + w (G(c) - G(null)) = 10
    expected = -(config.T - config.eps) * config.sigma_data * guided  # f = x_T - (t - s) sigma_d G
    torch.testing.assert_close(out, torch.full((2, 3), expected))


def test_per_sample_noise_is_independent_of_batch_size():
    small = initial_noise((2, 5), [torch.Generator().manual_seed(i) for i in range(2)])
    large = initial_noise((6, 5), [torch.Generator().manual_seed(i) for i in range(6)])
    assert torch.equal(small, large[:2])
    assert not torch.equal(large[0], large[1])
    torch.testing.assert_close(large.std(), torch.tensor(0.5), atol=0.25, rtol=0)
    with pytest.raises(ValueError, match="generator"):
        initial_noise((3, 5), [torch.Generator().manual_seed(0)])


def test_per_sample_restart_result_is_independent_of_batch_size():
    config = IMMConfig()

    def run(batch):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(batch)]
        noise = initial_noise((batch, 4), gens)
        return restart(_linear_net, noise, num_steps=3, config=config, generator=gens)

    small, large = run(2), run(5)
    torch.testing.assert_close(small, large[:2], rtol=1e-6, atol=1e-7)


def test_restart_draws_fresh_noise_deterministically_from_the_generator():
    config = IMMConfig()
    seen = []

    def net(x_in, t_in, s_in, cond):
        seen.append((x_in.clone(), t_in.clone()))
        return torch.zeros_like(x_in)  # f = x_t: the jump to eps keeps x_t unchanged

    noise = initial_noise((4, 3), torch.Generator().manual_seed(0))
    out1 = restart(net, noise, num_steps=2, config=config, generator=torch.Generator().manual_seed(7))
    out2 = restart(net, noise, num_steps=2, config=config, generator=torch.Generator().manual_seed(7))
    out3 = restart(net, noise, num_steps=2, config=config, generator=torch.Generator().manual_seed(8))
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    # Second step starts from alpha_t1 x_eps + sigma_t1 eps' with eps' the generator's first draw.
    interp, t1 = get_interpolant("ot_fm"), time_grid(2, config)[1]
    x_eps = interp.sigma(config.T) * noise.double()  # the zero-G net maps x_T to itself
    fresh = initial_noise((4, 3), torch.Generator().manual_seed(7)).double()
    expected = interp.alpha(t1) * x_eps + interp.sigma(t1) * fresh
    x_t1 = seen[1][0].double() / c_in(t1, config)
    torch.testing.assert_close(x_t1, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fresh, noise.double())


def test_restart_renoises_the_flow_maps_clean_estimate_along_the_grid():
    """IMM Alg. 3 with a network whose output depends on x, t and s, followed by hand in float64 (OT-FM,
    Euler-FM): x_0 = T noise; each step jumps to eps = 0 with f_{0,t}(x_t) = x_t - t sigma_d G, and the next
    x_t = (1 - t) f + t sigma_d z with z the generator's next standard normal draw."""
    config, sd = IMMConfig(), 0.5
    grid = [0.994, 0.994 * 2 / 3, 0.994 / 3, 0.0]  # linspace(T, eps, 4) with T = 0.994, eps = 0

    def net(x_in, t_in, s_in, cond):  # t_in = 1000 t, s_in = 1000 (t - s) (stride time input)
        return torch.tanh(3 * x_in) * (1 + t_in[:, None] / 1000) - 0.7 * s_in[:, None] / 1000

    def jump_to_zero(x_t, t):
        x_in = x_t / (sd * math.sqrt((1 - t) ** 2 + t**2))  # c_in(t) x_t
        g = net(x_in, torch.full((x_t.shape[0],), 1000 * t), torch.full((x_t.shape[0],), 1000 * t), None)
        return x_t - t * sd * g

    noise = initial_noise((4, 3), torch.Generator().manual_seed(0), dtype=F64)
    out = restart(net, noise, num_steps=3, config=config, generator=torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    x_clean = jump_to_zero(grid[0] * noise, grid[0])
    for t in grid[1:-1]:
        x_t = (1 - t) * x_clean + t * sd * torch.randn((4, 3), generator=draws, dtype=F64)
        x_clean = jump_to_zero(x_t, t)
    torch.testing.assert_close(out, x_clean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_step_pushforward_of_a_point_mass_lands_on_it(name):
    config = CONFIGS[name]
    mu = torch.tensor([0.7, -0.3, 0.2], dtype=F64)
    net = gaussian_flow_map_oracle(mu, 0.0, config)
    noise = initial_noise((16, 3), torch.Generator().manual_seed(0), dtype=F64)
    out = pushforward(net, noise, num_steps=1, config=config)
    torch.testing.assert_close(out, mu.expand(16, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pushforward_with_exact_gaussian_flow_map_is_the_same_for_every_step_count(name):
    config = CONFIGS[name]
    mu, scale = torch.tensor([1.0, -0.5], dtype=F64), 0.3
    net = gaussian_flow_map_oracle(mu, scale, config)
    noise = initial_noise((512, 2), torch.Generator().manual_seed(1), dtype=F64)
    interp = get_interpolant(config.interpolant)
    x_T = interp.sigma(config.T) * noise
    std_T = math.sqrt(interp.alpha(config.T) ** 2 * scale**2 + interp.sigma(config.T) ** 2 * 0.25)
    expected = mu + scale / std_T * (x_T - interp.alpha(config.T) * mu)  # exact f_{0,T}(x_T)
    for num_steps in (1, 2, 4, 8):
        out = pushforward(net, noise, num_steps=num_steps, config=config)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(expected.mean(0), mu, rtol=0, atol=0.05)


def test_explicit_time_grid_is_used_and_validated():
    config = IMMConfig()
    seen = []

    def net(x_in, t_in, s_in, cond):
        seen.append((t_in.clone(), s_in.clone()))
        return torch.zeros_like(x_in)

    pushforward(net, torch.zeros(2, 2), num_steps=2, config=config, times=[0.9, 0.3, 0.0])
    torch.testing.assert_close(seen[0][0], torch.full((2,), 900.0))
    torch.testing.assert_close(seen[1][1], torch.full((2,), 300.0))  # stride 1000 (t - s)
    with pytest.raises(ValueError, match="times"):
        pushforward(net, torch.zeros(2, 2), num_steps=2, config=config, times=[0.3, 0.9, 0.0])
    with pytest.raises(ValueError, match="num_steps"):
        pushforward(net, torch.zeros(2, 2), num_steps=0, config=config)


def test_euler_converges_for_a_linear_velocity_oracle():
    """Data ~ N(0, c^2): the exact OT-FM velocity is linear, v = x_t (t sd^2 - (1 - t) c^2) / std_t^2,
    and integrating from x_1 = noise gives x_0 = c / sd * noise. Euler is first order."""
    config, scale = FlowMatchingConfig(), 0.2
    sd = config.sigma_data

    def net(x_in, t_in, s_in, cond):
        x_t, t, _ = _decode_times(x_in, t_in, s_in, config)
        var = (1 - t) ** 2 * scale**2 + t**2 * sd**2
        velocity = x_t * ((t * sd**2 - (1 - t) * scale**2) / var)[:, None]
        return velocity / sd  # sigma_d G is the velocity

    noise = initial_noise((64, 2), torch.Generator().manual_seed(3), dtype=F64)
    exact = scale / sd * noise
    errors = {
        n: (euler(net, noise, num_steps=n, config=config) - exact).abs().max().item() for n in (8, 32, 128)
    }
    assert errors[8] > errors[32] > errors[128]
    assert 3.5 < errors[32] / errors[128] < 4.5  # error ~ 1 / N: first order
    assert errors[128] < 1e-2


def test_sample_dispatches_by_objective_name():
    noise = initial_noise((3, 2), torch.Generator().manual_seed(0))
    imm = sample(_linear_net, noise, objective_name="imm", num_steps=2, config=IMMConfig())
    torch.testing.assert_close(imm, pushforward(_linear_net, noise, num_steps=2, config=IMMConfig()))
    fm_config = FlowMatchingConfig()
    fm = sample(_linear_net, noise, objective_name="flow_matching", num_steps=2, config=fm_config)
    torch.testing.assert_close(fm, euler(_linear_net, noise, num_steps=2, config=fm_config))
    gen = torch.Generator().manual_seed(5)
    rs = sample(
        _linear_net,
        noise,
        objective_name="imm",
        sampler="restart",
        num_steps=2,
        config=IMMConfig(),
        generator=gen,
    )
    assert rs.shape == noise.shape
    with pytest.raises(ValueError, match="objective_name"):
        sample(_linear_net, noise, objective_name="gan", num_steps=1, config=IMMConfig())


def test_time_shift_puts_the_default_grid_steps_near_noise():
    """The sampling grid follows the objective's time_shift: shift 3, 4 steps -> t = T, .9 T, .75 T, .5 T, 0."""
    seen = []

    def net(x_in, t_in, s_in, cond):
        seen.append(t_in[0].item() / 1000)
        return torch.zeros_like(x_in)

    config = IMMConfig(time_shift=3.0)
    pushforward(net, torch.zeros(2, 2), num_steps=4, config=config)
    torch.testing.assert_close(torch.tensor(seen, dtype=F64), config.T * torch.tensor([1, 0.9, 0.75, 0.5], dtype=F64),
                               rtol=0, atol=1e-5)
    seen.clear()
    pushforward(net, torch.zeros(2, 2), num_steps=4, config=IMMConfig())
    torch.testing.assert_close(torch.tensor(seen, dtype=F64), 0.994 * torch.tensor([1, 0.75, 0.5, 0.25], dtype=F64),
                               rtol=0, atol=1e-5)
