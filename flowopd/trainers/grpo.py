"""Flow-GRPO: fine-tune a flow-matching model on a reward by group-relative policy optimisation.

One trainer for both uses of stage 1 (DESIGN.md section 1):
  - a *teacher*: prompts of one task, one reward (configs/toy_grpo_{compose,text,quality}.yaml);
  - *GRPO-Mix*, the baseline Flow-OPD beats: prompts of all tasks in mixed batches, each sample
    rewarded by its own task's reward with configurable weights (configs/toy_grpo_mix.yaml).

The loop, top to bottom (each iteration of `train_grpo`):
  1. rollout: P prompts x G trajectories with the SDE sampler (CFG as configured), every state and
     log-prob kept (flowopd.rollout);
  2. reward: decode the final states, score them (flowopd.rewards);
  3. advantages: per-prompt group advantages (r - mean_group) / (std + 1e-4), std over the whole
     batch by default, clipped to +-adv_clip; groups are the G samples of one prompt draw, or
     (adv_groups) Flow-GRPO's per_prompt_stat_tracking groups; the share of groups with equal rewards
     (no signal) is logged as zero_std_ratio;
  4. update: for a random subset of the steps (timestep_fraction), recompute each transition's
     log-prob under the current policy and minimise the clipped-ratio loss
     mean(max(-A r, -A clip(r, 1-e, 1+e))) (+ kl_beta * KL to the reference = the base with the
     adapter switched off); gradient accumulation over micro-batches; optional EMA; the learning
     rate constant, or on a cosine from lr to lr * lr_final over the run;
  5. log (JSONL always, tensorboard when installed; tqdm bar), checkpoint.

Objectives (`objective`). "grpo" (default) is phase 4 above, Flow-GRPO's. "nft" keeps phases 1-3
(on-policy rollouts, rewards, the same group advantages) and replaces the likelihood-ratio loss
by the forward-process loss of DiffusionNFT (arXiv 2509.16117; losses.nft_loss): each final
sample x0 is noised at K random levels and the policy's velocity v is pulled toward the sample's
flow-matching target where r = 0.5 + 0.5 clip(A, -1, 1) > 1/2 and pushed away where r < 1/2,
relative to the sampling policy's v_old. It needs no log-probs, so rollouts may use the `ode`
sampler (the samples of a group then differ by initial noise, i.e. by layout).

Faults (flowopd.trainers.checkpointing): every `state_every` iterations the whole run state goes
to out/state (LoRA or full weights, optimizer, EMA, RNG states); rerunning the same command on
the same --out resumes from the newest intact one, bit for bit on the CPU. A NaN/Inf reward skips
the iteration's update, a NaN/Inf loss or gradient skips that optimizer step (both logged to
train_log.jsonl); `max_bad_steps` in a row stop the run with a state of the last good weights.

The final model is a checkpoint directory loadable by `flowopd.backends.load_checkpoint`: the LoRA
merged into full weights (model.safetensors) and, for LoRA runs, the adapter alone in
adapters/<name>.safetensors with its rank, alpha, targets and base in config.json["adapters"],
so the distillation stage can load several teachers as named adapters on one base
(`load_adapter`).

Departures from Flow-GRPO, and the measurements behind the toy recipes: docs/departures.md.

Back ends and processes (flowopd.trainers.common, flowopd.parallel): `backend: sd3` trains a LoRA
on an SD3 pipeline (`model`) with prompts from files (`prompts`) and saves it in diffusers' format;
under `accelerate launch` / `torchrun` each process rolls out its share of the prompt groups,
rewards are gathered so advantages use the global batch, gradients are averaged, and rank 0 alone
writes logs and checkpoints. Batch keys (prompts_per_step, grad_accum) are global numbers.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ..backends import CheckpointError, make_backend, resolve_checkpoint
from ..backends.tiny import read_weights
from ..parallel import noise_mode
from ..prompt_sources import PromptSources
from .sd3_teachers import setup_sd3_grpo
from .checkpointing import RunState, identity, prepare_out
from .coldstart import average_teachers
from .common import (EMA, Accumulation, Evaluator, LoopParts, ModelKeys, add_trained_adapter, check_schedule,
                     resolve_backend_keys, rollout_batch, schedule_counts, start_run, task_counts,
                     end_step, finish_run)
from .runlog import NullLogger, RunLogger
from ..config import ConfigError, load, require, to_dict
from ..lora import lora_from_state_dict
from ..losses import advantage_groups, group_advantages, group_reward_stats, grpo_loss, nft_loss, nft_weights
from ..flow import interpolate, step_kl, time_shift
from ..rewards import get_reward, per_task, weighted_sum
from ..tasks import DEFAULT_TASK_REWARDS
from ..rollout import Rollout, transition
from ..sampling import guided_velocity
from ..state import atomic_dir
from ..world.prompts import CATEGORIES



@dataclass
class GRPOConfig(ModelKeys):  # + backend, model, prompts, precision, noise, eval_* keys (trainers/common.py)
    # model
    init: str = "base"               # checkpoint to fine-tune ('base' = the shipped base)
    finetune: str = "lora"           # "lora" (an adapter over the frozen base) or "full"
    lora_rank: int = 8
    lora_alpha: float = 0.0          # 0: = lora_rank
    adapter_name: str = ""           # "": the single task's name, or "mix"
    # prompts and rewards
    tasks: list[str] = field(default_factory=lambda: ["compose"])
    task_shares: dict = field(default_factory=dict)   # task -> share of each batch (default equal); alternate: turns
    task_schedule: str = "mixed"     # "mixed": every batch holds every task | "alternate": one task per iteration, in turns
                                     # of task_shares iterations (the Flow-OPD authors' training_mode = "alternate")
    categories: list[str] = field(default_factory=list)  # compose/quality prompts only from these (default: all)
    reward: str = ""                 # one reward for every sample: a name or package.module:function
    reward_mix: dict = field(default_factory=dict)    # reward name -> weight, summed on every sample
    task_rewards: dict = field(default_factory=dict)  # task -> reward name (default: the task's own)
    reward_weights: dict = field(default_factory=dict)  # task -> weight of its reward (per-task mode)
    # rollouts
    steps: int = 40                  # GRPO iterations (rollout + update)
    prompts_per_step: int = 8        # P prompts per iteration
    group_size: int = 8              # G samples per prompt
    sample_steps: int = 10           # SDE steps of a rollout
    cfg: float | None = None         # CFG scale in rollouts and in training (None: the checkpoint's)
    noise_level: float = 0.7         # SDE noise level a
    shift: float | None = None       # time shift of the sigma grid (None: the back end's: the checkpoint's / scheduler's)
    sampler: str = "sde"             # "sde" (Flow-GRPO) or "cps" (coefficients-preserving)
    micro_batch: int = 32            # samples per forward (rollout chunks = training micro-batches)
    sde_window: int = 0              # 0: every step is SDE (Flow-GRPO); k: k consecutive SDE steps, ODE elsewhere
    sde_window_starts: list[int] = field(default_factory=list)  # where a window may start (default: anywhere)
    shared_noise: bool = False       # the G samples of a prompt share the initial noise (branch at the window)
    # update
    objective: str = "grpo"          # "grpo": clipped-ratio loss on the SDE transitions (Flow-GRPO);
                                     # "nft": forward-process loss on the final samples (see the docstring)
    nft_beta: float = 1.0            # nft: step of the implicit policies v_old +- beta (v - v_old)
    nft_timesteps: int = 2           # nft: noise levels drawn per sample and iteration
    nft_time_shift: float = 0.0      # nft: t = s u / (1 + (s - 1) u), u uniform, with s this (0: the sampling
                                     # shift); s > 1 trains more at high noise, where a layout forms
    nft_adv_scale: float = 1.0       # nft: r = 0.5 + 0.5 clip(A / nft_adv_scale, -1, 1)
    nft_negatives: bool = True       # nft: push away from below-average samples (false: r = max(r, 0.5),
                                     # pull toward the winners only, reward-filtered flow matching)
    nft_guidance: float = 0.0        # nft: CFG scale of the velocity trained (0: the rollouts' cfg; 1: the
                                     # conditional velocity alone; kl_beta then holds that one, not the
                                     # unconditional one: nft_uncond_anchor does)
    nft_uncond_anchor: float = 0.0   # nft: + this * mean (v_uncond - v_uncond of the base)^2, so the trained
                                     # guided velocity cannot drift through its unconditional branch
    timestep_fraction: float = 1.0   # share of the steps trained per iteration
    step_selection: str = "random"   # which: "random" (a random subset) | "first" (the first ones in order, Flow-GRPO's)
    inner_epochs: int = 1            # passes over each rollout
    grad_accum: int = 1              # micro-batches per optimizer step
    adv_std: str = "batch"           # "batch" (Flow-GRPO) or "group"
    adv_groups: str = "draw"         # "draw" (the G samples of a prompt draw) | "prompt" (Flow-GRPO per_prompt_stat_tracking:
                                     # same prompt text) | "none" (the whole batch, per_prompt_stat_tracking = False)
    adv_clip: float = 5.0
    clip_range: float = 1e-4
    kl_beta: float = 0.0             # weight of the KL to the reference (base, adapter off)
    kl_normalization: str = "exact"  # "exact" or "flow_grpo" (see flow.step_kl)
    lr: float = 3e-3
    lr_final: float = 1.0            # the learning rate falls along a cosine from lr (iteration 1) to lr * this
                                     # (the last iteration); 1: constant
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.0           # 0: no EMA; else the saved weights are the EMA
    # bookkeeping
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0             # torch CPU threads (0: torch's default)
    save_every: int = 0              # loadable checkpoint out/step_N every N iterations (0: only out/final)
    # > 1: the run hands on out/average, the mean of the weight deltas of out/final and the last
    # tail_average - 1 step_N checkpoints before it (save_every apart): the noise of the last iterate
    # averages out as in a mean of several runs, at the cost of one (tiny back end)
    tail_average: int = 0
    average_rank: int = 0            # > 0: out/average compressed to a LoRA of this rank (SVD); 0: exact
    state_every: int = 1             # resumable state out/state every N iterations (0: only at the end)
    max_bad_steps: int = 5           # non-finite rewards / losses / gradients in a row before stopping
    max_minutes: float = 0.0         # 0: no limit; else stop (and save) after this long
    log_every: int = 1

    def validate(self):
        require(self.finetune in ("lora", "full"), f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        require(self.lora_rank >= 1, "lora_rank must be >= 1")
        require(self.lora_alpha >= 0, "lora_alpha must be >= 0")
        require(len(self.tasks) >= 1, "tasks must name at least one task")
        self.validate_model_keys()
        for t, s in self.task_shares.items():
            require(t in self.tasks, f"task_shares names {t!r}, which is not in tasks {self.tasks}")
            require(float(s) >= 0, f"task_shares[{t}] must be >= 0")
        check_schedule(self)
        for c in self.categories:
            require(c in CATEGORIES, f"unknown category {c!r}; categories are {', '.join(CATEGORIES)}")
        require(not (self.reward and self.reward_mix), "set either reward or reward_mix, not both")
        for t in self.task_rewards:
            require(t in self.tasks, f"task_rewards names {t!r}, which is not in tasks {self.tasks}")
        require(self.steps >= 1, "steps must be >= 1")
        require(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        require(self.group_size >= 2, "group_size must be >= 2 (advantages are relative to the group)")
        require(self.sample_steps >= 1, "sample_steps must be >= 1")
        require(self.cfg is None or self.cfg >= 0, "cfg must be >= 0")
        require(self.noise_level > 0, "noise_level must be > 0")
        require(self.shift is None or self.shift > 0, "shift must be > 0")
        require(self.step_selection in ("random", "first"), "step_selection must be 'random' or 'first'")
        require(self.adv_groups in ("draw", "prompt", "none"), "adv_groups must be draw, prompt or none")
        require(self.objective in ("grpo", "nft"), f"objective must be 'grpo' or 'nft', got {self.objective!r}")
        require(self.sampler in ("sde", "cps", "ode"), f"sampler must be 'sde', 'cps' or 'ode', got {self.sampler!r}")
        require(self.sampler != "ode" or self.objective == "nft",
                "sampler 'ode' leaves no stochastic transitions for objective 'grpo'; use objective: nft")
        require(self.sampler != "ode" or not (self.sde_window or self.shared_noise),
                "sampler 'ode' takes no sde_window or shared_noise (its samples differ by initial noise only)")
        require(self.nft_beta > 0 and self.nft_timesteps >= 1 and self.nft_adv_scale > 0,
                "nft_beta and nft_adv_scale must be > 0, nft_timesteps >= 1")
        require(self.nft_time_shift >= 0, "nft_time_shift must be >= 0 (0: the sampling shift)")
        require(self.nft_guidance >= 0 and self.nft_uncond_anchor >= 0,
                "nft_guidance and nft_uncond_anchor must be >= 0")
        require(self.micro_batch >= 1, "micro_batch must be >= 1")
        require(0 <= self.sde_window <= self.sample_steps, "sde_window must be in [0, sample_steps]")
        for j in self.sde_window_starts:
            require(0 <= j <= self.sample_steps - max(1, self.sde_window),
                    f"sde_window_starts: {j} leaves no room for a window of {self.sde_window} in {self.sample_steps} steps")
        require(0 < self.timestep_fraction <= 1, "timestep_fraction must be in (0, 1]")
        require(self.inner_epochs >= 1, "inner_epochs must be >= 1")
        require(self.grad_accum >= 1, "grad_accum must be >= 1")
        require(self.adv_std in ("batch", "group"), f"adv_std must be 'batch' or 'group', got {self.adv_std!r}")
        require(self.adv_clip > 0, "adv_clip must be > 0")
        require(self.clip_range > 0, "clip_range must be > 0")
        require(self.kl_beta >= 0, "kl_beta must be >= 0")
        require(self.kl_normalization in ("exact", "flow_grpo"), "kl_normalization must be 'exact' or 'flow_grpo'")
        require(not (self.kl_beta > 0 and self.finetune == "full"),
                "kl_beta > 0 needs finetune=lora: the reference is the base with the adapter switched off")
        require(self.lr > 0, "lr must be > 0")
        require(0 <= self.lr_final <= 1, "lr_final must be in [0, 1] (a fraction of lr; 1: constant)")
        require(self.weight_decay >= 0, "weight_decay must be >= 0")
        require(0 < self.adam_beta2 < 1, "adam_beta2 must be in (0, 1)")
        require(self.grad_clip >= 0, "grad_clip must be >= 0 (0: no clipping)")
        require(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        require(self.num_threads >= 0, "num_threads must be >= 0")
        require(self.save_every >= 0 and self.max_minutes >= 0 and self.log_every >= 1,
                "save_every and max_minutes must be >= 0, log_every >= 1")
        require(self.state_every >= 0, "state_every must be >= 0")
        require(self.tail_average >= 0, "tail_average must be >= 0")
        require(self.average_rank >= 0, "average_rank must be >= 0 (0: the exact mean)")
        require(self.average_rank == 0 or self.tail_average > 1,
                "average_rank compresses the tail average: set tail_average (and save_every) too")
        require(self.average_rank == 0 or self.finetune == "lora",
                "average_rank compresses LoRA checkpoints: it needs finetune=lora")
        if self.tail_average > 1:
            require(self.backend != "sd3", "tail_average averages tiny checkpoints; the sd3 back end has none")
            require(self.save_every >= 1 and (self.tail_average - 1) * self.save_every < self.steps,
                    f"tail_average {self.tail_average} needs save_every >= 1 and {self.tail_average - 1} "
                    f"step_N checkpoints before the final one (steps {self.steps}, save_every {self.save_every})")
        require(self.max_bad_steps >= 1, "max_bad_steps must be >= 1")

    # ---- derived -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.adapter_name or (self.tasks[0] if len(self.tasks) == 1 else "mix")

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    def rollout_budget(self) -> int:
        """Total trajectories sampled by a run (what GRPO-Mix matches to the teachers' sum)."""
        return self.steps * self.samples_per_step


# ----------------------------------------------------------------------------- pieces


def make_reward_fn(cfg: GRPOConfig):
    """reward(images, prompts, metadata) -> (B,): one reward, a weighted sum, or per task."""
    if cfg.reward:
        return get_reward(cfg.reward)
    if cfg.reward_mix:
        return weighted_sum(cfg.reward_mix)
    tr = {t: cfg.task_rewards.get(t, DEFAULT_TASK_REWARDS.get(t, t)) for t in cfg.tasks}
    return per_task(tr, cfg.reward_weights)


def save_grpo_checkpoint(backend, out: Path, cfg: GRPOConfig, meta: dict) -> Path:
    """Write a checkpoint (Backend.save_checkpoint): tiny, merged full weights (+ the adapter alone
    for LoRA runs); SD3, the adapter in diffusers' LoRA format with config.json naming the base."""
    return backend.save_checkpoint(out, adapters=[cfg.name] if cfg.finetune == "lora" else [], meta=meta,
                                   base=cfg.init)


def load_adapter(backend, checkpoint, name: str | None = None, as_name: str | None = None) -> str:
    """Add the adapter saved in a GRPO checkpoint to `backend` (which must hold that adapter's
    base weights) under `as_name` (default: its saved name); returns the name. It becomes active."""
    path = resolve_checkpoint(checkpoint)
    adapters = json.loads((path / "config.json").read_text()).get("adapters") or {}
    if not adapters:
        raise CheckpointError(f"{path} holds no adapters (a full fine-tune: load it as a checkpoint)")
    if name is None:
        if len(adapters) != 1:
            raise CheckpointError(f"{path} holds adapters {sorted(adapters)}; name one")
        name = next(iter(adapters))
    if name not in adapters:
        raise CheckpointError(f"{path} has no adapter {name!r}; it has {sorted(adapters)}")
    a = adapters[name]
    as_name = as_name or name
    lora = lora_from_state_dict(read_weights(path / a["file"]))
    return backend.attach_lora(as_name, lora, int(a["rank"]), float(a["alpha"]), list(a["targets"]))


def _policy(backend, prompts: list[str], guidance: float):
    """The guided velocity field of the current policy for these prompts: fn(x, sigma) -> v."""
    cond = backend.encode_prompts(prompts)
    uncond = backend.encode_prompts([None] * len(prompts)) if guidance != 1.0 else None
    return guided_velocity(backend, cond, uncond, guidance)


def grpo_step_loss(backend, ro: Rollout, adv, cfg: GRPOConfig, idx, j: int, device):
    """Flow-GRPO's loss at denoising step j of the samples idx: the transition recomputed under the
    current policy, the clipped-ratio loss (+ kl_beta * the per-step KL to the base, adapter off).
    -> (loss, stats, kl or None)."""
    tr = transition(backend, ro, idx, j)
    loss, st = grpo_loss(tr.log_prob, ro.log_probs[idx, j].to(device), adv[idx].to(device), cfg.clip_range)
    kl = None
    if cfg.kl_beta > 0:
        with torch.no_grad(), backend.adapter(None):
            ref = transition(backend, ro, idx, j)
        dt = ro.sigmas[j + 1] - ro.sigmas[j]
        kl = step_kl(tr.mean, ref.mean, tr.std, dt=dt, normalization=cfg.kl_normalization).mean()
        loss = loss + cfg.kl_beta * kl
    return loss, st, kl


@dataclass
class NFTBatch:
    """`objective: nft`'s draws for one iteration: K noise levels t (uniform, time-shifted like the
    sampling grid or by nft_time_shift) and noises for every final sample x0, the sampling policy's
    velocities v_old at x_t = (1 - t) x0 + t noise, and the weights r = nft_weights(A)."""

    x0: torch.Tensor       # (B, C, H, W), CPU
    t: torch.Tensor        # (B, K)
    eps: torch.Tensor      # (B, K, C, H, W)
    v_old: torch.Tensor    # (B, K, C, H, W)
    weights: torch.Tensor  # (B,)


def nft_batch(backend, ro: Rollout, adv, cfg: GRPOConfig, guidance: float, gen) -> NFTBatch:
    """Draw an iteration's NFT noise levels and noises and record v_old (no gradients)."""
    dev = backend.device
    x0 = ro.final.float()  # (B, C, H, W) on the CPU
    if backend.pixel_space:
        x0 = x0.clamp(-1.0, 1.0)  # pixel space: what decoding keeps
    B, K = len(ro), cfg.nft_timesteps
    u = torch.rand((B, K), generator=gen)
    t_all = time_shift(u, cfg.nft_time_shift or cfg.shift)  # (B, K)
    eps = torch.randn((B, K, *x0.shape[1:]), generator=gen)
    weights = nft_weights(adv.cpu(), cfg.nft_adv_scale, cfg.nft_negatives)  # (B,)
    v_old = torch.empty_like(eps)
    with torch.no_grad(), backend.merged():
        for idx in ro.chunks():
            vf = _policy(backend, [ro.prompts[i] for i in idx.tolist()], guidance)
            for k in range(K):
                xt = interpolate(x0[idx], eps[idx, k], t_all[idx, k])
                v_old[idx, k] = vf(xt.to(dev), t_all[idx, k].to(dev)).float().cpu()
    return NFTBatch(x0, t_all, eps, v_old, weights)


def nft_step_loss(backend, nb: NFTBatch, vf, prompts: list[str], cfg: GRPOConfig, guidance: float, idx, k: int):
    """losses.nft_loss of the samples idx at their k-th noise level, vf the current policy's
    velocity field for their prompts (+ kl_beta * mean (v - v_base)^2, adapter off).
    -> (loss, stats, kl or None)."""
    dev = backend.device
    t = nb.t[idx, k].to(dev)
    xt = interpolate(nb.x0[idx], nb.eps[idx, k], nb.t[idx, k]).to(dev)
    v = vf(xt, t)
    loss, st = nft_loss(v, nb.v_old[idx, k].to(dev), (nb.eps[idx, k] - nb.x0[idx]).to(dev), nb.weights[idx], cfg.nft_beta)
    kl = None
    if cfg.kl_beta > 0:
        with torch.no_grad(), backend.adapter(None):
            v_ref = _policy(backend, prompts, guidance)(xt, t).float()
        kl = ((v.float() - v_ref) ** 2).mean()
        loss = loss + cfg.kl_beta * kl
    if cfg.nft_uncond_anchor > 0:
        uncond = backend.encode_prompts([None] * len(prompts))
        with torch.no_grad(), backend.adapter(None):
            vu_ref = backend.velocity(xt, t, uncond).float()
        drift = ((backend.velocity(xt, t, uncond).float() - vu_ref) ** 2).mean()
        loss = loss + cfg.nft_uncond_anchor * drift
        st = st | {"uncond_drift": drift.detach()}
    return loss, st, kl


# ----------------------------------------------------------------------------- the loop


@dataclass(kw_only=True)
class GRPORun(LoopParts):
    """LoopParts plus GRPO's reward."""
    reward_fn: object

    def window(self) -> list[int] | None:
        """The SDE steps of this iteration: all (None), or a window at a random allowed start."""
        cfg = self.cfg
        if not cfg.sde_window:
            return None
        starts = cfg.sde_window_starts or list(range(cfg.sample_steps - cfg.sde_window + 1))
        j0 = self.rng.choice(starts)
        return list(range(j0, j0 + cfg.sde_window))

    def save(self, name: str, step: int) -> Path:
        """out/name: the policy (its EMA when there is one), then the live weights back."""
        meta = {"trainer": "grpo", "step": step, "minutes": round((time.time() - self.t0) / 60, 2),
                "rollouts": step * self.cfg.samples_per_step, "recipe": to_dict(self.cfg)}
        with self.ema.applied() if self.ema is not None else nullcontext(), atomic_dir(self.out / name) as tmp:
            save_grpo_checkpoint(self.backend, tmp, self.cfg, meta)
        return self.out / name


def setup_grpo(cfg: GRPOConfig, out: Path, overwrite: bool, resume: bool) -> GRPORun:
    """Build the policy (the base with the trained adapter, or all its weights), reward, optimizer,
    EMA and evaluator, prepare --out, resume the newest intact state in out/state (if any), write
    out/config.yaml. Bad input (checkpoint, reward, prompt files, --out) is refused before anything
    is written."""
    t0 = time.time()
    dist, rng, gen = start_run(cfg)
    if cfg.backend == "sd3":
        backend = setup_sd3_grpo(cfg, dist)  # the SD3 base with the trained adapter
    else:
        backend = make_backend(cfg, cfg.init, dist.device)
        if cfg.finetune == "lora":
            add_trained_adapter(backend, cfg.name, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg)
        else:
            backend.model.requires_grad_(True)
    cfg = resolve_backend_keys(cfg, backend)  # shift, eval_steps: the back end's when unset
    reward_fn = make_reward_fn(cfg)
    params = backend.trainable_parameters()
    dist.broadcast_parameters(params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    sources = PromptSources(cfg.tasks, cfg.prompts, cfg.categories)
    if dist.is_main:
        prepare_out(out, identity(cfg), overwrite, resume)
    dist.barrier()  # the others read out/state only once rank 0 has checked (or cleared) it
    evaluate = Evaluator(backend, sources, reward_fn, cfg, dist, cfg.shift, cfg.micro_batch, ema) if cfg.eval_every else None
    net = backend.net if hasattr(backend, "net") else backend.model
    run = RunState(out, {n: p for n, p in net.named_parameters() if p.requires_grad}, opt,
                   every=cfg.state_every, max_bad=cfg.max_bad_steps, ema=ema.shadow if ema is not None else None,
                   generators={"gen": gen}, randoms={"rng": rng}, write=dist.is_main)
    start = run.resume()  # the newest intact state in out/state, if any
    if dist.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    logger = run.logger = RunLogger(out, wandb=cfg.wandb, config=to_dict(cfg)) if dist.is_main else NullLogger()
    return GRPORun(cfg=cfg, out=out, t0=t0, dist=dist, rng=rng, gen=gen, backend=backend, reward_fn=reward_fn,
                   sources=sources, params=params, opt=opt, ema=ema, run=run, logger=logger, evaluate=evaluate,
                   counts=task_counts(cfg.tasks, cfg.task_shares, cfg.prompts_per_step),
                   per_group=noise_mode(cfg.noise, backend.stream_noise, dist.device, dist.world) == "per_group",
                   grad_accum=dist.local_accum(cfg.grad_accum),
                   guidance=float(backend.sampling.get("cfg", 1.0) if cfg.cfg is None else cfg.cfg), start=start)


def train_grpo(cfg: GRPOConfig, out: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Run GRPO; write out/config.yaml, out/train_log.jsonl, out/state, out/final (and out/step_*).
    An --out holding this run's state resumes from it; another run's is refused unless overwrite.
    -> out/final."""
    r = setup_grpo(cfg, Path(out), overwrite, resume)
    cfg, dist = r.cfg, r.dist
    bar = tqdm(range(r.start + 1, cfg.steps + 1), desc=f"grpo[{cfg.name}]", mininterval=2, initial=r.start,
               total=cfg.steps, disable=not dist.is_main)
    step = r.start
    for step in bar:
        t_step = time.time()
        set_lr(r.opt, cfg.lr * lr_factor(step, cfg.steps, cfg.lr_final))
        # 1. rollout: P prompts x G trajectories from the current policy, no gradients; with several
        #    processes every one draws the same P prompts and rolls out its groups (mine)
        counts = schedule_counts(cfg.task_schedule, r.counts, cfg.tasks, cfg.task_shares, step)
        ro: Rollout = rollout_batch(r.backend, r.sources, r.rng, counts, dist, cfg, step, r.gen, r.guidance,
                                    r.per_group, window=r.window, shared_noise=cfg.shared_noise)
        t_roll = time.time() - t_step

        # 2. reward: score the decoded final images (this process's), gather the global batch
        rewards = dist.gather(r.reward_fn(r.backend.decode(ro.final), ro.prompts, ro.metadata))  # (B,)
        mine = dist.mine(cfg.prompts_per_step)  # the prompts this process rolled out
        group_ids = dist.gather(torch.tensor(mine)[ro.group_ids])  # (B,) global prompt index
        if not r.run.finite(step, "reward", rewards):  # a NaN/Inf reward: no update this iteration (logged)
            r.run.step_done(step)
            continue

        # 3. advantages: per-prompt groups, std over the batch (or the group), clipped
        groups = advantage_groups(cfg.adv_groups, group_ids, dist.gather_list(ro.prompts))
        adv_all = group_advantages(rewards, groups, std_scope=cfg.adv_std, clip=cfg.adv_clip)  # (B,)

        # 4. update: the objective's loss, accumulated over micro-batches
        upd = grpo_update(r, ro, dist.local(adv_all), step)

        # 5. log, checkpoint (rank 0 writes; stats of every process)
        rec = grpo_record(r, upd, rewards, groups, adv_all, dist.gather_list(ro.tasks))
        rec.update({"lr": r.opt.param_groups[0]["lr"], "sec_rollout": round(t_roll, 2),
                    "sec_step": round(time.time() - t_step, 2), "min": round((time.time() - r.t0) / 60, 2)})
        bar.set_postfix(r=f"{rec['reward']:.3f}", **({"clip": f"{rec['clip_frac']:.2f}"} if "clip_frac" in rec else {}))
        if end_step(step, rec, cfg, r.t0, dist, r.evaluate, r.logger, r.save, r.run, bar):  # eval, log, save
            break
    final = finish_run(step, r.out, r.t0, dist, r.run, r.logger, r.save, r.params,
                       {"rollouts": step * cfg.samples_per_step, "name": cfg.name})
    if cfg.tail_average > 1 and dist.is_main:
        return tail_average(cfg, r.out, final, step)
    return final


def lr_factor(step: int, steps: int, final: float) -> float:
    """The cosine schedule's share of lr at iteration `step` of 1..steps: 1 at the first, `final` at the last."""
    if final == 1.0 or steps == 1:
        return 1.0
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / (steps - 1)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _saved_by(ckpt: Path, step: int, ident: dict) -> bool:
    """ckpt is this run's checkpoint of iteration `step`, not one left in --out by another run: its
    recipe has this run's identity (the keys a resumed run may not change)."""
    try:
        meta = json.loads((ckpt / "config.json").read_text()).get("meta") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("step") == step and identity(meta.get("recipe") or {}) == ident


def tail_average(cfg: GRPOConfig, out: Path, final: Path, step: int) -> Path:
    """out/average: the mean of the weight deltas (over cfg.init) of `final` (at iteration `step`)
    and the step_N checkpoints save_every apart before it, tail_average of them in all (fewer when a
    run stopped early has fewer)."""
    last = (step - 1) // cfg.save_every * cfg.save_every  # the last save_every multiple before `step`
    steps = list(range(last, 0, -cfg.save_every))[: cfg.tail_average - 1]
    ident = identity(cfg)
    paths = [out / f"step_{s:06d}" for s in reversed(steps) if _saved_by(out / f"step_{s:06d}", s, ident)] + [final]
    if len(paths) < cfg.tail_average:
        warnings.warn(f"tail_average: averaging {len(paths)} of the {cfg.tail_average} checkpoints asked for "
                      f"(the run stopped early, or a step_N in {out} is another run's)")
    return average_teachers(paths, out / "average", cfg.init, cfg.name, recipe=to_dict(cfg), rank=cfg.average_rank)


@dataclass
class GRPOUpdate:
    """Phase 4's results: per-term stats, KLs to the base, the last gradient norm, optimizer steps."""
    stats: list = field(default_factory=list)
    kls: list = field(default_factory=list)
    gnorm: float = 0.0
    n_opt: int = 0


def grpo_update(r: GRPORun, ro: Rollout, adv, step: int) -> GRPOUpdate:
    """inner_epochs passes over micro-batches, one optimizer step per grad_accum of them. GRPO: the
    rollout's chunks (exact log-prob recomputation) at a subset of the denoising steps, drawn every
    pass; NFT: micro-batches drawn across the batch at the K noise levels of nft_batch."""
    cfg, backend = r.cfg, r.backend
    upd = GRPOUpdate()
    if cfg.objective == "nft":  # forward process: the final samples noised at K levels; v_old the sampling policy's
        g_nft = cfg.nft_guidance or r.guidance
        nb = nft_batch(backend, ro, adv, cfg, g_nft, r.gen)
    else:
        steps_all = ro.trainable_steps()
        n_train = max(1, round(cfg.timestep_fraction * len(steps_all)))
    acc = Accumulation(r, step)
    for _ in range(cfg.inner_epochs):
        if cfg.objective == "grpo":
            terms = steps_all[:n_train] if cfg.step_selection == "first" else sorted(r.rng.sample(steps_all, n_train))
            chunks = ro.chunks()
        else:
            terms = range(cfg.nft_timesteps)
            chunks = list(torch.randperm(len(ro), generator=r.gen).split(ro.micro_batch or len(ro)))
        order = torch.randperm(len(chunks), generator=r.gen).tolist()
        r.opt.zero_grad(set_to_none=True)
        for k, ci in enumerate(order):
            idx = chunks[ci]
            if cfg.objective == "nft":
                prompts = [ro.prompts[i] for i in idx.tolist()]
                vf = _policy(backend, prompts, g_nft)  # the prompts encoded once per micro-batch
            for j in terms:  # GRPO: the trained denoising steps; NFT: the K noise levels
                if cfg.objective == "grpo":
                    loss, st, kl = grpo_step_loss(backend, ro, adv, cfg, idx, j, r.dist.device)
                else:
                    loss, st, kl = nft_step_loss(backend, nb, vf, prompts, cfg, g_nft, idx, j)
                if kl is not None:
                    upd.kls.append(kl.item())
                acc.backward(loss, len(terms), k, len(order))
                upd.stats.append({k2: v2.item() for k2, v2 in st.items()} | {"loss": loss.item()})
            acc.end_micro_batch(k, len(order))
    upd.gnorm, upd.n_opt = acc.gnorm, acc.n_opt
    return upd


def grpo_record(r: GRPORun, upd: GRPOUpdate, rewards, groups, adv_all, tasks) -> dict:
    """Phase 5's log record over every process: rewards (overall, per group and per task), the
    objective's stats, the KL to the base, the gradient norm."""
    cfg, dist = r.cfg, r.dist
    stats, kls = dist.gather_list(upd.stats), dist.gather_list(upd.kls)
    rec = {"reward": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
           **group_reward_stats(rewards, groups)}
    for t in dict.fromkeys(tasks):
        r_t = rewards[[i for i, s in enumerate(tasks) if s == t]]
        rec[f"reward/{t}"] = r_t.mean().item()
        rec[f"reward_std/{t}"] = r_t.std(unbiased=False).item()
    rec["loss"] = sum(s["loss"] for s in stats) / len(stats)
    if cfg.objective == "grpo":
        rec.update({
            "clip_frac": sum(s["clip_frac"] for s in stats) / len(stats),
            "ratio_mean": sum(s["ratio_mean"] for s in stats) / len(stats),
            "ratio_min": min(s["ratio_min"] for s in stats),
            "ratio_max": max(s["ratio_max"] for s in stats),
            "approx_kl": sum(s["approx_kl"] for s in stats) / len(stats),
        })
    else:
        rec.update({k: sum(s[k] for s in stats) / len(stats) for k in ("fm_mse", "v_shift", "uncond_drift") if k in stats[0]})
    rec.update({"kl_ref": (sum(kls) / len(kls)) if kls else None, "grad_norm": float(upd.gnorm),
                "opt_steps": upd.n_opt, "adv_abs": adv_all.abs().mean().item()})
    return rec


def main_grpo(config_path: str | Path | None, out: str | Path, overrides: list[str] | None = None,
              overwrite: bool = False, resume: bool = False) -> Path:
    """CLI entry: `flowopd grpo --config FILE --out DIR [key=value ...]` -> the final checkpoint."""
    cfg = load(GRPOConfig, config_path, overrides)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but no CUDA GPU is available")
    return train_grpo(cfg, out, overwrite, resume)
