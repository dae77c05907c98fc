"""Cold start of the Flow-OPD student (DESIGN.md section 1, step 2): merge or SFT.

Two ways to give the student a stable start before on-policy distillation:

- ``merge``: the exact weighted sum (default: the average) of the teachers' weight deltas,
      delta_merge = sum_i w_i * delta_i,    delta_i = s_i * B_i @ A_i   (LoRA, s_i = alpha_i / r_i)
  For LoRA teachers on the same base this is done *exactly* by concatenating the factors along
  the rank axis:  A = [A_1; ...; A_k]  (rank R = sum r_i),  B = [w_1 s_1 B_1, ..., w_k s_k B_k],
  alpha = R (scale 1), so that B @ A = sum_i w_i s_i B_i @ A_i. The product of averaged factors,
  mean(B) @ mean(A), is *not* the average of the products and is never used. Teachers that are
  full fine-tunes (or LoRAs over another init) enter as dense deltas (teacher weights - base
  weights); if any teacher is dense, the merge is dense (full weights, no adapter).
- ``sft``: a flow-matching fine-tune (a LoRA on the base) on each teacher's best samples of its
  own task's training prompts: for every prompt the teacher draws `sft_candidates` images (ODE),
  its task's reward scores them (flowopd.rewards), the best one is kept; the LoRA then regresses
  the velocity noise - x0 on these (prompt, image) pairs, with prompt dropout for CFG.
  The samples are kept in out/sft_data and the fine-tune saves its state to out/state every
  `state_every` steps (flowopd.trainers.checkpointing): rerunning the same command on the same
  --out resumes it (bit for bit on the CPU); NaN/Inf losses or gradients skip the step (logged
  to out/sft_log.jsonl) and `max_bad_steps` in a row stop it.

Either way the result is a checkpoint directory loadable by `flowopd.backends.load_checkpoint`
(config.json + full weights in model.safetensors), and, when the cold start is a LoRA,
the adapter alone in adapters/<name>.safetensors with rank/alpha/targets/base in
config.json["adapters"] (the layout GRPO teachers use), which OPD loads as the student's
initial adapter on the very base its teachers share.

This module also reads teacher checkpoints (`read_teacher`), which the distillation stage reuses.
The LoRA arithmetic lives in flowopd.lora; putting a LoRA on a model and reading it back are
Backend methods (`attach_lora`, `read_lora`); the checkpoint writers are the tiny back end's
(flowopd.backends.tiny: `save_lora_checkpoint`, `save_dense_checkpoint`).
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from ..rewards import get_reward
from ..tasks import DEFAULT_TASK_REWARDS
from ..sampling import sample_images
from ..world.prompts import TASKS, sample_prompt
from ..flow import interpolate
from ..losses import flow_matching_loss, logit_normal_sigmas
from ..world.render import to_model_space
from .common import optimizer_step
from .checkpointing import RunState, cached, identity, prepare_out
from .runlog import RunLogger
from ..backends.tiny import (CheckpointError, base_state, load_checkpoint, read_weights, resolve_checkpoint,
                             save_dense_checkpoint, save_lora_checkpoint)
from ..config import ConfigError, build, require, to_dict
from ..lora import Lora, concat_loras, lora_from_state_dict, lora_delta, lora_deltas, svd_lora  # noqa: F401 (re-exported)



# ----------------------------------------------------------------------------- LoRA on a model


def lora_modules_of(backend, targets: list[str]) -> list[str]:
    """Paths of the base model's modules that a LoRA with these target names adapts."""
    out = []
    for name, mod in backend.model.named_modules():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "")  # modules peft has already wrapped
        if name and name.split(".")[-1] in targets and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            out.append(name)
    return list(dict.fromkeys(out))


@dataclass
class TeacherWeights:
    """A teacher (or cold start) as a change of one base: a LoRA, or dense deltas."""

    name: str                                  # its adapter name (the task it teaches)
    path: Path
    lora: Lora | None = None                   # LoRA teachers: unscaled factors
    rank: int = 0
    alpha: float = 0.0
    targets: list[str] = field(default_factory=list)
    dense: dict[str, Tensor] | None = None     # dense teachers: teacher - base, every weight that differs
    tasks: list[str] = field(default_factory=list)   # tasks of its training recipe (if recorded)

    @property
    def kind(self) -> str:
        return "lora" if self.lora is not None else "dense"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def deltas(self) -> dict[str, Tensor]:
        """Dense weight deltas (base key -> delta)."""
        return lora_deltas(self.lora, self.scale) if self.lora is not None else self.dense


