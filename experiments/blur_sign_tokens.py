"""Blur which character each sign token names: mix the sign characters' token embeddings with random vectors.

A base that has learned its signs reads them from the random initial rows of its token embedding (the
learned change of a character's row is about 5% of its norm on qB), so damping those rows toward their
initial values changes nothing. This script moves each character's row part of the way to a fixed
random vector instead:

    row <- (1 - mix) * row + mix * r,   r ~ N(0, 1), drawn from --seed

Only sign prompts contain character tokens: on every other prompt (and the unconditional one) the model
is unchanged, so what a compose teacher learns on it is what it learns on the source checkpoint. Each
character is confused in the same way in training and test strings, so a text teacher trained on
training strings can undo some of it on new strings too.

    python experiments/blur_sign_tokens.py --checkpoint experiments/checkpoints/qB --mix 0.4 --out runs/qcm_0.4
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flowopd.errors import UserError
from flowopd.trainers.pretrain import blur_sign_tokens

from ema_share import read_source, write  # (beside this script: the checkpoint read and written back)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="'base' or a checkpoint directory")
    ap.add_argument("--mix", type=float, required=True, help="share of each row replaced by a random vector, in [0, 1]")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the random vectors")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not 0 <= args.mix <= 1:
        ap.error("--mix must be in [0, 1]")
    src, cfg, weights = read_source(args.checkpoint)
    try:
        blurred = blur_sign_tokens(weights, args.mix, args.seed)  # (refuses a model without the token rows)
    except UserError as e:
        raise SystemExit(f"{args.checkpoint}: {e}") from None
    meta = cfg.get("meta", {})
    meta["blur_sign_tokens"] = {"source": str(args.checkpoint), "mix": args.mix, "seed": args.seed}
    write(src, args.out, cfg, meta, blurred)


if __name__ == "__main__":
    main()
