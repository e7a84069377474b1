"""Reports from saved runs: what the notebooks display, the comparison, summary.md, model cards, the index page.

Everything here reads files that the model notebooks wrote under ``reports/`` (predictions, metrics, history,
run.json), so the comparison can be re-made without retraining and every number traces back to a saved run.
"""
from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import pandas as pd

from . import metrics as M
from . import plots as P
from .config import project_root, recipe as get_recipe

HEADLINE = ["accuracy", "balanced_accuracy", "auc", "malignancy_auc", "sensitivity", "specificity", "ece"]
LABELS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced acc.", "auc": "Macro AUC",
          "malignancy_auc": "Malignancy AUC", "sensitivity": "Sensitivity", "specificity": "Specificity",
          "ece": "ECE"}
BASELINE = "majority class (nv)"
RECIPE_KEYS = ["head", "freeze_backbone", "optimizer", "lr", "schedule", "batch_size", "epochs", "augment",
               "label_smoothing", "select_metric", "patience"]


# ------------------------------------------------------------------------------------------- model notebooks
def recipe_table(cfg: dict, arch: str, recipes, num_classes: int) -> pd.DataFrame:
    """The settings of each recipe a notebook is about to train, and its trainable-parameter count."""
    from .experiment import trainable_summary

    rows = {}
    for name in recipes:
        r = get_recipe(cfg, arch, name)
        rows[name] = {**{k: r.get(k) for k in RECIPE_KEYS}, **trainable_summary(cfg, arch, name, num_classes)}
    return pd.DataFrame(rows).T.rename(columns={"trainable": "trainable params", "total": "total params"})


