"""The Backend interface every model implements (the tiny toy model, SD3 later).

Trainers and samplers only talk to a backend through these methods, so the
same GRPO and OPD loops run on the toy world and on SD3.5.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager, Protocol, runtime_checkable

import numpy as np
import torch

from ..lora import Lora


@runtime_checkable
class Backend(Protocol):
    """What trainers, samplers and rewards use of a model. Both back ends (tiny, sd3) implement all of
    it; make_backend builds either from a config. Adapters are named LoRAs over one frozen base;
    `adapter(name)` selects one for a block (None: the base, adapters off)."""

    name: str
    device: torch.device
    sampling: dict              # the model's default sampler: steps, cfg, shift
    adapters: list[str]         # names of the adapters added so far
    stream_noise: bool          # noise "auto" may draw from one CPU stream (one CPU process)
    pixel_space: bool           # samples are images in [-1, 1] (clamped as decoding does)
    default_lora_init: Any      # peft's init_lora_weights when a config leaves lora_init ""

    # ---- computing ----
    def encode_prompts(self, prompts: list[str | None]) -> Any:
        """Prompt strings (None = the unconditional prompt) -> opaque conditioning."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """Predicted velocity noise - x0 at states x (B, C, H, W), noise levels sigma (B,)."""

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Model-space samples -> uint8 images (B, H, W, 3)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters an optimiser should update (the active adapter's, or all)."""

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample in model space, e.g. (3, 32, 32)."""

    # ---- adapters ----
    def add_adapter(self, name: str, rank: int = ..., alpha: float | None = ..., targets=None, **kw) -> Any:
        """Add a fresh LoRA adapter `name` and make it active."""

    def set_adapter(self, name: str) -> None:
        """Make adapter `name` the active one."""

    @property
    def active_adapter(self) -> str | None:
        """The adapter in use (None: none)."""

    def adapter(self, name: str | None) -> ContextManager:
        """A block computed with adapter `name` (None: the base), the previous one restored after."""

    def merged(self, name: str | None = None) -> ContextManager:
        """A block computed as `adapter(name)` computes (None: as the model computes now), which a
        back end may run faster with the adapter folded into the weights when no gradients are taken."""

    def attach_lora(self, name: str, lora: Lora, rank: int, alpha: float, targets, trainable: bool = True) -> str:
        """Add the LoRA factors `lora` ({module: (A, B)}) as adapter `name` (it becomes active)."""

    def read_lora(self, name: str) -> tuple[Lora, int, float, list[str]]:
        """Adapter `name` read back: (lora, rank, alpha, targets)."""

    # ---- files ----
    def config_dict(self) -> dict:
        """The model part of a checkpoint's config.json."""

    def save_checkpoint(self, out: str | Path, adapters: list[str] | None = None, meta: dict | None = None,
                        base: str | Path | None = None) -> Path:
        """A checkpoint of the model with `adapters` (None: all) in this back end's format."""

    def save_adapter_checkpoint(self, out: str | Path, name: str, base: str | Path, meta: dict) -> Path:
        """Adapter `name` alone as a checkpoint over `base` (what OPD writes for its student)."""


def cond_take(cond, idx):
    """Select rows of a conditioning (tensor or tuple of tensors) by index."""
    if isinstance(cond, torch.Tensor):
        return cond[idx]
    return type(cond)(cond_take(c, idx) for c in cond)


def cond_cat(conds):
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(conds, 0)
    return type(first)(cond_cat([c[i] for c in conds]) for i in range(len(first)))
