"""End to end: `flowopd run --preset quick` produces every model, field and report file,
and a second run skips every finished stage."""
import json
import subprocess
import sys

import pytest

from flowopd.report import MODELS

FIELDS = ("compose", "single_object", "two_object", "counting", "colors", "position", "color_attr",
          "text", "quality", "fidelity", "average")


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "flowopd", "run", "--preset", "quick", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == set(MODELS)
    for m in MODELS:
        for f in FIELDS:
            assert isinstance(res["models"][m][f], float), (m, f)
        assert (out / "checkpoints" / m / "model.safetensors").is_file()
    assert res["stage_seconds"]["teacher-compose"] > 0
    for f in ("report.md", "report.html", "curves.png", "grid.png"):
        assert (out / f).stat().st_size > 0
    # the checkpoints are usable by `flowopd sample`
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    s = subprocess.run([sys.executable, "-m", "flowopd", "sample", "--checkpoint", str(out / "checkpoints" / "opd-merge"),
                        "--prompts", str(prompts), "--out", str(tmp_path / "s"), "--steps", "2"], capture_output=True, text=True)
    assert s.returncode == 0, s.stderr
    # a second run redoes nothing but the report, and gives the same table
    r2 = subprocess.run([sys.executable, "-m", "flowopd", "run", "--preset", "quick", "--out", str(out)],
                        capture_output=True, text=True)
    assert r2.returncode == 0
    assert r2.stderr.count("done earlier, skipped") == 18
    assert json.loads((out / "results.json").read_text())["models"] == res["models"]


