"""Damp only the weights one task relies on much more than the others (selective synaptic dampening).

Damping a whole model toward its random initial weights (`ema_share.py --keep`) breaks an order-following
base's drawing before its signs. This script damps only the weights whose importance for a "forget" task
(signs, or one compose category) is at least `--alpha` times their importance for the rest (the "retain"
tasks), as Selective Synaptic Dampening does (Foster et al., 2023, arXiv 2308.07707), but toward the
random initial weights rather than toward zero, so that a teacher has something to relearn:

    w <- init + keep * (w - init)   where  F_forget(w) > alpha * F_retain(w)

F is the diagonal Fisher estimate: the mean squared gradient of the flow-matching loss over small
batches of training prompts, at the noise levels the task is pretrained at (the recipe's
`text_sigma_mean` for signs, `sigma_mean` for objects, or `--retain-sigma` for the retain tasks), each
as a share of its sum over all weights. `--exclude` keeps parameters out of the damping by name prefix.

    python experiments/selective_damp.py --checkpoint experiments/checkpoints/lo_base --forget text \
        --alpha 10 --keep 0.5 --out runs/lob_sd_text
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from flowopd.backends.tiny import load_checkpoint, resolve_checkpoint
from flowopd.backends.tiny_model import Tokenizer
from flowopd.flow import interpolate
from flowopd.losses import flow_matching_loss, logit_normal_sigmas
from flowopd.trainers.pretrain import damped, initial_weights
from flowopd.world.prompts import CATEGORIES, make_prompt, random_text, sample_prompt, sign_prompt
from flowopd.world.render import render, to_model_space

from ema_share import write  # (beside this script: the checkpoint copy with new weights and meta)


def task_batch(task: str, n: int, rng: random.Random):
    """n training prompts of a task ('text' or a compose category) and their renders."""
    prompts = []
    for _ in range(n):
        if task == "text":
            prompts.append(make_prompt(sign_prompt(random_text(rng, "train")), "text"))
        else:
            prompts.append(sample_prompt(rng, "compose", "train", task))
    images = [render(p.spec, rng) for p in prompts]
    return [p.text for p in prompts], torch.from_numpy(to_model_space(np.stack(images)))


def fisher(model, tasks: list[str], sigma_mean: dict, sigma_std: float, batches: int, batch: int, seed: int) -> dict:
    """Mean squared mini-batch gradient of the loss, per parameter, over batches drawn from `tasks`."""
    tok, rng = Tokenizer(), random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(batches):
        task = tasks[i % len(tasks)]
        texts, x0 = task_batch(task, batch, rng)
        ids, slots = tok.batch(texts)
        sigma = logit_normal_sigmas(batch, sigma_mean[task], sigma_std, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        model.zero_grad(set_to_none=True)
        v = model(interpolate(x0, noise, sigma), sigma, model.encode(ids, slots))
        flow_matching_loss(v.float(), x0, noise).backward()
        for k, p in params.items():
            if p.grad is not None:
                acc[k] += p.grad.detach() ** 2 / batches
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--forget", required=True, help="'text' or a compose category")
    ap.add_argument("--retain", default=None, help="comma-separated tasks (default: every other task)")
    ap.add_argument("--alpha", type=float, default=10.0, help="damp where F_forget > alpha * F_retain")
    ap.add_argument("--keep", type=float, default=0.5, help="share of the learned change the selected weights keep")
    ap.add_argument("--batches", type=int, default=48, help="mini-batches per task set")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retain-sigma", default=None, metavar="MEAN,STD",
                    help="the retain tasks' noise levels (logit-normal); default: the recipe's for each task")
    ap.add_argument("--exclude", default="", help="comma-separated parameter-name prefixes never damped")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tasks = ["text", *CATEGORIES]
    if args.forget not in tasks:
        ap.error(f"--forget: one of {', '.join(tasks)}")
    retain = args.retain.split(",") if args.retain else [t for t in tasks if t != args.forget]
    if not set(retain) <= set(tasks) or args.forget in retain:
        ap.error(f"--retain: tasks among {', '.join(tasks)}, without the forget task")
    if not 0 <= args.keep <= 1:
        ap.error("--keep must be in [0, 1]")
    retain_sigma = None
    if args.retain_sigma:  # checked here, before the model is loaded and the forget Fisher computed
        try:  # (a wrong count of numbers fails the unpacking with ValueError too)
            mean, std = (float(x) for x in args.retain_sigma.split(","))
        except ValueError:
            ap.error("--retain-sigma: MEAN,STD, two numbers")
        retain_sigma = [mean, std]

    src = resolve_checkpoint(args.checkpoint)
    cfg = json.loads((src / "config.json").read_text())
    recipe = cfg.get("meta", {}).get("recipe", {})
    sm = float(recipe.get("sigma_mean", 0.0))
    tm = recipe.get("text_sigma_mean")
    sigma_mean = {t: sm for t in CATEGORIES} | {"text": sm if tm is None else float(tm)}
    sigma_std = float(recipe.get("sigma_std", 1.0))
    model = load_checkpoint(src).model.float().train()
    torch.manual_seed(args.seed)
    f_forget = fisher(model, [args.forget], sigma_mean, sigma_std, args.batches, args.batch, args.seed)
    retain_mean, retain_std = sigma_mean, sigma_std
    if retain_sigma:
        retain_mean, retain_std = {t: retain_sigma[0] for t in tasks}, retain_sigma[1]
    f_retain = fisher(model, retain, retain_mean, retain_std, args.batches, args.batch, args.seed + 1)

    # each Fisher as a share of its own total: signs at low noise levels have smaller gradients than
    # objects at high ones, and what matters is a weight's importance relative to the rest of its task's
    for f in (f_forget, f_retain):
        norm = sum(float(v.sum()) for v in f.values())
        for k in f:
            f[k] /= norm
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    init = initial_weights(model.cfg, int(cfg.get("meta", {}).get("seed", 0)))
    low = damped(weights, init, args.keep)
    selected = total = 0
    report = {}
    exclude = tuple(x for x in args.exclude.split(",") if x)
    for k in f_forget:
        mask = f_forget[k] > args.alpha * f_retain[k]
        if exclude and k.startswith(exclude):
            mask = torch.zeros_like(mask)
        weights[k] = torch.where(mask, low[k], weights[k])
        selected += int(mask.sum())
        total += mask.numel()
        if mask.any():
            report[k] = round(float(mask.float().mean()), 4)
    print(f"damped {selected} of {total} weights ({selected / total:.2%}) to keep {args.keep}")
    for k, share in sorted(report.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {share:7.2%}  {k}")

    meta = cfg.get("meta", {})
    meta["selective_damp"] = {
        "source": str(args.checkpoint), "forget": args.forget, "retain": retain, "alpha": args.alpha,
        "keep": args.keep, "batches": args.batches, "batch": args.batch, "seed": args.seed,
        "share": round(selected / total, 5)}
    if exclude:
        meta["selective_damp"]["exclude"] = list(exclude)
    if retain_sigma:
        meta["selective_damp"]["retain_sigma"] = retain_sigma
    write(src, args.out, cfg, meta, weights)


if __name__ == "__main__":
    main()
