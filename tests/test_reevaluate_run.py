"""experiments/reevaluate_run.py: a run's models evaluated again reproduce its results.json, and a
number that does not is named."""
import json
import shutil

from conftest import load_experiment, perturbed_tiny_checkpoint

from flowopd.backends import load_checkpoint
from flowopd.evaluate import evaluate


def test_reevaluation_reproduces_a_run_and_names_what_differs(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    ckpt = perturbed_tiny_checkpoint(tmp_path / "ckpt")
    shutil.copytree(ckpt, run / "checkpoints" / "base")
    e = {"steps": 2, "per_group": 1}
    metrics, *_ = evaluate(load_checkpoint(run / "checkpoints" / "base"), "test", progress=False, **e)
    old = {k: v for k, v in metrics.items() if not k.startswith("text_len")}  # as written before the split by length
    old["se"] = {k: v for k, v in metrics["se"].items() if not k.startswith("text_len")}
    (run / "results.json").write_text(json.dumps({"models": {"base": old}, "eval": e}))

    script = load_experiment(monkeypatch, "reevaluate_run")
    out = tmp_path / "re.json"
    assert script.main([str(run), "--out", str(out)]) == 0
    again = json.loads(out.read_text())["base"]
    assert again["text_len1"] == metrics["text_len1"] and again["se"]["text"] == metrics["se"]["text"]
    assert "base: same" in capsys.readouterr().out

    old["compose"] += 0.01  # a number the run did not get: reported, exit status 1
    (run / "results.json").write_text(json.dumps({"models": {"base": old}, "eval": e}))
    assert script.main([str(run), "--out", str(out)]) == 1  # (the saved evaluation is reused)
    assert "base: compose:" in capsys.readouterr().err
