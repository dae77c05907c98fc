"""`flowopd run`: the whole toy-world pipeline, stage by stage, cached and resumable.

base -> three GRPO teachers -> GRPO-Mix -> cold starts (merge, sft) -> OPD
(merge init, sft init, merge init without MAR) -> evaluation -> report.

Every stage writes into OUT/work/<stage>/ and, only when it is complete,
OUT/stages/<stage>.json (its wall-clock seconds and outputs). A second run skips
stages with a marker; a run stopped anywhere (Ctrl-C, kill -9) redoes only the
stage that was in flight, and a training stage continues from the last state its
trainer saved in OUT/work/<stage>/ (flowopd.trainers.checkpointing). Final models
are copied to OUT/checkpoints/<model>/.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .backends import load_checkpoint
from .backends.tiny import resolve_checkpoint
from .config import PACKAGED_CONFIGS, ConfigError, load, require
from .errors import UserError
from .evaluate import evaluate
from .report import MODELS, write_report
from .sampling import sample_images
from .tasks import TASK_NAMES, TOY_TASKS
from .trainers.coldstart import average_teachers, main_coldstart
from .trainers.grpo import GRPOConfig, main_grpo
from .trainers.opd import load_config as load_opd_config
from .trainers.opd import main_distill

# Per-preset overrides of each stage's config (key=value, as on the command line).
PRESETS: dict[str, dict] = {
    "quick": {
        "grpo": ["steps=2", "prompts_per_step=2", "group_size=2", "sample_steps=4", "save_every=0", "tail_average=0",
                 "average_rank=0"],
        "coldstart_sft": ["sft_prompts_per_task=2", "sft_candidates=2", "sft_sample_steps=4", "sft_steps=4",
                          "sft_batch=4"],
        "distill": ["steps=2", "prompts_per_step=3", "group_size=2", "sample_steps=4"],
        "eval": {"per_group": 2, "steps": 8},
    },
    # the stage configs as packaged (the compose teacher: one run's tail average, see its config);
    # evaluation with 20 ODE steps (scores within about one standard error of 40 steps', in half the
    # time: docs/experiments.md)
    "full": {"grpo": [], "coldstart_sft": [], "distill": [], "teacher_seeds": {},
             "eval": {"per_group": None, "steps": 20}},
}


@dataclass
class RunConfig:
    """Optional --config for `flowopd run`: extra overrides on top of the preset."""

    base: str = ""  # the checkpoint every stage starts from ("": the shipped base)
    grpo: list[str] = field(default_factory=list)
    teachers: dict = field(default_factory=dict)  # task -> overrides of its teacher's GRPO run only
    # task -> n: train that teacher n times (seed=0..n-1, each its full budget) and use the mean of
    # the n runs' weight deltas as the teacher; over the preset's (none), n = 1 for one run
    teacher_seeds: dict = field(default_factory=dict)
    grpo_mix: list[str] = field(default_factory=list)
    coldstart_sft: list[str] = field(default_factory=list)
    distill: list[str] = field(default_factory=list)
    eval_steps: int = 0  # 0: the preset's (20 ODE steps for 'full')
    eval_per_group: int = 0  # 0: the preset's (the whole test split for 'full')
    grid_seed: int = 0

    def validate(self):
        if self.base:
            resolve_checkpoint(self.base)  # a clear error now, not after the first stages
        for t, over in self.teachers.items():
            require(t in TASK_NAMES, f"teachers: unknown task {t!r}; tasks are {', '.join(TASK_NAMES)}")
            require(isinstance(over, list), f"teachers.{t} must be a list of key=value overrides")
        for t, n in self.teacher_seeds.items():
            require(t in TASK_NAMES, f"teacher_seeds: unknown task {t!r}; tasks are {', '.join(TASK_NAMES)}")
            require(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                    f"teacher_seeds.{t} must be a whole number >= 1, got {n!r}")
        require(self.eval_steps >= 0, "eval_steps must be >= 0")
        require(self.eval_per_group >= 0, "eval_per_group must be >= 0")


# The three students: (model, packaged config, cold start it starts from, extra overrides)
OPD_STAGES = (("opd-merge", "toy_opd_merge.yaml", "coldstart-merge", []),
              ("opd-sft", "toy_opd_sft.yaml", "coldstart-sft", []),
              ("opd-merge-nomar", "toy_opd_merge.yaml", "coldstart-merge", ["beta=0"]))

# Relative cost of each stage, for the remaining-time estimate: the full preset's minutes on a 2-core CPU
# (a teacher's per run; the longest prefix names the stage)
WEIGHTS = {"base": 0.05, "teacher-compose": 12.9, "teacher-text": 5.1, "teacher-quality": 1.8, "teacher": 4.5,
           "grpo": 10.1, "coldstart-merge": 0.1, "coldstart-sft": 0.5, "opd": 2.9, "eval": 0.42, "report": 0.3}


def _weight(name: str, runs: int = 1) -> float:
    """name's weight; runs: how many runs make it (a teacher of several seeds)."""
    key = max((k for k in WEIGHTS if name.startswith(k)), key=len, default=None)
    return WEIGHTS[key] * runs if key else 1.0


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 60:d}:{s % 60:02d}"


