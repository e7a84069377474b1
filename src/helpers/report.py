"""Reports from saved runs: what the notebooks display, the comparison, summary.md, model cards, the index page.

Everything here reads files that the model notebooks wrote under ``reports/`` (predictions, metrics, history,
run.json), so the comparison can be re-made without retraining and every number traces back to a saved run.
This module imports nothing from ``experiment`` (which imports it); the provenance line lives here.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics as M
from . import plots as P
from .config import project_root

HEADLINE = ["accuracy", "balanced_accuracy", "auc", "malignancy_auc", "sensitivity", "specificity", "ece"]
LABELS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced acc.", "auc": "Macro AUC",
          "malignancy_auc": "Malignancy AUC", "sensitivity": "Sensitivity", "specificity": "Specificity",
          "ece": "ECE", "log_loss": "Log loss", "malignancy_threshold": "Malignancy threshold (chosen on val)"}
BASELINE = "majority class (nv)"  # the baseline's row name for the 7 diagnoses (see ``compare_runs``)
SPREAD_METRICS = ["auc", "balanced_accuracy", "accuracy"]  # the seed-spread statement and the paired comparison


def provenance_line(p: dict) -> str:
    return (f"{p['data']}, {p['image_size']} input, split seed {p['split_seed']} (lesion-grouped "
            f"{'/'.join(str(round(f * 100)) for f in p['split_fractions'])}), {p['weights']}, profile {p['profile']}")


# ------------------------------------------------------------------------------------------- model notebooks
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
Where the table lists the threshold, their intervals re-choose it on resampled validation lesions in every
resample, so they include the threshold's own uncertainty.

## Known limits
- Dermatoscopic images only, from two sites (Vienna, Queensland); mostly light skin types. Performance on other
  populations, cameras or clinical photographs is unknown and likely worse.
- HAM10000's labels are partly histopathology, partly follow-up or expert consensus; class balance (67% nevi)
  differs from clinical practice.
- One split, one training seed per card: the intervals cover test-set sampling, not training variance (the
  comparison report measures that across seeds where the profile trains several).
"""


# ------------------------------------------------------------------------------------------------ comparison
def load_run(folder: Path) -> dict:
    meta = json.loads((folder / "run.json").read_text())
    ids = {"image_id": str, "lesion_id": str}
    return dict(meta=meta, model=model_name(meta), seed=run_seed(meta), metrics=pd.read_csv(folder / "metrics.csv"),
                history=pd.read_csv(folder / "history.csv"),
                test=pd.read_csv(folder / "predictions_test.csv", dtype=ids),
                val=pd.read_csv(folder / "predictions_val.csv", dtype=ids))


def model_name(meta: dict) -> str:
    """The model a run trains ("resnet34_tuned"): run.json's ``model_name``, else arch_recipe (older runs)."""
    return meta.get("model_name") or f"{meta['arch']}_{meta['recipe']}"


def run_seed(meta: dict) -> int:
    """The run's training seed: run.json's ``seed``, else its recipe's (older runs), else 0."""
    return int(meta.get("seed", (meta.get("recipe_settings") or {}).get("seed", 0)))


def find_runs(reports: Path, profile: str, names=None) -> dict[str, dict]:
    """Every finished run of ``profile`` under ``reports``, by run name; ``names`` keeps the runs whose run name or
    model name is listed (so ``["resnet34_tuned"]`` means all of that model's seeds)."""
    runs = {}
    for f in sorted(Path(reports).glob("*/run.json")):
        meta = json.loads(f.read_text())
        if meta.get("profile") == profile and (names is None or {meta["run_name"], model_name(meta)} & set(names)):
            runs[meta["run_name"]] = load_run(f.parent)
    found = {n for r in runs.values() for n in (r["meta"]["run_name"], r["model"])}
    missing = sorted(set(names or []) - found)
    if missing:
        raise FileNotFoundError(f"no finished run(s) {missing} of profile {profile!r} under {reports}")
    return runs


