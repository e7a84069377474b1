"""Reports from saved runs: what the notebooks display, the comparison, summary.md, model cards, the index page.

Everything here reads files that the model notebooks wrote under ``reports/`` (predictions, metrics, history,
run.json), so the comparison can be re-made without retraining and every number traces back to a saved run.
This module imports nothing from ``experiment`` (which imports it); the provenance line lives here.

Why one module of this size: it holds one job, turning saved runs into the written results (the comparison table
and its baselines, the review strata, summary.md and README's block, the model cards, the index page), and those
parts share one set of row names, labels and provenance; split, each part would import the others' constants.
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
from .config import SELECT_METRICS, project_root

HEADLINE = ["accuracy", "balanced_accuracy", "auc", "malignancy_auc", "sensitivity", "specificity", "ece"]
RULE_METRICS = ["accuracy", "balanced_accuracy"]  # the headline metrics that depend on the decision rule
LABELS = {"accuracy": "Accuracy (argmax)", "balanced_accuracy": "Balanced acc. (argmax)", "auc": "Macro AUC",
          "accuracy_rule": "Accuracy (recipe rule)", "balanced_accuracy_rule": "Balanced acc. (recipe rule)",
          "malignancy_auc": "Malignancy AUC", "sensitivity": "Sensitivity", "specificity": "Specificity",
          "ece": "ECE", "log_loss": "Log loss", "malignancy_threshold": "Malignancy threshold (chosen on val)"}
BASELINE = "majority class (nv)"  # the baseline's row name for the 7 diagnoses (see ``compare_runs``)
METADATA_BASELINE = M.METADATA_BASELINE  # "metadata only (age, sex, site)"
UNIT = "image"  # the unit of every headline number; compare/unit_of_analysis.csv repeats them per lesion

# What HAM10000 cannot tell us; summary.md and every model card state it.
DATA_LIMITS = [
    "HAM10000 has **no patient identifier**: the split keeps each lesion in one split, but one patient's different "
    "lesions can sit in two splits, so the test set is not patient-independent and intervals cannot resample "
    "patients.",
    "HAM10000 records **no skin tone** (e.g. Fitzpatrick type), and its images are mostly of light skin: "
    "performance by skin tone cannot be assessed here and is likely worse on darker skin.",
    "HAM10000 gives **no centre or device per image** (the images come from Vienna and Queensland, with several "
    "dermatoscopes): performance by acquisition site or camera cannot be assessed here.",
    "The reference standard is mixed: histopathology for about half of the images, follow-up, expert consensus or "
    "confocal microscopy for the rest; follow-up nevi are easy cases (see the results by reference standard).",
]
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
        if name in res["figures"]:  # a fused twin draws only some of them
            display(Image(res["figures"][name]))


# ---------------------------------------------------------------------------------------------- model cards
def rule_name(meta: dict) -> str:
    """The decision rule of a run's saved ``pred``: "argmax", or "logit adjustment (tau ...)" (run.json's
    ``decision_bias`` and ``info.logit_adjust_tau``)."""
    if not meta.get("decision_bias"):
        return M.ARGMAX
    tau = (meta.get("info") or {}).get("logit_adjust_tau")
    return "logit adjustment" + (f" (tau {tau:g})" if tau is not None else "")


def limits_md() -> str:
    return "\n".join(f"- {line}" for line in DATA_LIMITS)


def metadata_md(meta: dict) -> str:
    """What a model that uses age, sex and site says about them: how it uses them and what that costs elsewhere."""
    clinical = meta.get("clinical") or {}
    if not meta.get("uses_metadata"):
        return ""
    if meta.get("fusion") == "late":
        how = (f"late fusion: the network's log-probabilities plus {clinical.get('weight', '?')} x (a logistic "
               f"regression on age, sex and site, minus the training prior); the regression was fitted on the "
               f"training split and its strength and the weight chosen on validation (`{meta.get('image_run')}` is "
               f"the same network without them)")
    else:
        how = ("a small metadata branch trained with the network (joint); its features join the pooled image "
               "features before the head")
    return f"""
## Patient metadata
This model uses the patient's **age, sex and the lesion's anatomical site** beside the image: {how}. Missing values
are explicit categories, and a site or sex never seen in training is its own category. Such a model is only as
good as those fields are where it is used: a clinic that records site differently, leaves age blank or serves
another age mix moves its predictions in ways the image alone would not. `helpers.predict` and
`helpers.external` need the columns (`--image-only` scores the image part alone), and external validation reports
both scores side by side.
"""


def model_card(meta: dict, metrics: pd.DataFrame) -> str:
    p, info = meta["provenance"], meta["info"]
    t = metrics.set_index("metric")
    rule = rule_name(meta)
    names = {**LABELS, "accuracy": f"Accuracy ({rule})", "balanced_accuracy": f"Balanced acc. ({rule})"}
    rows = "\n".join(f"| {names.get(m, m)} | {fmt_ci(*t.loc[m, ['value', 'ci_low', 'ci_high']])} |" for m in t.index)
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

## Test-split metrics (per image; 95% bootstrap CI over lesions)
Decision rule of the predicted class: **{rule}**. The study's comparison (`summary.md`) scores every model with the
plain argmax as well, by reference standard, by subgroup and per lesion.

| Metric | Value [95% CI] |
|---|---|
{rows}

Sensitivity and specificity are for malignancy (mel, bcc, akiec) at the threshold chosen on the validation split
for at least 95% sensitivity ({'n/a' if meta.get('malignancy_threshold') is None else f"{meta['malignancy_threshold']:.4f}"}).
Where the table lists the threshold, their intervals re-choose it on resampled validation lesions in every
resample, so they include the threshold's own uncertainty.
{metadata_md(meta)}
## Known limits
- Dermatoscopic images only, from two sites (Vienna, Queensland); mostly light skin types. Performance on other
  populations, cameras or clinical photographs is unknown and likely worse.
- HAM10000's labels are partly histopathology, partly follow-up or expert consensus; class balance (67% nevi)
  differs from clinical practice.
- One split, one training seed per card: the intervals cover test-set sampling, not training variance (the
  comparison report measures that across seeds where the profile trains several).
{limits_md()}
"""