class Pipeline:
    def __init__(self, out: Path, preset: str, rc: RunConfig):
        self.out, self.preset, self.rc = Path(out), preset, rc
        self.p = PRESETS[preset]
        self.stages_dir = self.out / "stages"
        self.t0 = time.time()

    # ---- bookkeeping ---------------------------------------------------------
    def marker(self, name: str) -> Path:
        return self.stages_dir / f"{name}.json"

    def done(self, name: str) -> dict | None:
        m = self.marker(name)
        if m.is_file():
            try:
                return json.loads(m.read_text())
            except json.JSONDecodeError:
                return None
        return None

    def finish(self, name: str, seconds: float, **info) -> None:
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.marker(name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": round(seconds, 1), **info}))
        os.replace(tmp, self.marker(name))

    def work(self, name: str) -> Path:
        """The work folder of a stage. A killed run's folder is kept: its trainer resumes from the
        state saved there when the stage's config is the same, and starts over otherwise (the
        stages run their trainers with overwrite=True)."""
        w = self.out / "work" / name
        w.mkdir(parents=True, exist_ok=True)
        return w

    def publish(self, model: str, ckpt: Path) -> Path:
        """Copy a finished checkpoint to OUT/checkpoints/<model> atomically."""
        dst = self.out / "checkpoints" / model
        tmp = dst.with_name(f".{model}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("state", "sft_data"))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        return dst

    def ckpt(self, model: str) -> Path:
        return self.out / "checkpoints" / model

    # ---- stages ----------------------------------------------------------------
    def stage_list(self):
        st = [("base", self.s_base)]
        for tk in TOY_TASKS:
            st.append((f"teacher-{tk.name}", lambda t=tk.name: self.s_teacher(t)))
        st.append(("grpo-mix", lambda: self.s_trained("grpo-mix")))
        st.append(("coldstart-merge", lambda: self.s_coldstart("merge")))
        st.append(("coldstart-sft", lambda: self.s_coldstart("sft")))
        for model, *_ in OPD_STAGES:
            st.append((model, lambda m=model: self.s_trained(m)))
        for m in MODELS:
            st.append((f"eval-{m}", lambda m=m: self.s_eval(m)))
        st.append(("report", self.s_report))
        return st

    def s_base(self):
        self.publish("base", resolve_checkpoint(self.rc.base or "base"))

    def trainer_configs(self) -> dict[str, tuple[str, Path, list[str]]]:
        """Every GRPO and OPD run of the pipeline, keyed by its work folder under OUT/work (a teacher
        of several runs: teacher-TASK/seedI): (trainer, packaged config, key=value overrides).
        The stages run exactly these; `trainer_config` resolves one without running it."""
        out: dict[str, tuple[str, Path, list[str]]] = {}

        def grpo(key: str, config: str, extra: list[str]):
            over = [*self.p["grpo"], *self.rc.grpo, *extra, f"init={self.ckpt('base')}"]
            out[key] = ("grpo", PACKAGED_CONFIGS / config, over)

        for tk in TOY_TASKS:
            extra, n = list(self.rc.teachers.get(tk.name, [])), self.seeds(tk.name)
            if n == 1:
                grpo(f"teacher-{tk.name}", tk.teacher_config, extra)
            else:
                for i in range(n):
                    grpo(f"teacher-{tk.name}/seed{i}", tk.teacher_config, [*extra, f"seed={i}"])
        grpo("grpo-mix", "toy_grpo_mix.yaml", list(self.rc.grpo_mix))
        for model, config, init, extra in OPD_STAGES:
            over = [f"base={self.ckpt('base')}", f"init={self.ckpt(init)}"]
            over += [f"teachers.{t}={d}" for t, d in self.teachers().items()]
            over += list(self.p["distill"]) + list(self.rc.distill) + extra
            out[model] = ("distill", PACKAGED_CONFIGS / config, over)
        return out

    def trainer_config(self, key: str):
        """The resolved config (GRPOConfig or OPDConfig) of one of trainer_configs()."""
        kind, path, over = self.trainer_configs()[key]
        return load(GRPOConfig, path, over) if kind == "grpo" else load_opd_config(path, over)

    def train(self, key: str) -> Path:
        kind, path, over = self.trainer_configs()[key]
        main = main_grpo if kind == "grpo" else main_distill
        return main(path, self.work(key), over, overwrite=True)

    def s_trained(self, model: str):
        self.publish(model, self.train(model))

    def s_teacher(self, task: str):
        model, n = f"teacher-{task}", self.seeds(task)
        if n == 1:
            return self.s_trained(model)
        w = self.work(model)
        finals = [self.train(f"{model}/seed{i}") for i in range(n)]
        self.publish(model, average_teachers(finals, w / "average", self.ckpt("base"), task))

    def seeds(self, task: str) -> int:
        """How many runs make the task's teacher: the --config's teacher_seeds over the preset's."""
        return {**self.p.get("teacher_seeds", {}), **self.rc.teacher_seeds}.get(task, 1)

    def weight(self, stage: str) -> float:
        return _weight(stage, self.seeds(stage[len("teacher-"):]) if stage.startswith("teacher-") else 1)

    def teachers(self) -> dict[str, str]:
        return {t: str(self.ckpt(f"teacher-{t}")) for t in TASK_NAMES}

    def s_coldstart(self, method: str):
        w = self.work(f"coldstart-{method}")
        over = [f"base={self.ckpt('base')}"]
        if method == "sft":
            over += list(self.p["coldstart_sft"]) + list(self.rc.coldstart_sft)
        final = main_coldstart(method, [f"{t}={d}" for t, d in self.teachers().items()], w, over, overwrite=True)
        self.publish(f"coldstart-{method}", final)

    def eval_args(self) -> dict:
        e = dict(self.p["eval"])
        if self.rc.eval_steps:
            e["steps"] = self.rc.eval_steps
        if self.rc.eval_per_group:
            e["per_group"] = self.rc.eval_per_group
        return e

    def s_eval(self, model: str):
        backend = load_checkpoint(self.ckpt(model))
        e = self.eval_args()
        metrics, *_ = evaluate(backend, "test", steps=e["steps"], per_group=e["per_group"], progress=True)
        d = self.out / "evals"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{model}.json").write_text(json.dumps(metrics, indent=2))

    def results(self) -> dict:
        models = {}
        for m in MODELS:
            f = self.out / "evals" / f"{m}.json"
            if f.is_file():
                models[m] = json.loads(f.read_text())
        stage_s = {n: (self.done(n) or {}).get("seconds") for n, _ in self.stage_list() if self.done(n)}
        return {"preset": self.preset, "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch on "
                           f"{'cuda' if _cuda() else 'cpu'}",
                "models": models, "stage_seconds": stage_s,
                "eval": self.eval_args()}

    def curves(self) -> dict:
        """Training reward per task vs rollouts from each RL stage's train_log.jsonl."""
        out = {}
        for model in (*(f"teacher-{t}" for t in TASK_NAMES), "grpo-mix", "opd-merge"):
            d = self.out / "work" / model
            d = d / "seed0" if (d / "seed0").is_dir() else d  # a teacher of several runs: the first run's
            log, cfg = d / "train_log.jsonl", d / "config.yaml"
            if not log.is_file():
                continue
            per_step = 1
            if cfg.is_file():
                c = yaml.safe_load(cfg.read_text()) or {}
                per_step = int(c.get("prompts_per_step", 1)) * int(c.get("group_size", 1))
            rows = []
            for line in log.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "step" in r:
                    r["rollouts"] = r["step"] * per_step
                    rows.append(r)
            out[model] = rows
        return out

    def s_report(self):
        res = self.results()
        grid_prompts = ["a red square and a blue circle", "three triangles", "a circle left of a square",
                        "a yellow triangle", 'a sign that says "K7"', 'a sign that says "GR4B"']
        e = self.eval_args()
        rows = {}
        for m in MODELS:
            if self.ckpt(m).is_dir():
                b = load_checkpoint(self.ckpt(m))
                rows[m] = sample_images(b, grid_prompts, steps=e["steps"], seed=self.rc.grid_seed, progress=False)
        write_report(self.out, res, self.curves(), rows, grid_prompts)
        (self.out / "results.json").write_text(json.dumps(res, indent=2))
        return res

    # ---- driver ----------------------------------------------------------------
    def run(self) -> dict:
        stages = self.stage_list()
        n = len(stages)
        done_w = 0.0  # weight of the stages run in this invocation
        for k, (name, fn) in enumerate(stages, 1):
            if name != "report" and self.done(name):
                print(f"[stage {k}/{n}] {name}: done earlier, skipped", file=sys.stderr)
                continue
            el = time.time() - self.t0
            left = sum(self.weight(s) for s, _ in stages[k - 1:] if s == "report" or not self.done(s))
            # no estimate from the base stage alone: copying a checkpoint says nothing about training speed
            eta = f", estimate {_fmt(el / done_w * left)} left" if done_w >= 1.0 else ""
            print(f"[stage {k}/{n}] {name} (elapsed {_fmt(el)}{eta})", file=sys.stderr, flush=True)
            t = time.time()
            fn()
            self.finish(name, time.time() - t)
            done_w += self.weight(name)
        res = json.loads((self.out / "results.json").read_text())
        print(f"[done] {n} stages in {_fmt(time.time() - self.t0)}; results in {self.out}", file=sys.stderr)
        return res


def _cuda() -> bool:
    return torch.cuda.is_available()


def main_run(preset: str, out: str | Path, config: str | None = None, overrides: list[str] | None = None) -> dict:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
    rc = load(RunConfig, config, overrides)
    out = Path(out)
    meta = out / "run.json"
    if meta.is_file():
        prev = json.loads(meta.read_text())
        if prev.get("preset") != preset:
            raise ConfigError(f"{out} holds a '{prev.get('preset')}' run; use another --out for preset '{preset}'")
    else:
        out.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"preset": preset, "config": str(config) if config else None}))
    return Pipeline(out, preset, rc).run()
