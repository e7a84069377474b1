"""The review a dermatology reader asks of the comparison, from saved predictions and split.csv's metadata (nothing
retrains): the test set by reference standard (histopathology co-primary), subgroups with a forest plot, every
headline metric per image and per lesion with within-lesion agreement, per-class recall, the decision curve, and
01_etl's Table 1. Writes compare/by_reference_standard.csv, subgroups.csv, unit_of_analysis.csv,
per_class_recall.csv, decision_curve.csv and their figures; hands ``report.write_summary`` its summary.md sections.

It reads ``report.compare_runs``' result and uses report's labels and cells; report imports nothing from here.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import metrics as M
from . import plots as P
from .report import (HEADLINE, LABELS, METADATA_BASELINE, fmt_ci, has_metadata, refresh_model_cards)

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
    result["text"] = review_text(result, comp)
    result["sections"] = review_sections(result, result["text"])
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


def review_sections(review: dict, texts: dict) -> list[str]:
    """summary.md's sections for the review (markdown, in order): reference standard, subgroups, unit of
    analysis, per-class recall, decision curve. ``report.write_summary`` places them after the comparison."""
    sections = []
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
    return sections


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
