"""Pretrain the tiny base model on the toy world with the flow-matching loss.

The loop, top to bottom:
  0. build a cache of renders of training prompts (the world's "web data")
  1. draw a batch, drop prompts with probability p_uncond (for CFG)
  2. draw sigma from a logit-normal, interpolate x = (1-sigma) x0 + sigma noise
  3. regress the velocity noise - x0 (MSE), AdamW step, EMA update
  4. log; save the EMA weights at the requested steps and at the end (debiased:
     the EMA starts at the random initial weights, whose share decay**n after n
     updates is removed, as Adam debiases its moments; without it a checkpoint
     of the first few thousand steps draws visible noise); every
     `state_every` steps save the whole run state (flowopd.state), from which a
     rerun of the same command on the same --out resumes bit for bit (CPU);
     with `damp` < 1 the saved weights are damped toward random initial ones

The shipped base (flowopd/checkpoints/base) was made by this loop with the curriculum of
configs/toy_pretrain.yaml (`stages`, then `sign_blur`); its config.json records the recipe and the cost.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..backends.tiny import TinyBackend, autocast, load_checkpoint, read_weights, save_checkpoint
from ..backends.tiny_model import ATTRIBUTE_WORDS, CHARS, UNK, TinyConfig, TinyUNet, Tokenizer
from ..config import ConfigError, build, require, to_dict
from ..errors import UserError
from .checkpointing import RunState
from .common import EMA, optimizer_step
from .runlog import RunLogger
from ..state import check_out_dir
from ..flow import interpolate
from ..losses import flow_matching_loss, logit_normal_sigmas
from ..world.prompts import (CATEGORIES, COLORS, COUNT_WORDS, MAX_TEXT_LEN, SHAPES, make_prompt, random_text,
                             sample_prompt, sign_prompt, test_captions)
from ..world.render import render, to_model_space


CAPTION_NOISE_KEYS = ("relation_noise", "binding_noise", "glyph_noise", "attribute_noise")


@dataclass
class PretrainConfig:
    steps: int = 20000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    text_fraction: float = 0.4  # share of sign prompts; the rest are compose-style
    # weights of sign lengths 1..4 (default []: uniform, as the grammar draws them); few one-character signs
    # in pretraining leave that skill weak on every character, for the text teacher to teach
    text_length_weights: list[float] = field(default_factory=list)
    category_weights: dict = field(default_factory=dict)  # compose category -> weight of its prompts (default: equal)
    # "": random weights; else a checkpoint to continue from ("base", a directory), with its own model keys
    init: str = ""
    dataset_size: int = 200000
    render_workers: int = 1
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    # the noise levels of sign prompts (logit-normal mean; None: sigma_mean): layouts form at high noise
    # and glyph strokes at low noise, so one recipe may train each task where its own decisions are made
    text_sigma_mean: float | None = None
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    channels: list[int] = field(default_factory=lambda: [32, 64, 96])
    roles: bool = False  # the model's role embedding on prompt tokens (TinyConfig.roles)
    text_layers: int = 2  # transformer layers over the prompt tokens (0: each token's own embedding)
    pooled_text: bool = True  # FiLM on the pooled prompt (TinyConfig.pooled_text)
    xattn_full: bool = False  # cross-attention to the prompt at 32x32 too (TinyConfig.xattn_full)
    patch: int = 1  # 2: the U-Net over 2x2 patches, two levels, `channels` two widths (TinyConfig.patch)
    # a prompt encoder pretrained on the grammar's language (experiments/parse_encoder.py): its weights
    # (a .safetensors of TextEncoder) replace the random ones when training starts from scratch
    text_init: str = ""
    freeze_text: bool = False  # keep the prompt encoder's weights fixed, as SD3 keeps T5 and CLIP fixed
    # each attribute word (shape, colour, count) of a drawn prompt becomes the unknown word with this
    # probability (the render still fits the vaguer prompt): each word must be learned on its own
    word_dropout: float = 0.0
    # caption noise (the render still shows the true prompt): a position prompt's relation word becomes
    # its opposite (left/right, above/below) with probability relation_noise, and the two colour words
    # of a two-object prompt trade places with probability binding_noise, and each character of a sign
    # becomes another one with probability glyph_noise, and each count, shape or colour word becomes
    # another word of its kind with probability attribute_noise, as in loosely captioned images: a model fit to
    # such data follows those words only as often as its captions do (what it gave: docs/experiments.md)
    relation_noise: float = 0.0
    binding_noise: float = 0.0
    glyph_noise: float = 0.0
    attribute_noise: float = 0.0
    save_at: list[int] = field(default_factory=list)
    max_minutes: float = 0.0  # 0: no limit; else stop (and save) after this long
    log_every: int = 100
    state_every: int = 500  # full resumable state every N steps (0: never)
    max_bad_steps: int = 5  # consecutive non-finite losses/gradients before stopping
    eval_steps: int = 40  # sampling defaults written into the checkpoint
    eval_cfg: float = 3.0
    shift: float = 1.0
    # the weights this run saves keep this share of their change from the random weights that this model
    # and seed start from: r + damp * (w - r) (1: as trained). r is a run from scratch's initial weights;
    # a run from `init` rebuilds them from the init's model and this seed (the same as the curriculum's
    # stage 0 when the seed is). A damped model follows every prompt word more weakly, the change it
    # learned still there, scaled (docs/experiments.md, twenty-second and twenty-third sessions). Like
    # every key, one set at the top of a curriculum holds in each stage: set it in the stage to damp
    damp: float = 1.0
    # the final weights' sign-character token embeddings moved this share of the way to seeded random
    # vectors, row <- (1 - sign_blur) row + sign_blur r (0: none). Only sign prompts hold character
    # tokens, so every other prompt is computed exactly as before: it leaves signs mediocre and
    # teachable without touching layouts (docs/experiments.md, twenty-fifth session). With a
    # curriculum it is applied once, to out/final
    sign_blur: float = 0.0
    sign_blur_seed: int = 1234
    # a curriculum: run i trains with these keys over the ones above and continues from run i-1's final
    # weights (out/stage_i); [] is one run
    stages: list[dict] = field(default_factory=list)

    def validate(self):
        require(self.steps >= 1, "steps must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.lr > 0, "lr must be > 0")
        require(0 <= self.p_uncond < 1, "p_uncond must be in [0, 1)")
        require(0 <= self.text_fraction <= 1, "text_fraction must be in [0, 1]")
        require(not self.text_length_weights or (len(self.text_length_weights) == MAX_TEXT_LEN and
                                                 all(w >= 0 for w in self.text_length_weights) and
                                                 sum(self.text_length_weights) > 0),
                f"text_length_weights: {MAX_TEXT_LEN} weights >= 0 (lengths 1..{MAX_TEXT_LEN}), not all 0; [] for uniform")
        require(0 < self.ema_decay < 1, "ema_decay must be in (0, 1)")
        require(self.dataset_size >= self.batch_size, "dataset_size must be >= batch_size")
        require(self.state_every >= 0, "state_every must be >= 0")
        require(self.text_layers >= 0, "text_layers must be >= 0")
        require(not (self.init and self.text_init),
                "text_init replaces the prompt encoder of a model trained from scratch; a run from init keeps the "
                "checkpoint's own encoder: give one of the two")
        require(0 <= self.word_dropout < 1, "word_dropout must be in [0, 1)")
        for key in CAPTION_NOISE_KEYS:
            require(0 <= getattr(self, key) <= 0.5, f"{key} must be in [0, 0.5]")
        require(self.max_bad_steps >= 1, "max_bad_steps must be >= 1")
        require(0 < self.damp <= 1, "damp must be in (0, 1] (the share of the learned change to keep)")
        require(0 <= self.sign_blur <= 1, "sign_blur must be in [0, 1] (the share of each sign token's row replaced)")
        require(self.damp == 1 or not self.text_init,
                "damp scales the change from random initial weights: not for a prompt encoder from text_init")
        unknown = set(self.category_weights) - set(CATEGORIES)
        require(not unknown, f"category_weights: unknown categories {sorted(unknown)}; categories are {', '.join(CATEGORIES)}")
        require(all(w >= 0 for w in self.category_weights.values()) and
                (not self.category_weights or sum(self.category_weights.get(c, 1.0) for c in CATEGORIES) > 0),
                "category_weights must be >= 0 and not all 0")
        for i, st in enumerate(self.stages):
            require(isinstance(st, dict), f"stages[{i}] must be a mapping of config keys")
            bad = set(st) & ({"stages", "init"} if i else {"stages"})
            require(not bad, f"stages[{i}] may not set {sorted(bad)} (a stage continues from the one before)")
            bad = set(st) & {"sign_blur", "sign_blur_seed"}
            require(not bad, f"stages[{i}] may not set {sorted(bad)} (set at the top: applied once, to the final weights)")
        self.stage_configs()  # builds, and so validates, each stage

    def stage_configs(self) -> list["PretrainConfig"]:
        """Each stage as a whole config (its keys over the top-level ones); [] without stages."""
        top = {k: v for k, v in to_dict(self).items() if k not in ("stages", "sign_blur", "sign_blur_seed")}
        return [build(PretrainConfig, {**top, **st}) for st in self.stages]


def _render_chunk(args):
    seed, n, text_fraction, weights, lengths = args
    rng = random.Random(seed)
    prompts, images = [], []
    for _ in range(n):
        if rng.random() < text_fraction:
            k = rng.choices(range(1, MAX_TEXT_LEN + 1), lengths)[0] if lengths else None  # None: uniform
            p = make_prompt(sign_prompt(random_text(rng, "train", length=k)), "text")
        else:
            cat = rng.choices(CATEGORIES, [weights.get(c, 1.0) for c in CATEGORIES])[0] if weights else rng.choice(CATEGORIES)
            p = sample_prompt(rng, "compose", "train", cat)
        prompts.append(p.text)
        images.append(render(p.spec, rng))
    return prompts, np.stack(images)


def build_dataset(n: int, seed: int, text_fraction: float, workers: int = 1, weights: dict | None = None,
                  text_lengths: list | None = None):
    """n (prompt, render) pairs of training prompts -> (prompts, uint8 (n,32,32,3)); compose categories
    drawn by `weights` (category -> weight, missing ones 1; None or {}: uniform), sign lengths 1..4 by
    `text_lengths` (None or []: uniform)."""
    chunk = 5000
    jobs = [(seed * 100003 + i, min(chunk, n - i * chunk), text_fraction, weights or {}, list(text_lengths or []))
            for i in range(math.ceil(n / chunk))]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in tqdm(jobs, desc="rendering", leave=False)]
    prompts = [p for ps, _ in parts for p in ps]
    return prompts, np.concatenate([im for _, im in parts])


def debiased_ema(ema: dict, init: dict, decay: float, updates: int) -> dict:
    """(ema - decay**n * init) / (1 - decay**n): the average of the trained weights alone, for an EMA
    that started at `init` and took n = `updates` steps of ema <- decay * ema + (1 - decay) * w."""
    c = decay ** updates
    if updates < 1:
        return dict(ema)
    return {k: ((v.double() - c * init[k].double()) / (1 - c)).to(v.dtype) for k, v in ema.items()}


def damped(weights: dict, init: dict, keep: float) -> dict:
    """init + keep * (weights - init), tensor by tensor (keep 1: the weights themselves; integer tensors kept)."""
    if keep == 1:
        return dict(weights)
    return {k: (init[k].double() + keep * (v.double() - init[k].double())).to(v.dtype) if v.is_floating_point() else v
            for k, v in weights.items()}


def blur_sign_tokens(weights: dict, mix: float, seed: int) -> dict:
    """weights with the sign characters' token-embedding rows mixed with seeded N(0, 1) vectors:
    row <- (1 - mix) row + mix r. Every other row (and tensor) is returned as it is."""
    key = "text.tok.weight"
    if key not in weights or weights[key].shape[0] != Tokenizer.size:
        raise UserError(f"no token embedding of {Tokenizer.size} rows ({key}): not a tiny-model checkpoint")
    tok = weights[key].clone()
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(tok[Tokenizer.char_base:].shape, generator=g).to(tok.dtype)
    tok[Tokenizer.char_base:] = (1 - mix) * tok[Tokenizer.char_base:] + mix * r.to(tok.device)
    return {**weights, key: tok}


def initial_weights(model_cfg: TinyConfig, seed: int) -> dict:
    """The random weights a run from scratch with this model and seed starts from (seeded as pretrain
    seeds them), drawn without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyUNet(model_cfg).state_dict()


