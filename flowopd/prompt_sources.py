"""Where training and evaluation prompts come from: the toy world's grammar, or prompt files.

The `prompts` key of the GRPO and OPD configs names, per task, a source:

  - nothing (toy tasks compose, text, quality): the toy world's grammar, train or test split;
  - a text file: one prompt a line (blank lines skipped);
  - a JSONL file: one object a line with a "prompt" string; every other field is kept as the
    sample's metadata and reaches the reward (GenEval needs "tag", "include", ...); an optional
    "task" field tags the line with its task;
  - a directory in Flow-GRPO's dataset layout: train.txt / test.txt, or train_metadata.jsonl /
    test_metadata.jsonl (dataset/ocr, dataset/pickscore, dataset/geneval).

`prompts` is either a mapping {task: source} or one source for every task; in a shared file a
line without a "task" field belongs to every task of the run, a tagged line to its task only.
A file (not a directory) has no separate test split: evaluation then uses its lines too.

Batches are drawn with the trainer's random.Random: each task's prompt is a uniform draw from its
source (with replacement, like the toy grammar's draw); toy tasks call the grammar exactly as
before, so toy runs reproduce.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .io import MAX_PROMPT_CHARS, _read_text
from .config import ConfigError
from .world.prompts import TASKS, get_split, sample_prompt

SPLITS = ("train", "test")


def read_prompt_records(path: str | Path) -> list[dict]:
    """A .txt (one prompt a line) or .jsonl ({"prompt": ..., [task], [metadata...]}) file ->
    [{"prompt": str, "task": str | None, "metadata": dict}]. Errors name the line."""
    path = Path(path)
    text = _read_text(path, "prompt file")  # missing, binary, not UTF-8: one clear error
    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    jsonl = path.suffix == ".jsonl" or first.startswith("{")
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if not jsonl:
            if len(line) > MAX_PROMPT_CHARS:
                raise ConfigError(f"{path}, line {n}: line is longer than {MAX_PROMPT_CHARS} characters")
            out.append({"prompt": line, "task": None, "metadata": {}, "line": n})
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise ConfigError(f'{path}, line {n}: expected an object with a non-empty "prompt" string')
        task = rec.pop("task", None)
        if task is not None and not isinstance(task, str):
            raise ConfigError(f"{path}, line {n}: task must be a string, got {task!r}")
        if len(rec["prompt"].strip()) > MAX_PROMPT_CHARS:
            raise ConfigError(f"{path}, line {n}: prompt is longer than {MAX_PROMPT_CHARS} characters")
        out.append({"prompt": rec["prompt"].strip(), "task": task, "metadata": rec, "line": n})
    if not out:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return out


def _split_file(directory: Path, split: str) -> Path | None:
    for name in (f"{split}_metadata.jsonl", f"{split}.jsonl", f"{split}.txt"):
        if (directory / name).is_file():
            return directory / name
    return None


class PromptSource:
    """The prompts of one task: the toy grammar (path None) or records read from a file or a
    Flow-GRPO dataset directory, per split."""

    def __init__(self, task: str, path: str | Path | None = None, shared: bool = False,
                 categories: list[str] | None = None):
        self.task = task
        self.categories = list(categories or [])  # toy compose/quality: draw only these categories
        self.path = None if path is None else Path(path)
        self._records: dict[str, list[dict]] = {}
        if self.path is None:
            if task not in TASKS:
                raise ConfigError(f"task {task!r} is not a toy task ({', '.join(TASKS)}): give it a prompt "
                                  "file or dataset directory in `prompts`")
            return
        for split in SPLITS:
            f = self._file(split)
            if f is None:
                continue
            recs = [r for r in read_prompt_records(f) if r["task"] in (None, task)]
            if not shared and any(r["task"] not in (None, task) for r in read_prompt_records(f)):
                raise ConfigError(f"{f} tags lines with other tasks than {task!r}")
            if recs:
                self._records[split] = recs
        if "train" not in self._records:
            raise ConfigError(f"no training prompts for task {task!r} in {self.path}")

    def _file(self, split: str) -> Path | None:
        if self.path.is_dir():
            return _split_file(self.path, split)
        if self.path.is_file():
            return self.path if split == "train" else None
        raise ConfigError(f"prompt source {self.path} (task {self.task!r}) not found")

    @property
    def is_toy(self) -> bool:
        return self.path is None

    def records(self, split: str = "train") -> list[dict]:
        """Every record of a split (a file's test split is its train split)."""
        if self.is_toy:
            return [{"prompt": p.text, "task": p.task, "metadata": {}} for p in get_split(split)
                    if p.task == self.task]
        return self._records.get(split) or self._records["train"]

    def draw(self, rng: random.Random, split: str = "train") -> tuple[str, dict]:
        """One prompt and its metadata."""
        if self.is_toy:
            cat = rng.choice(self.categories) if self.categories and self.task != "text" else None
            return sample_prompt(rng, self.task, split, category=cat).text, {}
        rec = rng.choice(self.records(split))
        return rec["prompt"], dict(rec["metadata"])


class PromptSources:
    """One PromptSource per task of a run, from the config's `tasks` and `prompts`."""

    def __init__(self, tasks: list[str], prompts: dict | str | None, categories: list[str] | None = None):
        prompts = prompts or {}
        if isinstance(prompts, dict):
            extra = sorted(set(prompts) - set(tasks))
            if extra:
                raise ConfigError(f"prompts names task(s) {extra} that are not in tasks {tasks}")
            self.sources = {t: PromptSource(t, prompts.get(t), categories=categories) for t in tasks}
        else:
            path = Path(prompts)
            if path.is_file():  # one file for every task: its tags must name tasks of this run
                for r in read_prompt_records(path):
                    if r["task"] is not None and r["task"] not in tasks:
                        raise ConfigError(f"{path}, line {r['line']}: task {r['task']!r} is not one of this "
                                          f"run's tasks ({', '.join(tasks)})")
            self.sources = {t: PromptSource(t, prompts, shared=True, categories=categories) for t in tasks}

    @property
    def all_toy(self) -> bool:
        return all(s.is_toy for s in self.sources.values())

    def draw_batch(self, rng: random.Random, counts: dict[str, int]) -> tuple[list[str], list[str], list[dict]]:
        """counts[t] prompts of each task t, in a shuffled order -> (prompts, tasks, metadata)."""
        tasks = [t for t, n in counts.items() for _ in range(n)]
        rng.shuffle(tasks)
        drawn = [self.sources[t].draw(rng) for t in tasks]
        return [p for p, _ in drawn], tasks, [m for _, m in drawn]

    def eval_set(self, per_task: int = 0) -> list[tuple[str, str, dict]]:
        """(prompt, task, metadata) of each task's test split (its first `per_task`; 0: all)."""
        out = []
        for t, s in self.sources.items():
            recs = s.records("test")
            out += [(r["prompt"], t, dict(r["metadata"])) for r in (recs[:per_task] if per_task else recs)]
        return out
