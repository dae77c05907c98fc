"""Flow-OPD: on-policy distillation of several task teachers into one student, with MAR.

Stage 2 of the method (DESIGN.md sections 1-2). Everything lives on ONE frozen base model:
  - the teachers are named LoRA adapters on it (one per task: `compose`, `text`, `quality`, ...;
    full fine-tuned teachers are dense weight deltas swapped in for their sub-batch);
  - the student is the LoRA adapter `student` on it, initialised from the cold start: the merge
    cold start of LoRA teachers is the exact concatenated LoRA (rank = sum of the teachers'
    ranks), so the student starts at base + mean(teacher deltas) exactly; the SFT cold start is a
    LoRA on the same base, loaded as is; a dense cold start (a teacher was a full fine-tune) is
    fit by a truncated SVD at rank `student_rank` (an approximation; logged);
  - the MAR anchor is the base with adapters off (`anchor: base`), any teacher (`anchor:
    quality`), a frozen copy of the student's initial adapter (`anchor: init`), or any other LoRA
    (`anchor: lora` + `anchor_lora: PATH`, the authors' `mar_lora`: a frozen adapter with no reward
    that the merge leaves out).

The loop, top to bottom (each iteration of `train_opd`):
  1. rollout: prompts of every task in one mixed batch (or one task per iteration, in turns:
     `task_schedule: alternate`, as the authors' training_mode), SDE trajectories from the student
     (flowopd.rollout; CFG as configured), every state kept;
  2. reward: decode the final states and score them with the teachers' task rewards: logged,
     for `routing: reward|soft` used to route (flowopd.routing), and for the authors' `mixed`,
     `task_only` and `drop_zero_adv` turned into per-prompt group advantages (beyond that mask,
     the direct, pg and kl_only rules never train on them);
  3. route: W (B, K), each sample's weights over the K teachers (task tag by default; with
     `high_noise_routes` a task's samples go to another task's teacher at the high-noise steps);
  4. update: for a subset of the steps (timestep_fraction; random, or the first ones with
     `step_selection: first`) and every micro-batch, the
     routed teachers compute their transition means at the student's own states, batched per
     teacher (TeacherBank.means), and the student minimises
       direct:  mean_k KL(student_k || teacher_k)     (closed form, gradient through its mean)
       pg:      the clipped-ratio loss of GRPO with the per-step advantage
                A_k = -(log pi_s(x_k+1 | x_k) - log pi_t(x_k+1 | x_k)), detached (see below)
       kl_only, mixed, task_only: the Flow-OPD authors' objectives (see below)
     plus MAR  beta * KL(student_k || anchor_k) on every sample (a direct term in every rule);
     the steps are drawn once per rollout and teacher / anchor means are computed once and reused
     by every inner epoch (they depend on the stored states only);
  5. log per task (KL to its teacher, MAR KL, rewards, routing shares) to JSONL (+ tensorboard
     when installed), tqdm bar; checkpoint (merged full weights + adapters/student.safetensors).

Faults (flowopd.trainers.checkpointing): every `state_every` iterations the run state (student
adapter, optimizer, reward scaler, RNG states) goes to out/state; rerunning the same command on
the same --out resumes from the newest intact one, bit for bit on the CPU (the cold start in
out/coldstart is reused). A NaN/Inf loss or gradient skips that optimizer step (logged);
`max_bad_steps` in a row stop the run with a state of the last good weights. Rewards are only
logged (and NaN where a reward cannot read a sample), so they are not checked.

The Flow-OPD authors' objectives (kl_only, mixed, task_only; losses.reward_mode_loss) beside ours
(direct, pg), and every departure from the paper and DESIGN.md with its measurement:
docs/departures.md.

Back ends and processes (flowopd.trainers.common, sd3_teachers, flowopd.parallel): `backend: sd3`
puts the teachers (LoRAs saved by SD3 GRPO runs, or released ones) and the student on one frozen
SD3 transformer, with prompts from files; under `accelerate launch` / `torchrun` each process rolls
out its share of the prompts, rewards are gathered for routing and logs, gradients are averaged,
rank 0 writes. With prompts from files a sample is scored by its own task's reward only, so routing
is by task there.
"""
from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ..rollout import Rollout, STEP_FNS, transition
from ..backends import make_backend
from ..parallel import Dist, noise_mode
from .sd3_teachers import setup_sd3_opd
from ..backends.tiny import LORA_TARGETS
from ..prompt_sources import PromptSources
from ..rewards import get_reward, per_task, task_reward_names
from .checkpointing import RunState, identity, prepare_out
from .common import (EMA, Accumulation, Evaluator, LoopParts, ModelKeys, check_schedule, lora_init_value,
                     resolve_backend_keys, rollout_batch, schedule_counts, score_tasks, start_run,
                     task_counts, end_step, finish_run)
from .runlog import NullLogger, RunLogger
from ..config import ConfigError, _closest, build, load_yaml, require, to_dict
from ..state import atomic_dir
from ..flow import step_kl
from ..losses import (KL_NORMS, REWARD_MODES, group_advantages, group_reward_stats, grpo_loss, mar_loss,
                      opd_direct_loss, opd_pg_advantages, reward_mode_loss, zero_std_groups)
