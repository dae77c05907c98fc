"""The SD3.5-M presets compute the authors' objective (issue 13), on tiny SD3 pipelines, offline.

Known answers: the OPD trainer's first update under configs/sd35m_opd.yaml (model swapped for a tiny
SD3 pipeline, sizes shrunk) has the loss of the Flow-OPD authors' kl_only formula
(CostaliyA/Flow-OPD scripts/train_sd3_opd_mix.py) computed here by hand from the same states and
the same adapters' velocities; runs that leave `shift` unset sample (and evaluate) on their
scheduler's own grid; evaluation during training uses the EMA; the authors' factor-average merge;
a MAR anchor that is any LoRA; the authors' mixed / task_only modes and their zero-advantage drop;
the SFT cold start; the GRPO-Mix preset's alternating turns and mixed rewards; the DeQA-Score and
UnifiedReward clients against a stand-in server on loopback; the optional wandb logger.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowopd.backends.sd3 import SD3Backend  # noqa: E402
from flowopd.config import build  # noqa: E402
from flowopd.trainers import opd as OPD  # noqa: E402
from flowopd.trainers.grpo import GRPOConfig, train_grpo  # noqa: E402
from flowopd.trainers.opd import OPDConfig, load_config, train_opd  # noqa: E402
from sd3_tiny import tiny_sd3_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(resolution=32, max_sequence_length=16, dtype="fp32", device="cpu")
REWARD_MODULE = '''
import numpy as np


def brightness(images, prompts, metadata=None):
    return np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3)) / 255.0


def const(images, prompts, metadata=None):
    return np.full(len(images), 0.5, dtype=np.float32)


def one(images, prompts, metadata=None):
    return np.ones(len(images), dtype=np.float32)
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD3 pipeline (scheduler shift 3.0) and one whose scheduler has shift 2.0, two LoRA
    teachers (rank 4, random factors), a prompt file of two tasks, a reward module."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    d = tmp_path_factory.mktemp("sd35")
    b = tiny_sd3_backend(0)
    b.pipe.save_pretrained(str(d / "model"))
    b.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    b.pipe.save_pretrained(str(d / "model_shift2"))
    for k, name in enumerate(("ocr", "pickscore")):
        t = SD3Backend.from_pretrained(d / "model", dtype="fp32", resolution=32, max_sequence_length=16)
        torch.manual_seed(10 + k)
        t.add_adapter(name, rank=4, alpha=4, init=False)
        t.save_lora(name, d / f"teacher_{name}")
    lines = [('A sign that says "HI"', "ocr"), ('A poster that says "OK 42"', "ocr"), ("a cat on a sofa", "pickscore"),
             ("a red bicycle", "pickscore")]
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p, "task": t}) for p, t in lines))
    (d / "ocr").mkdir()
    (d / "ocr" / "train.txt").write_text('A sign that says "HI"\nA poster that says "OK 42"\n')
    (d / "ocr" / "test.txt").write_text('A sign that says "TEST"\n')
    (d / "dt_reward_sd35.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


def _opd_cfg(world, **changes) -> OPDConfig:
    c = yaml.safe_load((ROOT / "configs" / "sd35m_opd.yaml").read_text())
    c.update(TINY)
    c.update(model=str(world / "model"), tasks=["ocr", "pickscore"], prompts=str(world / "prompts.jsonl"),
             task_shares={"ocr": 1, "pickscore": 1},
             task_rewards={"ocr": "dt_reward_sd35:brightness", "pickscore": "dt_reward_sd35:brightness"},
             teachers={"ocr": str(world / "teacher_ocr"), "pickscore": str(world / "teacher_pickscore")},
             steps=1, prompts_per_step=2, group_size=2, sample_steps=2, micro_batch=4, grad_accum=1,
             timestep_fraction=0.5, eval_every=0, state_every=0)
    c.update(changes)
    return build(OPDConfig, c)


def test_sd35m_opd_preset_is_the_authors_kl_only_recipe():
    cfg = load_config(ROOT / "configs" / "sd35m_opd.yaml", ["model=x"])
    assert (cfg.rule, cfg.kl_scale, cfg.kl_norm, cfg.adv_clip, cfg.clip_range) == ("kl_only", -1.0, "none", 5.0, 1e-4)
    assert (cfg.step_weighting, cfg.kl_normalization, cfg.beta, cfg.anchor) == ("kl", "flow_grpo", 0.04, "base")
    assert cfg.shift is None and cfg.step_selection == "first" and cfg.drop_zero_adv and cfg.merge == "delta_average"
    assert cfg.task_schedule == "alternate" and cfg.task_shares == {"geneval": 3, "ocr": 1, "pickscore": 1}


def _sde_mean_by_hand(x, v, s, s_next, s_max, a):
    """Flow-GRPO's sde_step_with_logprob (DESIGN.md section 2), written out: (mean, std_dev_t, dt)."""
    dt = s_next - s
    std_dev_t = a * (s / (1 - (s_max if s == 1 else s))) ** 0.5
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_dev_t, dt


