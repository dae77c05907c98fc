"""Routing: which teacher supervises which sample, and evaluating teachers on their sub-batches.

A routing is a weight matrix W (B, K) over the K teachers: row i says how sample i's target
transition is made, target_mean_i = sum_k W[i, k] * mean_k(x_i). Hard routes are one-hot rows.

Modes (`route`):
  - ``task`` (default, the paper's rule): the prompt's task tag picks the teacher of that task.
  - ``reward`` (the paper's text): every task's reward scores the sample; the teacher of the task
    with the highest *scaled* reward claims it. A reward returns NaN for a sample it cannot score
    (the toy world's: text for sign prompts only, compose and quality for compose-style prompts
    only, as their teachers were trained); NaN entries never win, and a sample no reward can score
    falls back to its task's teacher.
  - ``soft`` (the paper's future work): W[i] = softmax(scaled rewards / temperature) over the
    rewards that scored the sample, a reward-weighted mixture of the teachers' means.

Reward scales (`RewardScaler`), so that a 0.9 OCR score and a 0.6 quality score are comparable:
  - ``zscore`` (default): per task, z = (r - m_k) / max(s_k, min_std), with m_k, s_k running
    (exponential moving, momentum 0.9) mean and std of that reward over every sample it scored so
    far, the current batch included (the first batch sets them). A sample is claimed by the task
    on which it stands out most relative to what that reward usually gives.
  - ``rank``: per task, the sample's percentile among the current batch's samples that reward
    scored (ties averaged), in [0, 1]; no history, robust to outliers and to a reward's units.
  - ``raw``: the rewards as they come (only sensible when they share a scale).

`TeacherBank` holds the teachers (and the MAR anchor) as named adapters on the student's own
frozen base: evaluating teacher k on its sub-batch is switching to adapter k (`use`), so k
teachers cost k adapters. Teachers that are full fine-tunes are dense weight deltas, swapped into
the base weights for their sub-batch and swapped back (exactly) after.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor

from .lora import weights_added
from .rollout import transition

ROUTING_MODES = ("task", "reward", "soft")
REWARD_SCALES = ("zscore", "rank", "raw")


# ----------------------------------------------------------------------------- which reward reads which prompt


def score_all(reward_fns: dict, images, prompts: Sequence[str], tasks: Sequence[str]) -> Tensor:
    """(B, K) rewards of every teacher task's reward on every sample; a reward returns NaN where it
    cannot score a sample (the toy rewards: a sign for compose and quality, a scene for text), and
    such an entry never claims the sample. reward_fns: {task: reward function}; images: uint8
    (B, H, W, 3)."""
    out = torch.full((len(prompts), len(tasks)), float("nan"))
    for k, t in enumerate(tasks):
        out[:, k] = reward_fns[t](images, list(prompts), [{"task": t}] * len(prompts)).float()
    return out


# ----------------------------------------------------------------------------- reward scales


class RewardScaler:
    """Puts K rewards on comparable scales (see the module doc). Call on (B, K) rewards with NaN
    where a reward did not score a sample; returns (B, K) scaled values with NaN kept."""

    def __init__(self, num_tasks: int, mode: str = "zscore", momentum: float = 0.9, min_std: float = 0.02):
        if mode not in REWARD_SCALES:
            raise ValueError(f"unknown reward scale {mode!r}; expected one of {REWARD_SCALES}")
        self.mode, self.momentum, self.min_std = mode, momentum, min_std
        self.mean = torch.zeros(num_tasks, dtype=torch.float64)
        self.var = torch.zeros(num_tasks, dtype=torch.float64)
        self.seen = torch.zeros(num_tasks, dtype=torch.bool)

    def update(self, rewards: Tensor) -> None:
        """Fold a batch (B, K) into the running per-task mean and variance."""
        for k in range(rewards.shape[1]):
            r = rewards[:, k].double()
            r = r[~torch.isnan(r)]
            if r.numel() == 0:
                continue
            m, v = r.mean(), r.var(unbiased=False)
            if not self.seen[k]:
                self.mean[k], self.var[k], self.seen[k] = m, v, True
            else:
                a = self.momentum
                # moving moments: E[r] and E[r^2] both moved by (1 - a)
                new_mean = a * self.mean[k] + (1 - a) * m
                second = a * (self.var[k] + self.mean[k] ** 2) + (1 - a) * (v + m**2)
                self.mean[k], self.var[k] = new_mean, (second - new_mean**2).clamp_min(0)

    def __call__(self, rewards: Tensor, update: bool = True) -> Tensor:
        r = rewards.double()
        if self.mode == "raw":
            return r.float()
        if self.mode == "rank":
            out = torch.full_like(r, float("nan"))
            for k in range(r.shape[1]):
                ok = ~torch.isnan(r[:, k])
                v = r[ok, k]
                n = v.numel()
                if n == 0:
                    continue
                if n == 1:
                    out[ok, k] = 0.5
                    continue
                less = (v[None, :] < v[:, None]).sum(1).double()
                equal = (v[None, :] == v[:, None]).sum(1).double()
                out[ok, k] = (less + (equal - 1) / 2) / (n - 1)  # average rank of ties, in [0, 1]
            return out.float()
        if update:
            self.update(rewards)
        std = self.var.sqrt().clamp_min(self.min_std)
        return ((r - self.mean[None]) / std[None]).float()

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.var.sqrt().tolist()}


# ----------------------------------------------------------------------------- routes


def task_routes(sample_tasks: Sequence[str], teachers: Sequence[str]) -> Tensor:
    """One-hot (B, K): the teacher named like the sample's task."""
    index = {t: k for k, t in enumerate(teachers)}
    missing = sorted({t for t in sample_tasks if t not in index})
    if missing:
        raise KeyError(f"no teacher for task(s) {missing}; teachers are {list(teachers)}")
    W = torch.zeros(len(sample_tasks), len(teachers))
    W[torch.arange(len(sample_tasks)), torch.tensor([index[t] for t in sample_tasks], dtype=torch.long)] = 1.0
    return W


