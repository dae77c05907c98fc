"""Benchmarks of issue 15: step cost, teacher memory, sample efficiency, FLOP/s, scaling (+ an SD3.5-M-shaped
measurement, on --device cuda with bf16).

    python -m benchmarks                       # from the repository root; all parts, cheapest first
    python -m benchmarks --parts memory,flops  # some of them
    python -m benchmarks --device cuda         # the SD3.5-M-shaped part on a GPU (bf16)

Every part writes its numbers into benchmarks/results.json (or --out) as soon as it completes, so an
interrupted run keeps what it measured. Never part of the test suite. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowopd.tasks import TASK_NAMES as TASKS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PIPELINE = PIPELINE_DEFAULT = ROOT / "runs" / "pipeline"

# SD3.5-Medium's transformer config (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


# ----------------------------------------------------------------------------- helpers


class Results:
    """benchmarks/results.json, rewritten after every part."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.exists() else json.loads(path.read_text())

    def put(self, part: str, values: dict, headline: dict | None = None):
        self.data.setdefault("parts", {})[part] = values
        self.data.update(headline or {})
        self.path.write_text(json.dumps(self.data, indent=1, default=float))


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def tensor_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- 3. sample efficiency


def sample_efficiency(pipeline: Path, window: int = 5) -> dict:
    """From the pipeline run's logs: the mean over the three tasks of the logged per-task training
    reward (reward/<task>, the mean reward of that iteration's rollouts of the task), against rollouts
    consumed, for GRPO-Mix and the OPD student (merge init). GRPO-Mix's final average = the mean of
    its last `window` iterations; OPD reaches it at the first iteration whose trailing `window`-
    iteration mean is at least that."""
    import yaml

    work = pipeline / "work"

    def curve(stage: str):
        cfg = yaml.safe_load((work / stage / "config.yaml").read_text())
        per_step = int(cfg["prompts_per_step"]) * int(cfg.get("group_size", 1))
        rows = [r for r in read_jsonl(work / stage / "train_log.jsonl") if all(f"reward/{t}" in r for t in TASKS)]
        steps = [r["step"] for r in rows]
        avg = [sum(r[f"reward/{t}"] for t in TASKS) / len(TASKS) for r in rows]
        return cfg, per_step, steps, avg

    def trailing(xs, i):
        lo = max(0, i - window + 1)
        return sum(xs[lo:i + 1]) / (i + 1 - lo)

    g_cfg, g_per, g_steps, g_avg = curve("grpo-mix")
    o_cfg, o_per, o_steps, o_avg = curve("opd-merge")
    g_total = g_steps[-1] * g_per
    g_final = sum(g_avg[-window:]) / len(g_avg[-window:])
    hit = next((i for i in range(len(o_avg)) if trailing(o_avg, i) >= g_final), None)
    o_need = None if hit is None else o_steps[hit] * o_per
    teachers = {}
    for t in TASKS:
        c = yaml.safe_load((work / f"teacher-{t}" / "config.yaml").read_text())
        teachers[t] = int(c["steps"]) * int(c["prompts_per_step"]) * int(c.get("group_size", 1))
    teacher_mean = sum(teachers.values()) / len(teachers)
    o_total = o_steps[-1] * o_per
    res = json.loads((pipeline / "results.json").read_text())
    test = {m: {k: res["models"][m].get(k) for k in ("compose", "text", "quality", "average")}
            for m in ("grpo-mix", "opd-merge", "teacher-compose", "teacher-text", "teacher-quality", "base")
            if m in res.get("models", {})}
    out = {
        "source": str(work), "preset": res.get("preset"), "date": res.get("date"),
        "signal": f"mean over tasks {list(TASKS)} of the logged training reward reward/<task> per iteration; "
                  f"GRPO-Mix final = mean of its last {window} iterations; OPD reaches it at the first "
                  f"iteration whose trailing {window}-iteration mean >= that",
        "grpo_mix": {"rollouts_per_iteration": g_per, "iterations": g_steps[-1], "rollouts": g_total,
                     "final_avg": g_final, "curve": [[s * g_per, a] for s, a in zip(g_steps, g_avg)]},
        "opd_merge": {"rollouts_per_iteration": o_per, "iterations": o_steps[-1], "rollouts": o_total,
                      "final_avg": sum(o_avg[-window:]) / len(o_avg[-window:]),
                      "curve": [[s * o_per, a] for s, a in zip(o_steps, o_avg)],
                      "rollouts_to_match_mix": o_need},
        "rollouts_fraction_to_match_mix": None if o_need is None else o_need / g_total,
        "rollouts_fraction_including_teachers": None if o_need is None else (sum(teachers.values()) + o_need) / g_total,
        "opd_start_avg_trailing": trailing(o_avg, 0),
        "teacher_rollouts": teachers,
        "new_task_cost": {"rule": "(one teacher's rollouts + the re-distillation's student rollouts) / one "
                                  "teacher's rollouts; teacher = mean of the three teachers' budgets; the "
                                  "merge cold start costs no rollouts",
                          "teacher": teacher_mean, "redistillation": o_total,
                          "value": (teacher_mean + o_total) / teacher_mean},
        "test_scores_from_results_json": test,
    }
    return out