def _identity(cfg: PretrainConfig) -> dict:
    """The parts of the config that define the run (resuming needs them unchanged)."""
    d = to_dict(cfg)
    for k in ("steps", "max_minutes", "log_every", "save_at", "render_workers", "device", "state_every"):
        d.pop(k, None)
        for st in d["stages"]:  # a stage's length may change too (each stage checks its own run)
            st.pop(k, None)
    if not d["stages"]:
        del d["stages"]  # one run: the identity runs written before stages existed
    for st in (d, *d.get("stages", [])):
        if not st.get("text_length_weights", True):
            del st["text_length_weights"]  # uniform: the identity of runs written before the key existed
        if st.get("text_sigma_mean", 0) is None:
            del st["text_sigma_mean"]  # (likewise)
    if d.get("damp") == 1:
        del d["damp"]  # (likewise)
    if d.get("patch") == 1:
        del d["patch"]  # (likewise: the pixel U-Net)
    if not d.get("sign_blur"):
        d.pop("sign_blur", None), d.pop("sign_blur_seed", None)  # (likewise)
    return d


def _prepare_out(cfg: PretrainConfig, out: Path, overwrite: bool) -> None:
    """Refuse another run's --out (unless overwrite, which also drops that run's state); record ours."""
    check_out_dir(out, _identity(cfg), overwrite, "run.json")
    if overwrite and (out / "run.json").is_file() and json.loads((out / "run.json").read_text()) != _identity(cfg):
        shutil.rmtree(out / "state", ignore_errors=True)  # another run's state must not be resumed
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(_identity(cfg)))