def resolve_teacher_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a training run's --out directory holding final/."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        p = p / "final"
    return resolve_checkpoint(p)


def read_teacher(path: str | Path, base: str | Path = "base", name: str | None = None,
                 base_sd: dict | None = None, tol: float = 1e-4) -> TeacherWeights:
    """Read a teacher checkpoint as a change of `base`.

    If it carries a LoRA adapter (adapters/<name>.safetensors, GRPO's layout) and its merged
    weights equal base + that LoRA (max error <= tol * max|W|, i.e. the adapter was trained on
    this very base), it is a LoRA teacher. Otherwise (a full fine-tune, or a LoRA over another
    init) it is a dense teacher: delta = teacher weights - base weights."""
    p = resolve_teacher_dir(path)
    try:
        conf = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}/config.json is not valid JSON: {e}") from None
    recipe = (conf.get("meta") or {}).get("recipe") or {}
    tasks = list(recipe.get("tasks") or [])
    adapters = conf.get("adapters") or {}
    base_sd = base_sd if base_sd is not None else base_state(base)
    full = {k: v.float() for k, v in read_weights(p / "model.safetensors").items()}
    missing = sorted(set(base_sd) - set(full))
    if missing:
        raise CheckpointError(f"{p} is not a teacher on base {base}: weights missing for {missing[:3]}")
    for k in base_sd:
        if full[k].shape != base_sd[k].shape:
            raise CheckpointError(f"{p} is not a teacher on base {base}: shape mismatch for {k}: "
                                  f"teacher {tuple(full[k].shape)}, base {tuple(base_sd[k].shape)}")
    if adapters:
        a_name = name if name in adapters else (next(iter(adapters)) if len(adapters) == 1 else None)
        if a_name is None:
            raise CheckpointError(f"{p} holds adapters {sorted(adapters)}; name one")
        a = adapters[a_name]
        lora = lora_from_state_dict(read_weights(p / a["file"]))
        t = TeacherWeights(name or a_name, p, lora=lora, rank=int(a["rank"]), alpha=float(a["alpha"]),
                           targets=list(a["targets"]), tasks=tasks)
        d = t.deltas()
        err = max(float((full[k] - base_sd[k] - d.get(k, 0.0)).abs().max()) for k in base_sd)
        top = max(float(v.abs().max()) for v in base_sd.values())
        if err <= tol * max(1.0, top):
            return t
        warnings.warn(f"{p}: its adapter {a_name!r} does not sit on this base (max error {err:.2e}); "
                      "using its full weights as a dense delta")
    dense = {k: full[k] - base_sd[k] for k in base_sd if not torch.equal(full[k], base_sd[k])}
    return TeacherWeights(name or (tasks[0] if len(tasks) == 1 else p.parent.name), p, dense=dense, tasks=tasks)


def parse_teachers(teachers) -> list[tuple[str | None, str]]:
    """["compose=runs/a", "runs/b"] or {"compose": "runs/a"} -> [(task or None, path)]."""
    if isinstance(teachers, dict):
        return [(str(k), str(v)) for k, v in teachers.items()]
    out = []
    for t in teachers:
        t = str(t)
        if "=" in t:
            k, v = t.split("=", 1)
            out.append((k, v))
        else:
            out.append((None, t))
    return out


def teacher_task(name: str | None, t: TeacherWeights) -> str:
    """The task a teacher teaches: given, else its recipe's single task, else its adapter name."""
    if name:
        return name
    if len(t.tasks) == 1:
        return t.tasks[0]
    if t.name in TASKS:
        return t.name
    raise ConfigError(f"cannot tell which task teacher {t.path} teaches; pass it as TASK=DIR")


def load_teachers(teachers, base: str | Path = "base") -> dict[str, TeacherWeights]:
    """{task: TeacherWeights} from paths (or TASK=PATH items, or a {task: path} mapping)."""
    base_sd = base_state(base)
    out: dict[str, TeacherWeights] = {}
    for name, path in parse_teachers(teachers):
        t = read_teacher(path, base, name=name, base_sd=base_sd)
        task = teacher_task(name, t)
        if task in out:
            raise ConfigError(f"two teachers for task {task!r}: {out[task].path} and {t.path}")
        t.name = task
        out[task] = t
    if not out:
        raise ConfigError("no teachers given")
    return out


# ----------------------------------------------------------------------------- config