def group_by_model(runs: dict[str, dict]) -> dict[str, list[str]]:
    """Model name -> its run names, ordered by seed."""
    models: dict[str, list[str]] = {}
    for name, run in sorted(runs.items(), key=lambda kv: (kv[1]["model"], kv[1]["seed"])):
        models.setdefault(run["model"], []).append(name)
    return models


def select_best(values: dict[str, float], select_metric: str) -> str:
    """The model with the best validation score (``values``: model -> mean over its seeds), never a test number."""
    valid = {k: v for k, v in values.items() if pd.notna(v)}
    if not valid:
        raise ValueError(f"{select_metric} is undefined for every model; cannot choose the best on validation")
    pick = max if M.SELECT_METRICS[select_metric] else min
    return pick(valid, key=valid.get)


def readme_update_wanted(update_readme: bool | None) -> bool:
    """05_compare's ``update_readme`` parameter: True or False as given; None (the default) means "only when the
    environment variable HAM_UPDATE_README is 1", which run_all.sh sets for the committed profile only."""
    if update_readme is None:
        return os.environ.get("HAM_UPDATE_README") == "1"
    return bool(update_readme)


def _run_row(run: dict, classes, select_metric: str) -> dict:
    t, info = run["metrics"].set_index("metric"), run["meta"]["info"]
    return {"model": run["model"], "seed": run["seed"],
            **{c: t.value.get(c) for c in HEADLINE},
            **{f"{c}_ci_low": t.ci_low.get(c) for c in HEADLINE},
            **{f"{c}_ci_high": t.ci_high.get(c) for c in HEADLINE},
            select_metric: M.validation_score(run["val"], classes, select_metric),
            "train min": info["train_seconds"] / 60, "epochs": info["epochs_run"], "img/s": info.get("img_per_s"),
            "trainable params": info["trainable_params"],
            "device": (run["meta"].get("provenance") or {}).get("device") or info.get("device")}