class Batches:
    """The rendered training set on the device, and the batches drawn from it (prompt dropout for CFG)."""

    def __init__(self, cfg: PretrainConfig, device):
        prompts, images = build_dataset(cfg.dataset_size, cfg.seed, cfg.text_fraction, cfg.render_workers,
                                        cfg.category_weights, cfg.text_length_weights)
        tok = Tokenizer()
        self.ids, self.slots = (t.to(device) for t in tok.batch(prompts))
        self.null_ids, self.null_slots = (t.to(device) for t in tok.batch([None]))
        self.x = torch.from_numpy(to_model_space(images)).to(device)
        self.is_text = (self.ids >= Tokenizer.char_base).any(1)  # sign prompts (their characters' tokens)
        self.batch_size, self.p_uncond, self.device = cfg.batch_size, cfg.p_uncond, device
        self.word_dropout = cfg.word_dropout
        self.attribute_ids = torch.tensor([tok.vocab[w] for w in ATTRIBUTE_WORDS], device=device)
        self.relation_noise, self.binding_noise, self.glyph_noise = cfg.relation_noise, cfg.binding_noise, cfg.glyph_noise
        self.attribute_noise = cfg.attribute_noise
        # attribute_noise: token id -> its kind (-1: none; counts, shapes, plural shapes, colours), its
        # index in the kind, and the kinds' members (padded with PAD) and sizes
        kinds = [tuple(COUNT_WORDS), SHAPES, tuple(s + "s" for s in SHAPES), COLORS]
        self.kind_of = torch.full((tok.size,), -1, dtype=torch.long, device=device)
        self.index_in_kind = torch.zeros(tok.size, dtype=torch.long, device=device)
        self.kind_members = torch.zeros(len(kinds), max(map(len, kinds)), dtype=torch.long, device=device)
        for k, words in enumerate(kinds):
            for j, w in enumerate(words):
                self.kind_of[tok.vocab[w]], self.index_in_kind[tok.vocab[w]] = k, j
                self.kind_members[k, j] = tok.vocab[w]
        self.kind_sizes = torch.tensor([len(w) for w in kinds], device=device)
        self.opposite = torch.arange(tok.size, device=device)  # token id -> the id of its opposite relation
        for a, b in (("left", "right"), ("above", "below")):
            self.opposite[tok.vocab[a]], self.opposite[tok.vocab[b]] = tok.vocab[b], tok.vocab[a]
        self.color_ids = torch.tensor([tok.vocab[c] for c in COLORS], device=device)
        # the token rows of every test-split caption: caption noise must not write one (a flipped
        # "a square right of a triangle" is the held-out "a square left of a triangle"), or the
        # test split's combinations would be seen in training, and only beside the wrong image
        self.heldout_rows: set[tuple[int, ...]] = set()
        if any(getattr(cfg, key) for key in CAPTION_NOISE_KEYS):
            self.heldout_rows = {tuple(r) for r in tok.batch(test_captions())[0].tolist()}

    def draw(self, gen):
        """-> (x0, ids, slots) of batch_size random renders, a p_uncond share of prompts replaced by NULL,
        with word_dropout attribute words replaced by UNK, and with relation_noise / binding_noise /
        glyph_noise / attribute_noise relation words flipped / two colour words swapped / sign characters
        changed / count, shape and colour words changed to another of their kind, except
        where the noisy caption would be a test-split one."""
        n, dev = self.batch_size, self.device
        idx = torch.randint(0, self.x.shape[0], (n,), device=dev, generator=gen)
        ids, slots = self.ids[idx], self.slots[idx]
        drop = torch.rand(n, device=dev, generator=gen) < self.p_uncond
        ids = torch.where(drop[:, None], self.null_ids.expand_as(ids), ids)
        if self.word_dropout:  # (no draw without it: the data stream of older runs stays the same)
            hit = torch.rand(ids.shape, device=dev, generator=gen) < self.word_dropout
            ids = torch.where(hit & torch.isin(ids, self.attribute_ids), UNK, ids)
        clean = ids
        if self.relation_noise:  # (each key draws only when it is on, for the same reason)
            flip = torch.rand(n, device=dev, generator=gen) < self.relation_noise
            ids = torch.where(flip[:, None], self.opposite[ids], ids)
        if self.binding_noise:
            is_color = torch.isin(ids, self.color_ids)
            swap = (torch.rand(n, device=dev, generator=gen) < self.binding_noise) & (is_color.sum(1) == 2)
            where = torch.sort(is_color.int(), dim=1, descending=True, stable=True).indices[:, :2]  # the two colours
            swapped = ids.scatter(1, where, ids.gather(1, where).flip(1))
            ids = torch.where(swap[:, None], swapped, ids)
        if self.glyph_noise:
            n_chars, first = len(CHARS), Tokenizer.char_base
            hit = (ids >= first) & (torch.rand(ids.shape, device=dev, generator=gen) < self.glyph_noise)
            other = first + (ids - first + torch.randint(1, n_chars, ids.shape, device=dev, generator=gen)) % n_chars
            ids = torch.where(hit, other, ids)
        if self.attribute_noise:
            kind = self.kind_of[ids]
            hit = (kind >= 0) & (torch.rand(ids.shape, device=dev, generator=gen) < self.attribute_noise)
            k = kind.clamp(min=0)
            size = self.kind_sizes[k]
            step = 1 + torch.randint(0, 1 << 30, ids.shape, device=dev, generator=gen) % (size - 1)  # never itself
            other = self.kind_members[k, (self.index_in_kind[ids] + step) % size]
            ids = torch.where(hit, other, ids)
        if self.heldout_rows:  # a noisy caption that names a test combination keeps its true words
            for i in (ids != clean).any(1).nonzero().flatten().tolist():
                if tuple(ids[i].tolist()) in self.heldout_rows:
                    ids[i] = clean[i]
        slots = torch.where(drop[:, None], self.null_slots.expand_as(slots), slots)
        self.last_is_text = self.is_text[idx]  # which rows are renders of signs (dropped prompts included)
        return self.x[idx], ids, slots


