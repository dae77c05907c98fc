"""Rollouts: sample SDE trajectories from a policy and recompute their transitions for training.

`rollout` draws `group_size` trajectories per prompt with the Flow-GRPO SDE (or CPS), with
classifier-free guidance as configured, and keeps every state and log-prob: a `Rollout`.
`transition` recomputes, under the *current* policy (same CFG, same sampler), the mean and
log-prob of the stored transitions xs[:, j] -> xs[:, j + 1]; the GRPO ratio, the KL to a
reference and the OPD losses are built from it.

Samples are drawn in chunks of `micro_batch` with the policy's adapter folded into the weights
(`backend.merged`); `transition` called on the same chunk (and the same adapter) repeats the
rollout's computation through the adapter's own layers, so before any update the recomputed
log-prob equals the stored one to float rounding (the first GRPO ratio is 1 within about 1e-6;
exactly 1 while the adapter is still zero).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .flow import SDEStep, cps_step, euler_step, sde_step, sigma_grid
from .sampling import guided_velocity

STEP_FNS = {"sde": sde_step, "cps": cps_step}


@dataclass
class Rollout:
    """G trajectories per prompt; sample i belongs to group group_ids[i] (its prompt's index).
    Samples of a group are contiguous."""

    xs: Tensor                 # (B, N+1, C, H, W) states; xs[:, 0] noise, xs[:, -1] final sample
    log_probs: Tensor          # (B, N) log-prob of xs[:, j] -> xs[:, j+1] at sampling time
    sigmas: Tensor             # (N+1,) noise levels of the grid
    prompts: list[str]         # (B,) prompt of each sample
    tasks: list[str]           # (B,) task tag of each sample
    group_ids: Tensor          # (B,) long, index of the prompt the sample was drawn for
    cfg: float = 1.0           # guidance scale used (and to be used when recomputing)
    noise_level: float = 0.7
    method: str = "sde"        # "sde", "cps" or "ode" (deterministic: no transitions to train)
    micro_batch: int = 0       # chunk size used for sampling (0: the whole batch at once)
    metadata: list[dict] = field(default_factory=list)  # (B,) per-sample dicts ({"task", ...})
    sde_steps: list[int] | None = None  # steps sampled stochastically (None: all); others are ODE

    def __len__(self) -> int:
        return self.xs.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final(self) -> Tensor:
        return self.xs[:, -1]  # (B, C, H, W)

    def chunks(self) -> list[Tensor]:
        """Sample indices of each sampling chunk (the layout `transition` reproduces exactly)."""
        mb = self.micro_batch or len(self)
        return [torch.arange(i, min(i + mb, len(self))) for i in range(0, len(self), mb)]

    def trainable_steps(self) -> list[int]:
        """Steps whose transition has noise (a deterministic step has no log-prob to train)."""
        steps = range(self.num_steps) if self.sde_steps is None else self.sde_steps
        return [j for j in steps if not (self.method == "cps" and float(self.sigmas[j + 1]) == 0.0)]


def expand_groups(prompts: list[str], tasks: list[str], group_size: int):
    """Repeat each prompt G times (contiguously) -> (prompts, tasks, group_ids (B,))."""
    ps = [p for p in prompts for _ in range(group_size)]
    ts = [t for t in tasks for _ in range(group_size)]
    gid = torch.arange(len(prompts)).repeat_interleave(group_size)
    return ps, ts, gid


def _integrate(velocity_fn, x: Tensor, sigmas: Tensor, j0: int, j1: int, sde_set: set, step_fn,
               noise_level: float, generator, eps: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Steps j0..j1-1 from x (the state at sigmas[j0]): `step_fn` with log-prob on steps in sde_set,
    a deterministic Euler (ODE) step with log-prob 0 elsewhere. -> (states after each step, log-probs).
    eps: (b, N+1, ...) pre-drawn noise (step j uses eps[:, j + 1]); None: draw from `generator`."""
    xs, lps = [], []
    for j in range(j0, j1):
        v = velocity_fn(x, sigmas[j].expand(x.shape[0]))
        if j in sde_set:
            e = None if eps is None else eps[:, j + 1].to(x.device, x.dtype)
            out = step_fn(x, v, sigmas[j], sigmas[j + 1], noise_level, eps=e, generator=generator)
            x, lp = out.sample, out.log_prob
        else:
            x, lp = euler_step(x, v, sigmas[j], sigmas[j + 1]), x.new_zeros(x.shape[0])
        xs.append(x)
        lps.append(lp)
    return xs, lps


@torch.no_grad()
def rollout(backend, prompts: list[str], tasks: list[str], group_size: int, *, steps: int = 10,
            cfg: float = 1.0, noise_level: float = 0.7, shift: float = 1.0, method: str = "sde",
            micro_batch: int = 0, generator: torch.Generator | None = None,
            metadata: list[dict] | None = None, sde_steps: list[int] | None = None,
            shared_noise: bool = False, noise: Tensor | None = None) -> Rollout:
    """Sample `group_size` trajectories for each prompt with the current policy of `backend`.

    prompts, tasks: (P,) prompt strings and task tags; the result holds B = P * group_size samples.
    Initial noise and SDE noise come from `generator` (CPU); sampling runs in chunks of
    `micro_batch` samples (0: all at once). CFG: v = v_u + cfg (v_c - v_u) (cfg == 1: no
    unconditional pass). metadata: optional per-prompt dicts, copied to each sample with "task".

    sde_steps: the steps sampled with the stochastic step (None: all, as in Flow-GRPO); the others
    are deterministic Euler steps with log-prob 0 (Flow-GRPO-Fast / MixGRPO-style windows).
    method="ode": every step is a deterministic Euler step (the evaluation sampler at rollout
    steps); samples of a group differ by their initial noise; used by objectives that train on
    final samples only (GRPO's `objective: nft`).
    shared_noise: the G samples of a prompt start from the same initial noise, so they differ only
    by the noise of the SDE steps (the group's reward spread is then credited to those steps);
    the deterministic steps before the first SDE step are computed once per prompt.
    noise: all the noise, pre-drawn, (B, N+1, C, H, W) on the CPU: [:, 0] the initial noise, [:, j+1]
    the SDE noise of step j (flowopd.parallel.group_noise); `generator` is then not used. With
    shared_noise a group starts from its first sample's initial noise.
    """
    if method not in STEP_FNS and method != "ode":
        raise ValueError(f"unknown sampler {method!r}; expected one of {sorted(STEP_FNS) + ['ode']}")
    step_fn = STEP_FNS.get(method)
    ps, ts, gid = expand_groups(list(prompts), list(tasks), group_size)
    meta_p = metadata or [{} for _ in prompts]
    meta = [dict(m, task=t) for m, t in zip(meta_p, tasks) for _ in range(group_size)]  # (B,)
    sigmas = sigma_grid(steps, shift)  # (N+1,)
    if method == "ode":  # deterministic Euler steps only: final samples, no log-probs to train
        if shared_noise:
            raise ValueError("the 'ode' sampler with shared_noise gives G identical samples per prompt")
        sde_set = set()
    else:
        sde_set = set(range(steps)) if sde_steps is None else {int(j) for j in sde_steps}
    if method != "ode" and (not sde_set or min(sde_set) < 0 or max(sde_set) >= steps):
        raise ValueError(f"sde_steps must be a non-empty subset of 0..{steps - 1}, got {sde_steps}")
    B, shape, dev = len(ps), tuple(backend.latent_shape()), backend.device
    mb = micro_batch or B
    sig = sigmas.to(dev)

    def vfn(chunk_prompts):
        cond = backend.encode_prompts(chunk_prompts)
        uncond = backend.encode_prompts([None] * len(chunk_prompts)) if cfg != 1.0 else None
        return guided_velocity(backend, cond, uncond, cfg)

    # the shared deterministic prefix (once per prompt), or independent noise per sample
    first = min(sde_set) if shared_noise else 0
    if noise is not None and tuple(noise.shape) != (B, steps + 1, *shape):
        raise ValueError(f"noise must have shape {(B, steps + 1, *shape)}, got {tuple(noise.shape)}")
    with backend.merged():  # the policy's adapter folded into the weights (rollouts take no gradients)
        if shared_noise:
            noise_p = (torch.randn((len(prompts), *shape), generator=generator) if noise is None
                       else noise[::group_size, 0])  # (P, C, H, W)
            prefix = []
            for i in range(0, len(prompts), mb):
                x = noise_p[i:i + mb].to(dev)
                states, _ = _integrate(vfn(list(prompts[i:i + mb])), x, sig, 0, first, set(), step_fn, noise_level, None)
                prefix.append(torch.stack([x, *states], 1).cpu())  # (p, first+1, C, H, W)
            prefix = torch.cat(prefix).repeat_interleave(group_size, 0)  # (B, first+1, ...)
        else:
            prefix = (torch.randn((B, *shape), generator=generator) if noise is None
                      else noise[:, 0])[:, None]  # (B, 1, C, H, W)
        xs, lps = [], []
        for i in range(0, B, mb):
            x = prefix[i:i + mb, -1].to(dev)
            states, lp = _integrate(vfn(ps[i:i + mb]), x, sig, first, steps, sde_set, step_fn, noise_level, generator,
                                    None if noise is None else noise[i:i + mb])
            xs.append(torch.stack(states, 1).cpu())  # (b, N-first, ...)
            lps.append(torch.stack(lp, 1).cpu())
    xs = torch.cat([prefix, torch.cat(xs)], 1)  # (B, N+1, C, H, W)
    lps = torch.cat([torch.zeros(B, first), torch.cat(lps)], 1)  # (B, N)
    return Rollout(xs, lps, sigmas, ps, ts, gid, float(cfg), float(noise_level), method, int(mb), meta,
                   sorted(sde_set))


def transition(backend, ro: Rollout, idx: Tensor, step: int, cond: Any = None, uncond: Any = None) -> SDEStep:
    """Recompute the transition xs[idx, step] -> xs[idx, step + 1] under the current policy.

    Returns SDEStep(sample = the stored next state, log_prob (b,), mean (b, C, H, W), std).
    Gradients flow to the policy through `mean` and `log_prob`. `cond`/`uncond` may be passed
    (encoded prompts of ro.prompts[idx]) to avoid re-encoding; they are computed otherwise (with
    gradients, so full fine-tuning trains the text encoder too).
    """
    if ro.method not in STEP_FNS:
        raise ValueError(f"a rollout sampled with {ro.method!r} has no stochastic transitions to recompute")
    dev = backend.device
    idx = torch.as_tensor(idx, dtype=torch.long)
    x = ro.xs[idx, step].to(dev)  # (b, C, H, W)
    x_next = ro.xs[idx, step + 1].to(dev)
    if cond is None:
        prompts = [ro.prompts[i] for i in idx.tolist()]
        cond = backend.encode_prompts(prompts)
        if ro.cfg != 1.0:
            uncond = backend.encode_prompts([None] * len(prompts))
    sigmas = ro.sigmas.to(dev)
    v = guided_velocity(backend, cond, uncond, ro.cfg)(x, sigmas[step].expand(len(idx)))
    return STEP_FNS[ro.method](x, v, sigmas[step], sigmas[step + 1], ro.noise_level, prev_sample=x_next)


def decode_final(backend, ro: Rollout) -> np.ndarray:
    """uint8 images (B, H, W, 3) of the rollout's final states."""
    return backend.decode(ro.final)
