"""The toy world's learned image-quality model (the analogue of DeQA).

A small CNN (about 70k parameters) regresses a quality score in [0, 1]:

- 1 for clean renders of random training prompts (compose and text);
- 1 - severity for a render seen through one degradation of random severity s
  in (0, 1] (``degrade``): gaussian blur (sigma 2 sqrt(s)), additive gaussian
  noise (std 0.35s), colour shift (a global offset of 0.45s, or a channel
  mix towards a permutation by 0.6s plus an offset of 0.15s), smear (motion blur of length 8s px at a
  random angle), blockiness (a 4x4 block average mixed in by s) and fading (towards
  grey by 0.7s); mixes of two degradations get (1 - s1)(1 - s2);
- 0 for junk (``junk``): a blank white (or flat-coloured) canvas, pure noise,
  random smooth colour blobs.

Every degradation is continuous in s and the targets are monotone in s, so the
score is a smooth reward. It is trained once, deterministically on the CPU
(``train_quality_model``; ``python -m flowopd.world.quality`` retrains and
rewrites the shipped weights ``weights/quality.safetensors``), and loaded once
by ``quality_model()``. ``quality_score(images)`` scores uint8 images
(B, 32, 32, 3); ``quality_score_tensor(x)`` is the differentiable version on
model-space tensors (B, 3, 32, 32) in [-1, 1].
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage
from torch import nn

from .prompts import sample_prompt
from .render import SIZE, as_uint8_images, render, to_model_space

WEIGHTS = "quality.safetensors"
DEGRADATIONS = ("blur", "noise", "color", "smear", "block", "fade")
JUNK = ("blank", "noise", "blobs")

# ----------------------------------------------------------------------------- data


def _f(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _motion_kernel(length: float, angle: float, size: int = 11) -> np.ndarray:
    k = np.zeros((size, size))
    c = (size - 1) / 2.0
    for t in np.linspace(-length / 2.0, length / 2.0, 64):
        x, y = c + t * math.cos(angle), c + t * math.sin(angle)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
                    k[y0 + dy, x0 + dx] += wy * wx
    return k / k.sum()


def degrade(img: np.ndarray, kind: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    """One degradation of a uint8 image (32, 32, 3) with severity in [0, 1]
    (0 leaves it unchanged); random parts (noise, direction) come from rng."""
    s = float(np.clip(severity, 0.0, 1.0))
    x = _f(img)
    if kind == "blur":
        sg = 2.0 * math.sqrt(s)  # sqrt: small severities already visible
        y = ndimage.gaussian_filter(x, (sg, sg, 0), mode="nearest") if sg > 0 else x
    elif kind == "noise":
        y = x + rng.normal(0.0, 0.35 * s, x.shape)
    elif kind == "color":
        # a global offset whose direction has both signs (so it shows on white
        # paper and on black ink alike), alone or after a channel mix
        u = rng.normal(size=3)
        if np.all(u > 0) or np.all(u < 0):
            u[rng.integers(3)] *= -1
        u /= np.linalg.norm(u)
        if rng.random() < 0.5:
            y = x + 0.45 * s * u
        else:
            perm = rng.permutation(3)
            while np.all(perm == np.arange(3)):
                perm = rng.permutation(3)
            m = (1 - 0.6 * s) * np.eye(3) + 0.6 * s * np.eye(3)[perm]
            y = x @ m.T + 0.15 * s * u
    elif kind == "smear":
        k = _motion_kernel(8.0 * s, rng.uniform(0, math.pi))
        y = np.stack([ndimage.convolve(x[..., c], k, mode="nearest") for c in range(3)], -1)
    elif kind == "block":
        b = x.reshape(SIZE // 4, 4, SIZE // 4, 4, 3).mean((1, 3))
        y = (1 - s) * x + s * np.repeat(np.repeat(b, 4, 0), 4, 1)
    elif kind == "fade":
        y = (1 - 0.7 * s) * x + 0.7 * s * 0.5
    else:
        raise ValueError(f"unknown degradation {kind!r}; use one of {DEGRADATIONS}")
    return _u8(y)


def junk(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A junk image (target quality 0): blank canvas, pure noise or colour blobs."""
    if kind == "blank":
        if rng.random() < 0.6:
            return np.full((SIZE, SIZE, 3), 255, np.uint8)
        return _u8(np.broadcast_to(rng.random(3), (SIZE, SIZE, 3)))
    if kind == "noise":
        if rng.random() < 0.5:
            return rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
        return _u8(rng.normal(rng.random(3), rng.uniform(0.1, 0.5), (SIZE, SIZE, 3)))
    if kind == "blobs":
        f = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE, 3)), (rng.uniform(2, 6),) * 2 + (0,), mode="wrap")
        f = (f - f.mean()) / (f.std() + 1e-8)
        return _u8(0.5 + rng.uniform(0.2, 0.5) * f)
    raise ValueError(f"unknown junk {kind!r}; use one of {JUNK}")


def clean_render(rng: random.Random) -> np.ndarray:
    """A render of a random training prompt (compose or text)."""
    task = "text" if rng.random() < 0.3 else "compose"
    return render(sample_prompt(rng, task, "train").spec, rng)