def refresh_model_cards(runs: dict[str, dict]) -> list[Path]:
    """Rewrite each run's model_card.md from its run.json and metrics.csv (no retraining), so a card states what
    the current report code says (its decision rule, the data's limits). Runs whose run.json lacks a field the
    card needs are left as they are."""
    written = []
    for run in runs.values():
        folder = run.get("folder")
        try:
            text = model_card(run["meta"], run["metrics"])
        except (KeyError, TypeError):
            continue
        if folder is not None:
            (Path(folder) / "model_card.md").write_text(text)
            written.append(Path(folder) / "model_card.md")
    return written


# ------------------------------------------------------------------------------------------------ comparison
def load_run(folder: Path) -> dict:
    """A run folder's run.json, metrics, history and predictions. A run without history.csv (a late-fusion twin,
    which trains nothing) gets an empty history; without metrics.csv, point estimates from its predictions."""
    folder = Path(folder)
    meta = json.loads((folder / "run.json").read_text())
    meta.setdefault("run_name", folder.name)
    ids = {"image_id": str, "lesion_id": str}
    test = pd.read_csv(folder / "predictions_test.csv", dtype=ids)
    if (folder / "metrics.csv").exists():
        metrics = pd.read_csv(folder / "metrics.csv")
    else:
        point = M.summary(test, meta["classes"], meta.get("malignancy_threshold"))
        metrics = pd.DataFrame([(k, v, np.nan, np.nan) for k, v in point.items()],
                               columns=["metric", "value", "ci_low", "ci_high"])
    history = pd.read_csv(folder / "history.csv") if (folder / "history.csv").exists() else pd.DataFrame()
    return dict(meta=meta, model=model_name(meta), seed=run_seed(meta), metrics=metrics, history=history, test=test,
                val=pd.read_csv(folder / "predictions_val.csv", dtype=ids), folder=folder)


def model_name(meta: dict) -> str:
    """The model a run trains ("resnet34_tuned", "resnet34_tuned + metadata"): run.json's ``model_name``, else
    arch_recipe (older runs)."""
    if meta.get("model_name"):
        return meta["model_name"]
    return f"{meta['arch']}_{meta['recipe']}" if "arch" in meta and "recipe" in meta else meta["run_name"]


def run_seed(meta: dict) -> int:
    """The run's training seed: run.json's ``seed``, else its recipe's (older runs), else 0."""
    return int(meta.get("seed", (meta.get("recipe_settings") or {}).get("seed", 0)))


def find_runs(reports: Path, profile: str | None = None, names=None, load: bool = True) -> dict[str, dict]:
    """Every finished run under ``reports`` (a folder ``<run>/`` holding run.json), by run name: the one run
    discovery of the project (05_compare and ``external.score_runs`` both use it).

    ``profile`` keeps that profile's runs (None: every profile); ``names`` keeps the runs whose run name or model
    name is listed (so ``["resnet34_tuned"]`` means all of that model's seeds), and a listed name that matches
    nothing is an error. ``load=False`` returns only ``meta`` and ``folder`` per run, without reading predictions.
    """
    runs = {}
    for f in sorted(Path(reports).glob("*/run.json")):
        try:
            meta = json.loads(f.read_text())
        except ValueError:
            continue
        run = meta.setdefault("run_name", f.parent.name)
        if (profile is None or meta.get("profile") == profile) and \
                (names is None or {run, model_name(meta)} & set(names)):
            runs[run] = load_run(f.parent) if load else dict(meta=meta, folder=f.parent,
                                                             model=model_name(meta), seed=run_seed(meta))
    found = {n for r in runs.values() for n in (r["meta"]["run_name"], r["model"])}
    missing = sorted(set(names or []) - found)
    if missing:
        raise FileNotFoundError(f"no finished run(s) {missing}{f' of profile {profile!r}' if profile else ''} "
                                f"under {reports}")
    return runs


def group_by_model(runs: dict[str, dict]) -> dict[str, list[str]]:
    """Model name -> its run names, ordered by seed."""
    models: dict[str, list[str]] = {}
    for name, run in sorted(runs.items(), key=lambda kv: (kv[1]["model"], kv[1]["seed"])):
        models.setdefault(run["model"], []).append(name)
    return models


def higher_is_better(select_metric: str) -> bool:
    if select_metric not in SELECT_METRICS:
        raise ValueError(f"select_metric {select_metric!r}; allowed: {tuple(SELECT_METRICS)}")
    return bool(SELECT_METRICS[select_metric])


def select_best(values: dict[str, float], select_metric: str) -> str:
    """The model with the best validation score (``values``: model -> mean over its seeds), never a test number."""
    valid = {k: v for k, v in values.items() if pd.notna(v)}
    if not valid:
        raise ValueError(f"{select_metric} is undefined for every model; cannot choose the best on validation")
    pick = max if higher_is_better(select_metric) else min
    return pick(valid, key=valid.get)


def readme_update_wanted(update_readme: bool | None) -> bool:
    """05_compare's ``update_readme`` parameter: True or False as given; None (the default) means "only when the
    environment variable HAM_UPDATE_README is 1", which run_all.sh sets for the committed profile only."""
    if update_readme is None:
        return os.environ.get("HAM_UPDATE_README") == "1"
    return bool(update_readme)


def _run_row(run: dict, argmax: pd.Series, classes, select_metric: str) -> dict:
    """One run's row: accuracy and balanced accuracy of the plain argmax (``argmax``: a row of ``M.breakdown``),
    the recipe rule's from metrics.csv beside them, the rule-free metrics from metrics.csv."""
    t, info = run["metrics"].set_index("metric"), run["meta"]["info"]
    row = {"model": run["model"], "seed": run["seed"], "rule": rule_name(run["meta"])}
    for c in HEADLINE:
        if c in RULE_METRICS:
            row.update({c: argmax[c], f"{c}_ci_low": argmax[f"{c}_ci_low"], f"{c}_ci_high": argmax[f"{c}_ci_high"],
                        f"{c}_rule": t.value.get(c), f"{c}_rule_ci_low": t.ci_low.get(c),
                        f"{c}_rule_ci_high": t.ci_high.get(c)})
        else:
            row.update({c: t.value.get(c), f"{c}_ci_low": t.ci_low.get(c), f"{c}_ci_high": t.ci_high.get(c)})
    row.update({select_metric: M.validation_score(run["val"], classes, select_metric),
                "train min": info.get("train_seconds", np.nan) / 60, "epochs": info.get("epochs_run"),
                "img/s": info.get("img_per_s"), "trainable params": info.get("trainable_params"),
                "device": (run["meta"].get("provenance") or {}).get("device") or info.get("device")})
    return row


