"""Runs that survive faults: kill -9 at named points and resume, damaged checkpoints, NaN/Inf
rewards, losses and gradients.

The GRPO tests run `python -m flowopd grpo` as real processes on a tiny model (a few seconds
each). FLOWOPD_KILL_AT (flowopd.state.fault_point, a real code path) makes a process SIGKILL
itself at a named point; NaN rewards come from tests/faulty_rewards.py, loaded by the reward
registry as `faulty_rewards:brightness`. The distill and cold-start tests run in-process and
interrupt the loop at the same named point with an exception.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd.config import build
from flowopd.state import verify_state
from flowopd.trainers import common, opd
from flowopd.trainers.checkpointing import NonFiniteError
from flowopd.trainers.coldstart import ColdStartConfig, coldstart, standin_teacher
from flowopd.trainers.grpo import GRPOConfig, train_grpo
from flowopd.trainers.opd import main_distill
from conftest import perturbed_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def flowopd(*args, env=None):
    """`python -m flowopd ARGS` in a fresh process running this checkout (and seeing tests/)."""
    e = {k: v for k, v in os.environ.items() if k not in ("FLOWOPD_KILL_AT", "FLOWOPD_TEST_NAN_CALLS")}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(TESTS), os.environ.get("PYTHONPATH")]))
    e["OMP_NUM_THREADS"] = "1"
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "flowopd", *args], capture_output=True, text=True, env=e)


def grpo_args(base, out, steps=4, **kw):
    """Tiny GRPO: 2 prompts x 2 samples, 3 SDE steps, 2 optimizer steps per iteration, EMA, a state
    every iteration."""
    d = dict(init=base, tasks="[quality]", reward="faulty_rewards:brightness", steps=steps, prompts_per_step=2,
             group_size=2, sample_steps=3, micro_batch=2, cfg=2.0, clip_range=0.5, lr=0.01, ema_decay=0.5,
             timestep_fraction=0.7, state_every=1)
    d.update(kw)
    return ["grpo", "--out", str(out), *[f"{k}={v}" for k, v in d.items()]]


def states(out):
    return sorted(p.name for p in (Path(out) / "state").glob("step_*"))


def state_tensors(out, step):
    return load_file(str(Path(out) / "state" / f"step_{step:08d}" / "tensors.safetensors"))


def assert_same_final(a, b, adapter):
    for f in ("model.safetensors", f"adapters/{adapter}.safetensors"):
        ta, tb = load_file(str(Path(a) / "final" / f)), load_file(str(Path(b) / "final" / f))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (f, k)


def log_of(out, name="train_log.jsonl"):
    return [json.loads(x) for x in (Path(out) / name).read_text().splitlines()]


def rewards_by_step(out):
    return [(r["step"], r["reward"]) for r in log_of(out) if "reward" in r]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return perturbed_tiny_checkpoint(tmp_path_factory.mktemp("faults") / "base")


@pytest.fixture(scope="module")
def ref(base, tmp_path_factory):
    """The uninterrupted 4-iteration GRPO run every resumed run must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = flowopd(*grpo_args(base, out))
    assert r.returncode == 0, r.stderr
    return out


# ----------------------------------------------------------------------------- kill -9 and resume


