"""The toy world's renderer: the exact pixels of TOYWORLD.md.

``render(spec, rng)`` draws a prompt's meaning on a 32x32 white canvas: flat
shapes of the palette (8x8 square, diameter-9 disc, 9-row upward triangle),
never touching (>= 2 px of background between bounding boxes), >= 1 px from
the border; or black 5x7 glyphs, 1 px apart, the string centred (ties towards
the top left). Unnamed colours are drawn uniformly; counted copies share one.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from importlib import resources

import numpy as np

from .prompts import COLORS, Spec, parse

SIZE = 32
WHITE = (255, 255, 255)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
INK = (0, 0, 0)
GLYPH_W, GLYPH_H = 5, 7
MARGIN = 1  # px between an object and the border
GAP = 2  # px of background between two objects
REL_MIN = 3  # px a relation needs along its axis
REL_OTHER_MAX = 8  # px the other axis may differ by


@lru_cache(maxsize=None)
def font() -> dict[str, np.ndarray]:
    """The 5x7 glyphs: char -> bool array (7, 5)."""
    text = resources.files("flowopd.world").joinpath("font5x7.txt").read_text()
    glyphs: dict[str, np.ndarray] = {}
    # glyph rows are exactly five of '#'/'.'; comment lines start with "# "
    lines = [ln.strip() for ln in text.splitlines() if re.fullmatch(r"[#.]{5}|=.*", ln.strip())]
    i = 0
    while i < len(lines):
        if lines[i].startswith("="):
            ch = lines[i][1:].strip()
            rows = lines[i + 1 : i + 1 + GLYPH_H]
            glyphs[ch] = np.array([[c == "#" for c in r] for r in rows], dtype=bool)
            i += 1 + GLYPH_H
        else:
            i += 1
    return glyphs


@lru_cache(maxsize=None)
def footprint(shape: str) -> np.ndarray:
    """Boolean mask of a shape inside its bounding box."""
    if shape == "square":
        return np.ones((8, 8), dtype=bool)
    if shape == "circle":
        d = np.arange(9) - 4
        return (d[:, None] ** 2 + d[None, :] ** 2) <= 4.5**2
    if shape == "triangle":
        rows = np.arange(9)[:, None]
        dx = np.abs(np.arange(9) - 4)[None, :]
        return dx <= rows / 2.0  # apex row 0 (1 px) widening to 9 px on row 8
    raise ValueError(f"unknown shape {shape!r}")


def text_layout(text: str) -> tuple[int, int]:
    """Top-left (x, y) of a centred string's first glyph."""
    width = GLYPH_W * len(text) + (len(text) - 1)
    return (SIZE - width) // 2, (SIZE - GLYPH_H) // 2


def draw_text(text: str) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    x0, y0 = text_layout(text)
    glyphs = font()
    for k, ch in enumerate(text):
        g = glyphs[ch]
        x = x0 + k * (GLYPH_W + 1)
        img[y0 : y0 + GLYPH_H, x : x + GLYPH_W][g] = INK
    return img


def centre(shape: str, x0: int, y0: int) -> tuple[float, float]:
    h, w = footprint(shape).shape
    return x0 + (w - 1) / 2.0, y0 + (h - 1) / 2.0


def _boxes_clear(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    # boxes as (x0, y0, x1, y1) inclusive; need >= GAP px of background between them
    return a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]


def relation_holds(rel: str, ca: tuple[float, float], cb: tuple[float, float]) -> bool:
    """The contract's relation test on two centres (x, y), y growing downwards."""
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]
    if rel == "left of":
        return dx >= REL_MIN
    if rel == "right of":
        return -dx >= REL_MIN
    if rel == "above":
        return dy >= REL_MIN
    if rel == "below":
        return -dy >= REL_MIN
    raise ValueError(f"unknown relation {rel!r}")


def _other_axis_ok(rel: str, ca, cb) -> bool:
    axis = 1 if rel in ("left of", "right of") else 0
    return abs(ca[axis] - cb[axis]) <= REL_OTHER_MAX


def layout(spec: Spec, rng: random.Random, max_tries: int = 2000) -> list[tuple[str, str, int, int]]:
    """Place the objects of a spec: [(shape, colour, x0, y0)], colours resolved."""
    objs = list(spec.objects)
    if spec.category == "counting":
        col = rng.choice(COLORS)
        colors = [col] * len(objs)
    else:
        colors = [o.color or rng.choice(COLORS) for o in objs]
    for _ in range(max_tries):
        placed: list[tuple[str, str, int, int]] = []
        boxes: list[tuple[int, int, int, int]] = []
        ok = True
        for o, col in zip(objs, colors):
            h, w = footprint(o.shape).shape
            x0 = rng.randint(MARGIN, SIZE - MARGIN - w)
            y0 = rng.randint(MARGIN, SIZE - MARGIN - h)
            box = (x0, y0, x0 + w - 1, y0 + h - 1)
            if any(not _boxes_clear(box, b) for b in boxes):
                ok = False
                break
            placed.append((o.shape, col, x0, y0))
            boxes.append(box)
        if not ok:
            continue
        if spec.relation:
            ca = centre(placed[0][0], placed[0][2], placed[0][3])
            cb = centre(placed[1][0], placed[1][2], placed[1][3])
            if not (relation_holds(spec.relation, ca, cb) and _other_axis_ok(spec.relation, ca, cb)):
                continue
        return placed
    raise RuntimeError(f"could not place {spec}")  # never seen for the grammar's specs


def draw_objects(placed: list[tuple[str, str, int, int]]) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    for shape, col, x0, y0 in placed:
        fp = footprint(shape)
        h, w = fp.shape
        img[y0 : y0 + h, x0 : x0 + w][fp] = PALETTE[col]
    return img


def render(spec: Spec | str, rng: random.Random | int | None = None) -> np.ndarray:
    """Render a prompt (string or Spec) to a uint8 array (32, 32, 3)."""
    if isinstance(spec, str):
        spec = parse(spec)
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    if spec.category == "ocr":
        return draw_text(spec.text)
    return draw_objects(layout(spec, rng))


def to_model_space(img: np.ndarray) -> np.ndarray:
    """uint8 (..., 32, 32, 3) -> float32 (..., 3, 32, 32) in [-1, 1]."""
    x = img.astype(np.float32) / 127.5 - 1.0
    return np.moveaxis(x, -1, -3)


def to_uint8(x) -> np.ndarray:
    """Model space (..., 3, 32, 32) in [-1, 1] (tensor or array) -> uint8 (..., 32, 32, 3)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.clip((np.asarray(x) + 1.0) * 127.5, 0, 255)
    return np.moveaxis(np.rint(x).astype(np.uint8), -3, -1)


def as_uint8_images(images) -> np.ndarray:
    """uint8 (B, 32, 32, 3) from uint8 HWC images, a list of them, or model-space
    floats (B, 3, 32, 32) in [-1, 1] (numpy or torch)."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)):
        images = np.stack([as_uint8_images(im)[0] for im in images]) if len(images) else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images (B, 32, 32, 3) or (B, 3, 32, 32), got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[-1] != 3 and x.shape[1] == 3:
            x = np.moveaxis(x, 1, -1)
        return np.ascontiguousarray(x)
    # floats: model space in [-1, 1], channels first unless clearly channels last
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = np.moveaxis(x, 1, -1)
    x = np.clip((x.astype(np.float64) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8)
