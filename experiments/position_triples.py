"""Position, triple by triple: where a model's position errors come from.

For each of the 24 position prompts (shape, relation, shape2), sample N noises and report the strict
accuracy and, among the images that hold both shapes, how often the relation is reversed (the first
shape on the wrong side). Each held-out test triple shares its words with a training triple whose
layout is the opposite ("a square above a circle" is test, "a square below a circle" is train), so
a model that maps the word set to a layout, rather than reading the relation, fails on test by
drawing the reversed layout.

    python experiments/position_triples.py --checkpoint experiments/checkpoints/order_candidate
    python experiments/position_triples.py --checkpoint runs/NAME/final --noises 16 --out FILE.json

Prints one line per triple and the train / test means; --out writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from compose_probe import answer
from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import enumerate_category, is_heldout, make_prompt
from flowopd.world.scoring import compose_reward


def first_shape(prompt: str) -> str:
    """The shape that should be left of / above the other one."""
    spec = make_prompt(prompt).spec
    a, b = spec.objects[0].shape, spec.objects[1].shape
    return a if spec.relation in ("left of", "above") else b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="base")
    ap.add_argument("--noises", type=int, default=16, help="samples per triple")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    ap.add_argument("--out", default="", help="write the rows and means here as JSON")
    a = ap.parse_args()
    if a.noises < 1 or a.steps < 1:
        ap.error("--noises and --steps must be >= 1")

    backend = load_checkpoint(a.checkpoint, device="cpu")
    rows = []
    for p in enumerate_category("position"):
        ims = sample_images(backend, [p] * a.noises, steps=a.steps, cfg=a.cfg, seed=0, progress=False)
        acc = float(compose_reward(ims, [p] * a.noises).mean())
        drawn = [x for x in (answer(p, im) for im in ims) if x is not None]
        rev = float(np.mean([x[0] != first_shape(p) for x in drawn])) if drawn else float("nan")
        split = "test" if is_heldout(p) else "train"
        rows.append({"prompt": p, "split": split, "accuracy": acc, "reversed": rev, "both_drawn": len(drawn)})
        print(f"{split:5s} {p:32s} accuracy {acc:.2f}  reversed {rev:.2f} of {len(drawn)}", flush=True)
    means = {}
    for split in ("train", "test"):
        r = [x for x in rows if x["split"] == split]
        revs = [x["reversed"] for x in r if not math.isnan(x["reversed"])]
        means[split] = {"accuracy": round(float(np.mean([x["accuracy"] for x in r])), 4),
                        "reversed": round(float(np.mean(revs)), 4) if revs else None, "triples": len(r)}
        print(f"{split}: accuracy {means[split]['accuracy']:.3f}, reversed {means[split]['reversed']}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "noises": a.noises, "steps": a.steps,
                                           "cfg": a.cfg, "means": means, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
