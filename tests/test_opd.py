import json

import pytest
import torch
import yaml

from flowopd.backends.tiny import load_checkpoint, save_checkpoint
from flowopd.config import ConfigError
from flowopd.flow import sde_step, step_kl
from flowopd.rollout import rollout, transition
from flowopd.trainers import opd
from flowopd.trainers.coldstart import read_teacher, standin_teacher
from flowopd.trainers.opd import load_config, main_distill, opd_step_loss, sampled_log_ratio
from conftest import perturbed_tiny_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base checkpoint and three stand-in LoRA teachers on it."""
    root = tmp_path_factory.mktemp("opd")
    base = perturbed_tiny_checkpoint(root / "base")
    teachers = {t: str(standin_teacher(root / t, t, base, rank=2, scale=0.1, seed=k))
                for k, t in enumerate(["compose", "text", "quality"])}
    return base, teachers


def _overrides(world, **kw):
    base, teachers = world
    d = {"base": str(base), "steps": 1, "prompts_per_step": 3, "group_size": 2, "sample_steps": 3,
         "micro_batch": 3, "timestep_fraction": 0.7, "inner_epochs": 1, "cfg": 2.0, "lr": 1e-2}
    d.update(kw)
    return [f"teachers.{t}={p}" for t, p in teachers.items()] + [f"{k}={v}" for k, v in d.items()]


# ----------------------------------------------------------------------------- the losses


@pytest.mark.parametrize("rule,adv", [("direct", "sample"), ("pg", "sample"), ("pg", "centered"), ("pg", "closed_form")])
def test_loss_and_gradient_are_zero_when_student_equals_teacher(world, rule, adv):
    base, teachers = world
    b = load_checkpoint(base)
    t = read_teacher(teachers["text"], base)
    b.attach_lora("teacher", t.lora, t.rank, t.alpha, t.targets)
    b.attach_lora("student", t.lora, t.rank, t.alpha, t.targets)  # the same adapter
    params = [p for n, p in b.model.named_parameters() if ".student." in n]
    ro = rollout(b, ["a red square", 'a sign that says "K7"'], ["compose", "text"], 2, steps=3, cfg=2.0,
                 micro_batch=4, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(4)
    for j in range(3):
        with torch.no_grad(), b.adapter("teacher"):
            target = transition(b, ro, idx, j).mean
        tr = transition(b, ro, idx, j)
        loss, kl, _ = opd_step_loss(rule, tr.mean, tr.log_prob, ro.log_probs[idx, j], tr.sample, target, tr.std,
                                    float(ro.sigmas[j + 1] - ro.sigmas[j]), pg_advantage=adv)
        assert loss.item() == 0.0 and kl.abs().max().item() == 0.0
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        assert all(g is None or g.abs().max().item() == 0.0 for g in grads)


def test_direct_gradient_matches_finite_differences():
    """Toy student: v = w * x + c (a scalar w and a vector c), float64; teacher velocity fixed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v_t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    sig, sig_next = 0.6, 0.45
    m_t = sde_step(x, v_t, sig, sig_next).mean

    def f(w, c):
        st = sde_step(x, w * x + c, sig, sig_next)
        loss, _, _ = opd_step_loss("direct", st.mean, st.log_prob, st.log_prob.detach(), st.sample, m_t, st.std,
                                   sig_next - sig)
        return loss

    for norm in ("exact", "flow_grpo"):
        w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        c = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(f, (w, c), eps=1e-6, atol=1e-8)
    # and against hand-made central differences of the scalar
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(2, 4, 4, dtype=torch.float64)
    (gw,) = torch.autograd.grad(f(w, c), w)
    h = 1e-5
    fd = (f(w.detach() + h, c) - f(w.detach() - h, c)) / (2 * h)
    assert abs(gw.item() - fd.item()) <= 1e-7 * max(1.0, abs(fd.item()))