TABLE_METRICS = HEADLINE + [f"{c}_rule" for c in RULE_METRICS]


def _model_rows(runs_table: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    """One row per model: the mean over its seeds, the sd (ddof 1) and min/max across seeds for each metric; the
    single run's 95% lesion-bootstrap interval where the model has one seed."""
    rows = {}
    for model, g in runs_table.groupby("model", sort=False):
        row = {"seeds": ",".join(str(s) for s in g["seed"]), "n_seeds": len(g), "rule": ", ".join(dict.fromkeys(g["rule"]))}
        for c in TABLE_METRICS + [select_metric]:
            v = pd.to_numeric(g[c])
            row.update({c: v.mean(), f"{c}_sd": v.std(ddof=1) if len(g) > 1 else np.nan,
                        f"{c}_min": v.min(), f"{c}_max": v.max()})
        for c in TABLE_METRICS:
            one = len(g) == 1
            row[f"{c}_ci_low"] = g[f"{c}_ci_low"].iloc[0] if one else np.nan
            row[f"{c}_ci_high"] = g[f"{c}_ci_high"].iloc[0] if one else np.nan
        row.update({"train min": g["train min"].mean(), "epochs": g["epochs"].mean(), "img/s": g["img/s"].mean(),
                    "trainable params": g["trainable params"].iloc[0], "device": ", ".join(dict.fromkeys(g["device"]))})
        rows[model] = row
    return pd.DataFrame(rows).T


def _display(table: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    """The table as shown: single-seed models and the baselines "value [95% CI]"; several seeds "mean (min–max)".
    Argmax columns first, then the recipe's own rule, labelled."""
    def cell(row, c):
        if pd.isna(row.get(c)):
            return "–"
        if row["n_seeds"] > 1:
            return f"{row[c]:.3f} ({row[f'{c}_min']:.3f}–{row[f'{c}_max']:.3f})"
        low, high = row.get(f"{c}_ci_low"), row.get(f"{c}_ci_high")
        return fmt_ci(row[c], low, high) if pd.notna(low) else f"{row[c]:.3f}"

    shown = [c for c in HEADLINE if table[c].notna().any()]
    out = pd.DataFrame({LABELS[c]: [cell(r, c) for _, r in table.iterrows()] for c in shown}, index=table.index)
    out["Recipe rule"] = table["rule"]
    for c in RULE_METRICS:
        out[LABELS[f"{c}_rule"]] = [cell(r, f"{c}_rule") for _, r in table.iterrows()]
    out[f"{select_metric} (selects)"] = [cell(r, select_metric) for _, r in table.iterrows()]
    out["seeds"] = table["seeds"]
    out["train min"] = [f"{v:.1f}" if pd.notna(v) and v else "–" for v in table["train min"]]
    out["epochs"] = [f"{v:g}" if pd.notna(v) and v else "–" for v in table["epochs"]]
    out["trainable params"] = [f"{int(v):,}" if pd.notna(v) else "–" for v in table["trainable params"]]
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


def _paired_display(paired: pd.DataFrame, select_metric: str, rule: str = M.ARGMAX) -> pd.DataFrame:
    if not len(paired):
        return pd.DataFrame()
    names = LABELS if rule == M.ARGMAX else {**LABELS, **{m: LABELS[f"{m}_rule"] for m in RULE_METRICS}}
    return pd.DataFrame({
        f"best (by {select_metric})": paired["reference"], "other": paired["other"],
        "metric": [names.get(m, m) for m in paired["metric"]],
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


def metadata_pairs(runs: dict[str, dict]) -> dict[str, str]:
    """Fused model -> the image-only model it extends, from each fused run's run.json key ``image_run`` (the
    image-only run's name); only pairs whose both sides are among ``runs``."""
    pairs = {}
    for run in runs.values():
        image_run = run["meta"].get("image_run")
        if image_run in runs and runs[image_run]["model"] != run["model"]:
            pairs[run["model"]] = runs[image_run]["model"]
    return pairs


def _rule_tables(runs, names, rule: str, classes):
    """A run's test predictions under ``rule``: "argmax" (recomputed from the probabilities) or "recipe" (saved)."""
    return [M.argmax_predictions(runs[n]["test"], classes) if rule == M.ARGMAX else runs[n]["test"] for n in names]


def has_metadata(split: pd.DataFrame) -> bool:
    return {"age", "sex", "localization"} <= set(split.columns)


def compare_runs(cfg: dict, reports: Path, names=None, n_boot: int | None = None) -> dict:
    """The comparison: one row per model (mean over seeds) beside two baselines (the majority class, and a
    logistic regression on age, sex and site when split.csv has them), the best model chosen on the profile's
    ``select_metric`` (validation, mean over seeds), and paired lesion-bootstrap differences of the best against
    every other model with Holm-adjusted p-values: under the plain argmax (``paired``) and, as a separate block,
    under each recipe's own rule (``paired_rule``); plus each network with against without metadata where a
    fused run names its image-only run (``paired_metadata``).

    Accuracy and balanced accuracy are the plain argmax's, with the recipe rule's beside them (``*_rule``); every
    number is per image with 95% intervals over test lesions. Writes under ``reports/compare/``: comparison.csv
    (numbers per model, with ``select_metric`` and ``is_best``), comparison_ci.csv (as displayed), runs.csv,
    paired.csv, paired_rule.csv, paired_metadata.csv, seed_spread.csv, metadata_baseline.csv (its C sweep) and the
    figures roc_overlay.png, history_overlay.png, time_to_accuracy.png.
    """
    n_boot = n_boot or cfg["bootstrap"]
    select_metric = cfg.get("select_metric", "val_auc")
    higher_is_better(select_metric)
    reports = Path(reports)
    runs = find_runs(reports, cfg["name"], names)
    if not runs:
        raise FileNotFoundError(f"no runs of profile {cfg['name']!r} under {reports}: run notebooks 02-04 first")
    first = next(iter(runs.values()))
    classes = first["meta"]["classes"]
    if any(r["meta"]["classes"] != classes for r in runs.values()):
        raise ValueError("the runs were trained on different class sets; compare runs of one task")
    models = group_by_model(runs)
    ordered = [n for ns in models.values() for n in ns]
    argmax = M.breakdown({n: M.argmax_predictions(runs[n]["test"], classes) for n in ordered}, classes,
                         metrics=RULE_METRICS, n_boot=n_boot, seed=0).set_index("model")
    runs_table = pd.DataFrame({n: _run_row(runs[n], argmax.loc[n], classes, select_metric) for n in ordered}).T
    for c in runs_table.columns:
        if c not in ("model", "device", "rule"):
            runs_table[c] = pd.to_numeric(runs_table[c])
    table = _model_rows(runs_table, select_metric)
    best = select_best(table[select_metric].to_dict(), select_metric)  # validation only, never test

    # Baselines through the same metric code: the class most frequent in the training split, and age/sex/site.
    split = pd.read_csv(reports / "split.csv", dtype={"image_id": str, "lesion_id": str})
    majority = int(split[split.split == "train"].label.mode().iloc[0])
    baseline = f"majority class ({classes[majority]})"
    baselines = {baseline: dict(test=M.majority_predictions(first["test"], classes, majority),
                                val=M.majority_predictions(first["val"], classes, majority))}
    meta_fit = None
    if has_metadata(split):
        meta_fit = M.metadata_baseline(split, classes)
        baselines[METADATA_BASELINE] = dict(test=meta_fit["test"], val=meta_fit["val"])
    for b in baselines.values():
        b["threshold"] = (M.threshold_for_sensitivity(*M.malignancy_score(b["val"], classes), target=0.95)
                          if M.has_malignancy_view(classes) else None)
    metrics = [c for c in HEADLINE if c in M.FAST_METRICS and (M.has_malignancy_view(classes) or c in
                                                                ("accuracy", "balanced_accuracy", "auc", "ece"))]
    bt = M.breakdown({k: b["test"] for k, b in baselines.items()}, classes,
                     thresholds={k: b["threshold"] for k, b in baselines.items()}, metrics=metrics, n_boot=n_boot,
                     seed=0).set_index("model")
    base_rows = {}
    for k, b in baselines.items():
        row = {"seeds": "–", "n_seeds": 0, "rule": "–", "train min": 0.0, "epochs": 0, "img/s": np.nan,
               "trainable params": (0 if k == baseline else int(np.size(meta_fit["model"].coef)
                                                                 + np.size(meta_fit["model"].intercept))),
               "device": "", select_metric: M.validation_score(b["val"], classes, select_metric)}
        for c in metrics:
            row.update({c: bt.loc[k, c], f"{c}_ci_low": bt.loc[k, f"{c}_ci_low"],
                        f"{c}_ci_high": bt.loc[k, f"{c}_ci_high"]})
        base_rows[k] = row
    table = pd.concat([table, pd.DataFrame(base_rows).T])
    for c in table.columns:
        if c not in ("seeds", "device", "rule"):
            table[c] = pd.to_numeric(table[c])
    table["select_metric"] = select_metric
    table["is_best"] = table.index == best
    display_table = _display(table, select_metric)

    def paired_for(rule):
        return M.compare_models({m: _rule_tables(runs, ns, rule, classes) for m, ns in models.items()}, classes,
                                best, metrics=SPREAD_METRICS, n_boot=n_boot, seed=0)

    paired, paired_rule = paired_for(M.ARGMAX), paired_for("recipe")
    pairs = metadata_pairs(runs)
    paired_meta = pd.concat([M.compare_models({f: _rule_tables(runs, models[f], M.ARGMAX, classes),
                                               i: _rule_tables(runs, models[i], M.ARGMAX, classes)}, classes, f,
                                              metrics=SPREAD_METRICS, n_boot=n_boot, seed=0)
                             for f, i in pairs.items()], ignore_index=True) if pairs else pd.DataFrame(
        columns=paired.columns)
    if len(paired_meta):
        paired_meta["p_holm"] = M.holm(paired_meta["p_value"])
    spread = seed_spread(runs_table, select_metric)

    out = reports / "compare"
    line = provenance_line(first["meta"]["provenance"])
    shown = {m: runs[ns[0]] for m, ns in models.items()}  # overlays: each model's lowest seed, to stay readable
    label = {m: (m if len(models[m]) == 1 else f"{m} (seed {runs[ns[0]]['seed']})") for m, ns in models.items()}
    trained = {n: runs[n]["history"] for n in ordered if len(runs[n]["history"])}
    figures = {
        "roc_overlay": P.save(P.roc_overlay({**{label[m]: r["test"] for m, r in shown.items()},
                                             **{k: b["test"] for k, b in baselines.items()}},
                                            classes, f"Test split ROC — {line}"), out / "roc_overlay.png"),
        "history_overlay": P.save(P.history_overlay({label[m]: r["history"] for m, r in shown.items()
                                                     if len(r["history"])},
                                                    f"Validation curves — {line}"), out / "history_overlay.png"),
        "time_to_accuracy": P.save(P.time_to_accuracy(trained, f"Validation score against training time — {line}",
                                                      groups={n: runs[n]["model"] for n in trained}),
                                   out / "time_to_accuracy.png"),
    }
    table.to_csv(out / "comparison.csv", float_format="%.4f", index_label="model")
    display_table.to_csv(out / "comparison_ci.csv")  # the same numbers as shown, with intervals
    runs_table.to_csv(out / "runs.csv", float_format="%.4f", index_label="run")
    paired.to_csv(out / "paired.csv", float_format="%.4f", index=False)
    paired_rule.to_csv(out / "paired_rule.csv", float_format="%.4f", index=False)
    paired_meta.to_csv(out / "paired_metadata.csv", float_format="%.4f", index=False)
    spread.to_csv(out / "seed_spread.csv", float_format="%.4f", index=False)
    if meta_fit is not None:
        meta_fit["sweep"].to_csv(out / "metadata_baseline.csv", float_format="%.4f", index=False)
    return dict(table=table, display=display_table, runs_table=runs_table, paired=paired,
                paired_display=_paired_display(paired, select_metric), paired_rule=paired_rule,
                paired_rule_display=_paired_display(paired_rule, select_metric, "recipe"), paired_metadata=paired_meta,
                metadata_pairs=pairs, best=best, select_metric=select_metric, baseline=baseline,
                baselines=baselines, metadata_fit=meta_fit, models=models, runs=runs, classes=classes, split=split,
                seed_spread=spread, seed_spread_text=seed_spread_text(spread, runs_table), figures=figures,
                provenance=first["meta"]["provenance"], provenance_line=line, n_boot=n_boot,
                devices=sorted({d for d in runs_table["device"] if d}))


def table_note(comp: dict) -> str:
    """How to read the comparison table (markdown): unit, rule, intervals, seed ranges, selection, train minutes."""
    rules = sorted({r for r in comp["table"]["rule"] if r not in ("–", M.ARGMAX)})
    return (f"Every number is **per image** of the test split (compare/unit_of_analysis.csv repeats them per "
            f"lesion). Accuracy and balanced accuracy are those of the **plain argmax** for every model (ISIC 2018 "
            f"Task 3's rule); \"Recipe rule\" names each recipe's own rule and the two columns after it score that "
            f"rule ({', '.join(rules) or 'no recipe here adjusts its logits'}; tau chosen on validation). AUCs, "
            f"ECE and sensitivity/specificity (malignancy, at the threshold chosen on validation for 95% "
            f"sensitivity) do not depend on the rule. Single-seed models and the baselines: value [95% bootstrap "
            f"interval over test lesions]; models with several seeds: mean over seeds (min–max across seeds). "
            f"The baselines' sensitivity/specificity intervals hold their validation threshold fixed; the models' "
            f"re-choose it in every resample. \"{METADATA_BASELINE}\": a logistic regression on age, sex and site "
            f"with explicit missing-value indicators, fitted on the training split, its regularisation chosen on "
            f"validation. The best model is chosen on the validation split by `{comp['select_metric']}` (mean "
            f"over seeds; column \"{comp['select_metric']} (selects)\"): **{comp['best']}**. \"train min\": "
            f"training minutes per run (mean over seeds) on {' / '.join(comp['devices']) or 'the recorded device'}. "
            f"ECE is biased upward when a resample repeats images, so its interval can sit above the point "
            f"estimate.")


# ------------------------------------------------------------------------------- the review: strata, units, use
REFERENCE_STANDARDS = ("histo", "follow_up", "consensus", "confocal")  # HAM10000's dx_type; histo is co-primary
SUBGROUP_VARIABLES = ("sex", "age", "site")
UNIT_METRICS = HEADLINE  # every headline metric, per image and per lesion
MULTIPLICITY = ("These subgroup results are descriptive: {n} subgroups, each with several metrics, and no test of a "
                "difference between subgroups, so no p-values and no multiplicity correction; with this many "
                "intervals some will look apart by chance, and a subgroup that looks worse is a question for a "
                "larger, patient-level data set, not a finding.")


def ci_cells(table: pd.DataFrame, metrics, index) -> pd.DataFrame:
    """A numeric table with ``<m>``, ``<m>_ci_low``, ``<m>_ci_high`` as display cells "value [low, high]"."""
    out = table[list(index)].copy()
    for m in metrics:
        out[LABELS.get(m, m)] = [fmt_ci(v, lo, hi) if pd.notna(lo) else ("–" if pd.isna(v) else f"{v:.3f}")
                                 for v, lo, hi in zip(table[m], table[f"{m}_ci_low"], table[f"{m}_ci_high"])]
    return out


def _entries(comp: dict) -> dict[str, dict]:
    """Every run (under its run name) and every baseline: model name, test predictions (saved rule), threshold."""
    runs = comp["runs"]
    out = {n: dict(model=runs[n]["model"], test=runs[n]["test"], threshold=runs[n]["meta"].get("malignancy_threshold"))
           for ns in comp["models"].values() for n in ns}
    out.update({k: dict(model=k, test=b["test"], threshold=b["threshold"]) for k, b in comp["baselines"].items()})
    return out


def _with_model(table: pd.DataFrame, entries: dict) -> pd.DataFrame:
    table = table.rename(columns={"model": "run"})
    table.insert(0, "model", [entries[r]["model"] for r in table["run"]])
    return table


def review_runs(comp: dict, reports: Path, n_boot: int | None = None, min_site_images: int = 50,
                min_positives: int = 5) -> dict:
    """What a dermatology reviewer asks of the comparison (``compare_runs``' result), from saved predictions and
    split.csv's metadata; nothing retrains. Every metric has a 95% lesion-bootstrap interval and its counts.

    - by reference standard (``dx_type``; histopathology co-primary), every run and baseline: balanced accuracy
      (argmax), macro AUC over the classes with >= ``min_positives`` positive lesions in the stratum (named),
      malignancy AUC, sensitivity/specificity at the validation threshold -> compare/by_reference_standard.csv,
      and the malignancy ROC on all images against histo only -> compare/roc_by_reference_standard.png;
    - subgroups (sex, age band, site with sites under ``min_site_images`` test images pooled as "other"), for the
      best model's lowest seed and the baselines, on all images and within histo -> compare/subgroups.csv,
      compare/subgroups_forest.png;
    - the unit of analysis: every headline metric per image and per lesion (mean probability over its images),
      and within-lesion disagreement -> compare/unit_of_analysis.csv;
    - per-class recall (argmax) -> compare/per_class_recall.csv; the decision curve of the best model and the
      metadata baseline -> compare/decision_curve.csv, compare/decision_curve.png.
    """
    reports, classes = Path(reports), comp["classes"]
    n_boot = n_boot or comp["n_boot"]
    out, line = reports / "compare", comp["provenance_line"]
    split = comp["split"]
    test_meta = split[split["split"] == "test"].set_index("image_id")
    entries = _entries(comp)
    argmax = {n: M.argmax_predictions(e["test"], classes) for n, e in entries.items()}
    thresholds = {n: e["threshold"] for n, e in entries.items()}
    malignancy = M.has_malignancy_view(classes)
    metrics = list(M.BREAKDOWN_METRICS if malignancy else ("balanced_accuracy", "auc"))
    unit_metrics = [m for m in UNIT_METRICS if malignancy or m not in ("malignancy_auc", "sensitivity", "specificity")]
    best_run = comp["models"][comp["best"]][0]
    result, figures = {}, {}

    # ---- by reference standard
    if "dx_type" in test_meta.columns:
        dx_type = test_meta["dx_type"].astype(str)
        order = ["all"] + [s for s in REFERENCE_STANDARDS if s in set(dx_type)] + sorted(
            set(dx_type) - set(REFERENCE_STANDARDS))
        ref = pd.concat([M.breakdown(argmax, classes, None, thresholds, metrics, n_boot, 0, min_positives=min_positives),
                         M.breakdown(argmax, classes, dx_type, thresholds, metrics, n_boot, 0,
                                     min_positives=min_positives)], ignore_index=True)
        ref["stratum"] = pd.Categorical(ref["stratum"], order, ordered=True)
        ref = _with_model(ref.sort_values(["stratum"], kind="stable"), entries)
        ref["stratum"] = ref["stratum"].astype(str)
        ref.to_csv(out / "by_reference_standard.csv", float_format="%.4f", index=False)
        result["by_reference_standard"] = ref
        if malignancy:
            preds = {(m if len(ns) == 1 else f"{m} ({ns[0]})"): argmax[ns[0]] for m, ns in comp["models"].items()}
            preds.update({k: argmax[k] for k in comp["baselines"]})
            populations = {"all test images": list(test_meta.index),
                           "histopathology-confirmed": list(test_meta.index[dx_type == "histo"])}
            figures["roc_by_reference_standard"] = P.save(
                P.roc_by_population(preds, classes, populations, f"Malignancy ROC by reference standard — {line}"),
                out / "roc_by_reference_standard.png")

    # ---- subgroups: the best model (its lowest seed) and the baselines
    if has_metadata(split):
        chosen = {n: argmax[n] for n in [best_run, *comp["baselines"]]}
        histo = test_meta["dx_type"].astype(str) == "histo" if "dx_type" in test_meta.columns else None
        parts = []
        for variable in ("overall",) + SUBGROUP_VARIABLES:
            levels = (pd.Series("all test images", index=test_meta.index) if variable == "overall" else
                      M.subgroup_levels(test_meta, variable, min_site_images).set_axis(test_meta.index))
            for population, lv in (("all", levels), ("histo", levels.where(histo) if histo is not None else None)):
                if lv is None:
                    continue
                t = M.breakdown(chosen, classes, lv, thresholds, metrics, n_boot, 0, min_positives=min_positives)
                t.insert(0, "population", population)
                t.insert(0, "variable", variable)
                parts.append(t)
        sub = _with_model(pd.concat(parts, ignore_index=True), entries)
        sub = sub[["variable", "stratum", "population"] + [c for c in sub.columns
                                                            if c not in ("variable", "stratum", "population")]]
        sub.to_csv(out / "subgroups.csv", float_format="%.4f", index=False)
        result["subgroups"] = sub
        n_groups = int((sub[(sub.population == "all") & (sub.variable != "overall")]
                        .drop_duplicates(["variable", "stratum"])).shape[0])
        result["multiplicity"] = MULTIPLICITY.format(n=n_groups)
        forest = sub[sub["run"] != comp["baseline"]]  # the majority class is constant: nothing to plot
        shown_metrics = [m for m in ("balanced_accuracy", "malignancy_auc", "sensitivity", "specificity")
                         if m in metrics]
        figures["subgroups_forest"] = P.save(
            P.subgroup_forest(forest, f"Subgroups of the test split: {comp['best']} ({best_run}) and the metadata "
                                      f"baseline; open markers: histopathology-confirmed images only — {line}",
                              shown_metrics), out / "subgroups_forest.png")

    # ---- unit of analysis: per image and per lesion
    lesions = {n: M.lesion_level(p, classes) for n, p in argmax.items()}
    unit = pd.concat([M.breakdown(p, classes, None, thresholds, unit_metrics, n_boot, 0, min_positives=1).assign(
        unit=u) for u, p in (("image", argmax), ("lesion", lesions))], ignore_index=True)  # macro AUC: every class
    unit = _with_model(unit.drop(columns=["stratum", "auc_classes"]), entries)
    dis = {n: {**M.within_lesion_disagreement(argmax[n], classes, thresholds[n]),
               "top1_disagreement_rule": M.within_lesion_disagreement(entries[n]["test"], classes)["top1_disagreement"]}
           for n in entries}
    for k in ("multi_image_lesions", "top1_disagreement", "top1_disagreement_rule", "refer_disagreement"):
        unit[k] = [dis[r][k] for r in unit["run"]]
    unit = unit[["model", "run", "unit"] + [c for c in unit.columns if c not in ("model", "run", "unit")]]
    unit.to_csv(out / "unit_of_analysis.csv", float_format="%.4f", index=False)
    result["unit_of_analysis"] = unit

    # ---- per-class recall (argmax)
    rec = M.breakdown(argmax, classes, None, None, [f"recall_{k}" for k in range(len(classes))], n_boot, 0)
    base = next(iter(argmax.values()))
    rows = []
    for _, r in rec.iterrows():
        for k, c in enumerate(classes):
            of_k = base["label"].to_numpy() == k
            rows.append(dict(model=entries[r["model"]]["model"], run=r["model"], rule=M.ARGMAX, cls=c,
                             images=int(of_k.sum()), lesions=int(base.loc[of_k, "lesion_id"].nunique()),
                             recall=r[f"recall_{k}"], ci_low=r[f"recall_{k}_ci_low"], ci_high=r[f"recall_{k}_ci_high"]))
    recall = pd.DataFrame(rows).rename(columns={"cls": "class"})
    recall.to_csv(out / "per_class_recall.csv", float_format="%.4f", index=False)
    result["per_class_recall"] = recall

    # ---- decision curve: the best model and the metadata baseline
    if malignancy:
        who = {f"{comp['best']} ({best_run})": argmax[best_run]}
        if METADATA_BASELINE in argmax:
            who[METADATA_BASELINE] = argmax[METADATA_BASELINE]
        curves = {k: M.decision_curve(p, classes, n_boot=n_boot, seed=0) for k, p in who.items()}
        dc = pd.concat([c.assign(model=k) for k, c in curves.items()], ignore_index=True)
        dc.to_csv(out / "decision_curve.csv", float_format="%.4f", index=False)
        result["decision_curve"] = dc
        figures["decision_curve"] = P.save(P.decision_curves(curves, f"Net benefit of referral on the malignancy "
                                                                      f"score, test split — {line}"),
                                           out / "decision_curve.png")
    result.update(figures=figures, best_run=best_run, n_boot=n_boot, min_site_images=min_site_images,
                  min_positives=min_positives, model_cards=refresh_model_cards(comp["runs"]))
    result["display"] = review_display(result, comp)
    return result


def review_display(review: dict, comp: dict) -> dict[str, pd.DataFrame]:
    """The review's tables as shown in the notebook and summary.md (value [95% CI] cells, counts)."""
    shown = {}
    ref = review.get("by_reference_standard")
    if ref is not None:
        metrics = [m for m in M.BREAKDOWN_METRICS if m in ref.columns]
        shown["by_reference_standard"] = ci_cells(ref, metrics, ["stratum", "run", "n_images", "n_lesions",
                                                                 "n_malignant", "auc_classes"])
    sub = review.get("subgroups")
    if sub is not None:
        metrics = [m for m in M.BREAKDOWN_METRICS if m in sub.columns]
        shown["subgroups"] = ci_cells(sub, metrics, ["variable", "stratum", "population", "run", "n_images",
                                                     "n_lesions", "n_malignant"])
    unit = review["unit_of_analysis"]
    metrics = [m for m in UNIT_METRICS if m in unit.columns]
    u = ci_cells(unit, metrics, ["run", "unit", "n_images"]).rename(columns={"n_images": "n (images or lesions)"})
    for k in ("top1_disagreement", "top1_disagreement_rule", "refer_disagreement"):
        u[k] = [f"{v:.1%}" if pd.notna(v) else "–" for v in unit[k]]
    u.loc[u["unit"] == "image", ["top1_disagreement", "top1_disagreement_rule", "refer_disagreement"]] = ""
    shown["unit_of_analysis"] = u.rename(columns={
        "top1_disagreement": "multi-image lesions disagreeing: top-1 (argmax)",
        "top1_disagreement_rule": "top-1 (recipe rule)", "refer_disagreement": "refer decision"})
    rec = review["per_class_recall"]
    shown["per_class_recall"] = rec.assign(cell=[fmt_ci(v, lo, hi) for v, lo, hi in
                                                 zip(rec["recall"], rec["ci_low"], rec["ci_high"])]).pivot(
        index="run", columns="class", values="cell").reindex(index=list(dict.fromkeys(rec["run"])),
                                                            columns=list(dict.fromkeys(rec["class"])))
    return shown


def review_text(review: dict, comp: dict) -> dict[str, str]:
    """The sentences that read the review's key numbers (markdown), for the notebook, summary.md and the index."""
    best_run, text = review["best_run"], {}
    ref = review.get("by_reference_standard")
    if ref is not None and "malignancy_auc" in ref.columns:
        r = ref.set_index(["stratum", "run"])
        def q(stratum, m):
            if (stratum, best_run) not in r.index or pd.isna(r.loc[(stratum, best_run), m]):
                return "–"
            x = r.loc[(stratum, best_run)]
            return fmt_ci(x[m], x[f"{m}_ci_low"], x[f"{m}_ci_high"])
        if ("histo", best_run) in r.index:
            h = r.loc[("histo", best_run)]
            text["reference_standard"] = (
                f"On the **{int(h.n_images)} histopathology-confirmed test images** ({int(h.n_lesions)} lesions, "
                f"{int(h.n_malignant)} malignant), {comp['best']} ({best_run}) reaches a malignancy AUC of "
                f"{q('histo', 'malignancy_auc')} against {q('all', 'malignancy_auc')} on all test images, and a "
                f"specificity at its validation threshold of {q('histo', 'specificity')} against "
                f"{q('all', 'specificity')}: the histo-confirmed cases are the hard ones.")
    unit = review["unit_of_analysis"].set_index(["run", "unit"])
    if (best_run, "lesion") in unit.index:
        le, im = unit.loc[(best_run, "lesion")], unit.loc[(best_run, "image")]
        text["unit"] = (
            f"The headline unit is the **image**. Per lesion (mean probability over a lesion's images), {best_run} "
            f"reads accuracy {le.accuracy:.3f}, balanced accuracy {le.balanced_accuracy:.3f} and macro AUC "
            f"{le.auc:.3f} (per image {im.accuracy:.3f} / {im.balanced_accuracy:.3f} / {im.auc:.3f}). Of its "
            f"{int(le.multi_image_lesions)} lesions with several test images, {le.top1_disagreement:.0%} get "
            f"different top-1 classes (argmax) across their own images"
            + (f" ({le.top1_disagreement_rule:.0%} under the recipe rule)"
               if pd.notna(le.top1_disagreement_rule) else "")
            + (f", and {le.refer_disagreement:.0%} a different refer decision." if pd.notna(le.refer_disagreement)
               else "."))
    if "decision_curve" in review:
        dc = review["decision_curve"]
        parts = []
        for model, g in dc.groupby("model", sort=False):
            above = g[(g["net_benefit"] > g["refer_all"] + 1e-9) & (g["net_benefit"] > 1e-9)]["threshold"]
            parts.append(f"{model}: " + (f"above both defaults at {len(above)} of {len(g)} thresholds, between "
                                         f"{above.min():.0%} and {above.max():.0%}" if len(above)
                                         else "never above both defaults"))
        text["decision_curve"] = ("Net benefit against refer-all and refer-none over threshold probabilities "
                                  "1–50% (" + "; ".join(parts) + "). The score is read as a probability: poor "
                                  "calibration costs net benefit.")
    if "multiplicity" in review:
        text["multiplicity"] = review["multiplicity"]
    return text


def _md(table: pd.DataFrame, index: bool = False) -> str:
    return table.to_markdown(index=index) if len(table) else "(none)"


def write_summary(cfg: dict, comp: dict, reports: Path, review: dict | None = None) -> dict:
    """reports/summary.md: the comparison table (argmax, the recipe rule beside it, the baselines), the paired
    comparisons (argmax; the rule-on block apart; with against without metadata), the seed spread, and with
    ``review`` the results by reference standard, subgroups, unit of analysis, per-class recall and decision
    curve; the data's limits and the provenance. ``table_md`` is what the README's results block shows."""
    p = comp["provenance"]
    texts = review_text(review, comp) if review else {}
    table_md = (f"Test split of **{p['data']}**, {p['image_size']} input, lesion-grouped 70/15/15 split "
                f"(seed {p['split_seed']}), **{p['weights']}**, profile **{p['profile']}**, commit "
                f"`{p['git_commit']}`, {p['device']}, {p['date']}. Unit: **per image**; accuracy and balanced "
                f"accuracy of the **plain argmax** (each recipe's own rule beside it, labelled).\n\n"
                + comp["display"].to_markdown() + "\n\n" + table_note(comp) + "\n"
                + "".join(f"\n{texts[k]}\n" for k in ("reference_standard", "unit") if k in texts))
    paired_md = comp["paired_display"].to_markdown(index=False) if len(comp["paired"]) else "(only one model)"
    rule_md = (comp["paired_rule_display"].to_markdown(index=False) if len(comp["paired_rule"])
               else "(only one model)")
    packages = ", ".join(f"{k} {v}" for k, v in p["packages"].items())
    n_used = int(comp["paired"]["n_boot"].iloc[0]) if len(comp["paired"]) else 0
    meta_pairs = comp["paired_metadata"]
    meta_md = (_paired_display(meta_pairs, comp["select_metric"]).rename(
        columns={f"best (by {comp['select_metric']})": "with metadata", "other": "image only"}).to_markdown(index=False)
        if len(meta_pairs) else "No run here has a late-fusion twin (a run whose run.json names its `image_run`).")
    sections = [f"# Summary of the {p['profile']} run\n\n{table_md}",
                f"""## Is the best model's lead more than noise? (plain argmax)

Paired bootstrap over test lesions ({n_used} resamples): both models scored on the same lesion draws, each model's
seeds resampled too; difference = best − other; two-sided bootstrap p-values, Holm-adjusted across all
{len(comp['paired'])} comparisons. Every model's predicted class is the **plain argmax**, so a difference is the
networks', not their decision rules'.

{paired_md}

### The same comparisons under each recipe's own rule (rule on)

Accuracy and balanced accuracy of each recipe's own rule (logit adjustment where the recipe uses it); macro AUC is
the same as above (the rule moves no probability). A separate family, Holm-adjusted on its own.

{rule_md}

### Each network with against without metadata (late fusion, plain argmax)

{meta_md}

{comp['seed_spread_text']}"""]
    if review:
        d, figs = review["display"], review["figures"]
        if "by_reference_standard" in d:
            sections.append(f"""## By reference standard (test split)

How each diagnosis was confirmed (HAM10000's `dx_type`): histopathology (`histo`, the co-primary test set),
follow-up, expert consensus, confocal microscopy. Balanced accuracy of the argmax; macro AUC over the classes with
at least {review['min_positives']} positive lesions in the stratum (named); malignancy AUC; sensitivity and
specificity at each model's validation threshold (held fixed). 95% intervals over the stratum's lesions; "–": not
defined in that stratum (e.g. no malignant lesion).

{texts.get('reference_standard', '')}

{_md(d['by_reference_standard'])}

![Malignancy ROC, all test images and histopathology-confirmed only](compare/roc_by_reference_standard.png)""")
        if "subgroups" in d:
            sections.append(f"""## Subgroups (best model and baselines)

Sex, age band and anatomical site (sites with fewer than {review['min_site_images']} test images pooled as
"other"); `population` "histo" repeats each subgroup on its histopathology-confirmed images, which holds the case
mix fixed. {texts.get('multiplicity', '')}

{_md(d['subgroups'])}

![Subgroup forest plot](compare/subgroups_forest.png)""")
        sections.append(f"""## Unit of analysis: per image and per lesion

{texts.get('unit', '')} Lesion-level metrics use the mean probability over a lesion's images and one label per
lesion; the malignancy threshold is each model's validation threshold, unchanged.

{_md(d['unit_of_analysis'])}

## Per-class recall (plain argmax)

{_md(d['per_class_recall'], index=True)}""")
        if "decision_curve" in figs:
            sections.append(f"""## Decision curve

{texts.get('decision_curve', '')}

![Decision curve](compare/decision_curve.png)""")
    sections.append(f"""## Limits of what this data can show

{limits_md()}

## Provenance

- Data: {p['data']} from `{p['data_dir']}` ({p['images']} images), task `{p['task']}`
- Image size: {p['image_size']}; split seed {p['split_seed']}, fractions {p['split_fractions']}, grouped by lesion
- Weights: {p['weights']}; profile `{p['profile']}` ({cfg.get('description', '')})
- Packages: {packages}
- Git commit: {p['git_commit']}; device: {p['device']}; date: {p['date']}
""")
    text = "\n\n".join(sections)
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


# ------------------------------------------------------------------------------------------------ Table 1 (01)
TABLE_ONE_VARIABLES = (("age band", "age"), ("sex", "sex"), ("site", "localization"), ("reference standard", "dx_type"))


def table_one(df: pd.DataFrame, splits=("train", "val", "test")) -> dict[str, pd.DataFrame]:
    """The per-split "Table 1": images and lesions, age (median and IQR, and by band), sex, anatomical site and
    reference standard (dx_type), each with its missing count ("unknown": HAM10000 writes "unknown" or leaves the
    field empty). Returns dict(counts: numeric image counts with rows (variable, level) and one column per split
    plus "all"; display: the same as "n (share of the split's images)" with the age summary and lesion counts).
    A variable the table lacks is left out."""
    cols = [s for s in splits if s in set(df["split"])] + ["all"]
    parts = {s: df[df["split"] == s] for s in cols[:-1]}
    parts["all"] = df
    rows = []
    for name, column in TABLE_ONE_VARIABLES:
        if column not in df.columns:
            continue
        levels = {s: (M.age_band(g[column]) if column == "age" else M.clean_category(g[column])).reset_index(drop=True)
                  for s, g in parts.items()}
        order = ([b for *_, b in M.AGE_BANDS] if column == "age" else
                 list(levels["all"].value_counts().index.drop(M.UNKNOWN, errors="ignore")))
        for level in order + [M.UNKNOWN]:
            rows.append(((name, "missing (unknown)" if level == M.UNKNOWN else level),
                         {s: int((v == level).sum()) for s, v in levels.items()}))
    counts = pd.DataFrame({k: v for k, v in rows}).T.reindex(columns=cols)
    counts.index = pd.MultiIndex.from_tuples(counts.index, names=["variable", "level"])
    n = {s: len(g) for s, g in parts.items()}
    shown = counts.apply(lambda col: [f"{v} ({v / n[col.name]:.1%})" for v in col]).astype(object)
    head = {("images", ""): {s: str(n[s]) for s in cols},
            ("lesions", ""): {s: str(parts[s]["lesion_id"].nunique()) for s in cols}}
    if "age" in df.columns:
        def age_summary(g):
            a = pd.to_numeric(g["age"], errors="coerce").dropna()
            return f"{a.median():.0f} [{a.quantile(.25):.0f}–{a.quantile(.75):.0f}]" if len(a) else "–"
        head[("age, median [IQR]", "")] = {s: age_summary(parts[s]) for s in cols}
    top = pd.DataFrame(head).T.reindex(columns=cols)
    top.index = pd.MultiIndex.from_tuples(top.index, names=["variable", "level"])
    return dict(counts=counts, display=pd.concat([top, shown]))


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
