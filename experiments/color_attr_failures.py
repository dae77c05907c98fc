"""How a model's held-out color_attr images fail: colours swapped, or one object's colour leaking
onto the other.

Every test color_attr prompt names one of the held-out colour-shape pairs (HELDOUT_COLOR_SHAPE),
which no training prompt of any category names. Each test prompt is sampled with N noises and
every failed image is put in the first class that fits:
  - wrong objects: not exactly the two named shapes (a count or shape error, not a binding one);
  - one shape named twice: prompts like "a purple square and a red square";
  - swapped: each shape got the other one's colour;
  - held-out / other object took the other's colour: that object is drawn in the other object's
    colour (both objects then share one colour);
  - held-out / other object took a third colour;
  - colours right, failed otherwise.

    python experiments/color_attr_failures.py --checkpoint experiments/checkpoints/order_candidate
    python experiments/color_attr_failures.py --checkpoint runs/NAME/final --noises 4 --out FILE.json

Prints the fraction of images in each class; --out writes them as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import HELDOUT_COLOR_SHAPE, make_prompt, test_prompts_of
from flowopd.world.scoring import compose_reward, detect_objects


def failure_class(prompt: str, image) -> str:
    spec = make_prompt(prompt).spec
    o1, o2 = spec.objects
    dets = [d for d in detect_objects(image) if d.valid]
    if len(dets) != 2 or sorted(d.shape for d in dets) != sorted((o1.shape, o2.shape)):
        return "wrong objects"
    if o1.shape == o2.shape:
        return "one shape named twice"
    got = {d.shape: d.color for d in dets}
    if got[o1.shape] == o2.color and got[o2.shape] == o1.color:
        return "swapped"
    if got[o1.shape] == o1.color and got[o2.shape] == o2.color:
        return "colours right, failed otherwise"  # e.g. an invalid extra detection
    o, other = (o1, o2) if got[o1.shape] != o1.color else (o2, o1)
    who = "held-out object" if (o.color, o.shape) in HELDOUT_COLOR_SHAPE else "other object"
    return f"{who} took the other's colour" if got[o.shape] == other.color else f"{who} took a third colour"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="base")
    ap.add_argument("--noises", type=int, default=4, help="samples per test prompt")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--out", default="", help="write the fractions here as JSON")
    a = ap.parse_args()
    if a.noises < 1 or a.steps < 1:
        ap.error("--noises and --steps must be >= 1")

    backend = load_checkpoint(a.checkpoint, device="cpu")
    prompts = [p for p in test_prompts_of("color_attr") for _ in range(a.noises)]
    images = sample_images(backend, prompts, steps=a.steps, seed=0, progress=False)
    ok = np.asarray(compose_reward(images, prompts)) > 0.5
    counts = collections.Counter("right" if k else failure_class(p, im) for p, im, k in zip(prompts, images, ok))
    fractions = {k: round(v / len(prompts), 4) for k, v in counts.most_common()}
    for k, v in fractions.items():
        print(f"{v:.3f}  {k}")
    if a.out:
        Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "noises": a.noises, "steps": a.steps,
                                           "images": len(prompts), "fractions": fractions}, indent=1))


if __name__ == "__main__":
    main()
