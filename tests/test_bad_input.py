"""Bad input to the training commands: exit status 2, one stderr line naming what is wrong, no
traceback, and the output folder untouched (not created, or byte for byte as it was).

Most cases call `flowopd.cli.main` in-process (what `python -m flowopd` runs); a few run the real
command in a subprocess to check the process' exit status and stderr too.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowopd.cli import main
from flowopd.trainers.coldstart import standin_teacher
from conftest import perturbed_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Paths of good and bad inputs: a tiny base, stand-in teachers on it, damaged checkpoints,
    bad prompt files."""
    root = tmp_path_factory.mktemp("bad")
    base = perturbed_tiny_checkpoint(root / "base")
    d = {"base": str(base), "missing": str(root / "missing"), "other_base": str(perturbed_tiny_checkpoint(root / "other", (8, 8, 16)))}
    for t, k in (("compose", 1), ("text", 2), ("quality", 3)):
        d[t] = str(standin_teacher(root / t, t, base, rank=2, scale=0.1, seed=k))
    trunc = root / "truncated"
    shutil.copytree(base, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    d["truncated"] = str(trunc)
    for name, edit in (("wrong_config", lambda c: c["model"].update(channels=[8, 8, 16])),
                       ("foo_backend", lambda c: c.update(backend="foo"))):
        shutil.copytree(base, root / name)
        conf = json.loads((root / name / "config.json").read_text())
        edit(conf)
        (root / name / "config.json").write_text(json.dumps(conf))
        d[name] = str(root / name)
    files = {"empty": b"", "binary": b"a red square\n\x00\x01\x02", "long": b"a red square\n" + b"x" * 600 + b"\n",
             "badjson": b'{"prompt": "a red square"}\n{"prompt": oops}\n',
             "othertask": b'{"prompt": "a sign that says \\"K7\\"", "task": "text"}\n'}
    for name, data in files.items():
        (root / f"{name}.txt").write_bytes(data)
        d[name] = str(root / f"{name}.txt")
    return d


def snapshot(folder: Path):
    """Every file under folder with its bytes and mtime (None when the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def cli(args) -> int:
    return main([str(a) for a in args])


def refused(capsys, args, needle, out):
    before = snapshot(out)
    rc = cli(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert snapshot(out) == before
    return lines[0]


def grpo(w, out, *extra):
    return ["grpo", "--out", out, f"init={w['base']}", "tasks=[quality]", "reward=quality", "steps=1",
            "prompts_per_step=2", "group_size=2", "sample_steps=2", "micro_batch=4", "cfg=2.0", *extra]


def distill(w, out, *extra):
    return ["distill", "--out", out, f"base={w['base']}", *[f"teachers.{t}={w[t]}" for t in ("compose", "text", "quality")],
            "steps=1", "prompts_per_step=3", "group_size=1", "sample_steps=2", "micro_batch=3", "cfg=2.0", *extra]


def coldstart(w, out, method, *extra, teachers=None):
    teachers = teachers or [f"compose={w['compose']}", f"text={w['text']}"]
    return ["coldstart", "--method", method, "--teachers", *teachers, "--out", out, f"base={w['base']}",
            "sft_prompts_per_task=1", "sft_candidates=2", "sft_sample_steps=2", "sft_steps=2", "sft_batch=2", *extra]


@pytest.mark.parametrize("extra,needle", [
    (["--stpes=3"], "unknown config key 'stpes' (did you mean 'steps'?)"),
    (["steps=abc"], "steps: expected an integer, got 'abc'"),
    (["lr=-1"], "lr must be > 0"),
    (["group_size=1"], "group_size must be >= 2"),
    (["steps=0"], "steps must be >= 1"),
    (["kl_beta=-0.1"], "kl_beta must be >= 0"),
    (["max_bad_steps=0"], "max_bad_steps must be >= 1"),
    (["reward=nope"], "unknown reward 'nope'; available: aesthetic, clipscore, compose, compose_strict"),
    (["reward=no_such_module:f"], "cannot import module 'no_such_module'"),
    (["init={missing}"], "checkpoint not found"),
    (["init={truncated}"], "unreadable or truncated"),
    (["init={wrong_config}"], "shape mismatch for"),
    (["init={foo_backend}"], "unknown backend 'foo'; back ends: tiny, sd3"),
    (["prompts={empty}"], "holds no prompts"),
    (["prompts={binary}"], "looks binary"),
    (["prompts={long}"], "line 2: line is longer than 512 characters"),
    (["prompts={badjson}"], "line 2: not valid JSON"),
    (["prompts={othertask}"], "line 1: task 'text' is not one of this run's tasks (quality)"),
    (["--resume"], "--resume: no complete checkpoint in"),
])
def test_grpo_bad_input(w, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    refused(capsys, grpo(w, out, *[e.format(**w) for e in extra]), needle, out)


@pytest.mark.parametrize("extra,needle", [
    (["--bta=0"], "did you mean 'beta'"),
    (["beta=-1"], "beta must be >= 0"),
    (["steps=0"], "steps must be >= 1"),
    (["lr=-0.1"], "lr must be > 0"),
    (["routing=nope"], "routing must be one of"),
    (["teachers.text={missing}"], "checkpoint not found"),
    (["teachers.text={truncated}"], "unreadable or truncated"),
    (["teachers.text={other_base}"], "is not a teacher on base"),
    (["task_rewards.text=nope"], "unknown reward 'nope'; available:"),
    (["init={missing}"], "checkpoint not found"),
    (["base={truncated}"], "unreadable or truncated"),
    (["init=sft", "coldstart.sft_stpes=3"], "unknown coldstart key 'sft_stpes' (did you mean 'sft_steps'?)"),
    (["init=sft", "coldstart.sft_lr=-1"], "sft_lr must be > 0"),
    (["prompts={badjson}"], "line 2: not valid JSON"),
    (["--resume"], "--resume: no complete checkpoint in"),
])
def test_distill_bad_input(w, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    line = refused(capsys, distill(w, out, *[e.format(**w) for e in extra]), needle, out)
    if "other_base" in extra[0]:
        assert "shape mismatch for" in line


@pytest.mark.parametrize("method,extra,teachers,needle", [
    ("sft", ["--sft_stpes=3"], None, "did you mean 'sft_steps'"),
    ("sft", ["sft_lr=-1"], None, "sft_lr must be > 0"),
    ("sft", ["sft_steps=0"], None, "sft_steps must be >= 1"),
    ("sft", ["task_rewards={{compose: nope}}"], None, "unknown reward 'nope'"),
    ("sft", [], ["compose={missing}"], "checkpoint not found"),
    ("sft", [], ["compose={truncated}"], "unreadable or truncated"),
    ("merge", [], ["compose={compose}", "text={other_base}"], "shape mismatch for"),
    ("merge", ["weights=[0.2,0.3,0.5]"], None, "weights has 3 values for 2 teachers"),
    ("merge", ["weights=[-1,2]"], None, "weights must be >= 0"),
    ("merge", ["base={missing}"], None, "checkpoint not found"),
    ("sft", ["--resume"], None, "--resume: no complete checkpoint in"),
])
def test_coldstart_bad_input(w, tmp_path, capsys, method, extra, teachers, needle):
    out = tmp_path / "out"
    teachers = [t.format(**w) for t in teachers] if teachers else None
    refused(capsys, coldstart(w, out, method, *[e.format(**w) for e in extra], teachers=teachers), needle, out)


def test_another_runs_out_is_refused_unless_overwrite(w, tmp_path, capsys):
    g, d, c = tmp_path / "g", tmp_path / "d", tmp_path / "c"
    assert cli(grpo(w, g)) == 0
    assert cli(distill(w, d)) == 0
    assert cli(coldstart(w, c, "merge")) == 0
    capsys.readouterr()
    refused(capsys, grpo(w, g, "lr=0.5"), f"{g} holds another run's config", g)
    refused(capsys, distill(w, d, "beta=0.5"), f"{d} holds another run's config", d)
    refused(capsys, coldstart(w, c, "merge", "weights=[0.3,0.7]"), f"{c} holds another run's config", c)
    # the same config again resumes (here: the finished run, nothing left to do)
    assert cli(grpo(w, g)) == 0 and "resuming from step 1" in capsys.readouterr().err
    # --overwrite starts the other run afresh: its states and log replace the old ones
    assert cli(grpo(w, g, "lr=0.5", "--overwrite")) == 0
    assert "resuming" not in capsys.readouterr().err
    log = [json.loads(x) for x in (g / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]


def test_state_from_another_model_is_refused_with_the_tensor_named(w, tmp_path, capsys):
    init = tmp_path / "init"
    shutil.copytree(w["base"], init)
    out = tmp_path / "g"
    assert cli(grpo(w, out, f"init={init}")) == 0
    shutil.rmtree(init)
    shutil.copytree(w["other_base"], init)  # the same path now holds a wider model
    capsys.readouterr()
    line = refused(capsys, grpo(w, out, f"init={init}"), "is from another model: shape mismatch for", out)
    assert "lora_" in line


def test_pretrain_resume_without_a_state_is_refused(tmp_path, capsys):
    out = tmp_path / "pt"
    refused(capsys, ["pretrain", "--out", out, "--steps=1", "--resume"], "--resume: no complete checkpoint in", out)


def test_out_that_is_a_file_is_refused(w, tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("not a folder")
    refused(capsys, grpo(w, f), "is a file, not a folder", f)


@pytest.mark.parametrize("command", ["grpo", "distill", "coldstart"])
def test_bad_input_in_a_real_process(w, tmp_path, command):
    out = tmp_path / "out"
    args, needle = {"grpo": (grpo(w, out, "group_size=1"), "group_size must be >= 2"),
                    "distill": (distill(w, out, "beta=-1"), "beta must be >= 0"),
                    "coldstart": (coldstart(w, out, "sft", f"base={w['truncated']}"), "unreadable or truncated")}[command]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "flowopd", *map(str, args)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and needle in r.stderr
    assert r.stderr.startswith(f"flowopd {command}: error: ")
    assert not out.exists()


def test_nothing_is_unpickled_from_files():
    """Weights load with safetensors or torch.load(weights_only=True); the only unpickling is the
    GenEval client's allow-listed reader of server answers (never a file)."""
    import ast

    for path in sorted((ROOT / "flowopd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{path}:{node.lineno}: torch.load without weights_only=True"
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "np.load", "numpy.load"):
                raise AssertionError(f"{path}:{node.lineno}: {name}")
