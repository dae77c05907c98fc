"""Evaluation on a split: sample with the default sampler (ODE, evaluation steps),
score with the world's scorers, and measure fidelity (FD to renders of the same prompts)."""
from __future__ import annotations

import time

import numpy as np

from .world.fidelity import fidelity
from .world.scoring import image_scores, mean_of_means_se, summarize_scores
from .sampling import sample_images
from .tasks import TASK_NAMES
from .world.prompts import get_split

TASK_KEYS = TASK_NAMES  # the tasks averaged into "average"


def subset(prompts: list, per_group: int | None) -> list:
    """The first `per_group` prompts of each (task, category) group, in split order."""
    if not per_group:
        return list(prompts)
    seen: dict = {}
    keep = []
    for p in prompts:
        key = (p.task, p.category)
        if seen.get(key, 0) < per_group:
            keep.append(p)
            seen[key] = seen.get(key, 0) + 1
    return keep


def evaluate(backend, split: str = "test", steps: int | None = None, cfg: float | None = None,
             seed: int = 0, progress: bool = True, per_group: int | None = None
             ) -> tuple[dict, np.ndarray, list, list[float]]:
    """-> (metrics, images uint8 (N,32,32,3), prompts, each image's score). metrics holds compose
    (+ per category), text (+ per sign length), quality, fidelity (FD, lower is better), average
    (mean of the three task scores), n, and se: the standard error of each mean (none for FD).
    per_group limits the split to its first prompts of each (task, category) (smoke runs)."""
    prompts = subset(get_split(split), per_group)
    t0 = time.time()
    images = sample_images(backend, [p.text for p in prompts], steps=steps, cfg=cfg, seed=seed, progress=progress)
    scores = image_scores(images, prompts)
    metrics = summarize_scores(scores, prompts)
    metrics["fidelity"] = float(fidelity(images, prompts, seed=seed))
    tasks = [metrics[k] for k in TASK_KEYS if metrics.get(k) is not None]
    metrics["average"] = float(np.mean(tasks)) if tasks else None
    metrics["se"]["average"] = mean_of_means_se(metrics["se"].get(k) for k in TASK_KEYS if metrics.get(k) is not None)
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics, images, prompts, scores
