"""Why a checkpoint fails the compose task: word-order sensitivity and a breakdown of failures.

    python experiments/compose_probe.py [--checkpoint base] [--seeds 64] [--per-split 128] [--out FILE]

1. Word order. Pairs of prompts with the same words in another order ("a circle left of a square"
   / "a square left of a circle", "... left of ..." / "... right of ...", "a red square and a blue
   circle" / "a blue square and a red circle") are sampled from the same initial noises (the
   evaluation sampler: ODE, the checkpoint's steps and CFG). For each noise where both images hold
   the two named shapes, the probe records which shape came first along the relation's axis
   (position) or which colour each shape got (color_attr). `same` is the fraction of noises where
   the two prompts gave the same answer: 1.0 means the model ignores the word order (a
   bag-of-words model), and a model that follows the prompts gives 0.0 for these pairs.
2. Failures. Test and train prompts of each compose category (cycled, one image each, seed 3),
   every image classified: ok (the strict check passes), wrong number of detections or an
   invalid one (touching, off-palette, unknown shape), and, for two valid objects, relation
   reversed / too weak (under 3 px), shapes wrong, colours wrong, binding swapped; for one
   object or a count, shapes or colours wrong.

Writes one JSON object to --out (default: experiments/results/compose_probe_cpu.json beside this script); about 13
minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import CATEGORIES, make_prompt, test_prompts_of, train_prompts
from flowopd.world.render import relation_holds
from flowopd.world.scoring import compose_correct, detect_objects

RESULTS = Path(__file__).resolve().parent / "results"  # experiments/results, whatever the working directory

ORDER_PAIRS = [
    ("a circle left of a square", "a square left of a circle"),
    ("a circle left of a square", "a circle right of a square"),
    ("a triangle above a circle", "a circle above a triangle"),
    ("a triangle above a circle", "a triangle below a circle"),
    ("a red square and a blue circle", "a blue square and a red circle"),
    ("a green triangle and a yellow square", "a yellow triangle and a green square"),
]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def answer(prompt: str, image) -> tuple | None:
    """What the image says about the word-order question of this prompt (None: not both shapes)."""
    spec = make_prompt(prompt).spec
    dets = {d.shape: d for d in detect_objects(image) if d.valid}
    shapes = sorted({o.shape for o in spec.objects})
    if len(dets) != 2 or sorted(dets) != shapes:
        return None
    if spec.category == "position":  # which of the two shapes is first (left / top)
        axis = 0 if spec.relation in ("left of", "right of") else 1
        return (min(shapes, key=lambda s: dets[s].centre[axis]),)
    return tuple((s, dets[s].color) for s in shapes)  # the colour each shape got


def order_probe(backend, seeds: int) -> list[dict]:
    out = []
    for a, b in ORDER_PAIRS:
        ans = [[answer(p, im) for im in sample_images(backend, [p] * seeds, seed=0, progress=False)] for p in (a, b)]
        both = [(x, y) for x, y in zip(*ans) if x is not None and y is not None]
        same = float(np.mean([x == y for x, y in both])) if both else None
        out.append({"pair": [a, b], "both_drawn": len(both), "same": same})
        print(f"  {a!r} / {b!r}: same answer for {same} of {len(both)} noises", flush=True)
    return out


def failure(prompt, image) -> str:
    spec = prompt.spec
    dets = detect_objects(image)
    if compose_correct(spec, image, dets):
        return "ok"
    if len(dets) != len(spec.objects):
        return f"{len(dets)} detections for {len(spec.objects)}"
    if not all(d.valid for d in dets):
        return "invalid detection"
    if len(dets) != 2:
        return "shapes or colours wrong"  # one object, or counting
    a, b = spec.objects
    got_shapes = sorted(d.shape for d in dets)
    if got_shapes != sorted([a.shape, b.shape]):
        return "shapes wrong"
    if spec.category == "position":
        da = next(d for d in dets if d.shape == a.shape)
        db = next(d for d in dets if d.shape == b.shape)
        return "relation reversed" if relation_holds(INVERSE[spec.relation], da.centre, db.centre) else "relation too weak"
    if spec.category == "color_attr" and sorted(d.color for d in dets) == sorted([a.color, b.color]):
        return "binding swapped"
    return "colours wrong"


def split_prompts(category: str, split: str, n: int) -> list[str]:
    """n prompts of a compose category's training or held-out prompts, cycling through them."""
    pool = test_prompts_of(category) if split == "test" else train_prompts(category)
    return [pool[i % len(pool)] for i in range(n)]


def failure_probe(backend, n: int) -> dict:
    out = {}
    for cat in CATEGORIES:
        for split in ("test", "train"):
            prompts = [make_prompt(p) for p in split_prompts(cat, split, n)]
            images = sample_images(backend, [p.text for p in prompts], seed=3, progress=False)
            counts = collections.Counter(failure(p, im) for p, im in zip(prompts, images))
            out[f"{cat}/{split}"] = {"accuracy": counts["ok"] / n, **dict(counts.most_common())}
            print(f"  {cat}/{split}: {dict(counts.most_common())}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="base")
    ap.add_argument("--seeds", type=int, default=64, help="noises per word-order pair")
    ap.add_argument("--per-split", type=int, default=128, help="prompts per category and split")
    ap.add_argument("--out", default=str(RESULTS / "compose_probe_cpu.json"))
    a = ap.parse_args()
    backend = load_checkpoint(a.checkpoint)
    t0 = time.time()
    print("word order:", flush=True)
    order = order_probe(backend, a.seeds)
    print("failures:", flush=True)
    fails = failure_probe(backend, a.per_split)
    rec = {"checkpoint": a.checkpoint, "date": time.strftime("%Y-%m-%d"), "minutes": round((time.time() - t0) / 60, 1),
           "word_order": order, "failures": fails}
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
