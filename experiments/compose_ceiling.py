"""How fast can the base learn composition from samples at all? A supervised reference for the
compose teacher: the same LoRA (rank 8, the default targets), optimizer, learning rate and
micro-batches as configs/toy_grpo_compose.yaml, but every training sample is a perfect render of a
training prompt (the world's renderer) instead of a rewarded rollout. The update is
flowopd.losses.nft_loss with r = 1, i.e. flow matching of the guided velocity toward the render:
the NFT objective when every sample is a winner.

    python experiments/compose_ceiling.py [--samples 6144] [--eval-every 2048] [--out FILE]
    python experiments/compose_ceiling.py --objective fm --rank 32 --batch 64 --timesteps 1 \
        --samples 19200 --eval-every 6400          # plain flow matching, as in pretraining
    python experiments/compose_ceiling.py --objective fm --rank 0 --lr 1e-3 --batch 64 --timesteps 1 \
        --categories position --samples 19200 --eval-every 6400   # full fine-tune, position only

`--objective fm` is the pretraining loss instead (the conditional velocity, prompts dropped with
probability 0.1, logit-normal noise levels); `--rank 0` fine-tunes every weight; `--categories`
draws the training prompts from those categories only. Each record also holds the accuracy on
96 train prompts of each trained category (`<category>_train`, seed 5), so memorising the train
combinations shows apart from generalising to the test split's held-out ones.

Appends one JSON line per evaluation (samples seen, compose and its categories on the whole test
split) to --out (default: experiments/results/compose_ceiling_cpu.jsonl beside this script). About 10 minutes on a
2-core CPU for the default 6144 samples (three evaluations).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from flowopd.backends import load_checkpoint
from flowopd.flow import interpolate
from flowopd.losses import flow_matching_loss, logit_normal_sigmas, nft_loss
from flowopd.sampling import guided_velocity, sample_images
from flowopd.world.prompts import get_split, sample_prompt, train_prompts
from flowopd.world.render import render, to_model_space
from flowopd.world.scoring import compose_reward, score_images

RESULTS = Path(__file__).resolve().parent / "results"  # experiments/results, whatever the working directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=6144, help="renders trained on (the teacher's rollouts: 4096)")
    ap.add_argument("--eval-every", type=int, default=2048, help="evaluate after this many samples")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch = optimizer step (the teacher's)")
    ap.add_argument("--timesteps", type=int, default=2, help="noise levels per sample (the teacher's)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (0: full fine-tune)")
    ap.add_argument("--objective", choices=("guided", "fm"), default="guided",
                    help="guided: the NFT update with r = 1 on the guided velocity; fm: pretraining's loss")
    ap.add_argument("--categories", default="", help="comma-separated compose categories (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default="base", help="the model to fine-tune (default: the shipped base)")
    ap.add_argument("--out", default=str(RESULTS / "compose_ceiling_cpu.jsonl"))
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    rng, gen = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    backend = load_checkpoint(a.checkpoint)
    if a.rank:
        backend.add_adapter("ceiling", rank=a.rank, alpha=a.rank)
        params = backend.trainable_parameters()
    else:
        params = list(backend.model.parameters())
        for p in params:
            p.requires_grad_(True)
    cats = [c for c in a.categories.split(",") if c] or None
    train_checks = {c: [train_prompts(c)[(7 * i) % len(train_prompts(c))] for i in range(96)] for c in cats or []}
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    guidance = float(backend.sampling.get("cfg", 1.0))
    guided = a.objective == "guided"
    test = [p for p in get_split("test") if p.task == "compose"]
    t0, seen = time.time(), 0
    while seen < a.samples:
        prompts = [sample_prompt(rng, "compose", "train", rng.choice(cats) if cats else None) for _ in range(a.batch)]
        x0 = torch.as_tensor(np.stack([to_model_space(render(p.spec, rng)) for p in prompts]))
        texts = [p.text for p in prompts]
        opt.zero_grad(set_to_none=True)
        if guided:
            vf = guided_velocity(backend, backend.encode_prompts(texts), backend.encode_prompts([None] * len(texts)),
                                 guidance)
        else:  # pretraining's loss: the conditional velocity, prompts dropped for CFG
            cond = backend.encode_prompts([None if rng.random() < 0.1 else t for t in texts])
            vf = lambda x, t: backend.velocity(x, t, cond)  # noqa: E731
        for _ in range(a.timesteps):
            t = torch.rand(len(texts), generator=gen) if guided else logit_normal_sigmas(len(texts), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            v = vf(interpolate(x0, noise, t), t)
            if guided:  # r = 1: flow matching of the guided velocity
                loss = nft_loss(v, v.detach(), noise - x0, torch.ones(len(texts)))[0]
            else:
                loss = flow_matching_loss(v, x0, noise)
            (loss / a.timesteps).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += len(texts)
        if seen % a.eval_every < a.batch or seen >= a.samples:
            m = score_images(sample_images(backend, [p.text for p in test], progress=False), test)
            rec = {"samples": seen, "minutes": round((time.time() - t0) / 60, 1), "lr": a.lr, "rank": a.rank,
                   "objective": a.objective, "batch": a.batch, "categories": cats or "all",
                   "checkpoint": a.checkpoint}
            rec.update({k: round(float(v), 4) for k, v in m.items() if isinstance(v, float)})
            for c, ps in train_checks.items():
                rec[f"{c}_train"] = round(float(compose_reward(sample_images(backend, ps, seed=5, progress=False), ps).mean()), 4)
            print(json.dumps(rec), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
