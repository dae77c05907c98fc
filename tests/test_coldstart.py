import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowopd.backends.tiny import load_checkpoint, save_checkpoint
from flowopd.config import ConfigError
from flowopd.routing import TeacherBank
from flowopd.trainers import coldstart as cs
from flowopd.trainers.coldstart import (ColdStartConfig, base_state, coldstart, concat_loras,
                                        lora_delta, lora_deltas, main_coldstart, read_teacher, standin_teacher)
from conftest import perturbed_tiny_checkpoint


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return perturbed_tiny_checkpoint(tmp_path_factory.mktemp("base") / "ckpt")


@pytest.fixture(scope="module")
def teachers(base_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {"compose": standin_teacher(root / "compose", "compose", base_ckpt, rank=4, scale=0.05, seed=1),
            "text": standin_teacher(root / "text", "text", base_ckpt, rank=2, scale=0.05, seed=2)}


def _merged_by_peft(backend, name):
    """Full weights of base + adapter `name` as peft itself merges them."""
    peft = copy.deepcopy(backend._peft)
    peft.set_adapter(name)
    return {k: v for k, v in peft.merge_and_unload().state_dict().items()}


def test_lora_delta_matches_peft_merge(base_ckpt, teachers):
    """Our dense delta of B @ A (linear and conv modules) equals peft's own merge."""
    t = read_teacher(teachers["compose"], base_ckpt)
    assert t.kind == "lora" and t.rank == 4
    b = load_checkpoint(base_ckpt)
    b.attach_lora("t", t.lora, t.rank, t.alpha, t.targets)
    merged = _merged_by_peft(b, "t")
    base = base_state(base_ckpt)
    deltas = t.deltas()
    assert any(d.ndim == 4 for d in deltas.values()) and any(d.ndim == 2 for d in deltas.values())
    for k in base:
        assert torch.allclose(merged[k], base[k] + deltas.get(k, 0.0), atol=1e-6), k


def test_merge_of_two_loras_is_the_average_of_dense_deltas(base_ckpt, teachers):
    ta, tb = read_teacher(teachers["compose"], base_ckpt), read_teacher(teachers["text"], base_ckpt)
    merged = concat_loras([ta.lora, tb.lora], [ta.scale, tb.scale], [0.5, 0.5])
    da, db, dm = ta.deltas(), tb.deltas(), lora_deltas(merged, 1.0)
    assert set(dm) == set(da) | set(db)
    for k in dm:
        avg = 0.5 * da[k] + 0.5 * db[k]
        assert (dm[k] - avg).abs().max() <= 1e-6, k
    # ...and it is not the product of averaged factors (what a naive merge would give)
    k = next(iter(ta.lora))
    (A1, B1), (A2, B2) = ta.lora[k], tb.lora[k]
    naive = lora_delta(0.5 * (A1[:2] + A2), 0.5 * (B1[:, :2] * ta.scale + B2 * tb.scale), 1.0)  # same ranks: 2
    assert (naive - (0.5 * da[f"{k}.weight"] + 0.5 * db[f"{k}.weight"])).abs().max() > 1e-4

    # through peft: the concatenated adapter on the base computes base + average delta
    b = load_checkpoint(base_ckpt)
    b.attach_lora("m", merged, 6, 6.0, sorted(set(ta.targets) | set(tb.targets)))
    full = _merged_by_peft(b, "m")
    base = base_state(base_ckpt)
    for k in base:
        assert (full[k] - base[k] - 0.5 * (da.get(k, 0.0) + db.get(k, 0.0))).abs().max() <= 1e-6, k


def test_weighted_merge_command_writes_a_loadable_checkpoint(base_ckpt, teachers, tmp_path):
    out = main_coldstart("merge", [str(teachers["compose"]), f"text={teachers['text']}"], tmp_path / "m",
                         [f"base={base_ckpt}", "weights=[0.75,0.25]"])
    conf = json.loads((out / "config.json").read_text())
    assert conf["adapters"]["merge"]["rank"] == 6 and conf["meta"]["method"] == "merge"
    assert conf["meta"]["weights"] == {"compose": 0.75, "text": 0.25}
    load_checkpoint(out)  # full weights load
    full = {k: v for k, v in load_file(str(out / "model.safetensors")).items()}
    base = base_state(base_ckpt)
    ta, tb = read_teacher(teachers["compose"], base_ckpt), read_teacher(teachers["text"], base_ckpt)
    for k in base:
        want = base[k] + 0.75 * ta.deltas().get(k, 0.0) + 0.25 * tb.deltas().get(k, 0.0)
        assert torch.allclose(full[k], want, atol=1e-6), k
    m = read_teacher(out, base_ckpt)  # the saved adapter sits exactly on the base
    assert m.kind == "lora" and m.rank == 6


def test_dense_teacher_merge_and_swap(base_ckpt, teachers, tmp_path):
    """A full fine-tuned teacher is a dense delta: merged exactly, and evaluated on the shared base
    by swapping its weights in (and back out, exactly)."""
    base = base_state(base_ckpt)
    g = torch.Generator().manual_seed(3)
    full = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_checkpoint(load_checkpoint(base_ckpt), tmp_path / "dense", {"recipe": {"tasks": ["quality"]}}, state_dict=full)
    td = read_teacher(tmp_path / "dense", base_ckpt)
    assert td.kind == "dense" and td.name == "quality"
    out = coldstart("merge", [str(teachers["compose"]), str(tmp_path / "dense")], tmp_path / "m",
                    ColdStartConfig(base=str(base_ckpt)))
    assert not (out / "adapters").exists()
    merged = load_file(str(out / "model.safetensors"))
    ta = read_teacher(teachers["compose"], base_ckpt)
    for k in base:
        want = base[k] + 0.5 * ta.deltas().get(k, 0.0) + 0.5 * (full[k] - base[k])
        assert torch.allclose(merged[k], want, atol=1e-6), k

    b = load_checkpoint(base_ckpt)
    bank = TeacherBank(b)
    bank.add("compose", ta)
    bank.add("quality", td)
    b.add_adapter("student", rank=2)
    x, s = torch.randn(3, 3, 32, 32), torch.full((3,), 0.5)
    cond = b.encode_prompts(["a red square"] * 3)
    before = [p.detach().clone() for p in b.model.parameters()]
    with torch.no_grad(), bank.use("quality"):
        v_bank = b.velocity(x, s, b.encode_prompts(["a red square"] * 3))
    ref = load_checkpoint(tmp_path / "dense")
    with torch.no_grad():
        v_ref = ref.velocity(x, s, ref.encode_prompts(["a red square"] * 3))
    assert torch.allclose(v_bank, v_ref, atol=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(before, b.model.parameters()))  # restored exactly
    with torch.no_grad(), bank.use("compose"):
        v_c = b.velocity(x, s, cond)
    ref_c = load_checkpoint(teachers["compose"])
    with torch.no_grad():
        assert torch.allclose(v_c, ref_c.velocity(x, s, ref_c.encode_prompts(["a red square"] * 3)), atol=1e-5)


def test_teacher_on_another_base_becomes_dense(base_ckpt, teachers, tmp_path):
    """A LoRA whose merged weights are not base + LoRA (trained over another init) is read as dense."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json",):
        (bad / f).write_text((teachers["text"] / f).read_text())
    (bad / "adapters").mkdir()
    (bad / "adapters" / "text.safetensors").write_bytes((teachers["text"] / "adapters" / "text.safetensors").read_bytes())
    sd = load_file(str(teachers["text"] / "model.safetensors"))
    k = next(iter(sd))
    sd[k] = sd[k] + 0.1
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.warns(UserWarning, match="does not sit on this base"):
        t = read_teacher(bad, base_ckpt)
    assert t.kind == "dense" and k in t.dense


def test_unknown_method_and_duplicate_tasks(base_ckpt, teachers, tmp_path):
    with pytest.raises(ConfigError, match="method"):
        coldstart("average", [str(teachers["text"])], tmp_path / "x", ColdStartConfig(base=str(base_ckpt)))
    with pytest.raises(ConfigError, match="two teachers"):
        coldstart("merge", [str(teachers["text"]), str(teachers["text"])], tmp_path / "x", ColdStartConfig(base=str(base_ckpt)))


def test_sft_keeps_each_prompts_best_sample_and_fits_a_lora(base_ckpt, teachers, tmp_path, monkeypatch):
    seen = {}

    def fake_get_reward(name):
        def r(images, prompts, metadata=None):
            # score = mean brightness, so the best candidate is the brightest image
            s = torch.as_tensor(images.reshape(len(images), -1).mean(1), dtype=torch.float32)
            seen.setdefault(name, []).append((images.copy(), s))
            return s
        return r

    monkeypatch.setattr(cs, "get_reward", fake_get_reward)
    cfg = ColdStartConfig(base=str(base_ckpt), sft_prompts_per_task=2, sft_candidates=3, sft_sample_steps=2,
                          sft_steps=3, sft_batch=4, sft_rank=4)
    import random

    prompts, images, stats = cs.best_samples(teachers["text"], "text", "text", cfg, random.Random(0), seed=0)
    cand, s = seen["text"][-1]
    s = s.view(2, 3)
    for i in range(2):
        assert (images[i] == cand[i * 3 + int(s[i].argmax())]).all()
    assert stats["reward_best"] >= stats["reward_mean"]
    out = coldstart("sft", [str(teachers["compose"]), str(teachers["text"])], tmp_path / "sft", cfg)
    conf = json.loads((out / "config.json").read_text())
    assert conf["adapters"]["sft"]["rank"] == 4 and conf["meta"]["n_samples"] == 4
    assert read_teacher(out, base_ckpt).kind == "lora"
    load_checkpoint(out)
    assert (out / "sft_log.jsonl").read_text().strip()


def test_svd_fit_recovers_a_low_rank_delta(base_ckpt, teachers):
    from flowopd.trainers.coldstart import svd_lora

    t = read_teacher(teachers["compose"], base_ckpt)  # rank 4
    modules = list(t.lora)
    fit, resid = svd_lora(t.deltas(), modules, rank=4)
    assert resid < 1e-5
    d_fit, d = lora_deltas(fit, 1.0), t.deltas()
    assert all((d_fit[k] - d[k]).abs().max() < 1e-5 for k in d)
    _, resid1 = svd_lora(t.deltas(), modules, rank=1)
    assert 0 < resid1 < 1
