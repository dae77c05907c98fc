"""Resume and numerical faults, shared by the GRPO, cold-start SFT and OPD trainers.

A trainer calls three things, each in a line or two of its loop:

    prepare_out(out, identity(cfg), overwrite, resume)   # before writing anything to out
    run = RunState(out, named_params, opt, every=cfg.state_every, max_bad=cfg.max_bad_steps,
                   ema=ema, generators={"gen": gen}, randoms={"rng": rng})
    start = run.resume()                  # 0, or the step of the newest intact state, restored
    for step in range(start + 1, cfg.steps + 1):
        ...
        if not run.finite(step, "reward", rewards):      # NaN/Inf reward: no update (logged)
        ...
        if run.update_ok(step, loss_ok, gnorm):          # NaN/Inf loss or gradient: skipped (logged)
            opt.step()
        ...
        run.step_done(step)               # a state every `every` steps
    run.finish(step)                      # and one at the end

A state (flowopd.state: safetensors + checksummed JSON, written atomically, the previous one
kept until the new one is complete, damaged ones refused with a message and skipped) holds the
trainable weights (adapters, or every weight of a full fine-tune), the optimizer, the EMA, any
extra tensors the trainer names (OPD's reward scaler), the RNG states (torch, CUDA, numpy,
python, and the trainer's own torch.Generator and random.Random), the step, and the count of
bad updates in a row. The trainers draw their data (prompts, batches) from those generators,
so the generator states are the data position. Restoring them makes a resumed CPU run equal a
run that never stopped, bit for bit (tests/test_faults.py checks it with torch.equal).

`max_bad` non-finite updates in a row stop the run with NonFiniteError (a UserError: the CLI
prints one line and exits 2) after saving a state of the last good weights (the skipped
updates never touched them).
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from ..backends.tiny import CheckpointError
from ..config import to_dict
from ..errors import UserError
from ..state import (check_out_dir, latest_state, optimizer_from_flat, optimizer_to_flat,
                     restore_rng, rng_state, save_state, verify_state)

KEEP = 2  # complete states kept on disk: the newest, and the one before in case the newest is damaged

# config keys that do not change what a run computes: a rerun may change them and still resume
NOT_IDENTITY = ("steps", "sft_steps", "max_minutes", "log_every", "save_every", "tail_average", "average_rank", "state_every",
                "max_bad_steps", "device", "num_threads")


class NonFiniteError(UserError):
    """Too many non-finite (NaN/Inf) losses, gradients or rewards in a row."""


def identity(cfg, **extra) -> dict:
    """The config keys that define a run (resuming needs them unchanged), plus `extra`. cfg: a config,
    or its dict (a recipe read back from a checkpoint's meta)."""
    d = {k: v for k, v in (cfg if isinstance(cfg, dict) else to_dict(cfg)).items() if k not in NOT_IDENTITY}
    return json.loads(json.dumps({**d, **extra}))  # what run.json will read back as


def has_state(root: Path) -> bool:
    return root.is_dir() and any(verify_state(p) is None for p in root.glob("step_*"))


def prepare_out(out: str | Path, ident: dict, overwrite: bool = False, resume: bool = False,
                clear: tuple[str, ...] = ("state", "train_log.jsonl")) -> None:
    """Check the output folder before anything is written to it, then record the run there.

    Refuses (UserError) a folder that is a file, or that holds another run's run.json unless
    `overwrite` (then that run's states and log, `clear`, are removed), and `resume` without an
    intact state. The same config again means: resume. Writes out/run.json when it is new."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    check_out_dir(out, ident, overwrite, "run.json")
    if resume and not has_state(out / "state"):
        raise UserError(f"--resume: no complete checkpoint in {out / 'state'}")
    f = out / "run.json"
    prev = None
    if f.is_file():
        try:
            prev = json.loads(f.read_text())
        except json.JSONDecodeError:
            pass
    if prev == ident:
        return
    if overwrite:
        for name in clear:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(ident))
    tmp.replace(f)


def cached(root: Path, build) -> tuple[dict, dict]:
    """(tensors, meta) of the intact state in `root`, or `build()` -> (tensors, meta), then saved
    there (atomically) with the RNG states as they are after building. A hit restores those RNG
    states, so whatever follows draws the same numbers whether the data was built or read back."""
    found = latest_state(root, log=lambda m: print(m, file=sys.stderr))
    if found is not None:
        _, tensors, meta = found
        restore_rng(tensors, meta.pop("rng"))
        return {k: v for k, v in tensors.items() if not k.startswith("rng.")}, meta
    tensors, meta = build()
    rng_t, rng_js = rng_state()
    save_state(root, 0, {**tensors, **rng_t}, {**meta, "rng": rng_js})
    return tensors, meta


def trim_log(path: Path, step: int) -> None:
    """Cut a JSONL log after the last record of `step` or before (records a killed run wrote
    after its last state), in place so that open appenders keep working."""
    if not path.is_file():
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break  # a half-written last line
            if not line.endswith(b"\n") or (isinstance(rec, dict) and rec.get("step", 0) > step):
                break
            keep += len(line)
    with open(path, "rb+") as f:
        f.truncate(keep)


class RunState:
    """Saves and restores everything a trainer needs to continue exactly, and counts bad steps."""

    def __init__(self, out: str | Path, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, *,
                 every: int, max_bad: int, ema: list[torch.Tensor] | None = None,
                 extra: dict[str, torch.Tensor] | None = None,
                 generators: dict[str, torch.Generator] | None = None,
                 randoms: dict[str, random.Random] | None = None,
                 info: Callable[[], dict] | None = None,
                 log_name: str = "train_log.jsonl", root: str = "state", write: bool = True):
        self.out, self.root = Path(out), Path(out) / root
        # write=False: a secondary process of a multi-process run (rank 0 writes the states; every
        # process resumes from them, so after a resume all ranks hold rank 0's RNG states)
        self.write = write
        self.params, self.opt, self.ema = params, opt, ema
        self.extra = extra or {}
        self.generators, self.randoms = generators or {}, randoms or {}
        # info(): JSON the trainer keeps in every state (counters, a scheduler's state); after
        # resume(), self.info holds the restored one
        self.info_fn, self.info = info, {}
        self.every, self.max_bad = every, max_bad
        self.log_path = self.out / log_name
        self.logger = None  # anything with .log(step, record); bad steps are logged there
        self.bad, self.saved = 0, None

    # ---- save / restore ----------------------------------------------------------
    def save(self, step: int, **info) -> Path:
        if not self.write:
            self.saved = step
            return self.root / f"step_{step:08d}"
        tensors = {f"param.{n}": p.detach() for n, p in self.params.items()}
        for i, e in enumerate(self.ema or []):
            tensors[f"ema.{i}"] = e
        tensors.update({f"extra.{n}": t for n, t in self.extra.items()})
        opt_t, opt_rest = optimizer_to_flat(self.opt)
        rng_t, rng_js = rng_state(self.generators, self.randoms)
        tensors.update(opt_t)
        tensors.update(rng_t)
        meta = {"opt": opt_rest, "rng": rng_js, "bad_in_a_row": self.bad, "data_position": step,
                "params": sorted(self.params), "info": self.info_fn() if self.info_fn else {}, **info}
        path = save_state(self.root, step, tensors, meta, keep=KEEP)
        self.saved = step
        return path

    def resume(self) -> int:
        """Restore the newest intact state (damaged ones are reported on stderr and skipped) and
        cut the log after it. -> its step, or 0 when there is none."""
        found = latest_state(self.root, log=lambda m: print(m, file=sys.stderr))
        if found is None:
            return 0
        step, tensors, meta = found
        where = self.root / f"step_{step:08d}"
        names = sorted(self.params)
        if meta.get("params") != names:
            theirs = set(meta.get("params") or [])
            diff = sorted(theirs ^ set(names))
            raise CheckpointError(f"{where} is from another model: its trainable tensors differ ({diff[:3]})")
        for n, p in self.params.items():
            t = tensors[f"param.{n}"]
            if t.shape != p.shape:
                raise CheckpointError(f"{where} is from another model: shape mismatch for {n}: "
                                      f"checkpoint {tuple(t.shape)}, model {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"])
            for i, e in enumerate(self.ema or []):
                e.copy_(tensors[f"ema.{i}"])
            for n, t in self.extra.items():
                t.copy_(tensors[f"extra.{n}"])
        optimizer_from_flat(self.opt, tensors, meta["opt"])
        restore_rng(tensors, meta["rng"], self.generators, self.randoms)
        self.bad, self.saved = int(meta["bad_in_a_row"]), step
        self.info = meta.get("info") or {}
        if self.write:
            trim_log(self.log_path, step)
        print(f"resuming from step {step} ({where})", file=sys.stderr)
        return step

    def step_done(self, step: int) -> None:
        """End of an iteration: a state every `every` steps."""
        if self.every and step % self.every == 0 and self.saved != step:
            self.save(step)

    def finish(self, step: int) -> None:
        """End of the run: a state of the last step (unless it is there already)."""
        if self.saved != step:
            self.save(step)

    # ---- numerical faults ----------------------------------------------------------
    def finite(self, step: int, what: str, values: torch.Tensor) -> bool:
        """True when every value is finite; else log, count and skip (see `skip`)."""
        bad = int((~torch.isfinite(values.detach())).sum())
        if bad == 0:
            return True
        self.skip(step, f"non-finite {what} ({bad} of {values.numel()} values NaN/Inf)")
        return False

    def update_ok(self, step: int, loss_finite: bool, grad_norm) -> bool:
        """Call before optimizer.step(): True to take it; False (logged) for a NaN/Inf loss or gradient."""
        if not loss_finite:
            self.skip(step, "non-finite loss")
            return False
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            self.skip(step, "non-finite gradient")
            return False
        self.bad = 0
        return True

    def skip(self, step: int, cause: str) -> None:
        """One skipped update: log it; after `max_bad` in a row save a state and stop."""
        self.bad += 1
        if self.logger is not None:
            self.logger.log(step, {"skipped": cause, "in_a_row": self.bad})
        print(f"step {step}: {cause}; update skipped ({self.bad} in a row)", file=sys.stderr)
        if self.bad >= self.max_bad:
            path = self.save(step, stopped=cause)
            raise NonFiniteError(f"stopped at step {step}: {self.bad} non-finite updates in a row "
                                 f"(last: {cause}); the last good weights are in {path}")
