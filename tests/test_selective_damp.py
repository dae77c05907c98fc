"""experiments/selective_damp.py: the weights it picks are set to init + keep (w - init), the rest kept."""
import json

import pytest
import torch

from flowopd.backends.tiny import read_weights
from flowopd.backends.tiny_model import TinyConfig
from flowopd.trainers.pretrain import initial_weights

from conftest import perturbed_tiny_checkpoint, run_experiment_script


def run_script(monkeypatch, *args):
    run_experiment_script(monkeypatch, "selective_damp", *args)


def test_selected_weights_go_to_init_and_the_rest_stay(tmp_path, monkeypatch):
    ckpt = perturbed_tiny_checkpoint(tmp_path / "ckpt")  # seed-0 random weights + 0.05 noise everywhere
    w = read_weights(ckpt / "model.safetensors")
    init = initial_weights(TinyConfig.from_dict(json.loads((ckpt / "config.json").read_text())["model"]), 0)
    picked = {}
    for alpha in (1.0, 4.0):
        out = tmp_path / f"a{alpha}"
        run_script(monkeypatch, "--checkpoint", ckpt, "--forget", "text", "--alpha", alpha, "--keep", 0,
                   "--batches", 2, "--batch", 4, "--out", out)
        new = read_weights(out / "model.safetensors")
        n = total = 0
        picked[alpha] = {}
        for k, v in new.items():
            if not v.is_floating_point():
                continue
            moved = v != w[k]
            # a weight is either untouched or exactly its random initial value (keep 0)
            assert torch.equal(v[moved], init[k][moved].to(v.dtype)), k
            picked[alpha][k] = moved
            n, total = n + int(moved.sum()), total + moved.numel()
        meta = json.loads((out / "config.json").read_text())["meta"]["selective_damp"]
        assert meta["forget"] == "text" and "text" not in meta["retain"]
        assert abs(meta["share"] - n / total) < 1e-4
        assert 0 < n < total
    # a higher alpha picks a subset of the weights (same Fisher estimates: same seed)
    assert all(not (picked[4.0][k] & ~picked[1.0][k]).any() for k in picked[4.0])
    assert sum(int(m.sum()) for m in picked[4.0].values()) < sum(int(m.sum()) for m in picked[1.0].values())


def test_excluded_parameters_are_never_damped(tmp_path, monkeypatch):
    ckpt = perturbed_tiny_checkpoint(tmp_path / "ckpt")
    w = read_weights(ckpt / "model.safetensors")
    outs = {}
    for name, extra in (("all", []), ("ex", ["--exclude", "text.,xattn"])):
        outs[name] = tmp_path / name
        run_script(monkeypatch, "--checkpoint", ckpt, "--forget", "text", "--alpha", 1.0, "--keep", 0,
                   "--batches", 2, "--batch", 4, "--out", outs[name], *extra)
    full, ex = read_weights(outs["all"] / "model.safetensors"), read_weights(outs["ex"] / "model.safetensors")
    excluded = [k for k in w if k.startswith(("text.", "xattn"))]
    # without --exclude some of these weights are damped; with it none are, and the others are as before
    assert any(not torch.equal(full[k], w[k]) for k in excluded)
    assert all(torch.equal(ex[k], w[k]) for k in excluded)
    assert all(torch.equal(ex[k], full[k]) for k in w if k not in excluded)
    meta = json.loads((outs["ex"] / "config.json").read_text())["meta"]["selective_damp"]
    assert meta["exclude"] == ["text.", "xattn"]


def test_retain_sigma_sets_the_retain_noise_levels(tmp_path, monkeypatch):
    ckpt = perturbed_tiny_checkpoint(tmp_path / "ckpt")
    shares = {}
    for name, extra in (("recipe", []), ("wide", ["--retain-sigma", "0.0,2.0"])):
        run_script(monkeypatch, "--checkpoint", ckpt, "--forget", "text", "--alpha", 1.0, "--keep", 0,
                   "--batches", 2, "--batch", 4, "--out", tmp_path / name, *extra)
        shares[name] = json.loads((tmp_path / name / "config.json").read_text())["meta"]["selective_damp"]
    assert "retain_sigma" not in shares["recipe"] and shares["wide"]["retain_sigma"] == [0.0, 2.0]
    assert shares["wide"]["share"] != shares["recipe"]["share"]  # other retain Fisher, other weights
    with pytest.raises(SystemExit):
        run_script(monkeypatch, "--checkpoint", ckpt, "--forget", "text", "--retain-sigma", "1.0",
                   "--out", tmp_path / "bad")
