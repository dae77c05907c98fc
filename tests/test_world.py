"""The toy world's renderer and grammar against TOYWORLD.md."""
from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import ndimage

from flowopd.world import prompts as P
from flowopd.world.prompts import (
    CATEGORIES,
    COLORS,
    COUNT_WORDS,
    MAX_TEXT_LEN,
    SHAPES,
    TEST_SIZES,
    TEXT_CHARS,
    PromptError,
    Spec,
    enumerate_category,
    is_heldout,
    make_prompt,
    parse,
    random_text,
    sample_prompt,
    sign_prompt,
    train_prompts,
    train_split,
)
from flowopd.world.render import (
    PALETTE,
    centre,
    draw_objects,
    font,
    footprint,
    layout,
    relation_holds,
    render,
    text_layout,
    to_model_space,
    to_uint8,
)

CONTRACT_PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def _colours(img: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)}


def _random_compose(rng: random.Random, n: int):
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        yield rng.choice(enumerate_category(cat))


# ----------------------------------------------------------------------------- palette and shapes


def test_palette_is_the_contract():
    assert PALETTE == CONTRACT_PALETTE
    assert tuple(PALETTE) == COLORS


def test_renders_use_only_contract_colours():
    rng = random.Random(0)
    for text in _random_compose(rng, 300):
        img = render(text, rng)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        cols = _colours(img)
        assert WHITE in cols
        assert cols <= {WHITE} | set(CONTRACT_PALETTE.values()), text
        spec = parse(text)
        for o in spec.objects:
            if o.color:
                assert CONTRACT_PALETTE[o.color] in cols, text
    for _ in range(50):
        t = random_text(rng)
        assert _colours(render(sign_prompt(t))) == {WHITE, BLACK}


def test_footprints():
    sq, ci, tr = footprint("square"), footprint("circle"), footprint("triangle")
    assert sq.shape == (8, 8) and sq.sum() == 64 and sq.all()
    assert ci.shape == (9, 9) and ci.sum() == 69
    d = np.arange(9) - 4
    assert np.array_equal(ci, d[:, None] ** 2 + d[None, :] ** 2 <= 4.5**2)
    assert list(ci.sum(1)) == [5, 7, 9, 9, 9, 9, 9, 7, 5]
    assert tr.shape == (9, 9) and tr.sum() == 41
    assert list(tr.sum(1)) == [1, 1, 3, 3, 5, 5, 7, 7, 9]  # apex up, base 9 on the bottom row
    for r in range(9):  # symmetric and centred on column 4, no gaps
        cols = np.nonzero(tr[r])[0]
        assert cols.min() + cols.max() == 8 and len(cols) == cols.max() - cols.min() + 1


def test_objects_are_flat_footprints_with_margin_and_gaps():
    rng = random.Random(1)
    for text in _random_compose(rng, 600):
        spec = parse(text)
        placed = layout(spec, rng)
        assert [p[0] for p in placed] == [o.shape for o in spec.objects]
        img = draw_objects(placed)
        boxes = []
        expect = np.zeros((32, 32), bool)
        for shape, col, x0, y0 in placed:
            h, w = footprint(shape).shape
            assert x0 >= 1 and y0 >= 1 and x0 + w <= 31 and y0 + h <= 31, (text, placed)
            region = img[y0 : y0 + h, x0 : x0 + w]
            assert np.all(region[footprint(shape)] == PALETTE[col])
            expect[y0 : y0 + h, x0 : x0 + w] |= footprint(shape)
            boxes.append((x0, y0, x0 + w - 1, y0 + h - 1))
        assert np.all(img[~expect] == 255)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                # at least 2 background px between the boxes along some axis
                assert a[2] + 2 < b[0] or b[2] + 2 < a[0] or a[3] + 2 < b[1] or b[3] + 2 < a[1], (text, placed)
        # and the drawn objects are separate components that do not touch
        lab, n = ndimage.label(expect, structure=np.ones((3, 3)))
        assert n == len(placed)


def test_colours_resolved_per_contract():
    rng = random.Random(2)
    seen_counting = set()
    for _ in range(200):
        text = rng.choice(enumerate_category("counting"))
        placed = layout(parse(text), rng)
        cols = {p[1] for p in placed}
        assert len(cols) == 1  # copies share one colour
        seen_counting |= cols
        assert len(placed) == COUNT_WORDS[text.split()[0]]
    assert seen_counting == set(COLORS)  # drawn uniformly: all appear
    for text in enumerate_category("color_attr")[:40]:
        spec = parse(text)
        assert [p[1] for p in layout(spec, rng)] == [o.color for o in spec.objects]


