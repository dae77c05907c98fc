import math

import pytest
import torch

from flowopd.flow import step_kl
from flowopd.losses import (flow_matching_loss, group_advantages, grpo_loss, logit_normal_sigmas, mar_loss,
                            nft_loss, nft_weights,
                            opd_direct_loss, opd_pg_advantages)


# ----------------------------------------------------------------------------- flow matching


def test_flow_matching_loss_zero_for_exact_velocity():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert flow_matching_loss(noise - x0, x0, noise) == 0
    assert torch.allclose(flow_matching_loss(noise - x0 + 2.0, x0, noise), torch.tensor(4.0))
    assert torch.allclose(flow_matching_loss(x0 - noise, x0, noise), (4 * (noise - x0) ** 2).mean())


def test_logit_normal_sigmas():
    s = logit_normal_sigmas(100_000, mean=0.5, std=1.0, generator=torch.Generator().manual_seed(0))
    assert s.shape == (100_000,) and (s > 0).all() and (s < 1).all()
    assert abs(s.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01  # median = sigmoid(mean)
    a = logit_normal_sigmas(8, generator=torch.Generator().manual_seed(1))
    b = logit_normal_sigmas(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scope", ["batch", "group"])
def test_group_advantages_zero_for_equal_rewards(scope):
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.1, 0.9, 0.8])
    adv = group_advantages(rewards, torch.tensor([3, 3, 3, 8, 8, 8]), std_scope=scope)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert (adv[3:] != 0).all()


def test_group_advantages_hand_example():
    rewards, groups = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])
    # group means 1.5, 3.5; batch std (ddof=0) of 1..4 = sqrt(1.25); group std = 0.5
    sign = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    batch = group_advantages(rewards, groups, std_scope="batch")
    assert torch.allclose(batch, sign * 0.5 / (math.sqrt(1.25) + 1e-4))
    group = group_advantages(rewards, groups, std_scope="group")
    assert torch.allclose(group, sign * 0.5 / (0.5 + 1e-4))
    assert torch.allclose(group_advantages(rewards, groups, std_scope="group", clip=0.5), sign * 0.5)
    # groups named by prompt strings, interleaved
    named = group_advantages(torch.tensor([1.0, 3.0, 2.0, 4.0]), ["a", "b", "a", "b"], std_scope="group")
    assert torch.allclose(named, torch.tensor([-1.0, -1.0, 1.0, 1.0]) * 0.5 / (0.5 + 1e-4))


# ----------------------------------------------------------------------------- GRPO


def test_grpo_first_update_ratio_is_one_and_clipping_inactive():
    log_prob = torch.randn(6, 4).requires_grad_()
    old = log_prob.detach().clone()
    adv = torch.randn(6)
    loss, stats = grpo_loss(log_prob, old, adv, clip_range=1e-4)
    assert stats["ratio_min"] == 1 and stats["ratio_max"] == 1 and stats["clip_frac"] == 0
    assert torch.allclose(loss, -adv.mean())
    (grad,) = torch.autograd.grad(loss, log_prob)
    log_prob2 = log_prob.detach().clone().requires_grad_()
    unclipped, _ = grpo_loss(log_prob2, old, adv, clip_range=1e9)
    (grad_unclipped,) = torch.autograd.grad(unclipped, log_prob2)
    assert torch.equal(loss, unclipped)
    assert torch.allclose(grad, grad_unclipped)
    assert torch.allclose(grad, -adv.view(6, 1).expand(6, 4) / 24)  # (B,) advantages broadcast over steps


def test_grpo_clip_fraction_and_pessimistic_clipping():
    ratios = torch.tensor([1.0, 1.1, 0.9, 1.01, 2.0, 2.0])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
    log_prob = ratios.log().requires_grad_()
    loss, stats = grpo_loss(log_prob, torch.zeros(6), adv, clip_range=0.05)
    assert torch.allclose(stats["clip_frac"], torch.tensor(4 / 6))  # 1.1, 0.9, 2.0, 2.0
    assert torch.allclose(stats["ratio_max"], torch.tensor(2.0)) and torch.allclose(stats["ratio_min"], torch.tensor(0.9))
    # per-sample terms: A>0 is capped at (1+e)A when ratio is high, A<0 keeps the full -A*ratio
    terms = torch.tensor([-1.0, -1.05, -0.9, -1.01, -1.05, 2.0])
    assert torch.allclose(loss, terms.mean())
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad[1] == 0 and grad[4] == 0  # clipped: no gradient
    assert torch.allclose(grad[5], torch.tensor(2.0 / 6))  # unclipped, pessimistic side


# ----------------------------------------------------------------------------- OPD / MAR


