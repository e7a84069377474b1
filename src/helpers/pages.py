"""The HTML pages: reports/index.html (the headline sentence from compare/'s numeric tables, summary.md rendered,
the headline figures) and the rendered notebooks, every image with a one-line alt text.

``python -m helpers.pages index REPORTS`` writes the index; ``python -m helpers.pages html NB.ipynb...`` renders
notebooks (run_all's runner calls both).
"""
from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

import pandas as pd

from .report import METADATA_BASELINE, find_runs

# The HTML pages (reports/index.html and the rendered notebooks). Every image carries a one-line alt text: the
# figure's own title where its PNG holds one (plots.save writes it as the PNG "Title"), else a description made
# from where the figure sits (its file name, or the notebook section that shows it).
FIGURE_NAMES = {"class_counts": "Images per diagnosis in each split", "examples": "Example images per diagnosis",
                "roc_overlay": "Test-split ROC curves of every model", "history_overlay": "Validation curves of every model",
                "time_to_accuracy": "Validation score against training time for every run",
                "evaluation": "Test-split evaluation (confusion matrix, per-class scores, ROC)",
                "curves": "Training curves", "reliability": "Reliability diagram", "errors": "Most confident errors",
                "gradcam": "Grad-CAM maps"}


def png_title(png) -> str | None:
    """The one-line title stored in a PNG (bytes or a path), or None."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(png) if isinstance(png, (bytes, bytearray)) else png) as img:
            text = getattr(img, "text", {}) or {}
    except Exception:  # not a PNG, unreadable: the caller's fallback names it
        return None
    title = (text.get("Title") or text.get("Description") or "").strip()
    return " ".join(title.split())[:300] or None


def figure_alt(path: Path, reports: Path | None = None) -> str:
    """Alt text for a figure file: its PNG title, else its kind and run from the file name."""
    path = Path(path)
    title = png_title(path)
    if title:
        return title
    what = FIGURE_NAMES.get(path.stem, path.stem.replace("_", " "))
    where = path.parent.name if path.parent != Path(reports or path.parent) else ""
    return f"{what} ({where})" if where and where not in ("compare", "etl") else what


def _best_model(reports: Path) -> tuple[str, str] | None:
    """(best model, its selection metric) from compare/comparison.csv's numeric columns ``is_best`` and
    ``select_metric`` (written by ``compare_runs``); None when the comparison has not been written."""
    num = Path(reports) / "compare" / "comparison.csv"
    if not num.exists():
        return None
    table = pd.read_csv(num, index_col=0)
    if not {"is_best", "select_metric"} <= set(table.columns):
        return None
    best = table.index[table["is_best"].astype(str).str.lower().isin(("true", "1", "1.0"))]
    return (str(best[0]), str(table.loc[best[0], "select_metric"])) if len(best) else None


def _run_meta(reports: Path, model: str) -> dict:
    """run.json of the model's first run (lowest seed) under ``reports``, or {}."""
    runs = find_runs(reports, load=False)
    for name, run in sorted(runs.items(), key=lambda kv: (kv[1]["seed"], kv[0])):
        if model in (run["model"], name):
            return dict(run["meta"], folder=run["folder"].name)
    return {}


def _quote(row: pd.Series, metric: str, words: str) -> str | None:
    """"<words> 0.919 (95% CI 0.901–0.934)", or with several seeds the mean and range, from numeric columns."""
    v = row.get(metric)
    if v is None or pd.isna(v):
        return None
    if pd.notna(row.get(f"{metric}_ci_low")):
        return f"{words} {v:.3f} (95% CI {row[f'{metric}_ci_low']:.3f}–{row[f'{metric}_ci_high']:.3f})"
    if pd.notna(row.get(f"{metric}_min")) and row.get("n_seeds", 1) > 1:
        return f"{words} {v:.3f} (mean over seeds, range {row[f'{metric}_min']:.3f}–{row[f'{metric}_max']:.3f})"
    return f"{words} {v:.3f}"


def headline(reports: Path) -> str | None:
    """The result in a few sentences, from compare/'s numeric tables: the best model (chosen on validation), its
    macro AUC and the balanced accuracy of the plain argmax, per image, with intervals or seed ranges, on which
    data and profile; its malignancy AUC on histopathology-confirmed images; the metadata-only baseline. None when
    the comparison has not been written."""
    reports = Path(reports)
    found = _best_model(reports)
    if not found:
        return None
    best, sel = found
    table = pd.read_csv(reports / "compare" / "comparison.csv", index_col=0)
    row = table.loc[best]
    metrics = [q for q in (_quote(row, "auc", "macro AUC"),
                           _quote(row, "balanced_accuracy", "balanced accuracy of the plain argmax")) if q]
    meta = _run_meta(reports, best)
    p = meta.get("provenance", {})
    on = "the lesion-grouped test split" + (f" of {p['data']}" if p.get("data") else "")
    details = ", ".join(str(x) for x in (f"{p['image_size']} input" if p.get("image_size") else None,
                                         p.get("weights")) if x)
    profile = p.get("profile") or meta.get("profile")
    text = (f"Best model, chosen on validation {sel}: {best}, with {' and '.join(metrics) or 'the scores below'}, "
            f"per image, on {on}{f' ({details})' if details else ''}{f', profile {profile}' if profile else ''}.")
    ref_csv = reports / "compare" / "by_reference_standard.csv"
    if ref_csv.exists() and meta.get("run_name"):
        ref = pd.read_csv(ref_csv)
        h = ref[(ref["stratum"] == "histo") & (ref["run"] == meta["run_name"])]
        if len(h) and (q := _quote(h.iloc[0], "malignancy_auc", "malignancy AUC")):
            text += f" On the {int(h.iloc[0]['n_images'])} histopathology-confirmed test images: {q}."
    if METADATA_BASELINE in table.index and (q := _quote(table.loc[METADATA_BASELINE], "auc", "macro AUC")):
        text += f" Age, sex and site alone ({METADATA_BASELINE}): {q}."
    return text


