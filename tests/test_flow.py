import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowopd.flow import (cps_step, euler_step, interpolate, ode_sample, sde_sample, sde_step,
                          sigma_grid, step_kl, velocity_target)


def dims(t):
    return tuple(range(1, t.ndim))


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (10, 1.0), (10, 3.0), (28, 3.0), (40, 3.0), (7, 2.5)])
def test_sigma_grid_matches_diffusers(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    grid = sigma_grid(steps, shift)
    assert grid.shape == (steps + 1,) and grid.dtype == torch.float32
    assert torch.equal(grid, scheduler.sigmas)


def test_sigma_grid_shape_and_shift():
    grid = sigma_grid(10, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0
    assert (grid[1:] < grid[:-1]).all()
    # diffusers also shifts the grid's end point, so compare shifted vs plain where it is ~0
    shifted, plain = sigma_grid(10, 3.0, num_train_timesteps=10**7), sigma_grid(10, num_train_timesteps=10**7)
    assert torch.allclose(shifted[:-1], 3 * plain[:-1] / (1 + 2 * plain[:-1]), atol=1e-5)
    # shift=1 with one "training timestep" per step is the uniform grid
    assert torch.allclose(sigma_grid(4, num_train_timesteps=4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


# ----------------------------------------------------------------------------- interpolation


def test_interpolate_endpoints_and_per_sample_sigma():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(interpolate(x0, noise, 1.0), noise)
    assert torch.equal(interpolate(x0, noise, 0.0), x0)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x = interpolate(x0, noise, sigma)
    for i in range(3):
        assert torch.allclose(x[i], (1 - sigma[i]) * x0[i] + sigma[i] * noise[i])


def test_velocity_is_derivative_of_interpolation():
    x0, noise = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    h = 1e-6
    fd = (interpolate(x0, noise, 0.4 + h) - interpolate(x0, noise, 0.4 - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, noise), atol=1e-8)


# ----------------------------------------------------------------------------- Euler / ODE


def test_constant_velocity_integrates_exactly():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    v = velocity_target(x0, noise)
    sigmas = sigma_grid(7, shift=3.0)
    x = noise
    for i in range(7):  # every Euler state lies on the straight path
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert torch.allclose(x, interpolate(x0, noise, sigmas[i + 1]), atol=1e-5)
    calls = []
    out = ode_sample(lambda x, s: calls.append(s) or v, noise, sigmas)
    assert torch.allclose(out, x0, atol=1e-5)
    assert len(calls) == 7 and calls[0].shape == (4,) and torch.equal(calls[3], sigmas[3].expand(4))


# ----------------------------------------------------------------------------- SDE step


def test_sde_step_hand_example():
    # sigma=0.5 -> 0.25, a=0.7: std=0.7, mean = 0.8775 x - 0.31125 v, step std = 0.7 * 0.5
    # sigma=1 -> 0.75: std = 0.7 * sqrt(1 / (1 - 0.75)) = 1.4, mean = 0.755 x - 0.25 v, step std = 0.7
    x, v = torch.ones(2, 1), 2 * torch.ones(2, 1)
    out = sde_step(x, v, torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.75]), 0.7, eps=torch.zeros(2, 1))
    assert torch.allclose(out.mean, torch.tensor([[0.255], [0.255]]))
    assert torch.allclose(out.std.flatten(), torch.tensor([0.35, 0.7]))
    assert torch.equal(out.sample, out.mean)


def test_sde_step_without_noise_is_euler():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    out = sde_step(x, v, 0.6, 0.4, noise_level=0.0)
    assert torch.allclose(out.mean, euler_step(x, v, 0.6, 0.4))


@pytest.mark.parametrize("step", [sde_step, cps_step])
def test_step_log_prob_matches_torch_normal(step):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.9, 0.6, 0.3, 0.1])
    out = step(x, v, sigma, sigma_next, 0.7, generator=g)
    ref = Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.sample).mean(dims(x))
    assert out.log_prob.shape == (4,)
    assert torch.allclose(out.log_prob, ref, atol=1e-5)


@pytest.mark.parametrize("step", [sde_step, cps_step])
def test_log_prob_recomputed_from_prev_sample(step):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    out = step(x, v, 0.7, 0.5, generator=g)
    again = step(x, v, 0.7, 0.5, prev_sample=out.sample)
    assert torch.equal(again.sample, out.sample)
    assert torch.allclose(again.log_prob, out.log_prob, atol=1e-6)
    other = step(x, v + 0.1, 0.7, 0.5, prev_sample=out.sample)  # another policy: another log-prob
    assert not torch.allclose(other.log_prob, out.log_prob, atol=1e-3)
    # the log-prob is differentiable in the velocity (policy gradient needs it)
    v = v.clone().requires_grad_()
    step(x, v, 0.7, 0.5, prev_sample=out.sample).log_prob.sum().backward()
    assert v.grad.abs().sum() > 0


