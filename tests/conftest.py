import pytest
import torch

from flowopd.backends.tiny import TinyBackend, save_checkpoint
from flowopd.backends.tiny_model import TinyConfig, TinyUNet

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
