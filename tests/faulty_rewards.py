"""Rewards for the tests, loaded by the trainers as `faulty_rewards:brightness` or
`faulty_rewards:constant` (the reward registry's package.module:function path), so an injected
NaN takes the same road as a real one.

FLOWOPD_TEST_NAN_CALLS lists the calls (1-based, counted per process) whose first value is NaN:
"2" or "2,4" for those calls, "2-" for every call from the second on. Unset: never.
"""
import os

import numpy as np
import torch

CALLS = {"n": 0}


def _hit(n: int, spec: str) -> bool:
    for part in filter(None, spec.replace(" ", "").split(",")):
        if part.endswith("-") and n >= int(part[:-1]):
            return True
        if not part.endswith("-") and n == int(part):
            return True
    return False


def brightness(images, prompts, metadata=None) -> torch.Tensor:
    """Mean pixel value in [0, 1] (cheap, and it differs between samples); NaN where told."""
    CALLS["n"] += 1
    r = torch.as_tensor(np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3)) / 255.0)
    if _hit(CALLS["n"], os.environ.get("FLOWOPD_TEST_NAN_CALLS", "")):
        r[0] = float("nan")
    return r


def constant(images, prompts, metadata=None) -> torch.Tensor:
    """0.5 for every sample: every group's advantages are 0 (the NFT no-signal test)."""
    return torch.full((len(images),), 0.5)
