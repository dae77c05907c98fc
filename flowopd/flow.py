"""Flow-matching math: noise grids, interpolation, Euler / SDE / CPS steps, per-step KL.

Conventions (DESIGN.md section 2). The noise level `sigma` runs from 1 (pure noise) to
0 (data), as in diffusers and SD3:

    x_sigma = (1 - sigma) * x0 + sigma * noise        v = noise - x0
    Euler:  x_next = x + (sigma_next - sigma) * v     dt = sigma_next - sigma < 0

Everything here is a pure function of tensors and numbers. Sampling math runs in float32
(float64 inputs stay float64, which the gradient tests use). `sigma` arguments may be
python floats, 0-d tensors, or per-sample tensors of shape (B,).
"""

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor


def _dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(s, x: Tensor) -> Tensor:
    """float, 0-d or (B,) -> tensor that broadcasts against x (B, ...): () or (B, 1, ..., 1)."""
    s = torch.as_tensor(s, dtype=_dtype(x), device=x.device)
    if s.ndim == 1:
        s = s.view(-1, *([1] * (x.ndim - 1)))
    return s


def _mean_over_dims(t: Tensor) -> Tensor:
    """(B, ...) -> (B,): mean over every non-batch dimension."""
    return t.mean(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t


# ----------------------------------------------------------------------------- grid


def time_shift(s, shift: float):
    """The static time shift of SD3 / diffusers: shift * s / (1 + (shift - 1) * s); maps [0, 1] onto
    itself, toward 1 (high noise) for shift > 1. s: float or tensor."""
    return shift * s / (1 + (shift - 1) * s)


def sigma_grid(num_steps: int, shift: float = 1.0, device=None, num_train_timesteps: int = 1000) -> Tensor:
    """Noise levels of an N-step sampler, (N+1,) float32, from 1 down to a trailing 0.

    Identical to diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N).sigmas`
    (static shift, no Karras/exponential/beta variants):

        shifted(s)  = time_shift(s, shift) = shift * s / (1 + (shift - 1) * s)
        sigma_min   = shifted(1 / num_train_timesteps)       # last value of the training grid, float32
        s_i         = linspace(1, sigma_min, N)               # float64
        sigmas      = [shifted(s_0), ..., shifted(s_{N-1}), 0]

    Note the last non-zero value is shifted(sigma_min), not shifted(1/N) (diffusers applies the
    shift to sigma_min twice). With shift=1 and num_train_timesteps=num_steps the grid is the
    uniform one, linspace(1, 0, N+1).
    """
    T = num_train_timesteps
    sigma_min = time_shift(torch.tensor(1.0 / T, dtype=torch.float32), shift).item()  # as the scheduler stores it
    s = torch.linspace(T * 1.0, T * sigma_min, num_steps, dtype=torch.float64) / T  # (N,)
    sigmas = time_shift(s, shift).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)  # (N+1,)


# ----------------------------------------------------------------------------- interpolation


def interpolate(x0: Tensor, noise: Tensor, sigma) -> Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * noise.   x0, noise: (B, ...); sigma: float or (B,)."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = d x_sigma / d sigma = noise - x0.   (B, ...)"""
    return noise - x0


# ----------------------------------------------------------------------------- steps


class SDEStep(NamedTuple):
    sample: Tensor    # (B, ...) x_next (sampled, or the given prev_sample)
    log_prob: Tensor  # (B,) Gaussian log density of `sample`, averaged over non-batch dims
    mean: Tensor      # (B, ...) mean of the transition
    std: Tensor       # () or (B, 1, ..., 1) std of the transition itself (the noise actually added)


def euler_step(x: Tensor, v: Tensor, sigma, sigma_next) -> Tensor:
    """Deterministic (ODE) step: x_next = x + (sigma_next - sigma) * v.   (B, ...)"""
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return x + dt * v