REVIEW_FIGURES = ("compare/roc_by_reference_standard.png", "compare/subgroups_forest.png",
                  "compare/decision_curve.png")  # shown inside summary.md's sections


def write_index(reports: Path) -> Path:
    """reports/index.html: the headline result, summary.md rendered (the argmax table with the baselines, the
    paired comparisons, reference standard, subgroups, lesion-level rows, decision curve, limits), links to the
    rendered notebooks and the other headline figures (each with alt text from its title)."""
    import mistune

    reports = Path(reports)
    links = "\n".join(f'<li><a href="notebooks/{f.name}">{html.escape(f.stem)}</a></li>'
                      for f in sorted((reports / "notebooks").glob("*.html")))
    figs = [f for f in ["etl/class_counts.png", "compare/roc_overlay.png", "compare/history_overlay.png",
                        "compare/time_to_accuracy.png"] if (reports / f).exists()]
    best = _best_model(reports)
    meta = _run_meta(reports, best[0]) if best else {}
    evals = ([reports / meta["folder"] / "evaluation.png"] if meta.get("folder") else []) \
        or sorted(reports.glob("*/evaluation.png"))
    figs += [str(f.relative_to(reports)) for f in evals if f.exists()]
    imgs = "\n".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(figure_alt(reports / f, reports))}" '
                     f'style="max-width:100%"><figcaption>{html.escape(figure_alt(reports / f, reports))} '
                     f'(<code>{html.escape(f)}</code>)</figcaption></figure>' for f in figs)
    summary = (reports / "summary.md").read_text() if (reports / "summary.md").exists() else ""
    body = summary.split("\n", 1)[1] if summary.startswith("# ") else summary
    for f in REVIEW_FIGURES:  # give the summary's figures their alt text from the PNG titles
        if (reports / f).exists():
            body = re.sub(r"!\[[^\]]*\]\(" + re.escape(f) + r"\)",
                          lambda _, f=f: f"![{figure_alt(reports / f, reports)}]({f})", body)
    rendered = mistune.create_markdown(plugins=["table"])(body) if body else ""
    lead = headline(reports)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>HAM10000 ResNets — reports</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse;font-size:small}}
td,th{{border:1px solid #ccc;padding:3px 6px}} img{{max-width:100%}}</style></head><body>
<h1>HAM10000 ResNets — reports</h1>
{f'<p class="headline"><b>{html.escape(lead)}</b></p>' if lead else ''}
<p><b>Research use only; not a diagnostic device.</b></p>
<h2>Comparison</h2>
{rendered}
<h2>Rendered notebooks</h2><ul>{links}</ul>
<h2>Headline figures</h2>{imgs}
</body></html>"""
    path = reports / "index.html"
    path.write_text(page)
    return path


# nbconvert's lab template ignores an image output's "alt" metadata; this one extends it to write it.
_ALT_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{% block data_png scoped %}
{%- set alt = output | get_metadata('alt', 'image/png') -%}
{%- if alt -%}{{ super() | replace('<img ', '<img alt="' ~ (alt | escape_html) ~ '" ', 1) }}{%- else -%}{{ super() }}{%- endif -%}
{% endblock data_png %}
{% block data_jpg scoped %}
{%- set alt = output | get_metadata('alt', 'image/jpeg') -%}
{%- if alt -%}{{ super() | replace('<img ', '<img alt="' ~ (alt | escape_html) ~ '" ', 1) }}{%- else -%}{{ super() }}{%- endif -%}
{% endblock data_jpg %}
"""


def add_alt_text(nb) -> int:
    """Give every image output of a notebook (nbformat node) an alt text: the PNG's title, else "Figure k of
    section <the markdown heading above it>". Keeps an alt that is already there; returns how many were set."""
    import base64

    section, count, done = "", {}, 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            heading = next((ln.lstrip("#").strip() for ln in cell.source.splitlines() if ln.startswith("#")), None)
            section = heading or section
            continue
        for out in cell.get("outputs", []):
            for mime in ("image/png", "image/jpeg"):
                if mime not in out.get("data", {}):
                    continue
                md = out.setdefault("metadata", {}).setdefault(mime, {})
                if md.get("alt"):
                    continue
                count[section] = count.get(section, 0) + 1
                try:
                    title = png_title(base64.b64decode(out["data"][mime]))
                except (ValueError, TypeError):
                    title = None
                md["alt"] = title or (f"Figure {count[section]} of section “{section}”" if section
                                      else f"Figure {count[section]}")
                done += 1
    return done


def render_notebook(ipynb: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render an executed notebook to HTML (JupyterLab look) with alt text on every figure; returns the path."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    ipynb = Path(ipynb)
    nb = nbformat.read(ipynb, as_version=4)
    add_alt_text(nb)
    exporter = HTMLExporter(extra_loaders=[DictLoader({"alt_index.html.j2": _ALT_TEMPLATE})],
                            template_file="alt_index.html.j2")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": ipynb.stem}})
    out = Path(out_dir or ipynb.parent) / f"{ipynb.stem}.html"
    out.write_text(body, encoding="utf-8")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="report utilities: index (reports/index.html), html (render notebooks)")
    ap.add_argument("command", choices=["index", "html"])
    ap.add_argument("paths", type=Path, nargs="+", help="index: the reports folder; html: notebook(s), then "
                                                        "optionally --out-dir")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.command == "index":
        print(write_index(args.paths[0]))
    else:
        for nb in args.paths:
            print(render_notebook(nb, args.out_dir))


if __name__ == "__main__":
    main()
