"""Is there a spread inside a group for RL to use? Per-prompt success rates over G noises.

    python experiments/group_spread.py CKPT [--group 16] [--prompts 16] [--steps 10] [--cfg CFG] [--signs N]

For up to --prompts train prompts of each compose category, samples --group images per prompt (the
ODE sampler, the teacher's 10 steps, the checkpoint's CFG unless --cfg) and prints the strict success
rate of each prompt, sorted, with the dense reward's mean, its mean within-group standard deviation
and its correlation with strict success. Group-relative RL learns from prompts whose rate lies
strictly between 0 and 1; a prompt at 0 or 1 gives a group of equal strict rewards. About 50 seconds
on a 2-core CPU at the defaults. With --signs N it reads N training signs instead: the OCR reading
of each of the --group samples, to see whether a sign's errors change with the noise.
"""
from __future__ import annotations

import argparse

import numpy as np

from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import CATEGORIES, get_split, parse, train_prompts
from flowopd.world.scoring import compose_partial, compose_reward, ocr_read, reading_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--group", type=int, default=16, help="noises per prompt")
    ap.add_argument("--prompts", type=int, default=16, help="train prompts per category (fewer if the pool is smaller)")
    ap.add_argument("--steps", type=int, default=10, help="ODE steps")
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=3, help="noise seed")
    ap.add_argument("--signs", type=int, default=0, help="read this many train signs instead of compose prompts")
    a = ap.parse_args()
    backend = load_checkpoint(a.checkpoint)
    rng = np.random.default_rng(0)
    if a.signs:
        pool = [p.text for p in get_split("train") if p.task == "text"]
        picked = [pool[i] for i in rng.choice(len(pool), size=min(a.signs, len(pool)), replace=False)]
        prompts = [p for p in picked for _ in range(a.group)]
        images = sample_images(backend, prompts, steps=a.steps, cfg=a.cfg, seed=a.seed, progress=False)
        for k, p in enumerate(picked):
            target = parse(p).text
            reads = [ocr_read(im) for im in images[k * a.group : (k + 1) * a.group]]  # each image read once
            scores = np.array([reading_score(target, r) for r in reads])
            shown = " ".join(r or "-" for r in reads)
            print(f"{target!r}: score {scores.mean():.2f}, std {scores.std():.2f} | {shown}", flush=True)
        return
    for c in CATEGORIES:
        pool = train_prompts(c)
        picked = [pool[i] for i in rng.choice(len(pool), size=min(a.prompts, len(pool)), replace=False)]
        prompts = [p for p in picked for _ in range(a.group)]
        images = sample_images(backend, prompts, steps=a.steps, cfg=a.cfg, seed=a.seed, progress=False)
        strict = compose_reward(images, prompts).reshape(-1, a.group)
        dense = compose_partial(images, prompts).reshape(-1, a.group)
        corr = np.corrcoef(dense.ravel(), strict.ravel())[0, 1] if strict.std() > 0 else float("nan")
        rates = " ".join(f"{x:.2f}" for x in sorted(strict.mean(1)))
        print(f"{c}: strict {strict.mean():.2f}, per prompt {rates} | dense {dense.mean():.2f}, "
              f"within-group std {dense.std(1).mean():.3f}, corr with strict {corr:.2f}", flush=True)


if __name__ == "__main__":
    main()