# ----------------------------------------------------------------------------- 2. teacher memory


def memory_tiny(rank: int = 8, counts=(1, 2, 4, 8)) -> dict:
    """Exact parameter bytes of the tiny base and of `rank` LoRA teachers (peft, the trainers' targets),
    adapters on one base against full copies (base + N copies). Also the current RSS after each add."""
    from flowopd.backends import load_checkpoint

    b = load_checkpoint("base", "cpu")
    base = tensor_bytes(b.model.parameters())
    rss0 = rss_mb()
    rows = []
    added = 0
    for n in range(1, max(counts) + 1):
        b.add_adapter(f"t{n}", rank=rank, init=False)
        if n in counts:
            lora = tensor_bytes(p for name, p in b.net.named_parameters() if "lora_" in name)
            rows.append({"teachers": n, "adapters_bytes": base + lora, "copies_bytes": base * (1 + n),
                         "copies_over_adapters": base * (1 + n) / (base + lora), "rss_mb_delta": rss_mb() - rss0})
            added = lora / n
    return {"model": "tiny (shipped base)", "dtype": "float32", "lora_rank": rank, "base_bytes": base,
            "adapter_bytes": added, "per_teacher_pct_of_base": 100 * added / base, "rows": rows,
            "note": "copies = the student's full model + N full teacher copies; adapters = one base + N LoRAs"}


def sd3_build(num_layers: int, device="cpu", dtype=torch.float32, sample_size=None):
    from diffusers import SD3Transformer2DModel

    cfg = dict(SD35M, num_layers=num_layers, dual_attention_layers=tuple(range(min(13, num_layers))))
    if sample_size:
        cfg["sample_size"] = sample_size
    torch.manual_seed(0)
    return SD3Transformer2DModel(**cfg).to(device, dtype), cfg


def memory_sd3(num_layers: int = 2, rank: int = 32, counts=(1, 2, 4, 8)) -> dict:
    """An SD3 transformer at SD3.5-M width with `num_layers` layers, random weights on the CPU (float32),
    peft LoRAs of `rank` on the back end's targets added one by one: exact parameter bytes and RSS.
    Plus the full SD3.5-M shape (24 layers) counted on the meta device."""
    from peft import LoraConfig

    from flowopd.backends.sd3 import LORA_TARGETS

    rss0 = rss_mb()
    tr, cfg = sd3_build(num_layers)
    tr.requires_grad_(False)
    base = tensor_bytes(tr.parameters())
    rss_base = rss_mb() - rss0
    rows = []
    per = 0.0
    for n in range(1, max(counts) + 1):
        tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True),
                       adapter_name=f"t{n}")
        if n in counts:
            lora = tensor_bytes(p for name, p in tr.named_parameters() if "lora_" in name)
            per = lora / n
            rows.append({"teachers": n, "adapters_bytes": base + lora, "copies_bytes": base * (1 + n),
                         "copies_over_adapters": base * (1 + n) / (base + lora),
                         "rss_mb_over_base_build": rss_mb() - rss0 - rss_base})
    del tr
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):
        full = SD3Transformer2DModel(**SD35M)
    full_n = sum(p.numel() for p in full.parameters())
    full_lora = sum(rank * (m.in_features + m.out_features) for name, m in full.named_modules()
                    if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS))
    return {"model": f"SD3Transformer2DModel at SD3.5-M width, {num_layers} layers, random weights, CPU float32",
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "lora_rank": rank, "base_bytes": base, "base_rss_mb": rss_base, "adapter_bytes": per,
            "per_teacher_pct_of_base": 100 * per / base, "rows": rows,
            "sd35m_full_meta": {"params": full_n, "lora_params": full_lora, "lora_pct_same_dtype": 100 * full_lora / full_n,
                                "lora_fp32_pct_of_bf16_base": 100 * 2 * full_lora / full_n}}


# ----------------------------------------------------------------------------- 1. step cost


class PhaseTimer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, key, dt):
        self.t[key] = self.t.get(key, 0.0) + dt

    def wrap(self, key, fn, cond=None):
        def inner(*a, **k):
            if cond is not None and not cond():
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(key, time.perf_counter() - t0)
        return inner