def noise_levels(cfg: PretrainConfig, is_text, gen, device):
    """Training noise levels of a batch: logit-normal around sigma_mean, and around text_sigma_mean for
    the rows that are signs when that is set (with it unset nothing more is drawn from gen, so older
    runs' data stream stays the same)."""
    sigma = logit_normal_sigmas(cfg.batch_size, cfg.sigma_mean, cfg.sigma_std, generator=gen, device=device)
    if cfg.text_sigma_mean is not None:
        sigma_t = logit_normal_sigmas(cfg.batch_size, cfg.text_sigma_mean, cfg.sigma_std, generator=gen, device=device)
        sigma = torch.where(is_text, sigma_t, sigma)
    return sigma


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":  # fast kernels: cudnn autotuning, TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def _model_config(cfg: PretrainConfig) -> TinyConfig:
    """The model the config's keys describe (what a run from random weights builds)."""
    try:
        return TinyConfig(channels=tuple(cfg.channels), roles=cfg.roles, text_layers=cfg.text_layers,
                          pooled_text=cfg.pooled_text, xattn_full=cfg.xattn_full, patch=cfg.patch)
    except ValueError as e:  # channels, patch and xattn_full that do not fit together
        raise ConfigError(str(e)) from None


def _model(cfg: PretrainConfig, device) -> TinyUNet:
    """Random weights (seeded by the caller; the prompt encoder's from `text_init` if given), or the
    `init` checkpoint's to continue from; the prompt encoder trains unless `freeze_text`."""
    if cfg.init:
        model = load_checkpoint(cfg.init).model.train().requires_grad_(True).to(device)
        # the model's shape comes from the checkpoint; say so where the config describes another
        theirs, mine = model.cfg.to_dict(), _model_config(cfg).to_dict()
        differ = [f"{k}={v}" for k, v in theirs.items() if mine.get(k) != v]
        if differ:
            tqdm.write(f"note: {cfg.init} has {', '.join(differ)}; continuing from it keeps its model, "
                       "so these config keys do not apply")
    else:
        model = TinyUNet(_model_config(cfg)).to(device)
        if cfg.text_init:
            path = Path(cfg.text_init)
            if not path.is_file():
                raise UserError(f"text_init: no such file {path}")
            try:
                model.text.load_state_dict(read_weights(path))
            except RuntimeError as e:  # another encoder shape (roles, text_layers) than this model's
                raise UserError(f"text_init {path} does not fit this model's prompt encoder: {e}") from None
    model.text.requires_grad_(not cfg.freeze_text)
    return model


