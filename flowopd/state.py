"""Resumable training state: atomic, pickle-free checkpoints of a whole run.

A state is a folder ``OUT/state/step_XXXXXXXX`` holding ``tensors.safetensors``
(model, EMA, optimizer tensors, torch RNG) and ``state.json`` (step, data
position, optimizer hyper-parameters, python/numpy RNG states, and the size and
SHA-256 of the tensor file). It is written in a temporary folder, fsynced and
renamed into place; ``state.json`` goes last, so a folder without a valid one is
incomplete and never loaded. The previous state is deleted only after the new
one is complete. ``latest_state`` returns the newest state that verifies,
falling back to older ones when the newest is damaged (truncated by hand, say).

``fault_point`` is the test hook the resume tests kill processes with: a real
code path, inert unless the environment variable FLOWOPD_KILL_AT names the point.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fault_point(name: str, step: int) -> None:
    """Kill this process with SIGKILL here when FLOWOPD_KILL_AT lists ``name@step``.

    FLOWOPD_KILL_AT is a comma-separated list such as ``update@3,state.tensors@4``. The points:
    ``update`` (the trainers, right after the first optimizer step of an iteration),
    ``state.tensors`` (a state's tensor file written, its state.json not yet),
    ``state.json`` (both written, the folder not yet renamed into place),
    ``state.renamed`` (renamed into place, the older states not yet deleted).
    Inert (one dictionary lookup) when the variable is unset."""
    spec = os.environ.get("FLOWOPD_KILL_AT")
    if spec and f"{name}@{step}" in spec.replace(" ", "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict, dict]:
    """Optimizer state -> (tensors by flat key, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            key = f"{prefix}.{idx}.{name}"
            if torch.is_tensor(v):
                tensors[key] = v.detach().cpu().contiguous()
            else:
                scalars[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, rest: dict, prefix: str = "opt") -> None:
    state: dict = {}
    for key, v in list(tensors.items()) + list(rest["scalars"].items()):
        if not key.startswith(prefix + "."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def rng_state(generators: dict[str, torch.Generator] | None = None,
              randoms: dict[str, random.Random] | None = None) -> tuple[dict, dict]:
    """Torch (CPU, CUDA, named generators), numpy, python (global and named random.Random) RNG
    states -> (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    np_state = np.random.get_state()
    js = {"python": _jsonable(random.getstate()),
          "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
          "randoms": {name: _jsonable(r.getstate()) for name, r in (randoms or {}).items()}}
    return tensors, js


def restore_rng(tensors: dict, js: dict, generators: dict[str, torch.Generator] | None = None,
                randoms: dict[str, random.Random] | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, g in (generators or {}).items():
        g.set_state(tensors[f"rng.gen.{name}"])
    random.setstate(_tupled(js["python"]))
    for name, r in (randoms or {}).items():
        r.setstate(_tupled(js["randoms"][name]))
    st = js["numpy"]
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    return x


def _tupled(x):
    if isinstance(x, list):
        return tuple(_tupled(v) for v in x)
    return x


def save_state(root: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 1) -> Path:
    """Write state ``root/step_<step>`` atomically; keep the `keep` newest complete states."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tfile = tmp / "tensors.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tfile))
    with open(tfile, "rb+") as f:
        os.fsync(f.fileno())
    fault_point("state.tensors", step)
    info = {"step": step, "meta": meta, "tensors_bytes": tfile.stat().st_size, "tensors_sha256": _sha256(tfile)}
    jfile = tmp / "state.json"
    with open(jfile, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    fault_point("state.json", step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    fault_point("state.renamed", step)
    complete = sorted(p for p in root.glob("step_*") if verify_state(p) is None)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_state(path: Path) -> str | None:
    """None when the state folder is complete and intact, else why not."""
    j, t = path / "state.json", path / "tensors.safetensors"
    if not j.is_file() or not t.is_file():
        return "incomplete (missing files)"
    try:
        info = json.loads(j.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "state.json is damaged"
    if t.stat().st_size != info.get("tensors_bytes"):
        return f"tensors.safetensors is {t.stat().st_size} bytes, expected {info.get('tensors_bytes')} (truncated?)"
    if _sha256(t) != info.get("tensors_sha256"):
        return "tensors.safetensors does not match its checksum"
    return None


def latest_state(root: str | Path, log=None) -> tuple[int, dict, dict] | None:
    """(step, tensors, meta) of the newest intact state under root, or None.

    Damaged states are reported through `log` (a print-like callable) and skipped.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step_*"), reverse=True):
        why = verify_state(path)
        if why:
            if log:
                log(f"skipping damaged checkpoint {path}: {why}")
            continue
        info = json.loads((path / "state.json").read_text())
        try:
            tensors = load_file(str(path / "tensors.safetensors"))
        except Exception as e:  # noqa: BLE001 - any decode failure means damaged
            if log:
                log(f"skipping unreadable checkpoint {path}: {e}")
            continue
        return info["step"], tensors, info["meta"]
    return None


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside `final`; when the block succeeds, its files are fsynced and
    it is renamed to `final` (an older `final` is moved aside first and deleted after). A block that
    fails, or a process killed inside it, leaves `final` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = final.with_name(f".tmp_{final.name}"), final.with_name(f".old_{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(f)
    _fsync_dir(tmp)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out: str | Path, config: dict, overwrite: bool = False, name: str = "config.json") -> None:
    """Refuse an output folder holding another run's config unless overwrite."""
    out = Path(out)
    f = out / name
    if f.is_file() and not overwrite:
        try:
            prev = json.loads(f.read_text())
        except json.JSONDecodeError:
            prev = None
        if prev != config:
            raise UserError(f"{out} holds another run's config ({f}); use another --out or --overwrite")