def test_grpo_killed_at_several_points_resumes_to_the_same_parameters(base, ref, tmp_path):
    out = tmp_path / "run"
    # 1. killed mid-update: iteration 2 made its first optimizer step (of two), nothing saved since 1
    r = flowopd(*grpo_args(base, out), env={"FLOWOPD_KILL_AT": "update@2"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert states(out) == ["step_00000001"] and not (out / "final").exists()
    assert verify_state(out / "state" / "step_00000001") is None
    # 2. resumes from 1, killed mid-save of state 3 (tensor file written, state.json not yet)
    r = flowopd(*grpo_args(base, out), env={"FLOWOPD_KILL_AT": "state.tensors@3"})
    assert r.returncode == -signal.SIGKILL and "resuming from step 1" in r.stderr
    half = out / "state" / ".tmp_step_00000003"
    assert (half / "tensors.safetensors").is_file() and not (half / "state.json").exists()
    assert states(out) == ["step_00000001", "step_00000002"]
    assert verify_state(out / "state" / "step_00000002") is None
    # 3. resumes from 2 (the half-written 3 is never loaded), killed once state 3 is in place and
    #    before the older states are pruned
    r = flowopd(*grpo_args(base, out), env={"FLOWOPD_KILL_AT": "state.renamed@3"})
    assert r.returncode == -signal.SIGKILL and "resuming from step 2" in r.stderr
    assert states(out) == ["step_00000001", "step_00000002", "step_00000003"]
    assert verify_state(out / "state" / "step_00000003") is None
    # 4. resumes from 3 and finishes: the same weights (merged and adapter) as the run that never stopped
    r = flowopd(*grpo_args(base, out))
    assert r.returncode == 0 and "resuming from step 3" in r.stderr, r.stderr
    assert states(out) == ["step_00000003", "step_00000004"]
    assert_same_final(out, ref, "quality")
    a, b = state_tensors(out, 4), state_tensors(ref, 4)  # weights, EMA, Adam moments, RNG states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log reads as one run's: each iteration once, the same rewards (the same prompts and noise)
    assert rewards_by_step(out) == rewards_by_step(ref)


def test_truncated_checkpoint_is_refused_and_the_previous_one_used(base, ref, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ref, out)  # a finished run: states 3 and 4; the newest is then cut in half by hand
    assert states(out) == ["step_00000003", "step_00000004"]
    t = out / "state" / "step_00000004" / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    r = flowopd(*grpo_args(base, out))
    assert r.returncode == 0, r.stderr
    assert "skipping damaged checkpoint" in r.stderr and "truncated" in r.stderr
    assert "resuming from step 3" in r.stderr
    assert_same_final(out, ref, "quality")  # iteration 4 redone from state 3


# ----------------------------------------------------------------------------- NaN / Inf


def test_nan_reward_skips_the_update_and_is_logged(base, tmp_path):
    out = tmp_path / "run"
    r = flowopd(*grpo_args(base, out, steps=2), env={"FLOWOPD_TEST_NAN_CALLS": "2"})
    assert r.returncode == 0, r.stderr
    log = log_of(out)
    assert [x for x in log if "skipped" in x] == [
        {"step": 2, "skipped": "non-finite reward (1 of 4 values NaN/Inf)", "in_a_row": 1}]
    assert [x["step"] for x in log if "reward" in x] == [1]
    # iteration 2 changed nothing: weights, EMA and Adam moments of states 1 and 2 are equal
    s1, s2 = state_tensors(out, 1), state_tensors(out, 2)
    for k in s1:
        if not k.startswith("rng."):
            assert torch.equal(s1[k], s2[k]), k


def test_a_stream_of_nan_rewards_stops_cleanly_with_the_last_good_state(base, tmp_path):
    out = tmp_path / "run"
    r = flowopd(*grpo_args(base, out, steps=6, max_bad_steps=3), env={"FLOWOPD_TEST_NAN_CALLS": "2-"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("flowopd grpo: error: stopped at step 4: 3 non-finite updates in a row "
                           "(last: non-finite reward"), last
    assert str(out / "state" / "step_00000004") in last
    assert [(x["step"], x["in_a_row"]) for x in log_of(out) if "skipped" in x] == [(2, 1), (3, 2), (4, 3)]
    assert not (out / "final").exists()
    # the saved state is complete and holds the weights of the last good update (iteration 1)
    assert verify_state(out / "state" / "step_00000004") is None
    meta = json.loads((out / "state" / "step_00000004" / "state.json").read_text())["meta"]
    assert meta["stopped"].startswith("non-finite reward") and meta["bad_in_a_row"] == 3
    s3, s4 = state_tensors(out, 3), state_tensors(out, 4)
    assert all(torch.equal(s3[k], s4[k]) for k in s3 if k.startswith(("param.", "ema.", "opt.")))


def test_nan_loss_and_nan_gradient_skip_only_their_update(base, tmp_path, monkeypatch):
    """In-process: the first loss of iteration 1 is NaN (its update is skipped), then all the
    gradients of the first update of iteration 2 (skipped too); the other updates go through."""
    import flowopd.trainers.grpo as grpo

    calls = {"loss": 0, "clip": 0}
    real_loss, real_clip = grpo.grpo_loss, torch.nn.utils.clip_grad_norm_

    def nan_loss(*a, **k):
        calls["loss"] += 1
        loss, st = real_loss(*a, **k)
        return (loss * float("nan") if calls["loss"] == 1 else loss), st

    def nan_grad(params, max_norm):
        calls["clip"] += 1
        if calls["clip"] == 3:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
        return real_clip(params, max_norm)

    monkeypatch.setattr(grpo, "grpo_loss", nan_loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_grad)
    cfg = build(GRPOConfig, dict(init=str(base), tasks=["quality"], reward="faulty_rewards:brightness", steps=2,
                                 prompts_per_step=2, group_size=2, sample_steps=3, micro_batch=2, cfg=2.0,
                                 clip_range=0.5, lr=0.01))
    final = train_grpo(cfg, tmp_path / "run")
    log = log_of(tmp_path / "run")
    assert [x for x in log if "skipped" in x] == [{"step": 1, "skipped": "non-finite loss", "in_a_row": 1},
                                                  {"step": 2, "skipped": "non-finite gradient", "in_a_row": 1}]
    assert [x["opt_steps"] for x in log if "opt_steps" in x] == [1, 1]
    assert all(torch.isfinite(v).all() for v in load_file(str(final / "model.safetensors")).values())
    # a stream of them stops the run
    calls["clip"] = -100
    monkeypatch.setattr(grpo, "grpo_loss", lambda *a, **k: (lambda l, s: (l * float("nan"), s))(*real_loss(*a, **k)))
    with pytest.raises(NonFiniteError, match="2 non-finite updates in a row .last: non-finite loss"):
        train_grpo(build(GRPOConfig, {**vars(cfg), "max_bad_steps": 2}), tmp_path / "run2")
    assert states(tmp_path / "run2") == ["step_00000001"]


# ----------------------------------------------------------------------------- distill and cold start


class Killed(BaseException):
    """Stands in for SIGKILL in-process (nothing in the trainers catches a BaseException)."""


def kill_at(point, step):
    def fault_point(name, s):
        if (name, s) == (point, step):
            raise Killed(f"{name}@{s}")

    return fault_point


@pytest.fixture(scope="module")
def teachers(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {t: str(standin_teacher(root / t, t, base, rank=2, scale=0.1, seed=k))
            for k, t in enumerate(["compose", "text", "quality"])}


def test_distill_interrupted_mid_update_resumes_exactly(base, teachers, tmp_path, monkeypatch, capsys):
    """pg rule with soft routing: the reward scaler's running moments are part of the state."""
    over = [f"teachers.{t}={p}" for t, p in teachers.items()] + [
        f"base={base}", "steps=3", "prompts_per_step=3", "group_size=2", "sample_steps=3", "micro_batch=3",
        "timestep_fraction=0.7", "inner_epochs=2", "cfg=2.0", "lr=0.01", "rule=pg", "routing=soft"]
    main_distill(None, tmp_path / "ref", over)
    with monkeypatch.context() as m:
        m.setattr(common, "fault_point", kill_at("update", 2))
        with pytest.raises(Killed):
            main_distill(None, tmp_path / "run", over)
    assert states(tmp_path / "run") == ["step_00000001"]
    capsys.readouterr()
    main_distill(None, tmp_path / "run", over)
    assert "resuming from step 1" in capsys.readouterr().err
    assert_same_final(tmp_path / "run", tmp_path / "ref", "student")
    a, b = state_tensors(tmp_path / "run", 3), state_tensors(tmp_path / "ref", 3)
    assert any(k.startswith("extra.scaler.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_coldstart_sft_interrupted_resumes_exactly_from_its_kept_samples(base, teachers, tmp_path, monkeypatch,
                                                                          capsys):
    from flowopd.trainers import coldstart as cs

    cfg = ColdStartConfig(base=str(base), sft_prompts_per_task=2, sft_candidates=2, sft_sample_steps=3, sft_steps=6,
                          sft_batch=3, state_every=2)
    coldstart("sft", teachers, tmp_path / "ref", cfg)
    with monkeypatch.context() as m:
        m.setattr(common, "fault_point", kill_at("update", 5))
        with pytest.raises(Killed):
            coldstart("sft", teachers, tmp_path / "run", cfg)
    assert states(tmp_path / "run") == ["step_00000002", "step_00000004"]
    capsys.readouterr()
    with monkeypatch.context() as m:  # the teachers' samples are read back, not drawn again
        m.setattr(cs, "best_samples", lambda *a, **k: pytest.fail("best samples drawn again"))
        coldstart("sft", teachers, tmp_path / "run", cfg)
    assert "resuming from step 4" in capsys.readouterr().err
    for f in ("model.safetensors", "adapters/sft.safetensors"):
        a, b = load_file(str(tmp_path / "run" / f)), load_file(str(tmp_path / "ref" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert [r["step"] for r in log_of(tmp_path / "run", "sft_log.jsonl")] == [1]  # steps 1, 10, 20...: one log


def test_coldstart_sft_nan_loss_is_skipped_and_a_stream_stops(base, teachers, tmp_path, monkeypatch):
    import flowopd.losses
    import flowopd.trainers.coldstart

    real = flowopd.losses.flow_matching_loss
    calls = {"n": 0, "from": 2, "to": 2}

    def nan_at(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["from"] <= calls["n"] <= calls["to"] else loss

    monkeypatch.setattr(flowopd.trainers.coldstart, "flow_matching_loss", nan_at)
    cfg = ColdStartConfig(base=str(base), sft_prompts_per_task=2, sft_candidates=2, sft_sample_steps=3, sft_steps=3,
                          sft_batch=3, max_bad_steps=2)
    coldstart("sft", teachers, tmp_path / "run", cfg)
    assert [r for r in log_of(tmp_path / "run", "sft_log.jsonl") if "skipped" in r] == [
        {"step": 2, "skipped": "non-finite loss", "in_a_row": 1}]
    calls.update(n=0, to=10**9)
    with pytest.raises(NonFiniteError, match="stopped at step 3: 2 non-finite updates"):
        coldstart("sft", teachers, tmp_path / "run2", cfg)
    assert states(tmp_path / "run2") == ["step_00000003"]


def test_pipeline_stage_killed_mid_training_resumes_from_its_state(tmp_path, monkeypatch, capsys):
    """`flowopd run` (quick preset, shipped base): the teacher-quality stage is interrupted in its
    second iteration; running the stage again continues from the state of iteration 1 and
    publishes the same teacher as a stage that never stopped."""
    import flowopd.trainers.grpo as grpo
    from flowopd.pipeline import Pipeline, RunConfig

    def stage(out):
        p = Pipeline(out, "quick", RunConfig())
        p.s_base()
        p.s_teacher("quality")
        return out / "checkpoints" / "teacher-quality"

    ref = stage(tmp_path / "ref")
    with monkeypatch.context() as m:
        m.setattr(common, "fault_point", kill_at("update", 2))
        with pytest.raises(Killed):
            stage(tmp_path / "run")
    assert states(tmp_path / "run" / "work" / "teacher-quality") == ["step_00000001"]
    capsys.readouterr()
    got = stage(tmp_path / "run")
    assert "resuming from step 1" in capsys.readouterr().err
    assert not (got / "state").exists()  # states stay in the work folder
    for f in ("model.safetensors", "adapters/quality.safetensors"):
        a, b = load_file(str(got / f)), load_file(str(ref / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
