"""Data parallelism (flowopd.parallel): two CPU processes under `accelerate launch` with the shipped
configs/accelerate/ddp.yaml train the same weights on both processes, and the same weights as one
process with the whole batch (up to float rounding); the pieces that make this hold (per-group noise,
group sharding, the single-process identity) are checked in-process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowopd.backends.tiny import load_checkpoint
from flowopd.config import build
from flowopd.parallel import Dist, group_noise, noise_mode
from flowopd.rollout import rollout
from flowopd.trainers.grpo import GRPOConfig, train_grpo

ROOT = Path(__file__).resolve().parents[1]

REWARD_MODULE = '''
import numpy as np


def brightness(images, prompts, metadata=None):
    """Mean pixel value in [0, 1]: a smooth reward, so every sample gets a non-zero advantage."""
    return np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3)) / 255.0
'''


def test_group_noise_does_not_depend_on_who_draws_it():
    shape = (3, 4, 4)
    full = group_noise(7, 3, [0, 1, 2, 3], 2, 5, shape)  # (8, 6, 3, 4, 4)
    odd = group_noise(7, 3, [1, 3], 2, 5, shape)
    assert full.shape == (8, 6, *shape)
    assert torch.equal(odd, torch.cat([full[2:4], full[6:8]]))
    assert not torch.equal(group_noise(7, 4, [1], 2, 5, shape), full[2:4])  # another iteration, other noise
    assert not torch.equal(full[0], full[1])  # the G samples of a group differ


def test_a_shard_of_the_groups_rolls_out_as_in_the_whole_batch(tiny_ckpt):
    """Rank 1 of 2 (groups 1 and 3) reproduces those groups' trajectories of a one-process rollout."""
    b = load_checkpoint(tiny_ckpt)
    prompts = ["a red square", 'a sign that says "K7"', "two blue circles", 'a sign that says "OK"']
    tasks = ["compose", "text", "compose", "text"]
    shape = tuple(b.latent_shape())
    whole = rollout(b, prompts, tasks, 2, steps=3, cfg=2.0, micro_batch=4,
                    noise=group_noise(0, 1, [0, 1, 2, 3], 2, 3, shape))
    mine = Dist(world=2, rank=1).mine(4)
    assert mine == [1, 3]
    part = rollout(b, [prompts[i] for i in mine], [tasks[i] for i in mine], 2, steps=3, cfg=2.0, micro_batch=4,
                   noise=group_noise(0, 1, mine, 2, 3, shape))
    rows = torch.tensor([2, 3, 6, 7])
    assert torch.allclose(part.xs, whole.xs[rows], atol=1e-5) and torch.allclose(part.log_probs, whole.log_probs[rows], atol=1e-5)


def test_one_process_is_the_identity():
    d = Dist.create("cpu")
    assert (d.world, d.rank, d.is_main, d.active) == (1, 0, True, False)
    t = torch.arange(6.0)
    assert d.gather(t) is t and d.local(t) is t and d.gather_list([1, 2]) == [1, 2] and d.mine(3) == [0, 1, 2]
    assert d.local_accum(4) == 4 and d.any(False) is False
    assert noise_mode("auto", True, "cpu", 1) == "stream"
    assert noise_mode("auto", True, "cpu", 2) == noise_mode("auto", False, "cpu", 1) == "per_group"
    with pytest.raises(Exception, match="divisible"):
        Dist(world=2, rank=0).check_batch(3)


def test_two_processes_train_the_same_weights_as_one(tiny_ckpt, tmp_path, monkeypatch):
    """accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 (CPU, gloo): 2 GRPO
    iterations of 4 prompts x 2 samples. Both processes end with bitwise equal weights (summary.json's
    per-process checksums), and the adapter equals a one-process run of the same global batch."""
    pytest.importorskip("accelerate")
    (tmp_path / "dt_reward.py").write_text(REWARD_MODULE)
    cfg = dict(init=str(tiny_ckpt), tasks=["compose", "text"], reward="dt_reward:brightness", steps=2,
               prompts_per_step=4, group_size=2, sample_steps=3, cfg=2.0, micro_batch=2, grad_accum=4,
               clip_range=0.2, kl_beta=0.03, lr=1e-2, lora_rank=4, noise="per_group", device="cpu")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
           "--num_processes", "2", "-m", "flowopd", "grpo", "--config", str(tmp_path / "cfg.yaml"),
           "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and len(set(summary["param_checksums"])) == 1

    monkeypatch.syspath_prepend(str(tmp_path))
    threads = torch.get_num_threads()
    try:  # one thread, as the two processes (OMP_NUM_THREADS=1): the same reduction order in each kernel
        train_grpo(build(GRPOConfig, {**cfg, "num_threads": 1}), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "one" / "final" / "adapters" / "mix.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "adapters" / "mix.safetensors"))
    assert set(one) == set(two)
    assert any(v.abs().max() > 5e-3 for k, v in one.items() if "lora_B" in k)  # trained well past the tolerance (B starts at 0)
    # Summing a batch in two halves reorders float additions; Adam (lr 1e-2, m / sqrt(v)) can turn
    # those 1e-7 gradient differences into ~1e-4 weight differences on near-zero gradients. A
    # wrong all-reduce (or advantages over half the batch) moves weights by ~lr: 1e-3 tells them apart.
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-3, rtol=0), (k, (one[k] - two[k]).abs().max())
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    for a, b in zip(*logs):  # rewards and advantages of the global batch, as one process sees them
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["adv_abs"] == pytest.approx(b["adv_abs"], abs=1e-5)
