"""Teachers, GRPO-Mix and Flow-OPD variants in parallel processes, each evaluated on the test split.

    python experiments/opd_sweep.py --out OUT [--device cuda] [--quick]

Trains the three teachers and GRPO-Mix with the packaged configs, then OPD variants of
configs/toy_opd_{merge,sft}.yaml from those teachers (merge, merge with beta 0, sft, pg rule,
60 iterations, beta 0.3, reward routing, lr 3e-4); appends one JSON line per model to
OUT/results.jsonl. `--quick` shrinks every budget and the evaluation (smoke run). One run on an
H200 (12 processes, 2026-11-26) is in experiments/results/opd_sweep_h200.jsonl (OPD runs there
were capped at 3 minutes; none hit the cap).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback

from flowopd.config import PACKAGED_CONFIGS

TEACHERS = {"teacher-compose": "toy_grpo_compose", "teacher-text": "toy_grpo_text",
            "teacher-quality": "toy_grpo_quality", "grpo-mix": "toy_grpo_mix"}
VARIANTS = [("opd-merge", "toy_opd_merge", []), ("opd-merge-nomar", "toy_opd_merge", ["beta=0"]),
            ("opd-sft", "toy_opd_sft", []), ("opd-merge-pg", "toy_opd_merge", ["rule=pg"]),
            ("opd-merge-s60", "toy_opd_merge", ["steps=60"]), ("opd-merge-b03", "toy_opd_merge", ["beta=0.3"]),
            ("opd-merge-reward", "toy_opd_merge", ["routing=reward"]),
            ("opd-merge-lr3e4", "toy_opd_merge", ["lr=3e-4", "steps=60"])]
QUICK_GRPO = ["steps=2", "prompts_per_step=2", "group_size=2", "sample_steps=4"]
QUICK_OPD = ["steps=2", "prompts_per_step=3", "group_size=2", "sample_steps=4"]
QUICK_SFT = ["coldstart.sft_prompts_per_task=2", "coldstart.sft_candidates=2", "coldstart.sft_sample_steps=4",
             "coldstart.sft_steps=4", "coldstart.sft_batch=4"]


def _init():
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _evaluate(a, name: str, checkpoint: str) -> None:
    from flowopd.backends import load_checkpoint
    from flowopd.evaluate import evaluate

    m, *_ = evaluate(load_checkpoint(checkpoint, a.device), "test", progress=False,
                       per_group=2 if a.quick else None, steps=8 if a.quick else None)
    rec = {"model": name, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}}
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(name, *(rec.get(k) for k in ("compose", "text", "quality", "fidelity", "average")), flush=True)


def _grpo(job):
    a, name = job
    try:
        from flowopd.trainers.grpo import main_grpo

        t = time.time()
        final = main_grpo(PACKAGED_CONFIGS / f"{TEACHERS[name]}.yaml", os.path.join(a.out, "runs", name),
                          (QUICK_GRPO if a.quick else []) + [f"device={a.device}"])
        print(name, "trained in", round(time.time() - t, 1), "s", flush=True)
        _evaluate(a, name, str(final))
    except Exception:
        print(name, "FAILED", traceback.format_exc(), flush=True)


def _opd(job):
    a, (name, config, extra) = job
    try:
        from flowopd.trainers.opd import main_distill

        runs = os.path.join(a.out, "runs")
        ov = [f"teachers.{t}={runs}/teacher-{t}" for t in ("compose", "text", "quality")]
        ov += (QUICK_OPD if a.quick else []) + [f"device={a.device}", "max_minutes=3.0"] + extra
        if "sft" in name and a.quick:
            ov += QUICK_SFT
        t = time.time()
        final = main_distill(PACKAGED_CONFIGS / f"{config}.yaml", os.path.join(runs, name), ov)
        print(name, "trained in", round(time.time() - t, 1), "s", flush=True)
        _evaluate(a, name, str(final))
    except Exception:
        print(name, "FAILED", traceback.format_exc(), flush=True)


def _base(a):
    try:
        _evaluate(a, "base", "base")
    except Exception:
        print("base FAILED", traceback.format_exc(), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny budgets and evaluation (smoke run)")
    ap.add_argument("--procs", type=int, default=12)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with mp.get_context("spawn").Pool(a.procs, initializer=_init) as pool:
        mix = pool.apply_async(_grpo, ((a, "grpo-mix"),))
        base = pool.apply_async(_base, (a,))
        pool.map(_grpo, [(a, n) for n in TEACHERS if n != "grpo-mix"])
        pool.map(_opd, [(a, v) for v in (VARIANTS[:3] if a.quick else VARIANTS)])
        mix.get()
        base.get()


if __name__ == "__main__":
    main()
