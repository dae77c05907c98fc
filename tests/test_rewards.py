import random
import sys
import types

import numpy as np
import pytest
import torch

from flowopd.errors import UserError
from flowopd.rewards import REWARDS, RewardError, available, get_reward, per_task, register, weighted_sum
from flowopd.world.prompts import make_prompt
from flowopd.world.render import render

WHITE = np.full((32, 32, 3), 255, np.uint8)


def _render(text: str, seed: int = 0) -> np.ndarray:
    return render(make_prompt(text).spec, random.Random(seed))


def test_registry_names():
    assert {"compose", "compose_strict", "text", "text_dense", "quality"} <= set(available())
    for name in ("compose", "compose_strict", "text", "text_dense", "quality"):
        assert REWARDS[name].__doc__  # each says what it rewards


def test_toy_rewards_on_renders_and_blanks():
    prompts = ["a red square", "two circles", 'a sign that says "K7"']
    imgs = np.stack([_render(p) for p in prompts])
    compose, strict = get_reward("compose"), get_reward("compose_strict")
    r = compose(imgs[:2], prompts[:2], None)
    assert r.dtype == torch.float32 and r.shape == (2,)
    assert torch.equal(r, torch.ones(2)) and torch.equal(strict(imgs[:2], prompts[:2]), torch.ones(2))
    blank = np.stack([WHITE, WHITE])
    assert torch.equal(compose(blank, prompts[:2]), torch.zeros(2))
    # partial credit: a render of "a blue square" for "a red square" earns less than 1 but more than 0
    wrong = _render("a blue square")[None]
    r_wrong = compose(wrong, ["a red square"]).item()
    assert 0 < r_wrong < 1 and strict(wrong, ["a red square"]).item() == 0
    text = get_reward("text")
    assert text(imgs[2:], prompts[2:]).item() == 1.0
    assert text(WHITE[None], prompts[2:]).item() == 0.0
    dense = get_reward("text_dense")(np.stack([imgs[2], WHITE, imgs[0]]), [prompts[2], prompts[2], prompts[0]])
    assert dense[0].item() == 1.0 and dense[1].item() == 0.0 and torch.isnan(dense[2])  # a scene: NaN
    q = get_reward("quality")(imgs, prompts)
    assert q.shape == (3,) and ((q[:2] >= 0) & (q[:2] <= 1)).all()
    assert torch.isnan(q[2])  # a sign: the quality reward does not score it (its teacher never saw one)


def test_module_function_reward():
    mod = types.ModuleType("flowopd_test_reward_mod")
    mod.brightness = lambda images, prompts, metadata=None: torch.as_tensor(images.mean((1, 2, 3)) / 255.0)
    sys.modules[mod.__name__] = mod
    try:
        fn = get_reward("flowopd_test_reward_mod:brightness")
        r = fn(np.stack([WHITE, np.zeros_like(WHITE)]), ["a", "b"])
        assert torch.allclose(r, torch.tensor([1.0, 0.0]))
        with pytest.raises(RewardError, match="no function"):
            get_reward("flowopd_test_reward_mod:nope")
    finally:
        del sys.modules[mod.__name__]
    with pytest.raises(RewardError, match="cannot import"):
        get_reward("no_such_module_xyz:fn")


def test_unknown_name_lists_what_exists():
    with pytest.raises(UserError) as e:
        get_reward("composition")
    msg = str(e.value)
    for name in ("compose", "compose_strict", "text", "quality"):
        assert name in msg


def test_weighted_sum_and_per_task():
    register("_const_one", lambda images, prompts, metadata=None: torch.ones(len(prompts)))
    register("_const_two", lambda images, prompts, metadata=None: 2 * torch.ones(len(prompts)))
    try:
        imgs = np.stack([WHITE] * 3)
        mixed = weighted_sum({"_const_one": 0.5, "_const_two": 0.25})
        assert torch.allclose(mixed(imgs, ["x"] * 3), torch.full((3,), 1.0))
        routed = per_task({"compose": "_const_one", "text": "_const_two"}, {"text": 3.0})
        meta = [{"task": "text"}, {"task": "compose"}, {"task": "text"}]
        assert torch.equal(routed(imgs, ["x"] * 3, meta), torch.tensor([6.0, 1.0, 6.0]))
        with pytest.raises(RewardError, match="no reward for task"):
            routed(imgs[:1], ["x"], [{"task": "quality"}])
    finally:
        del REWARDS["_const_one"], REWARDS["_const_two"]


def test_per_task_uses_each_tasks_own_reward():
    prompts = ["a red square", 'a sign that says "K7"']
    imgs = np.stack([_render(p) for p in prompts])
    routed = per_task({"compose": "compose", "text": "text"})
    r = routed(imgs, prompts, [{"task": "compose"}, {"task": "text"}])
    assert torch.equal(r, torch.ones(2))


def test_bad_reward_shape_is_an_error():
    register("_bad_shape", lambda images, prompts, metadata=None: torch.ones(len(prompts) + 1))
    try:
        with pytest.raises(RewardError, match="shape"):
            get_reward("_bad_shape")(np.stack([WHITE]), ["x"])
    finally:
        del REWARDS["_bad_shape"]