def reward_routes(scaled: Tensor, fallback: Tensor | None = None) -> Tensor:
    """One-hot (B, K) of the argmax over the non-NaN scaled rewards of each row (ties: the first);
    rows with no reward take the row of `fallback` (B, K) (e.g. task routes)."""
    s = torch.nan_to_num(scaled.double(), nan=float("-inf"))
    W = torch.zeros(scaled.shape)
    W[torch.arange(scaled.shape[0]), s.argmax(1)] = 1.0
    none = torch.isnan(scaled).all(1)
    if none.any():
        if fallback is None:
            raise ValueError("a sample has no reward and no fallback route")
        W[none] = fallback[none].float()
    return W


def soft_routes(scaled: Tensor, temperature: float = 1.0, fallback: Tensor | None = None) -> Tensor:
    """(B, K) softmax(scaled / temperature) over the non-NaN entries of each row (others 0)."""
    s = torch.nan_to_num(scaled.double() / temperature, nan=float("-inf"))
    none = torch.isnan(scaled).all(1)
    W = torch.softmax(torch.where(none[:, None], torch.zeros_like(s), s), dim=1).float()
    if none.any():
        if fallback is None:
            raise ValueError("a sample has no reward and no fallback route")
        W[none] = fallback[none].float()
    return W


def route(mode: str, sample_tasks: Sequence[str], teachers: Sequence[str], scaled: Tensor | None = None,
          temperature: float = 1.0) -> Tensor:
    """Routing weights (B, K) for `mode` in ROUTING_MODES; scaled: (B, K) scaled rewards (reward, soft)."""
    by_task = task_routes(sample_tasks, teachers) if all(t in teachers for t in sample_tasks) else None
    if mode == "task":
        return task_routes(sample_tasks, teachers)
    if scaled is None:
        raise ValueError(f"routing {mode!r} needs the scaled rewards")
    if mode == "reward":
        return reward_routes(scaled, by_task)
    if mode == "soft":
        return soft_routes(scaled, temperature, by_task)
    raise ValueError(f"unknown routing {mode!r}; expected one of {ROUTING_MODES}")


