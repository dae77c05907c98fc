"""Reward registry: a reward is a function `(images, prompts, metadata) -> torch.Tensor (B,)`.

- images: uint8 numpy array (B, H, W, 3) (what `backend.decode` returns);
- prompts: list of B prompt strings;
- metadata: list of B dicts (at least {"task": ...}) or None.

Find one by name (`get_reward("compose")`, names in `REWARDS`) or by import path
(`get_reward("mypkg.rewards:aesthetic")`). `weighted_sum({"text": 1.0, "quality": 0.5})` mixes
several into one reward; `per_task({"compose": "compose", "text": "text"}, weights)` rewards each
sample with its own task's reward (GRPO-Mix). Add a reward family as one small module and
`register` its functions here. The SD3 rewards (flowopd.rewards.sd3_rewards) are registered
by name too, built on first use.
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping

import numpy as np
import torch

from ..errors import UserError
from ..tasks import DEFAULT_TASK_REWARDS  # each toy task's own reward (its teacher's, its student's score)
from . import toy

RewardFn = Callable[..., torch.Tensor]

REWARDS: dict[str, RewardFn] = {}


class RewardError(UserError, ValueError):
    """An unknown reward name, a bad import path, or a reward that returned the wrong shape."""


def register(name: str, fn: RewardFn | None = None):
    """Register `fn` under `name` (usable as a decorator)."""

    def deco(f):
        REWARDS[name] = f
        return f

    return deco(fn) if fn is not None else deco


register("compose", toy.compose)
register("compose_strict", toy.compose_strict)
register("text", toy.text)
register("text_dense", toy.text_dense)
register("quality", toy.quality)


# The SD3.5 experiments' rewards (ocr, pickscore, clipscore, aesthetic, geneval): registered lazily,
# so listing them loads no model and needs none of their packages until a trainer first calls one.
from . import sd3_rewards as _sd3  # noqa: E402

for _name, _factory in _sd3.SD3_REWARDS.items():
    register(_name, _sd3.lazy(_factory))


def task_reward_names(tasks, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """task -> the name of its reward: `overrides`, else the toy task's own, else a registered reward
    of the task's name. A task with none of these is a ConfigError."""
    names = {**DEFAULT_TASK_REWARDS, **{t: t for t in tasks if t in REWARDS}, **dict(overrides or {})}
    missing = [t for t in tasks if t not in names]
    if missing:
        raise RewardError(f"no reward for task(s) {missing}; set task_rewards")
    return {t: names[t] for t in tasks}


def available() -> list[str]:
    return sorted(REWARDS)


def _checked(name: str, fn: RewardFn) -> RewardFn:
    """Wrap a reward so its output is a float32 tensor of shape (B,)."""

    def wrapped(images, prompts, metadata=None) -> torch.Tensor:
        r = fn(images, list(prompts), metadata)
        r = torch.as_tensor(np.asarray(r) if not torch.is_tensor(r) else r, dtype=torch.float32).cpu()
        if r.shape != (len(prompts),):
            raise RewardError(f"reward {name!r} returned shape {tuple(r.shape)} for {len(prompts)} prompts; expected ({len(prompts)},)")
        return r

    wrapped.__name__ = f"reward_{name}"
    wrapped.__doc__ = fn.__doc__
    return wrapped


def get_reward(spec: str | RewardFn) -> RewardFn:
    """A reward by registered name or 'package.module:function' (or a callable, passed through)."""
    if callable(spec):
        return _checked(getattr(spec, "__name__", "reward"), spec)
    name = str(spec).strip()
    if name in REWARDS:
        return _checked(name, REWARDS[name])
    if ":" in name:
        mod_name, _, fn_name = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise RewardError(f"reward {name!r}: cannot import module {mod_name!r} ({e})") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise RewardError(f"reward {name!r}: module {mod_name!r} has no function {fn_name!r}")
        return _checked(name, fn)
    raise RewardError(f"unknown reward {name!r}; available: {', '.join(available())} "
                      "(or 'package.module:function')")


def weighted_sum(weights: Mapping[str, float]) -> RewardFn:
    """One reward: sum_k w_k * reward_k(images, prompts, metadata) over the named rewards."""
    if not weights:
        raise RewardError("weighted_sum needs at least one reward")
    fns = {k: get_reward(k) for k in weights}

    def mixed(images, prompts, metadata=None) -> torch.Tensor:
        return sum(float(weights[k]) * fns[k](images, prompts, metadata) for k in fns)

    return mixed


def per_task(task_rewards: Mapping[str, str | Mapping[str, float]], weights: Mapping[str, float] | None = None) -> RewardFn:
    """One reward that scores each sample with its own task's reward (metadata[i]["task"]),
    times that task's weight (default 1). A task's reward is a name, or {name: weight} summed
    (weighted_sum; e.g. {geneval: 0.8, deqa: 0.2}, the Flow-OPD authors' GRPO-Mix reward_fn).
    A sample of a task without a reward is an error."""
    fns = {t: weighted_sum(r) if isinstance(r, Mapping) else get_reward(r) for t, r in task_rewards.items()}
    weights = dict(weights or {})

    def routed(images, prompts, metadata=None) -> torch.Tensor:
        if metadata is None:
            raise RewardError("a per-task reward needs metadata with each sample's task")
        tasks = [m["task"] for m in metadata]
        out = torch.zeros(len(tasks))
        for t in dict.fromkeys(tasks):
            if t not in fns:
                raise RewardError(f"no reward for task {t!r}; have rewards for {', '.join(fns)}")
            idx = [i for i, s in enumerate(tasks) if s == t]
            r = fns[t](images[idx], [prompts[i] for i in idx], [metadata[i] for i in idx])
            out[idx] = float(weights.get(t, 1.0)) * r
        return out

    return routed


__all__ = ["REWARDS", "RewardError", "available", "get_reward", "per_task", "register", "task_reward_names", "weighted_sum"]