@dataclass
class ColdStartConfig:
    base: str = "base"
    weights: list[float] = field(default_factory=list)  # merge: weight of each teacher (default 1/k)
    adapter_name: str = ""            # name of the saved adapter ("": the method's name)
    # sft
    task_rewards: dict = field(default_factory=dict)    # task -> reward name (default: the task's own)
    sft_prompts_per_task: int = 24    # training prompts per teacher
    sft_candidates: int = 4           # samples per prompt; the best by the task's reward is kept
    sft_sample_steps: int = 20        # ODE steps of the teachers' samples
    sft_cfg: float = 0.0              # 0: the checkpoint's own sampling cfg
    sft_steps: int = 150              # flow-matching steps
    sft_batch: int = 24
    sft_lr: float = 2e-3
    sft_rank: int = 24
    sft_p_uncond: float = 0.1
    state_every: int = 25             # sft: resumable state out/state every N steps (0: only at the end)
    max_bad_steps: int = 5            # sft: non-finite losses / gradients in a row before stopping
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0              # torch CPU threads (0: torch's default)

    def validate(self):
        require(all(w >= 0 for w in self.weights), "weights must be >= 0")
        require(self.sft_prompts_per_task >= 1, "sft_prompts_per_task must be >= 1")
        require(self.sft_candidates >= 1, "sft_candidates must be >= 1")
        require(self.sft_sample_steps >= 1, "sft_sample_steps must be >= 1")
        require(self.sft_steps >= 1, "sft_steps must be >= 1")
        require(self.sft_batch >= 1, "sft_batch must be >= 1")
        require(self.sft_rank >= 1, "sft_rank must be >= 1")
        require(self.sft_lr > 0, "sft_lr must be > 0")
        require(self.state_every >= 0, "state_every must be >= 0")
        require(self.max_bad_steps >= 1, "max_bad_steps must be >= 1")
        require(0 <= self.sft_p_uncond < 1, "sft_p_uncond must be in [0, 1)")
        require(self.num_threads >= 0, "num_threads must be >= 0")


# ----------------------------------------------------------------------------- merge


def merge(teachers: dict[str, TeacherWeights], cfg: ColdStartConfig, out: str | Path, meta: dict) -> Path:
    """Merge cold start: sum_i w_i delta_i (exact; a concatenated LoRA when every teacher is a LoRA)."""
    names = list(teachers)
    w = list(cfg.weights) or [1.0 / len(names)] * len(names)
    require(len(w) == len(names), f"weights has {len(w)} values for {len(names)} teachers")
    ts = [teachers[n] for n in names]
    meta = dict(meta, weights=dict(zip(names, w)))
    if all(t.kind == "lora" for t in ts):
        lora = concat_loras([t.lora for t in ts], [t.scale for t in ts], w)
        rank = sum(t.rank for t in ts)
        targets = sorted(set().union(*[t.targets for t in ts]))
        return save_lora_checkpoint(out, cfg.base, cfg.adapter_name or "merge", lora, rank, float(rank), targets, meta)
    deltas: dict[str, Tensor] = {}
    for t, wi in zip(ts, w):
        for k, d in t.deltas().items():
            deltas[k] = deltas.get(k, 0.0) + wi * d
    return save_dense_checkpoint(out, cfg.base, deltas, dict(meta, note="dense merge (a teacher is not a LoRA)"))


def average_teachers(paths, out: str | Path, base: str | Path, task: str, recipe: dict | None = None,
                     rank: int = 0) -> Path:
    """One teacher of `task` from several runs of its recipe (e.g. other seeds, or one run's last
    checkpoints): the mean of their weight deltas, saved as a teacher checkpoint (adapter `task`;
    meta.recipe `recipe`, else {tasks: [task]}) that the cold starts and `distill` read like any GRPO
    teacher. rank 0: the exact mean (LoRA runs give a LoRA of the summed ranks); rank > 0 (LoRA runs):
    the best rank-`rank` LoRA of that mean by truncated SVD (meta.svd_residual: its relative error),
    so that a merge of teachers, and the student started from it, keeps a small rank."""
    require(len(paths) >= 1, "average_teachers needs at least one run")
    require(rank >= 0, f"rank must be >= 0, got {rank}")
    base_sd = base_state(base)
    ts = {f"run{i}": read_teacher(p, base, base_sd=base_sd) for i, p in enumerate(paths)}
    meta = {"trainer": "teacher_average", "runs": [str(t.path) for t in ts.values()],
            "recipe": recipe or {"tasks": [task]}}
    if rank == 0:
        return merge(ts, ColdStartConfig(base=str(base), adapter_name=task), out, meta)
    require(all(t.kind == "lora" for t in ts.values()), "a rank for the average needs LoRA runs (a run here is dense)")
    deltas: dict[str, Tensor] = {}
    for t in ts.values():
        for k, d in t.deltas().items():
            deltas[k] = deltas.get(k, 0.0) + d / len(ts)
    lora, resid = svd_lora(deltas, [k[: -len(".weight")] for k in deltas], rank)
    targets = sorted(set().union(*[t.targets for t in ts.values()]))
    meta = dict(meta, svd_rank=rank, svd_residual=resid)
    return save_lora_checkpoint(out, base, task, lora, rank, float(rank), targets, meta)


