"""The world's scorers: exact on the renderer's own images, low on wrong ones."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from flowopd.world.prompts import CATEGORIES, COLORS, enumerate_category, make_prompt, random_text, sign_prompt
from flowopd.world.render import PALETTE, draw_objects, footprint, layout, render
from flowopd.world.scoring import (
    Detection,
    as_uint8_images,
    classify_shape,
    compose_correct,
    compose_partial,
    compose_partial_one,
    compose_reward,
    detect_objects,
    text_closeness,
    text_dense_reward,
    edit_distance,
    ocr_read,
    score_images,
    task_reward,
    text_reward,
    text_score,
)

N_PER_CAT = 40
WHITE = np.full((32, 32, 3), 255, np.uint8)


def _noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3)).astype(np.uint8)


def _noisy(img: np.ndarray, std: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(img + rng.normal(0, std, img.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def compose_set():
    """N_PER_CAT random prompts (train and test) per category with their renders and layouts."""
    rng = random.Random(0)
    out = []
    for cat in CATEGORIES:
        for _ in range(N_PER_CAT):
            p = make_prompt(rng.choice(enumerate_category(cat)), "compose")
            placed = layout(p.spec, rng)
            out.append((p, placed, draw_objects(placed)))
    return out


@pytest.fixture(scope="module")
def text_set():
    rng = random.Random(1)
    strings = [random_text(rng, "train") for _ in range(60)] + [random_text(rng, "test") for _ in range(40)]
    return [(make_prompt(sign_prompt(t)), render(sign_prompt(t))) for t in strings]


# ----------------------------------------------------------------------------- detection


def test_detect_objects_on_renders(compose_set):
    for p, placed, img in compose_set:
        dets = detect_objects(img)
        assert len(dets) == len(placed), p.text
        got = sorted((d.shape, d.color, d.centre, d.area) for d in dets)
        want = []
        for shape, col, x0, y0 in placed:
            h, w = footprint(shape).shape
            want.append((shape, col, (x0 + (w - 1) / 2, y0 + (h - 1) / 2), int(footprint(shape).sum())))
        assert got == sorted(want), p.text
        assert all(d.valid and not d.touching for d in dets)


def test_shape_rule():
    assert classify_shape(footprint("square")) == "square"
    assert classify_shape(footprint("circle")) == "circle"
    assert classify_shape(footprint("triangle")) == "triangle"
    assert classify_shape(footprint("triangle")[::-1]) == "unknown"  # pointing down
    assert classify_shape(np.ones((8, 16), bool)) == "unknown"  # two merged squares
    assert classify_shape(np.ones((14, 14), bool)) == "unknown"  # far too big
    assert classify_shape(np.ones((3, 3), bool)) == "unknown"  # far too small
    d = np.abs(np.arange(9) - 4)
    assert classify_shape(d[:, None] + d[None, :] <= 4) == "unknown"  # diamond
    sq = footprint("square").copy()
    sq[0, 0] = False  # one missing pixel does not matter
    assert classify_shape(sq) == "square"


def _canvas(*objs):
    img = WHITE.copy()
    for mask, rgb, x, y in objs:
        h, w = mask.shape
        img[y : y + h, x : x + w][mask] = rgb
    return img


def test_touching_merged_and_off_palette_objects_are_invalid():
    sq = footprint("square")
    touching = _canvas((sq, PALETTE["red"], 4, 10), (sq, PALETTE["blue"], 12, 10))
    dets = detect_objects(touching)
    assert len(dets) == 2 and all(d.touching and not d.valid for d in dets)
    assert not compose_correct("a red square and a blue square", touching)
    apart = _canvas((sq, PALETTE["red"], 4, 10), (sq, PALETTE["blue"], 14, 10))
    assert compose_correct("a red square and a blue square", apart)
    merged = _canvas((sq, PALETTE["red"], 4, 10), (sq, PALETTE["red"], 12, 10))
    (d,) = detect_objects(merged)
    assert d.shape == "unknown" and not compose_correct("two squares", merged)
    for rgb in [(255, 128, 0), (120, 20, 20), (0, 200, 220), (128, 128, 128), (255, 150, 200)]:
        img = _canvas((sq, rgb, 10, 10))
        (d,) = detect_objects(img)
        assert d.color is None and not d.valid, rgb
        assert not compose_correct("a square", img)


def test_specks_ignored_but_ink_counts():
    img = render("a red circle", 0).copy()
    img[1:3, 1:3] = PALETTE["blue"]  # a 4 px speck
    assert compose_correct("a red circle", img)
    img[25:30, 25:30] = 0  # 25 px of black ink is an object
    assert not compose_correct("a red circle", img)


# ----------------------------------------------------------------------------- compose


def test_compose_perfect_on_renders(compose_set):
    images = np.stack([c[2] for c in compose_set])
    prompts = [c[0] for c in compose_set]
    res = score_images(images, prompts)
    assert res["compose"] == 1.0
    for cat in CATEGORIES:
        assert res[cat] == 1.0, cat
    assert res["text"] is None and res["quality"] is None and res["n"] == len(prompts)
    assert np.all(compose_reward(images, prompts) == 1.0)
    assert np.all(compose_partial(images, [p.text for p in prompts]) == 1.0)


def test_compose_tolerates_small_noise_and_blur(compose_set):
    from scipy import ndimage

    for i, (p, _, img) in enumerate(compose_set):
        assert compose_correct(p, _noisy(img, 8.0, i)), p.text
        blurred = np.rint(ndimage.gaussian_filter(img.astype(float), (0.6, 0.6, 0))).astype(np.uint8)
        assert compose_correct(p, blurred), p.text


def _meaning(spec):
    """What a strict check can tell apart: count and shapes, and colours where named."""
    if spec.category == "counting":
        return (len(spec.objects), spec.objects[0].shape)
    return tuple(sorted((o.shape, o.color or "") for o in spec.objects))


def test_compose_rejects_render_of_other_prompt(compose_set):
    rng = random.Random(5)
    for p, _, _ in compose_set:
        pool = enumerate_category(p.category)
        if p.category == "position":
            flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            other = p.text.replace(p.spec.relation, flip[p.spec.relation])
        else:
            other = rng.choice([q for q in pool if _meaning(make_prompt(q).spec) != _meaning(p.spec)])
        img = render(other, rng)
        assert not compose_correct(p, img), (p.text, other)
        assert compose_partial_one(p, img) < 1.0


def test_compose_rejects_blank_noise_and_text(compose_set):
    for p, _, _ in compose_set[:: N_PER_CAT // 4]:
        for img in (WHITE, _noise(1), render('a sign that says "AB"')):
            assert not compose_correct(p, img)
            assert compose_partial_one(p, img) < 0.5
        assert compose_partial_one(p, WHITE) == 0.0


def _free_spot(placed, shape):
    """A top-left where an extra object keeps >= 2 px from every placed one (or None)."""
    fh, fw = footprint(shape).shape
    boxes = [(x, y, x + footprint(s).shape[1] - 1, y + footprint(s).shape[0] - 1) for s, _, x, y in placed]
    for y in range(1, 32 - fh):
        for x in range(1, 32 - fw):
            b = (x, y, x + fw - 1, y + fh - 1)
            if all(a[2] + 2 < b[0] or b[2] + 2 < a[0] or a[3] + 2 < b[1] or b[3] + 2 < a[1] for a in boxes):
                return x, y
    return None


def test_compose_rejects_extra_object(compose_set):
    n = 0
    for p, placed, img in compose_set:
        for shape in ("triangle", "square", "circle"):
            spot = _free_spot(placed, shape)
            if spot is None:
                continue
            extra = draw_objects(placed + [(shape, "green", *spot)])
            assert not compose_correct(p, extra), p.text
            assert compose_partial_one(p, extra) < 1.0
            n += 1
            break
    assert n > len(compose_set) // 2


def test_compose_wrong_colour(compose_set):
    checked = 0
    for p, placed, _ in compose_set:
        k = 0
        other = next(c for c in COLORS if c != placed[k][1])
        recoloured = list(placed)
        recoloured[k] = (placed[k][0], other, placed[k][2], placed[k][3])
        img = draw_objects(recoloured)
        named = p.spec.objects[0].color is not None
        if named:  # colors, color_attr: the named colour is checked
            assert not compose_correct(p, img), p.text
            assert 0.0 < compose_partial_one(p, img) < 1.0
            checked += 1
        elif p.category != "color_attr":
            # no colour named: any palette colour is right (counting copies included)
            assert compose_correct(p, img), p.text
    assert checked >= N_PER_CAT * 2


def test_compose_swapped_relation(compose_set):
    n = 0
    for p, placed, img in compose_set:
        if p.category != "position":
            continue
        # mirror the layout along the relation's axis; shapes stay upright
        horizontal = p.spec.relation in ("left of", "right of")
        mirrored = []
        for shape, col, x0, y0 in placed:
            h, w = footprint(shape).shape
            mirrored.append((shape, col, 32 - x0 - w, y0) if horizontal else (shape, col, x0, 32 - y0 - h))
        swapped = draw_objects(mirrored)
        assert detect_objects(swapped) and all(d.valid for d in detect_objects(swapped))
        assert not compose_correct(p, swapped), p.text
        assert compose_partial_one(p, swapped) == pytest.approx(2 / 3)  # both objects, no relation
        n += 1
    assert n == N_PER_CAT


def test_compose_partial_credit_is_graded():
    img = render("a red square", 0)
    assert compose_partial_one("a red square", img) == 1.0
    assert compose_partial_one("a blue square", img) == 0.5  # right shape, wrong colour
    assert compose_partial_one("a red circle", img) == 0.25  # right colour, wrong shape
    assert compose_partial_one("a triangle", img) == 0.0
    two = render("two squares", 0)
    assert compose_partial_one("three squares", two) == pytest.approx(2 / 3)
    assert compose_partial_one("a square", two) == 0.5  # one extra costs 0.5 / 1
    assert compose_correct("a square", img) and not compose_correct("a square", two)


# ----------------------------------------------------------------------------- OCR


def test_edit_distance():
    assert edit_distance("", "") == 0
    assert edit_distance("ABC", "") == 3 and edit_distance("", "AB") == 2
    assert edit_distance("K7", "K7") == 0
    assert edit_distance("KITTEN", "SITTING") == 3
    assert edit_distance("AB", "BA") == 2
    assert edit_distance("ABCD", "ABD") == 1


def test_ocr_reads_renders(text_set):
    for p, img in text_set:
        assert ocr_read(img) == p.spec.text
    images = np.stack([img for _, img in text_set])
    prompts = [p for p, _ in text_set]
    assert np.all(text_reward(images, prompts) == 1.0)
    res = score_images(images, prompts)
    assert res["text"] == 1.0 and res["compose"] is None and res["quality"] is None


def test_ocr_tolerates_small_noise(text_set):
    for i, (p, img) in enumerate(text_set):
        assert text_score(p.spec.text, _noisy(img, 8.0, i)) == 1.0, p.spec.text


def test_ocr_tolerates_small_shifts(text_set):
    for i, (p, img) in enumerate(text_set[:50]):
        dx, dy = (i % 5) - 2, ((i // 5) % 5) - 2
        shifted = np.roll(img, (dy, dx), axis=(0, 1))  # paper all around: rolling moves only paper
        assert ocr_read(shifted) == p.spec.text, (p.spec.text, dx, dy)


def test_ocr_blank_and_non_text():
    assert ocr_read(WHITE) == ""
    assert ocr_read(_noise(2)) == ""
    assert ocr_read(_noise(3)) == ""
    for t in ["a red square and a blue circle", "four triangles", "a purple circle"]:
        assert ocr_read(render(t, 1)) == ""
    assert text_score("K7", WHITE) == 0.0


def test_text_wrong_text(text_set):
    for p, _ in text_set[:40]:
        t = p.spec.text
        wrong = "".join("Z" if c != "Z" else "Y" for c in t)
        assert text_score(t, render(sign_prompt(wrong))) == 0.0
    assert text_score("AB", render(sign_prompt("AC"))) == 0.5
    assert text_score("ABCD", render(sign_prompt("ABC"))) == 0.75
    assert text_score("K7", render(sign_prompt("K7XY"))) == 0.0


def test_text_closeness_known_answers(text_set):
    for i, (p, img) in enumerate(text_set[:40]):
        t = p.spec.text
        assert text_closeness(t, img) == pytest.approx(1.0)
        dx, dy = (i % 5) - 2, ((i // 5) % 5) - 2  # within the OCR's shifts
        assert text_closeness(t, np.roll(img, (dy, dx), axis=(0, 1))) == pytest.approx(1.0)
    assert text_closeness("K7", WHITE) == 0.0
    # a wrong glyph is graded: an H with M's diagonals half drawn is closer to M than a clean H
    h = render(sign_prompt("H")).astype(np.float64)
    m = render(sign_prompt("M")).astype(np.float64)
    half = np.round(0.5 * (h + m)).astype(np.uint8)
    assert 0.0 < text_closeness("M", h.astype(np.uint8)) < text_closeness("M", half) < 1.0
    assert text_score("M", h.astype(np.uint8)) == text_score("M", half) == 0.0  # the OCR score ties them
    # the dense reward is the mean of the two: 1 on a clean render, 0.5 * closeness on a wrong one
    prompts = [sign_prompt("M"), sign_prompt("M")]
    r = text_dense_reward(np.stack([m.astype(np.uint8), h.astype(np.uint8)]), prompts)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(0.5 * text_closeness("M", h.astype(np.uint8)))
    with pytest.raises(ValueError):
        text_dense_reward(render("a red square")[None], ["a red square"])


# ----------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def quality_mod():
    from flowopd.world import quality

    return quality


def test_quality_high_on_clean_renders(quality_mod):
    from flowopd.world.prompts import test_split

    rng = random.Random(3)
    prompts = list(test_split())
    imgs = np.stack([render(p.spec, rng) for p in prompts])
    q = quality_mod.quality_score(imgs)
    assert q.shape == (len(prompts),) and q.dtype == np.float32
    assert q.mean() >= 0.95 and q.min() >= 0.8
    res = score_images(imgs, prompts)
    assert res["quality"] >= 0.95
    assert res["compose"] == 1.0 and res["text"] == 1.0


def test_quality_low_on_junk(quality_mod):
    rng = np.random.default_rng(0)
    junk = np.stack([WHITE, _noise(4)] + [quality_mod.junk(k, rng) for k in quality_mod.JUNK for _ in range(5)])
    assert quality_mod.quality_score(junk).max() < 0.15


def test_quality_monotone_in_degradation(quality_mod):
    rng = random.Random(4)
    clean = [render(rng.choice(enumerate_category(CATEGORIES[i % 6])), rng) for i in range(24)]
    clean += [render(sign_prompt(random_text(rng))) for _ in range(8)]
    sev = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for kind in quality_mod.DEGRADATIONS:
        imgs = np.stack([quality_mod.degrade(im, kind, s, np.random.default_rng(i))
                         for s in sev for i, im in enumerate(clean)])
        means = [float(m) for m in quality_mod.quality_score(imgs).reshape(len(sev), len(clean)).mean(1)]
        assert all(b <= a + 0.01 for a, b in zip(means, means[1:])), (kind, means)
        assert means[0] >= 0.95 and means[-1] <= 0.3 and means[0] - means[-1] >= 0.65, (kind, means)


def test_quality_accepts_model_space_and_is_differentiable(quality_mod):
    import torch

    from flowopd.world.render import to_model_space

    imgs = np.stack([render("a red square", 0), WHITE])
    q = quality_mod.quality_score(imgs)
    x = torch.from_numpy(to_model_space(imgs)).requires_grad_(True)
    qt = quality_mod.quality_score_tensor(x)
    assert np.allclose(qt.detach().numpy(), q, atol=1e-5)
    qt.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert np.allclose(quality_mod.quality_score(to_model_space(imgs)), q, atol=1e-6)


# ----------------------------------------------------------------------------- fidelity


def test_fidelity(compose_set, text_set):
    from flowopd.world.fidelity import FEATURE_DIM, features, fidelity, frechet_distance, reference_images

    prompts = [c[0] for c in compose_set] + [p for p, _ in text_set]
    refs = reference_images(prompts, seed=0)
    f = features(refs)
    assert f.shape == (len(prompts), FEATURE_DIM) and 32 <= FEATURE_DIM <= 64
    assert fidelity(refs, prompts, seed=0) < 1e-3  # the very renders: ~0
    same = fidelity(reference_images(prompts, seed=1), prompts, seed=0)  # other layouts
    blank = fidelity(np.stack([WHITE] * len(prompts)), prompts)
    noise = fidelity(np.stack([_noise(i) for i in range(len(prompts))]), prompts)
    blurred = fidelity(np.stack([np.rint(_blur(im)).astype(np.uint8) for im in refs]), prompts)
    assert same < 0.1 * min(blank, noise)
    assert same < blurred < max(blank, noise)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) + 2.0
    assert frechet_distance(a, a) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(16.0, rel=0.15)


def _blur(img):
    from scipy import ndimage

    return ndimage.gaussian_filter(img.astype(float), (1.2, 1.2, 0))


# ----------------------------------------------------------------------------- plumbing


def test_score_images_mixed_and_task_reward():
    rng = random.Random(6)
    prompts = [make_prompt("a red square", "compose"), make_prompt('a sign that says "K7"'),
               make_prompt("a circle above a square", "quality"), make_prompt("three circles", "compose")]
    imgs = np.stack([render(p.spec, rng) for p in prompts])
    res = score_images(list(imgs), prompts)
    assert res["n"] == 4 and res["compose"] == 1.0 and res["text"] == 1.0 and res["quality"] >= 0.9
    assert res["colors"] == 1.0 and res["counting"] == 1.0 and res["position"] is None
    assert set(CATEGORIES) <= set(res)
    r = task_reward(imgs, prompts)
    assert r.shape == (4,) and np.all(r[[0, 1, 3]] == 1.0) and r[2] >= 0.9
    bad = np.stack([WHITE] * 4)
    assert np.all(task_reward(bad, prompts) < 0.2)
    empty = score_images(np.zeros((0, 32, 32, 3), np.uint8), [])
    assert empty["compose"] is None and empty["text"] is None and empty["quality"] is None and empty["n"] == 0


def test_standard_errors_known_answers():
    from flowopd.world.scoring import mean_of_means_se, standard_error

    # 0/1 outcomes 1,1,0,0: sample std sqrt(1/3), n = 4 -> sqrt(1/12)
    assert np.isclose(standard_error([1, 1, 0, 0]), np.sqrt(1 / 12))
    assert standard_error([0.5]) is None and standard_error([2.0, 2.0, 2.0]) == 0.0
    assert np.isclose(mean_of_means_se([0.3, 0.4]), 0.25)  # sqrt(0.09 + 0.16) / 2
    assert mean_of_means_se([0.1, None]) is None and mean_of_means_se([]) is None
    # score_images: two colour prompts, one right and one blank -> colors 0.5 with se 0.5
    rng = random.Random(2)
    prompts = [make_prompt("a red square", "compose"), make_prompt("a blue circle", "compose"),
               make_prompt('a sign that says "K7"'), make_prompt('a sign that says "K7"')]
    imgs = np.stack([render(prompts[0].spec, rng), WHITE, render(prompts[2].spec, rng), WHITE])
    res = score_images(imgs, prompts)
    assert res["colors"] == 0.5 and np.isclose(res["se"]["colors"], 0.5)
    assert np.isclose(res["se"]["compose"], 0.5)  # one category: the compose se is its se
    assert res["text"] == 0.5 and np.isclose(res["se"]["text"], 0.5)
    assert "quality" not in res["se"] and "position" not in res["se"]


def test_text_by_length_and_per_image_scores():
    from flowopd.world.scoring import image_scores, summarize_scores

    rng = random.Random(4)
    # lengths 1 and 3 rendered right, length 2 once right once blank, no 4-character sign
    texts = ["K", "7", "AB", "CD", "XYZ"]
    prompts = [make_prompt(f'a sign that says "{t}"') for t in texts] + [make_prompt("a red square", "compose")]
    imgs = np.stack([render(p.spec, rng) for p in prompts])
    imgs[3] = WHITE
    scores = image_scores(imgs, prompts)
    assert scores == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    res = score_images(imgs, prompts)
    assert res == summarize_scores(scores, prompts)
    assert res["text_len1"] == 1.0 and res["text_len2"] == 0.5 and res["text_len3"] == 1.0
    assert res["text_len4"] is None and "text_len4" not in res["se"]
    assert res["se"]["text_len1"] == 0.0 and np.isclose(res["se"]["text_len2"], 0.5)
    assert res["text"] == 0.8  # the mean over all signs, not over lengths
    with pytest.raises(ValueError, match="5 scores for 6 prompts"):
        summarize_scores(scores[:5], prompts)

def test_as_uint8_images():
    from flowopd.world.render import to_model_space

    img = render("a blue circle", 0)
    assert np.array_equal(as_uint8_images(img), img[None])
    assert np.array_equal(as_uint8_images(to_model_space(img[None])), img[None])
    assert isinstance(detect_objects(img)[0], Detection)


def test_weights_are_shipped_and_small():
    from flowopd.world import fidelity, quality

    for path in (quality.weights_path(), fidelity.weights_path()):
        assert path.exists() and path.stat().st_size < 1_000_000
    assert quality.n_params(quality.quality_model()) < 100_000