def _per_iteration(out: Path, timer: PhaseTimer, marks: list, skip: int) -> dict:
    """Seconds per iteration (mean over the iterations after the first `skip`) and the phase times."""
    log = [r for r in read_jsonl(out / "train_log.jsonl") if "sec_step" in r]
    kept = log[skip:]
    sec = statistics.mean(r["sec_step"] for r in kept)
    phases = {}
    for key in marks[0]:
        phases[key] = statistics.mean(m[key] for m in marks[skip:])
    return {"iterations_timed": len(kept), "skipped_warmup": skip, "sec_per_iteration": sec,
            "sec_step_logged": [r["sec_step"] for r in log], "phases_sec": phases}


def step_cost(samples: int = 48, iters: int = 3, skip: int = 1, threads: int = 0) -> dict:
    """GRPO (configs/toy_grpo_text.yaml) and OPD (configs/toy_opd_merge.yaml) run through their own
    trainers for `iters` iterations at the same batch of `samples` rollouts; phases timed by wrapping
    the trainers' own functions (rollout_batch, the reward functions, TeacherBank.means, the anchor's
    no-grad transition); update = the rest of the iteration."""
    import flowopd.trainers.grpo as grpo
    from flowopd.config import PACKAGED_CONFIGS

    ck = PIPELINE / "checkpoints"
    gs = 16
    res = {"samples_per_iteration": samples}
    tmp = Path(tempfile.mkdtemp(prefix="flowopd-bench-"))
    extra = [f"num_threads={threads}"] if threads else []

    # --- GRPO
    timer, marks = PhaseTimer(), []
    orig = (grpo.rollout_batch, grpo.make_reward_fn)

    def rb(*a, **k):
        if timer.t:
            marks.append(dict(timer.t))
        timer.t = {"rollout": 0.0, "reward": 0.0}
        return timer.wrap("rollout", orig[0])(*a, **k)

    grpo.rollout_batch = rb
    grpo.make_reward_fn = lambda cfg: timer.wrap("reward", orig[1](cfg))
    try:
        grpo.main_grpo(PACKAGED_CONFIGS / "toy_grpo_text.yaml", tmp / "grpo",
                       [f"steps={iters}", f"prompts_per_step={samples // gs}", f"group_size={gs}", *extra],
                       overwrite=True)
    finally:
        grpo.rollout_batch, grpo.make_reward_fn = orig
    marks.append(dict(timer.t))
    g = _per_iteration(tmp / "grpo", timer, marks, skip)
    g["phases_sec"]["update"] = g["sec_per_iteration"] - sum(g["phases_sec"].values())
    g["config"] = f"configs/toy_grpo_text.yaml steps={iters} prompts_per_step={samples // gs} group_size={gs}"
    res["grpo"] = g

    # --- OPD: its configured recipe, and the same with GRPO's trained work (1 step, 1 pass, micro-batch 32)
    teachers = [f"teachers.{t}={ck / ('teacher-' + t)}" for t in TASKS]
    common = [f"steps={iters}", f"prompts_per_step={samples}", f"base={ck / 'base'}", *teachers, *extra]
    res["opd"] = _opd_cost(tmp / "opd", common, skip)
    matched = ["timestep_fraction=0.1", "inner_epochs=1", "micro_batch=32"]
    res["opd_matched"] = _opd_cost(tmp / "opd_matched", common + matched, skip)
    res["opd_matched"]["overrides"] = matched
    for k in ("grpo", "opd", "opd_matched"):
        tot = res[k]["sec_per_iteration"]
        res[k]["phases_share"] = {p: v / tot for p, v in res[k]["phases_sec"].items()}
    res["opd_over_grpo_step"] = res["opd"]["sec_per_iteration"] / g["sec_per_iteration"]
    res["opd_matched_over_grpo_step"] = res["opd_matched"]["sec_per_iteration"] / g["sec_per_iteration"]
    res["note"] = ("the configs' other settings are their defaults: GRPO trains 1 SDE step per trajectory "
                   "(sde_window 1), micro_batch 32, 1 inner epoch; OPD trains round(0.3 x 10) = 3 steps, "
                   "micro_batch 12, 2 inner epochs; opd_matched trains what GRPO trains (1 step, 1 pass, "
                   "micro_batch 32); the first iteration is not timed (warm-up)")
    return res


