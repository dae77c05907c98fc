import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from flowopd.backends.tiny import TinyBackend, load_checkpoint, save_checkpoint
from flowopd.backends.tiny_model import TinyConfig, TinyUNet
from flowopd.config import ConfigError, build
from flowopd.losses import group_advantages, grpo_loss
from flowopd.rollout import rollout, transition
from flowopd.trainers.common import task_counts
from flowopd.trainers.grpo import GRPOConfig, load_adapter, main_grpo, train_grpo


def _tiny_model(seed: int = 0) -> TinyUNet:
    """A tiny random U-Net whose zero-initialised output layers are perturbed (so every layer
    gets a gradient)."""
    torch.manual_seed(seed)
    m = TinyUNet(TinyConfig(channels=(8, 8, 8), text_dim=16))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(TinyBackend(_tiny_model(), "cpu", {"steps": 4, "cfg": 2.0, "shift": 1.0}), path)
    return path


def _rollout(backend, method="sde", cfg=2.0, micro_batch=4):
    gen = torch.Generator().manual_seed(0)
    return rollout(backend, ["a red square", 'a sign that says "K7"'], ["compose", "text"], 3, steps=4,
                   cfg=cfg, noise_level=0.7, method=method, micro_batch=micro_batch, generator=gen)


def test_rollout_shapes_and_groups(tiny_ckpt):
    ro = _rollout(load_checkpoint(tiny_ckpt))
    assert ro.xs.shape == (6, 5, 3, 32, 32) and ro.log_probs.shape == (6, 4) and ro.sigmas.shape == (5,)
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert ro.tasks == ["compose"] * 3 + ["text"] * 3 and ro.prompts[3] == 'a sign that says "K7"'
    assert [m["task"] for m in ro.metadata] == ro.tasks
    assert [c.tolist() for c in ro.chunks()] == [[0, 1, 2, 3], [4, 5]]
    assert not torch.equal(ro.xs[0, -1], ro.xs[1, -1])  # G different samples of one prompt


@pytest.mark.parametrize("method", ["sde", "cps"])
@pytest.mark.parametrize("use_adapter", [False, True])
def test_recomputed_log_prob_matches_sampling(tiny_ckpt, method, use_adapter):
    backend = load_checkpoint(tiny_ckpt)
    if use_adapter:
        backend.add_adapter("t", rank=4, init=False)  # a non-zero adapter
    ro = _rollout(backend, method)
    for idx in ro.chunks():  # same batches as sampling, float32
        for j in ro.trainable_steps():
            tr = transition(backend, ro, idx, j)  # with gradients enabled, as in training
            assert tr.log_prob.dtype == torch.float32
            assert torch.allclose(tr.log_prob, ro.log_probs[idx, j], atol=1e-5, rtol=0)
            assert torch.equal(tr.sample, ro.xs[idx, j + 1])
    if method == "cps":
        assert ro.trainable_steps() == [0, 1, 2]  # the last CPS step is deterministic


def test_sde_window_and_shared_noise(tiny_ckpt):
    """One SDE step (step 1), ODE elsewhere, the group branching from a shared noise."""
    backend = load_checkpoint(tiny_ckpt)
    gen = torch.Generator().manual_seed(0)
    ro = rollout(backend, ["a red square", "two circles"], ["compose", "compose"], 3, steps=4, cfg=2.0,
                 micro_batch=4, generator=gen, sde_steps=[1], shared_noise=True)
    assert ro.trainable_steps() == [1] and ro.sde_steps == [1]
    assert torch.equal(ro.log_probs[:, [0, 2, 3]], torch.zeros(6, 3)) and (ro.log_probs[:, 1] != 0).all()
    for g in (slice(0, 3), slice(3, 6)):  # the group shares its states up to the SDE step, then branches
        assert torch.equal(ro.xs[g, :2], ro.xs[g][:1, :2].expand(3, -1, -1, -1, -1))
        assert not torch.equal(ro.xs[g][0, 2], ro.xs[g][1, 2])
    assert not torch.equal(ro.xs[0, 0], ro.xs[3, 0])
    for idx in ro.chunks():
        tr = transition(backend, ro, idx, 1)
        assert torch.allclose(tr.log_prob, ro.log_probs[idx, 1], atol=1e-5, rtol=0)


