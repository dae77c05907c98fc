"""The trainers on the SD3 back end, through the CLI, with the shipped sd35m configs.

A tiny SD3.5-shaped pipeline (2 MMDiT blocks, tiny CLIP/T5 text encoders, built from configs) is
saved to a temp dir and passed as `model`; every sd35m config loads with it; `flowopd grpo` with
sd35m_grpo_ocr.yaml (batch keys shrunk) trains one iteration in a subprocess and writes a LoRA that
diffusers loads; `flowopd distill` with sd35m_opd.yaml distils that GRPO run and a second LoRA
teacher (two named adapters on one transformer) from the exact merge cold start. Plus the pieces:
prompt files, the reward registry, make_backend, mixed precision.
"""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowopd.backends import make_backend  # noqa: E402
from flowopd.backends.sd3 import SD3Backend  # noqa: E402
from flowopd.config import ConfigError, load  # noqa: E402
from flowopd.prompt_sources import PromptSources, read_prompt_records  # noqa: E402
from flowopd.trainers.grpo import GRPOConfig  # noqa: E402
from flowopd.trainers.opd import OPDConfig, load_config  # noqa: E402
from sd3_tiny import tiny_sd3_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRPO_CONFIGS = sorted(p for p in (ROOT / "configs").glob("sd35m_grpo_*.yaml") if p.stem != "sd35m_grpo_mix")  # teachers
TINY = dict(resolution=32, max_sequence_length=16, dtype="fp32", device="cpu")
SMALL = dict(steps=1, prompts_per_step=2, group_size=2, sample_steps=2, micro_batch=2, grad_accum=2,
             eval_every=1, eval_steps=2, eval_prompts=1)
