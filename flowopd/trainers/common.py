"""What the GRPO and OPD trainers share beyond the toy world: the model keys of their configs
(which back end, which model, precision, LoRA shape, prompt files, noise, evaluation), adding the
trained LoRA on either back end, a parameter EMA, and periodic evaluation.

Config keys (`ModelKeys`, a base of GRPOConfig and OPDConfig):
  backend                 "tiny" (the toy world's model; its checkpoint is GRPO's `init`, OPD's `base`)
                          or "sd3" (flowopd.backends.sd3 over diffusers)
  model                   sd3: a diffusers StableDiffusion3Pipeline directory or hub id (--model)
  resolution, dtype       sd3: image side in pixels (null: the pipeline's own, sample_size x VAE factor);
                          dtype of the frozen weights (fp32 | bf16 | fp16)
  mixed_precision         sd3: none | fp16 | bf16: the transformer under torch.autocast to that dtype
  max_sequence_length     sd3: T5 tokens of the prompt embedding
  gradient_checkpointing  sd3: recompute the transformer's activations in the backward pass
  lora_init               "" (the back end's default: gaussian for sd3, peft's default for tiny),
                          "gaussian" or "default"
  lora_targets            module names the LoRA adapts ([]: the back end's default)
  prompts                 {task: file or Flow-GRPO dataset dir} or one file (flowopd.prompt_sources);
                          toy tasks without one use the toy grammar
  noise                   auto | stream | per_group (flowopd.parallel.noise_mode)
  eval_every              0: off; n: every n iterations (and after the last) sample the test
                          prompts with the ODE and log eval/reward[/task]
  eval_steps, eval_cfg    ODE steps and CFG of that evaluation (null: the model's own)
  eval_prompts            test prompts per task (0: the whole test split)
  adam_eps                AdamW's epsilon
  wandb                   "" (off) or a Weights & Biases project: log there too (pip install flowopd[wandb])

Keys that depend on the back end take its value when unset (null): the trainers' `shift` and `cfg`,
`eval_steps`, `eval_cfg` and `resolution` (resolve_backend_keys); the tiny checkpoint's sampling shift
is 1.0, SD3's the scheduler's (3.0 for SD3.5).
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..flow import ode_sample, sigma_grid
from ..parallel import Dist, group_noise, param_checksum
from ..sampling import guided_velocity
from ..routing import score_all
from ..rollout import rollout
from ..config import ConfigError, require
from ..state import fault_point
from ..world.prompts import TASKS

BACKENDS = ("tiny", "sd3")
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


@dataclass
class ModelKeys:
    backend: str = "tiny"
    model: str = ""
    resolution: int | None = None
    dtype: str = "bf16"
    mixed_precision: str = "none"
    max_sequence_length: int = 128
    gradient_checkpointing: bool = False
    lora_init: str = ""
    lora_targets: list[str] = field(default_factory=list)
    prompts: dict | str = field(default_factory=dict)
    noise: str = "auto"
    eval_every: int = 0
    eval_steps: int | None = None
    eval_cfg: float | None = None
    eval_prompts: int = 0
    adam_eps: float = 1e-8
    wandb: str = ""

    def validate_model_keys(self):
        require(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "tiny":
            require(not self.model, "model names a diffusers pipeline for backend: sd3; the tiny back end's "
                                    "checkpoint is `init` (grpo) or `base` (distill)")
        else:
            require(bool(self.model), "backend sd3 needs model: a StableDiffusion3Pipeline directory or hub id "
                                      "(e.g. --model stabilityai/stable-diffusion-3.5-medium)")
        require(self.resolution is None or self.resolution >= 8, "resolution must be >= 8")
        require(self.dtype in DTYPES, f"dtype must be one of fp32, bf16, fp16, got {self.dtype!r}")
        require(self.mixed_precision in ("none", "fp16", "bf16"),
                f"mixed_precision must be none, fp16 or bf16, got {self.mixed_precision!r}")
        require(self.max_sequence_length >= 1, "max_sequence_length must be >= 1")
        require(self.lora_init in ("", "default", "gaussian"),
                f"lora_init must be '', 'default' or 'gaussian', got {self.lora_init!r}")
        require(self.noise in ("auto", "stream", "per_group"), f"noise must be auto, stream or per_group, got {self.noise!r}")
        require(self.eval_every >= 0 and (self.eval_steps is None or self.eval_steps >= 1) and self.eval_prompts >= 0,
                "eval_every and eval_prompts must be >= 0, eval_steps >= 1")
        require(self.eval_cfg is None or self.eval_cfg >= 0, "eval_cfg must be >= 0")
        require(self.adam_eps > 0, "adam_eps must be > 0")
        if isinstance(self.prompts, dict):
            for t, src in self.prompts.items():
                require(isinstance(src, str) and bool(src), f"prompts[{t}] must be a file or directory path")
        has_file = isinstance(self.prompts, str) and bool(self.prompts)
        for t in self.tasks:
            require(t in TASKS or has_file or t in (self.prompts or {}),
                    f"unknown task {t!r}: not a toy task ({', '.join(TASKS)}); give its prompts (prompts: {{{t}: FILE}})")

    @property
    def toy_tasks_only(self) -> bool:
        return all(t in TASKS for t in self.tasks) and not self.prompts


def resolve_backend_keys(cfg, backend):
    """A copy of cfg whose back-end-dependent keys left unset (None) take the back end's sampling
    defaults: shift (the grid of rollouts and evaluation) and eval_steps. (cfg and eval_cfg are
    resolved where they are used, to the same `backend.sampling`.)"""
    changes = {}
    if getattr(cfg, "shift", 0) is None:
        changes["shift"] = float(backend.sampling.get("shift", 1.0))
    if cfg.eval_steps is None:
        changes["eval_steps"] = int(backend.sampling.get("steps", 40))
    return replace(cfg, **changes) if changes else cfg


def lora_init_value(setting: str, backend):
    """peft's init_lora_weights for a config's lora_init ("" = the back end's own default)."""
    if setting == "gaussian":
        return "gaussian"
    if setting == "default":
        return True
    return backend.default_lora_init


def add_trained_adapter(backend, name: str, rank: int, alpha: float, cfg: ModelKeys) -> None:
    """Add the LoRA a trainer trains, active and trainable, on either back end."""
    targets = list(cfg.lora_targets) or None
    init = lora_init_value(cfg.lora_init, backend)
    backend.add_adapter(name, rank=rank, alpha=alpha, targets=targets, init=init, trainable=True)


class EMA:
    """Exponential moving average of parameters: ema <- decay * ema + (1 - decay) * p after each
    optimizer step; `applied()` swaps the averages in (to save or evaluate) and the live values back."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for e, p in zip(self.shadow, self.params):
            e.lerp_(p.detach(), 1 - self.decay)

    @contextmanager
    def applied(self):
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.shadow):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)


@dataclass
class LoopParts:
    """What a GRPO or OPD run holds from its set-up to its end (the trainers' setup_* build it)."""
    cfg: object
    out: Path
    t0: float
    dist: Dist
    rng: random.Random                # prompt, window and step draws (the same on every process)
    gen: torch.Generator              # this process's noise and shuffles
    backend: object
    sources: object                   # the tasks' prompts (PromptSources)
    params: list                      # the trained tensors
    opt: torch.optim.Optimizer
    ema: EMA | None
    run: object                       # the resumable state (checkpointing.RunState)
    logger: object
    evaluate: Evaluator | None
    counts: dict                      # prompts per task in a mixed batch
    per_group: bool                   # noise drawn per prompt group (seeded), not from gen
    grad_accum: int                   # this process's micro-batches per optimizer step
    guidance: float
    start: int                        # the last finished iteration (0, or the resumed state's)


def task_counts(tasks: list[str], shares: dict, n: int) -> dict[str, int]:
    """How many of the n prompts of each batch come from each task (largest remainder)."""
    s = {t: float(shares.get(t, 1.0)) for t in tasks}
    total = sum(s.values())
    if total <= 0:
        raise ConfigError("task_shares must not all be 0")
    exact = {t: n * v / total for t, v in s.items()}
    counts = {t: int(exact[t]) for t in tasks}
    for t in sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)[: n - sum(counts.values())]:
        counts[t] += 1
    return counts


def end_step(step: int, rec: dict, cfg, t0: float, dist, evaluate, logger, save, run, bar) -> bool:
    """The tail of a GRPO or OPD iteration: evaluate (every eval_every steps, at the last one and at
    the time limit; the EMA weights when there is one), log, keep a step_* checkpoint (save_every),
    mark the step done (run state). -> True when max_minutes is spent (every process agrees)."""
    stop = dist.any(bool(cfg.max_minutes) and time.time() - t0 > cfg.max_minutes * 60)
    if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps or stop):
        rec.update(evaluate())
    if step % cfg.log_every == 0 or step == 1:
        logger.log(step, rec)
    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps and dist.is_main:
        save(f"step_{step:06d}", step)
    run.step_done(step)
    if stop:
        bar.write(f"time limit reached at step {step}")
    return stop


