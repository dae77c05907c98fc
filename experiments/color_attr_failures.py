"""How a model's held-out color_attr images fail: colours swapped, or one object's colour leaking
onto the other.

Every test color_attr prompt names one of the held-out colour-shape pairs (HELDOUT_COLOR_SHAPE),
which no training prompt of any category names. Each test prompt is sampled with N noises and each
image gets compose_probe.failure's label ("ok", "binding swapped", detection counts, ...), with
"colours wrong" split further:
  - colours wrong, one shape named twice: prompts like "a purple square and a red square";
  - held-out / other object took the other's colour: that object is drawn in the other object's
    colour (both objects then share one colour);
  - held-out / other object took a third colour.

    python experiments/color_attr_failures.py --checkpoint experiments/checkpoints/order_candidate
    python experiments/color_attr_failures.py --checkpoint runs/NAME/final --noises 4 --out FILE.json

Prints the fraction of images in each class; --out writes them as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from compose_probe import failure
from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import HELDOUT_COLOR_SHAPE, make_prompt, test_prompts_of
from flowopd.world.scoring import detect_objects


def failure_class(prompt: str, image) -> str:
    p = make_prompt(prompt)
    label = failure(p, image)
    if label != "colours wrong":
        return label
    o1, o2 = p.spec.objects
    if o1.shape == o2.shape:
        return "colours wrong, one shape named twice"
    got = {d.shape: d.color for d in detect_objects(image)}  # failure(): two valid detections, the named shapes
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
    counts = collections.Counter(failure_class(p, im) for p, im in zip(prompts, images))
    fractions = {k: round(v / len(prompts), 4) for k, v in counts.most_common()}
    for k, v in fractions.items():
        print(f"{v:.3f}  {k}")
    if a.out:
        Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "noises": a.noises, "steps": a.steps,
                                           "images": len(prompts), "fractions": fractions}, indent=1))


if __name__ == "__main__":
    main()