def test_opd_first_update_is_the_authors_kl_only_loss(world, tmp_path, monkeypatch):
    """The trainer's first update under sd35m_opd.yaml: loss == mean(max(-A r, -A clip(r))) + beta *
    mean KL_anchor, A = clamp(kl_scale * KL_teacher, +-5), KL = mean((mu_s - mu_t)^2) / (2 std_t^2),
    every mean computed here from the rollout's states and each adapter's guided velocity."""
    cfg = _opd_cfg(world)
    seen = {}
    real_rollout, real_transition, real_step_loss = OPD.rollout_batch, OPD.transition, OPD.opd_step_loss
    real_setup = OPD.setup_models

    def setup(*a, **k):
        seen["models"] = real_setup(*a, **k)
        return seen["models"]

    def rollout(*a, **k):
        seen["ro"] = real_rollout(*a, **k)
        return seen["ro"]

    def transition(backend, ro, idx, j, *a, **k):
        seen["last"] = (idx, j)
        return real_transition(backend, ro, idx, j, *a, **k)

    def step_loss(*a, **k):
        if "expected" not in seen:
            seen["expected"] = by_hand(*seen["last"])
        return real_step_loss(*a, **k)

    @torch.no_grad()
    def by_hand(idx, j):
        backend, _, names, _, _ = seen["models"]
        ro = seen["ro"]
        g, a, beta, eps = cfg.cfg, cfg.noise_level, cfg.beta, cfg.clip_range
        x, x_next = ro.xs[idx, j], ro.xs[idx, j + 1]
        s, s_next, s_max = float(ro.sigmas[j]), float(ro.sigmas[j + 1]), float(ro.sigmas[1])
        prompts = [ro.prompts[i] for i in idx.tolist()]
        cond, uncond = backend.encode_prompts(prompts), backend.encode_prompts([None] * len(prompts))

        def mean_of(adapter):
            with backend.adapter(adapter):
                vc = backend.velocity(x, torch.full((len(idx),), s), cond)
                vu = backend.velocity(x, torch.full((len(idx),), s), uncond)
            return _sde_mean_by_hand(x, vu + g * (vc - vu), s, s_next, s_max, a)

        mu_s, std_t, dt = mean_of("student")
        mu_base, _, _ = mean_of(None)
        mu_t = torch.stack([mean_of(ro.tasks[i])[0][k] for k, i in enumerate(idx.tolist())])
        log_prob = torch.distributions.Normal(mu_s, std_t * (-dt) ** 0.5).log_prob(x_next).mean(dim=(1, 2, 3))
        kl_reward = ((mu_s - mu_t) ** 2).mean(dim=(1, 2, 3)) / (2 * std_t**2)
        adv = torch.clamp(cfg.kl_scale * kl_reward, -cfg.adv_clip, cfg.adv_clip)
        ratio = torch.exp(log_prob - ro.log_probs[idx, j])
        policy = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)))
        kl_loss = torch.mean(((mu_s - mu_base) ** 2).mean(dim=(1, 2, 3)) / (2 * std_t**2))
        return {"loss": float(policy + beta * kl_loss), "ratio": ratio, "kl": kl_reward, "j": j}

    monkeypatch.setattr(OPD, "setup_models", setup)
    monkeypatch.setattr(OPD, "rollout_batch", rollout)
    monkeypatch.setattr(OPD, "transition", transition)
    monkeypatch.setattr(OPD, "opd_step_loss", step_loss)
    train_opd(cfg, tmp_path / "opd")

    log = [json.loads(x) for x in (tmp_path / "opd" / "train_log.jsonl").read_text().splitlines()]
    rec = log[1]
    want = seen["expected"]
    assert want["j"] == 0  # step_selection first: round(0.5 * 2) = 1 step, the first (sigma = 1)
    assert torch.allclose(want["ratio"], torch.ones(4), atol=1e-5)  # before any update
    assert want["kl"].min() > 0  # the merged student differs from each teacher
    assert set(seen["ro"].tasks) == {"ocr"}  # task_schedule alternate: the first turn is the first task's
    assert rec["opt_steps"] == 1 and rec["kept"] == 1.0
    assert rec["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-7)
    # and the grid is the scheduler's (shift unset in the preset: the tiny pipeline's scheduler, shift 3.0)
    assert _scheduler_sigmas(world / "model", 2) == pytest.approx(seen["ro"].sigmas.tolist(), abs=1e-6)
    assert yaml.safe_load((tmp_path / "opd" / "config.yaml").read_text())["shift"] == 3.0


def _scheduler_sigmas(model_dir, n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    sched.set_timesteps(n)
    return sched.sigmas.tolist()


@pytest.mark.parametrize("trainer", ["grpo", "opd"])
def test_runs_without_shift_sample_on_their_schedulers_grid(world, tmp_path, monkeypatch, trainer):
    """A pipeline whose scheduler has shift 2.0: rollouts (2 steps) and evaluation (3 steps, the
    ODE) use exactly the scheduler's sigmas when the config leaves shift unset."""
    import flowopd.flow as F
    import flowopd.trainers.common as C
    from flowopd.trainers import common

    grids = {"roll": [], "eval": []}
    real_rollout, real_ode = common.rollout_batch if trainer == "grpo" else OPD.rollout_batch, F.ode_sample

    def rollout(*a, **k):
        ro = real_rollout(*a, **k)
        grids["roll"].append(ro.sigmas.tolist())
        return ro

    def ode(v, x, sigmas, *a, **k):
        grids["eval"].append(sigmas.tolist())
        return real_ode(v, x, sigmas, *a, **k)

    monkeypatch.setattr(F, "ode_sample", ode)
    monkeypatch.setattr(C, "ode_sample", ode)  # the Evaluator's
    model = str(world / "model_shift2")
    if trainer == "grpo":
        import flowopd.trainers.grpo as G

        monkeypatch.setattr(G, "rollout_batch", rollout)
        c = yaml.safe_load((ROOT / "configs" / "sd35m_grpo_ocr.yaml").read_text())
        c.update(TINY)
        c.update(model=model, prompts={"ocr": str(world / "ocr")}, reward="dt_reward_sd35:brightness", steps=1,
                 prompts_per_step=2, group_size=2, sample_steps=2, micro_batch=4, grad_accum=1, eval_every=1,
                 eval_steps=3, eval_prompts=1, state_every=0)
        c.pop("shift", None)
        train_grpo(build(GRPOConfig, c), tmp_path / "run")
    else:
        monkeypatch.setattr(OPD, "rollout_batch", rollout)
        train_opd(_opd_cfg(world, model=model, eval_every=1, eval_steps=3, eval_prompts=1), tmp_path / "run")
    assert grids["roll"] and grids["eval"]
    for g in grids["roll"]:
        assert g == pytest.approx(_scheduler_sigmas(model, 2), abs=1e-6)
    for g in grids["eval"]:
        assert g == pytest.approx(_scheduler_sigmas(model, 3), abs=1e-6)
    assert _scheduler_sigmas(model, 2) != pytest.approx(_scheduler_sigmas(world / "model", 2), abs=1e-3)


def test_evaluation_during_training_uses_the_ema():
    """Evaluator with an EMA samples with the EMA weights and puts the live ones back."""
    from flowopd.parallel import Dist
    from flowopd.prompt_sources import PromptSources
    from flowopd.trainers.common import EMA, Evaluator

    b = tiny_sd3_backend(0)
    b.add_adapter("s", rank=2, alpha=2, trainable=True)
    params = b.trainable_parameters()
    ema = EMA(params, 0.9)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # live weights differ from the EMA's
    live = [p.detach().clone() for p in params]
    seen = []

    def reward(images, prompts, meta):
        seen.append([p.detach().clone() for p in params])
        return torch.zeros(len(prompts))

    src = PromptSources(["x"], {"x": _prompt_file()})
    cfg = build(GRPOConfig, {"backend": "sd3", "model": "m", "tasks": ["x"], "prompts": {"x": _prompt_file()},
                             "eval_steps": 2, "eval_prompts": 1})
    Evaluator(b, src, reward, cfg, Dist.create("cpu"), 3.0, 2, ema)()
    assert all(torch.equal(a, e) for a, e in zip(seen[0], ema.shadow))
    assert all(torch.equal(p, v) for p, v in zip(params, live))


def _prompt_file():
    import tempfile

    d = Path(tempfile.mkdtemp())
    (d / "train.txt").write_text("a cat\n")
    (d / "test.txt").write_text("a dog\n")
    return str(d)


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_factor_average_merge_is_the_mean_of_the_factors_not_of_the_deltas(world, tmp_path):
    from flowopd.trainers.coldstart import lora_delta
    from flowopd.trainers.sd3_teachers import merge_teachers

    b = SD3Backend.from_pretrained(world / "model", dtype="fp32", resolution=32, max_sequence_length=16)
    for n in ("ocr", "pickscore"):
        b.load_lora(n, world / f"teacher_{n}")
    f = {n: b.read_lora(n)[0] for n in ("ocr", "pickscore")}
    lora, rank, alpha, _ = merge_teachers(b, ["ocr", "pickscore"], mode="factor_average")
    m = "transformer_blocks.0.attn.to_q"
    (A1, B1), (A2, B2) = f["ocr"][m], f["pickscore"][m]
    assert (rank, alpha) == (4, 4.0)
    assert torch.allclose(lora[m][0], (A1 + A2) / 2) and torch.allclose(lora[m][1], (B1 + B2) / 2)
    exact, *_ = merge_teachers(b, ["ocr", "pickscore"])
    mean_delta = (lora_delta(A1, B1, 1.0) + lora_delta(A2, B2, 1.0)) / 2
    assert torch.allclose(lora_delta(*exact[m], 1.0), mean_delta, atol=1e-6)
    assert not torch.allclose(lora_delta(*lora[m], 1.0), mean_delta, atol=1e-4)  # the cross terms
    # through the trainer: the cold start written is that rank-4 LoRA
    train_opd(_opd_cfg(world, merge="factor_average", steps=1), tmp_path / "fa")
    assert _log(tmp_path / "fa")[0]["student_rank"] == 4


def test_mar_anchor_can_be_any_lora(world, tmp_path):
    """anchor: lora at the OCR teacher's weights: no third teacher (no reward, not merged), and its
    per-step KL to the student equals the OCR teacher's on the OCR samples."""
    out = tmp_path / "anchor"
    train_opd(_opd_cfg(world, anchor="lora", anchor_lora=str(world / "teacher_ocr"), task_schedule="mixed"), out)
    log = _log(out)
    assert log[0]["teachers"] == {"ocr": "lora", "pickscore": "lora"} and log[0]["student_rank"] == 8
    assert log[1]["kl_anchor/ocr"] == pytest.approx(log[1]["kl_teacher/ocr"], rel=1e-5)
    assert log[1]["kl_anchor/pickscore"] != pytest.approx(log[1]["kl_teacher/pickscore"], rel=1e-3)


@pytest.mark.parametrize("rule", ["mixed", "task_only"])
def test_authors_task_modes_train_and_drop_zero_advantage_groups(world, tmp_path, rule):
    out = tmp_path / rule
    train_opd(_opd_cfg(world, rule=rule, kl_norm="per_sample"), out)
    rec = _log(out)[1]
    assert rec["opt_steps"] == 1 and rec["kept"] == 1.0 and rec["task_adv_abs"] > 0 and rec["zero_std_ratio"] == 0.0
    assert rec["loss"] != 0.0
    # a reward equal on every sample: every group has zero std, every sample is dropped, no loss
    flat = tmp_path / (rule + "_flat")
    train_opd(_opd_cfg(world, rule=rule, task_rewards={"ocr": "dt_reward_sd35:const", "pickscore": "dt_reward_sd35:const"}),
              flat)
    rec = _log(flat)[1]
    assert rec["kept"] == 0.0 and rec["zero_std_ratio"] == 1.0 and rec["loss"] == 0.0


def test_wandb_is_an_optional_logger(tmp_path, monkeypatch):
    """wandb: PROJECT logs the scalar records to a wandb run (a stand-in module here, nothing sent);
    without the package the config is refused with the extra to install."""
    import types

    from flowopd.config import ConfigError
    from flowopd.trainers.runlog import RunLogger

    calls = []

    class Run:
        def log(self, rec, step):
            calls.append(("log", rec, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    lg = RunLogger(tmp_path, tensorboard=False, wandb="flowopd-test", config={"lr": 1e-4})
    lg.log(3, {"loss": 0.5, "teachers": {"a": "lora"}, "ok": True})
    lg.close()
    assert calls[0] == ("init", {"project": "flowopd-test", "name": tmp_path.name, "dir": str(tmp_path),
                                 "config": {"lr": 1e-4}})
    assert calls[1:] == [("log", {"loss": 0.5}, 3), ("finish",)]
    assert json.loads((tmp_path / "train_log.jsonl").read_text())["loss"] == 0.5
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="flowopd\\[wandb\\]"):
        RunLogger(tmp_path / "x", wandb="p")
    assert build(GRPOConfig, {"wandb": "proj"}).wandb == "proj"


def test_sd35m_grpo_mix_preset_alternates_tasks_and_mixes_rewards(world, tmp_path):
    """The authors' GRPO-Mix: one task per iteration in turns of task_shares iterations, each task's
    reward a weighted sum (here 0.8 * 0.5 + 0.2 * 1 = 0.6 on every sample)."""
    from flowopd.config import load

    cfg = load(GRPOConfig, ROOT / "configs" / "sd35m_grpo_mix.yaml", ["model=x"])
    assert (cfg.task_schedule, cfg.task_shares, cfg.adv_groups, cfg.kl_beta, cfg.lr) == (
        "alternate", {"geneval": 3, "ocr": 1, "pickscore": 1}, "prompt", 0.04, 1e-4)
    assert cfg.task_rewards["ocr"] == {"ocr": 0.8, "deqa": 0.2} and cfg.shift is None
    c = yaml.safe_load((ROOT / "configs" / "sd35m_grpo_mix.yaml").read_text())
    c.update(TINY)
    mix = {"dt_reward_sd35:const": 0.8, "dt_reward_sd35:one": 0.2}
    c.update(model=str(world / "model"), tasks=["ocr", "pickscore"], prompts=str(world / "prompts.jsonl"),
             task_shares={"ocr": 2, "pickscore": 1}, task_rewards={"ocr": mix, "pickscore": mix}, steps=4,
             prompts_per_step=2, group_size=2, sample_steps=2, micro_batch=4, grad_accum=1, eval_every=0, state_every=0)
    train_grpo(build(GRPOConfig, c), tmp_path / "mix")
    log = _log(tmp_path / "mix")
    assert [[k.split("/")[1] for k in r if k.startswith("reward/")] for r in log] == [["ocr"], ["ocr"], ["pickscore"], ["ocr"]]
    assert all(r["reward"] == pytest.approx(0.6) and r["zero_std_ratio"] == 1.0 for r in log)
    with pytest.raises(Exception, match="whole-number"):
        build(GRPOConfig, dict(c, task_shares={"ocr": 1.5, "pickscore": 1}))


class _ScoreServer:
    """A stand-in reward server on 127.0.0.1 (the authors' pickle protocol): answers
    {"outputs": [score(request, i)]}, fails the first `fail` requests with a 500, records what it
    got; serves from a thread for at most `seconds`, then stops by itself."""

    def __init__(self, score, fail=0, seconds=30.0):
        import http.server
        import pickle
        import threading
        import time

        owner = self
        self.seen, self.fail = [], fail

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.seen.append(data)
                if owner.fail > 0:
                    owner.fail -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                body = pickle.dumps({"outputs": [score(data, i) for i in range(len(data["images"]))]})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.2
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._stop, deadline = False, time.time() + seconds

        def serve():
            while not self._stop and time.time() < deadline:
                self.server.handle_request()
            self.server.server_close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join(timeout=5)


def test_deqa_and_unifiedreward_clients_speak_the_authors_server_protocol(monkeypatch):
    import numpy as np

    from flowopd.rewards import get_reward
    from flowopd.rewards import sd3_rewards as R

    images = np.zeros((5, 16, 16, 3), np.uint8)
    images[:, :, :, 0] = np.arange(5)[:, None, None] * 50
    with _ScoreServer(lambda d, i: 1.0 + i + 0.5 * ("prompts" in d), fail=1) as srv:
        r = R.make_deqa_reward(url=srv.url, batch_size=3, backoff=0.01)(images, ["p"] * 5)
        assert r.tolist() == [1.0, 2.0, 3.0, 1.0, 2.0]  # two batches (3 + 2), the first retried after a 500
        assert len(srv.seen) == 3 and set(srv.seen[-1]) == {"images"}
        assert all(img[:2] == b"\xff\xd8" for img in srv.seen[-1]["images"])  # JPEG
        prompts = [f"prompt {i}" for i in range(5)]
        u = R.make_unifiedreward_reward(url=srv.url, batch_size=4, backoff=0.01)(images, prompts)
        assert u.tolist() == [1.5, 2.5, 3.5, 4.5, 1.5]
        assert srv.seen[-2]["prompts"] == prompts[:4] and srv.seen[-1]["prompts"] == prompts[4:]
        monkeypatch.setenv("FLOWOPD_DEQA_URL", srv.url)  # the registry's lazy factory reads the URL
        assert get_reward("deqa")(images[:2], ["a", "b"]).tolist() == [1.0, 2.0]
        srv.fail = 10
        with pytest.raises(R.RewardServerError):
            R.make_deqa_reward(url=srv.url, retries=1, backoff=0.01)(images[:1], ["x"])
    with _ScoreServer(lambda d, i: 1.0) as srv:  # an answer of the wrong length is refused
        srv_bad = R.make_deqa_reward(url=srv.url)
        with pytest.raises(R.RewardServerError, match="returned"):
            R.server_scores(srv.url, images[:2], lambda lo, hi, j: {"images": j[:1]}, "outputs")
        assert srv_bad(images[:1], ["x"]).tolist() == [1.0]
    assert R.DEQA_URL.startswith("http://127.0.0.1") and R.UNIFIEDREWARD_URL.startswith("http://127.0.0.1")


def test_sft_cold_start_on_sd3(world, tmp_path):
    """init: sft on SD3: each teacher's best-of-2 samples, a student LoRA fit to them by flow matching
    (its training loss falls), saved to out/coldstart and trained on; a rerun on the same --out reuses it."""

    sft = {"sft_prompts_per_task": 2, "sft_candidates": 2, "sft_sample_steps": 2, "sft_steps": 40, "sft_batch": 4,
           "sft_lr": 1e-2, "sft_rank": 4}
    out = tmp_path / "sft"
    train_opd(_opd_cfg(world, init="sft", coldstart=sft, task_schedule="mixed"), out)
    log = _log(out)
    data = log[0]["sft"]
    for t in ("ocr", "pickscore"):
        assert data[t]["reward_best"] >= data[t]["reward_mean"] > 0
    assert data["sft_fm_after"] < data["sft_fm_before"]  # on the data, at fixed noises and levels
    assert log[0]["coldstart"] == str(out / "coldstart") and log[1]["opt_steps"] == 1
    conf = json.loads((out / "coldstart" / "config.json").read_text())
    assert conf["meta"]["method"] == "sft" and conf["adapters"]["student"]["rank"] == 4
    b = SD3Backend.from_pretrained(world / "model", dtype="fp32", resolution=32, max_sequence_length=16)
    b.load_lora("cold", out / "coldstart" / "adapters" / "student")
    lora = b.read_lora("cold")[0]
    assert any(B.abs().max() > 0 for _, B in lora.values())  # trained away from the gaussian init (B = 0)
    # the run state is there: the same command resumes and reuses the cold start
    before = (out / "coldstart" / "adapters" / "student" / "pytorch_lora_weights.safetensors").read_bytes()
    train_opd(_opd_cfg(world, init="sft", coldstart=sft, task_schedule="mixed", steps=2), out)
    assert (out / "coldstart" / "adapters" / "student" / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert _log(out)[-1]["step"] == 2


def test_backend_keys_left_unset_take_the_models_values(world):
    """resolution, eval_steps, shift (and cfg, eval_cfg where used) null: the pipeline's own values."""
    from flowopd.backends import make_backend
    from flowopd.trainers.common import resolve_backend_keys

    cfg = build(GRPOConfig, {"backend": "sd3", "model": str(world / "model_shift2"), "tasks": ["ocr"],
                             "prompts": {"ocr": str(world / "ocr")}, "dtype": "fp32", "max_sequence_length": 16})
    assert (cfg.resolution, cfg.shift, cfg.eval_steps, cfg.cfg, cfg.eval_cfg) == (None, None, None, None, None)
    b = make_backend(cfg)
    tr, vae = b.transformer.config, b.vae.config
    assert b.resolution == tr.sample_size * 2 ** (len(vae.block_out_channels) - 1)  # the pipeline's default size
    r = resolve_backend_keys(cfg, b)
    assert (r.shift, r.eval_steps) == (2.0, 40) and cfg.shift is None  # the scheduler's shift; a copy
    # the tiny toy checkpoint: shift 1.0 and 40 steps, the values the toy configs always ran with
    toy = resolve_backend_keys(build(GRPOConfig, {}), make_backend(build(GRPOConfig, {})))
    assert (toy.shift, toy.eval_steps) == (1.0, 40)


def test_authors_keys_are_checked():
    from flowopd.config import ConfigError

    base = {"teachers": {"compose": "x"}, "tasks": ["compose"]}
    for bad, msg in (({"rule": "kl"}, "rule must be"), ({"kl_norm": "batch"}, "kl_norm"),
                     ({"kl_norm": "global", "micro_batch": 1}, "micro_batch >= 2"),
                     ({"anchor": "lora"}, "anchor_lora"), ({"anchor_lora": "p"}, "anchor_lora"),
                     ({"merge": "factor_average"}, "backend sd3"), ({"step_selection": "last"}, "step_selection"),
                     ({"task_schedule": "roundrobin"}, "task_schedule")):
        with pytest.raises(ConfigError, match=msg):
            build(OPDConfig, {**base, **bad})
    with pytest.raises(ConfigError, match="adv_groups"):
        build(GRPOConfig, {"adv_groups": "task"})