@pytest.mark.parametrize("normalization", ["exact", "flow_grpo"])
def test_opd_direct_loss_zero_when_student_is_teacher(normalization):
    mean = torch.randn(3, 2, 4, 4)
    student = mean.clone().requires_grad_()
    teacher = mean.clone().requires_grad_()
    loss = opd_direct_loss(student, teacher, 0.3, dt=-0.1, normalization=normalization)
    loss.backward()
    assert loss == 0
    assert torch.equal(student.grad, torch.zeros_like(mean))
    assert teacher.grad is None  # the teacher is detached


@pytest.mark.parametrize("normalization", ["exact", "flow_grpo"])
def test_opd_direct_loss_gradient_matches_finite_differences(normalization):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    step_std = torch.tensor([0.3, 0.6], dtype=torch.float64).view(2, 1, 1)
    dt = torch.tensor([-0.1, -0.25], dtype=torch.float64)
    fn = lambda s: opd_direct_loss(s, teacher, step_std, dt=dt, normalization=normalization)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student,))
    (grad,) = torch.autograd.grad(fn(student), student)
    scale = 1.0 if normalization == "exact" else -dt.view(2, 1, 1)
    expected = scale * (student - teacher) / step_std**2 / student[0].numel() / 2  # mean over dims, batch
    assert torch.allclose(grad, expected)


def test_opd_pg_advantages_are_detached_negative_kl():
    kl = torch.rand(4, 3).requires_grad_()
    adv = opd_pg_advantages(kl * 2)
    assert not adv.requires_grad
    assert torch.equal(adv, -(kl * 2).detach())


def test_mar_loss_is_beta_times_kl():
    s, a = torch.randn(3, 8), torch.randn(3, 8)
    std = torch.tensor([0.2, 0.4, 0.6])
    assert torch.allclose(mar_loss(s, a, std, 0.25), 0.25 * step_kl(s, a, std).mean())
    assert torch.allclose(mar_loss(s, a, std, 0.25, dt=-0.2, normalization="flow_grpo"),
                          0.25 * 0.2 * step_kl(s, a, std).mean())
    assert mar_loss(s, a, std, 0.0) == 0