def test_sampled_log_ratio_is_an_unbiased_kl_estimate_and_pg_follows_the_kl_gradient():
    """Per step: E[log pi_s - log pi_t] = KL, and the pg surrogate's gradient with A = -(log-ratio)
    averages to the direct KL gradient, while DESIGN.md's A = -KL (closed form, a function of the
    state only) averages to zero."""
    torch.manual_seed(0)
    N, D = 40000, 3
    mu_t = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    std = 0.5
    mu_s = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    mean_s = mu_s.expand(N, D)
    x = (mean_s + std * torch.randn(N, D, dtype=torch.float64)).detach()
    lp = (-((x - mean_s) ** 2) / (2 * std**2)).mean(1)  # (N,) log-prob up to constants
    kl = step_kl(mean_s, mu_t.expand(N, D), std)
    est = sampled_log_ratio(x, mean_s.detach(), mu_t.expand(N, D), torch.tensor(std, dtype=torch.float64), -0.1)
    assert abs(est.mean().item() - kl[0].item()) < 5 * est.std().item() / N**0.5
    (g_direct,) = torch.autograd.grad(kl.mean(), mu_s, retain_graph=True)
    out = {}
    for name in ("sample", "centered", "closed_form"):
        loss, _, _ = opd_step_loss("pg", mean_s, lp, lp.detach(), x, mu_t.expand(N, D), std, -0.1,
                                   pg_advantage=name, clip_range=10.0)
        (out[name],) = torch.autograd.grad(loss, mu_s, retain_graph=True)
    assert torch.allclose(out["sample"], g_direct, atol=0.1 * g_direct.abs().max().item())
    assert torch.allclose(out["centered"], g_direct, atol=0.05 * g_direct.abs().max().item())
    assert out["closed_form"].abs().max() < 0.1 * g_direct.abs().max()


def test_first_pg_ratio_is_one(world):
    # rollouts run with the student's (non-zero) LoRA folded into the weights, the recomputation through
    # peft's branches: the two agree to float rounding, far inside any clip range
    base, _ = world
    b = load_checkpoint(base)
    b.add_adapter("student", rank=2, init=False)
    ro = rollout(b, ["a red square"], ["compose"], 3, steps=3, cfg=2.0, micro_batch=3,
                 generator=torch.Generator().manual_seed(0))
    tr = transition(b, ro, torch.arange(3), 1)
    loss, _, st = opd_step_loss("pg", tr.mean, tr.log_prob, ro.log_probs[:, 1], tr.sample, tr.mean.detach() + 0.01,
                                tr.std, -0.3)
    assert abs(st["ratio_min"] - 1) < 1e-5 and abs(st["ratio_max"] - 1) < 1e-5 and st["clip_frac"] == 0


# ----------------------------------------------------------------------------- the trainer


def test_an_opd_step_changes_only_the_student(world, tmp_path, monkeypatch):
    captured = {}
    real = opd.setup_models

    def spy(cfg, out, *args, **kw):
        res = real(cfg, out, *args, **kw)
        backend = res[0]
        captured["backend"] = backend
        captured["before"] = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
        captured["buffers"] = {n: b.detach().clone() for n, b in backend.model.named_buffers()}
        return res

    monkeypatch.setattr(opd, "setup_models", spy)
    final = main_distill(None, tmp_path / "run", _overrides(world, beta=0.5, anchor="quality"))
    b = captured["backend"]
    after = dict(b.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, captured["before"][n])}
    student = {n for n in after if ".student." in n}
    assert changed and changed <= student
    assert len(changed) >= 0.9 * len(student)  # (nearly) every student tensor moved
    assert all(torch.equal(bf, captured["buffers"][n]) for n, bf in b.model.named_buffers())
    assert b._peft.active_adapter == "student"
    # the final checkpoint is base + the trained student, loadable as a plain checkpoint
    loaded = load_checkpoint(final)
    x, s = torch.randn(2, 3, 32, 32), torch.full((2,), 0.4)
    with torch.no_grad():
        v1 = loaded.velocity(x, s, loaded.encode_prompts(["a red square", None]))
        v2 = b.velocity(x, s, b.encode_prompts(["a red square", None]))
    assert torch.allclose(v1, v2, atol=1e-5)


@pytest.mark.parametrize("rule,routing,extra", [
    ("direct", "task", {"init": "merge", "high_noise_routes": {"quality": "compose"}}),
    ("pg", "reward", {"init": "none", "reward_scale": "rank", "beta": 0.1}),
    ("direct", "soft", {"init": "none", "reward_scale": "zscore", "anchor": "base", "beta": 0.1}),
])
def test_opd_runs_and_logs_per_task(world, tmp_path, rule, routing, extra):
    final = main_distill(None, tmp_path / "run", _overrides(world, rule=rule, routing=routing, **extra))
    out = tmp_path / "run"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["rule"] == rule and cfg["routing"] == routing and set(cfg["teachers"]) == {"compose", "text", "quality"}
    recs = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    rec = recs[-1]
    for t in ("compose", "text", "quality"):
        assert f"kl_teacher/{t}" in rec and f"kl_anchor/{t}" in rec and f"reward/{t}" in rec
    if routing != "task":
        assert any(k.startswith("route/") for k in rec)
        # sign prompts can only go to the text teacher
        assert rec["route/text->text"] == pytest.approx(1.0)
    conf = json.loads((final / "config.json").read_text())
    assert "student" in conf["adapters"] and conf["meta"]["trainer"] == "opd"
    load_checkpoint(final)
    if extra.get("init") == "merge":
        assert (out / "coldstart" / "adapters" / "merge.safetensors").is_file()


