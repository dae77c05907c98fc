"""Compose accuracy per category on train prompts beside test prompts, for several checkpoints.

    python experiments/compose_split.py CKPT [CKPT ...] [--per-category 48] [--steps 20] [--seed 11]

Tells a teacher that learns nothing apart from one that learns the train prompts and does not carry
it to the test split's held-out combinations: each category's prompts (train_prompts / the
held-out test_prompts_of, cycled) are sampled once each with the ODE sampler and scored strictly
(world.scoring.score_images: the evaluation's per-category means and the compose standard error).
Prints one JSON line per checkpoint and appends it to --out (default:
experiments/results/compose_split_cpu.jsonl beside this script). About 40 seconds a checkpoint on a
2-core CPU at the defaults.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import CATEGORIES, make_prompt, test_prompts_of, train_prompts
from flowopd.world.scoring import score_images

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--per-category", type=int, default=48, help="images per category and split")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--seed", type=int, default=11, help="noise seed")
    ap.add_argument("--out", default=str(RESULTS / "compose_split_cpu.jsonl"))
    a = ap.parse_args()
    for ck in a.checkpoints:
        backend = load_checkpoint(ck)
        rec = {"checkpoint": ck, "per_category": a.per_category, "steps": a.steps, "seed": a.seed}
        for split, pool_of in (("train", train_prompts), ("test", test_prompts_of)):
            prompts = [make_prompt(pool[i % len(pool)], "compose")
                       for pool in map(pool_of, CATEGORIES) for i in range(a.per_category)]
            m = score_images(sample_images(backend, [p.text for p in prompts], steps=a.steps, seed=a.seed,
                                           progress=False), prompts)
            rec.update({f"{split}.{c}": round(m[c], 3) for c in CATEGORIES})
            rec[split], rec[f"{split}.se"] = round(m["compose"], 3), round(m["se"]["compose"], 3)
        print(json.dumps(rec), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
