"""The toy world's prompt grammar: parsing, generation and the train/test splits.

Every prompt belongs to exactly one task (``compose``, ``text``, ``quality``) and,
for compose-style prompts, one GenEval-like category. ``parse`` turns any string
of the grammar into a :class:`Spec` (the structured meaning the renderer draws
and the scorers check); strings outside the grammar raise :class:`PromptError`.

Splits are fixed by seeds and disjoint per task. Held-out combinations appear
only at test time: three colour-shape pairs (one per shape) never occur in the
training prompts of any category, and some object pairs, counts and relations
are test-only too; test text strings are never drawn for training.
"""
from __future__ import annotations

from flowopd.errors import UserError

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product

SHAPES = ("square", "circle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple")
COUNT_WORDS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
TEXT_CHARS = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"  # digits and capitals without I, O, Q
MAX_TEXT_LEN = 4
TASKS = ("compose", "text", "quality")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Combinations that appear only in the test split.
HELDOUT_COLOR_SHAPE = (("purple", "square"), ("yellow", "circle"), ("green", "triangle"))
HELDOUT_SINGLE = ("a triangle",)
HELDOUT_TWO = (("triangle", "circle"), ("circle", "square"))
HELDOUT_COUNT = (("two", "triangle"), ("three", "square"), ("four", "circle"))
HELDOUT_POSITION = (
    ("square", "left of", "triangle"),
    ("triangle", "right of", "circle"),
    ("circle", "above", "triangle"),
    ("triangle", "below", "square"),
    ("square", "above", "circle"),
    ("circle", "left of", "square"),
)

TEST_SEED = 1234
TEST_SIZES = {"compose_per_category": 64, "text": 64, "quality": 64}  # text: an equal share per length 1-4
MAX_HELDOUT_SINGLE = TEST_SIZES["text"] // MAX_TEXT_LEN  # one-character test strings: the split's share, no more


class PromptError(UserError, ValueError):
    """A prompt that is not a sentence of the toy world's grammar."""


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str | None = None  # None: the renderer picks one


@dataclass(frozen=True)
class Spec:
    """Structured meaning of a prompt."""

    category: str  # one of CATEGORIES, or "ocr"
    objects: tuple[Obj, ...] = ()
    relation: str | None = None  # for "position": objects[0] REL objects[1]
    text: str | None = None  # for "ocr"

    @property
    def default_task(self) -> str:
        return "text" if self.category == "ocr" else "compose"


@dataclass(frozen=True)
class Prompt:
    text: str
    task: str
    category: str
    spec: Spec = field(compare=False, repr=False)

    def to_json(self) -> dict:
        return {"prompt": self.text, "task": self.task, "category": self.category}


def plural(shape: str) -> str:
    return shape + "s"


_SHAPE = "(square|circle|triangle)"
_COLOR = "(red|green|blue|yellow|purple)"
_PATTERNS = [
    ("ocr", re.compile(r'a sign that says "([^"]*)"')),
    ("single_object", re.compile(rf"an? {_SHAPE}")),
    ("colors", re.compile(rf"an? {_COLOR} {_SHAPE}")),
    ("two_object", re.compile(rf"an? {_SHAPE} and an? {_SHAPE}")),
    ("color_attr", re.compile(rf"an? {_COLOR} {_SHAPE} and an? {_COLOR} {_SHAPE}")),
    ("counting", re.compile(r"(two|three|four) (squares|circles|triangles)")),
    ("position", re.compile(rf"an? {_SHAPE} (left of|right of|above|below) an? {_SHAPE}")),
]


