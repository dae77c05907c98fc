"""Reading prompt files and manifests, writing image folders without partial output."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError
from .world.prompts import TASKS, PromptError, infer_task, make_prompt

MAX_PROMPT_CHARS = 512
MAX_PROMPTS = 100000


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    data = path.read_bytes()
    if b"\0" in data:
        raise UserError(f"{what} {path} looks binary (it contains NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


def read_prompt_file(path: str | Path) -> list[dict]:
    """A text file (one prompt a line) or JSONL ({"prompt": ..., "task": ...}) -> [{prompt, task}].

    Blank lines are skipped. A missing task is inferred from the grammar (None for a
    prompt outside it; "tagged" says whether the file gave the task). Errors name the line.
    """
    path = Path(path)
    text = _read_text(path, "prompt file")
    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    jsonl = path.suffix == ".jsonl" or first.startswith("{")
    out: list[dict] = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}, line {n}"
        if len(line) > MAX_PROMPT_CHARS + (64 if jsonl else 0):
            raise UserError(f"{where}: line is longer than {MAX_PROMPT_CHARS} characters")
        task, tagged = None, False
        if jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise UserError(f'{where}: expected an object with a "prompt" string')
            prompt, task = rec["prompt"].strip(), rec.get("task")
            tagged = task is not None
            if task is not None and task not in TASKS:
                raise UserError(f"{where}: unknown task {task!r}; tasks are {', '.join(TASKS)}")
        else:
            prompt = line
        if not prompt:
            raise UserError(f"{where}: empty prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"{where}: prompt is longer than {MAX_PROMPT_CHARS} characters")
        if task is None:
            try:
                task = infer_task(prompt)
            except PromptError:
                task = None
        out.append({"prompt": prompt, "task": task, "line": n, "tagged": tagged})
        if len(out) > MAX_PROMPTS:
            raise UserError(f"{path}: more than {MAX_PROMPTS} prompts")
    if not out:
        raise UserError(f"prompt file {path} holds no prompts")
    return out


def prompt_pool(path: str | Path, tasks: list[str]) -> dict[str, list[str]]:
    """Training prompts of a run from a prompt file -> {task: [prompt, ...]} for the run's tasks.

    A prompt's task is its JSONL "task"; untagged prompts train the run's task when it has one,
    else the task the grammar infers. compose and text prompts must be sentences of the toy
    world's grammar (their rewards read the prompt). Every task needs at least one prompt.
    Errors name the file and line."""
    pool: dict[str, list[str]] = {t: [] for t in tasks}
    for r in read_prompt_file(path):
        where = f"{path}, line {r['line']}"
        task = r["task"] if r["tagged"] or len(tasks) != 1 else tasks[0]
        if task is None:
            raise UserError(f"{where}: {r['prompt']!r} is outside the toy grammar and has no task; "
                            'tag it in JSONL ({"prompt": ..., "task": ...})')
        if task not in pool:
            raise UserError(f"{where}: task {task!r} is not one of this run's tasks ({', '.join(tasks)})")
        if task in ("compose", "text"):
            try:
                make_prompt(r["prompt"], task)
            except PromptError as e:
                raise UserError(f"{where}: {e}") from None
        pool[task].append(r["prompt"])
    empty = [t for t, ps in pool.items() if not ps]
    if empty:
        raise UserError(f"prompt file {path} has no prompts for task(s) {', '.join(empty)}")
    return pool


def read_manifest(folder: str | Path):
    """DIR/manifest.jsonl + its PNGs -> (uint8 images (N,32,32,3), [Prompt]); errors name the line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    mpath = folder / "manifest.jsonl"
    text = _read_text(mpath, "manifest")
    images, prompts = [], []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{mpath}, line {n}"
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("file"), str):
            raise UserError(f'{where}: expected an object with "prompt" and "file" strings')
        try:
            prompts.append(make_prompt(rec["prompt"], rec.get("task")))
        except PromptError as e:
            raise UserError(f"{where}: {e}") from None
        f = (folder / rec["file"]).resolve()
        if not f.is_file():
            raise UserError(f"{where}: image file not found: {rec['file']}")
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if im.size != (32, 32):
                    raise UserError(f"{where}: {rec['file']} is {im.size[0]}x{im.size[1]}, expected 32x32")
                images.append(np.asarray(im, dtype=np.uint8))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{where}: cannot read image {rec['file']}: {e}") from None
    if not images:
        raise UserError(f"manifest {mpath} lists no images")
    return np.stack(images), prompts


@contextmanager
def staged_dir(out: str | Path):
    """Yield a temporary folder beside `out`; on success its files move into `out`.

    Nothing appears in `out` if the block fails, so errors leave no partial output.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_images(folder: Path, images: np.ndarray, records: list[dict]) -> None:
    """Write 0000.png ... and manifest.jsonl ({"prompt", "task", "file"} per line, and the record's
    "score" where it has one: `flowopd eval` writes each image's score)."""
    lines = []
    for i, (img, rec) in enumerate(zip(images, records)):
        name = f"{i:04d}.png"
        Image.fromarray(img, "RGB").save(folder / name)
        extra = {"score": rec["score"]} if "score" in rec else {}
        lines.append(json.dumps({"prompt": rec["prompt"], "task": rec["task"], "file": name, **extra}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
