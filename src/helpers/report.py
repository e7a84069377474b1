"""Reports from saved runs: what the model notebooks display, the model cards, the comparison, summary.md and the
README's results block.

Everything here reads files that the model notebooks wrote under ``reports/`` (predictions, metrics, history,
run.json), so the comparison can be re-made without retraining and every number traces back to a saved run.
This module imports nothing from ``experiment`` (which imports it); the provenance line lives here. Two readers
of its results live beside it and import it, never the other way: ``review`` (reference standard, subgroups, unit
of analysis, decision curve, Table 1) and ``pages`` (index.html and the rendered notebooks).

Why one module of this size (about 630 lines): one job, turning saved runs into the comparison (the argmax table
with each recipe's rule beside it, both baselines, the paired comparisons in three families, the seed spread) and
writing it as summary.md, the README block and the model cards, which share its row names, labels and provenance.
"""
from __future__ import annotations

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


def paired_display(paired: pd.DataFrame, select_metric: str, rule: str = M.ARGMAX) -> pd.DataFrame:
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
                paired_display=paired_display(paired, select_metric), paired_rule=paired_rule,
                paired_rule_display=paired_display(paired_rule, select_metric, "recipe"), paired_metadata=paired_meta,
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


def write_summary(cfg: dict, comp: dict, reports: Path, review: dict | None = None) -> dict:
    """reports/summary.md: the comparison table (argmax, the recipe rule beside it, the baselines), the paired
    comparisons (argmax; the rule-on block apart; with against without metadata), the seed spread, and with
    ``review`` (``review.review_runs``' result) its sentences and sections (reference standard, subgroups, unit of
    analysis, per-class recall, decision curve); the data's limits and the provenance. ``table_md`` is what the
    README's results block shows."""
    p = comp["provenance"]
    texts = review["text"] if review else {}
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
    meta_md = (paired_display(meta_pairs, comp["select_metric"]).rename(
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
        sections += review["sections"]
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