def test_first_update_ratio_is_exactly_one(tiny_ckpt):
    backend = load_checkpoint(tiny_ckpt)
    backend.add_adapter("t", rank=4)
    ro = _rollout(backend)
    adv = torch.randn(len(ro))
    idx = ro.chunks()[0]
    for j in ro.trainable_steps():
        tr = transition(backend, ro, idx, j)
        ratio = torch.exp(tr.log_prob - ro.log_probs[idx, j])
        assert torch.equal(ratio, torch.ones_like(ratio))
        for eps in (1e-4, 0.2):
            loss, st = grpo_loss(tr.log_prob, ro.log_probs[idx, j], adv[idx], eps)
            unclipped = (-adv[idx] * ratio).mean()
            assert torch.equal(loss, unclipped) and st["clip_frac"] == 0
            assert st["ratio_min"] == st["ratio_max"] == 1


def test_equal_rewards_give_zero_advantages():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.2, 0.9])
    gid = torch.arange(2).repeat_interleave(4)
    for scope in ("batch", "group"):
        adv = group_advantages(rewards, gid, std_scope=scope)
        assert torch.equal(adv[:4], torch.zeros(4)) and (adv[4:] != 0).all()


def test_windowed_grpo_run(tiny_ckpt, tmp_path):
    cfg = _cfg(tiny_ckpt, sde_window=1, sde_window_starts=[0, 1], shared_noise=True, steps=2)
    train_grpo(cfg, tmp_path / "win")
    log = [json.loads(line) for line in (tmp_path / "win" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["opt_steps"] == 2 for r in log)


def _cfg(init, **kw):
    base = dict(init=str(init), tasks=["quality"], steps=1, prompts_per_step=2, group_size=4, sample_steps=3,
                micro_batch=4, cfg=2.0, clip_range=0.5, lr=1e-2, grad_accum=1)
    base.update(kw)
    return build(GRPOConfig, base)


def test_grpo_step_changes_every_trainable_parameter_and_only_those(tiny_ckpt, tmp_path, monkeypatch):
    """One GRPO iteration (rollout, reward, 2 optimizer steps over 2 micro-batches). LoRA's B starts
    at 0, so its A only gets a gradient from the second optimizer step on."""
    import flowopd.backends as backends

    captured = {}
    real_load = backends.load_checkpoint

    def spy_load(*a, **k):  # record the backend and every parameter right after the adapter is added
        b = real_load(*a, **k)
        real_add = b.add_adapter

        def add_adapter(*aa, **kk):
            real_add(*aa, **kk)
            captured["init"] = {n: p.detach().clone() for n, p in b.net.named_parameters()}

        b.add_adapter = add_adapter
        captured["backend"] = b
        return b

    monkeypatch.setattr(backends, "load_checkpoint", spy_load)
    cfg = _cfg(tiny_ckpt, kl_beta=0.1)
    final = train_grpo(cfg, tmp_path / "run")
    monkeypatch.undo()
    b, init = captured["backend"], captured["init"]
    trained = dict(b.net.named_parameters())
    lora = [n for n, p in trained.items() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert len(lora) == len(b.trainable_parameters())
    for n in lora:
        assert not torch.equal(trained[n], init[n]), f"{n} did not change"
    for n, p in trained.items():  # the base weights are untouched
        if not p.requires_grad:
            assert torch.equal(p, init[n]), f"frozen {n} changed"
    # the merged checkpoint equals base + adapter
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["opt_steps"] == 2 and log[0]["ratio_min"] <= 1 and "reward/quality" in log[0]
    assert log[0]["kl_ref"] is not None
    merged = load_checkpoint(final)
    on_base = load_checkpoint(tiny_ckpt)
    assert load_adapter(on_base, final, as_name="teacher") == "teacher"
    x, s = torch.randn(2, 3, 32, 32), torch.full((2,), 0.6)
    c = merged.encode_prompts(["a red square", None])
    with torch.no_grad():
        assert torch.allclose(merged.velocity(x, s, c), b.velocity(x, s, c), atol=1e-5)
        assert torch.allclose(on_base.velocity(x, s, c), b.velocity(x, s, c), atol=1e-5)
        with on_base.adapter(None):
            assert not torch.allclose(on_base.velocity(x, s, c), b.velocity(x, s, c), atol=1e-5)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["tasks"] == ["quality"] and written["kl_beta"] == 0.1


def test_full_finetune_changes_all_weights(tiny_ckpt, tmp_path):
    final = train_grpo(_cfg(tiny_ckpt, finetune="full", micro_batch=8, lr=1e-3), tmp_path / "full")
    before, after = load_checkpoint(tiny_ckpt).model.state_dict(), load_checkpoint(final).model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len(before)
    assert not (final / "adapters").exists()


def test_mix_batches_and_main_entry(tiny_ckpt, tmp_path):
    cfg_file = tmp_path / "mix.yaml"
    cfg_file.write_text(yaml.safe_dump(dict(init=str(tiny_ckpt), tasks=["compose", "text", "quality"],
                                            prompts_per_step=3, group_size=2, sample_steps=2, micro_batch=6,
                                            steps=1, timestep_fraction=0.5, ema_decay=0.9)))
    final = main_grpo(cfg_file, tmp_path / "mix", ["clip_range=0.1"])
    rec = json.loads((tmp_path / "mix" / "train_log.jsonl").read_text().splitlines()[0])
    assert {"reward/compose", "reward/text", "reward/quality", "clip_frac", "ratio_mean"} <= set(rec)
    assert json.loads((final / "config.json").read_text())["adapters"]["mix"]["rank"] == 8
    assert task_counts(["compose", "text"], {"compose": 3, "text": 2}, 5) == {"compose": 3, "text": 2}


@pytest.mark.parametrize("bad,match", [("lr=0", "lr"), ("group_size=1", "group_size"), ("steps=0", "steps"),
                                       ("tasks=[ocr]", "unknown task"), ("clip_rnge=0.1", "did you mean .clip_range"),
                                       ("finetune=full", "kl_beta"), ("categories=[triangles]", "unknown category"),
                                       ("lr_final=1.5", "lr_final")])
def test_config_validation(bad, match):
    overrides = [bad] + (["kl_beta=0.1"] if bad.startswith("finetune") else [])
    with pytest.raises(ConfigError, match=match):
        build(GRPOConfig, {}, overrides)


def test_shipped_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    cfgs = {n: build(GRPOConfig, yaml.safe_load((root / f"toy_grpo_{n}.yaml").read_text()))
            for n in ("compose", "text", "quality", "mix")}
    # GRPO-Mix gets the teachers' budget as the full preset trains them (a teacher of n runs n times)
    from flowopd.pipeline import PRESETS

    runs = PRESETS["full"]["teacher_seeds"]
    teachers = sum(runs.get(n, 1) * cfgs[n].rollout_budget() for n in ("compose", "text", "quality"))
    assert cfgs["mix"].rollout_budget() == teachers
    assert cfgs["mix"].tasks == ["compose", "text", "quality"]
    # the compose teacher is its run's tail average, compressed to the run's LoRA rank
    c = cfgs["compose"]
    assert c.tail_average > 1 and c.average_rank == c.lora_rank and (c.tail_average - 1) * c.save_every < c.steps


def test_categories_restrict_compose_prompts_only():
    import random

    from flowopd.prompt_sources import PromptSources
    from flowopd.world.prompts import parse

    hard = ["position", "color_attr"]
    prompts, tasks, _ = PromptSources(["compose", "text"], None, hard).draw_batch(random.Random(0),
                                                                                 {"compose": 40, "text": 5})
    assert tasks.count("text") == 5
    for p, t in zip(prompts, tasks):
        if t == "text":
            assert p.startswith("a sign that says")
        else:
            assert parse(p).category in hard
    # without categories every compose category shows up in a large draw
    prompts, tasks, _ = PromptSources(["compose"], None).draw_batch(random.Random(0), {"compose": 200})
    assert {parse(p).category for p in prompts} == {"single_object", "two_object", "counting", "colors",
                                                     "position", "color_attr"}


def test_ode_rollout_is_the_deterministic_sampler(tiny_ckpt):
    """sampler 'ode': Euler steps from independent initial noise, no log-probs, nothing to recompute."""
    from flowopd.flow import ode_sample, sigma_grid
    from flowopd.sampling import guided_velocity

    backend = load_checkpoint(tiny_ckpt)
    gen = torch.Generator().manual_seed(0)
    ro = rollout(backend, ["a red square", "two circles"], ["compose", "compose"], 3, steps=4, cfg=2.0,
                 method="ode", micro_batch=6, generator=gen)
    assert ro.trainable_steps() == [] and torch.equal(ro.log_probs, torch.zeros(6, 4))
    cond, uncond = backend.encode_prompts(ro.prompts), backend.encode_prompts([None] * 6)
    with torch.no_grad():
        ref = ode_sample(guided_velocity(backend, cond, uncond, 2.0), ro.xs[:, 0], sigma_grid(4))
    assert torch.allclose(ro.final, ref, atol=1e-5)  # float32, |x| up to ~5
    assert not torch.equal(ro.xs[0, 0], ro.xs[1, 0])  # a group's samples start from different noise
    with pytest.raises(ValueError, match="no stochastic transitions"):
        transition(backend, ro, ro.chunks()[0], 0)
    with pytest.raises(ValueError, match="identical"):
        rollout(backend, ["a red square"], ["compose"], 2, steps=2, method="ode", shared_noise=True)


def _lora_params(final):
    from flowopd.backends.tiny import read_weights

    return read_weights(final / "adapters" / "quality.safetensors")


def test_nft_objective_trains_the_adapter_only(tiny_ckpt, tmp_path):
    cfg = _cfg(tiny_ckpt, objective="nft", sampler="ode", nft_timesteps=2, kl_beta=0.1, micro_batch=3,
               steps=2)
    final = train_grpo(cfg, tmp_path / "nft")
    log = [json.loads(line) for line in (tmp_path / "nft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["opt_steps"] for r in log] == [3, 3]  # 8 samples in micro-batches of 3
    assert {"fm_mse", "v_shift", "kl_ref"} <= set(log[0]) and "clip_frac" not in log[0]
    assert log[1]["v_shift"] > 0  # the policy moved away from the one that sampled
    lora = _lora_params(final)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0: every B moved
    before, after = load_checkpoint(tiny_ckpt).model.state_dict(), load_checkpoint(final).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lr_final_is_a_cosine_from_lr_to_its_share():
    from flowopd.trainers.grpo import lr_factor

    assert [lr_factor(s, 5, 1.0) for s in range(1, 6)] == [1.0] * 5
    got = [lr_factor(s, 5, 0.1) for s in range(1, 6)]
    assert got[0] == pytest.approx(1.0) and got[2] == pytest.approx(0.55) and got[4] == pytest.approx(0.1)
    assert got == sorted(got, reverse=True)
    assert lr_factor(1, 1, 0.1) == 1.0


def test_lr_final_sets_each_iterations_learning_rate(tiny_ckpt, tmp_path):
    cfg = _cfg(tiny_ckpt, objective="nft", sampler="ode", steps=3, lr=1e-3, lr_final=0.1)
    train_grpo(cfg, tmp_path / "cos")
    log = [json.loads(line) for line in (tmp_path / "cos" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([1e-3, 5.5e-4, 1e-4])


def test_nft_with_equal_rewards_changes_nothing(tiny_ckpt, tmp_path):
    """Equal rewards give A = 0, r = 1/2: at v == v_old the NFT gradient is exactly 0, so Adam never
    moves (weight decay 0) and the adapter stays at its zero-output init."""
    cfg = _cfg(tiny_ckpt, objective="nft", sampler="ode", reward="faulty_rewards:constant", steps=2)
    final = train_grpo(cfg, tmp_path / "eq")
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in _lora_params(final).items() if "lora_B" in k)


def test_nft_uncond_anchor_measures_the_unconditional_drift(tiny_ckpt, tmp_path):
    """The anchor term is the squared distance of the unconditional velocity from the base's: exactly 0
    at the first update (LoRA's B starts at 0, one micro-batch, one noise level), > 0 once the adapter
    has moved."""
    cfg = _cfg(tiny_ckpt, objective="nft", sampler="ode", nft_timesteps=1, micro_batch=8, steps=2,
               nft_uncond_anchor=1.0)
    train_grpo(cfg, tmp_path / "anchor")
    log = [json.loads(line) for line in (tmp_path / "anchor" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["uncond_drift"] == 0.0 and log[1]["uncond_drift"] > 0


def test_nft_time_shift_moves_the_noise_levels_up(tiny_ckpt):
    """nft_time_shift s maps the same uniform draws u to s u / (1 + (s - 1) u): higher noise levels
    for s > 1; 0 keeps the sampling shift (1 here: t = u)."""
    from flowopd.trainers.grpo import nft_batch

    backend = load_checkpoint(tiny_ckpt)
    ro = rollout(backend, ["a red square"], ["compose"], 4, steps=2, method="ode", micro_batch=4,
                 generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ts = {}
    for s in (0.0, 1.0, 3.0):
        cfg = build(GRPOConfig, {}, [f"nft_time_shift={s}", "nft_timesteps=3", "shift=1.0"])
        ts[s] = nft_batch(backend, ro, adv, cfg, 2.0, torch.Generator().manual_seed(5)).t
    assert torch.equal(ts[0.0], ts[1.0])
    u = ts[1.0]
    assert torch.allclose(ts[3.0], 3 * u / (1 + 2 * u)) and bool((ts[3.0] > u).all())


@pytest.mark.parametrize("bad,match", [("sampler=ode", "objective: nft"), ("objective=ppo", "objective"),
                                       ("nft_timesteps=0", "nft_timesteps"),
                                       ("nft_guidance=-1", "nft_guidance"), ("nft_uncond_anchor=-0.5", "nft_uncond_anchor"),
                                       ("nft_time_shift=-1", "nft_time_shift")])
def test_nft_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        build(GRPOConfig, {}, [bad])
    with pytest.raises(ConfigError, match="sde_window"):
        build(GRPOConfig, {"objective": "nft", "sampler": "ode", "shared_noise": True})


def test_tail_average_hands_on_the_mean_of_the_last_checkpoints(tiny_ckpt, tmp_path):
    from flowopd.backends.tiny import read_weights

    cfg = _cfg(tiny_ckpt, objective="nft", sampler="ode", steps=6, save_every=2, tail_average=3)
    got = train_grpo(cfg, tmp_path / "tail")
    out = tmp_path / "tail"
    assert got == out / "average"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000002", "step_000004"]
    w = {n: read_weights(out / n / "model.safetensors") for n in ("step_000002", "step_000004", "final", "average")}
    mean = {k: (w["step_000002"][k] + w["step_000004"][k] + w["final"][k]) / 3 for k in w["final"]}
    assert any(not torch.equal(w["step_000004"][k], w["final"][k]) for k in mean)  # the run moved in between
    for k in mean:  # base + mean of the deltas == mean of the weights
        torch.testing.assert_close(w["average"][k], mean[k], rtol=1e-5, atol=1e-6)
    meta = json.loads((out / "average" / "config.json").read_text())["meta"]
    assert meta["recipe"]["tail_average"] == 3 and meta["recipe"]["tasks"] == ["quality"]
    assert [p.rsplit("/", 1)[-1] for p in meta["runs"]] == ["step_000002", "step_000004", "final"]
    # a checkpoint another run left in --out is not averaged in
    from flowopd.trainers.grpo import tail_average

    other = _cfg(tiny_ckpt, objective="nft", sampler="ode", steps=6, save_every=2, tail_average=3, seed=1)
    with pytest.warns(UserWarning, match="averaging 1 of the 3"):
        tail_average(other, out, out / "final", 6)
    # average_rank: the mean compressed to a LoRA of that rank by SVD. At the summed rank of the three
    # checkpoints the compression is exact; at rank 1 each module's factors have rank 1 and the recorded
    # residual is the measured relative error of the deltas.
    from flowopd.trainers.coldstart import read_teacher

    base_w = read_weights(Path(cfg.init) / "model.safetensors")
    exact = {k: w["average"][k] - base_w[k] for k in base_w}
    run_cfg = build(GRPOConfig, meta["recipe"])  # the run's resolved config (shift, eval_steps from the init)
    for r in (3 * cfg.lora_rank, 1):
        got = tail_average(dataclasses.replace(run_cfg, average_rank=r), out, out / "final", 6)
        t = read_teacher(got, cfg.init)
        assert t.kind == "lora" and t.rank == r
        d = t.deltas()
        if r > 1:
            for k in d:
                torch.testing.assert_close(d[k], exact[k], rtol=1e-4, atol=1e-6)
        else:
            assert all(A.shape[0] == 1 and B.shape[1] == 1 for A, B in t.lora.values())
            err = sum(float(((d[k] - exact[k]) ** 2).sum()) for k in d) ** 0.5
            tot = sum(float((exact[k] ** 2).sum()) for k in d) ** 0.5
            meta = json.loads((got / "config.json").read_text())["meta"]
            assert 0 < meta["svd_residual"] < 1 and meta["svd_residual"] == pytest.approx(err / tot, rel=1e-3)


@pytest.mark.parametrize("over", [["tail_average=3"], ["tail_average=3", "save_every=4", "steps=8"],
                                  ["tail_average=-1"], ["tail_average=3", "save_every=2", "steps=8", "average_rank=-1"],
                                  ["average_rank=8"],
                                  ["tail_average=3", "save_every=2", "steps=8", "average_rank=8", "finetune=full"]])
def test_tail_average_needs_its_checkpoints(over):
    with pytest.raises(ConfigError, match="average_rank" if any("average_rank" in o for o in over) else "tail_average"):
        build(GRPOConfig, {}, over)
