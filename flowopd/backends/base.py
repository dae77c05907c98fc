"""The Backend interface every model implements (the tiny toy model, SD3 later).

Trainers and samplers only talk to a backend through these methods, so the
same GRPO and OPD loops run on the toy world and on SD3.5.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Backend(Protocol):
    name: str
    device: torch.device

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
