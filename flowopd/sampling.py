"""Sampling images from a backend: classifier-free guidance and the ODE sampler.

Noise is drawn per prompt index from one seeded generator on the CPU, so the
same (prompts, seed) give the same images whatever the batch size or device.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .backends.base import cond_cat
from .flow import ode_sample, sigma_grid


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g)


def guided_velocity(backend, cond, uncond, cfg: float):
    """velocity_fn(x, sigma) with CFG: v_u + cfg * (v_c - v_u); cfg == 1 skips the unconditional pass."""

    def fn(x, sigma):
        if cfg == 1.0 or uncond is None:
            return backend.velocity(x, sigma, cond).float()
        v = backend.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([cond, uncond])).float()
        v_c, v_u = v.chunk(2)
        return v_u + cfg * (v_c - v_u)

    return fn


def sampling_defaults(backend) -> dict:
    d = {"steps": 40, "cfg": 3.0, "shift": 1.0}
    d.update(getattr(backend, "sampling", {}) or {})
    return d


@torch.no_grad()
def sample_images(backend, prompts: list[str], steps: int | None = None, cfg: float | None = None,
                  seed: int = 0, batch_size: int | None = None, progress: bool = True) -> np.ndarray:
    """ODE-sample one image per prompt -> uint8 (N, H, W, 3), batch_size prompts at a time (None: 32 on
    a CPU, where smaller batches sample faster with the same images (benchmarks' eval_batch part);
    128 elsewhere)."""
    if batch_size is None:
        batch_size = 32 if torch.device(backend.device).type == "cpu" else 128
    d = sampling_defaults(backend)
    steps = int(steps or d["steps"])
    cfg = float(d["cfg"] if cfg is None else cfg)
    sigmas = sigma_grid(steps, d["shift"])
    noise = initial_noise(len(prompts), backend.latent_shape(), seed)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = prompts[i : i + batch_size]
        cond = backend.encode_prompts(chunk)
        uncond = backend.encode_prompts([None] * len(chunk)) if cfg != 1.0 else None
        x = ode_sample(guided_velocity(backend, cond, uncond, cfg), noise[i : i + batch_size].to(backend.device), sigmas)
        out.append(backend.decode(x))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)
