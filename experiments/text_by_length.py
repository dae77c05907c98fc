"""Text score by string length, on training strings and on held-out (test) strings.

The evaluation's text score mixes four lengths. A base can draw the one-character signs it was
trained on perfectly and the held-out ones badly (there are only 33 one-character strings, and the
test split holds out 16 of them), and a text teacher learns from training strings only, so the split
and the length both matter when a text teacher does not learn.

    python experiments/text_by_length.py --checkpoint experiments/checkpoints/xq15
    python experiments/text_by_length.py --checkpoint runs/NAME/final --out experiments/results/text_by_length.jsonl

For each length 1-4: --per-length training strings (random, never a test string) and as many test
strings (the 400 held-out strings of that length, cycled), one ODE sample each (--steps; --cfg, default
the checkpoint's), scored by the OCR score. About 30 seconds on a 2-core CPU at the defaults.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import MAX_TEXT_LEN, TEXT_CHARS, _test_texts, sign_prompt, text_is_heldout
from flowopd.world.scoring import text_score


def strings(length: int, n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """-> (n training strings, n test strings) of one length."""
    test = [t for t in sorted(_test_texts()) if len(t) == length]
    rng.shuffle(test)
    test = (test * n)[:n]
    train: list[str] = []
    while len(train) < n:
        t = "".join(rng.choice(TEXT_CHARS) for _ in range(length))
        if not text_is_heldout(t):
            train.append(t)
    return train, test


def add_sign_options(ap: argparse.ArgumentParser, per_length: int) -> None:
    """The options of the sign experiments (this script and text_confusions.py)."""
    ap.add_argument("--checkpoint", default="base")
    ap.add_argument("--per-length", type=int, default=per_length, help="strings per length and split")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--seed", type=int, default=1, help="noise seed")
    ap.add_argument("--out", default="", help="append the record to this JSON-lines file")


def parse_sign_options(ap: argparse.ArgumentParser) -> argparse.Namespace:
    a = ap.parse_args()
    if a.per_length < 1 or a.steps < 1:
        ap.error("--per-length and --steps must be >= 1")
    return a


def append_record(out: str, rec: dict) -> None:
    """Append rec to the JSON-lines file out (nothing when out is empty)."""
    if out:
        with Path(out).open("a") as f:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sign_options(ap, per_length=32)
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    a = parse_sign_options(ap)
    backend = load_checkpoint(a.checkpoint, device="cpu")
    rng = random.Random(5)
    rec: dict = {"checkpoint": a.checkpoint, "per_length": a.per_length, "steps": a.steps, "seed": a.seed}
    if a.cfg is not None:
        rec["cfg"] = a.cfg
    for n in range(1, MAX_TEXT_LEN + 1):
        row = {}
        for split, ts in zip(("train", "test"), strings(n, a.per_length, rng)):
            images = sample_images(backend, [sign_prompt(t) for t in ts], steps=a.steps, cfg=a.cfg, seed=a.seed,
                                   progress=False)
            row[split] = round(float(np.mean([text_score(t, im) for t, im in zip(ts, images)])), 3)
        rec[str(n)] = row
        print(f"length {n}: train {row['train']:.3f}   test {row['test']:.3f}", flush=True)
    for split in ("train", "test"):
        rec[f"{split}_mean"] = round(float(np.mean([rec[str(n)][split] for n in range(1, MAX_TEXT_LEN + 1)])), 3)
    print(f"mean: train {rec['train_mean']:.3f}   test {rec['test_mean']:.3f}")
    append_record(a.out, rec)


if __name__ == "__main__":
    main()
