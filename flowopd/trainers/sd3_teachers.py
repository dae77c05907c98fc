"""Models of the SD3 stages: the LoRA a GRPO run starts from, and OPD's teachers, student and anchor
as named adapters on ONE frozen SD3 transformer (flowopd.backends.sd3.SD3Backend).

A teacher is a LoRA, found at any of:
  - a GRPO run's --out directory, or its final/ (or step_*/) checkpoint: config.json with backend sd3
    and adapters/<name>/ in diffusers' LoRA format (what `flowopd grpo` with backend sd3 writes);
  - a directory or file in diffusers' LoRA format (pytorch_lora_weights.safetensors), or peft's
    (adapter_config.json + adapter_model.safetensors, e.g. Flow-GRPO's released checkpoints);
  - a hub id of either.

The OPD student starts from (`init`):
  - merge: the exact weighted sum of the teachers' LoRA deltas, as one LoRA of rank sum(r_i): the
    factors concatenated along the rank axis (flowopd.lora.concat_loras; the same
    algebra as the toy merge), weights from coldstart.weights (default: the mean); it is written to
    OUT/coldstart as a checkpoint;
  - sft: a fresh student LoRA fit by flow matching to the teachers' best samples (sft_coldstart):
    each teacher samples `coldstart.sft_candidates` ODE images for each of
    `coldstart.sft_prompts_per_task` training prompts of its task, its task's reward keeps the best
    latent of each prompt, and the student regresses the velocity noise - x0 on those latents at
    time-shifted logit-normal noise levels, with prompt dropout for CFG; written to OUT/coldstart
    (reused when OUT/coldstart is there: a resumed run does not redo it);
  - none: a fresh LoRA (student_rank, lora_alpha, lora_init, lora_targets);
  - a LoRA path (any of the forms above), e.g. an earlier cold start, trained from there.
The MAR anchor of `anchor: lora` (anchor_lora) is one more frozen adapter, `anchor`.
"""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import torch

from ..backends import make_backend
from ..config import ConfigError, build
from ..flow import interpolate, ode_sample, sigma_grid, time_shift
from ..lora import concat_loras
from ..losses import flow_matching_loss, logit_normal_sigmas
from ..prompt_sources import PromptSources
from ..rewards import get_reward
from ..routing import TeacherBank
from ..sampling import guided_velocity
from .coldstart import ColdStartConfig
from .common import add_trained_adapter, lora_init_value