def _opd_cost(out: Path, overrides: list[str], skip: int) -> dict:
    """configs/toy_opd_merge.yaml + overrides through its own trainer, phases timed as in step_cost."""
    import flowopd.routing as routing
    import flowopd.trainers.opd as opd
    from flowopd.config import PACKAGED_CONFIGS

    timer, marks = PhaseTimer(), []
    orig = (opd.rollout_batch, opd.score_tasks, routing.TeacherBank.means, opd.transition)

    def rb(*a, **k):
        if timer.t:
            marks.append(dict(timer.t))
        timer.t = {"rollout": 0.0, "reward": 0.0, "teacher": 0.0, "anchor": 0.0}
        return timer.wrap("rollout", orig[0])(*a, **k)

    opd.rollout_batch = rb
    opd.score_tasks = timer.wrap("reward", orig[1])
    routing.TeacherBank.means = timer.wrap("teacher", orig[2])
    opd.transition = timer.wrap("anchor", orig[3], cond=lambda: not torch.is_grad_enabled())
    try:
        opd.main_distill(PACKAGED_CONFIGS / "toy_opd_merge.yaml", out, overrides, overwrite=True)
    finally:
        opd.rollout_batch, opd.score_tasks, routing.TeacherBank.means, opd.transition = orig
    marks.append(dict(timer.t))
    o = _per_iteration(out, timer, marks, skip)
    o["phases_sec"]["update"] = o["sec_per_iteration"] - sum(o["phases_sec"].values())
    o["config"] = "configs/toy_opd_merge.yaml " + " ".join(x for x in overrides if not x.startswith("teachers."))
    return o


# ----------------------------------------------------------------------------- 4. FLOP/s


def _train_step_fn(batch: int):
    """The tiny model's training step as the trainers run it: a LoRA student's velocity with CFG
    guidance inputs on a micro-batch, backward into the LoRA, AdamW step."""
    from flowopd.backends import load_checkpoint

    b = load_checkpoint("base", "cpu")
    b.add_adapter("student", rank=8, init=False)
    params = [p for n, p in b.net.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *b.latent_shape(), generator=g).contiguous(memory_format=torch.channels_last)
    sigma = torch.rand(batch, generator=g)
    prompts = ["a red circle above a blue square"] * batch
    cond = b.encode_prompts(prompts)
    cond = tuple(c.detach() for c in cond) if isinstance(cond, tuple) else (
        cond.detach() if torch.is_tensor(cond) else cond)

    def step():
        opt.zero_grad(set_to_none=True)
        v = b.velocity(x, sigma, cond)
        v.float().square().mean().backward()
        opt.step()

    def forward():
        with torch.no_grad():
            b.velocity(x, sigma, cond)

    return step, forward


