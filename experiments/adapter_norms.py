"""How far a trained LoRA moved each kind of module: the Frobenius norm of its weight change,
summed over the modules of each kind (to_q, to_k, to_v, to_out, conv1, conv2, film).

Used to compare text teachers on two bases: does one teacher move some kind of module (the FiLM
that reads the pooled prompt, say) that the other cannot or does not?

    python experiments/adapter_norms.py runs/base_t/final runs/xl_hi48/final

Each argument is a checkpoint with adapters (a GRPO run's final/); every adapter in its
config.json is reported, with its rank and alpha.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from flowopd.backends.tiny import read_weights
from flowopd.lora import lora_delta, lora_from_state_dict

KINDS = ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2", "film")


def kind_of(module: str) -> str:
    last = module.rsplit(".", 1)[-1]
    return last if last in KINDS else "other"


def norms(path: Path) -> dict[str, dict]:
    cfg = json.loads((path / "config.json").read_text())
    out = {}
    for name, a in (cfg.get("adapters") or {}).items():
        lora = lora_from_state_dict(read_weights(path / a["file"]))
        scale = float(a["alpha"]) / int(a["rank"])
        sq = defaultdict(float)
        for module, (A, B) in lora.items():
            sq[kind_of(module)] += float(lora_delta(A, B, scale).pow(2).sum())
        out[name] = {"rank": a["rank"], "alpha": a["alpha"],
                     "norms": {k: round(v ** 0.5, 4) for k, v in sorted(sq.items())}}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    args = ap.parse_args()
    for p in args.checkpoints:
        res = norms(p)
        if not res:
            print(f"{p}: no adapters")
        for name, r in res.items():
            print(f"{p} [{name}, rank {r['rank']}, alpha {r['alpha']}]: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["norms"].items()))


if __name__ == "__main__":
    main()