def high_noise_rows(W: Tensor, tasks: Sequence[str], sigma: float, routes: dict, threshold: float,
                    teachers: Sequence[str]) -> Tensor:
    """W (B, K) at one denoising step whose state has noise level `sigma`: when sigma >= threshold,
    the rows of samples whose task is a key of `routes` become one-hot on the teacher routes[task];
    otherwise W unchanged. A step's layout is decided at high noise, so a task whose teacher knows
    no more about layouts than the base (the toy world's quality prompts are compose prompts) can
    leave those steps to the teacher that does (`high_noise_routes` of the OPD config)."""
    rows = [i for i, t in enumerate(tasks) if t in routes] if sigma >= threshold else []
    if not rows:
        return W
    out = W.clone()
    out[rows] = task_routes([routes[tasks[i]] for i in rows], teachers)  # as if tagged with the routed task
    return out


# ----------------------------------------------------------------------------- teachers on one base


def _base_params(backend) -> dict[str, Tensor]:
    """Plain weight key ("down1.conv1.weight") -> the base model's tensor (adapters excluded)."""
    out = {}
    for k, v in list(backend.model.named_parameters()) + list(backend.model.named_buffers()):
        if "lora_" in k:
            continue
        out[k.replace(".base_layer", "")] = v
    return out


class TeacherBank:
    """Teachers (and anchors) as named adapters on one frozen base shared with the student.

    add(name, teacher): a LoRA teacher becomes the peft adapter `name`; a dense one (a full
    fine-tune) is kept as weight deltas. use(name): a context in which the backend computes with
    that teacher (None: the bare base, adapters off). means(...): the routed target means of a
    batch, each teacher run once on its own sub-batch."""

    def __init__(self, backend):
        self.backend = backend
        self.kind: dict[str, str] = {}
        self._dense: dict[str, dict[str, Tensor]] = {}

    def add(self, name: str, teacher) -> None:
        if name in self.kind:
            raise KeyError(f"teacher {name!r} already added")
        if teacher.kind == "lora":
            active = self.backend.active_adapter
            self.backend.attach_lora(name, teacher.lora, teacher.rank, teacher.alpha, teacher.targets)
            if active is not None:
                self.backend.set_adapter(active)
        else:
            params = _base_params(self.backend)
            bad = [k for k in teacher.dense if k not in params]
            if bad:
                raise KeyError(f"teacher {name!r} changes weights the model lacks: {bad[:3]}")
            self._dense[name] = {k: d.to(params[k].device, params[k].dtype) for k, d in teacher.dense.items()}
        self.kind[name] = teacher.kind

    @contextmanager
    def use(self, name: str | None):
        """Compute with teacher `name` (None or "base": the base with adapters off)."""
        if name is None or name == "base":
            with self.backend.adapter(None):
                yield
            return
        if name not in self.kind:
            if name in self.backend.adapters:
                with self.backend.adapter(name):  # any named adapter (e.g. the student's init)
                    yield
                return
            raise KeyError(f"no teacher or adapter {name!r}; have {sorted(self.kind)}")
        if self.kind[name] == "lora":
            with self.backend.merged(name):  # folded into the weights when no gradients are taken
                yield
            return
        params = _base_params(self.backend)
        with self.backend.adapter(None), weights_added([(params[k], d) for k, d in self._dense[name].items()]):
            yield

    @torch.no_grad()
    def means(self, ro, idx: Tensor, step: int, W: Tensor, names: Sequence[str]) -> Tensor:
        """Target transition means (b, C, H, W) of samples idx at `step`: sum_k W[i, k] mean_k,
        where mean_k is teacher names[k]'s transition from the student's stored state
        (flowopd.rollout.transition), computed once per teacher on the samples it supervises.
        W: (b, K) routing rows of the samples idx."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        target = None
        for k, name in enumerate(names):
            pos = (W[:, k] > 0).nonzero().flatten()
            if pos.numel() == 0:
                continue
            with self.use(name):
                m = transition(self.backend, ro, idx[pos], step).mean  # (b_k, C, H, W)
            if target is None:
                target = m.new_zeros((len(idx), *m.shape[1:]))
            target[pos] += W[pos, k].to(m).view(-1, *([1] * (m.ndim - 1))) * m
        return target