def parse(text: str) -> Spec:
    """Parse a prompt of the grammar into a Spec; raise PromptError otherwise."""
    s = " ".join(str(text).strip().split())
    for category, pat in _PATTERNS:
        m = pat.fullmatch(s)
        if not m:
            continue
        g = m.groups()
        if category == "ocr":
            t = g[0]
            if not 1 <= len(t) <= MAX_TEXT_LEN or any(c not in TEXT_CHARS for c in t):
                raise PromptError(
                    f"text {t!r} must be 1-{MAX_TEXT_LEN} characters from {TEXT_CHARS}"
                )
            return Spec("ocr", text=t)
        if category == "single_object":
            return Spec(category, (Obj(g[0]),))
        if category == "colors":
            return Spec(category, (Obj(g[1], g[0]),))
        if category == "two_object":
            if g[0] == g[1]:
                raise PromptError("two named shapes must differ unless their colours do")
            return Spec(category, (Obj(g[0]), Obj(g[1])))
        if category == "color_attr":
            if (g[0], g[1]) == (g[2], g[3]):
                raise PromptError("two named shapes must differ unless their colours do")
            return Spec(category, (Obj(g[1], g[0]), Obj(g[3], g[2])))
        if category == "counting":
            n = COUNT_WORDS[g[0]]
            return Spec(category, tuple(Obj(g[1][:-1]) for _ in range(n)))
        if category == "position":
            if g[0] == g[2]:
                raise PromptError("two named shapes must differ unless their colours do")
            return Spec(category, (Obj(g[0]), Obj(g[2])), relation=g[1])
    raise PromptError(f"not a prompt of the toy world's grammar: {text!r}")


def infer_task(text: str) -> str:
    return parse(text).default_task


def make_prompt(text: str, task: str | None = None) -> Prompt:
    """A Prompt with its task (inferred from the grammar when not given)."""
    spec = parse(text)
    if task is None:
        task = spec.default_task
    if task not in TASKS:
        raise PromptError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    if task == "text" and spec.category != "ocr":
        raise PromptError(f"task 'text' needs a sign prompt, got {text!r}")
    if task in ("compose", "quality") and spec.category == "ocr":
        raise PromptError(f"task {task!r} needs a compose-style prompt, got {text!r}")
    category = spec.category
    return Prompt(" ".join(str(text).strip().split()), task, category, spec)


@lru_cache(maxsize=None)
def enumerate_category(category: str) -> tuple[str, ...]:
    """Every prompt string of a compose category, in a fixed order."""
    out: list[str] = []
    if category == "single_object":
        out = [f"a {s}" for s in SHAPES]
    elif category == "two_object":
        out = [f"a {a} and a {b}" for a, b in product(SHAPES, SHAPES) if a != b]
    elif category == "counting":
        out = [f"{w} {plural(s)}" for w, s in product(COUNT_WORDS, SHAPES)]
    elif category == "colors":
        out = [f"a {c} {s}" for c, s in product(COLORS, SHAPES)]
    elif category == "position":
        out = [f"a {a} {r} a {b}" for a, r, b in product(SHAPES, RELATIONS, SHAPES) if a != b]
    elif category == "color_attr":
        out = [
            f"a {c1} {s1} and a {c2} {s2}"
            for c1, s1, c2, s2 in product(COLORS, SHAPES, COLORS, SHAPES)
            if (c1, s1) != (c2, s2)
        ]
    else:
        raise ValueError(f"unknown category {category!r}")
    return tuple(out)


def is_heldout(text: str) -> bool:
    """True for compose-style prompts that belong to the test split only."""
    spec = parse(text)
    cat = spec.category
    if cat == "ocr":
        return text_is_heldout(spec.text)
    pairs = {(o.color, o.shape) for o in spec.objects if o.color}
    if pairs & set(HELDOUT_COLOR_SHAPE):
        return True
    if cat == "single_object":
        return " ".join(text.split()) in HELDOUT_SINGLE
    if cat == "two_object":
        return (spec.objects[0].shape, spec.objects[1].shape) in HELDOUT_TWO
    if cat == "counting":
        n = len(spec.objects)
        word = {v: k for k, v in COUNT_WORDS.items()}[n]
        return (word, spec.objects[0].shape) in HELDOUT_COUNT
    if cat == "position":
        return (spec.objects[0].shape, spec.relation, spec.objects[1].shape) in HELDOUT_POSITION
    return False