def test_eps_fixes_the_noise():
    x, v, eps = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6)
    out = sde_step(x, v, 0.5, 0.4, eps=eps)
    assert torch.allclose(out.sample, out.mean + out.std * eps)


# ----------------------------------------------------------------------------- CPS


def test_cps_preserves_marginal_coefficients():
    # one data point x0: the exact velocity at x = (1-s) x0 + s n is n - x0, so x_next must be
    # distributed as (1 - s_next) x0 + s_next * N(0, 1) exactly
    g = torch.Generator().manual_seed(2)
    sigma, sigma_next, x0 = 0.8, 0.5, 0.3
    n = torch.randn(1, 400_000, generator=g, dtype=torch.float64)
    x = (1 - sigma) * x0 + sigma * n
    out = cps_step(x, n - x0, sigma, sigma_next, noise_level=0.7, generator=g)
    assert math.isclose(out.std.item(), sigma_next * math.sin(0.7 * math.pi / 2), rel_tol=1e-12)
    centered = out.sample - (1 - sigma_next) * x0
    assert abs(centered.mean().item()) < 5e-3
    assert math.isclose(centered.var().item(), sigma_next**2, rel_tol=1e-2)


def test_cps_last_step_is_deterministic():
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    out = cps_step(x, v, 0.1, 0.0)
    assert torch.allclose(out.sample, x - 0.1 * v)
    assert torch.equal(out.log_prob, torch.zeros(2))


# ----------------------------------------------------------------------------- KL


def test_step_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(3)
    ma, mb = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    dt = torch.tensor([-0.1, -0.2, -0.05])
    step_std = torch.tensor([0.3, 0.5, 0.2]).view(3, 1, 1, 1)
    # exact: full-Gaussian KL divided by the number of dims (= mean over dims of per-dim KLs)
    std = step_std.expand_as(ma)
    ref = kl_divergence(Normal(ma, std), Normal(mb, std)).mean(dims(ma))
    assert torch.allclose(step_kl(ma, mb, step_std), ref, atol=1e-5)
    assert torch.allclose(step_kl(ma, mb, step_std.flatten()), ref, atol=1e-5)  # (B,) std also works
    # flow_grpo: same, with the formula std  step_std / sqrt(-dt)  =>  (-dt) * exact
    std_formula = (step_std / torch.sqrt(-dt).view(3, 1, 1, 1)).expand_as(ma)
    ref_fg = kl_divergence(Normal(ma, std_formula), Normal(mb, std_formula)).mean(dims(ma))
    fg = step_kl(ma, mb, step_std, dt=dt, normalization="flow_grpo")
    assert torch.allclose(fg, ref_fg, atol=1e-5)
    assert torch.allclose(fg, -dt * ref, atol=1e-6)
    with pytest.raises(ValueError):
        step_kl(ma, mb, step_std, normalization="flow_grpo")
    with pytest.raises(ValueError):
        step_kl(ma, mb, step_std, normalization="sum")


def test_step_kl_of_sde_means_in_velocity_form():
    # DESIGN: KL = (1 + std^2 (1-sigma)/(2 sigma))^2 (-dt) ||v_s - v_t||^2 / (2 std^2), per dim
    x, vs, vt = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    s, t = sde_step(x, vs, sigma, sigma_next, a), sde_step(x, vt, sigma, sigma_next, a)
    std2 = a**2 * sigma / (1 - sigma)
    expected = (1 + std2 * (1 - sigma) / (2 * sigma)) ** 2 * (sigma - sigma_next) * ((vs - vt) ** 2).mean(1) / (2 * std2)
    assert torch.allclose(step_kl(s.mean, t.mean, s.std), expected, rtol=1e-5)
    assert torch.equal(step_kl(s.mean, s.mean, s.std), torch.zeros(2))


# ----------------------------------------------------------------------------- SDE loop


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_sde_sample_records_states_and_log_probs(method):
    w = torch.randn(3, 3)
    velocity_fn = lambda x, s: x @ w * s.view(-1, 1)  # noqa: E731
    noise, sigmas = torch.randn(5, 3), sigma_grid(6, shift=3.0)
    traj = sde_sample(velocity_fn, noise, sigmas, generator=torch.Generator().manual_seed(4), method=method)
    assert traj.xs.shape == (5, 7, 3) and traj.log_probs.shape == (5, 6)
    assert torch.equal(traj.xs[:, 0], noise)
    step = sde_step if method == "sde" else cps_step
    for i in range(6):  # recomputing each stored transition gives the recorded log-prob
        x = traj.xs[:, i]
        lp = step(x, velocity_fn(x, sigmas[i].expand(5)), sigmas[i], sigmas[i + 1], prev_sample=traj.xs[:, i + 1]).log_prob
        assert torch.allclose(lp, traj.log_probs[:, i], atol=1e-5)
    again = sde_sample(velocity_fn, noise, sigmas, generator=torch.Generator().manual_seed(4), method=method)
    assert torch.equal(again.xs, traj.xs)
