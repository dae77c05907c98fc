import numpy as np

from flowopd.report import MODELS, claims, table_rows, write_report


def _res(opd_text=0.9, nomar_fd=30.0):
    m = {k: {"compose": 0.5, "text": 0.5, "quality": 0.8, "fidelity": 10.0, "average": 0.6} for k in MODELS}
    m["teacher-compose"]["compose"] = 0.9
    m["teacher-text"]["text"] = 0.92
    m["grpo-mix"].update(compose=0.7, text=0.7, quality=0.8, average=0.733)
    m["opd-merge"].update(compose=0.88, text=opd_text, quality=0.85, fidelity=11.0)
    m["opd-merge"]["average"] = (0.88 + opd_text + 0.85) / 3
    m["opd-merge-nomar"]["fidelity"] = nomar_fd
    return {"models": m, "preset": "test", "stage_seconds": {"base": 1.0}}


def test_claims_follow_the_numbers():
    c = {name: ok for name, ok, _ in claims(_res())}
    assert c["Flow-OPD (merge init) beats GRPO-Mix on every task"] is True
    assert c["Flow-OPD (merge init) beats GRPO-Mix on the average by >= 0.05"] is True
    assert c["The student comes within 0.05 of each teacher on that teacher's task (or passes it)"] is True
    assert c["With MAR, fidelity (FD) stays within 20% of the base's"] is True
    assert c["MAR (beta > 0) gives better fidelity than beta = 0"] is True
    bad = {name: ok for name, ok, _ in claims(_res(opd_text=0.6, nomar_fd=5.0))}
    assert bad["Flow-OPD (merge init) beats GRPO-Mix on every task"] is False
    assert bad["The student comes within 0.05 of each teacher on that teacher's task (or passes it)"] is False
    assert bad["MAR (beta > 0) gives better fidelity than beta = 0"] is False


def test_table_has_every_model_and_paper_numbers():
    rows = table_rows(_res())
    assert len(rows) == len(MODELS)
    base = rows[0]
    assert base[1] == "0.500" and base[6] == "0.63"  # ours, then the paper's SD3.5-M GenEval


def test_table_shows_standard_errors_and_categories(tmp_path):
    from flowopd.report import category_rows

    res = _res()
    res["models"]["base"].update(position=0.25, se={"compose": 0.0312, "position": 0.0541})
    base = table_rows(res)[0]
    assert base[1] == "0.500 ± 0.031" and base[2] == "0.500"  # no se recorded for text: the mean alone
    cats = category_rows(res)
    assert len(cats) == len(MODELS) and cats[0][5] == "0.250 ± 0.054"
    write_report(tmp_path, res, {}, {}, [])
    assert "0.250 ± 0.054" in (tmp_path / "report.md").read_text()
    assert "0.250 ± 0.054" in (tmp_path / "report.html").read_text()


def test_report_shows_text_by_length_when_measured(tmp_path):
    from flowopd.report import length_rows

    res = _res()
    assert length_rows(res) == []  # results from before the split by length: no table
    write_report(tmp_path, res, {}, {}, [])
    assert "Text by sign length" not in (tmp_path / "report.md").read_text()
    res["models"]["base"].update(text_len1=0.25, text_len2=0.5, text_len3=0.75, text_len4=1.0,
                                 se={"text_len1": 0.1234})
    rows = length_rows(res)
    assert rows == [["Base (pretrained)", "0.250 ± 0.123", "0.500", "0.750", "1.000"]]
    write_report(tmp_path, res, {}, {}, [])
    for f in ("report.md", "report.html"):
        text = (tmp_path / f).read_text()
        assert "Text by sign length" in text and "0.250 ± 0.123" in text


def test_write_report_files(tmp_path):
    curves = {"teacher-compose": [{"rollouts": 64, "reward/compose": 0.3}, {"rollouts": 128, "reward/compose": 0.5}]}
    grid = {m: np.full((2, 32, 32, 3), 255, np.uint8) for m in MODELS[:3]}
    write_report(tmp_path, _res(), curves, grid, ["a red square", "two circles"])
    for f in ("report.md", "report.html", "curves.png", "grid.png"):
        assert (tmp_path / f).is_file()
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in html and "Flow-OPD, merge init" in html and "held" in html