@lru_cache(maxsize=None)
def _test_texts() -> frozenset[str]:
    """400 strings seen only at test time. At most MAX_HELDOUT_SINGLE of them are one character
    long, so that most single characters stay in training: a uniform draw would hold out nearly
    every one of the 33, and a model would never learn to draw a one-character sign."""
    rng = random.Random(TEST_SEED + 7)
    out: set[str] = set()
    singles = 0
    while len(out) < 400:
        n = rng.randint(1, MAX_TEXT_LEN)
        t = "".join(rng.choice(TEXT_CHARS) for _ in range(n))
        if n == 1 and t not in out:
            if singles == MAX_HELDOUT_SINGLE:
                continue
            singles += 1
        out.add(t)
    return frozenset(out)


def text_is_heldout(t: str) -> bool:
    return t in _test_texts()


def test_captions() -> list[str]:
    """Every caption of the test split: each compose category's held-out prompts and a sign for each
    test string (quality prompts are compose prompts)."""
    return [p for c in CATEGORIES for p in test_prompts_of(c)] + [sign_prompt(t) for t in sorted(_test_texts())]


def train_prompts(category: str) -> list[str]:
    return [p for p in enumerate_category(category) if not is_heldout(p)]


def test_prompts_of(category: str) -> list[str]:
    return [p for p in enumerate_category(category) if is_heldout(p)]


def random_text(rng: random.Random, split: str = "train", length: int | None = None) -> str:
    """A random 1-4 character string (of `length` characters where given); train strings avoid the
    test strings."""
    if length is not None and not 1 <= length <= MAX_TEXT_LEN:
        raise ValueError(f"length must be in 1..{MAX_TEXT_LEN}, got {length}")
    if split == "test":
        pool = sorted(_test_texts())
        return rng.choice(pool if length is None else [t for t in pool if len(t) == length])
    while True:
        n = rng.randint(1, MAX_TEXT_LEN) if length is None else length
        t = "".join(rng.choice(TEXT_CHARS) for _ in range(n))
        if t not in _test_texts():
            return t


def sign_prompt(t: str) -> str:
    return f'a sign that says "{t}"'


def sample_prompt(rng: random.Random, task: str, split: str = "train", category: str | None = None) -> Prompt:
    """Draw one prompt of a task from a split (uniform over categories for compose/quality)."""
    if task == "text":
        return make_prompt(sign_prompt(random_text(rng, split)), "text")
    cat = category or rng.choice(CATEGORIES)
    pool = train_prompts(cat) if split == "train" else test_prompts_of(cat)
    return make_prompt(rng.choice(pool), task)


def train_split(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[Prompt]:
    """n training prompts cycling over the given tasks, reproducible from the seed."""
    rng = random.Random(seed)
    return [sample_prompt(rng, tasks[i % len(tasks)], "train") for i in range(n)]


@lru_cache(maxsize=None)
def test_split() -> tuple[Prompt, ...]:
    """The fixed evaluation set: 64 prompts per compose category, 64 text, 64 quality.

    Compose and quality prompts cycle through each category's held-out prompts;
    text prompts are test strings in a seeded order, an equal number of each
    length 1-4 (short signs are the hardest, and a uniform draw of distinct
    strings holds few of them).
    """
    rng = random.Random(TEST_SEED)
    out: list[Prompt] = []
    k = TEST_SIZES["compose_per_category"]
    for cat in CATEGORIES:
        pool = test_prompts_of(cat)
        out += [make_prompt(pool[i % len(pool)], "compose") for i in range(k)]
    texts = sorted(_test_texts())
    rng.shuffle(texts)
    per_len = TEST_SIZES["text"] // MAX_TEXT_LEN
    for n in range(1, MAX_TEXT_LEN + 1):
        out += [make_prompt(sign_prompt(t), "text") for t in [t for t in texts if len(t) == n][:per_len]]
    for i in range(TEST_SIZES["quality"]):
        cat = CATEGORIES[i % len(CATEGORIES)]
        pool = test_prompts_of(cat)
        out.append(make_prompt(pool[(i // len(CATEGORIES)) % len(pool)], "quality"))
    return tuple(out)


def get_split(name: str, n: int | None = None, seed: int = 0) -> list[Prompt]:
    if name == "test":
        return list(test_split())
    if name == "train":
        return train_split(n or 320, seed)
    raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")
