"""Which characters of a sign a model gets right: OCR accuracy by sign length and by position in the sign.

A text teacher that stops short can be held back by carrying what it learns to held-out strings, or
by drawing the characters at all; reading the same strings on the training side tells which. A
character counts as right when the OCR reading has the sign's length and that character in that place.

    python experiments/text_by_position.py --checkpoint base
    python experiments/text_by_position.py --checkpoint runs/NAME/final --split train --out experiments/results/text_by_position.jsonl

Strings: the test split's 64 signs (16 of each length), or 16 random training strings of each length
(--seed; never a test string). Each string is sampled from --noises noises (ODE, --steps, the
checkpoint's CFG). About 20 seconds a noise on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import random

import numpy as np

from flowopd.backends import load_checkpoint
from flowopd.backends.tiny import resolve_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import MAX_TEXT_LEN, parse, random_text, sign_prompt, test_split
from flowopd.world.scoring import ocr_read
from text_by_length import append_record  # its neighbour in experiments/

PER_LENGTH = 16


def split_strings(split: str, seed: int) -> list[str]:
    if split == "test":
        return [parse(p.text).text for p in test_split() if p.task == "text"]
    rng = random.Random(seed)
    return [random_text(rng, "train", length=n) for n in range(1, MAX_TEXT_LEN + 1) for _ in range(PER_LENGTH)]


def position_hits(target: str, read: str) -> list[bool]:
    """Per character of target: read has target's length and the same character there."""
    return [len(read) == len(target) and r == c for r, c in zip(read.ljust(len(target)), target)]


def by_position(backend, texts: list[str], noises: int, steps: int) -> dict:
    hits: dict[int, list[list[bool]]] = {n: [[] for _ in range(n)] for n in range(1, MAX_TEXT_LEN + 1)}
    for s in range(noises):
        images = sample_images(backend, [sign_prompt(t) for t in texts], steps=steps, seed=s, progress=False)
        for t, img in zip(texts, images):
            for i, ok in enumerate(position_hits(t, ocr_read(img))):
                hits[len(t)][i].append(ok)
    out = {f"len{n}": [round(float(np.mean(h)), 3) if h else None for h in hits[n]] for n in hits}
    odd = [v for n in hits if n % 2 for h in hits[n] for v in h]
    even = [v for n in hits if not n % 2 for h in hits[n] for v in h]
    out["odd_lengths"] = round(float(np.mean(odd)), 3) if odd else None
    out["even_lengths"] = round(float(np.mean(even)), 3) if even else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", choices=("test", "train"), default="test")
    ap.add_argument("--noises", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=5, help="which training strings (--split train)")
    ap.add_argument("--out", default="", help="append the record to this JSONL file")
    a = ap.parse_args(argv)
    backend = load_checkpoint(resolve_checkpoint(a.checkpoint))
    rec = {"checkpoint": a.checkpoint, "split": a.split, "noises": a.noises, "steps": a.steps,
           **by_position(backend, split_strings(a.split, a.seed), a.noises, a.steps)}
    print(json.dumps(rec))
    append_record(a.out, rec)


if __name__ == "__main__":
    main()