def test_relations_hold():
    rng = random.Random(3)
    for text in enumerate_category("position"):
        spec = parse(text)
        for _ in range(10):
            placed = layout(spec, rng)
            ca, cb = (centre(s, x, y) for s, _, x, y in placed)
            assert relation_holds(spec.relation, ca, cb), (text, placed)
            other = 1 if spec.relation in ("left of", "right of") else 0
            assert abs(ca[other] - cb[other]) <= 8
    assert relation_holds("left of", (5, 10), (8, 10)) and not relation_holds("left of", (5, 10), (7, 10))
    assert relation_holds("above", (5, 4), (5, 7)) and not relation_holds("above", (5, 7), (5, 4))
    assert relation_holds("right of", (8, 0), (5, 0)) and relation_holds("below", (0, 9), (0, 6))
    assert centre("square", 3, 4) == (6.5, 7.5) and centre("circle", 3, 4) == (7.0, 8.0)


# ----------------------------------------------------------------------------- text


def test_font():
    f = font()
    assert sorted(f) == sorted(TEXT_CHARS) and len(f) == 33
    assert not {"I", "O", "Q"} & set(f)
    assert all(g.shape == (7, 5) and g.dtype == bool and g.any() for g in f.values())
    keys = list(f)
    assert len({f[k].tobytes() for k in keys}) == len(keys)  # all distinct


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_text_centred(n):
    width = 5 * n + (n - 1)
    x0, y0 = (32 - width) // 2, (32 - 7) // 2  # ties round towards the top left
    assert text_layout("A" * n) == (x0, y0)
    rng = random.Random(n)
    for _ in range(30):
        t = "".join(rng.choice(TEXT_CHARS) for _ in range(n))
        img = render(sign_prompt(t))
        expect = np.full((32, 32, 3), 255, np.uint8)
        for k, ch in enumerate(t):
            x = x0 + 6 * k
            expect[y0 : y0 + 7, x : x + 5][font()[ch]] = 0
        assert np.array_equal(img, expect), t
        ink = (img == 0).all(-1)
        ys, xs = np.nonzero(ink)
        assert ys.min() >= y0 and ys.max() < y0 + 7 and xs.min() >= x0 and xs.max() < x0 + width
        # left and right paper margins differ by at most one pixel, left never wider
        left, right = x0, 32 - (x0 + width)
        assert right - left in (0, 1)


# ----------------------------------------------------------------------------- model space


def test_model_space_round_trip():
    rng = random.Random(4)
    imgs = np.stack([render(t, rng) for t in _random_compose(rng, 12)])
    x = to_model_space(imgs)
    assert x.shape == (12, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), imgs)


# ----------------------------------------------------------------------------- grammar


def _unparse(spec: Spec) -> str:
    """The grammar, written independently of prompts.py."""
    o = spec.objects
    if spec.category == "ocr":
        return f'a sign that says "{spec.text}"'
    if spec.category == "single_object":
        return f"a {o[0].shape}"
    if spec.category == "colors":
        return f"a {o[0].color} {o[0].shape}"
    if spec.category == "two_object":
        return f"a {o[0].shape} and a {o[1].shape}"
    if spec.category == "color_attr":
        return f"a {o[0].color} {o[0].shape} and a {o[1].color} {o[1].shape}"
    if spec.category == "counting":
        word = {v: k for k, v in COUNT_WORDS.items()}[len(o)]
        return f"{word} {o[0].shape}s"
    if spec.category == "position":
        return f"a {o[0].shape} {spec.relation} a {o[1].shape}"
    raise AssertionError(spec)


def test_grammar_round_trip_and_sizes():
    sizes = {"single_object": 3, "two_object": 6, "counting": 9, "colors": 15, "position": 24, "color_attr": 210}
    for cat in CATEGORIES:
        prompts = enumerate_category(cat)
        assert len(prompts) == len(set(prompts)) == sizes[cat]
        for p in prompts:
            spec = parse(p)
            assert spec.category == cat
            assert _unparse(spec) == p
            assert parse("  " + p.replace(" ", "   ") + " ") == spec  # whitespace-normalised
            assert all(o.shape in SHAPES and (o.color is None or o.color in COLORS) for o in spec.objects)
    for t in ["A", "K7", "ZZZZ", "0123"[:MAX_TEXT_LEN]]:
        spec = parse(sign_prompt(t))
        assert spec == Spec("ocr", text=t) and _unparse(spec) == sign_prompt(t)


