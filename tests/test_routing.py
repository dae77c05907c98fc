import math

import pytest
import torch

from flowopd.backends.tiny import TinyBackend
from flowopd.backends.tiny_model import TinyConfig, TinyUNet
from flowopd.rollout import rollout, transition
from flowopd.rewards import get_reward
from flowopd.routing import (RewardScaler, TeacherBank, high_noise_rows, reward_routes, route, score_all,
                             soft_routes, task_routes)
from flowopd.trainers.coldstart import TeacherWeights

TINY = TinyConfig(channels=(8, 8, 8), text_dim=16, text_layers=1, heads=2, groups=4, cond_dim=16)
TEACHERS = ["compose", "text", "quality"]
NAN = float("nan")


def test_task_routing_follows_the_tag():
    W = task_routes(["text", "compose", "quality", "text"], TEACHERS)
    assert W.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]]
    with pytest.raises(KeyError, match="no teacher"):
        task_routes(["compose", "ocr"], TEACHERS)


def test_high_noise_routes_hand_a_tasks_high_noise_steps_to_another_teacher():
    tasks = ["compose", "text", "quality", "quality"]
    W = route("soft", tasks, TEACHERS, torch.tensor([[0.3, NAN, 1.2], [NAN, 1.0, NAN], [0.2, NAN, 0.1], [0.5, NAN, 0.9]]))
    routes = {"quality": "compose"}
    hi = high_noise_rows(W, tasks, 0.667, routes, 0.6, TEACHERS)
    assert hi[2:].tolist() == [[1, 0, 0], [1, 0, 0]]   # quality samples: the compose teacher alone
    assert torch.equal(hi[:2], W[:2])                   # other tasks' rows untouched
    assert torch.equal(high_noise_rows(W, tasks, 0.556, routes, 0.6, TEACHERS), W)  # below the threshold
    assert torch.equal(high_noise_rows(W, tasks, 1.0, {}, 0.6, TEACHERS), W)         # no routes
    assert W[2, 2] > 0  # and W itself is not modified


def test_toy_rewards_say_nan_where_they_cannot_score():
    images = torch.zeros(3, 32, 32, 3, dtype=torch.uint8).numpy()
    prompts = ["a red square", 'a sign that says "K7"', "a photo of a cat"]  # scene, sign, outside the grammar
    got = {t: get_reward(t)(images, prompts) for t in TEACHERS}
    assert (~torch.isnan(got["compose"])).tolist() == [True, False, False]
    assert (~torch.isnan(got["text"])).tolist() == [False, True, False]
    assert (~torch.isnan(got["quality"])).tolist() == [True, False, True]  # quality: any scene, never a sign
    # a readable sample's reward does not depend on the unreadable ones beside it
    assert got["compose"][0] == get_reward("compose")(images[:1], prompts[:1])[0]
    assert got["text"][1] == get_reward("text")(images[1:2], prompts[1:2])[0]


def test_reward_routing_takes_the_best_scaled_reward():
    scaled = torch.tensor([[0.3, NAN, 1.2],     # quality wins
                           [NAN, 2.0, -1.0],    # text wins
                           [0.9, NAN, 0.1],     # compose wins
                           [NAN, NAN, NAN]])    # nothing reads it: falls back to its task
    W = route("reward", ["compose", "text", "quality", "text"], TEACHERS, scaled)
    assert W.tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0]]


def test_soft_routing_is_a_softmax_over_readable_rewards():
    scaled = torch.tensor([[0.3, NAN, 1.2], [NAN, 2.0, -1.0]])
    W = route("soft", ["compose", "text"], TEACHERS, scaled, temperature=0.5)
    e = [math.exp(0.3 / 0.5), math.exp(1.2 / 0.5)]
    assert torch.allclose(W[0], torch.tensor([e[0] / sum(e), 0.0, e[1] / sum(e)]), atol=1e-6)
    assert W[1, 0] == 0 and torch.allclose(W.sum(1), torch.ones(2))
    # cold soft routing is reward routing
    assert torch.equal(soft_routes(scaled, 1e-4), reward_routes(scaled))


def test_zscore_scale_uses_running_stats_and_rank_scale_is_a_percentile():
    sc = RewardScaler(2, "zscore", momentum=0.5, min_std=1e-6)
    r = torch.tensor([[0.0, NAN], [1.0, 10.0], [2.0, 30.0]])
    z = sc(r)
    assert torch.allclose(z[:, 0], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5), atol=1e-5)
    assert torch.isnan(z[0, 1]) and torch.allclose(z[1:, 1], torch.tensor([-1.0, 1.0]), atol=1e-5)
    sc(torch.tensor([[4.0, 20.0]]))  # moves mean of task 0 half-way to 4
    assert math.isclose(sc.mean[0].item(), 0.5 * 1.0 + 0.5 * 4.0)
    rk = RewardScaler(2, "rank")(torch.tensor([[0.2, 5.0], [0.9, NAN], [0.2, 1.0], [0.5, 3.0]]))
    assert torch.allclose(rk[:, 0], torch.tensor([1 / 6, 1.0, 1 / 6, 2 / 3]), atol=1e-6)
    assert torch.allclose(rk[[0, 2, 3], 1], torch.tensor([1.0, 0.0, 0.5])) and torch.isnan(rk[1, 1])


