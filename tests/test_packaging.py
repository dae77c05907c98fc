"""The configs ship inside the package (the repository's configs/ links to them), a config name
resolves to the packaged file from any directory, and a wheel built from the repository runs the
whole pipeline from a fresh venv outside the checkout (slow)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from flowopd.cli import main
from flowopd.config import PACKAGED_CONFIGS, ConfigError, load_yaml, packaged_configs, resolve_config
from flowopd.report import MODELS

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("compose", "text", "quality", "fidelity", "average")


def test_repo_configs_is_the_packaged_folder():
    assert (ROOT / "configs").is_symlink()
    assert (ROOT / "configs").resolve() == PACKAGED_CONFIGS.resolve() == (ROOT / "flowopd" / "configs").resolve()
    names = packaged_configs()
    assert "toy_grpo_text.yaml" in names and "accelerate/ddp.yaml" in names


def test_config_names_resolve_to_the_packaged_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in packaged_configs():
        assert resolve_config(name) == PACKAGED_CONFIGS / name
        assert resolve_config(f"configs/{name}") == PACKAGED_CONFIGS / name  # as the docs write it
    assert load_yaml("toy_grpo_text.yaml") == load_yaml(PACKAGED_CONFIGS / "toy_grpo_text.yaml")
    # an existing file wins over the packaged config of the same name
    (tmp_path / "toy_grpo_text.yaml").write_text("steps: 7\n")
    assert load_yaml("toy_grpo_text.yaml") == {"steps": 7}


def test_an_unknown_config_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="nope.yaml.*toy_grpo_text.yaml") as e:
        resolve_config("nope.yaml")
    assert "accelerate/ddp.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(tmp_path / "missing" / "toy_grpo_text.yaml")  # an absolute path is taken as given


def test_cli_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["grpo", "--config", "nope.yaml", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config file not found: nope.yaml" in err and "toy_opd_merge.yaml" in err


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_quick_pipeline(tmp_path):
    """pip wheel (no network) -> a fresh venv that sees this interpreter's packages (torch, ...) but not
    the checkout -> pip install --no-deps --no-index -> `flowopd run --preset quick` in a directory
    outside the checkout."""
    # built from a copy of the sources: no stale build/ of the checkout ends up in the wheel, and the
    # checkout gets no build/ or egg-info
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "out", "*.egg-info", "__pycache__", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src])
    (wheel,) = wheels.glob("flowopd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = [n for n in names if n.endswith(".yaml")]
    assert sorted(configs) == sorted(f"flowopd/configs/{c}" for c in packaged_configs())  # each once
    assert len(set(names)) == len(names)
    assert "flowopd/checkpoints/base/model.safetensors" in names

    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # nothing of the checkout
    _run([sys.executable, "-m", "venv", venv], env=env)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip())
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp_path, env=env)
    # then the dependencies (torch, numpy, ...) from this interpreter: a plain path in a .pth file (its
    # own .pth files, such as an editable install of flowopd, are not processed; added after the install,
    # or pip would take this interpreter's flowopd for the wheel's and install nothing)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import flowopd; print(flowopd.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT), where
    _run([venv / "bin" / "flowopd", "run", "--preset", "quick", "--out", "run"], cwd=work, env=env)
    res = json.loads((work / "run" / "results.json").read_text())
    assert set(res["models"]) == set(MODELS)
    for m in MODELS:
        for k in SCORES:
            assert isinstance(res["models"][m][k], float), (m, k)
