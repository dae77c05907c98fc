"""A checkpoint's share of its random initial weights: remove it (debias) or add one (damp).

The shipped base was saved as a plain EMA (decay 0.999, 2693 steps) before pretraining debiased its
EMA, so its weights are 0.999^2693 = 6.8% its random initial weights and 93.2% the average of what it
learned. The initial weights can be rebuilt exactly: the model's config and seed, drawn as pretraining
draws them. This script writes

    python experiments/ema_share.py --checkpoint base --out runs/base_deb
        the debiased weights (w - s * init) / (1 - s), s = ema_decay ** steps from the recipe (only
        for checkpoints saved before debiasing: those without a format number in config.json);
    python experiments/ema_share.py --checkpoint experiments/checkpoints/xl --keep 0.933 --out runs/xl_d
        the weights damped toward their initial ones, init + keep * (w - init), as the shipped base is
        (pretraining's `damp` key does the same to the weights it saves);
    python experiments/ema_share.py --checkpoint runs/B/final --keep 0.5 --toward runs/A/final --out runs/B_d
        the weights damped toward another checkpoint's (the one B was continued from), A + keep * (B - A):
        what B learned after A, damped.

For a checkpoint continued from another (`init` in its recipe, as the curriculum's stages are), the
random initial weights are those of the run that started from scratch, with the same model and seed.
The script checks that the rebuilt weights are the right ones (the checkpoint's tensors correlate with
them; with another seed they do not) and refuses otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowopd.backends.tiny import read_weights, resolve_checkpoint
from flowopd.backends.tiny_model import TinyConfig
from flowopd.trainers.pretrain import damped, debiased_ema
from flowopd.trainers.pretrain import initial_weights as pretrain_initial_weights


def initial_weights(model_cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """The random weights a pretraining run from scratch starts from (seeded before the model is built)."""
    return pretrain_initial_weights(TinyConfig.from_dict(model_cfg), seed)


def mean_correlation(w: dict, init: dict) -> float:
    """Mean correlation of w with init, over the tensors of 1000+ entries whose initial values vary."""
    cs = []
    for k, v in init.items():
        a, b = w[k].float().flatten(), v.float().flatten()
        if a.numel() >= 1000 and b.std() > 0:
            cs.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    return sum(cs) / len(cs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="'base' or a checkpoint directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=float, default=None,
                    help="damp: keep this share of the learned change (default: debias by the recipe's EMA share)")
    ap.add_argument("--toward", default=None,
                    help="with --keep: damp toward this checkpoint's weights (the one the checkpoint was "
                         "continued from) instead of the random initial ones")
    args = ap.parse_args()
    if args.keep is not None and args.keep <= 0:
        ap.error("--keep must be > 0 (the share of the learned change to keep)")
    if args.toward and args.keep is None:
        ap.error("--toward needs --keep")

    src, cfg, weights = read_source(args.checkpoint)
    meta = cfg.get("meta", {})
    if args.toward:
        origin = read_weights(resolve_checkpoint(args.toward) / "model.safetensors")
        if set(origin) != set(weights) or any(origin[k].shape != v.shape for k, v in weights.items()):
            raise SystemExit(f"{args.toward} is not the same model as {args.checkpoint}: refusing")
        print(f"damp toward {args.toward}: keep {args.keep} of the change from it")
        new = damped(weights, origin, args.keep)
        meta["ema_share"] = {"source": str(args.checkpoint), "keep": args.keep, "toward": str(args.toward)}
        return write(src, args.out, cfg, meta, new)
    seed = int(meta.get("seed", 0))
    init = initial_weights(cfg["model"], seed)
    corr, other = mean_correlation(weights, init), mean_correlation(weights, initial_weights(cfg["model"], seed + 1))
    print(f"correlation with the rebuilt initial weights: {corr:.3f} (seed {seed}); another seed's: {other:.3f}")
    if corr < 0.2 or corr < 5 * abs(other):
        raise SystemExit("the rebuilt initial weights are not this checkpoint's: refusing")

    if args.keep is None:
        # checkpoints with a format number were written after pretraining began to debias its EMA
        if "format" in cfg or meta.get("recipe", {}).get("init"):
            raise SystemExit(f"{args.checkpoint}: saved debiased, or continued from another checkpoint: "
                             "no share of random initial weights to remove")
        decay, steps = float(meta["recipe"]["ema_decay"]), int(meta["step"])
        share = decay ** steps
        print(f"debias: initial weights' share {share:.4f}")
        new = debiased_ema(weights, init, decay, steps)  # what pretraining saves today
        meta["ema_share"] = {"source": str(args.checkpoint), "removed": share}
    else:
        print(f"damp: keep {args.keep} of the learned change")
        new = damped(weights, init, args.keep)  # what pretraining's `damp` key saves
        meta["ema_share"] = {"source": str(args.checkpoint), "keep": args.keep}
    write(src, args.out, cfg, meta, new)


def read_source(checkpoint: str) -> tuple[Path, dict, dict]:
    """A base checkpoint's directory, config.json and weights; one with LoRA adapters is refused."""
    src = resolve_checkpoint(checkpoint)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("adapters"):
        raise SystemExit(f"{checkpoint}: a checkpoint with LoRA adapters; give the base it was trained on")
    return src, cfg, read_weights(src / "model.safetensors")


def write(src: Path, out: Path, cfg: dict, meta: dict, weights: dict) -> None:
    shutil.copytree(src, out, dirs_exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    cfg["meta"] = meta  # the recipe stays the source's; ema_share says what was done to its weights
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