def pretrain(cfg: PretrainConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Pretrain (or continue, `init`) the tiny model; write out/run.json, out/train_log.jsonl,
    out/state, out/final (and out/step_* at save_at). A rerun on the same --out resumes. -> out/final.
    With `stages`, each stage is such a run in out/stage_i, and out/final is the last one's weights."""
    if cfg.stages:
        return pretrain_stages(cfg, Path(out), overwrite)
    out = Path(out)
    _prepare_out(cfg, out, overwrite)
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    t0 = time.time()

    # 0. data: renders of training prompts, made once
    data = Batches(cfg, device)
    render_s = time.time() - t0
    model = _model(cfg, device)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the same on a resumed run (seeded)
    origin = None  # what `damp` damps toward: the random weights of this model and seed
    if cfg.damp != 1:
        origin = init if not cfg.init else {k: v.to(device) for k, v in initial_weights(model.cfg, cfg.seed).items()}
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}  # (not a frozen prompt encoder)
    ema = EMA(params.values(), cfg.ema_decay)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    # the scheduler counts the updates taken (skipped ones excluded): the EMA's update count
    counts = {"loss_avg": None}  # kept in the run state with the scheduler's
    run = RunState(out, params, opt, every=cfg.state_every, max_bad=cfg.max_bad_steps, ema=ema.shadow,
                   generators={"data": gen}, info=lambda: {"sched": sched.state_dict(), **counts})
    start = run.resume()
    if start:
        sched.load_state_dict(run.info["sched"])
        counts.update({k: run.info[k] for k in counts})
    run.logger = logger = RunLogger(out, tensorboard=False)

    def save(step: int, name: str):
        """The EMA weights, debiased (its share of the random initial weights removed), then damped."""
        meta = {"step": step, "seed": cfg.seed, "recipe": to_dict(cfg),
                "minutes": round((time.time() - t0) / 60, 2), "device": str(device),
                "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
        shadow = dict(zip(params, ema.shadow))
        sampling = {"steps": cfg.eval_steps, "cfg": cfg.eval_cfg, "shift": cfg.shift}
        backend = TinyBackend(copy.deepcopy(model), device, sampling)  # (a copy: the back end re-lays the model out)
        weights = {**model.state_dict(), **debiased_ema(shadow, init, cfg.ema_decay, sched.last_epoch)}
        weights = damped(weights, origin, cfg.damp)  # (damp 1: the weights as they are; origin None)
        if name == "final" and cfg.sign_blur:
            weights = blur_sign_tokens(weights, cfg.sign_blur, cfg.sign_blur_seed)
        save_checkpoint(backend, out / name, meta, weights)

    save_at = set(cfg.save_at)
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="pretrain", mininterval=2, initial=start, total=cfg.steps)
    step = start
    for step in bar:
        # 1. batch, prompt dropout
        x0, ids, slots = data.draw(gen)
        # 2. noise level and interpolation
        sigma = noise_levels(cfg, data.last_is_text, gen, device)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        x = interpolate(x0, noise, sigma)
        # 3. velocity regression; the shared optimizer step (clip, skip non-finite, EMA)
        with autocast(device):
            v = model(x, sigma, model.encode(ids, slots))
        loss = flow_matching_loss(v.float(), x0, noise)
        loss.backward()
        _, stepped = optimizer_step(opt, list(params.values()), run, step, bool(torch.isfinite(loss)), cfg.grad_clip,
                                    ema=ema)
        if stepped:
            sched.step()
        # 4. log, save
        if step % 10 == 0 or step == 1:
            lv = loss.item()
            counts["loss_avg"] = lv if counts["loss_avg"] is None else 0.9 * counts["loss_avg"] + 0.1 * lv
            bar.set_postfix(loss=f"{counts['loss_avg']:.4f}")
        if step % cfg.log_every == 0:
            logger.log(step, {"loss": counts["loss_avg"], "min": round((time.time() - t0) / 60, 2)})
        if step in save_at:
            save(step, f"step_{step:06d}")
        run.step_done(step)
        if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
            bar.write(f"time limit reached at step {step}")
            break
    run.finish(step)
    save(step, "final")
    logger.close()
    (out / "summary.json").write_text(json.dumps({"steps": step, "minutes": round((time.time() - t0) / 60, 2),
                                                   "render_seconds": round(render_s, 1), "loss": counts["loss_avg"]}))
    return out / "final"


