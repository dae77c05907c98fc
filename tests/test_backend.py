import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flowopd.backends import CheckpointError, load_checkpoint
from flowopd.config import ConfigError
from flowopd.backends.tiny_model import MAX_TOKENS, Tokenizer
from flowopd.sampling import sample_images


def test_tokenizer_reads_any_string():
    tok = Tokenizer()
    for s in ["a red square", 'a sign that says "K7"', "", "ünïcødé ✓", 'unclosed "quote', "x" * 1000, None]:
        ids, slots = tok.encode(s)
        assert len(ids) == len(slots) == MAX_TOKENS
        assert all(0 <= i < Tokenizer.size for i in ids)
        assert all(0 <= s_ < Tokenizer.n_slots for s_ in slots)


def test_tokenizer_quoted_chars_carry_centre_slots():
    tok = Tokenizer()
    ids2, slots2 = tok.encode('a sign that says "AB"')
    ids3, slots3 = tok.encode('a sign that says "ABC"')
    # the two characters of "AB" sit symmetrically around the centre, "B" of "ABC" at it
    a2, b2 = slots2[5], slots2[6]
    assert b2 - a2 == 2 and slots3[6] == (a2 + b2) // 2
    assert ids2[5] == ids3[5] and ids2[6] == ids3[6]  # same character ids
    assert tok.encode('a sign that says "K"')[0] != tok.encode('a sign that says "7"')[0]


def test_velocity_shape_and_grad(tiny_backend):
    cond = tiny_backend.encode_prompts(["a red square", None])
    x = torch.randn(2, 3, 32, 32)
    v = tiny_backend.velocity(x, torch.tensor([0.5, 0.9]), cond)
    assert v.shape == x.shape
    v.pow(2).mean().backward()
    assert all(p.grad is not None for p in tiny_backend.trainable_parameters())