def fmt_ci(value, low, high) -> str:
    return "–" if pd.isna(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def show_run(res: dict) -> None:
    """Display one run's headline metrics and figures in a notebook."""
    from IPython.display import Image, Markdown, display

    info = res["info"]
    display(Markdown(f"### {res['run']}\n{info['epochs_run']} epochs run, best epoch {info['best_epoch']} "
                     f"(by {info['select_metric']}), {info['train_images']} training images, "
                     f"{info['train_seconds']:.0f} s on {info['device']}, {info['img_per_s']:.0f} img/s; "
                     f"{info['trainable_params']:,} trainable parameters."))
    t = res["metrics"].set_index("metric")
    display(pd.DataFrame({"value [95% CI]": [fmt_ci(*t.loc[m, ["value", "ci_low", "ci_high"]]) for m in t.index]},
                         index=t.index))
    for name in ("curves", "evaluation", "reliability", "errors", "gradcam"):
        display(Image(res["figures"][name]))


# ---------------------------------------------------------------------------------------------- model cards
def model_card(meta: dict, metrics: pd.DataFrame) -> str:
    p, info = meta["provenance"], meta["info"]
    t = metrics.set_index("metric")
    rows = "\n".join(f"| {LABELS.get(m, m)} | {fmt_ci(*t.loc[m, ['value', 'ci_low', 'ci_high']])} |" for m in t.index)
    return f"""# Model card: {meta['run_name']}

**Research use only. Not a diagnostic device.**

- Model: {meta['arch']} ({meta['head']} head{', frozen backbone' if meta['freeze_backbone'] else ''}), {info['trainable_params']:,} trainable of {info['total_params']:,} parameters
- Weights: {p['weights']}; recipe `{meta['recipe']}` of profile `{meta['profile']}`
- Task: {meta['task']} — classes {', '.join(meta['classes'])}
- Data: {p['data']}, {p['image_size']} input, lesion-grouped split (seed {p['split_seed']}); trained on {info['train_images']} images, {info['epochs_run']} epochs (best {info['best_epoch']} by {info['select_metric']})
- Trained on {info['device']} in {info['train_seconds']:.0f} s; commit {p['git_commit']}; {p['date']}

## Intended use
Studying how ResNets learn dermatoscopic diagnoses; a baseline for research. Not for clinical decisions,
screening or triage.

## Test-split metrics (95% bootstrap CI over lesions)
| Metric | Value [95% CI] |
|---|---|
{rows}

Sensitivity and specificity are for malignancy (mel, bcc, akiec) at the threshold chosen on the validation split
for at least 95% sensitivity ({'n/a' if meta.get('malignancy_threshold') is None else f"{meta['malignancy_threshold']:.4f}"}).

## Known limits
- Dermatoscopic images only, from two sites (Vienna, Queensland); mostly light skin types. Performance on other
  populations, cameras or clinical photographs is unknown and likely worse.
- HAM10000's labels are partly histopathology, partly follow-up or expert consensus; class balance (67% nevi)
  differs from clinical practice.
- One split, one seed: the intervals cover test-set sampling, not training variance.
"""


# ------------------------------------------------------------------------------------------------ comparison
def load_run(folder: Path) -> dict:
    meta = json.loads((folder / "run.json").read_text())
    return dict(meta=meta, metrics=pd.read_csv(folder / "metrics.csv"), history=pd.read_csv(folder / "history.csv"),
                test=pd.read_csv(folder / "predictions_test.csv", dtype={"image_id": str, "lesion_id": str}),
                val=pd.read_csv(folder / "predictions_val.csv", dtype={"image_id": str, "lesion_id": str}))


def find_runs(reports: Path, profile: str, names=None) -> dict[str, dict]:
    runs = {}
    for f in sorted(reports.glob("*/run.json")):
        meta = json.loads(f.read_text())
        if meta.get("profile") == profile and (names is None or meta["run_name"] in names):
            runs[meta["run_name"]] = load_run(f.parent)
    missing = sorted(set(names or []) - set(runs))
    if missing:
        raise FileNotFoundError(f"no finished run(s) {missing} of profile {profile!r} under {reports}")
    return runs


def compare_runs(cfg: dict, reports: Path, names=None, n_boot: int | None = None) -> dict:
    """The comparison table (with a majority-class baseline), overlays, and paired tests of the best run."""
    n_boot = n_boot or cfg["bootstrap"]
    runs = find_runs(Path(reports), cfg["name"], names)
    if not runs:
        raise FileNotFoundError(f"no runs of profile {cfg['name']!r} under {reports}: run notebooks 02-04 first")
    first = next(iter(runs.values()))
    classes = first["meta"]["classes"]
    rows = {}
    for name, run in runs.items():
        t = run["metrics"].set_index("metric")
        info = run["meta"]["info"]
        rows[name] = {**{c: t.value.get(c) for c in HEADLINE},
                      **{f"{c}_ci": (t.ci_low.get(c), t.ci_high.get(c)) for c in HEADLINE},
                      "trainable params": info["trainable_params"], "epochs": info["epochs_run"],
                      "train s": round(info["train_seconds"], 1), "img/s": round(info["img_per_s"], 1),
                      "val AUC": M.summary(run["val"], classes)["auc"]}
    # Majority-class baseline through the same metric code: the class most frequent in the training split.
    split = pd.read_csv(Path(reports) / "split.csv", dtype={"image_id": str, "lesion_id": str})
    majority = int(split[split.split == "train"].label.mode().iloc[0])
    base_test = M.majority_predictions(first["test"], classes, majority)
    base_val = M.majority_predictions(first["val"], classes, majority)
    thr = M.threshold_for_sensitivity(*M.malignancy_score(base_val, classes)) if "malignancy_auc" in \
        set(first["metrics"].metric) else None
    bt = M.summary_with_ci(base_test, classes, threshold=thr, n_boot=n_boot, seed=0).set_index("metric")
    rows[BASELINE] = {**{c: bt.value.get(c) for c in HEADLINE},
                      **{f"{c}_ci": (bt.ci_low.get(c), bt.ci_high.get(c)) for c in HEADLINE},
                      "trainable params": 0, "epochs": 0, "train s": 0.0, "img/s": float("nan"), "val AUC": 0.5}
    table = pd.DataFrame(rows).T
    for c in HEADLINE + ["val AUC", "train s", "img/s"]:
        table[c] = pd.to_numeric(table[c])
    display_table = pd.DataFrame({LABELS[c]: [fmt_ci(v, *ci) if isinstance(ci, tuple) else "–"
                                              for v, ci in zip(table[c], table[f"{c}_ci"])] for c in HEADLINE
                                  if table[c].notna().any()}, index=table.index)
    display_table["trainable params"] = [f"{int(v):,}" for v in table["trainable params"]]
    display_table["epochs"] = table["epochs"]
    for c in ("train s", "img/s"):
        display_table[c] = [f"{v:.1f}" if pd.notna(v) and v else "–" for v in table[c]]

    best = max(runs, key=lambda n: rows[n]["val AUC"])  # chosen on validation, never on test
    paired = []
    acc = lambda p: float((p.label == p.pred).mean())  # noqa: E731
    for name, run in runs.items():
        if name == best:
            continue
        mc = M.mcnemar(runs[best]["test"], run["test"])
        diff, lo, hi = M.paired_bootstrap_diff(runs[best]["test"], run["test"], acc, n_boot=n_boot, seed=0)
        paired.append({"best (by val AUC)": best, "other": name, "accuracy difference": round(diff, 4),
                       "95% CI": f"[{lo:.3f}, {hi:.3f}]", "McNemar b": mc["b"], "McNemar c": mc["c"],
                       "McNemar p": mc["p_value"], "lead more than noise (p<0.05)": bool(mc["p_value"] < 0.05)})
    out = Path(reports) / "compare"
    title = first["meta"]["provenance"]
    from .experiment import provenance_line

    line = provenance_line(title)
    figures = {
        "roc_overlay": P.save(P.roc_overlay({**{n: r["test"] for n, r in runs.items()}, BASELINE: base_test},
                                            classes, f"Test split ROC — {line}"), out / "roc_overlay.png"),
        "history_overlay": P.save(P.history_overlay({n: r["history"] for n, r in runs.items()},
                                                    f"Validation curves — {line}"), out / "history_overlay.png"),
    }
    table.drop(columns=[f"{c}_ci" for c in HEADLINE]).to_csv(out / "comparison.csv", float_format="%.4f")
    display_table.to_csv(out / "comparison_ci.csv")  # the same numbers as shown, with intervals (index page)
    return dict(table=table, display=display_table, paired=pd.DataFrame(paired), best=best, runs=runs,
                figures=figures, provenance=first["meta"]["provenance"], provenance_line=line)


def write_summary(cfg: dict, comp: dict, reports: Path) -> dict:
    """reports/summary.md: the comparison table, the paired tests and the run's provenance."""
    p = comp["provenance"]
    table_md = (f"Test split of **{p['data']}**, {p['image_size']} input, lesion-grouped 70/15/15 split "
                f"(seed {p['split_seed']}), **{p['weights']}**, profile **{p['profile']}**, commit "
                f"`{p['git_commit']}`, {p['device']}, {p['date']}. 95% bootstrap intervals over lesions; "
                f"best run chosen on validation AUC: **{comp['best']}**.\n\n"
                + comp["display"].to_markdown() + "\n\n"
                "ECE is biased upward when a resample repeats images, so its interval can sit above the point "
                "estimate; read it as a range of plausible values, not centred on it.\n")
    paired_md = comp["paired"].to_markdown(index=False) if len(comp["paired"]) else "(only one run)"
    packages = ", ".join(f"{k} {v}" for k, v in p["packages"].items())
    text = f"""# Summary of the {p['profile']} run

{table_md}
## Is the best model's lead more than noise?

{paired_md}

## Provenance

- Data: {p['data']} from `{p['data_dir']}` ({p['images']} images), task `{p['task']}`
- Image size: {p['image_size']}; split seed {p['split_seed']}, fractions {p['split_fractions']}, grouped by lesion
- Weights: {p['weights']}; profile `{p['profile']}` ({cfg['description']})
- Packages: {packages}
- Git commit: {p['git_commit']}; device: {p['device']}; date: {p['date']}
"""
    path = Path(reports) / "summary.md"
    path.write_text(text)
    return dict(path=path, table_md=table_md, text=text)


def update_readme(table_md: str, readme: Path | None = None) -> Path:
    """Replace the README's results block (between the results markers) with the generated table."""
    readme = readme or project_root() / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} block to fill")
    new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table_md}\n{end}", text,
                 flags=re.S)
    readme.write_text(new)
    return readme