def _model_rows(runs_table: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    """One row per model: the mean over its seeds, the sd (ddof 1) and min/max across seeds for each headline
    metric; the single run's 95% lesion-bootstrap interval where the model has one seed."""
    rows = {}
    for model, g in runs_table.groupby("model", sort=False):
        row = {"seeds": ",".join(str(s) for s in g["seed"]), "n_seeds": len(g)}
        for c in HEADLINE + [select_metric]:
            v = pd.to_numeric(g[c])
            row.update({c: v.mean(), f"{c}_sd": v.std(ddof=1) if len(g) > 1 else np.nan,
                        f"{c}_min": v.min(), f"{c}_max": v.max()})
        for c in HEADLINE:
            one = len(g) == 1
            row[f"{c}_ci_low"] = g[f"{c}_ci_low"].iloc[0] if one else np.nan
            row[f"{c}_ci_high"] = g[f"{c}_ci_high"].iloc[0] if one else np.nan
        row.update({"train min": g["train min"].mean(), "epochs": g["epochs"].mean(), "img/s": g["img/s"].mean(),
                    "trainable params": g["trainable params"].iloc[0], "device": ", ".join(dict.fromkeys(g["device"]))})
        rows[model] = row
    return pd.DataFrame(rows).T


def _display(table: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    """The table as shown: single-seed models and the baseline "value [95% CI]"; several seeds "mean (min–max)"."""
    def cell(row, c):
        if pd.isna(row[c]):
            return "–"
        if row["n_seeds"] > 1:
            return f"{row[c]:.3f} ({row[f'{c}_min']:.3f}–{row[f'{c}_max']:.3f})"
        low, high = row.get(f"{c}_ci_low"), row.get(f"{c}_ci_high")
        return fmt_ci(row[c], low, high) if pd.notna(low) else f"{row[c]:.3f}"

    shown = [c for c in HEADLINE if table[c].notna().any()]
    out = pd.DataFrame({LABELS[c]: [cell(r, c) for _, r in table.iterrows()] for c in shown}, index=table.index)
    out[f"{select_metric} (selects)"] = [cell(r, select_metric) for _, r in table.iterrows()]
    out["seeds"] = table["seeds"]
    out["train min"] = [f"{v:.1f}" if pd.notna(v) and v else "–" for v in table["train min"]]
    out["epochs"] = [f"{v:g}" if v else "–" for v in table["epochs"]]
    out["trainable params"] = [f"{int(v):,}" for v in table["trainable params"]]
    out["img/s"] = [f"{v:.1f}" if pd.notna(v) and v else "–" for v in table["img/s"]]
    if table["device"].replace("", np.nan).dropna().nunique() > 1:
        out["device"] = table["device"]
    return out


def seed_spread(runs_table: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    """For each model trained with >= 2 seeds: the seed-to-seed spread of the test metrics and the validation score
    (mean, sd with ddof 1, min, max, range). Empty when no model has two seeds."""
    rows = []
    for model, g in runs_table.groupby("model", sort=False):
        if len(g) < 2:
            continue
        for c in SPREAD_METRICS + [select_metric]:
            v = pd.to_numeric(g[c])
            rows.append(dict(model=model, seeds=",".join(str(s) for s in g["seed"]), metric=c, mean=v.mean(),
                             sd=v.std(ddof=1), min=v.min(), max=v.max(), range=v.max() - v.min()))
    return pd.DataFrame(rows, columns=["model", "seeds", "metric", "mean", "sd", "min", "max", "range"])


def seed_spread_text(spread: pd.DataFrame, runs_table: pd.DataFrame) -> str:
    """The measured training-seed noise in words (markdown), or that it was not measured."""
    if not len(spread):
        seeds = sorted(set(runs_table["seed"]))
        return ("**Seed-to-seed spread: not measured in this run.** No model here was trained with more than one "
                f"seed (seeds used: {', '.join(map(str, seeds))}), so nothing below says how far two trainings of "
                "the same model land apart; a difference between single-seed models may be training noise. "
                "A profile with `seeds: [0, 1, 2]` measures it.")
    lines = []
    for model, g in spread.groupby("model", sort=False):
        parts = [f"{'test ' + LABELS[r.metric] if r.metric in LABELS else r.metric + ' (validation)'} sd {r.sd:.3f} "
                 f"(range {r.min:.3f}–{r.max:.3f}, {r.range:.3f} wide)" for r in g.itertuples()]
        lines.append(f"- **{model}** over seeds {g.seeds.iloc[0].replace(',', ', ')}: " + "; ".join(parts) + ".")
    return ("**Measured seed-to-seed spread** (same model, data and split; only the training seed changes; sd over "
            "seeds with ddof 1):\n\n" + "\n".join(lines) + "\n\nThis is the noise floor of a single-seed "
            "difference: two trainings of one model land about this far apart, so a gap between two single-seed "
            "runs smaller than it says nothing about the models.")


def _paired_display(paired: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    if not len(paired):
        return pd.DataFrame()
    return pd.DataFrame({
        f"best (by {select_metric})": paired["reference"], "other": paired["other"],
        "metric": [LABELS.get(m, m) for m in paired["metric"]],
        "difference [95% CI]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                                zip(paired["difference"], paired["ci_low"], paired["ci_high"])],
        "p": [f"{p:.3f}" for p in paired["p_value"]], "p (Holm)": [f"{p:.3f}" for p in paired["p_holm"]],
        "seeds best/other": [f"{a}/{b}" for a, b in zip(paired["seeds_reference"], paired["seeds_other"])],
        "beyond noise (Holm p < 0.05)": [beyond_noise(d, p) for d, p in zip(paired["difference"], paired["p_holm"])]})


def beyond_noise(difference: float, p_holm: float, alpha: float = 0.05) -> str:
    """Which side a paired difference (best - other) favours when it is beyond noise: a significant deficit of the
    best model is news too, so it must not read like "no difference"."""
    if p_holm >= alpha:
        return "no"
    return "best ahead" if difference > 0 else "other ahead"


def compare_runs(cfg: dict, reports: Path, names=None, n_boot: int | None = None) -> dict:
    """The comparison: one row per model (mean over seeds) and a majority-class baseline, the best model chosen on
    the profile's ``select_metric`` (validation, mean over seeds), lesion-level paired differences of the best
    against every other model with Holm-adjusted p-values, the measured seed spread, and the overlay figures.

    Writes under ``reports/compare/``: comparison.csv (numbers per model), comparison_ci.csv (as displayed),
    runs.csv (one row per run), paired.csv, seed_spread.csv and the figures roc_overlay.png, history_overlay.png,
    time_to_accuracy.png.
    """
    n_boot = n_boot or cfg["bootstrap"]
    select_metric = cfg.get("select_metric", "val_auc")
    if select_metric not in M.SELECT_METRICS:
        raise ValueError(f"select_metric {select_metric!r}; allowed: {tuple(M.SELECT_METRICS)}")
    reports = Path(reports)
    runs = find_runs(reports, cfg["name"], names)
    if not runs:
        raise FileNotFoundError(f"no runs of profile {cfg['name']!r} under {reports}: run notebooks 02-04 first")
    first = next(iter(runs.values()))
    classes = first["meta"]["classes"]
    if any(r["meta"]["classes"] != classes for r in runs.values()):
        raise ValueError("the runs were trained on different class sets; compare runs of one task")
    models = group_by_model(runs)
    runs_table = pd.DataFrame({n: _run_row(runs[n], classes, select_metric) for ns in models.values() for n in ns}).T
    for c in runs_table.columns:
        if c not in ("model", "device"):
            runs_table[c] = pd.to_numeric(runs_table[c])
    table = _model_rows(runs_table, select_metric)
    best = select_best(table[select_metric].to_dict(), select_metric)  # validation only, never test

    # Majority-class baseline through the same metric code: the class most frequent in the training split.
    split = pd.read_csv(reports / "split.csv", dtype={"image_id": str, "lesion_id": str})
    majority = int(split[split.split == "train"].label.mode().iloc[0])
    baseline = f"majority class ({classes[majority]})"
    base_test = M.majority_predictions(first["test"], classes, majority)
    base_val = M.majority_predictions(first["val"], classes, majority)
    bt = M.summary_with_ci(base_test, classes, n_boot=n_boot, seed=0,
                           val_pred=base_val if M.has_malignancy_view(classes) else None).set_index("metric")
    base_row = {"seeds": "–", "n_seeds": 0, "train min": 0.0, "epochs": 0, "img/s": np.nan, "trainable params": 0,
                "device": "", select_metric: M.validation_score(base_val, classes, select_metric)}
    for c in HEADLINE:
        base_row.update({c: bt.value.get(c), f"{c}_ci_low": bt.ci_low.get(c), f"{c}_ci_high": bt.ci_high.get(c)})
    table = pd.concat([table, pd.DataFrame({baseline: base_row}).T])
    for c in table.columns:
        if c not in ("seeds", "device"):
            table[c] = pd.to_numeric(table[c])
    display_table = _display(table, select_metric)

    paired = M.compare_models({m: [runs[n]["test"] for n in ns] for m, ns in models.items()}, classes, best,
                              metrics=SPREAD_METRICS, n_boot=n_boot, seed=0)
    spread = seed_spread(runs_table, select_metric)

    out = reports / "compare"
    line = provenance_line(first["meta"]["provenance"])
    shown = {m: runs[ns[0]] for m, ns in models.items()}  # overlays: each model's lowest seed, to stay readable
    label = {m: (m if len(models[m]) == 1 else f"{m} (seed {runs[ns[0]]['seed']})") for m, ns in models.items()}
    figures = {
        "roc_overlay": P.save(P.roc_overlay({**{label[m]: r["test"] for m, r in shown.items()}, baseline: base_test},
                                            classes, f"Test split ROC — {line}"), out / "roc_overlay.png"),
        "history_overlay": P.save(P.history_overlay({label[m]: r["history"] for m, r in shown.items()},
                                                    f"Validation curves — {line}"), out / "history_overlay.png"),
        "time_to_accuracy": P.save(P.time_to_accuracy({n: runs[n]["history"] for ns in models.values() for n in ns},
                                                      f"Validation score against training time — {line}",
                                                      groups={n: m for m, ns in models.items() for n in ns}),
                                   out / "time_to_accuracy.png"),
    }
    table.to_csv(out / "comparison.csv", float_format="%.4f", index_label="model")
    display_table.to_csv(out / "comparison_ci.csv")  # the same numbers as shown, with intervals (index page)
    runs_table.to_csv(out / "runs.csv", float_format="%.4f", index_label="run")
    paired.to_csv(out / "paired.csv", float_format="%.4f", index=False)
    spread.to_csv(out / "seed_spread.csv", float_format="%.4f", index=False)
    return dict(table=table, display=display_table, runs_table=runs_table, paired=paired,
                paired_display=_paired_display(paired, select_metric), best=best, select_metric=select_metric,
                baseline=baseline, models=models, runs=runs, seed_spread=spread,
                seed_spread_text=seed_spread_text(spread, runs_table), figures=figures,
                provenance=first["meta"]["provenance"], provenance_line=line,
                devices=sorted({d for d in runs_table["device"] if d}))


def table_note(comp: dict) -> str:
    """How to read the comparison table (markdown): intervals, seed ranges, the selection rule, train minutes."""
    return (f"Single-seed models and the baseline: value [95% bootstrap interval over test lesions]; models with "
            f"several seeds: mean over seeds (min–max across seeds). The best model is chosen on the validation "
            f"split by `{comp['select_metric']}` (mean over seeds; column \"{comp['select_metric']} (selects)\"): "
            f"**{comp['best']}**. \"train min\": training minutes per run (mean over seeds) on "
            f"{' / '.join(comp['devices']) or 'the recorded device'}. ECE is biased upward when a resample repeats "
            f"images, so its interval can sit above the point estimate.")


def write_summary(cfg: dict, comp: dict, reports: Path) -> dict:
    """reports/summary.md: the comparison table, the paired comparisons, the seed spread and the provenance."""
    p = comp["provenance"]
    table_md = (f"Test split of **{p['data']}**, {p['image_size']} input, lesion-grouped 70/15/15 split "
                f"(seed {p['split_seed']}), **{p['weights']}**, profile **{p['profile']}**, commit "
                f"`{p['git_commit']}`, {p['device']}, {p['date']}.\n\n"
                + comp["display"].to_markdown() + "\n\n" + table_note(comp) + "\n")
    paired_md = comp["paired_display"].to_markdown(index=False) if len(comp["paired"]) else "(only one model)"
    packages = ", ".join(f"{k} {v}" for k, v in p["packages"].items())
    n_used = int(comp["paired"]["n_boot"].iloc[0]) if len(comp["paired"]) else 0
    text = f"""# Summary of the {p['profile']} run

{table_md}
## Is the best model's lead more than noise?

Paired bootstrap over test lesions ({n_used} resamples): both models scored on the same lesion draws, each model's
seeds resampled too; difference = best − other; two-sided bootstrap p-values, Holm-adjusted across all
{len(comp['paired'])} comparisons.

{paired_md}

{comp['seed_spread_text']}

## Provenance

- Data: {p['data']} from `{p['data_dir']}` ({p['images']} images), task `{p['task']}`
- Image size: {p['image_size']}; split seed {p['split_seed']}, fractions {p['split_fractions']}, grouped by lesion
- Weights: {p['weights']}; profile `{p['profile']}` ({cfg.get('description', '')})
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
    """(best model, its selection metric) from compare/: the validation column marked "(selects)"."""
    ci, num = reports / "compare" / "comparison_ci.csv", reports / "compare" / "comparison.csv"
    if not (ci.exists() and num.exists()):
        return None
    shown, table = pd.read_csv(ci, index_col=0), pd.read_csv(num, index_col=0)
    sel = next((c[: -len(" (selects)")] for c in shown.columns if c.endswith(" (selects)")), None)
    if sel is None and "val AUC" in table.columns:  # tables written before the profile named its select_metric
        sel = "val AUC"
    if sel not in table.columns:
        return None
    table = table[~table.index.astype(str).str.startswith("majority class")]
    if "n_seeds" in table.columns:
        table = table[pd.to_numeric(table["n_seeds"], errors="coerce").fillna(1) > 0]
    values = pd.to_numeric(table[sel], errors="coerce").dropna()
    if not len(values):
        return None
    higher = M.SELECT_METRICS.get(sel, "loss" not in sel) if hasattr(M, "SELECT_METRICS") else "loss" not in sel
    return str(values.idxmax() if higher else values.idxmin()), sel


def _run_meta(reports: Path, model: str) -> dict:
    """run.json of the model's first run (lowest seed) under ``reports``, or {}."""
    for f in sorted(reports.glob("*/run.json")):
        try:
            meta = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if model in (meta.get("model_name"), meta.get("run_name"), f.parent.name):
            return dict(meta, folder=f.parent.name)
    return {}


def headline(reports: Path) -> str | None:
    """One sentence: the best model (chosen on validation), its macro AUC and balanced accuracy with their
    interval or seed range, on which data and profile. None when the comparison has not been written."""
    reports = Path(reports)
    found = _best_model(reports)
    if not found:
        return None
    best, sel = found
    shown = pd.read_csv(reports / "compare" / "comparison_ci.csv", index_col=0)
    row = shown.loc[best] if best in shown.index else pd.Series(dtype=object)

    def quote(label, words):
        v = str(row.get(label, "") or "")
        if not v or v in ("–", "nan"):
            return None
        if "[" in v:  # "0.919 [0.901, 0.934]"
            value, ci = v.split("[", 1)
            return f"{words} {value.strip()} (95% CI {ci.strip().rstrip(']').replace(', ', '–')})"
        if "(" in v:  # several seeds: "0.919 (0.910–0.925)"
            value, rng = v.split("(", 1)
            return f"{words} {value.strip()} (mean over seeds, range {rng.strip().rstrip(')')})"
        return f"{words} {v}"

    metrics = [q for q in (quote("Macro AUC", "macro AUC"), quote("Balanced acc.", "balanced accuracy")) if q]
    p = _run_meta(reports, best).get("provenance", {})
    on = "the lesion-grouped test split"
    if p.get("data"):
        on += f" of {p['data']}"
    details = ", ".join(str(x) for x in (f"{p['image_size']} input" if p.get("image_size") else None,
                                         p.get("weights")) if x)
    profile = p.get("profile") or _run_meta(reports, best).get("profile")
    return (f"Best model, chosen on validation {sel}: {best}, with {' and '.join(metrics) or 'the scores below'} on "
            f"{on}{f' ({details})' if details else ''}{f', profile {profile}' if profile else ''}.")


def write_index(reports: Path) -> Path:
    """reports/index.html: the headline result in one sentence, the comparison table, links to the rendered
    notebooks and the headline figures (each with alt text from its title)."""
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
    table = ""
    if (reports / "compare" / "comparison_ci.csv").exists():
        table = pd.read_csv(reports / "compare" / "comparison_ci.csv", index_col=0).to_html()
    summary = (reports / "summary.md").read_text() if (reports / "summary.md").exists() else ""
    lead = headline(reports)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>HAM10000 ResNets — reports</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px}}</style></head><body>
<h1>HAM10000 ResNets — reports</h1>
{f'<p class="headline"><b>{html.escape(lead)}</b></p>' if lead else ''}
<p><b>Research use only; not a diagnostic device.</b></p>
<h2>Comparison</h2>{table}
<pre style="white-space:pre-wrap">{html.escape(summary.split('## Provenance')[-1]) if summary else ''}</pre>
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
