"""The paper's table, training curves, an image grid and the claims check, as
report.md and report.html (with curves.png and grid.png beside them).

Everything here is computed from results.json and the training logs: the text
about which claims held is generated from the numbers, never written by hand.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .tasks import TASK_NAMES
from .world.prompts import CATEGORIES, MAX_TEXT_LEN

# the models of the table: the base, one GRPO teacher per task (flowopd.tasks), the baseline, the students
TASK_OF_TEACHER = {f"teacher-{t}": t for t in TASK_NAMES}
MODELS = ("base", *TASK_OF_TEACHER, "grpo-mix", "opd-merge", "opd-sft", "opd-merge-nomar")
LABELS = {
    "base": "Base (pretrained)",
    **{m: f"GRPO teacher: {t}" for m, t in TASK_OF_TEACHER.items()},
    "grpo-mix": "GRPO-Mix (one policy, rewards mixed)",
    "opd-merge": "Flow-OPD, merge init",
    "opd-sft": "Flow-OPD, SFT init",
    "opd-merge-nomar": "Flow-OPD, merge init, no MAR (beta = 0)",
}
# SD3.5-Medium numbers of the paper (DESIGN.md section 1): GenEval, OCR, DeQA, PickScore.
PAPER = {
    "base": (0.63, 0.59, 4.07, 21.64),
    "teacher-compose": (0.94, 0.65, 4.01, 21.53),
    "teacher-text": (0.64, 0.92, 4.06, 21.69),
    "grpo-mix": (0.73, 0.83, 4.33, 21.84),
    "opd-sft": (0.91, 0.92, 4.29, 21.83),
    "opd-merge": (0.92, 0.94, 4.35, 23.08),
}


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def _fse(r: dict, key: str) -> str:
    """A mean with its standard error, e.g. '0.651 ± 0.030' (the mean alone where none was measured)."""
    se = (r.get("se") or {}).get(key)
    return _f(r.get(key)) + ("" if se is None or r.get(key) is None else f" ± {se:.3f}")


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for m in MODELS:
        r = results.get("models", {}).get(m)
        p = PAPER.get(m)
        ours = ([_fse(r, t) for t in TASK_NAMES] + [_f(r.get("fidelity"), 2), _fse(r, "average")]
                if r else ["-"] * (len(TASK_NAMES) + 2))
        paper = [_f(p[0], 2), _f(p[1], 2), _f(p[2], 2), _f(p[3], 2)] if p else ["-"] * 4
        rows.append([LABELS[m]] + ours + paper)
    return rows


HEADER = ["model", *TASK_NAMES, "FD (lower better)", "average",
          "paper GenEval", "paper OCR", "paper DeQA", "paper PickScore"]


def category_rows(results: dict) -> list[list[str]]:
    """Per compose category accuracy ± standard error, one row per evaluated model."""
    models = results.get("models", {})
    return [[LABELS[m]] + [_fse(models[m], c) for c in CATEGORIES] for m in MODELS if m in models]


CATEGORY_HEADER = ["model", *CATEGORIES]
TEXT_LENGTHS = tuple(range(1, MAX_TEXT_LEN + 1))
LENGTH_HEADER = ["model", *(f"{n} character{'s' if n > 1 else ''}" for n in TEXT_LENGTHS)]


def length_rows(results: dict) -> list[list[str]]:
    """Text score by sign length ± standard error, one row per model evaluated with it (results
    written before evaluation split text by length have none)."""
    models = results.get("models", {})
    return [[LABELS[m]] + [_fse(models[m], f"text_len{n}") for n in TEXT_LENGTHS]
            for m in MODELS if m in models and models[m].get("text_len1") is not None]


def claims(results: dict) -> list[tuple[str, bool | None, str]]:
    """(claim, held?, evidence) computed from the numbers; None when a model is missing."""
    m = results.get("models", {})
    out: list[tuple[str, bool | None, str]] = []

    def get(model, key):
        return (m.get(model) or {}).get(key)

    opd, mix = m.get("opd-merge"), m.get("grpo-mix")
    if opd and mix:
        diffs = {t: opd[t] - mix[t] for t in TASK_NAMES}
        out.append(("Flow-OPD (merge init) beats GRPO-Mix on every task",
                    all(d > 0 for d in diffs.values()),
                    ", ".join(f"{t} {d:+.3f}" for t, d in diffs.items())))
        d = opd["average"] - mix["average"]
        out.append(("Flow-OPD (merge init) beats GRPO-Mix on the average by >= 0.05", d >= 0.05, f"{d:+.3f}"))
    else:
        out.append(("Flow-OPD (merge init) beats GRPO-Mix on every task", None, "missing models"))
    gaps = []
    for teacher, task in TASK_OF_TEACHER.items():
        if get(teacher, task) is not None and get("opd-merge", task) is not None:
            gaps.append((task, get("opd-merge", task) - get(teacher, task)))
    if gaps:
        out.append(("The student comes within 0.05 of each teacher on that teacher's task (or passes it)",
                    all(g >= -0.05 for _, g in gaps), ", ".join(f"{t} {g:+.3f}" for t, g in gaps)))
    fb, fo, fn = get("base", "fidelity"), get("opd-merge", "fidelity"), get("opd-merge-nomar", "fidelity")
    if None not in (fb, fo):
        out.append(("With MAR, fidelity (FD) stays within 20% of the base's", fo <= 1.2 * fb,
                    f"FD base {fb:.2f}, OPD {fo:.2f} ({(fo / fb - 1) * 100:+.0f}%)"))
    if None not in (fo, fn):
        out.append(("MAR (beta > 0) gives better fidelity than beta = 0", fo < fn, f"FD {fo:.2f} vs {fn:.2f}"))
    if get("opd-merge", "average") is not None and get("opd-sft", "average") is not None:
        d = get("opd-merge", "average") - get("opd-sft", "average")
        out.append(("Merge init is at least as good as SFT init (the paper's best row)", d >= 0, f"average {d:+.3f}"))
    return out


def plot_curves(curves: dict, path: Path) -> None:
    """curves: {run: [{"rollouts": n, "reward/<task>": r, ...}, ...]} -> one PNG, a panel per task."""
    import matplotlib  # heavy to import (~0.5 s): only when a report draws its curves

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    tasks = TASK_NAMES
    fig, axes = plt.subplots(1, len(tasks), figsize=(13 * len(tasks) / 3, 3.6), squeeze=False)
    axes = axes[0]
    colors = {run: f"C{i}" for i, run in enumerate(curves)}  # one colour per run across the panels
    for ax, task in zip(axes, tasks):
        for run, rows in curves.items():
            pts = [(r["rollouts"], r[f"reward/{task}"]) for r in rows if r.get(f"reward/{task}") is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=".", label=run, color=colors[run])
        ax.set_title(f"{task} reward")
        ax.set_xlabel("rollouts (images sampled)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training reward")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(rows: dict, path: Path, scale: int = 3) -> None:
    """rows: {model: uint8 (K, 32, 32, 3)} -> PNG, one row per model (same prompts and seeds)."""
    strips = []
    for imgs in rows.values():
        pad = [np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=200) for im in imgs]
        strips.append(np.concatenate(pad, axis=1))
    grid = np.concatenate(strips, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, results: dict, curves: dict, grid_rows: dict, grid_prompts: list[str]) -> None:
    out = Path(out)
    if curves:
        plot_curves(curves, out / "curves.png")
    if grid_rows:
        save_grid(grid_rows, out / "grid.png")
    rows = table_rows(results)
    cat_rows = category_rows(results)
    len_rows = length_rows(results)
    cl = claims(results)
    verdict = {True: "held", False: "did not hold", None: "not measured"}
    stage_rows = [[k, f"{v:.0f}"] for k, v in results.get("stage_seconds", {}).items()]
    md = ["# Flow-OPD on the toy world", "",
          f"Preset `{results.get('preset')}`, measured {results.get('date', '')} on {results.get('machine', '')}. "
          "Scores on the test split (compose: GenEval-style strict accuracy, mean over categories; text: "
          "1 - normalised edit distance; quality: the learned toy quality model; FD: Frechet distance to "
          "renders of the same prompts). Each mean is followed by its standard error over the test prompts. "
          "Paper columns: SD3.5-Medium numbers of the paper, for comparison.", "",
          _md_table(HEADER, rows), "", "## Compose by category", "", _md_table(CATEGORY_HEADER, cat_rows), ""]
    if len_rows:
        md += ["## Text by sign length", "", _md_table(LENGTH_HEADER, len_rows), ""]
    md += ["## Claims of the paper", ""]
    md += [f"- **{verdict[ok]}**: {c} ({ev})" for c, ok, ev in cl]
    md += ["", "## Training curves", "", "![curves](curves.png)", "", "## Samples", "",
           "One row per model (in the table's order), same prompts and seeds: " +
           "; ".join(f"`{p}`" for p in grid_prompts), "", "![grid](grid.png)", "",
           "## Stage wall-clock seconds", "", _md_table(["stage", "seconds"], stage_rows)]
    (out / "report.md").write_text("\n".join(md) + "\n")

    def img(name):
        p = out / name
        if not p.exists():
            return "<p>(missing)</p>"
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'

    def html_table(header, body):
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><tr>{th}</tr>{trs}</table>"

    lis = "".join(f'<li class="{"ok" if ok else "no" if ok is False else "na"}"><b>{verdict[ok]}</b>: '
                  f"{html.escape(c)} ({html.escape(ev)})</li>" for c, ok, ev in cl)
    labels = "".join(f"<li>{html.escape(LABELS.get(m, m))}</li>" for m in grid_rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Flow-OPD toy-world report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}th{{background:#eee}}
li.ok b{{color:#176b2c}}li.no b{{color:#a11}}img{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>Flow-OPD on the toy world</h1>
<p>Preset <code>{html.escape(str(results.get('preset')))}</code>, measured {html.escape(str(results.get('date', '')))}
on {html.escape(str(results.get('machine', '')))}. Test-split scores, each with its standard error; paper columns are the
paper's SD3.5-Medium numbers.</p>
{html_table(HEADER, rows)}
<h2>Compose by category</h2>{html_table(CATEGORY_HEADER, cat_rows)}
{"<h2>Text by sign length</h2>" + html_table(LENGTH_HEADER, len_rows) if len_rows else ""}
<h2>Claims of the paper</h2><ul>{lis}</ul>
<h2>Training curves</h2>{img('curves.png')}
<h2>Samples</h2><p>Rows, top to bottom:</p><ol>{labels}</ol>
<p>Prompts: {html.escape('; '.join(grid_prompts))}</p>{img('grid.png')}
<h2>Stage wall-clock seconds</h2>{html_table(["stage", "seconds"], stage_rows)}
</body></html>"""
    (out / "report.html").write_text(page)


def load_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())
