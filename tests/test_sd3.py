"""The SD3 back end and the SD3 rewards, offline on the CPU with tiny models built from configs.

Known answers: our Euler sampler reproduces diffusers' scheduler loop and the pipeline's own
__call__; adapters change outputs independently and `adapter(None)` is the base; a LoRA saved by us
loads with diffusers' `load_lora_weights` (and back) with the same outputs; the first GRPO ratio is
exactly 1 and gradients reach the active LoRA only; OCR of a PIL-rendered sign scores 1.

The OCR test needs the tesseract binary (Debian/Ubuntu: apt-get install tesseract-ocr) and the
pytesseract package; it is skipped without them.
"""
import http.server
import pickle
import shutil
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowopd.backends.base import cond_cat  # noqa: E402
from flowopd.backends.sd3 import SD3Backend, SD3Error, load_sd3_checkpoint  # noqa: E402
from flowopd.flow import ode_sample, sde_step, sigma_grid  # noqa: E402
from flowopd.losses import grpo_loss, mar_loss, opd_direct_loss  # noqa: E402
from flowopd.rewards import sd3_rewards as R  # noqa: E402
from flowopd.sampling import guided_velocity  # noqa: E402
from sd3_tiny import tiny_sd3_backend, tiny_sd3_components  # noqa: E402

PROMPTS = ["a photo of a cat", 'a sign that says "HI"']


@pytest.fixture
def backend():
    return tiny_sd3_backend(0)


def _lora_params(backend, name):
    return backend._adapter_params[name]


# ----------------------------------------------------------------------------- interface


def test_shapes_dtypes_and_prompt_cache(backend):
    emb, pooled = backend.encode_prompts(PROMPTS + [None])
    assert emb.shape == (3, 77 + backend.max_sequence_length, 32) and pooled.shape == (3, 16)
    e2, p2 = backend.encode_prompts([""])  # None is the empty prompt
    assert torch.equal(e2[0], emb[2]) and torch.equal(p2[0], pooled[2])
    assert set(backend._cache) == {PROMPTS[0], PROMPTS[1], ""}
    x = torch.randn(3, *backend.latent_shape())
    assert backend.latent_shape() == (4, 16, 16)
    v = backend.velocity(x, torch.tensor([1.0, 0.5, 0.1]), (emb, pooled))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    imgs = backend.decode(x)
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.uint8
    assert backend.trainable_parameters() == []  # the base is frozen