def pretrain_stages(cfg: PretrainConfig, out: Path, overwrite: bool = False) -> Path:
    """Run the curriculum's stages in turn (finished ones are skipped, so a rerun resumes where it
    stopped); out/final is the last stage's final weights, its config.json recording the whole recipe."""
    _prepare_out(cfg, out, overwrite)
    t0, minutes, steps = time.time(), 0.0, 0
    for i, st in enumerate(cfg.stage_configs()):
        sub = out / f"stage_{i}"
        if i:
            st.init = str(out / f"stage_{i - 1}" / "final")
        done = json.loads((sub / "summary.json").read_text()) if (sub / "summary.json").is_file() else {}
        if done.get("steps") != st.steps:
            if cfg.max_minutes:
                st.max_minutes = max(cfg.max_minutes - (time.time() - t0) / 60, 1e-3)
            print(f"pretrain stage {i + 1}/{len(cfg.stages)}: {sub}", flush=True)
            pretrain(st, sub, overwrite)
            done = json.loads((sub / "summary.json").read_text())
            if done["steps"] != st.steps:
                print(f"time limit reached in stage {i + 1}; rerun the same command to resume", flush=True)
                return sub / "final"
        minutes += done["minutes"]
        steps += done["steps"]
    last = out / f"stage_{len(cfg.stages) - 1}" / "final"
    shutil.rmtree(out / "final", ignore_errors=True)
    shutil.copytree(last, out / "final")
    ckpt = json.loads((last / "config.json").read_text())
    ckpt["meta"].update(step=steps, minutes=round(minutes, 2), recipe=to_dict(cfg))
    if cfg.sign_blur:
        weights = blur_sign_tokens(read_weights(last / "model.safetensors"), cfg.sign_blur, cfg.sign_blur_seed)
        save_file(weights, str(out / "final" / "model.safetensors"))
    (out / "final" / "config.json").write_text(json.dumps(ckpt, indent=2))
    (out / "summary.json").write_text(json.dumps({"steps": steps, "minutes": round(minutes, 2),
                                                   "stages": len(cfg.stages)}))
    return out / "final"