def test_checkpoint_round_trip(tiny_backend, tiny_ckpt):
    loaded = load_checkpoint(tiny_ckpt)
    for (k, a), (k2, b) in zip(tiny_backend.model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    prompts = ["a blue circle", 'a sign that says "7"']
    assert np.array_equal(sample_images(tiny_backend, prompts, progress=False),
                          sample_images(loaded, prompts, progress=False))


def test_checkpoint_format_is_versioned(tiny_backend, tiny_ckpt):
    from flowopd.backends.tiny import FORMAT

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["format"] == FORMAT
    del cfg["format"]  # a checkpoint from before the key existed: format 1, still loads with the same weights
    (tiny_ckpt / "config.json").write_text(json.dumps(cfg))
    old = load_checkpoint(tiny_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(tiny_backend.model.state_dict().values(),
                                                 old.model.state_dict().values()))
    for bad in (FORMAT + 1, "2", 0):
        (tiny_ckpt / "config.json").write_text(json.dumps({**cfg, "format": bad}))
        with pytest.raises(CheckpointError, match="checkpoint format .* is not one this flowopd reads"):
            load_checkpoint(tiny_ckpt)


def test_sampling_independent_of_batch_size(tiny_backend):
    prompts = ["a blue circle", "two squares", "a red square", 'a sign that says "AB"']
    a = sample_images(tiny_backend, prompts, seed=3, batch_size=4, progress=False)
    b = sample_images(tiny_backend, prompts, seed=3, batch_size=1, progress=False)
    c = sample_images(tiny_backend, prompts, seed=4, batch_size=4, progress=False)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched matmuls may differ by 1 ulp
    assert not np.array_equal(a, c)


def test_truncated_and_mismatched_checkpoints_are_refused(tiny_ckpt, tmp_path):
    w = tiny_ckpt / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|unreadable"):
        load_checkpoint(tiny_ckpt)
    w.write_bytes(data)
    sd = load_file(str(w))
    key = next(k for k in sd if k.endswith("conv_in.weight"))
    sd[key] = torch.zeros(3, 3, 3, 3)
    save_file(sd, str(w))
    with pytest.raises(CheckpointError, match="shape mismatch.*conv_in"):
        load_checkpoint(tiny_ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["backend"] = "sd3"
    (tiny_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not the tiny backend"):
        load_checkpoint(tiny_ckpt)


def test_named_adapters_share_one_base(tiny_backend):
    cond = tiny_backend.encode_prompts(["a red square"])
    x, s = torch.randn(1, 3, 32, 32), torch.tensor([0.5])
    with torch.no_grad():
        v_base = tiny_backend.velocity(x, s, cond)
    tiny_backend.add_adapter("teacher_a", rank=2)
    tiny_backend.add_adapter("teacher_b", rank=2)
    # fresh LoRA (B = 0) leaves the function unchanged
    with torch.no_grad():
        assert torch.allclose(tiny_backend.velocity(x, s, tiny_backend.encode_prompts(["a red square"])), v_base, atol=1e-6)
        for name, p in tiny_backend.net.named_parameters():
            if "lora_B" in name and "teacher_a" in name:
                p.add_(0.1)
    trainable = {n for n, p in tiny_backend.net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        with tiny_backend.adapter("teacher_a"):
            v_a = tiny_backend.velocity(x, s, tiny_backend.encode_prompts(["a red square"]))
        with tiny_backend.adapter("teacher_b"):
            v_b = tiny_backend.velocity(x, s, tiny_backend.encode_prompts(["a red square"]))
        with tiny_backend.adapter(None):
            v_0 = tiny_backend.velocity(x, s, tiny_backend.encode_prompts(["a red square"]))
    assert not torch.allclose(v_a, v_base, atol=1e-4)
    assert torch.allclose(v_b, v_base, atol=1e-6) and torch.allclose(v_0, v_base, atol=1e-6)


def test_merged_adapter_computes_as_the_adapter_and_restores_the_base_bit_for_bit(tiny_backend):
    x, s = torch.randn(3, 3, 32, 32), torch.tensor([0.2, 0.5, 0.9])
    tiny_backend.add_adapter("extra", rank=4)
    tiny_backend.add_adapter("b", rank=2)
    with torch.no_grad():
        for name, p in tiny_backend.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tiny_backend.set_adapter("extra")
    weights = {k: v.clone() for k, v in tiny_backend.net.state_dict().items()}

    def v():
        return tiny_backend.velocity(x, s, tiny_backend.encode_prompts(["a red square", "a blue circle", None]))

    with torch.no_grad():
        v_a, v_0 = v(), None
        with tiny_backend.adapter("b"):
            v_b = v()
        with tiny_backend.adapter(None):
            v_0 = v()
        with tiny_backend.merged():  # the active adapter, extra
            m_a = v()
        with tiny_backend.merged("b"):
            m_b = v()
        with tiny_backend.adapter(None), tiny_backend.merged():  # adapters off: the bare base, nothing folded
            m_0 = v()
        with pytest.raises(KeyError):
            with tiny_backend.merged("nope"):
                pass
    assert not torch.allclose(v_a, v_0, atol=1e-3) and not torch.allclose(v_b, v_0, atol=1e-3)
    for got, want in ((m_a, v_a), (m_b, v_b), (m_0, v_0)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert tiny_backend.active_adapter == "extra"
    assert all(torch.equal(weights[k], t) for k, t in tiny_backend.net.state_dict().items())
    with torch.no_grad():
        assert torch.equal(v(), v_a)
    # with gradients on nothing is folded: the gradient reaches the active LoRA, not the frozen base
    with tiny_backend.merged():
        v().square().mean().backward()
    grads = {n: p.grad for n, p in tiny_backend.net.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n and ".extra." in n for n in grads)


def test_role_embedding_tells_the_two_objects_apart_and_round_trips(tmp_path):
    from flowopd.backends.tiny import TinyBackend, save_checkpoint
    from flowopd.backends.tiny_model import TinyConfig, TinyUNet

    tok = Tokenizer()
    model = TinyUNet(TinyConfig(channels=(8, 8, 8), roles=True))
    ids, _ = tok.batch(["a red square and a blue circle", "a circle left of a square", "three squares",
                        'a sign that says "AB"'])
    roles = model.text.roles(ids)
    assert roles[0, :7].tolist() == [0, 0, 0, 1, 2, 2, 2]  # first object, "and", second object
    assert roles[1, :6].tolist() == [0, 0, 1, 1, 2, 2]  # "left of" is one connective
    assert roles[2, :2].tolist() == [0, 0] and roles[3].max() == 0  # one object; a sign has no roles
    torch.nn.init.normal_(model.text.role.weight)
    save_checkpoint(TinyBackend(model, "cpu"), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model"]["roles"] is True
    back = load_checkpoint(tmp_path / "ck").model
    assert back.cfg.roles and torch.equal(back.text.role.weight, model.text.role.weight)
    # a model without roles has no such parameters (format 1 checkpoints keep loading as they were)
    assert not any("role" in k for k in TinyUNet(TinyConfig(channels=(8, 8, 8))).state_dict())


def test_without_pooled_text_the_prompt_reaches_the_image_only_through_cross_attention(tmp_path):
    from flowopd.backends.tiny import TinyBackend, save_checkpoint
    from flowopd.backends.tiny_model import TinyConfig, TinyUNet

    torch.manual_seed(0)
    tok = Tokenizer()
    ids, slots = tok.batch(["a red square left of a blue circle", "three green triangles"])
    x, sigma = torch.randn(2, 3, 32, 32), torch.full((2,), 0.7)

    def velocity(m, ids):
        with torch.no_grad():
            return m(x, sigma, m.encode(ids, slots))

    for pooled in (True, False):
        m = TinyUNet(TinyConfig(channels=(8, 8, 8), text_dim=16, heads=2, groups=4, cond_dim=16,
                                pooled_text=pooled, xattn_full=True)).eval()
        for p in m.parameters():  # leave no zero-initialised path that would hide a dependence
            torch.nn.init.normal_(p, std=0.2)
        assert hasattr(m, "xattn1") and hasattr(m, "xattn_up1") and hasattr(m, "pool_proj") == pooled
        swapped = velocity(m, ids.flip(0))
        assert not torch.allclose(velocity(m, ids), swapped)
        names = [n for n, _ in m.named_children() if n.startswith("xattn")]
        assert len(names) == 6  # 32x32 (down, up), 16x16 (down, up), 8x8 (down, up)
        for n in names:
            torch.nn.init.zeros_(getattr(m, n).to_out.weight)
            torch.nn.init.zeros_(getattr(m, n).to_out.bias)
        # with every cross-attention silenced the prompt still acts through the pooled FiLM, and only there
        assert torch.allclose(velocity(m, ids), velocity(m, ids.flip(0))) != pooled
    save_checkpoint(TinyBackend(m, "cpu"), tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck").model
    assert back.cfg.xattn_full and not back.cfg.pooled_text
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    # a config written before these options existed loads with them at their old behaviour
    assert TinyConfig.from_dict({"channels": [8, 8, 8]}).pooled_text is True
    assert TinyConfig.from_dict({"channels": [8, 8, 8]}).xattn_full is False


def test_lora_targets_in_the_prompt_encoder_are_refused(tiny_backend):
    # the prompt encoder's token table and its transformer layers (which run a fused path under
    # no_grad that would skip the adapter) are not LoRA targets; the image model's layers are
    with pytest.raises(ConfigError, match="prompt encoder"):
        tiny_backend.add_adapter("t", rank=2, targets=["to_q", "tok"])
    with pytest.raises(ConfigError, match="prompt encoder"):
        tiny_backend.add_adapter("t", rank=2, targets=["linear1"])
    assert tiny_backend.adapters == []
    tiny_backend.add_adapter("t", rank=2, targets=["to_q", "conv1"])
    assert tiny_backend.adapters == ["t"]


def test_the_patch_model_works_on_2x2_patches_without_a_32x32_level_and_round_trips(tmp_path):
    from flowopd.backends.tiny import FORMAT, TinyBackend, save_checkpoint
    from flowopd.backends.tiny_model import TinyConfig, TinyUNet

    torch.manual_seed(0)
    cfg = TinyConfig(channels=(8, 8), text_dim=16, heads=2, groups=4, cond_dim=16, patch=2)
    m = TinyUNet(cfg).eval()
    for p in m.parameters():  # no zero-initialised output layer hiding the function
        torch.nn.init.normal_(p, std=0.2)
    sizes = []
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            mod.register_forward_hook(lambda mod, i, o: sizes.append(o.shape[-1]))
    b = TinyBackend(m, "cpu", {"steps": 4, "cfg": 2.0, "shift": 1.0})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        v = b.velocity(x, torch.full((2,), 0.5), b.encode_prompts(["a red square", "two circles"]))
    assert v.shape == (2, 3, 32, 32) and max(sizes) == 16 and min(sizes) == 8  # levels 16x16 and 8x8 only
    assert not any(n in dict(m.named_children()) for n in ("down1", "up1", "pool1", "unpool1"))
    # it saves and loads as format FORMAT with `patch` recorded, and samples the same
    save_checkpoint(b, tmp_path / "ck")
    conf = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert conf["format"] == FORMAT == 4 and conf["model"]["patch"] == 2 and conf["model"]["channels"] == [8, 8]
    back = load_checkpoint(tmp_path / "ck")
    prompts = ["a blue circle", 'a sign that says "7"']
    assert np.array_equal(sample_images(b, prompts, progress=False), sample_images(back, prompts, progress=False))
    # LoRA adapters reach its layers: a rank-2 adapter trains every default target there
    back.add_adapter("t", rank=2)
    v = back.velocity(x, torch.full((2,), 0.5), back.encode_prompts(["a red square", "two circles"]))
    v.square().mean().backward()
    grads = [p.grad for n, p in back.net.named_parameters() if "lora_B" in n]  # B starts at 0: A's grads are 0
    assert len(grads) > 20 and all(g is not None and g.abs().sum() > 0 for g in grads)
    # a model config written before the key existed is the pixel U-Net
    assert TinyConfig.from_dict({"channels": [8, 8, 8]}).patch == 1


def test_patch_channels_and_the_32x32_cross_attention_must_fit_together():
    from flowopd.backends.tiny_model import TinyConfig
    from flowopd.trainers.pretrain import PretrainConfig, _model_config

    for bad, msg in [(dict(patch=3), "patch must be 1 or 2"), (dict(patch=2), "patch 2 takes 2 channel widths"),
                     (dict(channels=(8, 8)), "patch 1 takes 3 channel widths"),
                     (dict(patch=2, channels=(8, 8), xattn_full=True), "no 32x32 level")]:
        with pytest.raises(ValueError, match=msg):
            TinyConfig(**bad)
    with pytest.raises(ConfigError, match="patch 2 takes 2 channel widths"):
        _model_config(PretrainConfig(patch=2))
    assert _model_config(PretrainConfig(patch=2, channels=[8, 8])).patch == 2