def _normal_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) per element, averaged over non-batch dims -> (B,).
    Where std == 0 (a deterministic step) the value is defined as 0."""
    ok = std > 0
    safe = torch.where(ok, std, torch.ones_like(std))
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    return _mean_over_dims(torch.where(ok, lp, torch.zeros_like(lp)))


def _gaussian_step(mean, std, eps, generator, prev_sample) -> SDEStep:
    if prev_sample is None:
        if eps is None:
            # drawn on the generator's device (the CPU for rollouts), so a seed gives the same noise
            # whatever device the model runs on
            gdev = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=gdev, dtype=mean.dtype).to(mean.device)
        sample = mean + std * eps
    else:
        sample = prev_sample.to(mean.dtype)
    # the sample is data, not a function of the parameters: gradients reach log_prob via the mean only
    return SDEStep(sample, _normal_log_prob(sample.detach(), mean, std), mean, std)


def sde_step(x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float = 0.7,
             eps: Tensor = None, generator: torch.Generator = None, prev_sample: Tensor = None) -> SDEStep:
    """Flow-GRPO SDE step with its log-prob.   x, v: (B, ...); sigma, sigma_next: float or (B,).

        dt       = sigma_next - sigma                            (< 0)
        std      = a * sqrt(sigma / (1 - sigma))                 (a = noise_level; at sigma == 1 the
                                                                  denominator uses sigma_next: 1 - sigma_next)
        mean     = x * (1 + std^2 / (2 sigma) * dt) + v * (1 + std^2 (1 - sigma) / (2 sigma)) * dt
        x_next   = mean + std * sqrt(-dt) * eps,   eps ~ N(0, I)
        log_prob = mean over dims of log N(x_next; mean, (std * sqrt(-dt))^2)

    With `prev_sample` given, nothing is sampled: the log-prob of that sample is returned (to
    recompute log-probs of stored trajectories under the current policy). `eps` fixes the noise.

    Returned `std` is the per-step std, std * sqrt(-dt), shape () or (B, 1, ..., 1). The std of the
    formula (what Flow-GRPO's code returns) is `step.std / sqrt(-dt)`.
    """
    dtype = _dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = s_next - s
    std = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    return _gaussian_step(mean, std * torch.sqrt(-dt), eps, generator, prev_sample)


def cps_step(x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float = 0.7,
             eps: Tensor = None, generator: torch.Generator = None, prev_sample: Tensor = None) -> SDEStep:
    """Coefficients-preserving sampling step (Flow-CPS, arXiv 2509.05952).   x, v: (B, ...).

        x0_hat  = x - sigma * v                     (predicted data)
        eps_hat = x + (1 - sigma) * v               (predicted noise)
        std     = sigma_next * sin(a * pi / 2)      (the per-step std itself; no sqrt(-dt))
        mean    = (1 - sigma_next) * x0_hat + sqrt(sigma_next^2 - std^2) * eps_hat
        x_next  = mean + std * eps

    If x0_hat and eps_hat are exact, x_next has the coefficients of the forward process at
    sigma_next: (1 - sigma_next) * x0 + sigma_next * (unit Gaussian). log_prob is the full Gaussian
    density averaged over dims (Flow-CPS's code drops the constants and the 1/(2 std^2) factor).
    At sigma_next == 0 the step is deterministic (std = 0, sample = x0_hat) and log_prob is 0.
    """
    dtype = _dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - s * v
    eps_hat = x + (1 - s) * v
    mean = (1 - s_next) * x0_hat + s_next * math.cos(noise_level * math.pi / 2) * eps_hat
    return _gaussian_step(mean, std, eps, generator, prev_sample)


# ----------------------------------------------------------------------------- KL


def step_kl(mean_a: Tensor, mean_b: Tensor, step_std, *, dt=None, normalization: str = "exact") -> Tensor:
    """Per-step KL between two Gaussian transitions from the same state with the same std. (B,)

    mean_a, mean_b: (B, ...); step_std: the transition's std (SDEStep.std): float, (B,) or
    (B, 1, ..., 1); dt = sigma_next - sigma (needed for "flow_grpo"): float or (B,).

    normalization="exact": the true KL of the full diagonal Gaussians divided by the number of
        dimensions D (matching the log-prob averaging):
            KL / D = mean_dims (mean_a - mean_b)^2 / (2 * step_std^2)
        For sde_step means this is (1 + std^2 (1-sigma)/(2 sigma))^2 (-dt) mean_dims (v_a - v_b)^2 / (2 std^2).
    normalization="flow_grpo": the form in the Flow-GRPO code, which divides by the formula std
        std^2 = step_std^2 / (-dt) (no dt):
            mean_dims (mean_a - mean_b)^2 / (2 * std^2)  =  (-dt) * exact
    The KL is symmetric here (equal stds). Steps with step_std == 0 give inf/nan: skip them.
    """
    diff2 = (mean_a - mean_b).to(_dtype(mean_a)) ** 2  # (B, ...)
    kl = diff2 / (2 * _per_sample(step_std, diff2) ** 2)
    if normalization == "flow_grpo":
        if dt is None:
            raise ValueError("normalization='flow_grpo' needs dt")
        kl = kl * -_per_sample(dt, diff2)
    elif normalization != "exact":
        raise ValueError(f"unknown normalization {normalization!r}, expected 'exact' or 'flow_grpo'")
    return _mean_over_dims(kl)


# ----------------------------------------------------------------------------- loops


class Trajectory(NamedTuple):
    xs: Tensor         # (B, N+1, ...) states, xs[:, 0] = noise, xs[:, -1] = final sample
    log_probs: Tensor  # (B, N) log-prob of each transition xs[:, i] -> xs[:, i+1]


VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), sigma (B,)) -> v (B, ...)


def ode_sample(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Integrate the ODE with Euler from noise (sigmas[0]) to sigmas[-1]. Returns the final x (B, ...).
    Call it under torch.no_grad() unless you mean to backpropagate through the sampler."""
    x = noise.to(_dtype(noise))
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)  # (N+1,)
    for i in range(len(sigmas) - 1):
        v = velocity_fn(x, sigmas[i].expand(x.shape[0]))
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


def sde_sample(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, noise_level: float = 0.7,
               generator: torch.Generator = None, method: str = "sde") -> Trajectory:
    """Sample a trajectory with sde_step (method="sde") or cps_step (method="cps"), keeping every
    state and log-prob. Call it under torch.no_grad() for rollouts."""
    step = {"sde": sde_step, "cps": cps_step}[method]
    x = noise.to(_dtype(noise))
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)  # (N+1,)
    xs, log_probs = [x], []
    for i in range(len(sigmas) - 1):
        v = velocity_fn(x, sigmas[i].expand(x.shape[0]))
        out = step(x, v, sigmas[i], sigmas[i + 1], noise_level, generator=generator)
        x = out.sample
        xs.append(x)
        log_probs.append(out.log_prob)
    return Trajectory(torch.stack(xs, dim=1), torch.stack(log_probs, dim=1))