def test_run_starts_every_stage_from_the_base_it_is_given(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from flowopd.backends.tiny import shipped_base_dir
    from flowopd.errors import CheckpointError
    from flowopd.pipeline import Pipeline, RunConfig

    mine = tmp_path / "mine"
    shutil.copytree(shipped_base_dir(), mine)
    w = load_file(str(mine / "model.safetensors"))
    k = sorted(w)[0]
    w[k] = w[k] + 1.0
    save_file(w, str(mine / "model.safetensors"))
    for rc, want in ((RunConfig(base=str(mine)), mine), (RunConfig(), shipped_base_dir())):
        p = Pipeline(tmp_path / f"run{want == mine}", "quick", rc)
        p.s_base()
        got = (p.ckpt("base") / "model.safetensors").read_bytes()
        assert got == (want / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="not found"):
        RunConfig(base=str(tmp_path / "nowhere")).validate()


def test_teacher_seeds_train_the_teacher_several_times_and_average_the_runs(tmp_path):
    import torch

    from flowopd.pipeline import Pipeline, RunConfig
    from flowopd.trainers.coldstart import load_teachers, read_teacher

    # the dense reward: the strict one gives the quick preset's few 4-step rollouts no spread to learn from
    rc = RunConfig(teacher_seeds={"compose": 2}, teachers={"compose": ["reward=compose"]})
    p = Pipeline(tmp_path / "run", "quick", rc)
    p.s_base()
    assert [k for k in p.trainer_configs() if k.startswith("teacher-compose")] == [
        "teacher-compose/seed0", "teacher-compose/seed1"]
    p.s_teacher("compose")
    base = p.ckpt("base")
    d0, d1 = (read_teacher(tmp_path / "run" / "work" / "teacher-compose" / f"seed{i}", base).deltas() for i in (0, 1))
    assert set(d0) == set(d1)
    assert any(not torch.allclose(d0[k], d1[k]) for k in d0)  # the two seeds trained different teachers
    t = read_teacher(p.ckpt("teacher-compose"), base)
    assert t.kind == "lora" and t.tasks == ["compose"]  # its merged weights are base + its adapter
    got = t.deltas()
    assert set(got) == set(d0)
    for k in d0:
        torch.testing.assert_close(got[k], (d0[k] + d1[k]) / 2, rtol=1e-5, atol=1e-7)
    assert list(load_teachers([str(p.ckpt("teacher-compose"))], base)) == ["compose"]


def test_the_full_preset_trains_each_teacher_once_and_a_config_can_say_otherwise(tmp_path):
    from flowopd.pipeline import Pipeline, RunConfig

    full = Pipeline(tmp_path / "a", "full", RunConfig())
    assert [full.seeds(t) for t in ("compose", "text", "quality")] == [1, 1, 1]
    mine = Pipeline(tmp_path / "b", "full", RunConfig(teacher_seeds={"compose": 2, "text": 3}))
    assert [mine.seeds(t) for t in ("compose", "text", "quality")] == [2, 3, 1]
    assert Pipeline(tmp_path / "c", "quick", RunConfig()).seeds("compose") == 1
    # the remaining-time estimate counts a teacher of two runs twice
    assert mine.weight("teacher-compose") == 2 * full.weight("teacher-compose") > 0
    assert full.weight("opd-merge-nomar") == full.weight("opd-sft") != full.weight("eval-opd-merge")


@pytest.mark.parametrize("seeds, match", [({"nope": 2}, "unknown task"), ({"compose": 0}, "whole number"),
                                          ({"text": 1.5}, "whole number")])
def test_teacher_seeds_refuses_bad_values(seeds, match):
    from flowopd.config import ConfigError
    from flowopd.pipeline import RunConfig

    with pytest.raises(ConfigError, match=match):
        RunConfig(teacher_seeds=seeds).validate()


# config keys added after the published tables were run, with the values that leave their stages
# computing what those runs computed
ADDED_SINCE = {"high_noise_routes": {}, "high_noise_sigma": 0.6, "lr_final": 1.0}


@pytest.mark.parametrize("table, run_config", [("pipeline_full", None),
                                               ("pipeline_full_s36", "experiments/configs/run_s36.yaml"),  # constant teacher lr
                                               ("pipeline_full_s35", "experiments/configs/run_s36.yaml"),  # ... before rollouts folded the LoRA
                                               ("pipeline_qcm_full", "experiments/configs/run_qcm_full.yaml"),
                                               ("pipeline_budget30", "experiments/configs/run_budget30.yaml"),
                                               ("pipeline_full_2seeds", "experiments/configs/run_2seeds.yaml")])
def test_the_published_tables_stage_configs_are_what_the_pipeline_runs(table, run_config):
    """README's table (pipeline_full: the packaged configs, `flowopd run --preset full`) and the
    earlier tables (their run configs) keep each GRPO and OPD stage's config.yaml as the run wrote it,
    its folder written as OUT: resolving the same command today must give the same configs, so a
    change to a packaged GRPO or OPD config, or to how the pipeline overrides them, fails here. (The
    cold starts' and evaluations' settings live in code, not in these files.)"""
    from pathlib import Path

    import yaml

    from flowopd.backends import load_checkpoint
    from flowopd.config import load, to_dict
    from flowopd.pipeline import Pipeline, RunConfig
    from flowopd.trainers.common import resolve_backend_keys

    root = Path(__file__).resolve().parents[1]
    d = root / "experiments" / "results" / table / "configs"
    rc = load(RunConfig, root / run_config) if run_config else RunConfig()
    p = Pipeline(Path("OUT"), "full", rc)
    # the trainers fill the back end's sampling defaults in before they write config.yaml
    base = load_checkpoint(rc.base or "base")
    # a teacher of several runs keeps one config per run: configs/teacher-TASK/seedI.yaml
    kept = sorted(f.relative_to(d).with_suffix("").as_posix() for f in d.rglob("*.yaml"))
    assert sorted(p.trainer_configs()) == kept
    for stage in p.trainer_configs():
        want = yaml.safe_load((d / f"{stage}.yaml").read_text())
        got = to_dict(resolve_backend_keys(p.trainer_config(stage), base))
        for k, v in ADDED_SINCE.items():  # a key added after the run: at the value that computes what the run did
            if k in got and k not in want:
                assert got[k] == v, (stage, k, got[k])
                want[k] = v
        assert set(got) == set(want), stage
        diff = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
        assert not diff, (stage, diff)