# ----------------------------------------------------------------------------- sft


def best_samples(teacher_dir, task: str, reward_name: str, cfg: ColdStartConfig, rng: random.Random, seed: int):
    """The teacher's best-of-`sft_candidates` ODE sample for each of `sft_prompts_per_task` train
    prompts of its task -> (prompts, uint8 images (n, 32, 32, 3), stats)."""
    backend = load_checkpoint(teacher_dir, cfg.device)
    reward = get_reward(reward_name)
    prompts = [sample_prompt(rng, task, "train").text for _ in range(cfg.sft_prompts_per_task)]
    G = cfg.sft_candidates
    cand = [p for p in prompts for _ in range(G)]
    images = sample_images(backend, cand, steps=cfg.sft_sample_steps, cfg=cfg.sft_cfg or None, seed=seed,
                           progress=False)
    r = reward(images, cand, [{"task": task}] * len(cand)).view(len(prompts), G)  # (n, G)
    best = r.argmax(1)  # (n,)
    keep = (torch.arange(len(prompts)) * G + best).numpy()
    stats = {"reward_mean": float(r.mean()), "reward_best": float(r.max(1).values.mean())}
    return prompts, images[keep], stats


def sft(teachers: dict[str, TeacherWeights], cfg: ColdStartConfig, out: str | Path, meta: dict) -> Path:
    """SFT cold start: a LoRA on the base fit by flow matching to the teachers' best samples."""
    out = Path(out)
    torch.manual_seed(cfg.seed)  # the adapter's initialisation (and the teachers' loading) draw from it
    rng = random.Random(cfg.seed)
    rewards = sft_rewards(teachers, cfg)

    # 1. data: each teacher's best samples of its own task's train prompts (kept in out/sft_data)
    def build_data():
        prompts, images, data_stats = [], [], {}
        for i, (task, t) in enumerate(teachers.items()):
            p, im, st = best_samples(t.path, task, rewards[task], cfg, rng, seed=cfg.seed * 1000 + i)
            prompts += p
            images.append(im)
            data_stats[task] = st
        x = torch.from_numpy(to_model_space(np.concatenate(images)))  # (n, 3, 32, 32)
        return {"x": x}, {"prompts": prompts, "stats": data_stats}

    data, info = cached(out / "sft_data", build_data)
    x_all, prompts, data_stats = data["x"], info["prompts"], info["stats"]
    # 2. flow-matching fine-tune of a LoRA on the base
    device = torch.device(cfg.device)
    backend = load_checkpoint(cfg.base, str(device))
    name = cfg.adapter_name or "sft"
    backend.add_adapter(name, rank=cfg.sft_rank, alpha=cfg.sft_rank)
    params = backend.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    run = RunState(out, {n: p for n, p in backend.net.named_parameters() if p.requires_grad}, opt,
                   every=cfg.state_every, max_bad=cfg.max_bad_steps, generators={"gen": gen},
                   log_name="sft_log.jsonl")
    start = run.resume()  # the newest intact state in out/state, if any
    log = run.logger = RunLogger(out, "sft_log.jsonl", tensorboard=False)
    bar = tqdm(range(start + 1, cfg.sft_steps + 1), desc="coldstart[sft]", mininterval=2, initial=start,
               total=cfg.sft_steps)
    step = start
    for step in bar:
        idx = torch.randint(0, len(prompts), (cfg.sft_batch,), generator=gen)
        x0 = x_all[idx].to(device)
        drop = torch.rand(cfg.sft_batch, generator=gen) < cfg.sft_p_uncond
        batch_prompts = [None if d else prompts[i] for i, d in zip(idx.tolist(), drop.tolist())]
        sigma = logit_normal_sigmas(cfg.sft_batch, generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        v = backend.velocity(interpolate(x0, noise, sigma), sigma, backend.encode_prompts(batch_prompts))
        loss = flow_matching_loss(v, x0, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(opt, params, run, step, math.isfinite(loss.item()), 1.0)  # NaN/Inf: skipped (logged)
        if step % 10 == 0 or step == 1:
            log.log(step, {"loss": loss.item()})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        run.step_done(step)
    run.finish(step)
    log.close()
    lora, rank, alpha, targets = backend.read_lora(name)
    meta = dict(meta, data=data_stats, n_samples=len(prompts))
    return save_lora_checkpoint(out, cfg.base, name, lora, rank, alpha, targets, meta)


def sft_rewards(teachers, cfg: ColdStartConfig) -> dict[str, str]:
    """task -> reward name of each teacher's task; unknown tasks or reward names are errors."""
    rewards = {**DEFAULT_TASK_REWARDS, **cfg.task_rewards}
    for task in teachers:
        if task not in rewards:
            raise ConfigError(f"no reward for task {task!r}; set task_rewards")
        get_reward(rewards[task])
    return {task: rewards[task] for task in teachers}


def standin_teacher(out: str | Path, task: str, base: str | Path = "base", rank: int = 8, scale: float = 0.02,
                    seed: int = 0, targets: list[str] | None = None) -> Path:
    """A development / test aid: a random LoRA perturbation of `base` saved in the layout of a GRPO
    teacher (merged weights + adapters/<task>.safetensors, recipe tasks [task]). Not a teacher of
    anything: it stands in for one while real teachers are being trained."""
    backend = load_checkpoint(base)
    backend.add_adapter(task, rank=rank, alpha=rank, targets=targets)
    lora, r, alpha, tg = backend.read_lora(task)
    g = torch.Generator().manual_seed(seed)
    lora = {m: (torch.randn(A.shape, generator=g) / math.sqrt(A[0].numel()), scale * torch.randn(B.shape, generator=g))
            for m, (A, B) in lora.items()}
    meta = {"trainer": "standin", "recipe": {"tasks": [task], "seed": seed, "scale": scale}}
    return save_lora_checkpoint(out, base, task, lora, r, alpha, tg, meta)


# ----------------------------------------------------------------------------- entry points


def coldstart(method: str, teachers, out: str | Path, cfg: ColdStartConfig | None = None,
              overwrite: bool = False, resume: bool = False) -> Path:
    """Run a cold start ('merge' or 'sft') from teacher checkpoints; write a checkpoint to `out`.

    teachers: paths (a teacher's task is read from its recipe or adapter name), TASK=PATH items,
    or a {task: path} mapping. An `out` holding this cold start's unfinished sft resumes it;
    another run's is refused unless overwrite. Returns `out` (a checkpoint directory)."""
    cfg = cfg or ColdStartConfig()
    if method not in ("merge", "sft"):
        raise ConfigError(f"unknown cold start method {method!r}; use 'merge' or 'sft'")
    t0 = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # bad input (teachers, base, rewards, weights, --out) is refused before anything is written
    ts = load_teachers(teachers, cfg.base)
    if method == "sft":
        sft_rewards(ts, cfg)
    else:
        require(not cfg.weights or len(cfg.weights) == len(ts),
                f"weights has {len(cfg.weights)} values for {len(ts)} teachers")
    out = Path(out)
    prepare_out(out, identity(cfg, method=method, teachers={k: str(t.path) for k, t in ts.items()}),
                overwrite, resume, clear=("state", "sft_data", "sft_log.jsonl"))
    (out / "coldstart.yaml").write_text(yaml.safe_dump(
        {"method": method, "teachers": {k: str(t.path) for k, t in ts.items()}, **to_dict(cfg)}, sort_keys=False))
    meta = {"trainer": "coldstart", "method": method, "teachers": {k: str(t.path) for k, t in ts.items()},
            "kinds": {k: t.kind for k, t in ts.items()}, "recipe": to_dict(cfg)}
    path = (merge if method == "merge" else sft)(ts, cfg, out, meta)
    conf = json.loads((path / "config.json").read_text())
    conf["meta"]["minutes"] = round((time.time() - t0) / 60, 2)
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    return path


def main_coldstart(method: str, teachers, out: str | Path, overrides: list[str] | None = None,
                   overwrite: bool = False, resume: bool = False) -> Path:
    """CLI entry: `flowopd coldstart --method merge|sft --teachers DIR... --out DIR [key=value ...]`.
    overrides: ColdStartConfig keys (e.g. ["sft_steps=300", "weights=[0.5,0.25,0.25]"])."""
    cfg = build(ColdStartConfig, {}, overrides)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but no CUDA GPU is available")
    return coldstart(method, teachers, out, cfg, overwrite, resume)
