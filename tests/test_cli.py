"""The flowopd command as a user runs it: real subprocesses, exit codes, files written."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flowopd.world.render import render


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flowopd", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for c in ("sample", "eval", "score", "pretrain"):
        assert c in r.stdout


def test_sample_writes_pngs_and_manifest(tmp_path, tiny_ckpt):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a red square\n\na sign that says "K7"\nsomething else entirely\n')
    out = tmp_path / "out"
    r = run("sample", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(out), "--steps", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["a red square", 'a sign that says "K7"', "something else entirely"]
    assert [x["task"] for x in lines] == ["compose", "text", None]
    for x in lines:
        im = Image.open(out / x["file"])
        assert im.size == (32, 32) and im.mode == "RGB"


def test_eval_manifest_holds_each_images_score(tmp_path, tiny_ckpt):
    from flowopd.world.prompts import make_prompt
    from flowopd.world.scoring import summarize_scores

    out = tmp_path / "ev"
    r = run("eval", "--checkpoint", str(tiny_ckpt), "--steps", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "eval.json").read_text())
    assert f"text by sign length: 1 {metrics['text_len1']:.3f}, 2 " in r.stderr
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == metrics["n"] == 512 and all(0.0 <= x["score"] <= 1.0 for x in lines)
    # the per-image scores summarise to the evaluation's numbers (rounded to 6 decimals in the file)
    again = summarize_scores([x["score"] for x in lines], [make_prompt(x["prompt"], x["task"]) for x in lines])
    for k in ("compose", "color_attr", "text", "text_len1", "text_len4", "quality"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-5), k
    # and `flowopd score` on the folder (reading the PNGs back) gives them exactly
    r = run("score", str(out))
    assert r.returncode == 0, r.stderr
    rescored = json.loads(r.stdout)
    for k in ("compose", "text", "text_len2", "quality"):
        assert rescored[k] == metrics[k], k


def test_sample_jsonl_keeps_given_task(tmp_path, tiny_ckpt):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a blue circle", "task": "quality"}) + "\n" + json.dumps({"prompt": "two squares"}) + "\n")
    out = tmp_path / "out"
    r = run("sample", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(out), "--steps", "2")
    assert r.returncode == 0, r.stderr
    tasks = [json.loads(x)["task"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert tasks == ["quality", "compose"]


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("", "no prompts"),
    ("\n\n", "no prompts"),
    (b"\x00\x01binary", "binary"),
    ('{"prompt": "a red square"}\n{"prompt": oops}\n', "line 2"),
    ('{"prompt": "a red square", "task": "painting"}\n', "unknown task"),
    ("a red square\n" + "x" * 600 + "\n", "line 2"),
])
def test_sample_bad_prompt_files(tmp_path, tiny_ckpt, content, needle):
    prompts = tmp_path / "p.txt"
    if isinstance(content, bytes):
        prompts.write_bytes(content)
    elif content is not None:
        prompts.write_text(content)
    out = tmp_path / "out"
    r = run("sample", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(out), "--steps", "2")
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_checkpoint_is_exit_2(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    r = run("sample", "--checkpoint", str(tmp_path / "missing"), "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def _write_manifest(folder, items):
    folder.mkdir()
    lines = []
    for i, (prompt, task, img) in enumerate(items):
        Image.fromarray(img).save(folder / f"{i}.png")
        lines.append(json.dumps({"prompt": prompt, "task": task, "file": f"{i}.png"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def test_score_renders_is_perfect(tmp_path):
    items = [("a red square and a blue circle", "compose", render("a red square and a blue circle", 0)),
             ("three triangles", "compose", render("three triangles", 1)),
             ('a sign that says "AB"', "text", render('a sign that says "AB"', 0)),
             ("a green circle", "quality", render("a green circle", 2))]
    _write_manifest(tmp_path / "d", items)
    r = run("score", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["n"] == 4 and s["compose"] == 1.0 and s["color_attr"] == 1.0 and s["counting"] == 1.0
    assert s["text"] == 1.0 and s["quality"] > 0.9
    assert s["position"] is None


def test_score_blank_images_low(tmp_path):
    blank = np.full((32, 32, 3), 255, np.uint8)
    _write_manifest(tmp_path / "d", [("a red square", "compose", blank), ('a sign that says "AB"', "text", blank)])
    s = json.loads(run("score", str(tmp_path / "d")).stdout)
    assert s["compose"] == 0.0 and s["text"] == 0.0


def test_score_prompt_outside_grammar_is_exit_2(tmp_path):
    _write_manifest(tmp_path / "d", [("a red square", None, render("a red square", 0)),
                                     ("a photo of a cat", None, render("a red square", 0))])
    r = run("score", str(tmp_path / "d"))
    assert r.returncode == 2 and "line 2" in r.stderr and "grammar" in r.stderr


def test_pretrain_unknown_key_suggests_name(tmp_path):
    r = run("pretrain", "--out", str(tmp_path / "o"), "--stpes=3")
    assert r.returncode == 2 and "did you mean 'steps'" in r.stderr
    r = run("pretrain", "--out", str(tmp_path / "o"), "--lr=-1")
    assert r.returncode == 2 and "lr" in r.stderr
    assert not (tmp_path / "o").exists()


def test_pretrain_tiny_run_writes_loadable_checkpoint(tmp_path):
    out = tmp_path / "pt"
    r = run("pretrain", "--out", str(out), "--steps=3", "--batch_size=4", "--dataset_size=8", "--channels=[8,8,8]",
            "--save_at=[2]", "--device=cpu")
    assert r.returncode == 0, r.stderr
    from flowopd.backends import load_checkpoint

    b = load_checkpoint(out / "final")
    assert json.loads((out / "final" / "config.json").read_text())["meta"]["step"] == 3
    assert (out / "step_000002" / "model.safetensors").is_file()
    assert b.model.cfg.channels == (8, 8, 8)


def _params(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "model.safetensors"))


def test_pretrain_resume_is_exact_and_skips_truncated_state(tmp_path):
    common = ["--batch_size=4", "--dataset_size=8", "--channels=[8,8,8]", "--device=cpu", "--state_every=2", "--warmup=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("pretrain", "--out", str(a), "--steps=6", *common).returncode == 0
    # b stops at 6 (states at 2, 4, 6; the two newest are kept), its newest state is then damaged by hand
    assert run("pretrain", "--out", str(b), "--steps=6", *common).returncode == 0
    states = sorted((b / "state").glob("step_*"))
    assert [s.name for s in states] == ["step_00000004", "step_00000006"]
    t = states[-1] / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:100])
    r = run("pretrain", "--out", str(b), "--steps=6", *common)
    assert r.returncode == 0, r.stderr
    assert "skipping damaged checkpoint" in r.stderr and "truncated" in r.stderr
    # the previous state is used: steps 5 and 6 again, landing on a's parameters
    assert "resuming from step 4" in r.stderr
    pa, pb = _params(a), _params(b)
    assert all(torch_equal(pa[k], pb[k]) for k in pa)


def test_pretrain_resume_from_intact_state_matches(tmp_path):
    common = ["--batch_size=4", "--dataset_size=8", "--channels=[8,8,8]", "--device=cpu", "--state_every=2", "--warmup=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("pretrain", "--out", str(a), "--steps=5", *common).returncode == 0
    assert run("pretrain", "--out", str(b), "--steps=2", *common).returncode == 0
    r = run("pretrain", "--out", str(b), "--steps=5", *common)
    assert r.returncode == 0 and "resuming from step 2" in r.stderr
    pa, pb = _params(a), _params(b)
    assert all(torch_equal(pa[k], pb[k]) for k in pa)


def test_pretrain_refuses_other_runs_out_dir(tmp_path):
    common = ["--batch_size=4", "--dataset_size=8", "--channels=[8,8,8]", "--device=cpu", "--steps=1"]
    assert run("pretrain", "--out", str(tmp_path / "a"), *common).returncode == 0
    r = run("pretrain", "--out", str(tmp_path / "a"), *common, "--lr=0.01")
    assert r.returncode == 2 and "another run" in r.stderr
    assert run("pretrain", "--out", str(tmp_path / "a"), *common, "--lr=0.01", "--overwrite").returncode == 0


def torch_equal(x, y):
    import torch

    return torch.equal(x, y)


def test_pretrain_curriculum_keys_on_the_command_line_hold_in_every_stage(tmp_path):
    out = tmp_path / "pt"
    r = run("pretrain", "--config", "toy_pretrain_order.yaml", "--out", str(out), "steps=1", "batch_size=2",
            "dataset_size=4", "channels=[8,8,8]", "state_every=0")
    assert r.returncode == 0, r.stderr
    for i in (0, 1, 2):
        stage = json.loads((out / f"stage_{i}" / "run.json").read_text())
        assert (stage["batch_size"], stage["dataset_size"]) == (2, 4)  # the command line's, not the stage's
    assert json.loads((out / "stage_0" / "run.json").read_text())["text_fraction"] == 0.0  # the stage's own
    assert json.loads((out / "final" / "config.json").read_text())["model"]["roles"] is True