def make_quality_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n (uint8 image, target) pairs: 30% clean, 45% one degradation, 15% two, 10% junk
    (a degraded image that differs from its render by <= 2 levels is clean)."""
    prng = random.Random(seed)
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    ys = np.empty(n, np.float32)
    for i in range(n):
        u = rng.random()
        if u < 0.10:
            imgs[i], ys[i] = junk(JUNK[rng.integers(len(JUNK))], rng), 0.0
            continue
        img = clean_render(prng)
        if u < 0.40:
            imgs[i], ys[i] = img, 1.0
        elif u < 0.85:
            s = 1.0 - rng.random()  # (0, 1]
            imgs[i], ys[i] = degrade(img, DEGRADATIONS[rng.integers(len(DEGRADATIONS))], s, rng), 1.0 - s
        else:
            k1, k2 = rng.choice(len(DEGRADATIONS), 2, replace=False)
            s1, s2 = 1.0 - rng.random(2)
            out = degrade(degrade(img, DEGRADATIONS[k1], s1, rng), DEGRADATIONS[k2], s2, rng)
            imgs[i], ys[i] = out, (1.0 - s1) * (1.0 - s2)
        if np.abs(imgs[i].astype(np.int16) - img).max() <= 2:  # no visible change: still clean
            ys[i] = 1.0
    return imgs, ys


# ----------------------------------------------------------------------------- model


def conv_relu(layers: list[tuple[int, int, int]]) -> list[nn.Module]:
    """3x3 convolutions (in, out, stride), padding 1, each followed by a ReLU."""
    out: list[nn.Module] = []
    for cin, cout, stride in layers:
        out += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]
    return out


class QualityNet(nn.Module):
    """conv 16 -> 32/2 -> 32 -> 64/2 -> 64/2, mean+max pooling, linear -> logit."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*conv_relu([(3, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 2)]))
        self.head = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images (B, 3, 32, 32) in [-1, 1] -> logits (B,)."""
        h = self.body(x)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(name: str, model: nn.Module, data, loss_fn, seed: int, steps: int, batch: int, lr: float,
        log_every: int) -> nn.Module:
    """Train a world network deterministically on the CPU: Adam with a one-cycle schedule on random
    batches of data = (x, y) (model-space images, targets); loss_fn(model(x), y). -> the model (eval)."""
    t0 = time.time()
    x_all, y_all = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        loss = loss_fn(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"{name} step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    print(f"{name}: {time.time() - t0:.1f}s training, {n_params(model)} params", flush=True)
    return model.eval()


def train_quality_model(seed: int = 0, steps: int = 3500, n_data: int = 20000, batch: int = 128,
                        lr: float = 2e-3, log_every: int = 500) -> QualityNet:
    """Train the quality model deterministically on the CPU (fixed data, steps, seed)."""
    torch.manual_seed(seed)
    imgs, ys = make_quality_data(n_data, seed)
    data = (torch.from_numpy(to_model_space(imgs)), torch.from_numpy(ys))
    return fit("quality", QualityNet(), data, nn.BCEWithLogitsLoss(), seed, steps, batch, lr, log_every)


# ----------------------------------------------------------------------------- weights


def weights_path() -> Path:
    return Path(__file__).resolve().parent / "weights" / WEIGHTS


def save_model(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_frozen(cls, path: Path, module: str) -> nn.Module:
    """A shipped world network: cls() with the weights at path, frozen, eval mode, CPU. `module`
    retrains it when the file is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m {module}` to train it")
    with torch.random.fork_rng(devices=[]):  # loading it must not move the global RNG (resumed runs
        model = cls()                              # load it at another step than runs that never stopped)
    model.load_state_dict(load_file(str(path)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@lru_cache(maxsize=None)
def quality_model() -> QualityNet:
    """The shipped quality model (loaded once, eval mode, CPU, no gradients needed)."""
    return load_frozen(QualityNet, weights_path(), "flowopd.world.quality")


def quality_score_tensor(x: torch.Tensor) -> torch.Tensor:
    """Differentiable quality in (0, 1) of model-space images (B, 3, 32, 32) in [-1, 1]."""
    model = quality_model()
    if x.device != torch.device("cpu") or x.dtype != torch.float32:
        model = _model_on(x.device, x.dtype)
    return torch.sigmoid(model(x))


@lru_cache(maxsize=8)
def _model_on(device: torch.device, dtype: torch.dtype) -> QualityNet:
    return copy.deepcopy(quality_model()).to(device=device, dtype=dtype)


def quality_score(images, batch: int = 512) -> np.ndarray:
    """Quality in [0, 1] per image: uint8 (B, 32, 32, 3) (or model-space floats) -> (B,)."""
    imgs = as_uint8_images(images)
    model = quality_model()
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs), batch):
            x = torch.from_numpy(to_model_space(imgs[i : i + batch]))
            out.append(torch.sigmoid(model(x)).numpy())
    if not out:
        return np.zeros(0, np.float32)
    return np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)


def retrain_main(what: str, train, default_steps: int, default_out: Path, argv=None) -> None:
    """The command line of a world network's retraining: --seed, --steps, --out (default: the
    package's weights file); train(seed=, steps=) -> the model, written with save_model."""
    ap = argparse.ArgumentParser(description=f"Retrain the toy world's {what} and rewrite its weights.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=default_steps)
    ap.add_argument("--out", type=Path, default=None, help="default: the package's weights file")
    args = ap.parse_args(argv)
    model = train(seed=args.seed, steps=args.steps)
    out = args.out or default_out
    save_model(model, out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main(argv=None) -> None:
    retrain_main("quality model", train_quality_model, 3500, weights_path(), argv)


if __name__ == "__main__":
    main()
