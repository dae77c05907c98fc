"""A prompt encoder pretrained on the grammar's language alone, to be frozen under the image model.

Real text-to-image models read their prompts through a text encoder pretrained on language and
kept frozen (SD3: CLIP and T5), so which word belongs to which noun is in the token features before
the image model sees them. This trains the tiny model's TextEncoder (the same module, roles on) on
training-split prompts only, with an objective that needs word order: every word token predicts
the attributes of the object it belongs to (its colour, shape and count, and in a position prompt
its place: the first object of "A left of B" is left, B is right), and every token its own word and
slot (so signs and words stay readable). Then it reports how well the features carry those
attributes on the held-out prompts (colour-shape pairs no training prompt holds).

    python experiments/parse_encoder.py --out runs/parse_enc --steps 1500
    flowopd pretrain --config configs/toy_pretrain_order.yaml --out runs/NAME \
        text_init=runs/parse_enc/encoder.safetensors freeze_text=true

Writes OUT/encoder.safetensors (TextEncoder weights) and OUT/results.json (accuracy per target,
train and held-out).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from flowopd.backends.tiny_model import MAX_QUOTED, PAD, TextEncoder, TinyConfig, Tokenizer
from flowopd.world.prompts import (CATEGORIES, COLORS, SHAPES, enumerate_category, is_heldout, parse, random_text,
                                   sign_prompt)

PLACES = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("above", "below"),
          "below": ("below", "above")}
PLACE_IDS = {p: i + 1 for i, p in enumerate(("left", "right", "above", "below"))}
IGNORE = -100
TARGETS = ("color", "shape", "count", "place")
N_CLASSES = {"color": 1 + len(COLORS), "shape": len(SHAPES), "count": 4, "place": 5}


def targets(prompt: str, ids: list[int], roles: list[int]) -> dict[str, list[int]]:
    """Per token (ids, roles: the prompt's tokens and their roles): the attributes of the object the
    token belongs to (IGNORE on connectives, signs, pads). A counting prompt's words all have role 0
    and name one kind of object."""
    spec = parse(prompt)
    out = {k: [IGNORE] * len(ids) for k in TARGETS}
    if spec.category == "ocr":
        return out
    n_obj = len(spec.objects)
    for t, (i, r) in enumerate(zip(ids, roles)):
        if i == PAD or r == 1:
            continue
        o = spec.objects[0 if r == 0 else 1]
        out["color"][t] = 0 if o.color is None else 1 + COLORS.index(o.color)
        out["shape"][t] = SHAPES.index(o.shape)
        out["count"][t] = (n_obj if spec.category == "counting" else 1) - 1
        place = 0
        if spec.relation:
            place = PLACE_IDS[PLACES[spec.relation][0 if r == 0 else 1]]
        out["place"][t] = place
    return out


def encode_all(prompts: list[str], tok: Tokenizer, enc: TextEncoder) -> dict[str, torch.Tensor]:
    ids, slots = tok.batch(prompts)
    roles = enc.roles(ids)
    rows = [targets(p, i, r) for p, i, r in zip(prompts, ids.tolist(), roles.tolist())]
    d = {"ids": ids, "slots": slots}
    for key in TARGETS:
        d[key] = torch.tensor([r[key] for r in rows])
    return d


class Heads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in N_CLASSES.items()})
        self.heads["word"] = nn.Linear(dim, Tokenizer.size)
        self.heads["slot"] = nn.Linear(dim, Tokenizer.n_slots + MAX_QUOTED)

    def forward(self, h):
        return {k: m(h) for k, m in self.heads.items()}


def losses(out: dict, batch: dict) -> dict[str, torch.Tensor]:
    ls = {k: F.cross_entropy(out[k].flatten(0, 1), batch[k].flatten(), ignore_index=IGNORE) for k in TARGETS}
    keep = batch["ids"] != PAD
    ls["word"] = F.cross_entropy(out["word"][keep], batch["ids"][keep])
    ls["slot"] = F.cross_entropy(out["slot"][keep], batch["slots"][keep])
    return ls


@torch.no_grad()
def accuracy(enc, heads, batch) -> dict[str, float]:
    h, _, _ = enc(batch["ids"], batch["slots"])
    out = heads(h)
    acc = {}
    for k in TARGETS:
        m = batch[k] != IGNORE
        if m.any():
            acc[k] = round(float((out[k].argmax(-1)[m] == batch[k][m]).float().mean()), 4)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--signs", type=float, default=0.3, help="share of sign prompts in a batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = Tokenizer()
    enc = TextEncoder(TinyConfig(roles=True))
    heads = Heads(enc.norm.normalized_shape[0])
    train = [p for c in CATEGORIES for p in enumerate_category(c) if not is_heldout(p)]
    test = [p for c in CATEGORIES for p in enumerate_category(c) if is_heldout(p)]
    opt = torch.optim.AdamW(list(enc.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.01)
    for step in range(1, args.steps + 1):
        n_sign = int(args.batch * args.signs)
        prompts = rng.choices(train, k=args.batch - n_sign) + [sign_prompt(random_text(rng)) for _ in range(n_sign)]
        batch = encode_all(prompts, tok, enc)
        h, _, _ = enc(batch["ids"], batch["slots"])
        ls = losses(heads(h), batch)
        loss = sum(ls.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == 1:
            print(step, {k: round(v.item(), 4) for k, v in ls.items()}, flush=True)
    enc.eval()
    res = {"args": vars(args)}
    for name, pool in (("train", train), ("test", test)):
        b = encode_all(pool, tok, enc)
        res[name] = accuracy(enc, heads, b)
    # the held-out color_attr prompts alone: each holds one colour-shape pair no training prompt holds
    tb = encode_all([p for p in test if parse(p).category == "color_attr"], tok, enc)
    res["test_color_attr"] = accuracy(enc, heads, tb)
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in enc.state_dict().items()}, str(out / "encoder.safetensors"))
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