def test_score_all_keeps_the_nan_of_a_reward_that_cannot_read():
    def fn(k):  # reward k reads the prompts holding "sign" only when k == 1
        return lambda im, p, m=None: torch.tensor([float(k) if ("sign" in q) == (k == 1) else NAN for q in p])

    fns = {t: fn(k) for k, t in enumerate(TEACHERS)}
    r = score_all(fns, torch.zeros(2, 32, 32, 3).numpy(), ["a red square", 'a sign that says "K7"'], TEACHERS)
    assert r[0, 0] == 0 and torch.isnan(r[0, 1]) and r[0, 2] == 2
    assert torch.isnan(r[1, 0]) and r[1, 1] == 1 and torch.isnan(r[1, 2])


@pytest.fixture(scope="module")
def bank_and_rollout():
    torch.manual_seed(0)
    m = TinyUNet(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    backend = TinyBackend(m.eval(), "cpu", {"steps": 4, "cfg": 2.0, "shift": 1.0})
    bank = TeacherBank(backend)
    g = torch.Generator().manual_seed(1)
    for k, name in enumerate(TEACHERS):  # three clearly different LoRA teachers
        backend.add_adapter(f"tmp{k}", rank=2)
        lora, r, a, tg = backend.read_lora(f"tmp{k}")
        lora = {mod: (torch.randn(A.shape, generator=g) * 0.3, torch.randn(B.shape, generator=g) * 0.3)
                for mod, (A, B) in lora.items()}
        bank.add(name, TeacherWeights(name, None, lora=lora, rank=r, alpha=a, targets=tg))
    backend.add_adapter("student", rank=2)
    ro = rollout(backend, ["a red square", 'a sign that says "K7"', "a blue circle"], ["compose", "text", "quality"],
                 2, steps=3, cfg=2.0, micro_batch=6, generator=torch.Generator().manual_seed(0))
    return backend, bank, ro


def _alone(backend, bank, ro, i, j, name):
    with torch.no_grad(), bank.use(name):
        return transition(backend, ro, torch.tensor([i]), j).mean[0]


@pytest.mark.parametrize("mode", ["task", "reward", "soft"])
def test_each_sample_gets_its_routed_teachers_target(bank_and_rollout, mode):
    backend, bank, ro = bank_and_rollout
    tasks = ro.tasks  # compose, compose, text, text, quality, quality
    scaled = torch.tensor([[0.1, NAN, 0.5], [0.9, NAN, 0.2], [NAN, 1.0, 0.0],
                           [NAN, -1.0, 0.3], [0.4, NAN, 0.6], [2.0, NAN, -2.0]])
    W = route(mode, tasks, TEACHERS, scaled, temperature=0.7)
    want_hard = {"task": [0, 0, 1, 1, 2, 2], "reward": [2, 0, 1, 2, 2, 0]}
    if mode in want_hard:
        assert W.argmax(1).tolist() == want_hard[mode]
    idx = torch.arange(len(ro))
    j = 1
    target = bank.means(ro, idx, j, W, TEACHERS)
    means = {n: torch.stack([_alone(backend, bank, ro, i, j, n) for i in range(len(ro))]) for n in TEACHERS}
    assert not torch.allclose(means["compose"], means["text"], atol=1e-3)  # the teachers do differ
    for i in range(len(ro)):
        want = sum(W[i, k] * means[n][i] for k, n in enumerate(TEACHERS))
        assert torch.allclose(target[i], want, atol=1e-5), (mode, i)
    assert backend._peft.active_adapter == "student"  # the student is active again afterwards


def test_anchor_base_means_adapters_off(bank_and_rollout):
    backend, bank, ro = bank_and_rollout
    with torch.no_grad(), bank.use("base"):
        a = transition(backend, ro, torch.arange(2), 0).mean
    with torch.no_grad(), backend.adapter(None):
        b = transition(backend, ro, torch.arange(2), 0).mean
    assert torch.equal(a, b)


def test_opd_targets_follow_high_noise_routes(bank_and_rollout):
    """The OPD trainer's targets: a quality sample is supervised by the compose teacher at the steps at or
    above high_noise_sigma and by the quality teacher below it; other samples keep their own teacher."""
    from types import SimpleNamespace

    from flowopd.trainers.opd import targets

    backend, bank, ro = bank_and_rollout  # tasks compose, compose, text, text, quality, quality; sigmas 1, 0.5, 0.001
    cfg = SimpleNamespace(high_noise_routes={"quality": "compose"}, high_noise_sigma=0.4)
    r = SimpleNamespace(bank=bank, cfg=cfg, names=TEACHERS, use_anchor=False)
    W = route("task", ro.tasks, TEACHERS)
    idx = torch.arange(len(ro))
    for j, want in ((0, ["compose", "compose", "text", "text", "compose", "compose"]),
                    (1, ["compose", "compose", "text", "text", "compose", "compose"]),
                    (2, ["compose", "compose", "text", "text", "quality", "quality"])):
        target, anc = targets(r, ro, idx, j, W)
        assert anc is None
        for i, name in enumerate(want):
            assert torch.allclose(target[i], _alone(backend, bank, ro, i, j, name), atol=1e-5), (j, i)