from ..routing import REWARD_SCALES, ROUTING_MODES, RewardScaler, TeacherBank, high_noise_rows, route
from ..world.prompts import TASKS
from ..lora import svd_lora
from .coldstart import (ColdStartConfig, coldstart, load_teachers, lora_modules_of,
                        read_teacher, resolve_teacher_dir)

STUDENT = "student"
ANCHOR = "anchor"  # the adapter name of anchor: lora
RULES = ("direct", "pg", *REWARD_MODES)


@dataclass
class OPDConfig(ModelKeys):  # + backend, model, prompts, precision, noise, eval_* keys (trainers/common.py)
    # models
    base: str = "base"               # the frozen base every teacher, the student and the anchor share
    teachers: dict = field(default_factory=dict)  # task -> teacher checkpoint (a GRPO run's --out or its final/)
    init: str = "merge"              # cold start: "merge" | "sft" (run now, into out/coldstart) | "none" | a checkpoint dir
    merge: str = "delta_average"     # init merge: "delta_average" (the exact mean of the teachers' deltas) | "factor_average"
                                     # (sd3: the authors' scripts/merge.py, mean of the A and B factors at the common rank)
    coldstart: dict = field(default_factory=dict)  # ColdStartConfig overrides for init merge|sft
    student_rank: int = 24           # LoRA rank of the student when init is "none" or a dense checkpoint
    lora_alpha: float = 0.0          # its LoRA alpha (0: = student_rank)
    # prompts
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    task_shares: dict = field(default_factory=dict)   # task -> share of each batch (default equal); alternate: turns
    task_schedule: str = "mixed"     # "mixed": every batch holds every task | "alternate": one task per iteration, in turns
                                     # of task_shares iterations (the Flow-OPD authors' training_mode = "alternate")
    task_rewards: dict = field(default_factory=dict)  # task -> reward name (default: the task's own)
    # routing
    routing: str = "task"            # "task" | "reward" | "soft"
    reward_scale: str = "zscore"     # "zscore" | "rank" | "raw" (reward and soft routing)
    soft_temperature: float = 0.5
    high_noise_routes: dict = field(default_factory=dict)  # task -> teacher task: at the steps whose noise level is
                                     # >= high_noise_sigma (where a layout forms) that task's samples go to that
                                     # teacher instead (the toy world's quality prompts are compose prompts:
                                     # {quality: compose} leaves their layout to the compose teacher)
    high_noise_sigma: float = 0.6
    # update rule
    rule: str = "direct"             # "direct" | "pg" | the Flow-OPD authors' reward modes "kl_only" | "mixed" |
                                     # "task_only" (their train.reward_mode; docs/departures.md)
    pg_advantage: str = "centered"   # "centered" | "sample" | "closed_form" (docs/departures.md)
    clip_range: float = 0.05         # pg and the authors' modes: clipped ratio range
    kl_scale: float = -1.0           # authors' modes: A_kl = kl_scale * KL (their train.kl_scale)
    kl_norm: str = "none"            # authors' modes: "none" | "per_sample" | "per_timestep" | "global" (their train.kl_norm;
                                     # the three z-score the micro-batch's values at one step alike)
    adv_clip: float = 5.0            # authors' modes: advantages clamped to +-adv_clip (their train.adv_clip_max)
    drop_zero_adv: bool = False      # drop samples whose task advantage is 0 from the update (their sample mask)
    step_selection: str = "random"   # the trained steps of a rollout: "random" (a random subset) | "first" (the first
                                     # round(timestep_fraction * N) in order, as Flow-GRPO and the authors' code)
    kl_normalization: str = "exact"  # "exact" | "flow_grpo" (flow.step_kl)
    step_weighting: str = "velocity" # "velocity": each step's KL divided by its KL per unit of velocity
                                     # error (every step counts alike; see step_weights) | "kl": as they are
    # MAR
    beta: float = 0.1                # weight of KL(student || anchor); 0: off
    anchor: str = "base"             # "base" (adapters off) | "init" (the cold start, frozen) | a teacher's task |
                                     # "lora": the LoRA at anchor_lora (the authors' train.mar_lora)
    anchor_lora: str = ""            # anchor "lora": any LoRA (a quality teacher, say): no reward, not merged
    log_anchor_kl: bool = True       # compute (and log) the anchor KL even when beta = 0
    # rollouts
    steps: int = 30                  # OPD iterations (rollout + update)
    prompts_per_step: int = 24       # P prompts per iteration, split over the tasks
    group_size: int = 1              # samples per prompt (OPD needs no groups)
    sample_steps: int = 10           # SDE steps of a rollout
    cfg: float | None = None         # CFG scale of rollouts and training, teachers' too (None: the base's own)
    noise_level: float = 0.7
    shift: float | None = None       # time shift of the sigma grid (None: the back end's: the checkpoint's / scheduler's)
    sampler: str = "sde"             # "sde" | "cps"
    micro_batch: int = 12            # samples per forward (rollout chunks = training micro-batches)
    timestep_fraction: float = 0.3   # share of the steps trained per rollout (drawn once per rollout)
    inner_epochs: int = 2            # passes over those steps (teacher targets are computed once, cached)
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.0           # 0: no EMA; else the saved student is the EMA of its weights
    # bookkeeping
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0             # torch CPU threads (0: torch's default)
    save_every: int = 0              # loadable checkpoint out/step_N every N iterations (0: only out/final)
    state_every: int = 1             # resumable state out/state every N iterations (0: only at the end)
    max_bad_steps: int = 5           # non-finite losses / gradients in a row before stopping
    max_minutes: float = 0.0         # 0: no limit; else stop (and save) after this long
    log_every: int = 1

    def validate(self):
        require(len(self.teachers) >= 1, "teachers must map at least one task to a checkpoint")
        require(len(self.tasks) >= 1, "tasks must name at least one task")
        self.validate_model_keys()
        require(self.routing == "task" or self.toy_tasks_only,
                "routing reward|soft needs rewards that read every prompt (the toy world's); use routing: task")
        for t, s in self.task_shares.items():
            require(t in self.tasks, f"task_shares names {t!r}, which is not in tasks {self.tasks}")
            require(float(s) >= 0, f"task_shares[{t}] must be >= 0")
        check_schedule(self)
        require(self.routing in ROUTING_MODES, f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        for t, k in self.high_noise_routes.items():
            require(t in self.tasks and k in self.teachers,
                    f"high_noise_routes {t}: {k}: {t!r} must be one of tasks {self.tasks} and {k!r} a teacher's task "
                    f"({sorted(self.teachers)})")
        require(0 < self.high_noise_sigma <= 1, "high_noise_sigma must be in (0, 1]")
        if self.routing == "task":
            for t in self.tasks:
                require(t in self.teachers, f"routing 'task' needs a teacher for task {t!r} (teachers: {sorted(self.teachers)})")
        require(self.reward_scale in REWARD_SCALES, f"reward_scale must be one of {REWARD_SCALES}")
        require(self.soft_temperature > 0, "soft_temperature must be > 0")
        require(self.rule in RULES, f"rule must be one of {RULES}, got {self.rule!r}")
        require(self.kl_norm in KL_NORMS, f"kl_norm must be one of {KL_NORMS}, got {self.kl_norm!r}")
        require(self.kl_norm == "none" or self.micro_batch >= 2, "kl_norm needs micro_batch >= 2 (a std over it)")
        require(self.adv_clip > 0, "adv_clip must be > 0")
        require(self.step_selection in ("random", "first"), "step_selection must be 'random' or 'first'")
        require((self.anchor == "lora") == bool(self.anchor_lora), "anchor 'lora' and anchor_lora go together")
        require(self.pg_advantage in ("sample", "centered", "closed_form"),
                f"pg_advantage must be sample, centered or closed_form, got {self.pg_advantage!r}")
        require(self.clip_range > 0, "clip_range must be > 0")
        require(self.kl_normalization in ("exact", "flow_grpo"), "kl_normalization must be 'exact' or 'flow_grpo'")
        require(self.step_weighting in ("kl", "velocity"), "step_weighting must be 'kl' or 'velocity'")
        require(self.beta >= 0, "beta must be >= 0")
        require(self.anchor in ("base", "init", "lora") or self.anchor in self.teachers,
                f"anchor must be 'base', 'init', 'lora' or a teacher's task ({sorted(self.teachers)}), got {self.anchor!r}")
        require(not (self.anchor == "init" and self.init == "none"), "anchor 'init' needs a cold start (init)")
        require(self.student_rank >= 1, "student_rank must be >= 1")
        require(self.merge in ("delta_average", "factor_average"), "merge must be delta_average or factor_average")
        require(self.merge == "delta_average" or self.backend == "sd3", "merge: factor_average is built for backend sd3")
        require(self.steps >= 1, "steps must be >= 1")
        require(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        require(self.group_size >= 1, "group_size must be >= 1")
        require(self.sample_steps >= 1, "sample_steps must be >= 1")
        require((self.cfg is None or self.cfg >= 0) and self.noise_level > 0 and (self.shift is None or self.shift > 0),
                "cfg >= 0, noise_level > 0, shift > 0")
        require(self.num_threads >= 0, "num_threads must be >= 0")
        require(self.sampler in ("sde", "cps"), f"sampler must be 'sde' or 'cps', got {self.sampler!r}")
        require(self.micro_batch >= 1 and self.grad_accum >= 1 and self.inner_epochs >= 1, "micro_batch, grad_accum, inner_epochs must be >= 1")
        require(0 < self.timestep_fraction <= 1, "timestep_fraction must be in (0, 1]")
        require(self.lr > 0, "lr must be > 0")
        require(0 < self.adam_beta2 < 1 and 0 <= self.ema_decay < 1, "adam_beta2 must be in (0, 1), ema_decay in [0, 1)")
        require(self.lora_alpha >= 0, "lora_alpha must be >= 0")
        require(self.weight_decay >= 0, "weight_decay must be >= 0")
        require(self.grad_clip >= 0, "grad_clip must be >= 0 (0: no clipping)")
        require(self.save_every >= 0 and self.state_every >= 0 and self.max_minutes >= 0 and self.log_every >= 1,
                "save_every, state_every and max_minutes must be >= 0, log_every >= 1")
        require(self.max_bad_steps >= 1, "max_bad_steps must be >= 1")
        for k in self.coldstart:
            require(k in ColdStartConfig.__dataclass_fields__,
                    f"unknown coldstart key {k!r}{_closest(k, ColdStartConfig.__dataclass_fields__)}")
        if self.init in ("merge", "sft"):
            build(ColdStartConfig, {k: v for k, v in self.coldstart.items() if k not in ("base", "device")})


# ----------------------------------------------------------------------------- helpers


def sampled_log_ratio(x_next, mean_s, mean_t, step_std, dt, normalization: str = "exact"):
    """Single-sample estimate of the per-step KL at the sampled action, (B,):
        log pi_s(x_next) - log pi_t(x_next) = mean_dims ((x_next - mean_t)^2 - (x_next - mean_s)^2) / (2 std^2)
    (both Gaussians share the std). Its mean over x_next ~ pi_s is step_kl(mean_s, mean_t) with the
    same normalization ("flow_grpo" multiplies by -dt)."""
    diff = ((x_next - mean_t) ** 2 - (x_next - mean_s) ** 2) / (2 * step_std**2)
    lr = diff.flatten(1).mean(1)
    return lr * -dt if normalization == "flow_grpo" else lr


def step_weights(sigmas, steps: list[int], noise_level: float, method: str = "sde", normalization: str = "exact",
                 mode: str = "kl") -> dict[int, float]:
    """Weight of each trained step's loss. "kl": 1. "velocity": (1 / c_j) / mean_k(1 / c_k), where c_j
    is the step's KL per unit of mean squared velocity difference (the KL between the transitions of
    v = 1 and v = 0 from one state): every step then counts its velocity error alike, and the weights
    average to 1. With the exact KL, c_j grows from ~0.013 at sigma = 1 to ~1.6 at the last step of a
    10-step grid, so unweighted KLs all but ignore the high-noise steps that lay out the image."""
    if mode == "kl":
        return {j: 1.0 for j in steps}
    c = {}
    for j in steps:
        x = torch.zeros(1, 1, dtype=torch.float64)
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        one = STEP_FNS[method](x, torch.ones_like(x), s, s_next, noise_level)
        zero = STEP_FNS[method](x, torch.zeros_like(x), s, s_next, noise_level)
        c[j] = float(step_kl(one.mean, zero.mean, one.std, dt=s_next - s, normalization=normalization))
    inv = {j: 1.0 / c[j] for j in steps}
    mean_inv = sum(inv.values()) / len(inv)
    return {j: inv[j] / mean_inv for j in steps}


def opd_step_loss(rule: str, mean_s, log_prob_s, old_log_prob, x_next, target, step_std, dt, *,
                  pg_advantage: str = "sample", clip_range: float = 0.05, normalization: str = "exact",
                  weight: float = 1.0, task_adv=None, keep=None, kl_scale: float = -1.0, kl_norm: str = "none",
                  adv_clip: float = 5.0):
    """The distillation loss of one step for a micro-batch. -> (loss, kl (b,) detached, stats).

    kl_only | mixed | task_only: the Flow-OPD authors' modes (losses.reward_mode_loss), with the
    step's KL undetached, task_adv (b,) the task reward's advantages, keep (b,) the samples kept;
    the loss is multiplied by `weight`.

    direct: mean_b KL(student || target) (flow.step_kl), gradient through the student mean.
    pg:     grpo_loss(log_prob_s, old_log_prob, A) with A = -D * (sampled log-ratio) ("sample"),
            -D * (sampled log-ratio - KL) ("centered") or -D * KL ("closed_form"), detached; D = the
            number of dimensions (log-ratio and KL here are per dimension, A is the full log-ratio)."""
    kl = step_kl(mean_s, target.detach(), step_std, dt=dt, normalization=normalization)  # (b,)
    if rule in REWARD_MODES:
        loss, st = reward_mode_loss(rule, kl, log_prob_s, old_log_prob, task_adv, kl_scale=kl_scale, kl_norm=kl_norm,
                                    adv_clip=adv_clip, clip_range=clip_range, keep=keep)
        return weight * loss, kl.detach(), st
    if rule == "direct":
        return weight * opd_direct_loss(mean_s, target, step_std, dt=dt, normalization=normalization), kl.detach(), {}
    est = sampled_log_ratio(x_next, mean_s.detach(), target.detach(), step_std, dt, normalization)  # (b,)
    signal = {"sample": est, "centered": est - kl.detach(), "closed_form": kl}[pg_advantage]
    # log-probs are averaged over the D dimensions (Flow-GRPO), so the ratio's gradient is 1/D of the
    # full log-prob's; the advantage is the full log-ratio (D times the per-dimension one) so that the
    # expected surrogate gradient is exactly the direct rule's gradient of step_kl (beta means the same)
    D = mean_s[0].numel()
    loss, st = grpo_loss(log_prob_s, old_log_prob, opd_pg_advantages(weight * D * signal), clip_range)
    return loss, kl.detach(), st


def setup_models(cfg: OPDConfig, out: Path, dist=None, teachers: dict | None = None, overwrite: bool = False):
    """Base + teacher adapters + student adapter (+ init anchor) on one backend.
    teachers: load_teachers(cfg.teachers, cfg.base) when already read.
    -> (backend, bank, teacher names, student params, init info)."""
    dist = dist or Dist.create(cfg.device)  # (the process group is joined once; this finds it again)
    if cfg.backend == "sd3":
        return setup_sd3_opd(cfg, out, dist, STUDENT)

    backend = make_backend(cfg, cfg.base, dist.device)
    teachers = teachers if teachers is not None else load_teachers(cfg.teachers, cfg.base)
    bank = TeacherBank(backend)
    names = list(teachers)
    # the student's starting point (the cold start), as a LoRA on the same base
    info = {"init": cfg.init}
    cs = None
    if cfg.init in ("merge", "sft"):
        cs_cfg = build(ColdStartConfig, {"seed": cfg.seed, "num_threads": cfg.num_threads, **cfg.coldstart,
                                         "base": cfg.base, "device": cfg.device})
        if dist.is_main:  # one process computes it, the others read it
            coldstart(cfg.init, {k: str(t.path) for k, t in teachers.items()}, out / "coldstart", cs_cfg,
                      overwrite=overwrite)
        dist.barrier()
        cs = out / "coldstart"
    elif cfg.init != "none":
        cs = resolve_teacher_dir(cfg.init)
    for name in names:  # teachers first; the student is made active last
        bank.add(name, teachers[name])
    if cfg.anchor == "lora":  # a MAR anchor that is neither a teacher nor merged
        bank.add(ANCHOR, read_teacher(cfg.anchor_lora, cfg.base, name=None))
    if cs is None:
        backend.add_adapter(STUDENT, rank=cfg.student_rank, alpha=cfg.lora_alpha or cfg.student_rank,
                            targets=list(cfg.lora_targets) or None, init=lora_init_value(cfg.lora_init, backend))
    else:
        init = read_teacher(cs, cfg.base, name=None)
        info["coldstart"] = str(cs)
        if init.kind == "lora":
            lora, rank, alpha, targets = init.lora, init.rank, init.alpha, init.targets
        else:
            targets = list(LORA_TARGETS)
            lora, resid = svd_lora(init.dense, lora_modules_of(backend, targets), cfg.student_rank)
            rank, alpha = cfg.student_rank, float(cfg.student_rank)
            other = [k for k in init.dense if k[: -len(".weight")] not in lora]
            info["svd_residual"] = resid
            warnings.warn(f"cold start {cs} is dense: student LoRA fit by SVD at rank {rank} "
                          f"(relative residual {resid:.3f}; {len(other)} other changed tensors dropped)")
        if cfg.anchor == "init":
            backend.attach_lora("init", lora, rank, alpha, targets)
        backend.attach_lora(STUDENT, lora, rank, alpha, targets)
    backend.set_adapter(STUDENT)
    params = [p for n, p in backend.model.named_parameters() if "lora_" in n and f".{STUDENT}." in n]
    for p in params:
        p.requires_grad_(True)
    return backend, bank, names, params, info


# ----------------------------------------------------------------------------- the loop


@dataclass(kw_only=True)
class OPDRun(LoopParts):
    """LoopParts plus OPD's teachers, rewards and MAR anchor."""
    bank: TeacherBank
    names: list                       # the teachers' tasks, in W's column order
    info: dict                        # the cold start, for the log and the checkpoint
    reward_fns: dict                  # task -> its teacher's reward
    scaler: RewardScaler
    anchor: str | None                # the MAR anchor's adapter (None: the base)
    task_signal: bool                 # the task reward is trained on (mixed, task_only, drop_zero_adv)
    use_anchor: bool                  # the anchor's means are computed (MAR, or its KL logged)

    def save(self, name: str, step: int) -> Path:
        """out/name: the student (its EMA when there is one) merged into the base, plus its adapter."""
        cfg = self.cfg
        meta = {"trainer": "opd", "step": step, "minutes": round((time.time() - self.t0) / 60, 2),
                "rollouts": step * cfg.prompts_per_step * cfg.group_size, "init": self.info, "recipe": to_dict(cfg)}
        with self.ema.applied() if self.ema is not None else nullcontext(), atomic_dir(self.out / name) as tmp:
            self.backend.save_adapter_checkpoint(tmp, STUDENT, cfg.base, meta)
        return self.out / name


def setup_opd(cfg: OPDConfig, out: Path, overwrite: bool, resume: bool) -> OPDRun:
    """Check the input, prepare --out, build the models, optimizer, EMA and evaluator, resume the
    newest intact state in out/state (if any), write out/config.yaml."""
    t0 = time.time()
    dist, rng, gen = start_run(cfg)
    # bad input (base, teachers, init, rewards, prompt files, --out) is refused before anything is written
    teachers = load_teachers(cfg.teachers, cfg.base) if cfg.backend != "sd3" else None
    if cfg.init not in ("merge", "sft", "none"):
        resolve_teacher_dir(cfg.init)
    reward_names = task_reward_names(cfg.teachers, cfg.task_rewards)
    reward_fns = {t: get_reward(reward_names[t]) for t in cfg.teachers}
    sources = PromptSources(cfg.tasks, cfg.prompts)  # (reads and checks prompt files)
    if dist.is_main:
        prepare_out(out, identity(cfg), overwrite, resume, clear=("state", "train_log.jsonl", "coldstart"))
    dist.barrier()  # the others read out/state only once rank 0 has checked (or cleared) it

    backend, bank, names, params, info = setup_models(cfg, out, dist, teachers, overwrite)
    cfg = resolve_backend_keys(cfg, backend)  # shift, eval_steps: the back end's when unset
    dist.broadcast_parameters(params)
    guidance = float(backend.sampling.get("cfg", 1.0) if cfg.cfg is None else cfg.cfg)
    scaler = RewardScaler(len(names), cfg.reward_scale)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    evaluate = (Evaluator(backend, sources, per_task({t: reward_names[t] for t in names}), cfg, dist, cfg.shift,
                          cfg.micro_batch, ema) if cfg.eval_every else None)
    student = {n: p for n, p in backend.model.named_parameters() if "lora_" in n and f".{STUDENT}." in n}
    run = RunState(out, student, opt, every=cfg.state_every, max_bad=cfg.max_bad_steps,
                   ema=ema.shadow if ema is not None else None,
                   extra={"scaler.mean": scaler.mean, "scaler.var": scaler.var, "scaler.seen": scaler.seen},
                   generators={"gen": gen}, randoms={"rng": rng}, write=dist.is_main)
    start = run.resume()  # the newest intact state in out/state, if any
    if dist.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    logger = run.logger = RunLogger(out, wandb=cfg.wandb, config=to_dict(cfg)) if dist.is_main else NullLogger()
    logger.log(start, {"setup_min": round((time.time() - t0) / 60, 2), "trainable": sum(p.numel() for p in params),
                       "teachers": {n: bank.kind[n] for n in names}, **info})
    return OPDRun(cfg=cfg, out=out, t0=t0, dist=dist, rng=rng, gen=gen, backend=backend, bank=bank, names=names,
                  params=params, info=info, reward_fns=reward_fns, sources=sources, scaler=scaler, opt=opt, ema=ema, run=run,
                  logger=logger, evaluate=evaluate, counts=task_counts(cfg.tasks, cfg.task_shares, cfg.prompts_per_step),
                  per_group=noise_mode(cfg.noise, backend.stream_noise, dist.device, dist.world) == "per_group",
                  grad_accum=dist.local_accum(cfg.grad_accum), guidance=guidance,
                  anchor={"base": None, "lora": ANCHOR}.get(cfg.anchor, cfg.anchor),
                  task_signal=cfg.rule in ("mixed", "task_only") or cfg.drop_zero_adv,
                  use_anchor=cfg.beta > 0 or cfg.log_anchor_kl, start=start)


def train_opd(cfg: OPDConfig, out: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Run Flow-OPD; write out/config.yaml, out/train_log.jsonl, out/state, out/final (and out/step_*).
    An --out holding this run's state resumes from it; another run's is refused unless overwrite.
    -> out/final."""
    r = setup_opd(cfg, Path(out), overwrite, resume)
    cfg, dist = r.cfg, r.dist
    bar = tqdm(range(r.start + 1, cfg.steps + 1), desc=f"opd[{cfg.rule},{cfg.routing}]", mininterval=2,
               initial=r.start, total=cfg.steps, disable=not dist.is_main)
    step = r.start
    for step in bar:
        t_step = time.time()
        # 1. rollout: prompts of every task in one mixed batch (or one task's turn), the student's SDE
        #    trajectories; with several processes every one draws the same prompts and rolls out its share
        counts = schedule_counts(cfg.task_schedule, r.counts, cfg.tasks, cfg.task_shares, step)
        ro: Rollout = rollout_batch(r.backend, r.sources, r.rng, counts, dist, cfg, step, r.gen, r.guidance, r.per_group)
        t_roll = time.time() - t_step

        # 2. reward: every teacher task's reward on the samples it can read (NaN: unread), gathered
        rewards = score_tasks(r.reward_fns, r.backend.decode(ro.final), ro.prompts, ro.tasks, ro.metadata, r.names)
        rewards_all, all_tasks = dist.gather(rewards), dist.gather_list(ro.tasks)  # (B, K), (B,)

        # 3. route: weights (B, K) over the teachers (scaled over the global batch); the authors' task
        #    advantages when the task reward is trained on
        scaled = r.scaler(rewards_all) if cfg.routing != "task" else None
        W_all = route(cfg.routing, all_tasks, r.names, scaled, cfg.soft_temperature)  # (B, K)
        signal = task_signal(r, ro, rewards_all, all_tasks) if r.task_signal else None
        if signal is not None and not r.run.finite(step, "reward", signal.own):  # NaN/Inf reward: no update (logged)
            r.run.step_done(step)
            continue

        # 4. update: per-step KL to the routed teachers (+ MAR) on a subset of the steps
        upd = opd_update(r, ro, dist.local(W_all), signal, step)

        # 5. log (per task: KL to its teacher, MAR KL, its own reward; routing shares), checkpoint
        rec = opd_record(r, upd, rewards_all, all_tasks, W_all, signal)
        rec.update({"sec_rollout": round(t_roll, 2), "sec_step": round(time.time() - t_step, 2),
                    "min": round((time.time() - r.t0) / 60, 2)})
        bar.set_postfix(kl=f"{rec['kl_teacher']:.4f}", mar=f"{rec.get('kl_anchor', 0):.4f}")
        if end_step(step, rec, cfg, r.t0, dist, r.evaluate, r.logger, r.save, r.run, bar):  # eval, log, save
            break
    return finish_run(step, r.out, r.t0, dist, r.run, r.logger, r.save, r.params,
                      {"rule": cfg.rule, "routing": cfg.routing, "beta": cfg.beta})


@dataclass
class TaskSignal:
    """The authors' task-reward terms of one iteration (global batch, and this process's rows)."""
    own: torch.Tensor                 # (B,) each sample's own task reward
    prompts: list                     # (B,) the prompts, which group the samples
    adv_all: torch.Tensor             # (B,) per-prompt group advantages, batch std
    adv: torch.Tensor                 # (b,) this process's
    keep_all: torch.Tensor            # (B,) samples the zero-advantage drop keeps
    keep: torch.Tensor | None         # (b,) this process's, when drop_zero_adv


def task_signal(r: OPDRun, ro: Rollout, rewards_all, all_tasks) -> TaskSignal:
    """Each sample's own task reward turned into the authors' per-prompt group advantages."""
    dist = r.dist
    own = rewards_all[torch.arange(len(all_tasks)), torch.tensor([r.names.index(t) for t in all_tasks])]
    prompts_all = dist.gather_list(ro.prompts)
    adv_all = group_advantages(own, prompts_all, std_scope="batch", clip=None)
    keep_all = ~zero_std_groups(own, prompts_all)
    return TaskSignal(own, prompts_all, adv_all, dist.local(adv_all).to(dist.device), keep_all,
                      dist.local(keep_all.to(dist.device)) if r.cfg.drop_zero_adv else None)


@dataclass
class OPDUpdate:
    """Phase 4's results: per-sample KL sums to the teacher and the anchor (this process's rows),
    per-micro-batch stats, the last gradient norm and the optimizer steps taken."""
    kl_sum: torch.Tensor
    kl_n: torch.Tensor
    mar_sum: torch.Tensor
    mar_n: torch.Tensor
    stats: list = field(default_factory=list)
    gnorm: float = 0.0
    n_opt: int = 0


def opd_update(r: OPDRun, ro: Rollout, W, signal: TaskSignal | None, step: int) -> OPDUpdate:
    """inner_epochs passes over the rollout's micro-batches (shuffled) and a subset of its steps,
    drawn once per rollout; the teachers' and anchor's means at the stored states are computed once
    and reused by every pass. One optimizer step per grad_accum micro-batches."""
    cfg = r.cfg
    steps_all = ro.trainable_steps()
    n_train = max(1, round(cfg.timestep_fraction * len(steps_all)))
    w_step = step_weights(ro.sigmas, steps_all, cfg.noise_level, cfg.sampler, cfg.kl_normalization, cfg.step_weighting)
    B = len(ro)
    upd = OPDUpdate(torch.zeros(B), torch.zeros(B), torch.zeros(B), torch.zeros(B))
    cache: dict = {}  # (chunk, step) -> (teacher target mean, anchor mean): states do not change
    chunks = ro.chunks()
    train_steps = (steps_all[:n_train] if cfg.step_selection == "first"  # the same steps in every inner epoch
                   else sorted(r.rng.sample(steps_all, n_train)))
    acc = Accumulation(r, step)
    for _ in range(cfg.inner_epochs):
        order = torch.randperm(len(chunks), generator=r.gen).tolist()
        r.opt.zero_grad(set_to_none=True)
        for k, ci in enumerate(order):
            idx = chunks[ci]
            for j in train_steps:
                if (ci, j) not in cache:  # teachers (and the anchor) at the student's own states, no gradients
                    cache[(ci, j)] = targets(r, ro, idx, j, W)
                loss = opd_micro_loss(r, ro, idx, j, *cache[(ci, j)], w_step[j], signal, upd)
                acc.backward(loss, len(train_steps), k, len(order))
            acc.end_micro_batch(k, len(order))
    upd.gnorm, upd.n_opt = acc.gnorm, acc.n_opt
    return upd


def targets(r: OPDRun, ro: Rollout, idx, j: int, W):
    """The routed teachers' transition mean and the anchor's (None when unused) at step j of the
    samples idx, without gradients."""
    W = high_noise_rows(W, ro.tasks, float(ro.sigmas[j]), r.cfg.high_noise_routes, r.cfg.high_noise_sigma, r.names)
    target = r.bank.means(ro, idx, j, W[idx], r.names)
    anc = None
    if r.use_anchor:
        with torch.no_grad(), r.bank.use(r.anchor):
            anc = transition(r.backend, ro, idx, j).mean
    return target, anc


def opd_micro_loss(r: OPDRun, ro: Rollout, idx, j: int, target, anc, weight: float, signal: TaskSignal | None,
                   upd: OPDUpdate):
    """The student's loss at step j of the samples idx: the rule's term plus MAR (on the kept samples
    under drop_zero_adv); the KLs to the teacher and the anchor are added to upd's sums."""
    cfg = r.cfg
    keep = None if signal is None or signal.keep is None else signal.keep[idx]
    tr = transition(r.backend, ro, idx, j)  # the student's transition, with gradients
    dt = float(ro.sigmas[j + 1] - ro.sigmas[j])
    loss, kl, st = opd_step_loss(cfg.rule, tr.mean, tr.log_prob, ro.log_probs[idx, j].to(r.dist.device),
                                 tr.sample, target, tr.std, dt, pg_advantage=cfg.pg_advantage,
                                 clip_range=cfg.clip_range, normalization=cfg.kl_normalization,
                                 weight=weight, task_adv=None if signal is None else signal.adv[idx],
                                 keep=keep, kl_scale=cfg.kl_scale, kl_norm=cfg.kl_norm, adv_clip=cfg.adv_clip)
    upd.kl_sum[idx] += kl.cpu()
    upd.kl_n[idx] += 1
    if anc is not None:
        mar_kl = step_kl(tr.mean.detach(), anc, tr.std, dt=dt, normalization=cfg.kl_normalization)
        upd.mar_sum[idx] += mar_kl.cpu()
        upd.mar_n[idx] += 1
        if cfg.beta > 0 and keep is None:
            loss = loss + weight * mar_loss(tr.mean, anc, tr.std, cfg.beta, dt=dt, normalization=cfg.kl_normalization)
        elif cfg.beta > 0 and bool(keep.any()):  # MAR on the kept samples only
            mar = step_kl(tr.mean, anc, tr.std, dt=dt, normalization=cfg.kl_normalization)
            loss = loss + weight * cfg.beta * mar[keep].mean()
    upd.stats.append({k: v.item() for k, v in st.items()} | {"loss": loss.item()})
    return loss


def opd_record(r: OPDRun, upd: OPDUpdate, rewards, tasks, W, signal: TaskSignal | None) -> dict:
    """Phase 5's log record over every process: loss, the rule's stats, per task the KL to its
    teacher and the anchor, its own reward and (reward / soft routing) its routing shares."""
    cfg, dist, names = r.cfg, r.dist, r.names
    stats = dist.gather_list(upd.stats)
    kl_sum, kl_n, mar_sum, mar_n = (dist.gather(x) for x in (upd.kl_sum, upd.kl_n, upd.mar_sum, upd.mar_n))
    rec = {"loss": sum(s["loss"] for s in stats) / len(stats), "grad_norm": upd.gnorm, "opt_steps": upd.n_opt}
    if cfg.rule != "direct":
        for key in ("clip_frac", "ratio_mean", "approx_kl"):
            got = [s[key] for s in stats if key in s]
            rec[key] = sum(got) / max(1, len(got))
    if signal is not None:
        rec.update(group_reward_stats(signal.own, signal.prompts))
        rec["task_adv_abs"] = signal.adv_all.abs().mean().item()
        if cfg.drop_zero_adv:
            rec["kept"] = signal.keep_all.float().mean().item()
    kl_i, mar_i = kl_sum / kl_n.clamp_min(1), mar_sum / mar_n.clamp_min(1)
    rec["kl_teacher"] = kl_i.mean().item()
    if mar_n.sum() > 0:
        rec["kl_anchor"] = mar_i.mean().item()
    for t in dict.fromkeys(tasks):
        rows = [i for i, s in enumerate(tasks) if s == t]
        rec[f"kl_teacher/{t}"] = kl_i[rows].mean().item()
        if mar_n.sum() > 0:
            rec[f"kl_anchor/{t}"] = mar_i[rows].mean().item()
        if t in names:
            got = rewards[rows, names.index(t)]
            rec[f"reward/{t}"] = got[~torch.isnan(got)].mean().item()
        if cfg.routing != "task":
            for kk, n in enumerate(names):
                rec[f"route/{t}->{n}"] = W[rows, kk].mean().item()
    if cfg.routing != "task" and cfg.reward_scale == "zscore":
        rec["reward_stats"] = {n: [round(m, 4), round(s, 4)] for n, m, s in
                               zip(names, r.scaler.state()["mean"], r.scaler.state()["std"])}
    return rec


# ----------------------------------------------------------------------------- entry point


def split_dotted(data: dict, overrides: list[str] | None, dict_keys=("teachers", "task_shares", "task_rewards", "coldstart")):
    """Fold `teachers.compose=DIR`-style overrides into the mapping fields; return the rest."""
    rest = []
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides or []:
        k, sep, v = item.lstrip("-").partition("=")
        head, dot, sub = k.partition(".")
        if sep and dot and head.replace("-", "_") in dict_keys:
            head = head.replace("-", "_")
            data.setdefault(head, {})
            data[head][sub] = yaml.safe_load(v) if head != "teachers" else v
        else:
            rest.append(item)
    return data, rest


def load_config(config_path: str | Path | None, overrides: list[str] | None = None) -> OPDConfig:
    """OPDConfig from a YAML file plus key=value overrides (`teachers.text=DIR` sets one teacher)."""
    data, rest = split_dotted(load_yaml(config_path) if config_path else {}, overrides)
    return build(OPDConfig, data, rest)


def main_distill(config_path: str | Path | None, out: str | Path, overrides: list[str] | None = None,
                 overwrite: bool = False, resume: bool = False) -> Path:
    """CLI entry: `flowopd distill --config FILE --out DIR [key=value ...]` -> the final checkpoint."""
    cfg = load_config(config_path, overrides)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but no CUDA GPU is available")
    return train_opd(cfg, out, overwrite, resume)