def _time(fn, reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def flops(batch: int = 32, reps: int = 10, n: int = 2048, profile: bool = True) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    step, forward = _train_step_fn(batch)
    with FlopCounterMode(display=False) as fc:
        step()
    step_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        forward()
    fwd_flops = fc.get_total_flops()
    t_step = _time(step, reps, warm=5)  # the first steps are slow (oneDNN primitives, AdamW state)
    t_fwd = _time(forward, reps, warm=5)
    a, bm = torch.randn(n, n), torch.randn(n, n)
    t_mm = _time(lambda: a @ bm, reps, warm=3)
    peak = 2 * n ** 3 / t_mm
    res = {"threads": torch.get_num_threads(), "batch": batch,
           "train_step": {"flops": step_flops, "sec": t_step, "flops_per_s": step_flops / t_step},
           "forward_no_grad": {"flops": fwd_flops, "sec": t_fwd, "flops_per_s": fwd_flops / t_fwd},
           "matmul": {"n": n, "dtype": "float32", "sec": t_mm, "flops_per_s": peak},
           "flops_fraction_of_peak": step_flops / t_step / peak,
           "forward_fraction_of_peak": fwd_flops / t_fwd / peak,
           "note": "5 warm-up steps; FLOPs counted by torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention only); "
                   "median of reps; step = LoRA student velocity + backward + AdamW on the shipped base"}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                step()
        ev = p.key_averages()
        total = sum(e.self_cpu_time_total for e in ev)
        top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        res["profile_top_self_cpu"] = [{"op": e.key, "self_cpu_pct": 100 * e.self_cpu_time_total / total,
                                        "calls": e.count} for e in top]
    return res


# ----------------------------------------------------------------------------- 5. scaling


def scaling(batches=(16, 32, 64, 128), steps=(10, 20, 40), base_batch: int = 32, reps: int = 2) -> dict:
    """Rollout-only wall time (the trainers' flowopd.rollout.rollout, SDE at every step, CFG 2.0,
    micro_batch 32, the shipped base) at several batch sizes (10 steps) and step counts (batch 32)."""
    from flowopd.backends import load_checkpoint
    from flowopd.prompt_sources import PromptSources
    from flowopd.rollout import rollout

    b = load_checkpoint("base", "cpu")
    src = PromptSources(list(TASKS), None)
    rng = random.Random(0)

    def one(n, s):
        per = {t: n // 3 + (1 if i < n % 3 else 0) for i, t in enumerate(TASKS)}
        prompts, tasks, meta = src.draw_batch(rng, per)
        gen = torch.Generator().manual_seed(0)
        return _time(lambda: rollout(b, prompts, tasks, 1, steps=s, cfg=2.0, noise_level=0.7, shift=1.0,
                                     micro_batch=32, generator=gen, metadata=meta), reps, warm=1)

    by_batch = [{"batch": n, "steps": 10, "sec": one(n, 10)} for n in batches]
    for r in by_batch:
        r["sec_per_sample"] = r["sec"] / r["batch"]
    by_steps = [{"batch": base_batch, "steps": s, "sec": one(base_batch, s)} for s in steps]
    for r in by_steps:
        r["sec_per_step"] = r["sec"] / r["steps"]
    return {"by_batch": by_batch, "by_steps": by_steps, "note": "median of 2 timed runs after one warm-up run, per configuration"}


def eval_batch(batches=(16, 32, 64, 128), n: int = 256, steps: int = 40) -> dict:
    """Evaluation sampling (flowopd.sampling.sample_images: ODE, CFG 2.0, the shipped base) of the test
    split's first n prompts at several prompt batch sizes (CFG doubles each batch), one timed run each,
    and whether every batch size gives the same images, pixel for pixel."""
    from flowopd.backends import load_checkpoint
    from flowopd.sampling import sample_images
    from flowopd.world.prompts import get_split

    b = load_checkpoint("base", "cpu")
    prompts = [p.text for p in get_split("test")][:n]
    sample_images(b, prompts[:32], steps=2, batch_size=32, progress=False)  # warm-up
    rows, ref = [], None
    for bs in batches:
        t0 = time.perf_counter()
        images = sample_images(b, prompts, steps=steps, batch_size=bs, progress=False)
        sec = time.perf_counter() - t0
        ref = images if ref is None else ref
        rows.append({"batch": bs, "sec": sec, "ms_per_image_step": 1000 * sec / (n * steps),
                     "same_images_as_first": bool(np.array_equal(images, ref))})
    return {"prompts": n, "steps": steps, "rows": rows}


def sample_cost(batch: int = 64, reps: int = 5) -> dict:
    """What one forward of the tiny model costs, and where it goes: the shipped base without and with
    an active rank-8 LoRA adapter (no grad, `batch` rows, median of reps), each top-level module's
    share of the plain forward, the same forward and a forward+backward on one thread and on all, and
    whether the one-thread results are bit for bit the default's; then the layout's alternatives
    (random weights): without the 32x32 cross-attention, narrower at 32x32, and over 2x2 patches
    (TinyConfig.patch 2: no 32x32 level)."""
    from flowopd.backends import load_checkpoint
    from flowopd.backends.tiny import TinyBackend
    from flowopd.backends.tiny_model import TinyConfig, TinyUNet

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    sigma = torch.rand(batch, generator=g)
    prompts = ["a red square left of a blue circle"] * batch

    def timings(b) -> dict:
        def fwd():
            with torch.no_grad():
                return b.velocity(x, sigma, b.encode_prompts(prompts))

        def fwd_bwd():
            b.net.zero_grad(set_to_none=True)
            b.velocity(x, sigma, b.encode_prompts(prompts)).float().square().mean().backward()

        return {"forward_sec": _time(fwd, reps), "forward_backward_sec": _time(fwd_bwd, max(2, reps - 2))}

    b = load_checkpoint("base", "cpu")
    res: dict = {"batch": batch, "threads": torch.get_num_threads(), "shipped": timings(b)}
    times: dict[str, float] = {}

    def pre(mod, inp):
        mod._t0 = time.perf_counter()

    def post(mod, inp, out):
        times[mod._bench_name] = times.get(mod._bench_name, 0.0) + time.perf_counter() - mod._t0

    hooks = []
    for name, mod in b.model.named_children():
        mod._bench_name = name
        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(reps):
            b.velocity(x, sigma, b.encode_prompts(prompts))
        total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    res["module_share"] = {k: round(v / total, 4) for k, v in sorted(times.items(), key=lambda kv: -kv[1])}

    b.add_adapter("bench", rank=8, init=False)  # random B too: the adapter changes the output
    res["with_lora"] = timings(b)

    def fwd_folded():  # what rollouts do: the adapter folded into the weights (backend.merged)
        with torch.no_grad(), b.merged():
            b.velocity(x, sigma, b.encode_prompts(prompts))

    res["with_lora_folded_forward_sec"] = _time(fwd_folded, reps)
    threads = torch.get_num_threads()

    def outputs():
        with torch.no_grad():
            v = b.velocity(x, sigma, b.encode_prompts(prompts))
        b.net.zero_grad(set_to_none=True)
        b.velocity(x, sigma, b.encode_prompts(prompts)).float().square().mean().backward()
        return v, [p.grad.clone() for p in b.net.parameters() if p.grad is not None]

    v_all, g_all = outputs()
    torch.set_num_threads(1)
    try:
        v_one, g_one = outputs()
        res["with_lora_one_thread"] = timings(b)
    finally:
        torch.set_num_threads(threads)
    res["one_thread_forward_bitwise_equal"] = bool(torch.equal(v_one, v_all))
    res["one_thread_grads_bitwise_equal"] = all(torch.equal(a, c) for a, c in zip(g_one, g_all))

    # the shipped layout and its neighbours, named by what they are (the shipped base was once the pixel U-Net)
    shipped = b.model.cfg.to_dict()
    pixel = json.loads((ROOT / "experiments" / "checkpoints" / "qcm" / "config.json").read_text())["model"]
    patch2 = {**pixel, "xattn_full": False, "patch": 2}
    variants = {f"shipped layout ({'2x2 patches' if shipped.get('patch', 1) == 2 else 'pixels'}, "
                f"channels {tuple(shipped['channels'])})": TinyConfig.from_dict(shipped),
                "pixel U-Net (experiments/checkpoints/qcm)": TinyConfig.from_dict(pixel),
                "pixels, no 32x32 cross-attention": TinyConfig.from_dict({**pixel, "xattn_full": False}),
                "pixels, channels (16, 64, 96), no 32x32 cross-attention":
                    TinyConfig.from_dict({**pixel, "xattn_full": False, "channels": [16, 64, 96]}),
                "2x2 patches, channels (64, 96)": TinyConfig.from_dict({**patch2, "channels": [64, 96]}),
                "2x2 patches, channels (48, 96)": TinyConfig.from_dict({**patch2, "channels": [48, 96]})}
    res["layouts"] = {}
    for name, cfg in variants.items():
        torch.manual_seed(0)
        vb = TinyBackend(TinyUNet(cfg))
        res["layouts"][name] = {**timings(vb), "params": sum(p.numel() for p in vb.model.parameters())}
    return res


# ----------------------------------------------------------------------------- 6. SD3.5-M shaped (GPU)


def sd3_device(device: str, num_layers: int, teachers=(1, 2, 4), batch: int = 4, latent: int = 64,
               steps: int = 4, rank: int = 32, dtype=torch.bfloat16) -> dict:
    """SD3 transformer at SD3.5-M width (num_layers layers, random weights from the config, no download):
    a rollout of `steps` Euler steps under the student adapter (no grad), then an OPD-style update on one
    step: each teacher adapter's velocity (no grad), the base's (anchor, adapters off), the student's with
    gradients, MSE to the teacher, backward, AdamW. Reports samples/s and peak memory."""
    from peft import LoraConfig

    from flowopd.backends.sd3 import LORA_TARGETS

    rows = []
    for k in teachers:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tr, cfg = sd3_build(num_layers, device, dtype)
        tr.requires_grad_(False)
        names = [f"t{i}" for i in range(k)] + ["student"]
        for nm in names:
            tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True),
                           adapter_name=nm)
        params = [p for n, p in tr.named_parameters() if "lora_" in n and ".student." in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, 16, latent, latent, generator=g).to(device, dtype)
        enc = torch.randn(batch, 77, 4096, generator=g).to(device, dtype)
        pooled = torch.randn(batch, 2048, generator=g).to(device, dtype)

        def vel(xx, s):
            t = torch.full((batch,), float(s) * 1000, device=device, dtype=dtype)
            return tr(hidden_states=xx, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                      return_dict=False)[0]

        def iteration():
            tr.set_adapters("student")
            sig = torch.linspace(1, 0, steps + 1)
            xx = x
            with torch.no_grad():
                for j in range(steps):
                    xx = xx + (sig[j + 1] - sig[j]).item() * vel(xx, sig[j])
            s = 0.5
            with torch.no_grad():
                targets = []
                for nm in names[:-1]:
                    tr.set_adapters(nm)
                    targets.append(vel(xx, s))
                tr.disable_adapters()
                vel(xx, s)  # the anchor
                tr.enable_adapters()
            tr.set_adapters("student")
            opt.zero_grad(set_to_none=True)
            v = vel(xx, s)
            loss = sum((v.float() - t.float()).square().mean() for t in targets) / len(targets)
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        iteration()  # warm-up
        t0 = time.perf_counter()
        n_it = 3
        for _ in range(n_it):
            iteration()
        sec = (time.perf_counter() - t0) / n_it
        row = {"teachers": k, "sec_per_iteration": sec, "samples_per_s": batch / sec}
        if device.startswith("cuda"):
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            row["rss_mb"] = rss_mb()
        rows.append(row)
        del tr, opt, params
    return {"device": device, "dtype": str(dtype), "num_layers": num_layers, "batch": batch,
            "latent": [16, latent, latent], "rollout_steps": steps, "lora_rank": rank, "rows": rows}