def test_nft_weights_map_advantages_to_unit_interval():
    adv = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.allclose(nft_weights(adv), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(nft_weights(adv, scale=2.0), torch.tensor([0.0, 0.375, 0.5, 0.625, 1.0]))
    # without negatives the losers get r = 1/2 (no gradient), the winners keep their weights
    assert torch.allclose(nft_weights(adv, negatives=False), torch.tensor([0.5, 0.5, 0.5, 0.75, 1.0]))


def test_nft_loss_known_values_and_gradients():
    torch.manual_seed(0)
    v_old, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    d = v_old[0].numel()
    # r = 1, beta = 1: plain flow matching toward the sample
    v = (v_old + 0.1 * torch.randn_like(v_old)).requires_grad_(True)
    loss, st = nft_loss(v, v_old, target, torch.ones(4), beta=1.0)
    assert torch.allclose(loss, ((v - target) ** 2).mean())
    assert torch.allclose(st["fm_mse"], ((v - target) ** 2).mean())
    # at v == v_old the gradient is 2 beta (2r - 1)(v_old - target) / (B * D): none at r = 1/2,
    # toward the target for r > 1/2, away from it for r < 1/2
    r = torch.tensor([1.0, 0.75, 0.5, 0.0])
    for beta in (1.0, 0.3):
        v = v_old.clone().requires_grad_(True)
        loss, st = nft_loss(v, v_old, target, r, beta=beta)
        loss.backward()
        expect = 2 * beta * (2 * r - 1).view(4, 1, 1, 1) * (v_old - target) / (4 * d)
        assert torch.allclose(v.grad, expect, atol=1e-6)
        assert st["v_shift"] == 0
    assert v.grad[2].abs().max() < 1e-8
    # a small step against the gradient moves r > 1/2 samples closer to their targets, r = 0 ones away
    step = v_old - 10.0 * v.grad
    dist = lambda x: ((x - target) ** 2).flatten(1).sum(1)  # noqa: E731
    assert (dist(step)[:2] < dist(v_old)[:2]).all() and dist(step)[3] > dist(v_old)[3]


def test_nft_loss_is_bounded_below_for_negative_samples():
    """r = 0 alone has a finite minimum (v = ((1 + beta) v_old - target) / beta), unlike -MSE."""
    v_old, target = torch.randn(2, 5), torch.randn(2, 5)
    beta = 0.5
    v_star = ((1 + beta) * v_old - target) / beta
    at_min, _ = nft_loss(v_star, v_old, target, torch.zeros(2), beta)
    assert at_min.item() < 1e-10
    far, _ = nft_loss(v_star + 3.0, v_old, target, torch.zeros(2), beta)
    assert far > at_min


# ----------------------------------------------------------------------------- the Flow-OPD authors' modes


def _kl_setup(seed=0):
    """A student mean with a graph, a teacher mean, and a log-prob of the student's mean (ratio 1)."""
    g = torch.Generator().manual_seed(seed)
    mu_s = torch.randn(4, 2, 3, 3, generator=g).requires_grad_(True)
    mu_t = torch.randn(4, 2, 3, 3, generator=g)
    x_next = torch.randn(4, 2, 3, 3, generator=g)
    std = 0.8
    log_prob = torch.distributions.Normal(mu_s, std).log_prob(x_next).mean(dim=(1, 2, 3))
    kl = ((mu_s - mu_t) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
    return mu_s, kl, log_prob


def test_kl_only_loss_and_gradient_are_the_direct_rule_plus_the_score_term():
    from flowopd.losses import reward_mode_loss

    mu_s, kl, log_prob = _kl_setup()
    loss, _ = reward_mode_loss("kl_only", kl, log_prob, log_prob.detach(), None, kl_scale=-1.0, adv_clip=5.0)
    assert loss.item() == pytest.approx(kl.mean().item(), rel=1e-6)  # ratio 1: mean(-A) = mean KL
    (g,) = torch.autograd.grad(loss, mu_s)
    # d/dtheta mean(KL * ratio) at ratio 1 = grad mean KL (the direct rule) + mean(KL * grad log_prob)
    mu2, kl2, lp2 = _kl_setup()
    (want,) = torch.autograd.grad(kl2.mean() + (kl2.detach() * lp2).mean(), mu2)
    assert torch.allclose(g, want, atol=1e-6)
    # the detached advantage (our `pg` rule's form) loses the direct term
    mu3, kl3, lp3 = _kl_setup()
    (g3,) = torch.autograd.grad(grpo_loss(lp3, lp3.detach(), -kl3, 1e-4)[0], mu3, retain_graph=True)
    (want3,) = torch.autograd.grad((kl3.detach() * lp3).mean(), mu3)
    assert torch.allclose(g3, want3, atol=1e-6)


def test_authors_modes_clip_normalise_and_mix_by_hand():
    from flowopd.losses import authors_kl_norm, reward_mode_loss

    kl = torch.tensor([0.5, 7.0, 1.0, 2.0])
    lp = torch.zeros(4)
    # kl_only clamps A = -KL at -5: the 7.0 counts as 5
    loss, _ = reward_mode_loss("kl_only", kl, lp, lp, None, kl_scale=-1.0, adv_clip=5.0)
    assert loss.item() == pytest.approx((0.5 + 5.0 + 1.0 + 2.0) / 4)
    z = (kl - kl.mean()) / (kl.std() + 1e-4)  # torch's unbiased std, as the authors'
    for mode in ("per_sample", "per_timestep", "global"):
        assert torch.allclose(authors_kl_norm(kl, mode), z)
    assert torch.equal(authors_kl_norm(kl, "none"), kl)
    task = torch.tensor([1.0, -1.0, 6.0, 0.0])
    loss, _ = reward_mode_loss("mixed", kl, lp, lp, task, kl_scale=-0.5, adv_clip=5.0)
    adv = (task.clamp(-5, 5) - 0.5 * kl).clamp(-5, 5)
    assert loss.item() == pytest.approx((-adv).mean().item())
    loss, _ = reward_mode_loss("task_only", kl, lp, lp, task, adv_clip=5.0)
    assert loss.item() == pytest.approx(-(1.0 - 1.0 + 5.0 + 0.0) / 4)
    keep = torch.tensor([True, False, True, False])
    loss, _ = reward_mode_loss("task_only", kl, lp, lp, task, keep=keep)
    assert loss.item() == pytest.approx(-(1.0 + 5.0) / 2)
    loss, _ = reward_mode_loss("task_only", kl, lp, lp, task, keep=torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0


def test_advantage_groups_and_zero_std_groups():
    from flowopd.losses import advantage_groups, group_reward_stats, zero_std_groups

    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.2, 0.4])
    gid = torch.tensor([0, 0, 1, 1, 2, 2])
    prompts = ["a", "a", "b", "b", "a", "a"]  # prompt "a" drawn twice
    by_draw = group_advantages(r, advantage_groups("draw", gid, prompts), clip=None)
    by_prompt = group_advantages(r, advantage_groups("prompt", gid, prompts), clip=None)
    whole = group_advantages(r, advantage_groups("none", gid, prompts), clip=None)
    std = r.std(unbiased=False)
    assert by_draw[0].item() == 0.0 and by_draw[2].item() == pytest.approx(-0.5 / (std + 1e-4).item())
    assert by_prompt[0].item() == pytest.approx((1.0 - 0.65) / (std + 1e-4).item(), rel=1e-5)
    assert torch.allclose(whole, (r - r.mean()) / (std + 1e-4))
    assert zero_std_groups(r, gid).tolist() == [True, True, False, False, False, False]
    st = group_reward_stats(r, gid)
    assert st["zero_std_ratio"] == pytest.approx(1 / 3)
    assert st["reward_std_mean"] == pytest.approx((0.0 + 0.5 + 0.1) / 3)
    assert group_reward_stats(r, prompts)["zero_std_ratio"] == 0.0
