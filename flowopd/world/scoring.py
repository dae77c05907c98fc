"""Scorers of the toy world (TOYWORLD.md): object detection, GenEval-style strict
composition, OCR, and the per-sample rewards used for RL.

Pure numpy + scipy.ndimage, deterministic. Everything works on uint8 images
(B, 32, 32, 3) (or one image (32, 32, 3)); model-space float images
(B, 3, 32, 32) in [-1, 1] and torch tensors are accepted and decoded first.

Pixel classification (``classify_pixels``)
    Each pixel p is compared with the lines from white to each palette colour
    and to black ink: ``alpha`` is the projection of (p - white) on (c - white)
    (how much of c is mixed into the paper) and ``residual`` the distance from
    p to that line. A pixel is foreground when, on its nearest line (smallest
    residual), alpha >= 0.5 (more colour than paper, so slight blur keeps the
    footprints), or when it is off every line (residual > COLOR_TOL = 45) and
    far (> 100) from white (heavy noise, off-palette colours); its class is
    that nearest line. Pixels with 0.25 <= alpha < 0.5 are "faint".

Objects (``detect_objects``)
    8-connected components per class (5 colours, black ink); components under
    ``MIN_AREA`` (8) px are specks and ignored. A component's colour is decided
    on its mean colour (noise averages out): its class's name when the mean lies
    within COLOR_TOL of that class's line (the closest two lines are 93 apart
    at the palette colours), else None (off-palette: orange, dark red, grey,
    cyan... are never taken for a palette colour). A component 8-adjacent to
    another one is ``touching`` (touching objects are never valid; merged ones
    form one component whose shape is "unknown"). Faint regions of >= 8 px
    that touch no component (pale ghost objects) are detections of colour None.
    Each detection is a :class:`Detection`; ``valid`` = known shape, palette
    colour, not touching.

Shape rule (``classify_shape``)
    On the hole-filled mask: bbox height h and width w, fill = area / (h*w),
    and the row-width profile (pixels per row / w, resampled to 9 rows).
    Prototypes: each footprint (square 8x8, fill 1, flat profile; circle 9x9,
    fill 0.85, rows 5,7,9,9,9,9,9,7,5; triangle 9x9, fill 0.51, rows
    1,1,3,3,5,5,7,7,9) and the masks it leaves after gaussian blurs of sigma
    0.7, 1.0 and 1.2 thresholded at 0.5 (a blurred triangle loses its apex, a
    blurred square its corners). Distance to a prototype: sqrt((dfill/0.12)^2
    + (mean|dprofile|/0.1)^2 + (max(|dh|,|dw|)/2)^2), ruled out when a bbox
    side is more than 2 px off. The nearest shape wins if its distance is
    <= 1.0 (sharp square and circle are 2.0 apart), otherwise "unknown"
    (upside-down triangles, diamonds, merged blobs, rectangles, too big/small).

Composition (``compose_correct``, strict, GenEval-like)
    The detections must be exactly the named objects: as many valid detections
    (known shape, palette colour, not touching) as named objects and no other
    non-speck component (black ink and off-palette blobs included); a
    one-to-one match with the right shapes and, where the prompt names a
    colour, the right colours; for ``position`` the relation holds between
    the matched bbox centres (``relation_holds``: >= 3 px on the relation's
    axis; the other axis is not checked). ``counting`` checks count and shape
    only: its prompts name no colour (the renderer happens to give copies one
    colour, but the prompt does not ask for it, as in GenEval).

OCR (``ocr_read``)
    A soft ink map (darkness along the white-black line with a dead zone,
    zero for coloured pixels). Candidate readings: each length L in 1..4 at
    each global shift (dx, dy) in [-2, 2]^2 of the contract's centred layout
    (``text_layout``). Each 5x7 cell takes the best template (squared L2,
    equal to Hamming distance on clean binary images) among the 33 glyphs as
    drawn and as seen through blurs of sigma 0.6, 0.8, 1.0. A reading's cost
    is the sum of its cells' distances plus all ink outside its cells, so ink
    left unexplained and glyphs read on blank paper both cost (an empty cell
    costs at least the smallest glyph's ink, which is how L is decided). The
    cheapest reading wins (ties: smaller shift, then shorter). "" when there is
    almost no ink (< 3 px) or when even the best reading explains the ink
    badly (cost / (ink + glyph ink) > 0.5: noise, blobs, scribbles).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .prompts import CATEGORIES, COLORS, MAX_TEXT_LEN, SHAPES, Prompt, Spec, make_prompt, parse
from .quality import quality_score
from .render import (GLYPH_H, GLYPH_W, INK, PALETTE, SIZE, as_uint8_images, font, footprint,  # noqa: F401
                     relation_holds, text_layout)  # as_uint8_images: re-exported (its old home)

# ----------------------------------------------------------------------------- images


# ----------------------------------------------------------------------------- pixels

WHITE = np.array([255.0, 255.0, 255.0])
INK_NAME = "black"
CLASS_NAMES = ("background",) + COLORS + (INK_NAME,)  # class ids 0..6
BACKGROUND, BLACK = 0, len(COLORS) + 1
_LINES = np.array([PALETTE[c] for c in COLORS] + [INK], dtype=np.float64) - WHITE  # (6, 3)
_LINES_N2 = (_LINES**2).sum(1)
COLOR_TOL = 45.0  # max distance of an object's mean colour from its colour's white-mix line
OTHER_MIN = 100.0  # an off-line pixel this far from white is foreground
ALPHA_MIN = 0.5  # min mix fraction (colour vs paper) of a foreground pixel
FAINT_MIN = 0.25  # min mix fraction of a faint pixel (part of a pale ghost object)
ALPHA_MAX = 1.3  # projections are clamped to [0, ALPHA_MAX] along each line
MIN_AREA = 8  # components smaller than this are specks


def _line_fit(img: np.ndarray):
    """alpha, residual (..., 6) of pixels (..., 3) against the white->colour lines,
    and the distance from white (...)."""
    d = np.asarray(img, dtype=np.float64) - WHITE
    alpha = np.clip(d @ _LINES.T / _LINES_N2, 0.0, ALPHA_MAX)
    resid = np.linalg.norm(d[..., None, :] - alpha[..., None] * _LINES, axis=-1)
    return alpha, resid, np.linalg.norm(d, axis=-1)


def _pixel_fit(img: np.ndarray):
    """Nearest line (class id - 1), its alpha, its residual, distance from white."""
    alpha, resid, dist_white = _line_fit(img)
    best = resid.argmin(-1)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    return best, a, r, dist_white


def classify_pixels(img: np.ndarray, faint: bool = False):
    """Class id per pixel (..., H, W): 0 background, 1..5 COLORS, 6 black ink.

    A pixel is foreground when its nearest white->colour line (smallest
    residual) gives alpha >= 0.5, or when it is off every line (residual >
    COLOR_TOL: heavy noise, off-palette colours) and far (> OTHER_MIN) from white;
    its class is then that nearest line. Whether an object's colour is really
    the palette colour is decided per component (``component_color``).
    With ``faint=True`` also returns the mask of faint pixels: background
    pixels with alpha >= FAINT_MIN (pale ghosts, blur fringes)."""
    best, a, r, dist_white = _pixel_fit(img)
    fg = (a >= ALPHA_MIN) | ((r > COLOR_TOL) & (dist_white > OTHER_MIN))
    cls = np.where(fg, best + 1, 0).astype(np.int8)
    if faint:
        return cls, (a >= FAINT_MIN) & ~fg
    return cls


def component_color(pixels: np.ndarray, k: int) -> str | None:
    """Colour name of a component of class k from its pixels (N, 3): the class's
    name when the mean colour lies within COLOR_TOL of that class's white-mix
    line (alpha >= 0.5), None (an off-palette colour) otherwise."""
    alpha, resid, _ = _line_fit(pixels.reshape(-1, 3).mean(0))
    if resid[k - 1] <= COLOR_TOL and alpha[k - 1] >= ALPHA_MIN:
        return CLASS_NAMES[k]
    return None


# ----------------------------------------------------------------------------- shapes

PROTO_BLURS = (0.0, 0.7, 1.0, 1.2)  # prototypes: footprints seen through these blurs


def _profile(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    widths = mask.sum(1) / float(w)
    if h == 1:
        return np.full(9, widths[0])
    return np.interp(np.linspace(0, h - 1, 9), np.arange(h), widths)


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _prototypes() -> dict[str, list[tuple[tuple[int, int], float, np.ndarray]]]:
    out: dict[str, list] = {}
    for s in SHAPES:
        seen, protos = set(), []
        for sg in PROTO_BLURS:
            f = np.pad(footprint(s).astype(np.float64), 3)
            m = _crop((ndimage.gaussian_filter(f, sg) if sg else f) >= 0.5)
            key = m.tobytes() + bytes(m.shape)
            if key not in seen:
                seen.add(key)
                protos.append((m.shape, float(m.mean()), _profile(m)))
        out[s] = protos
    return out


_PROTOS = _prototypes()
SHAPE_TOL = 1.0


def shape_distances(mask: np.ndarray) -> dict[str, float]:
    """Distance of a cropped, filled mask to each shape (min over its prototypes;
    inf when every prototype is more than 2 px off in height or width)."""
    h, w = mask.shape
    fill = mask.mean()
    prof = _profile(mask)
    out = {}
    for s, protos in _PROTOS.items():
        best = float("inf")
        for (th, tw), tfill, tprof in protos:
            dsize = max(abs(h - th), abs(w - tw))
            if dsize > 2:
                continue
            d = np.sqrt(((fill - tfill) / 0.12) ** 2 + (np.abs(prof - tprof).mean() / 0.1) ** 2 + (dsize / 2.0) ** 2)
            best = min(best, float(d))
        out[s] = best
    return out


def classify_shape(mask: np.ndarray) -> str:
    """'square' | 'circle' | 'triangle' | 'unknown' for a boolean mask (any crop)."""
    if not mask.any():
        return "unknown"
    d = shape_distances(ndimage.binary_fill_holes(_crop(mask)))
    best = min(d, key=d.get)
    return best if d[best] <= SHAPE_TOL else "unknown"


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    shape: str  # square | circle | triangle | unknown
    color: str | None  # a palette colour, "black" (ink), or None (off-palette)
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    centre: tuple[float, float]  # bbox centre (x, y)
    area: int
    touching: bool = False  # 8-adjacent to another component

    @property
    def valid(self) -> bool:
        """A well-formed object of the world: known shape, palette colour, not touching."""
        return self.shape in SHAPES and self.color in COLORS and not self.touching


_EIGHT = np.ones((3, 3), dtype=bool)


def detect_objects(img: np.ndarray) -> list[Detection]:
    """All non-speck components of one image (32, 32, 3), sorted by (y, x) of the bbox."""
    img = as_uint8_images(img)[0]
    cls, faint = classify_pixels(img, faint=True)
    labels = np.zeros(cls.shape, dtype=np.int32)
    comps = []  # (class id, slice, mask)
    for k in range(1, BLACK + 1):
        m = cls == k
        if not m.any():
            continue
        lab, n = ndimage.label(m, structure=_EIGHT)
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        for j, sl in enumerate(ndimage.find_objects(lab), start=1):
            if areas[j] < MIN_AREA:
                continue
            mask = lab[sl] == j
            comps.append((k, sl, mask))
            labels[sl][mask] = len(comps)
    dets = []
    for idx, (k, sl, mask) in enumerate(comps, start=1):
        y0, y1 = sl[0].start, sl[0].stop - 1
        x0, x1 = sl[1].start, sl[1].stop - 1
        ey0, ey1, ex0, ex1 = max(0, y0 - 1), min(SIZE, y1 + 2), max(0, x0 - 1), min(SIZE, x1 + 2)
        region = labels[ey0:ey1, ex0:ex1]
        grown = ndimage.binary_dilation(region == idx, structure=_EIGHT)
        touching = bool(np.any((region[grown] != 0) & (region[grown] != idx)))
        color = component_color(img[sl][mask], k)
        shape = classify_shape(mask)
        dets.append(
            Detection(shape, color, (x0, y0, x1, y1), ((x0 + x1) / 2.0, (y0 + y1) / 2.0), int(mask.sum()), touching)
        )
    # pale ghosts: faint regions (with any specks they hold) that touch no object
    if faint.any():
        lab, n = ndimage.label(faint | (cls > 0), structure=_EIGHT)
        for j, sl in enumerate(ndimage.find_objects(lab), start=1):
            mask = lab[sl] == j
            if np.any(labels[sl][mask]) or np.count_nonzero(mask) < MIN_AREA:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1
            dets.append(
                Detection(classify_shape(mask), None, (x0, y0, x1, y1), ((x0 + x1) / 2.0, (y0 + y1) / 2.0),
                          int(mask.sum()), False)
            )
    dets.sort(key=lambda d: (d.bbox[1], d.bbox[0]))
    return dets


# ----------------------------------------------------------------------------- composition


def _spec(p) -> Spec:
    if isinstance(p, Spec):
        return p
    if isinstance(p, Prompt):
        return p.spec
    return parse(p)


def _obj_credit(det: Detection, shape: str, color: str | None, colour_free: bool) -> float:
    """Partial credit of one detection for one named object (used by compose_partial)."""
    colour_ok = colour_free or color is None or det.color == color
    palette = det.color in COLORS
    if det.shape == shape and palette and colour_ok:
        c = 1.0
    elif det.shape == shape:
        c = 0.5  # right shape, wrong (or off-palette / ink) colour
    elif color is not None and det.color == color:
        c = 0.25  # right colour, wrong or unknown shape
    else:
        c = 0.0
    return c * (0.5 if det.touching else 1.0)


def _compose_input(spec, img: np.ndarray, dets, who: str):
    """(the parsed compose-style spec, the image's detections: `dets` or detected now)."""
    spec = _spec(spec)
    if spec.category == "ocr":
        raise ValueError(f"{who} needs a compose-style prompt, got a sign prompt")
    return spec, (detect_objects(img) if dets is None else dets)


def compose_correct(spec, img: np.ndarray, dets: list[Detection] | None = None) -> bool:
    """GenEval-strict correctness of one image for a compose-style prompt (see module doc)."""
    spec, dets = _compose_input(spec, img, dets, "compose_correct")
    objs = spec.objects
    if len(dets) != len(objs) or not all(d.valid for d in dets):
        return False
    colour_free = spec.category == "counting"
    for perm in itertools.permutations(range(len(dets))):
        ok = all(
            dets[j].shape == o.shape and (colour_free or o.color is None or dets[j].color == o.color)
            for o, j in zip(objs, perm)
        )
        if not ok:
            continue
        if spec.relation is None or relation_holds(spec.relation, dets[perm[0]].centre, dets[perm[1]].centre):
            return True
    return False


EXTRA_PENALTY = 0.5  # per extra component, relative to one named object


def compose_partial_one(spec, img: np.ndarray, dets: list[Detection] | None = None) -> float:
    """Dense compose reward in [0, 1]; 1.0 exactly when compose_correct is True.

    Items: each named object, plus the relation for ``position`` prompts. A named
    object earns the credit of the detection it is matched to (optimal one-to-one
    assignment): 1 for the right shape in a right colour (palette colour; the
    named colour where one is named), 0.5 for the right shape in a wrong colour,
    0.25 for the right named colour on a wrong/unknown shape, halved when the
    detection touches another component. The relation item is 1 when both
    position objects are matched to detections of the right shapes and the
    relation holds between their centres. Every component left unmatched (extra
    objects, black ink, off-palette blobs, duplicates) costs EXTRA_PENALTY / n
    where n is the number of named objects. reward = clip(mean(items) - extras, 0, 1).
    """
    spec, dets = _compose_input(spec, img, dets, "compose_partial")
    objs = spec.objects
    n = len(objs)
    colour_free = spec.category == "counting"
    credit = np.zeros((n, len(dets)))
    for i, o in enumerate(objs):
        for j, d in enumerate(dets):
            credit[i, j] = _obj_credit(d, o.shape, o.color, colour_free)
    matched = {}
    if len(dets):
        rows, cols = linear_sum_assignment(-credit)
        matched = {int(r): int(c) for r, c in zip(rows, cols) if credit[r, c] > 0}
    items = [credit[i, matched[i]] if i in matched else 0.0 for i in range(n)]
    if spec.relation is not None:
        rel = 0.0
        if 0 in matched and 1 in matched:
            da, db = dets[matched[0]], dets[matched[1]]
            if da.shape == objs[0].shape and db.shape == objs[1].shape and relation_holds(
                spec.relation, da.centre, db.centre
            ):
                rel = 1.0
        items.append(rel)
    extras = len(dets) - len(matched)
    return float(np.clip(np.mean(items) - EXTRA_PENALTY * extras / n, 0.0, 1.0))


def _pairs(images, prompts):
    imgs = as_uint8_images(images)
    prompts = list(prompts)
    if len(imgs) != len(prompts):
        raise ValueError(f"{len(imgs)} images for {len(prompts)} prompts")
    return imgs, prompts


def compose_reward(images, prompts) -> np.ndarray:
    """Strict 0/1 compose correctness per image (float32 (B,))."""
    imgs, prompts = _pairs(images, prompts)
    return np.array([float(compose_correct(p, im)) for im, p in zip(imgs, prompts)], dtype=np.float32)


def compose_partial(images, prompts) -> np.ndarray:
    """Dense partial-credit compose reward per image in [0, 1] (see compose_partial_one)."""
    imgs, prompts = _pairs(images, prompts)
    return np.array([compose_partial_one(p, im) for im, p in zip(imgs, prompts)], dtype=np.float32)


# ----------------------------------------------------------------------------- OCR

OCR_SHIFT = 2  # px of global shift tried around the contract's layout
OCR_MIN_INK = 3.0  # less ink than this (in pixel units) reads as ""
OCR_MAX_ERR = 0.5  # readings that explain the ink worse than this read as ""
OCR_BLURS = (0.0, 0.6, 0.8, 1.0)  # glyph templates as seen through these blurs
_INK_LO, _INK_SPAN = 0.15, 0.7  # ink = clip((darkness - lo) / span, 0, 1)
_GLYPH_CHARS = tuple(sorted(font()))


def _ink_curve(dark: np.ndarray) -> np.ndarray:
    return np.clip((dark - _INK_LO) / _INK_SPAN, 0.0, 1.0)


def _glyph_bank() -> tuple[np.ndarray, np.ndarray]:
    """Templates (T, 7, 5) in ink units and their char index (T,)."""
    temps, chars = [], []
    for sg in OCR_BLURS:
        for i, c in enumerate(_GLYPH_CHARS):
            g = np.pad(font()[c].astype(np.float64), 3)
            if sg:
                g = ndimage.gaussian_filter(g, sg)
            temps.append(_ink_curve(g)[3:-3, 3:-3] if sg else g[3:-3, 3:-3])
            chars.append(i)
    return np.stack(temps), np.array(chars)


_TEMPLATES, _TEMPLATE_CHAR = _glyph_bank()
_TEMPLATE_INK = _TEMPLATES.sum((1, 2))
_TEMPLATE_SQ = (_TEMPLATES**2).sum((1, 2))


def ink_map(img: np.ndarray) -> np.ndarray:
    """Soft black-ink map in [0, 1] of one image (H, W): darkness along the
    white-black line (dead zone below 0.15, saturating at 0.85), faded out for
    coloured pixels (distance from the grey axis 40 -> 70)."""
    alpha, resid, _ = _line_fit(img)
    a, r = alpha[..., BLACK - 1], resid[..., BLACK - 1]
    return _ink_curve(np.minimum(a, 1.0)) * np.clip((70.0 - r) / 30.0, 0.0, 1.0)


def _readings():
    out = []  # (L, dx, dy), smaller shifts first
    for L in range(1, 5):
        for dx in range(-OCR_SHIFT, OCR_SHIFT + 1):
            for dy in range(-OCR_SHIFT, OCR_SHIFT + 1):
                out.append((L, dx, dy))
    return out


_READINGS = _readings()


def _window_costs(s: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The OCR's cell costs on an ink map: (ytop, the ink of each 7x5 window (5, 28), the squared
    distance of each window to each template (5, 28, T)). Windows start on the rows that can hold a
    reading (the contract's y0 +- OCR_SHIFT; ytop is the first) and on every column."""
    ytop = text_layout("X")[1] - OCR_SHIFT
    band = s[ytop : ytop + 2 * OCR_SHIFT + GLYPH_H]
    win = np.lib.stride_tricks.sliding_window_view(band, (GLYPH_H, GLYPH_W))  # (5, 28, 7, 5)
    # squared L2 distance (cheap to batch; equals L1 = Hamming distance on binary images)
    dist = (win**2).sum((2, 3))[..., None] + _TEMPLATE_SQ - 2.0 * np.einsum("yxhw,thw->yxt", win, _TEMPLATES)
    return ytop, win.sum((2, 3)), dist


def _cell_xs(length: int, dx: int) -> list[int] | None:
    """Left columns of the cells of a `length`-character string shifted by dx (None: off the image)."""
    x0 = text_layout("X" * length)[0] + dx
    xs = [x0 + k * (GLYPH_W + 1) for k in range(length)]
    return None if xs[0] < 0 or xs[-1] + GLYPH_W > SIZE else xs


def ocr_read_detail(img: np.ndarray) -> tuple[str, float]:
    """(reading, normalised error in [0, 1]) of one image; see the module doc."""
    img = as_uint8_images(img)[0]
    s = ink_map(img)
    total = float(s.sum())
    if total < OCR_MIN_INK:
        return "", 1.0
    ytop, wink, dist = _window_costs(s)
    best_t = dist.argmin(-1)
    best_d = np.take_along_axis(dist, best_t[..., None], -1)[..., 0]
    best = None
    for L, dx, dy in _READINGS:
        y = text_layout("X" * L)[1] + dy - ytop  # row in the band
        xs = _cell_xs(L, dx)
        if xs is None:
            continue
        cost = sum(best_d[y, x] for x in xs) + (total - sum(wink[y, x] for x in xs))
        key = (round(float(cost), 6), abs(dx) + abs(dy), L)
        if best is None or key < best[0]:
            ts = [best_t[y, x] for x in xs]
            text = "".join(_GLYPH_CHARS[_TEMPLATE_CHAR[t]] for t in ts)
            best = (key, text, float(cost) / (total + float(sum(_TEMPLATE_INK[t] for t in ts))))
    if best is None:
        return "", 1.0
    _, text, err = best
    if err > OCR_MAX_ERR:
        return "", err
    return text, err


def ocr_read(img: np.ndarray) -> str:
    """The string written on one image ('' for blank or non-text images)."""
    return ocr_read_detail(img)[0]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def reading_score(target: str, read: str) -> float:
    """1 - min(1, edit_distance(read, target) / len(target)): the OCR score of a reading."""
    if not target:
        raise ValueError("empty target text")
    return 1.0 - min(1.0, edit_distance(read, target) / len(target))


def text_score(target: str, img: np.ndarray) -> float:
    """reading_score of the OCR's reading of one image."""
    return reading_score(target, ocr_read(img))


def text_closeness(target: str, img: np.ndarray) -> float:
    """How close the ink is to the target string drawn at the contract's layout, in [0, 1]: 1 - the
    normalised cost of the reading that spells `target` (the OCR's cost: each cell's squared distance
    to its target glyph, best over the blurred templates, plus all ink outside the cells; over the
    ink plus the chosen templates' squared norms, so blank paper costs exactly 1; best over the
    OCR's shifts). 1 exactly for a clean render of `target`, 0 on blank paper.
    Unlike `text_score` it is graded inside a wrong glyph: an H drawn with a hint of M's diagonals
    is closer to "M" than a clean H (a dense reward for the text teacher)."""
    if not target:
        raise ValueError("empty target text")
    s = ink_map(as_uint8_images(img)[0])
    total = float(s.sum())
    ytop, wink, dist = _window_costs(s)
    glyph = [np.flatnonzero(_TEMPLATE_CHAR == _GLYPH_CHARS.index(c)) for c in target]
    y0 = text_layout(target)[1] - ytop  # the contract's row in the band
    best = 1.0
    for dx in range(-OCR_SHIFT, OCR_SHIFT + 1):
        xs = _cell_xs(len(target), dx)
        if xs is None:
            continue
        for dy in range(-OCR_SHIFT, OCR_SHIFT + 1):
            y = y0 + dy
            cost, inside, norm = 0.0, 0.0, 0.0
            for x, g in zip(xs, glyph):
                d = dist[y, x, g]
                cost += float(d.min())
                norm += float(_TEMPLATE_SQ[g[d.argmin()]])
                inside += float(wink[y, x])
            best = min(best, (cost + total - inside) / (total + norm))
    return float(max(0.0, 1.0 - best))


def _per_sign(score, images, prompts, name: str) -> np.ndarray:
    """score(target, img) per image (float32 (B,)); prompts must be sign prompts."""
    imgs, prompts = _pairs(images, prompts)
    out = []
    for im, p in zip(imgs, prompts):
        spec = _spec(p)
        if spec.category != "ocr":
            raise ValueError(f"{name} needs sign prompts, got {spec.category}")
        out.append(score(spec.text, im))
    return np.array(out, dtype=np.float32)


def text_dense_reward(images, prompts) -> np.ndarray:
    """Mean of `text_score` and `text_closeness` per image (float32 (B,)); sign prompts only."""
    return _per_sign(lambda t, im: 0.5 * (text_score(t, im) + text_closeness(t, im)), images, prompts,
                     "text_dense_reward")


def text_reward(images, prompts) -> np.ndarray:
    """text_score per image (float32 (B,)); prompts must be sign prompts."""
    return _per_sign(text_score, images, prompts, "text_reward")


# ----------------------------------------------------------------------------- aggregate


def _prompt(p) -> Prompt:
    return p if isinstance(p, Prompt) else make_prompt(p)


def task_reward(images, prompts, compose: str = "strict") -> np.ndarray:
    """Each image scored by its prompt's task: compose -> strict (or 'partial') compose
    reward, text -> text_score, quality -> quality_score. float32 (B,)."""
    return np.asarray(image_scores(images, prompts, compose), dtype=np.float32)


def standard_error(values) -> float | None:
    """Standard error of a mean: sample std (ddof=1) / sqrt(n); None for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None


def mean_of_means_se(ses) -> float | None:
    """Standard error of the plain mean of K independent means with standard errors ses."""
    ses = list(ses)
    return None if not ses or None in ses else float(np.sqrt(np.sum(np.square(ses))) / len(ses))


def image_scores(images, prompts: Sequence[Prompt], compose: str = "strict") -> list[float]:
    """Each image's score by its prompt's task, as evaluation counts it (compose 'strict': 1.0 or 0.0;
    'partial': compose_partial_one), text text_score, quality quality_score (one batch over the
    quality images)."""
    imgs, prompts = _pairs(images, prompts)
    prompts = [_prompt(p) for p in prompts]
    out = [0.0] * len(prompts)
    q_idx = [i for i, p in enumerate(prompts) if p.task == "quality"]
    if q_idx:
        for i, q in zip(q_idx, quality_score(imgs[q_idx])):
            out[i] = float(q)
    for i, (im, p) in enumerate(zip(imgs, prompts)):
        if p.task == "compose":
            out[i] = float(compose_correct(p, im)) if compose == "strict" else compose_partial_one(p, im)
        elif p.task == "text":
            out[i] = text_score(p.spec.text, im)
    return out


def score_images(images, prompts: Sequence[Prompt]) -> dict:
    """Evaluation summary of images for their prompts.

    Returns {"compose": mean over the compose categories present of each
    category's strict accuracy (compose-task prompts only), one key per compose
    category (None when absent), "text": mean text_score over text-task prompts,
    "text_len1" .. "text_len4": the same over signs of that many characters (None when absent),
    "quality": mean quality_score over quality-task prompts, "n": number of
    images, "se": {the standard error of each of those means}}; a task without
    prompts gives None. compose's standard error treats the categories as
    independent samples (its mean is a plain mean of category means).
    """
    imgs, prompts = _pairs(images, prompts)
    return summarize_scores(image_scores(imgs, prompts), prompts)


def summarize_scores(scores: Sequence[float], prompts: Sequence[Prompt]) -> dict:
    """score_images' summary of per-image scores (image_scores) of these prompts."""
    prompts = [_prompt(p) for p in prompts]
    if len(scores) != len(prompts):
        raise ValueError(f"{len(scores)} scores for {len(prompts)} prompts")
    per_cat: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    texts: list[float] = []
    by_len: dict[int, list[float]] = {n: [] for n in range(1, MAX_TEXT_LEN + 1)}
    q: list[float] = []
    for sc, p in zip(scores, prompts):
        if p.task == "compose":
            per_cat[p.category].append(sc)
        elif p.task == "text":
            texts.append(sc)
            by_len.setdefault(len(p.spec.text), []).append(sc)
        elif p.task == "quality":
            q.append(sc)
    out: dict = {}
    accs = {c: (float(np.mean(v)) if v else None) for c, v in per_cat.items()}
    se = {c: standard_error(v) for c, v in per_cat.items() if v}
    present = [c for c, a in accs.items() if a is not None]
    out["compose"] = float(np.mean([accs[c] for c in present])) if present else None
    se["compose"] = mean_of_means_se(se[c] for c in present)
    out.update(accs)
    out["text"] = float(np.mean(texts)) if texts else None
    se["text"] = standard_error(texts)
    for n, v in sorted(by_len.items()):
        out[f"text_len{n}"] = float(np.mean(v)) if v else None
        if v:
            se[f"text_len{n}"] = standard_error(v)
    if q:
        q32 = np.asarray(q, dtype=np.float32)  # quality_score's own dtype: the mean as before
        out["quality"] = float(np.mean(q32))
        se["quality"] = standard_error(q32)
    else:
        out["quality"] = None
    out["n"] = len(prompts)
    out["se"] = se
    return out
