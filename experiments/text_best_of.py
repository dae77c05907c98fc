"""Best of a group on signs: how far a group's best sample is above its mean, under the ODE or the SDE.

A text teacher learns from groups whose samples differ in reward; if the best of a group reads the
sign right, the base can draw it and RL has a target. For --signs random training strings of 3-4
characters (never a test string), --group samples each with the teacher's rollout sampler (--steps,
the checkpoint's CFG): `ode` (initial noise differs), `sde` (noise --noise-level at every step,
initial noise differs) or `sde-shared` (the group shares its initial noise). Prints the reward
`text_dense` and the OCR score: mean over samples, mean within-group std, mean of each group's best.

    python experiments/text_best_of.py --checkpoint experiments/checkpoints/xq15 --sampler sde
    python experiments/text_best_of.py --checkpoint base --sampler ode --out results.jsonl

About 40 seconds on a 2-core CPU at the defaults.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from flowopd.backends import load_checkpoint
from flowopd.rewards import get_reward
from flowopd.rollout import decode_final, rollout
from flowopd.sampling import sampling_defaults
from flowopd.world.prompts import TEXT_CHARS, sign_prompt, text_is_heldout
from flowopd.world.scoring import text_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="base")
    ap.add_argument("--sampler", choices=["ode", "sde", "sde-shared"], default="ode")
    ap.add_argument("--signs", type=int, default=16, help="training strings of 3-4 characters")
    ap.add_argument("--group", type=int, default=12, help="samples per sign")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (the teacher's rollouts: 10)")
    ap.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="append the record to this JSON-lines file")
    a = ap.parse_args()
    if a.signs < 1 or a.group < 2 or a.steps < 1:
        ap.error("--signs and --steps must be >= 1, --group >= 2")
    backend = load_checkpoint(a.checkpoint, device="cpu")
    rng = random.Random(3)
    texts: list[str] = []
    while len(texts) < a.signs:
        t = "".join(rng.choice(TEXT_CHARS) for _ in range(rng.choice([3, 4])))
        if not text_is_heldout(t):
            texts.append(t)
    prompts = [sign_prompt(t) for t in texts]
    method = "ode" if a.sampler == "ode" else "sde"
    d = sampling_defaults(backend)
    ro = rollout(backend, prompts, ["text"] * len(prompts), a.group, steps=a.steps, cfg=float(d["cfg"]),
                 noise_level=a.noise_level, method=method, shift=float(d["shift"]), micro_batch=48,
                 shared_noise=a.sampler == "sde-shared", generator=torch.Generator().manual_seed(a.seed))
    images = decode_final(backend, ro)
    dense = get_reward("text_dense")(images, ro.prompts, ro.metadata).view(len(texts), a.group).numpy()
    ocr = np.array([text_score(t, im) for t, im in zip([t for t in texts for _ in range(a.group)], images)])
    ocr = ocr.reshape(len(texts), a.group)
    rec = {"checkpoint": a.checkpoint, "sampler": a.sampler, "signs": a.signs, "group": a.group, "steps": a.steps,
           "noise_level": a.noise_level, "seed": a.seed}
    for name, r in (("text_dense", dense), ("ocr", ocr)):
        rec[name] = {"mean": round(float(r.mean()), 3), "std_in_group": round(float(r.std(1).mean()), 3),
                     "best_of_group": round(float(r.max(1).mean()), 3)}
        print(f"{name}: mean {rec[name]['mean']:.3f}   within-group std {rec[name]['std_in_group']:.3f}   "
              f"best of {a.group} {rec[name]['best_of_group']:.3f}")
    if a.out:
        with Path(a.out).open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