def finish_run(step: int, out: Path, t0: float, dist, run, logger, save, params, summary: dict) -> Path:
    """The end of a GRPO or OPD run: the final run state and checkpoint (rank 0), out/summary.json
    (steps, minutes, `summary`, one parameter checksum per process: equal iff the replicas agree).
    -> out/final."""
    run.finish(step)
    final = save("final", step) if dist.is_main else out / "final"
    logger.close()
    checksums = dist.gather_list([param_checksum(params)])
    if dist.is_main:
        (out / "summary.json").write_text(json.dumps(
            {"steps": step, "minutes": round((time.time() - t0) / 60, 2), **summary, "processes": dist.world,
             "param_checksums": checksums}))
    dist.close()
    return final


def optimizer_step(opt, params, run, step: int, loss_ok: bool, grad_clip: float, dist=None, ema=None) -> tuple[float, bool]:
    """The one update every trainer takes once its gradients are accumulated: average them across
    processes (dist), clip to grad_clip (<= 0: no clipping, the norm is still measured), skip the
    step on a NaN/Inf loss or gradient (run.update_ok logs it and stops a stream of them), else
    step the optimizer and the EMA; the gradients are cleared either way. -> (grad norm, stepped)."""
    if dist is not None:
        dist.average_gradients(params)
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    stepped = run.update_ok(step, loss_ok, gnorm)
    if stepped:
        opt.step()
        if ema is not None:
            ema.update()
        fault_point("update", step)
    opt.zero_grad(set_to_none=True)
    return gnorm, stepped