def test_student_starts_exactly_at_the_merge(world, tmp_path):
    base, teachers = world
    from flowopd.trainers.coldstart import coldstart

    cs = coldstart("merge", teachers, tmp_path / "cs", opd.ColdStartConfig(base=str(base)))
    cfg = load_config(None, _overrides(world, init=str(cs), anchor="init"))
    b, bank, names, params, info = opd.setup_models(cfg, tmp_path / "o")
    assert names == ["compose", "text", "quality"] and info["coldstart"] == str(cs)
    ref = load_checkpoint(cs)
    x, s = torch.randn(2, 3, 32, 32), torch.full((2,), 0.7)
    with torch.no_grad():
        v_ref = ref.velocity(x, s, ref.encode_prompts(["a red square", None]))
        v_st = b.velocity(x, s, b.encode_prompts(["a red square", None]))
        with bank.use("init"):
            v_init = b.velocity(x, s, b.encode_prompts(["a red square", None]))
    assert torch.allclose(v_st, v_ref, atol=1e-5) and torch.equal(v_st, v_init)
    assert sum(p.numel() for p in params) == sum(a.numel() + bb.numel() for a, bb in b.read_lora("student")[0].values())


def test_config_errors_and_dotted_overrides(world):
    cfg = load_config(None, _overrides(world, routing="soft", anchor="text", beta=0.3))
    assert cfg.routing == "soft" and cfg.anchor == "text" and cfg.teachers["text"].endswith("text")
    with pytest.raises(ConfigError, match="routing"):
        load_config(None, _overrides(world, routing="random"))
    with pytest.raises(ConfigError, match="anchor"):
        load_config(None, _overrides(world, anchor="nobody"))
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, _overrides(world, betta=1))
    with pytest.raises(ConfigError, match="teacher for task"):
        load_config(None, ["teachers.compose=x", "tasks=[compose,text]"])
    assert load_config(None, _overrides(world, high_noise_routes={"quality": "compose"})).high_noise_routes == {
        "quality": "compose"}
    with pytest.raises(ConfigError, match="high_noise_routes"):
        load_config(None, _overrides(world, high_noise_routes={"quality": "painter"}))
    with pytest.raises(ConfigError, match="high_noise_sigma"):
        load_config(None, _overrides(world, high_noise_sigma=0))


def test_shipped_configs_parse():
    for name in ("configs/toy_opd_merge.yaml", "configs/toy_opd_sft.yaml"):
        cfg = load_config(name)
        assert set(cfg.teachers) == {"compose", "text", "quality"} and cfg.init in ("merge", "sft")


def test_velocity_step_weighting_counts_every_steps_velocity_error_alike():
    from flowopd.flow import sigma_grid
    from flowopd.trainers.opd import step_weights

    sig = sigma_grid(10)
    steps = list(range(10))
    assert step_weights(sig, steps, 0.7, mode="kl") == {j: 1.0 for j in steps}
    w = step_weights(sig, steps, 0.7, mode="velocity")
    assert abs(sum(w.values()) / len(w) - 1) < 1e-9 and w[0] > w[9]
    g = torch.Generator().manual_seed(0)
    x, v1, v2 = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    per_unit = []
    for j in steps:
        s, s_next = float(sig[j]), float(sig[j + 1])
        a, b = sde_step(x, v1, s, s_next), sde_step(x, v2, s, s_next)
        kl = step_kl(a.mean, b.mean, a.std)  # (2,)
        per_unit.append(w[j] * kl / ((v1 - v2) ** 2).flatten(1).mean(1))
    per_unit = torch.stack(per_unit)
    assert torch.allclose(per_unit, per_unit[0].expand_as(per_unit), rtol=1e-6)


def test_dense_cold_start_becomes_an_svd_fit_student(world, tmp_path):
    from flowopd.trainers.coldstart import base_state

    base, _ = world
    sd = base_state(base)
    g = torch.Generator().manual_seed(5)
    dense = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    save_checkpoint(load_checkpoint(base), tmp_path / "dense", {}, state_dict=dense)
    cfg = load_config(None, _overrides(world, init=str(tmp_path / "dense"), student_rank=3))
    with pytest.warns(UserWarning, match="SVD"):
        b, bank, names, params, info = opd.setup_models(cfg, tmp_path / "o")
    assert 0 < info["svd_residual"] < 1
    assert b.read_lora("student")[1] == 3 and all(p.requires_grad for p in params)
