"""Which characters a checkpoint draws wrongly, and how concentrated its mistakes are.

A text teacher trained on a few thousand training signs fixes held-out signs too only where the
base's mistakes are shared across strings (a glyph drawn for the wrong character wherever it
appears). This reads signs of lengths 2-4 (experiments/text_by_length.py's strings, one ODE sample
each), and for every read of the target's length counts the characters read wrong, by target
character and by (target, read) pair.

    python experiments/text_confusions.py --checkpoint base --out experiments/results/text_confusions.jsonl

Prints how many signs were read at another length (left out of the counts), the share of characters
read wrong, the share of the mistakes made on the 5 most-missed characters and in the 5 commonest
pairs, and the most-missed characters and commonest pairs themselves.
"""
from __future__ import annotations

import argparse
import random
from collections import Counter

from flowopd.backends import load_checkpoint
from flowopd.sampling import sample_images
from flowopd.world.prompts import sign_prompt
from flowopd.world.scoring import ocr_read

from text_by_length import add_sign_options, append_record, parse_sign_options, strings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sign_options(ap, per_length=64)
    a = parse_sign_options(ap)
    backend = load_checkpoint(a.checkpoint, device="cpu")
    rng = random.Random(5)
    targets: list[str] = []
    for n in (2, 3, 4):
        train, test = strings(n, a.per_length, rng)
        targets += train + test
    images = sample_images(backend, [sign_prompt(t) for t in targets], steps=a.steps, seed=a.seed, progress=False)
    seen, missed, pairs, other_length = Counter(), Counter(), Counter(), 0
    for t, im in zip(targets, images):
        r = ocr_read(im)
        if len(r) != len(t):
            other_length += 1
            continue
        for c, d in zip(t, r):
            seen[c] += 1
            if c != d:
                missed[c] += 1
                pairs[(c, d)] += 1
    errors, chars = sum(missed.values()), sum(seen.values())
    rec = {"checkpoint": a.checkpoint, "per_length": a.per_length, "steps": a.steps, "seed": a.seed,
           "signs": len(targets), "other_length": other_length, "chars": chars, "errors": errors,
           "error_rate": round(errors / max(1, chars), 4),
           "top5_chars_share": round(sum(v for _, v in missed.most_common(5)) / max(1, errors), 3),
           "top5_pairs_share": round(sum(v for _, v in pairs.most_common(5)) / max(1, errors), 3),
           "distinct_pairs": len(pairs),
           "worst_chars": [[c, missed[c], seen[c]] for c, _ in missed.most_common(8)],
           "top_pairs": [[c + ">" + d, v] for (c, d), v in pairs.most_common(8)]}
    print(f"{a.checkpoint}: {len(targets)} signs, {other_length} read at another length; "
          f"{errors} of {rec['chars']} characters wrong ({rec['error_rate']:.3f}); "
          f"top-5 characters hold {rec['top5_chars_share']:.2f} of the mistakes, top-5 pairs "
          f"{rec['top5_pairs_share']:.2f} ({len(pairs)} distinct pairs)")
    print("  most missed (wrong / seen):", ", ".join(f"{c} {m}/{s}" for c, m, s in rec["worst_chars"]))
    print("  commonest pairs (target>read):", ", ".join(f"{p} {v}" for p, v in rec["top_pairs"]))
    append_record(a.out, rec)


if __name__ == "__main__":
    main()