class Accumulation:
    """Gradient accumulation of one iteration's update: each micro-batch's terms go backward scaled
    so that a group of grad_accum micro-batches (the last group may be smaller) sums to its mean;
    after each group, optimizer_step. Tracks the last gradient norm and the steps taken."""

    def __init__(self, parts: "LoopParts", step: int):
        self.p, self.step = parts, step
        self.ok, self.gnorm, self.n_opt = True, 0.0, 0

    def backward(self, loss, n_terms: int, k: int, n_chunks: int) -> None:
        """loss: one of n_terms terms of the k-th of n_chunks micro-batches."""
        ga = self.p.grad_accum
        n_in_group = min(ga, n_chunks - (k // ga) * ga)
        (loss / (n_terms * n_in_group)).backward()
        self.ok = self.ok and math.isfinite(loss.item())

    def end_micro_batch(self, k: int, n_chunks: int) -> None:
        if (k + 1) % self.p.grad_accum == 0 or k == n_chunks - 1:
            p = self.p
            self.gnorm, stepped = optimizer_step(p.opt, p.params, p.run, self.step, self.ok, p.cfg.grad_clip, p.dist, p.ema)
            self.n_opt += stepped
            self.ok = True


class Evaluator:
    """Evaluation during training (eval_every): one ODE sample (eval_steps, eval_cfg, the training
    shift) of each test prompt of every task, scored by `reward_fn` (the training reward for GRPO,
    each task's teacher reward for OPD). Noise is drawn per prompt (seed, prompt index), so the
    numbers do not depend on the number of processes; prompts are shared out across processes and
    the rewards gathered. With an `ema` (EMA), it evaluates the EMA weights, which are what the
    checkpoints hold (as Flow-GRPO evaluates its EMA), and puts the live ones back."""

    def __init__(self, backend, sources, reward_fn, cfg, dist, shift: float, micro_batch: int, ema=None):
        self.backend, self.reward_fn, self.dist, self.ema = backend, reward_fn, dist, ema
        self.items = sources.eval_set(cfg.eval_prompts)
        self.steps, self.shift, self.seed, self.mb = cfg.eval_steps, shift, cfg.seed, micro_batch
        self.cfg = float(backend.sampling.get("cfg", 1.0) if cfg.eval_cfg is None else cfg.eval_cfg)

    def __call__(self) -> dict:
        with self.ema.applied() if self.ema is not None else nullcontext():
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict:
        b, dev = self.backend, self.backend.device
        mine = self.dist.mine(len(self.items))
        noise = group_noise(self.seed, -1, mine, 1, 0, tuple(b.latent_shape()))[:, 0]  # (n, C, H, W)
        sigmas = sigma_grid(self.steps, self.shift).to(dev)
        got = []
        for i in range(0, len(mine), self.mb):
            items = [self.items[k] for k in mine[i:i + self.mb]]
            prompts = [p for p, _, _ in items]
            cond = b.encode_prompts(prompts)
            uncond = b.encode_prompts([None] * len(prompts)) if self.cfg != 1.0 else None
            x = ode_sample(guided_velocity(b, cond, uncond, self.cfg), noise[i:i + self.mb].to(dev), sigmas)
            meta = [dict(m, task=t) for _, t, m in items]
            r = self.reward_fn(b.decode(x), prompts, meta)
            got += [(t, float(v)) for (_, t, _), v in zip(items, r.tolist())]
        got = self.dist.gather_list(got)
        rec = {"eval/reward": sum(v for _, v in got) / max(1, len(got)), "eval/n": len(got)}
        for t in dict.fromkeys(t for t, _ in got):
            vals = [v for s, v in got if s == t]
            rec[f"eval/reward/{t}"] = sum(vals) / len(vals)
        return rec


def score_tasks(reward_fns: dict, images, prompts, tasks, metadata, names) -> torch.Tensor:
    """(B, K) rewards of the K teacher tasks `names` for OPD's logging and routing. Toy prompts: every
    reward on the samples it can read (flowopd.routing.score_all). Prompts from files: each sample
    scored by its own task's reward only, with its metadata (NaN elsewhere): a GenEval reward cannot
    read an OCR prompt."""
    if all(t in TASKS for t in list(tasks) + list(names)):
        return score_all(reward_fns, images, prompts, names)
    out = torch.full((len(prompts), len(names)), float("nan"))
    for k, t in enumerate(names):
        idx = [i for i, s in enumerate(tasks) if s == t]
        if idx:
            out[idx, k] = reward_fns[t](images[idx], [prompts[i] for i in idx], [metadata[i] for i in idx]).float()
    return out


TASK_SCHEDULES = ("mixed", "alternate")


def schedule_counts(schedule: str, counts: dict, tasks: list, shares: dict, step: int) -> dict:
    """The prompts of iteration `step` (1-based) per task. "mixed": `counts` (every task in every
    batch, by its share). "alternate": the whole batch from one task, the tasks taking turns in
    order, each for share-many iterations (the Flow-OPD authors' training_mode = "alternate" with
    epochs_per_cycle = the share: 3:1:1 runs geneval, geneval, geneval, ocr, pickscore, ...)."""
    if schedule == "mixed":
        return counts
    cycle = [t for t in tasks for _ in range(int(shares.get(t, 1)))]
    return {cycle[(step - 1) % len(cycle)]: sum(counts.values())}


def check_schedule(cfg) -> None:
    """Config check of task_schedule (alternate: whole-number shares, not all 0)."""
    require(cfg.task_schedule in TASK_SCHEDULES, f"task_schedule must be one of {TASK_SCHEDULES}")
    if cfg.task_schedule == "alternate":
        shares = [cfg.task_shares.get(t, 1) for t in cfg.tasks]
        require(all(float(s) == int(s) for s in shares) and sum(int(s) for s in shares) > 0,
                "task_schedule alternate takes whole-number task_shares (iterations per turn)")


def rollout_batch(backend, sources, rng, counts: dict, dist, cfg, step: int, generator, guidance: float,
                  per_group: bool, window=None, **kw):
    """Phase 1 of the GRPO and OPD loops: draw the iteration's prompts (the same on every process)
    and roll out this process's share of them (`dist.mine`), noise per prompt group when
    `per_group` (seeded by (seed, iteration, group)), else from `generator`. `window()`, called
    after the draw, gives the SDE steps (None: all); `kw` goes to flowopd.rollout.rollout
    (shared_noise). -> the Rollout."""
    prompts, tasks, meta = sources.draw_batch(rng, counts)
    mine = dist.mine(len(prompts))
    noise = group_noise(cfg.seed, step, mine, cfg.group_size, cfg.sample_steps,
                        tuple(backend.latent_shape())) if per_group else None
    return rollout(backend, [prompts[i] for i in mine], [tasks[i] for i in mine], cfg.group_size,
                   steps=cfg.sample_steps, cfg=guidance, noise_level=cfg.noise_level, shift=cfg.shift,
                   method=cfg.sampler, micro_batch=cfg.micro_batch, generator=generator,
                   metadata=[meta[i] for i in mine], noise=noise,
                   sde_steps=window() if window is not None else None, **kw)


def start_run(cfg):
    """The common start of the GRPO and OPD loops: join the processes (one, or this one's share of
    an accelerate/torchrun launch), check the batch splits over them, seed torch, set the CPU
    threads. -> (dist, rng: the prompt/step draws, identical on every process, gen: this
    process's noise and shuffles)."""
    dist = Dist.create(cfg.device)
    dist.check_batch(cfg.prompts_per_step)
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    return dist, random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed + dist.rank)
