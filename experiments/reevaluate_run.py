"""Evaluate a finished `flowopd run` folder's models again with today's evaluation, and check that
every number its results.json holds comes out the same (evaluation is deterministic on one
machine), so that metrics added to evaluation since the run (e.g. text per sign length) can be
reported beside its table.

    python experiments/reevaluate_run.py runs/pipe29 --out experiments/results/pipeline_qcm_full/reevaluated.json

Writes {model: metrics} with the run's evaluation settings (results.json "eval"); exits with status
1, naming the key, when a number of results.json differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowopd.backends import load_checkpoint  # noqa: E402
from flowopd.evaluate import evaluate  # noqa: E402

SKIP = {"seconds", "checkpoint"}  # wall time differs from run to run


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys of `old` whose value `new` does not reproduce exactly (nested dicts key by key)."""
    out = []
    for k, v in old.items():
        if k in SKIP:
            continue
        if isinstance(v, dict):
            out += differences(v, new.get(k) or {}, f"{prefix}{k}.")
        elif new.get(k) != v:
            out.append(f"{prefix}{k}: {v!r} in results.json, {new.get(k)!r} now")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished `flowopd run` output folder")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--models", nargs="*", default=None, help="default: every model of results.json")
    a = ap.parse_args(argv)
    results = json.loads((a.run / "results.json").read_text())
    e = results.get("eval") or {}
    done = json.loads(a.out.read_text()) if a.out.is_file() else {}
    bad = []
    for model in a.models or list(results["models"]):
        if model not in done:
            metrics, *_ = evaluate(load_checkpoint(a.run / "checkpoints" / model), "test", steps=e.get("steps"),
                                   per_group=e.get("per_group"), progress=False)
            done[model] = metrics
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(done, indent=2) + "\n")  # kept after each model: a rerun resumes
        diff = differences(results["models"][model], done[model])
        bad += [f"{model}: {d}" for d in diff]
        lengths = [done[model].get(f"text_len{n}") for n in range(1, 5)]
        print(f"{model}: {'same' if not diff else f'{len(diff)} numbers differ'}; text by length "
              + " / ".join("-" if v is None else f"{v:.3f}" for v in lengths), flush=True)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
