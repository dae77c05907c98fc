"""experiments/selective_damp.py: the weights it picks are set to init + keep (w - init), the rest kept."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

from flowopd.backends.tiny import read_weights
from flowopd.backends.tiny_model import TinyConfig
from flowopd.trainers.pretrain import initial_weights

from conftest import perturbed_tiny_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "selective_damp.py"


def run_script(monkeypatch, *args):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports ema_share.py beside it, as when run
    spec = importlib.util.spec_from_file_location("selective_damp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["selective_damp.py", *map(str, args)])
    mod.main()


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