def test_parse_meaning():
    assert parse("a circle left of a square").relation == "left of"
    assert [o.shape for o in parse("three circles").objects] == ["circle"] * 3
    s = parse("a red square and a green circle")
    assert [(o.color, o.shape) for o in s.objects] == [("red", "square"), ("green", "circle")]
    assert parse("a red square and a green square").category == "color_attr"  # same shape, colours differ
    assert make_prompt("a yellow square", "quality").task == "quality"
    assert make_prompt('a sign that says "K7"').task == "text"
    assert make_prompt("a circle").task == "compose"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a dog",
        "a square,",
        "one circle",
        "five circles",
        "two circle",
        "a orange square",
        "a square and a square",
        "a red square and a red square",
        "a circle left of a circle",
        "a circle next to a square",
        'a sign that says ""',
        'a sign that says "ABCDE"',
        'a sign that says "IO"',
        'a sign that says "ab"',
        "A circle",
    ],
)
def test_unknown_prompts_raise(bad):
    with pytest.raises(PromptError):
        parse(bad)


def test_task_mismatch_raises():
    with pytest.raises(PromptError):
        make_prompt("a circle", "text")
    with pytest.raises(PromptError):
        make_prompt('a sign that says "A"', "quality")
    with pytest.raises(PromptError):
        make_prompt("a circle", "painting")


# ----------------------------------------------------------------------------- splits


def test_splits_disjoint_per_task():
    for cat in CATEGORIES:
        tr, te = set(train_prompts(cat)), set(P.test_prompts_of(cat))
        assert tr and te and not tr & te
        assert tr | te == set(enumerate_category(cat))
    test = P.test_split()
    train = train_split(3000, seed=0)
    for task in ("compose", "text", "quality"):
        te = {p.text for p in test if p.task == task}
        tr = {p.text for p in train if p.task == task}
        assert te and tr and not te & tr, task
    assert all(is_heldout(p.text) for p in test)
    assert not any(is_heldout(p.text) for p in train)
    # held-out colour-shape pairs never appear in training prompts
    for p in train:
        for o in p.spec.objects:
            assert (o.color, o.shape) not in {("purple", "square"), ("yellow", "circle"), ("green", "triangle")}


def test_single_character_signs_are_trained():
    # the test split's one-character signs are held out, but most single characters stay in
    # training, where they are drawn about as often as the other lengths
    held = {t for t in P._test_texts() if len(t) == 1}
    assert len(held) == P.MAX_HELDOUT_SINGLE == TEST_SIZES["text"] // P.MAX_TEXT_LEN
    assert {p.spec.text for p in P.test_split() if p.task == "text" and len(p.spec.text) == 1} == held
    rng = random.Random(0)
    train = [P.random_text(rng) for _ in range(4000)]
    singles = {t for t in train if len(t) == 1}
    assert singles == set(P.TEXT_CHARS) - held
    assert 0.10 < sum(len(t) == 1 for t in train) / len(train) < 0.25
    # a chosen length: training strings still avoid the test strings; test strings come from the split
    assert {P.random_text(rng, length=1) for _ in range(400)} == set(P.TEXT_CHARS) - held
    assert {P.random_text(rng, "test", length=1) for _ in range(200)} == held
    with pytest.raises(ValueError, match="length"):
        P.random_text(rng, length=5)


def test_splits_reproducible():
    a = [(p.text, p.task) for p in train_split(200, seed=7)]
    b = [(p.text, p.task) for p in train_split(200, seed=7)]
    c = [(p.text, p.task) for p in train_split(200, seed=8)]
    assert a == b and a != c
    test = P.test_split()
    n = TEST_SIZES["compose_per_category"] * len(CATEGORIES) + TEST_SIZES["text"] + TEST_SIZES["quality"]
    assert len(test) == n
    for cat in CATEGORIES:
        assert sum(p.category == cat and p.task == "compose" for p in test) == TEST_SIZES["compose_per_category"]
    assert [p.text for p in test] == [p.text for p in P.test_split.__wrapped__()]
    lengths = [len(p.spec.text) for p in test if p.task == "text"]
    assert sorted(set(lengths)) == [1, 2, 3, 4]
    assert all(lengths.count(n) == TEST_SIZES["text"] // 4 for n in range(1, 5))
    r1, r2 = random.Random(3), random.Random(3)
    assert [sample_prompt(r1, "compose").text for _ in range(20)] == [sample_prompt(r2, "compose").text for _ in range(20)]


def test_renders_reproducible():
    for text in ["a circle left of a square", "three triangles", "a red square and a blue circle"]:
        assert np.array_equal(render(text, 5), render(text, 5))
        assert np.array_equal(render(text, random.Random(9)), render(text, 9))
