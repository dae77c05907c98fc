"""Rewards of the toy world (TOYWORLD.md), as RL rewards `(images, prompts, metadata) -> (B,)`.

`images` are uint8 (B, 32, 32, 3); `prompts` are the prompt strings; `metadata` is an optional
list of per-sample dicts (unused here: the prompt string carries everything these scorers need).
All functions return float32 CPU tensors in [0, 1].

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
- ``quality``: the learned image-quality model's score (world/quality.py, the DeQA analogue);
  any prompt (the prompt is ignored).
"""
from __future__ import annotations

import numpy as np
import torch

from ..world.quality import quality_score
from ..world.scoring import compose_partial, compose_reward, text_reward


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def compose(images, prompts, metadata=None) -> torch.Tensor:
    """Dense partial-credit composition reward in [0, 1] (see the module doc)."""
    return _t(compose_partial(images, prompts))


def compose_strict(images, prompts, metadata=None) -> torch.Tensor:
    """Strict 0/1 GenEval-style composition correctness (the evaluation metric)."""
    return _t(compose_reward(images, prompts))


def text(images, prompts, metadata=None) -> torch.Tensor:
    """OCR reward: 1 - min(1, edit_distance(read, target) / len(target)) in [0, 1]."""
    return _t(text_reward(images, prompts))


def quality(images, prompts=None, metadata=None) -> torch.Tensor:
    """The toy world's learned image-quality score in [0, 1]; ignores the prompt."""
    return _t(quality_score(images))