REWARD_MODULE = '''
import numpy as np


def brightness(images, prompts, metadata=None):
    return np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3)) / 255.0
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny SD3 pipeline, an OCR dataset dir in Flow-GRPO's layout, a reward module."""
    d = tmp_path_factory.mktemp("sd3world")
    tiny_sd3_backend(0).pipe.save_pretrained(str(d / "model"))
    (d / "ocr").mkdir()
    (d / "ocr" / "train.txt").write_text('A sign that says "HI"\nA poster that says "OK 42"\n')
    (d / "ocr" / "test.txt").write_text('A sign that says "TEST"\n')
    (d / "dt_reward.py").write_text(REWARD_MODULE)
    return d


def _run(args, world, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(world)]), OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "flowopd", *args], env=env, capture_output=True, text=True,
                         timeout=300, cwd=world)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _config(src: Path, dst: Path, **changes) -> Path:
    c = yaml.safe_load(src.read_text())
    c.update(changes)
    dst.write_text(yaml.safe_dump(c))
    return dst


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", GRPO_CONFIGS, ids=lambda p: p.stem)
def test_sd35m_grpo_configs_load(path, world):
    cfg = load(GRPOConfig, path, [f"model={world / 'model'}"])
    assert cfg.backend == "sd3" and cfg.model == str(world / "model") and cfg.tasks == [cfg.adapter_name]
    assert cfg.prompts == {cfg.tasks[0]: f"dataset/{cfg.tasks[0]}"} and cfg.lora_init == "gaussian"
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.group_size, cfg.sample_steps, cfg.eval_steps) == (32, 64, 24, 10, 40)
    assert cfg.mixed_precision == "none" and cfg.adam_eps == 1e-8 and cfg.eval_every == 60
    assert cfg.prompts_per_step % 8 == 0  # shares out over 8 GPUs


def test_sd35m_opd_config_loads(world):
    cfg = load_config(ROOT / "configs" / "sd35m_opd.yaml", [f"model={world / 'model'}", "teachers.ocr=runs/x"])
    assert isinstance(cfg, OPDConfig) and cfg.backend == "sd3" and cfg.model == str(world / "model")
    assert sorted(cfg.teachers) == ["geneval", "ocr", "pickscore"] and cfg.teachers["ocr"] == "runs/x"
    assert (cfg.init, cfg.rule, cfg.routing, cfg.beta, cfg.ema_decay, cfg.lora_alpha) == ("merge", "kl_only", "task", 0.04, 0.987, 64)
    assert sorted(cfg.prompts) == cfg.tasks == sorted(cfg.tasks)


def test_model_keys_are_checked(world):
    with pytest.raises(ConfigError, match="needs model"):
        load(GRPOConfig, GRPO_CONFIGS[0], ["model="])
    with pytest.raises(ConfigError, match="backend: sd3"):
        load(GRPOConfig, None, ["model=x"])  # the tiny back end takes no model
    with pytest.raises(ConfigError, match="not a toy task"):
        load(GRPOConfig, None, ["tasks=[ocr]"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        load(GRPOConfig, GRPO_CONFIGS[0], ["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="routing"):
        load_config(ROOT / "configs" / "sd35m_opd.yaml", ["routing=reward"])


# ----------------------------------------------------------------------------- pieces


def test_prompt_files_and_dataset_dirs(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert [r["prompt"] for r in read_prompt_records(tmp_path / "p.txt")] == ["a cat", "a dog"]
    lines = [{"prompt": "two cats", "task": "geneval", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
             {"prompt": 'a sign that says "A"', "task": "ocr"}, {"prompt": "untagged"}]
    (tmp_path / "mix.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    src = PromptSources(["geneval", "ocr"], str(tmp_path / "mix.jsonl"))
    assert [r["prompt"] for r in src.sources["geneval"].records()] == ["two cats", "untagged"]
    assert src.sources["geneval"].records()[0]["metadata"]["tag"] == "counting"  # reaches the reward
    prompts, tasks, meta = src.draw_batch(random.Random(0), {"geneval": 3, "ocr": 2})
    assert sorted(tasks) == ["geneval"] * 3 + ["ocr"] * 2
    assert all(p in ("two cats", "untagged") for p, t in zip(prompts, tasks) if t == "geneval")
    (tmp_path / "ge").mkdir()
    (tmp_path / "ge" / "train_metadata.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (tmp_path / "ge" / "test_metadata.jsonl").write_text(json.dumps(dict(lines[0], prompt="three cats")) + "\n")
    ge = PromptSources(["geneval"], {"geneval": str(tmp_path / "ge")})
    assert ge.eval_set() == [("three cats", "geneval", {"prompt": "three cats", "tag": "counting",
                                                         "include": [{"class": "cat", "count": 2}]})]
    with pytest.raises(ConfigError, match="not found"):
        PromptSources(["ocr"], {"ocr": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="not a toy task"):
        PromptSources(["ocr"], {})
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        read_prompt_records(tmp_path / "bad.jsonl")


def test_toy_prompts_are_drawn_as_before():
    counts = {"compose": 3, "text": 2, "quality": 1}
    from flowopd.world.prompts import sample_prompt

    rng = random.Random(5)  # the trainers' draw before prompt sources existed
    tasks = [t for t, n in counts.items() for _ in range(n)]
    rng.shuffle(tasks)
    a = ([sample_prompt(rng, t, "train").text for t in tasks], tasks)
    b = PromptSources(list(counts), {}).draw_batch(random.Random(5), counts)
    assert b[:2] == a and b[2] == [{}] * 6


def test_sd3_rewards_are_registered_lazily():
    from flowopd.rewards import REWARDS, get_reward

    assert {"ocr", "pickscore", "clipscore", "aesthetic", "geneval"} <= set(REWARDS)
    assert callable(get_reward("geneval"))  # nothing contacted or loaded until called


def test_make_backend_and_mixed_precision(world):
    cfg = load(GRPOConfig, GRPO_CONFIGS[0], [f"model={world / 'model'}", *(f"{k}={v}" for k, v in TINY.items())])
    b = make_backend(cfg)
    assert isinstance(b, SD3Backend) and b.latent_shape() == (4, 16, 16) and b.transformer.dtype == torch.float32
    amp = make_backend(load(GRPOConfig, GRPO_CONFIGS[0], [f"model={world / 'model'}", "mixed_precision=bf16",
                                                          *(f"{k}={v}" for k, v in TINY.items())]))
    assert amp.autocast_dtype == torch.bfloat16
    x = torch.randn(2, *b.latent_shape())
    cond = b.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        v, v_amp = b.velocity(x, 0.5, cond), amp.velocity(x, 0.5, cond)
    assert v_amp.dtype == torch.float32 and not torch.equal(v, v_amp) and torch.allclose(v, v_amp, atol=0.1)
    assert make_backend(load(GRPOConfig, None, [])).name == "tiny"


# ----------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def grpo_run(world):
    """`flowopd grpo --config <sd35m_grpo_ocr.yaml, batch keys shrunk> --model DIR` in a subprocess."""
    cfg = _config(ROOT / "configs" / "sd35m_grpo_ocr.yaml", world / "grpo.yaml", prompts={"ocr": str(world / "ocr")},
                  reward="dt_reward:brightness", **{k: v for k, v in TINY.items()}, **SMALL)
    _run(["grpo", "--config", str(cfg), "--model", str(world / "model"), "--out", str(world / "run_ocr")], world)
    return world / "run_ocr"


def test_grpo_cli_trains_an_sd3_lora_that_diffusers_loads(grpo_run, world):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from flowopd.trainers.sd3_teachers import resolve_lora

    assert resolve_lora(grpo_run) == grpo_run / "final" / "adapters" / "ocr"

    conf = json.loads((grpo_run / "final" / "config.json").read_text())
    assert conf["backend"] == "sd3" and conf["model"] == str(world / "model")
    a = conf["adapters"]["ocr"]
    assert (a["rank"], a["alpha"]) == (32, 64.0) and "attn.to_add_out" in a["targets"]
    log = [json.loads(x) for x in (grpo_run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["opt_steps"] == 1 and log[0]["kl_ref"] is not None and "eval/reward/ocr" in log[0]
    sd = load_file(str(grpo_run / "final" / "adapters" / "ocr" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)  # trained: gaussian init has B = 0
    # diffusers' own loader gives the velocity of our backend with the adapter, and not the base's
    ours = SD3Backend.from_pretrained(world / "model", dtype="fp32", resolution=32, max_sequence_length=16)
    ours.load_lora("ocr", resolve_lora(grpo_run))  # a run's --out resolves to final/adapters/ocr
    x, cond = torch.randn(2, *ours.latent_shape()), ours.encode_prompts(["a cat", 'a sign that says "HI"'])
    pipe = StableDiffusion3Pipeline.from_pretrained(str(world / "model"))

    def pipe_v():
        return pipe.transformer(hidden_states=x, timestep=torch.full((2,), 500.0), encoder_hidden_states=cond[0],
                                pooled_projections=cond[1], return_dict=False)[0]

    with torch.no_grad():
        base = pipe_v()
        pipe.load_lora_weights(str(grpo_run / "final" / "adapters" / "ocr"))
        got = pipe_v()
        with ours.adapter("ocr"):
            want = ours.velocity(x, 0.5, cond)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-7)
    saved = yaml.safe_load((grpo_run / "config.yaml").read_text())
    assert saved["backend"] == "sd3" and saved["lora_targets"][0] == "attn.add_k_proj"


def test_distill_cli_with_two_teacher_adapters(grpo_run, world, tmp_path):
    """sd35m_opd.yaml with tasks ocr + pickscore: the GRPO run above and a diffusers-format LoRA as
    teachers, merge cold start (exact: rank 32 + 4), the kl_only rule, MAR, EMA; the teachers' own rewards are
    logged (OCR through tesseract when installed; PickScore on a tiny local CLIP)."""
    from flowopd.trainers.coldstart import lora_delta

    other = SD3Backend.from_pretrained(world / "model", dtype="fp32", resolution=32, max_sequence_length=16)
    torch.manual_seed(1)
    other.add_adapter("pickscore", rank=4, alpha=8, init=False)
    other.save_lora("pickscore", tmp_path / "teacher_pick")
    from test_sd3 import _tiny_clip_dir

    clip = _tiny_clip_dir(tmp_path / "clip")
    lines = [('A sign that says "HI"', "ocr"), ('A poster that says "OK 42"', "ocr"), ("a cat on a sofa", "pickscore"),
             ("a red bicycle", "pickscore")]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p, "task": t}) for p, t in lines))
    has_ocr = shutil.which("tesseract") is not None and _importable("pytesseract")
    cfg = _config(ROOT / "configs" / "sd35m_opd.yaml", tmp_path / "opd.yaml", tasks=["ocr", "pickscore"],
                  prompts=str(tmp_path / "prompts.jsonl"), task_shares={"ocr": 1, "pickscore": 1}, task_schedule="mixed",
                  task_rewards={"ocr": "ocr" if has_ocr else "dt_reward:brightness", "pickscore": "pickscore"},
                  teachers={"ocr": str(grpo_run), "pickscore": str(tmp_path / "teacher_pick")},
                  **{k: v for k, v in TINY.items()}, **SMALL)
    out = tmp_path / "run_opd"
    _run(["distill", "--config", str(cfg), "--model", str(world / "model"), "--out", str(out)], world,
         {"FLOWOPD_PICKSCORE_MODEL": str(clip), "FLOWOPD_PICKSCORE_PROCESSOR": str(clip)})

    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["teachers"] == {"ocr": "lora", "pickscore": "lora"} and log[0]["student_rank"] == 36
    rec = log[1]
    for key in ("kl_teacher/ocr", "kl_teacher/pickscore", "kl_anchor/ocr", "reward/pickscore", "eval/reward/ocr",
                "eval/reward/pickscore", "clip_frac"):
        assert key in rec, key
    assert rec["kl_teacher"] > 0 and rec["opt_steps"] == 1

    # the cold start is the exact mean of the two teachers' deltas; the trained student moved from it
    b = SD3Backend.from_pretrained(world / "model", dtype="fp32", resolution=32, max_sequence_length=16)
    b.load_lora("ocr", grpo_run / "final" / "adapters" / "ocr")
    b.load_lora("pickscore", tmp_path / "teacher_pick")
    b.load_lora("cold", out / "coldstart" / "adapters" / "student")
    b.load_lora("final", out / "final" / "adapters" / "student")
    f = {n: b.read_lora(n) for n in ("ocr", "pickscore", "cold", "final")}
    m = "transformer_blocks.0.attn.to_q"

    def delta(n):
        lora, r, alpha, _ = f[n]
        return lora_delta(*lora[m], alpha / r)

    assert f["cold"][1] == 36
    assert torch.allclose(delta("cold"), (delta("ocr") + delta("pickscore")) / 2, atol=1e-6)
    assert not torch.allclose(delta("final"), delta("cold"), atol=1e-9)


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def test_grpo_nft_objective_on_sd3(world, tmp_path):
    """objective: nft with ODE rollouts trains the SD3 LoRA (latents are not clamped) in process."""
    from flowopd.config import build
    from flowopd.trainers.grpo import train_grpo

    c = yaml.safe_load((ROOT / "configs" / "sd35m_grpo_ocr.yaml").read_text())
    c.update(TINY, **SMALL)
    c.update(model=str(world / "model"), prompts={"ocr": str(world / "ocr")}, reward="dt_reward:brightness",
             objective="nft", sampler="ode", kl_beta=0.1, eval_every=0)
    sys.path.insert(0, str(world))  # dt_reward
    try:
        train_grpo(build(GRPOConfig, c), tmp_path / "nft")
    finally:
        sys.path.remove(str(world))
    log = [json.loads(x) for x in (tmp_path / "nft" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["opt_steps"] == 1 and log[0]["fm_mse"] > 0 and log[0]["kl_ref"] is not None
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "nft" / "final" / "adapters" / "ocr" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
