import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flowopd.backends.tiny import TinyBackend, save_checkpoint
from flowopd.backends.tiny_model import TinyConfig, TinyUNet

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load_experiment(monkeypatch, name):
    """experiments/<name>.py as a module, importable as when run from there."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # scripts import their neighbours (ema_share.py)
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_experiment_script(monkeypatch, name, *args):
    """Run experiments/<name>.py's main() with these command-line arguments, as when run from there."""
    mod = load_experiment(monkeypatch, name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, args)])
    mod.main()


TINY = TinyConfig(channels=(8, 8, 8), text_dim=16, text_layers=1, heads=2, groups=4, cond_dim=16)


def perturbed_tiny_checkpoint(path, channels=(8, 8, 8)):
    """A small random checkpoint directory, every weight perturbed (the zero-initialised output
    layers too), so that samples depend on the weights; `channels` makes another model."""
    torch.manual_seed(0)
    m = TinyUNet(TinyConfig(channels=channels, text_dim=16, text_layers=1, heads=2, groups=4, cond_dim=16))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(TinyBackend(m.eval(), "cpu", {"steps": 4, "cfg": 2.0, "shift": 1.0}), path)


@pytest.fixture
def tiny_backend():
    torch.manual_seed(0)
    model = TinyUNet(TINY)
    with torch.no_grad():  # the output layers start at zero; make the function non-trivial
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return TinyBackend(model, "cpu", {"steps": 4, "cfg": 2.0, "shift": 1.0})


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_backend):
    """A small random-weight checkpoint directory (fast to sample from)."""
    return save_checkpoint(tiny_backend, tmp_path / "ckpt", {"note": "test"})