# ------------------------------------------------------------------------------------------------ index page
def write_index(reports: Path) -> Path:
    """reports/index.html: links to the rendered notebooks, the headline figures and the summary table."""
    reports = Path(reports)
    links = "\n".join(f'<li><a href="notebooks/{f.name}">{html.escape(f.stem)}</a></li>'
                      for f in sorted((reports / "notebooks").glob("*.html")))
    figs = [f for f in ["etl/class_counts.png", "compare/roc_overlay.png", "compare/history_overlay.png"]
            if (reports / f).exists()]
    best_eval = sorted(reports.glob("*/evaluation.png"))
    figs += [str(f.relative_to(reports)) for f in best_eval]
    imgs = "\n".join(f'<figure><img src="{f}" style="max-width:100%"><figcaption>{html.escape(f)}</figcaption>'
                     f'</figure>' for f in figs)
    table = ""
    if (reports / "compare" / "comparison_ci.csv").exists():
        table = pd.read_csv(reports / "compare" / "comparison_ci.csv", index_col=0).to_html()
    summary = (reports / "summary.md").read_text() if (reports / "summary.md").exists() else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>HAM10000 ResNets — reports</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px}}</style></head><body>
<h1>HAM10000 ResNets — reports</h1>
<p><b>Research use only; not a diagnostic device.</b></p>
<h2>Rendered notebooks</h2><ul>{links}</ul>
<h2>Comparison</h2>{table}
<pre style="white-space:pre-wrap">{html.escape(summary.split('## Provenance')[-1]) if summary else ''}</pre>
<h2>Headline figures</h2>{imgs}
</body></html>"""
    path = reports / "index.html"
    path.write_text(page)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="report utilities")
    ap.add_argument("command", choices=["index"])
    ap.add_argument("reports", type=Path)
    args = ap.parse_args(argv)
    print(write_index(args.reports))


if __name__ == "__main__":
    main()
