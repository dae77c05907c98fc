"""How easily a small change of the weights changes which signs a checkpoint draws right.

A probe of one guess: that a text teacher lifts a base whose sign choices move under small changes
of the weights more easily than one whose choices are firm. This perturbs every weight the
teacher's LoRA adapts (LORA_TARGETS) by Gaussian noise of a given size relative to that weight's
norm, draws the same signs from the same noise, and reports how often the OCR reading changes, and
the spread of the text score over the perturbations. One ODE sample per sign (--steps, the
checkpoint's CFG), training and test strings of every length alike.

    python experiments/text_fragility.py --checkpoint base --scale 0.01 --draws 4 --out FILE
"""
from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

import numpy as np
import torch

from flowopd.backends import load_checkpoint
from flowopd.backends.tiny import LORA_TARGETS
from flowopd.sampling import sample_images
from flowopd.world.prompts import MAX_TEXT_LEN, random_text, sign_prompt
from flowopd.world.scoring import ocr_read, text_score


def perturb(model: torch.nn.Module, scale: float, gen: torch.Generator) -> None:
    """Add noise of norm `scale` x ||W|| to each weight of a LoRA-targeted module, in place."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.split(".")[-1] not in LORA_TARGETS:
                continue
            for p in mod.parameters(recurse=False):
                if p.dim() < 2:
                    continue
                noise = torch.randn(p.shape, generator=gen)
                p.add_(noise * (scale * p.norm() / noise.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="base")
    ap.add_argument("--scale", type=float, default=0.01, help="noise norm relative to each weight's norm")
    ap.add_argument("--draws", type=int, default=4, help="perturbations")
    ap.add_argument("--per-length", type=int, default=16, help="signs per length (half training, half test)")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--out", default="", help="append the record to this JSON-lines file")
    a = ap.parse_args()
    if a.scale <= 0 or a.draws < 1 or a.per_length < 2 or a.steps < 1:
        ap.error("--scale must be > 0, --draws >= 1, --per-length >= 2, --steps >= 1")
    rng = random.Random(11)
    texts = [random_text(rng, split, length=n) for n in range(1, MAX_TEXT_LEN + 1)
             for split in ("train", "test") for _ in range(a.per_length // 2)]
    prompts = [sign_prompt(t) for t in texts]
    backend = load_checkpoint(a.checkpoint, device="cpu")
    clean = copy.deepcopy(backend.model.state_dict())

    def draw():
        images = sample_images(backend, prompts, steps=a.steps, seed=1, progress=False)
        return [ocr_read(im) for im in images], float(np.mean([text_score(t, im) for t, im in zip(texts, images)]))

    reads0, score0 = draw()
    flips, scores = [], []
    gen = torch.Generator().manual_seed(0)
    for _ in range(a.draws):
        perturb(backend.model, a.scale, gen)
        reads, score = draw()
        backend.model.load_state_dict(clean)
        flips.append(float(np.mean([r != r0 for r, r0 in zip(reads, reads0)])))
        scores.append(score)
    rec = {"checkpoint": a.checkpoint, "scale": a.scale, "draws": a.draws, "signs": len(texts), "steps": a.steps,
           "score": round(score0, 3), "perturbed_scores": [round(s, 3) for s in scores],
           "read_changed": round(float(np.mean(flips)), 3)}
    print(json.dumps(rec))
    if a.out:
        with Path(a.out).open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
