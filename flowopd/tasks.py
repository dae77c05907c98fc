"""The task registry: every task of the toy world, with the reward its teacher is trained on (and
its student is scored by during training) and its teacher's recipe in the toy pipeline.

The pipeline, the report, evaluation and the trainers' defaults read the tasks from here. Adding a
toy task means: its prompts (a task tag in flowopd.world.prompts, with a test split) and its scorer
(flowopd.world.scoring's score_images key) in the world, its reward registered in flowopd.rewards
(NaN for samples it cannot score), a teacher recipe in configs/, and one entry below.
"""
from __future__ import annotations

from dataclasses import dataclass

from .world.prompts import TASKS as WORLD_TASKS


@dataclass(frozen=True)
class Task:
    name: str            # the task tag of its prompts (flowopd.world.prompts)
    reward: str          # the registered reward (flowopd.rewards) of its teacher and of OPD's logs
    teacher_config: str  # the toy pipeline's GRPO recipe of its teacher (configs/)


TOY_TASKS: tuple[Task, ...] = (
    Task("compose", "compose", "toy_grpo_compose.yaml"),
    Task("text", "text", "toy_grpo_text.yaml"),
    Task("quality", "quality", "toy_grpo_quality.yaml"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TOY_TASKS)
DEFAULT_TASK_REWARDS: dict[str, str] = {t.name: t.reward for t in TOY_TASKS}

if TASK_NAMES != tuple(WORLD_TASKS):  # the registry and the world's grammar name the same tasks
    raise ImportError(f"flowopd.tasks lists {TASK_NAMES}, the world's grammar {tuple(WORLD_TASKS)}")

