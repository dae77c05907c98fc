"""experiments/blur_sign_tokens.py: only sign characters' embedding rows move; other prompts are unchanged."""
import json

import pytest
import torch

from flowopd.backends.tiny import load_checkpoint, read_weights
from flowopd.backends.tiny_model import Tokenizer

from conftest import perturbed_tiny_checkpoint, run_experiment_script


def run_script(monkeypatch, *args):
    run_experiment_script(monkeypatch, "blur_sign_tokens", *args)


def velocity(ckpt, prompt):
    model = load_checkpoint(ckpt).model.float().eval()
    ids, slots = Tokenizer().batch([prompt])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.7]), model.encode(ids, slots))


def test_only_sign_rows_move_and_only_sign_prompts_change(tmp_path, monkeypatch):
    ckpt = perturbed_tiny_checkpoint(tmp_path / "ckpt")
    w = read_weights(ckpt / "model.safetensors")
    out = tmp_path / "blurred"
    run_script(monkeypatch, "--checkpoint", ckpt, "--mix", 0.5, "--out", out)
    new = read_weights(out / "model.safetensors")
    cb = Tokenizer.char_base
    assert all(torch.equal(new[k], w[k]) for k in w if k != "text.tok.weight")
    assert torch.equal(new["text.tok.weight"][:cb], w["text.tok.weight"][:cb])
    moved = (new["text.tok.weight"][cb:] != w["text.tok.weight"][cb:]).any(dim=1)
    assert moved.all()  # every character's row
    compose, sign = "a red circle left of a blue square", 'a sign that says "AB7"'
    assert torch.equal(velocity(out, compose), velocity(ckpt, compose))
    assert torch.equal(velocity(out, None), velocity(ckpt, None))
    assert not torch.allclose(velocity(out, sign), velocity(ckpt, sign))
    meta = json.loads((out / "config.json").read_text())["meta"]["blur_sign_tokens"]
    assert meta["mix"] == 0.5 and meta["seed"] == 1234


def test_mix_zero_is_the_identity_and_mix_one_forgets_the_rows(tmp_path, monkeypatch):
    ckpt = perturbed_tiny_checkpoint(tmp_path / "ckpt")
    w = read_weights(ckpt / "model.safetensors")["text.tok.weight"]
    rows = {}
    for mix in (0.0, 1.0):
        run_script(monkeypatch, "--checkpoint", ckpt, "--mix", mix, "--out", tmp_path / f"m{mix}")
        rows[mix] = read_weights(tmp_path / f"m{mix}" / "model.safetensors")["text.tok.weight"][Tokenizer.char_base:]
    assert torch.equal(rows[0.0], w[Tokenizer.char_base:])
    # mix 1: the rows are the seeded random vectors alone, whatever the checkpoint held
    g = torch.Generator().manual_seed(1234)
    assert torch.equal(rows[1.0], torch.randn(rows[1.0].shape, generator=g).to(rows[1.0].dtype))
    with pytest.raises(SystemExit):
        run_script(monkeypatch, "--checkpoint", ckpt, "--mix", 1.5, "--out", tmp_path / "bad")