def test_euler_sampler_matches_diffusers_scheduler_and_pipeline(backend):
    """ode_sample over sigma_grid(shift 3) with CFG 4.5 == diffusers' scheduler loop == the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, cfg = 4, 4.5
    sigmas = sigma_grid(steps, 3.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    assert torch.equal(sched.sigmas, sigmas)
    noise = torch.randn((2, *backend.latent_shape()), generator=torch.Generator().manual_seed(0))
    cond, uncond = backend.encode_prompts(PROMPTS), backend.encode_prompts([None, None])
    with torch.no_grad():
        ours = ode_sample(guided_velocity(backend, cond, uncond, cfg), noise, sigmas)
        # diffusers' loop, written as the pipeline does it (uncond first, timestep = t)
        emb, pooled = cond_cat([uncond, cond])
        x = noise.clone()
        for t in sched.timesteps:
            out = backend.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(4), encoder_hidden_states=emb,
                                      pooled_projections=pooled, return_dict=False)[0]
            v_u, v_c = out.chunk(2)
            x = sched.step(v_u + cfg * (v_c - v_u), t, x, return_dict=False)[0]
        piped = backend.pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=cfg,
                             height=32, width=32, output_type="latent",
                             max_sequence_length=backend.max_sequence_length).images
        img = backend.pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=cfg,
                           height=32, width=32, output_type="np",
                           max_sequence_length=backend.max_sequence_length).images
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
    assert torch.allclose(ours, piped, atol=1e-5), (ours - piped).abs().max()
    ours_img = backend.decode(ours).astype(int)
    assert np.abs(ours_img - (img * 255).round().astype(int)).max() <= 1


# ----------------------------------------------------------------------------- adapters


def test_named_adapters_are_independent_and_none_is_the_base(backend):
    cond = backend.encode_prompts(PROMPTS)
    x = torch.randn(2, *backend.latent_shape())
    s = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        base = backend.velocity(x, s, cond)
        backend.add_adapter("a", rank=4, alpha=8, init=False)
        backend.add_adapter("b", rank=4, alpha=8, init=False)
        assert backend.active_adapter == "b"
        v_b = backend.velocity(x, s, cond)
        with backend.adapter("a"):
            v_a = backend.velocity(x, s, cond)
            assert backend.active_adapter == "a"
        assert backend.active_adapter == "b"
        with backend.adapter(None):
            v_none = backend.velocity(x, s, cond)
            assert backend.active_adapter is None and backend.trainable_parameters() == []
        assert torch.equal(v_none, base)
        assert (v_a - base).abs().max() > 1e-3 and (v_b - base).abs().max() > 1e-3 and (v_a - v_b).abs().max() > 1e-3
        for p in _lora_params(backend, "a"):  # changing a leaves b alone
            p.add_(0.5)
        assert torch.equal(backend.velocity(x, s, cond), v_b)
        with backend.adapter("a"):
            assert (backend.velocity(x, s, cond) - v_a).abs().max() > 1e-3
    # only the active adapter trains; a frozen adapter never does
    trainable = {id(p) for p in backend.trainable_parameters()}
    assert trainable == {id(p) for p in _lora_params(backend, "b")}
    backend.set_trainable("b", False)
    assert backend.trainable_parameters() == []
    with pytest.raises(KeyError):
        backend.set_adapter("nope")


def test_default_lora_is_flow_grpo_and_starts_as_identity(backend):
    cond = backend.encode_prompts(PROMPTS)
    x = torch.randn(2, *backend.latent_shape())
    with torch.no_grad():
        base = backend.velocity(x, 0.5, cond)
        backend.add_adapter("student")
        assert torch.equal(backend.velocity(x, 0.5, cond), base)  # gaussian init: B = 0
    c = backend.adapter_config("student")
    assert (c.r, c.lora_alpha) == (32, 64) and sorted(c.target_modules) == sorted(
        ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
         "attn.to_q", "attn.to_v"])
    names = {n for n, p in backend.transformer.named_parameters() if p.requires_grad}
    assert any(".to_add_out." in n for n in names) and any(".add_q_proj." in n for n in names)
    assert not any(".attn2." in n for n in names)  # SD3.5's second attention is not a Flow-GRPO target
    assert all(p.dtype == torch.float32 for p in backend.trainable_parameters())


def test_lora_save_loads_in_diffusers_and_back(backend, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    backend.add_adapter("a", rank=4, alpha=16, init=False)  # alpha != rank: the metadata must carry it
    cond = backend.encode_prompts(PROMPTS)
    x = torch.randn(2, *backend.latent_shape())
    with torch.no_grad():
        want = backend.velocity(x, 0.6, cond)
    out = backend.save_lora("a", tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    tr, vae, (t1, t2, t3), (k1, k2, k3) = tiny_sd3_components(0)  # fresh base weights, same seed
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=t1, tokenizer=k1, text_encoder_2=t2, tokenizer_2=k2,
                                    text_encoder_3=t3, tokenizer_3=k3)
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        got = pipe.transformer(hidden_states=x, timestep=torch.full((2,), 600.0), encoder_hidden_states=cond[0],
                               pooled_projections=cond[1], return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    # ... and back into a backend, as a frozen teacher, from diffusers' and from peft's format
    other = tiny_sd3_backend(0)
    other.add_adapter("student")
    other.load_lora("teacher", out)
    assert other.active_adapter == "student" and "teacher" not in [n for n in other._trainable]
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    backend.adapter_config("a").save_pretrained(str(peft_dir))
    from safetensors.torch import save_file

    save_file({f"base_model.model.{k}": v.contiguous() for k, v in backend.adapter_state_dict("a").items()},
              str(peft_dir / "adapter_model.safetensors"))
    other.load_lora("teacher_peft", peft_dir)
    with torch.no_grad():
        for name in ("teacher", "teacher_peft"):
            with other.adapter(name):
                assert torch.allclose(other.velocity(x, 0.6, cond), want, atol=1e-5)
    with pytest.raises(SD3Error):
        other.load_lora("missing", tmp_path / "nowhere")


# ----------------------------------------------------------------------------- training steps


def test_sde_step_grpo_loss_reaches_only_the_active_lora(backend):
    backend.add_adapter("teacher", rank=4, init=False, trainable=False)
    backend.add_adapter("student", rank=4)
    cond, uncond = backend.encode_prompts(PROMPTS), backend.encode_prompts([None, None])
    sig = sigma_grid(3, 3.0)
    x = torch.randn((2, *backend.latent_shape()), generator=torch.Generator().manual_seed(1))
    vel = guided_velocity(backend, cond, uncond, 4.5)
    with torch.no_grad():  # 1. rollout: one SDE step, its log-prob
        old = sde_step(x, vel(x, sig[0].expand(2)), sig[0], sig[1], 0.7, generator=torch.Generator().manual_seed(2))
    new = sde_step(x, vel(x, sig[0].expand(2)), sig[0], sig[1], 0.7, prev_sample=old.sample)  # 4. update
    assert torch.equal(new.log_prob, old.log_prob)  # the first ratio is exactly 1
    loss, stats = grpo_loss(new.log_prob, old.log_prob, torch.tensor([1.0, -1.0]), 1e-4)
    assert stats["ratio_mean"].item() == 1.0
    loss.backward()
    student = {id(p) for p in _lora_params(backend, "student")}
    for n, p in backend.transformer.named_parameters():
        if id(p) in student:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for p in _lora_params(backend, "student"))


def test_opd_step_with_two_teacher_adapters(backend):
    """Student samples; samples 0,1 routed to teacher t0, samples 2,3 to t1; MAR to the base."""
    for t in ("t0", "t1"):
        backend.add_adapter(t, rank=4, init=False, trainable=False)
    backend.add_adapter("student", rank=4)
    prompts = PROMPTS * 2
    cond, uncond = backend.encode_prompts(prompts), backend.encode_prompts([None] * 4)
    sig = sigma_grid(3, 3.0)
    x = torch.randn((4, *backend.latent_shape()), generator=torch.Generator().manual_seed(3))
    vel = guided_velocity(backend, cond, uncond, 4.5)
    with torch.no_grad():
        x_next = sde_step(x, vel(x, sig[0].expand(4)), sig[0], sig[1], generator=torch.Generator().manual_seed(4)).sample
        teacher_mean = torch.empty_like(x)
        for t, idx in (("t0", [0, 1]), ("t1", [2, 3])):
            with backend.adapter(t):
                v_t = guided_velocity(backend, tuple(c[idx] for c in cond), tuple(c[idx] for c in uncond), 4.5)(
                    x[idx], sig[0].expand(2))
                teacher_mean[idx] = sde_step(x[idx], v_t, sig[0], sig[1], prev_sample=x_next[idx]).mean
        with backend.adapter(None):
            anchor_mean = sde_step(x, vel(x, sig[0].expand(4)), sig[0], sig[1], prev_sample=x_next).mean
    assert backend.active_adapter == "student"
    st = sde_step(x, vel(x, sig[0].expand(4)), sig[0], sig[1], prev_sample=x_next)
    assert opd_direct_loss(st.mean, st.mean.detach(), st.std).item() == 0.0
    loss = opd_direct_loss(st.mean, teacher_mean, st.std) + mar_loss(st.mean, anchor_mean, st.std, 0.02)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in _lora_params(backend, "student"))
    assert all(p.grad is None for t in ("t0", "t1") for p in _lora_params(backend, t))


def test_bf16_weights_float32_velocity_and_checkpointing():
    b = tiny_sd3_backend(0, dtype="bf16", gradient_checkpointing=True)
    b.add_adapter("student", rank=4, init=False)
    assert b.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in b.trainable_parameters())
    cond = b.encode_prompts(PROMPTS)
    x = torch.randn(2, *b.latent_shape())
    b.transformer.train()
    v = b.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert v.dtype == torch.float32
    step = sde_step(x, v, 0.9, 0.7, prev_sample=x)
    assert step.log_prob.dtype == torch.float32
    step.log_prob.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in b.trainable_parameters())


def test_from_pretrained_and_checkpoint_round_trip(backend, tmp_path):
    backend.pipe.save_pretrained(str(tmp_path / "base"))
    loaded = SD3Backend.from_pretrained(tmp_path / "base", dtype="fp32", resolution=32, max_sequence_length=16)
    cond = backend.encode_prompts(PROMPTS)
    assert torch.equal(loaded.encode_prompts(PROMPTS)[0], cond[0])
    x = torch.randn(2, *backend.latent_shape())
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, 0.5, cond), backend.velocity(x, 0.5, cond))
    loaded.add_adapter("ocr", rank=4, init=False)
    with torch.no_grad():
        want = loaded.velocity(x, 0.5, cond)
    loaded.save_checkpoint(tmp_path / "ckpt", meta={"step": 1})
    again = load_sd3_checkpoint(tmp_path / "ckpt", dtype="fp32")
    assert again.adapters == ["ocr"] and again.active_adapter == "ocr" and again.trainable_parameters() == []
    with torch.no_grad():
        assert torch.allclose(again.velocity(x, 0.5, cond), want, atol=1e-6)
    with pytest.raises(SD3Error):
        SD3Backend.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(SD3Error):
        tiny_sd3_backend(0, resolution=30)


# ----------------------------------------------------------------------------- rewards


def test_ocr_reward_definition():
    assert R.ocr_target('A sign that says "Hello World" at night') == "Hello World"
    assert R.ocr_target("no quotes", {"text": "K7"}) == "K7"
    assert R.ocr_reward_from_text("HELLO\nworld\x0c", "Hello World") == 1.0  # case, whitespace
    assert R.ocr_reward_from_text("xx hello world yy", "hello world") == 1.0  # contained: distance 0
    assert R.ocr_reward_from_text("helo", "hello") == pytest.approx(0.8)
    assert R.ocr_reward_from_text("zzzzzzzzzzzzzzz", "abc") == 0.0  # distance capped at len(target)
    assert R.ocr_reward_from_text("anything", "") == 0.0
    assert R.edit_distance("kitten", "sitting") == 3


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs the tesseract binary (apt-get install tesseract-ocr)")
def test_ocr_reward_on_a_pil_rendered_sign():
    pytest.importorskip("pytesseract")
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (512, 128), "white")
    ImageDraw.Draw(img).text((24, 24), "HELLO 42", fill="black", font=ImageFont.load_default(size=64))
    images = np.stack([np.asarray(img)] * 2)
    reward = R.make_ocr_reward()(images, ['a sign that says "hello 42"', 'a sign that says "WORLD"'], None)
    assert reward.shape == (2,) and reward.dtype == torch.float32
    assert reward[0].item() == 1.0 and reward[1].item() < 0.5


def _tiny_clip_dir(path, projection_dim=8):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    _, _, _, (tokenizer, _, _) = tiny_sd3_components(0, t5=False)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=projection_dim)
    CLIPModel(cfg).save_pretrained(str(path))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=tokenizer)
    proc.save_pretrained(str(path))
    return path


def test_clip_family_rewards_from_a_local_dir(tmp_path):
    d = _tiny_clip_dir(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 255, (3, 48, 40, 3), dtype=np.uint8)
    prompts = ["a cat", "a dog", 'a sign that says "x"']
    pick = R.make_pickscore_reward(model=str(d), processor=str(d), device="cpu")(images, prompts, None)
    raw = R.make_pickscore_reward(model=str(d), processor=str(d), device="cpu", scale=1.0)(images, prompts, None)
    clip = R.make_clip_score_reward(model=str(d), device="cpu")(images, prompts, None)
    assert pick.shape == clip.shape == (3,) and torch.isfinite(pick).all()
    assert torch.allclose(pick * 26, raw, atol=1e-5) and torch.allclose(clip * 30, raw, atol=1e-5)
    mlp = R.aesthetic_mlp(8)
    torch.save(mlp.state_dict(), tmp_path / "aesthetic.pth")
    aes = R.make_aesthetic_reward(weights=tmp_path / "aesthetic.pth", clip_model=str(d), device="cpu")(images, prompts, None)
    assert aes.shape == (3,) and torch.isfinite(aes).all()
    with pytest.raises(R.RewardDependencyError):
        R.make_aesthetic_reward(weights=tmp_path / "missing.pth")
    with pytest.raises(R.RewardDependencyError):
        R.make_pickscore_reward(model=str(tmp_path / "nope"), processor=str(tmp_path / "nope"), device="cpu")


class _GenEvalStub(http.server.BaseHTTPRequestHandler):
    """Flow-GRPO's reward server protocol; fails the first `fail` requests with a 500."""

    fail = 0
    seen: list = []

    def do_POST(self):  # noqa: N802
        data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(data)
        if type(self).fail > 0:
            type(self).fail -= 1
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"Traceback ...\nRuntimeError: busy")
            return
        n = len(data["images"])
        assert all(img[:2] == b"\xff\xd8" for img in data["images"])  # JPEG
        scores = [np.float64(0.25 * (i % 4)) for i in range(n)]
        body = pickle.dumps({"scores": scores, "rewards": [float(s == 1) for s in scores], "strict_rewards": [0.0] * n,
                             "group_rewards": {"counting": [1.0]}, "group_strict_rewards": {}})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_geneval_client_speaks_the_reward_server_protocol():
    server = http.server.HTTPServer(("127.0.0.1", 0), _GenEvalStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _GenEvalStub.fail, _GenEvalStub.seen = 1, []
        meta = [{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"}] * 5
        images = np.zeros((5, 16, 16, 3), np.uint8)
        r = R.make_geneval_reward(url=url, batch_size=3, backoff=0.01)(images, ["two cats"] * 5, meta)
        assert r.tolist() == [0.0, 0.25, 0.5, 0.0, 0.25]  # two batches (3 + 2), the first retried once
        assert len(_GenEvalStub.seen) == 3 and _GenEvalStub.seen[-1]["only_strict"] is True
        assert _GenEvalStub.seen[-1]["meta_datas"][0]["tag"] == "counting"
        _GenEvalStub.fail = 10
        with pytest.raises(R.RewardServerError, match="busy"):
            R.make_geneval_reward(url=url, retries=2, backoff=0.01)(images[:1], ["x"], meta[:1])
        with pytest.raises(Exception, match="lacks"):
            R.make_geneval_reward(url=url)(images[:1], ["x"], [{"prompt": "x"}])
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(R.RewardServerError):  # nothing listens there
        R.make_geneval_reward(url=url, retries=1, backoff=0.01, timeout=2)(images[:1], ["x"], meta[:1])


def test_unpickling_server_answers_is_restricted():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError):
        R._safe_loads(pickle.dumps({"scores": [Evil()]}))
    ok = R._safe_loads(pickle.dumps({"scores": [np.float32(0.5), 1.0], "a": np.arange(3)}))
    assert float(ok["scores"][0]) == 0.5 and ok["a"].tolist() == [0, 1, 2]


def test_sd3_reward_factories_are_listed():
    assert set(R.SD3_REWARDS) == {"ocr", "pickscore", "clipscore", "aesthetic", "geneval", "deqa", "unifiedreward"}
    lazy = R.lazy(R.make_geneval_reward, url="http://127.0.0.1:9")
    assert lazy.__name__ == "geneval"  # nothing built or contacted until called
