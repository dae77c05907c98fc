"""Compose accuracy on training prompts against held-out prompts, category by category.

A teacher trains on training prompts only; what it learns reaches the held-out ones only where the
base fails both for the same reason. This measures the gap of a checkpoint (and, run on a teacher,
whether the teacher moved its training prompts at all) with the evaluation's sampler settings:
N prompts of each split (cycling through the split's prompts), one noise each, 20 steps, the
checkpoint's CFG unless --cfg (the record then carries it).

    python experiments/split_gap.py --checkpoint experiments/checkpoints/parse_window
    python experiments/split_gap.py --checkpoint runs/NAME/final --categories position,color_attr --out FILE.jsonl

Prints one line per category; --out appends the whole record to a JSON-lines file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from compose_probe import split_prompts
from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import CATEGORIES
from flowopd.world.scoring import compose_reward, standard_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="base")
    ap.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated compose categories")
    ap.add_argument("--per-split", type=int, default=64, help="prompts per category and split")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    ap.add_argument("--out", default="", help="append the record to this JSON-lines file")
    a = ap.parse_args()
    cats = [c for c in a.categories.split(",") if c]
    bad = [c for c in cats if c not in CATEGORIES]
    if bad or a.per_split < 2 or a.steps < 1:
        ap.error(f"unknown categories {bad}" if bad else "--per-split must be >= 2 and --steps >= 1")

    backend = load_checkpoint(a.checkpoint, device="cpu")
    rec: dict = {"checkpoint": a.checkpoint, "per_split": a.per_split, "steps": a.steps, "seed": a.seed}
    if a.cfg is not None:
        rec["cfg"] = a.cfg
    for cat in cats:
        row = {}
        for split in ("train", "test"):
            prompts = split_prompts(cat, split, a.per_split)
            images = sample_images(backend, prompts, steps=a.steps, seed=a.seed, cfg=a.cfg, progress=False)
            r = compose_reward(images, prompts)
            row[split] = round(float(r.mean()), 4)
            row[f"{split}_se"] = round(standard_error(r), 4)
        rec[cat] = row
        print(f"{cat:14s} train {row['train']:.3f} +- {row['train_se']:.3f}   test {row['test']:.3f} +- {row['test_se']:.3f}",
              flush=True)
    if a.out:
        with Path(a.out).open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
