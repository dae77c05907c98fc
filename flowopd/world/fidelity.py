"""Fidelity of the toy world: a fixed feature network and the Frechet distance.

The analogue of FID's Inception features: a small CNN trained once on the
world to predict attributes of images (how many squares / circles /
triangles, how many objects of each colour, where the objects are on
average, whether the image is text, its length and which glyphs it holds,
whether it is junk and how degraded it is). Its 48-d penultimate layer
(before the non-linearity) is the feature vector. Training data: 60% clean
renders of training prompts, 30% renders through one degradation of
``flowopd.world.quality.degrade`` (attributes of the render, plus severity),
10% junk. Trained deterministically on the CPU by ``train_feature_model``;
``python -m flowopd.world.fidelity`` retrains and rewrites the shipped weights
``weights/features.safetensors``.

``fidelity(images, prompts, seed=0)`` is the Frechet distance between the
features of the images and those of renders of the same prompts
(``reference_images``: one ``random.Random(seed)`` drives the layouts of all
prompts in order). It is ~0 for renders of the same prompts and large for
blank or noise images.
"""
from __future__ import annotations

import random
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .prompts import COLORS, SHAPES, Prompt, Spec, parse, sample_prompt
from .quality import DEGRADATIONS, JUNK, conv_relu, degrade, fit, junk, load_frozen, retrain_main
from .render import SIZE, as_uint8_images, draw_objects, draw_text, layout, render, centre, to_model_space, font

WEIGHTS = "features.safetensors"
FEATURE_DIM = 48
_CHARS = tuple(sorted(font()))
# attribute vector: shape counts (3), colour counts (5), mean centre (2), is_text,
# text length, glyph presence (33), junk, severity
N_ATTR = 3 + 5 + 2 + 1 + 1 + len(_CHARS) + 1 + 1
_BCE_IDX = [10] + list(range(12, 12 + len(_CHARS))) + [12 + len(_CHARS)]  # binary attributes


def render_with_attributes(spec: Spec, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """render(spec, rng) (same pixels, same rng use) and its attribute vector."""
    a = np.zeros(N_ATTR, np.float32)
    if spec.category == "ocr":
        img = draw_text(spec.text)
        a[8:10] = 0.5
        a[10] = 1.0
        a[11] = len(spec.text) / 4.0
        for ch in spec.text:
            a[12 + _CHARS.index(ch)] = 1.0
        return img, a
    placed = layout(spec, rng)
    img = draw_objects(placed)
    cs = []
    for shape, col, x0, y0 in placed:
        a[SHAPES.index(shape)] += 0.25
        a[3 + COLORS.index(col)] += 0.25
        cs.append(centre(shape, x0, y0))
    a[8:10] = np.mean(cs, 0) / SIZE
    return img, a


def make_feature_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    prng = random.Random(seed + 1)
    rng = np.random.default_rng(seed + 1)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    attrs = np.zeros((n, N_ATTR), np.float32)
    for i in range(n):
        u = rng.random()
        if u < 0.10:
            imgs[i] = junk(JUNK[rng.integers(len(JUNK))], rng)
            attrs[i, 8:10] = 0.5
            attrs[i, -2] = 1.0
            attrs[i, -1] = 1.0
            continue
        task = "text" if prng.random() < 0.3 else "compose"
        img, a = render_with_attributes(sample_prompt(prng, task, "train").spec, prng)
        if u < 0.40:
            s = 1.0 - rng.random()
            img = degrade(img, DEGRADATIONS[rng.integers(len(DEGRADATIONS))], s, rng)
            a[-1] = s
        imgs[i], attrs[i] = img, a
    return imgs, attrs


class FeatureNet(nn.Module):
    """conv 16 -> 32/2 -> 64/2 -> 32/2 (4x4), flatten, linear -> 48 features; heads on top."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*conv_relu([(3, 16, 1), (16, 32, 2), (32, 64, 2), (64, 32, 2)]),
                                  nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURE_DIM))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, N_ATTR))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.head(f)


def _loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = torch.zeros(N_ATTR, dtype=torch.bool)
    bce[_BCE_IDX] = True
    l_bce = nn.functional.binary_cross_entropy_with_logits(pred[:, bce], target[:, bce])
    l_mse = nn.functional.mse_loss(pred[:, ~bce], target[:, ~bce])
    return l_bce + 10.0 * l_mse


def train_feature_model(seed: int = 0, steps: int = 2000, n_data: int = 16000, batch: int = 128,
                        lr: float = 2e-3, log_every: int = 500) -> FeatureNet:
    """Train the feature network deterministically on the CPU."""
    torch.manual_seed(seed)
    imgs, attrs = make_feature_data(n_data, seed)
    data = (torch.from_numpy(to_model_space(imgs)), torch.from_numpy(attrs))
    return fit("features", FeatureNet(), data, lambda out, y: _loss(out[1], y), seed, steps, batch, lr, log_every)


def weights_path() -> Path:
    return Path(__file__).resolve().parent / "weights" / WEIGHTS


@lru_cache(maxsize=None)
def feature_model() -> FeatureNet:
    """The shipped feature network (loaded once, eval mode, CPU)."""
    return load_frozen(FeatureNet, weights_path(), "flowopd.world.fidelity")


def features(images, batch: int = 512) -> np.ndarray:
    """Feature vectors (B, 48) float64 of uint8 images (B, 32, 32, 3) (or model-space floats)."""
    imgs = as_uint8_images(images)
    model = feature_model()
    out = [np.zeros((0, FEATURE_DIM))]
    with torch.no_grad():
        for i in range(0, len(imgs), batch):
            out.append(model(torch.from_numpy(to_model_space(imgs[i : i + batch])))[0].double().numpy())
    return np.concatenate(out)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), (M, D)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular covariances (e.g. blank images) are expected
        covmean = scipy.linalg.sqrtm(s_a @ s_b)
        if not np.all(np.isfinite(covmean)):
            off = eps * np.eye(len(s_a))
            covmean = scipy.linalg.sqrtm((s_a + off) @ (s_b + off))
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # tiny imaginary parts from numerical error
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def _spec(p) -> Spec:
    if isinstance(p, Prompt):
        return p.spec
    if isinstance(p, Spec):
        return p
    return parse(p)


def reference_images(prompts, seed: int = 0) -> np.ndarray:
    """Renders of the prompts, layouts drawn in order from one random.Random(seed)."""
    rng = random.Random(seed)
    return np.stack([render(_spec(p), rng) for p in prompts]) if len(prompts) else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def fidelity(images, prompts, seed: int = 0) -> float:
    """Frechet distance between features of the images and of renders of the same prompts."""
    prompts = list(prompts)
    return frechet_distance(features(images), features(reference_images(prompts, seed)))


def main(argv=None) -> None:
    retrain_main("feature network", train_feature_model, 2000, weights_path(), argv)


if __name__ == "__main__":
    main()
