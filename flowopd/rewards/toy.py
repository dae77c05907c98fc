"""Rewards of the toy world (TOYWORLD.md), as RL rewards `(images, prompts, metadata) -> (B,)`.

`images` are uint8 (B, 32, 32, 3); `prompts` are the prompt strings; `metadata` is an optional
list of per-sample dicts (unused here: the prompt string carries everything these scorers need).
All functions return float32 CPU tensors in [0, 1], and NaN for a sample the reward cannot score
(a sign prompt for compose and quality, a scene for text, a prompt outside the grammar for compose
and text), as TRL's multi-task rewards return None: OPD's routing reads the NaNs.

- ``compose``: dense partial credit (``world.scoring.compose_partial``). For each named object,
  the credit of the detection matched to it by an optimal one-to-one assignment: 1 for the right
  shape in the right colour (the named colour where one is named, any palette colour otherwise),
  0.5 for the right shape in a wrong or off-palette colour, 0.25 for the named colour on a wrong
  or unknown shape, halved when that detection touches another component; for ``position``
  prompts one more item, 1 when both objects are matched to the right shapes and the relation
  holds between their centres. Every unmatched component (extra objects, ink, blobs) costs
  0.5 / n_objects. Reward = clip(mean(items) - extras, 0, 1); it is 1.0 exactly when the strict
  GenEval-style check passes. Needs compose-style prompts (compose or quality tasks).
- ``compose_strict``: the evaluation metric itself, 1 if the image holds exactly the named objects
  (shapes, colours where named, count, relation), else 0. Sparse.
- ``text``: OCR score 1 - min(1, edit_distance(read, target) / len(target)). Needs sign prompts.
- ``text_dense``: the mean of ``text`` and ``world.scoring.text_closeness`` (1 - the OCR's cost of
  reading the target string): graded inside a wrong glyph, so a group whose samples all draw the
  same wrong letter still ranks them. 1.0 exactly for a clean render of the target.
- ``quality``: the learned image-quality model's score (world/quality.py, the DeQA analogue);
  the prompt is ignored, but a sign prompt gets NaN: the quality teacher is trained on scenes only.
"""
from __future__ import annotations

import numpy as np
import torch

from ..world.prompts import PromptError, parse
from ..world.quality import quality_score
from ..world.scoring import compose_partial, compose_reward, text_dense_reward, text_reward


def _kind(prompt: str) -> str | None:
    """"sign", "scene" (compose-style), or None outside the grammar."""
    try:
        return "sign" if parse(prompt).category == "ocr" else "scene"
    except PromptError:
        return None


def _where(fn, images, prompts, kinds: tuple) -> torch.Tensor:
    """fn(images, prompts) on the samples whose prompt is of one of `kinds` (scored together, as one
    batch), NaN on the others."""
    prompts = list(prompts)
    idx = [i for i, p in enumerate(prompts) if _kind(p) in kinds]
    out = torch.full((len(prompts),), float("nan"))
    if idx:
        out[idx] = torch.as_tensor(np.asarray(fn(images[idx], [prompts[i] for i in idx]), dtype=np.float32))
    return out


def compose(images, prompts, metadata=None) -> torch.Tensor:
    """Dense partial-credit composition reward in [0, 1] (see the module doc)."""
    return _where(compose_partial, images, prompts, ("scene",))


def compose_strict(images, prompts, metadata=None) -> torch.Tensor:
    """Strict 0/1 GenEval-style composition correctness (the evaluation metric)."""
    return _where(compose_reward, images, prompts, ("scene",))


def text(images, prompts, metadata=None) -> torch.Tensor:
    """OCR reward: 1 - min(1, edit_distance(read, target) / len(target)) in [0, 1]."""
    return _where(text_reward, images, prompts, ("sign",))


def text_dense(images, prompts, metadata=None) -> torch.Tensor:
    """Dense OCR reward: mean of the OCR score and the closeness to the target glyphs, in [0, 1]."""
    return _where(text_dense_reward, images, prompts, ("sign",))


def quality(images, prompts=None, metadata=None) -> torch.Tensor:
    """The toy world's learned image-quality score in [0, 1]; ignores the prompt (NaN on signs)."""
    if prompts is None:
        return torch.as_tensor(quality_score(images), dtype=torch.float32)
    return _where(lambda im, _: quality_score(im), images, prompts, ("scene", None))