def resolve_lora(path: str | Path, base_model: str | None = None) -> str | Path:
    """A LoRA location as `SD3Backend.load_lora` takes it. flowopd SD3 checkpoints (and run
    directories holding final/) resolve to their one adapter's directory; a checkpoint trained on
    another base than `base_model` gives a warning."""
    p = Path(path)
    if not p.is_dir():
        return path
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        p = p / "final"
    conf_file = p / "config.json"
    if not conf_file.is_file():
        return p  # a diffusers or peft LoRA directory
    try:
        conf = json.loads(conf_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{conf_file} is not valid JSON: {e}") from None
    if conf.get("backend") != "sd3":
        raise ConfigError(f"{p} is a {conf.get('backend')!r} checkpoint, not an SD3 LoRA")
    adapters = conf.get("adapters") or {}
    if len(adapters) != 1:
        raise ConfigError(f"{p} holds adapters {sorted(adapters)}; point at one adapter's directory "
                          f"({p}/adapters/NAME)")
    a = next(iter(adapters.values()))
    trained_on = conf.get("model")
    if base_model and trained_on and _same_model(trained_on, base_model) is False:
        warnings.warn(f"{p} was trained on {trained_on}, not on {base_model}", stacklevel=2)
    return p / a["dir"]


def _same_model(a: str, b: str) -> bool | None:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    if pa.exists() != pb.exists():
        return None  # a local copy of a hub model, perhaps: cannot tell
    return a == b


def factor_average(loras: list[dict], weights: list[float]) -> dict:
    """The Flow-OPD authors' merge (CostaliyA/Flow-OPD scripts/merge.py, merge_mode "average" /
    "weighted"): each factor averaged on its own, A = sum_i w_i A_i, B = sum_i w_i B_i, at the
    teachers' common rank. Its delta B @ A = sum_ij w_i w_j B_i A_j is not the mean of the deltas
    sum_i w_i B_i A_i (cross terms; each own term shrinks by w_i). {module: (A, B)}."""
    mods = set(loras[0])
    if any(set(lo) != mods for lo in loras[1:]):
        raise ConfigError("merge: factor_average needs teachers adapting the same modules")
    return {m: (sum(w * lo[m][0] for lo, w in zip(loras, weights)), sum(w * lo[m][1] for lo, w in zip(loras, weights)))
            for m in sorted(mods)}


def merge_teachers(backend, names: list[str], weights: list[float] | None = None, mode: str = "delta_average"):
    """LoRA of the merged teacher adapters `names` -> (lora, rank, alpha, targets).
    delta_average: the exact sum_i w_i delta_i as one LoRA of rank sum(r_i) (factors concatenated);
    factor_average: the authors' average of the A and B factors (factor_average), same rank and alpha."""
    w = list(weights or [1.0 / len(names)] * len(names))
    if len(w) != len(names):
        raise ConfigError(f"coldstart.weights has {len(w)} values for {len(names)} teachers")
    parts = [backend.read_lora(n) for n in names]
    if mode == "factor_average":
        if len({(p[1], p[2]) for p in parts}) != 1:
            raise ConfigError("merge: factor_average needs teachers of one rank and alpha, got "
                              f"{[(n, p[1], p[2]) for n, p in zip(names, parts)]}")
        return factor_average([p[0] for p in parts], w), parts[0][1], parts[0][2], parts[0][3]
    lora = concat_loras([p[0] for p in parts], [p[2] / p[1] for p in parts], w)
    rank = sum(p[1] for p in parts)
    targets = sorted(set().union(*[p[3] for p in parts]))
    return lora, rank, float(rank), targets


def setup_sd3_opd(cfg, out: Path, dist, student: str):
    """OPD on SD3: base + teacher adapters + student adapter (+ the init anchor) on one transformer.
    -> (backend, bank, teacher names, student params, init info), as opd.setup_models."""
    backend = make_backend(cfg, device=dist.device)
    names = list(cfg.teachers)
    bank = TeacherBank(backend)
    for n in names:  # frozen teachers
        backend.load_lora(n, resolve_lora(cfg.teachers[n], cfg.model))
        bank.kind[n] = "lora"
    if cfg.anchor == "lora":  # the MAR anchor (the authors' train.mar_lora): frozen, no reward, not merged
        backend.load_lora("anchor", resolve_lora(cfg.anchor_lora, cfg.model))
        bank.kind["anchor"] = "lora"
    info = {"init": cfg.init}
    if cfg.init == "sft":
        done = out / "coldstart" / "config.json"
        if done.is_file():  # a resumed run: the cold start is there
            backend.load_lora(student, resolve_lora(out / "coldstart", cfg.model), trainable=True)
            info["sft"] = json.loads(done.read_text()).get("meta", {}).get("data")
        else:
            info["sft"] = sft_coldstart(cfg, backend, bank, names, student, out, dist)
        if cfg.anchor == "init":
            backend.load_lora("init", resolve_lora(out / "coldstart", cfg.model))
        info["coldstart"] = str(out / "coldstart")
    elif cfg.init == "merge":
        lora, rank, alpha, targets = merge_teachers(backend, names, cfg.coldstart.get("weights"), cfg.merge)
        if cfg.anchor == "init":
            backend.attach_lora("init", lora, rank, alpha, targets, trainable=False)
        backend.attach_lora(student, lora, rank, alpha, targets, trainable=True)
        info["coldstart"] = str(out / "coldstart")
        info["student_rank"] = rank
        backend.save_checkpoint(out / "coldstart", adapters=[student], is_main_process=dist.is_main,
                                meta={"trainer": "coldstart", "method": "merge", "merge": cfg.merge,
                                      "teachers": dict(cfg.teachers),
                                      "weights": cfg.coldstart.get("weights") or "mean"})
    elif cfg.init == "none":
        backend.add_adapter(student, rank=cfg.student_rank, alpha=cfg.lora_alpha or cfg.student_rank,
                            targets=list(cfg.lora_targets) or None, init=lora_init_value(cfg.lora_init, backend),
                            trainable=True)
    else:
        path = resolve_lora(cfg.init, cfg.model)
        if cfg.anchor == "init":
            backend.load_lora("init", path)
        backend.load_lora(student, path, trainable=True)
        info["coldstart"] = str(cfg.init)
    if cfg.anchor == "init":
        bank.kind["init"] = "lora"
    backend.set_adapter(student)
    params = backend.trainable_parameters()
    if not params:
        raise ConfigError("the student adapter has no trainable parameters")
    return backend, bank, names, params, info


def sft_coldstart(cfg, backend, bank, names: list[str], student: str, out: Path, dist) -> dict:
    """The SFT cold start on SD3 (module doc): data from the teachers, then the student LoRA's
    flow-matching fine-tune; saved to out/coldstart (rank 0). Every process computes it (the
    trainer broadcasts rank 0's student afterwards). -> per-task data stats."""
    cs = build(ColdStartConfig, {"seed": cfg.seed, **cfg.coldstart, "base": cfg.base, "device": cfg.device})
    shift = float(backend.sampling.get("shift", 3.0) if cfg.shift is None else cfg.shift)
    guidance = float(cs.sft_cfg or (backend.sampling.get("cfg", 1.0) if cfg.cfg is None else cfg.cfg))
    gen = torch.Generator().manual_seed(cs.seed)
    # 1. data: each teacher's best-of-G ODE sample (by its task's reward) of its task's training prompts
    x_all, prompts, stats = best_teacher_samples(cfg, cs, backend, bank, names, shift, guidance, gen)
    # 2. the student LoRA, fit by flow matching at time-shifted logit-normal noise levels
    rank = int(cfg.coldstart.get("sft_rank", cfg.student_rank))
    backend.add_adapter(student, rank=rank, alpha=cfg.lora_alpha or rank, targets=list(cfg.lora_targets) or None,
                        init=lora_init_value(cfg.lora_init, backend), trainable=True)
    backend.set_adapter(student)
    params = backend.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cs.sft_lr, weight_decay=0.0)
    all_idx, no_drop = torch.arange(len(prompts)), torch.zeros(len(prompts), dtype=torch.bool)
    with torch.no_grad():  # the loss on every sample at fixed noise levels and noises (before / after)
        stats["sft_fm_before"] = float(_fm_loss(backend, x_all, prompts, all_idx, no_drop, shift,
                                                torch.Generator().manual_seed(cs.seed + 1)))
    for _ in range(cs.sft_steps):
        idx = torch.randint(0, len(prompts), (cs.sft_batch,), generator=gen)
        loss = _fm_loss(backend, x_all, prompts, idx, torch.rand(cs.sft_batch, generator=gen) < cs.sft_p_uncond,
                        shift, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if math.isfinite(loss.item()):
            opt.step()
    with torch.no_grad():
        stats["sft_fm_after"] = float(_fm_loss(backend, x_all, prompts, all_idx, no_drop, shift,
                                               torch.Generator().manual_seed(cs.seed + 1)))
    backend.save_checkpoint(out / "coldstart", adapters=[student], is_main_process=dist.is_main,
                            meta={"trainer": "coldstart", "method": "sft", "teachers": dict(cfg.teachers),
                                  "data": stats, "recipe": dict(cfg.coldstart)})
    return stats


def best_teacher_samples(cfg, cs, backend, bank, names: list[str], shift: float, guidance: float, gen):
    """For each teacher, sft_candidates ODE samples of each of sft_prompts_per_task training prompts of
    its task; its task's reward keeps the best latent per prompt. -> (latents (n, C, H, W) on the CPU,
    their n prompts, per-task reward stats)."""
    sources, rng = PromptSources(cfg.tasks, cfg.prompts), random.Random(cs.seed)
    sigmas = sigma_grid(cs.sft_sample_steps, shift)
    G, mb = cs.sft_candidates, max(1, cfg.micro_batch)
    x0s, prompts, stats = [], [], {}
    for t in names:
        reward = get_reward(cfg.task_rewards.get(t, t))
        ps, _, meta = sources.draw_batch(rng, {t: cs.sft_prompts_per_task})
        cand = [(p, m) for p, m in zip(ps, meta) for _ in range(G)]
        finals, r = [], []
        for i in range(0, len(cand), mb):
            cp = [p for p, _ in cand[i:i + mb]]
            noise = torch.randn(len(cp), *backend.latent_shape(), generator=gen).to(backend.device)
            cond = backend.encode_prompts(cp)
            uncond = backend.encode_prompts([None] * len(cp)) if guidance != 1.0 else None
            with torch.no_grad(), bank.use(t):
                x = ode_sample(guided_velocity(backend, cond, uncond, guidance), noise, sigmas)
            finals.append(x.float().cpu())
            r.append(reward(backend.decode(x), cp, [dict(m, task=t) for _, m in cand[i:i + mb]]).float().cpu())
        r = torch.cat(r).view(len(ps), G)  # (n, G)
        best = torch.arange(len(ps)) * G + r.argmax(1)
        x0s.append(torch.cat(finals)[best])
        prompts += ps
        stats[t] = {"reward_mean": float(r.mean()), "reward_best": float(r.max(1).values.mean())}
    return torch.cat(x0s), prompts, stats


def _fm_loss(backend, x_all, prompts: list[str], idx, drop, shift: float, g):
    """Flow-matching loss of the latents idx at time-shifted logit-normal noise levels; `drop` marks
    the samples trained unconditionally (prompt dropout for CFG)."""
    x0 = x_all[idx].to(backend.device)
    u = logit_normal_sigmas(len(idx), generator=g)
    sigma = time_shift(u, shift).to(backend.device)  # (B,) on the sampling grid's shift
    noise = torch.randn(x0.shape, generator=g).to(backend.device)
    cond = backend.encode_prompts([None if d else prompts[i] for i, d in zip(idx.tolist(), drop.tolist())])
    return flow_matching_loss(backend.velocity(interpolate(x0, noise, sigma), sigma, cond), x0, noise)


def setup_sd3_grpo(cfg, dist):
    """GRPO on SD3: the base with the trained adapter cfg.name (fresh, or from the LoRA at cfg.init)."""
    if cfg.finetune != "lora":
        raise ConfigError("backend sd3 trains LoRA adapters only (finetune: lora)")
    backend = make_backend(cfg, device=dist.device)
    if cfg.init in ("", "base"):
        add_trained_adapter(backend, cfg.name, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg)
    else:
        backend.load_lora(cfg.name, resolve_lora(cfg.init, cfg.model), trainable=True)
        backend.set_adapter(cfg.name)
    return backend


__all__ = ["factor_average", "merge_teachers", "resolve_lora", "setup_sd3_grpo", "setup_sd3_opd"]
