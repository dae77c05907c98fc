"""experiments/text_by_position.py: per-position OCR hits, the strings it reads, and a record per run."""
import json

from flowopd.world.prompts import text_is_heldout
from flowopd.world.render import render

from conftest import load_experiment, perturbed_tiny_checkpoint, run_experiment_script


def module(monkeypatch):
    return load_experiment(monkeypatch, "text_by_position")  # it imports text_by_length.py beside it


def test_position_hits_known_answers(monkeypatch):
    hits = module(monkeypatch).position_hits
    assert hits("AB12", "AB12") == [True] * 4
    assert hits("AB12", "AX1Z") == [True, False, True, False]
    assert hits("AB12", "AB1") == [False] * 4  # a reading of another length places no character
    assert hits("K", "") == [False]


def test_strings_of_each_split(monkeypatch):
    m = module(monkeypatch)
    train = m.split_strings("train", seed=5)
    assert [len(t) for t in train] == [n for n in (1, 2, 3, 4) for _ in range(16)]
    assert not any(text_is_heldout(t) for t in train)
    assert train == m.split_strings("train", seed=5) and train != m.split_strings("train", seed=6)
    test = m.split_strings("test", seed=5)
    assert len(test) == 64 and all(text_is_heldout(t) for t in test)
    assert sorted(len(t) for t in test) == [n for n in (1, 2, 3, 4) for _ in range(16)]


def test_renders_of_the_signs_read_right_everywhere(monkeypatch):
    m = module(monkeypatch)
    from flowopd.world.scoring import ocr_read
    for t in ("E", "K7", "UXS", "W5TS"):
        assert m.position_hits(t, ocr_read(render(f'a sign that says "{t}"', 0))) == [True] * len(t)


def test_a_run_appends_one_record(tmp_path, monkeypatch):
    ckpt = perturbed_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "rec.jsonl"
    for _ in range(2):
        run_experiment_script(monkeypatch, "text_by_position", "--checkpoint", ckpt, "--split", "train",
                              "--noises", 1, "--steps", 2, "--out", out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and recs[0] == recs[1]  # same strings, same noise: the same record
    r = recs[0]
    assert [len(r[f"len{n}"]) for n in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert all(0 <= v <= 1 for n in (1, 2, 3, 4) for v in r[f"len{n}"])
    assert 0 <= r["odd_lengths"] <= 1 and 0 <= r["even_lengths"] <= 1