# ----------------------------------------------------------------------------- table


def table(d: dict) -> str:
    p = d.get("parts", {})
    lines = ["| measurement | value | target | met |", "| --- | --- | --- | --- |"]

    def row(name, key, fmt, target, ok):
        v = d.get(key)
        lines.append(f"| {name} (`{key}`) | {'n/a' if v is None else fmt.format(v)} | {target} | "
                     f"{'n/a' if v is None else ('yes' if ok(v) else 'no')} |")

    row("OPD / GRPO seconds per iteration", "opd_over_grpo_step", "{:.2f}", "<= 1.3", lambda v: v <= 1.3)
    row("same, OPD training GRPO's work (1 step, 1 pass)", "opd_matched_over_grpo_step", "{:.2f}", "<= 1.3",
        lambda v: v <= 1.3)
    row("memory per extra teacher, % of base (tiny, adapters)", "memory_per_teacher_pct", "{:.2f}%", "<= 5%",
        lambda v: v <= 5)
    row("copies / adapters memory, 4 teachers (tiny)", "copies_over_adapters_memory", "{:.2f}x", "-", lambda v: True)
    row("OPD rollouts to reach GRPO-Mix / GRPO-Mix's", "rollouts_fraction_to_match_mix", "{:.3f}", "<= 1/3",
        lambda v: v <= 1 / 3)
    row("same, counting the three teachers' rollouts", "rollouts_fraction_including_teachers", "{:.3f}", "-",
        lambda v: True)
    row("new task cost / one teacher", "new_task_cost_over_teacher", "{:.2f}x", "~1.3x (paper)", lambda v: v <= 1.3)
    row("train step FLOP/s / matmul FLOP/s", "flops_fraction_of_peak", "{:.3f}", ">= 0.5", lambda v: v >= 0.5)
    out = ["\n".join(lines)]
    if "step_cost" in p:
        sc = p["step_cost"]
        out.append(f"\nstep cost at {sc['samples_per_iteration']} rollouts per iteration:")
        for k in ("grpo", "opd", "opd_matched"):
            if k not in sc:
                continue
            ph = ", ".join(f"{n} {v:.2f}s ({100 * sc[k]['phases_share'][n]:.0f}%)" for n, v in sc[k]["phases_sec"].items())
            out.append(f"  {k}: {sc[k]['sec_per_iteration']:.2f} s/iteration: {ph}")
    for key in ("memory_tiny", "memory_sd3"):
        if key in p:
            m = p[key]
            out.append(f"\n{m['model']}: base {m['base_bytes'] / 2**20:.1f} MB, one rank-{m['lora_rank']} adapter "
                       f"{m['adapter_bytes'] / 2**20:.2f} MB ({m['per_teacher_pct_of_base']:.2f}%)")
            for r in m["rows"]:
                out.append(f"  {r['teachers']} teachers: adapters {r['adapters_bytes'] / 2**20:.1f} MB, copies "
                           f"{r['copies_bytes'] / 2**20:.1f} MB ({r['copies_over_adapters']:.2f}x)")
            if "sd35m_full_meta" in m:
                f = m["sd35m_full_meta"]
                out.append(f"  full SD3.5-M (meta): {f['params'] / 1e6:.0f}M params, rank-{m['lora_rank']} LoRA "
                           f"{f['lora_params'] / 1e6:.1f}M = {f['lora_pct_same_dtype']:.2f}% (same dtype)")
    if "flops" in p:
        f = p["flops"]
        out.append(f"\nFLOP/s ({f['threads']} threads): train step {f['train_step']['flops_per_s'] / 1e9:.2f} GFLOP/s, "
                   f"no-grad forward {f['forward_no_grad']['flops_per_s'] / 1e9:.2f} GFLOP/s, "
                   f"{f['matmul']['n']}^2 fp32 matmul {f['matmul']['flops_per_s'] / 1e9:.2f} GFLOP/s")
        for e in f.get("profile_top_self_cpu", [])[:6]:
            out.append(f"  {e['self_cpu_pct']:5.1f}%  {e['op']}")
    if "scaling" in p:
        s = p["scaling"]
        out.append("\nrollout scaling (10 steps): " + ", ".join(
            f"b{r['batch']} {r['sec']:.2f}s ({1000 * r['sec_per_sample']:.1f} ms/sample)" for r in s["by_batch"]))
        out.append("rollout scaling (batch 32): " + ", ".join(
            f"{r['steps']} steps {r['sec']:.2f}s ({r['sec_per_step']:.3f} s/step)" for r in s["by_steps"]))
    if "eval_batch" in p:
        e = p["eval_batch"]
        out.append(f"\nevaluation sampling ({e['prompts']} prompts, {e['steps']} steps) by prompt batch: " + ", ".join(
            f"b{r['batch']} {r['sec']:.1f}s" + ("" if r["same_images_as_first"] else " (other images)") for r in e["rows"]))
    if "sample_cost" in p:
        c = p["sample_cost"]
        out.append(f"\nsample cost ({c['batch']} rows, {c['threads']} threads; forward / forward+backward): "
                   + ", ".join(f"{k} {c[k]['forward_sec']:.3f} / {c[k]['forward_backward_sec']:.3f} s"
                               for k in ("shipped", "with_lora", "with_lora_one_thread")))
        if "with_lora_folded_forward_sec" in c:  # absent in results written before the fold existed
            out.append(f"  with the LoRA folded into the weights (rollouts): forward {c['with_lora_folded_forward_sec']:.3f} s")
        out.append("  largest modules: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(c["module_share"].items())[:5]))
        out.append(f"  one thread bit for bit: forward {c['one_thread_forward_bitwise_equal']}, "
                   f"gradients {c['one_thread_grads_bitwise_equal']}")
        for k, r in c["layouts"].items():
            out.append(f"  {k}: {r['params'] / 1e6:.2f}M params, {r['forward_sec']:.3f} / {r['forward_backward_sec']:.3f} s")
    if "sd3_device" in p:
        s = p["sd3_device"]
        out.append(f"\nSD3.5-M-shaped on {s['device']} ({s['num_layers']} layers, {s['dtype']}): " + ", ".join(
            f"{r['teachers']} teachers {r['samples_per_s']:.2f} samples/s" +
            (f" peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else "") for r in s["rows"]))
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


PARTS = ("sample_efficiency", "memory_tiny", "memory_sd3", "flops", "step_cost", "scaling", "eval_batch", "sample_cost",
         "sd3_device")


def main(argv=None):
    global PIPELINE
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} "
                    "(default: all but sd3_device on the CPU; with --device cuda: sd3_device only)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the SD3.5-M-shaped measurement")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--pipeline", default=str(PIPELINE_DEFAULT), help="a finished `flowopd pipeline` run (its logs)")
    ap.add_argument("--fresh", action="store_true", help="start results.json afresh (default: update it)")
    ap.add_argument("--samples", type=int, default=48, help="rollouts per iteration for the step cost")
    ap.add_argument("--iters", type=int, default=3, help="iterations per trainer for the step cost")
    ap.add_argument("--sd3-layers", type=int, default=2)
    ap.add_argument("--sd3-latent", type=int, default=64, help="latent side for sd3_device (64 = 512 px)")
    ap.add_argument("--sd3-batch", type=int, default=4)
    args = ap.parse_args(argv)
    PIPELINE = Path(args.pipeline)
    if args.parts:
        parts = args.parts.split(",")
    else:
        parts = ["sd3_device"] if args.device.startswith("cuda") else [p for p in PARTS if p != "sd3_device"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU available")
    R = Results(Path(args.out), args.fresh)
    R.data["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(), "cpus": os.cpu_count(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                      "command": "python -m benchmarks " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                      "loadavg_start": loadavg()}
    for part in parts:
        la = loadavg()
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {part} (load {la[0]:.2f})", flush=True)
        if part == "sample_efficiency":
            v = sample_efficiency(PIPELINE)
            head = {"rollouts_fraction_to_match_mix": v["rollouts_fraction_to_match_mix"],
                    "rollouts_fraction_including_teachers": v["rollouts_fraction_including_teachers"],
                    "new_task_cost_over_teacher": v["new_task_cost"]["value"]}
        elif part == "memory_tiny":
            v = memory_tiny()
            r4 = next(r for r in v["rows"] if r["teachers"] == 4)
            head = {"memory_per_teacher_pct": v["per_teacher_pct_of_base"],
                    "copies_over_adapters_memory": r4["copies_over_adapters"]}
        elif part == "memory_sd3":
            v = memory_sd3(args.sd3_layers)
            r4 = next(r for r in v["rows"] if r["teachers"] == 4)
            head = {"sd3_memory_per_teacher_pct": v["per_teacher_pct_of_base"],
                    "sd3_copies_over_adapters_memory": r4["copies_over_adapters"]}
        elif part == "flops":
            v = flops()
            head = {"flops_fraction_of_peak": v["flops_fraction_of_peak"]}
        elif part == "step_cost":
            v = step_cost(args.samples, args.iters)
            head = {k: v[k] for k in ("opd_over_grpo_step", "opd_matched_over_grpo_step")}
        elif part == "scaling":
            v = scaling()
            head = {}
        elif part == "eval_batch":
            v = eval_batch()
            head = {}
        elif part == "sample_cost":
            v = sample_cost()
            head = {}
        elif part == "sd3_device":
            dt = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
            v = sd3_device(args.device, args.sd3_layers, batch=args.sd3_batch, latent=args.sd3_latent, dtype=dt)
            head = {}
        else:
            raise SystemExit(f"unknown part {part!r}; use {','.join(PARTS)}")
        v["loadavg_before"] = la
        v["loadavg_after"] = loadavg()
        v["wall_sec"] = time.perf_counter() - t0
        v["date"] = R.data["meta"]["date"]  # (meta is the latest run's; a part keeps when it was measured)
        R.put(part, v, head)
    print(table(R.data))
    return R.data


if __name__ == "__main__":
    main()
