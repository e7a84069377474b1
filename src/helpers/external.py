"""External validation: score a trained model on another hospital's labelled images.

    python -m helpers.external --checkpoint models/.../model.pt --images DIR --labels labels.csv --out DIR \\
        [--positive mel] [--label-column NAME] [--n-boot 1000]

A split of HAM10000 shares cameras, clinics and populations with the training data; this asks whether a model holds
up on images from elsewhere (an ISIC challenge test set, a clinic's own archive).

``--labels`` is a CSV with ``image_id`` (the file name without extension, searched recursively under ``--images``)
and either ``dx`` in HAM10000's diagnosis names (7-class evaluation, plus the malignancy view) or one 0/1 column
(binary evaluation: the malignancy score P(mel)+P(bcc)+P(akiec), and with ``--positive CLASS`` also that class's
probability). Optional ``patient_id`` / ``lesion_id`` columns make the bootstrap resample patients (or lesions)
instead of images. Images go through exactly the evaluation preprocessing (``predict.predict_paths``). The
malignancy threshold is the checkpoint's, chosen on HAM10000's validation split, never re-tuned here; the only
threshold fitted on the external labels is the one labelled "oracle".

A checkpoint that uses the patient's metadata needs ``age``, ``sex`` and ``localization`` per image: columns of the
labels CSV, or ``--metadata CSV`` (``metadata.csv`` in the images folder by default). Without them it stops naming the
columns; ``--image-only`` scores the image part alone. With them, the image-only and the fused scores are reported
side by side (``metrics_image_only.csv``), since such a model is only as good as those fields are in a new clinic.

Writes ``predictions.csv``, ``metrics.csv`` (metric, value, ci_low, ci_high), ``roc.png``, ``reliability.png``
(``evaluation.png`` too for 7-class labels), ``skipped.csv`` when anything was skipped, and ``external.md``. Every
input is checked before anything is written, and the files are written to a temporary folder that then replaces
``--out``: on a fatal error nothing is written.

Why one module of this size: its one job is a command-line tool that must check every input before writing
anything (labels, images, metadata, classes, groups), score with intervals and write its report; the checks are
most of it, and each names the file or row at fault.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

from . import clinical as C
from . import metrics as M
from . import plots as P
from . import predict
from . import report as R
from .data import BINARY_CLASSES, DX_CLASSES, IMAGE_SUFFIXES, MALIGNANT

ID_COLUMNS = ("image_id", "patient_id", "lesion_id")  # patient first: the coarsest unit wins for the bootstrap
ORACLE_SENSITIVITY = 0.95
MARKER = "external.md"  # an --out folder holding this file is an earlier output and may be replaced
SHOW = 20  # names listed in external.md per kind of skipped item (skipped.csv has them all)
BINARY_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}

HOW_TO_ADD = """**No external set given: section skipped.** To score every run of this profile on images from elsewhere,
set the `external_dir` parameter (or `HAM_EXTERNAL_DIR`) to a folder holding

- `images/`: the images, named `<image_id>.jpg`, `.jpeg` or `.png` (any size; sub-folders are searched), and
- `labels.csv`: an `image_id` column and either `dx` (HAM10000's names: akiec, bcc, bkl, df, mel, nv, vasc) or one
  0/1 column (1 = malignant; set `external_positive = "mel"` when 1 means melanoma); optional `patient_id` /
  `lesion_id` columns make the bootstrap resample them instead of images.

One checkpoint at a time: `python -m helpers.external --help`."""


class ExternalError(ValueError):
    """The external set or the options cannot be used as given; the message says why. Nothing has been written."""


# -------------------------------------------------------------------------------------------------- the labels
@dataclass
class Labels:
    """A validated labels file. ``table`` has image_id, ``target`` (dx name or 0/1), ``group`` (the bootstrap
    unit) and the optional lesion_id / patient_id columns."""
    table: pd.DataFrame
    form: str  # "dx" or "binary"
    column: str  # the label column as named in the file
    group: str  # "patient_id", "lesion_id" or "image_id"
    source: str
    notes: list[str] = field(default_factory=list)


def _listing(items: Sequence, n: int = SHOW) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", … and {len(items) - n} more" if len(items) > n else "")


def _strip_suffix(name: str) -> str:
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def _binary_candidates(df: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """Columns whose values are all 0/1 (blanks aside); and columns that are mostly 0/1 with their other values."""
    ok, almost = [], {}
    for c in df.columns:
        if c in ID_COLUMNS:
            continue
        values = df[c].dropna().str.strip().str.lower()
        if values.empty:
            continue
        bad = values[~values.isin(list(BINARY_VALUES))]
        if bad.empty:
            ok.append(c)
        elif len(bad) < len(values) / 2:
            almost[c] = sorted(bad.unique())
    return ok, almost


def read_labels(path, label_column: str | None = None) -> Labels:
    """Read and check a labels CSV; ExternalError with the reason for anything that cannot be evaluated."""
    path = Path(path)
    if not path.is_file():
        raise ExternalError(f"labels file {path} not found")
    try:
        df = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ExternalError(f"labels file {path} is not a readable CSV: {e}") from None
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]  # a BOM from Excel's "CSV UTF-8"
    df = df.rename(columns={c: c.lower() for c in df.columns if c.lower() in (*ID_COLUMNS, "dx")})
    if "image_id" not in df.columns:
        raise ExternalError(f"labels file {path} has no image_id column (columns: {list(df.columns)})")
    ids = df["image_id"].fillna("").str.strip().map(_strip_suffix)
    if (ids == "").any():
        raise ExternalError(f"labels file {path}: {int((ids == '').sum())} row(s) have an empty image_id "
                            f"(CSV lines {_listing(np.flatnonzero(ids == '') + 2)})")
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise ExternalError(f"labels file {path} lists {len(dup)} image_id(s) more than once: {_listing(dup)}")
    df["image_id"] = ids

    if label_column is not None:
        if label_column not in df.columns:
            raise ExternalError(f"--label-column {label_column!r} is not a column of {path} ({list(df.columns)})")
        column = label_column
    elif "dx" in df.columns:
        column = "dx"
    else:
        ok, almost = _binary_candidates(df)
        if len(ok) > 1:
            raise ExternalError(f"labels file {path} has several 0/1 columns {ok}: name the label with "
                                f"--label-column (the others are ignored)")
        if not ok:
            hint = "".join(f"; column {c!r} holds values other than 0/1: {_listing(v, 5)}" for c, v in almost.items())
            raise ExternalError(
                f"labels file {path} has neither a dx column (HAM10000's names: {', '.join(DX_CLASSES)}) nor one 0/1 "
                f"label column{hint}. Its columns: {list(df.columns)}")
        column = ok[0]
    form = "dx" if column == "dx" else "binary"

    raw = df[column].fillna("").str.strip().str.lower()
    if form == "dx":
        unknown = raw[~raw.isin(DX_CLASSES)]
        if len(unknown):
            counts = unknown.replace("", "(blank)").value_counts()
            raise ExternalError(
                f"labels file {path}: unknown diagnosis name(s) in column dx: "
                f"{', '.join(f'{k!r} ({v} rows)' for k, v in counts.items())}; expected HAM10000's names "
                f"{', '.join(DX_CLASSES)} (any case). Rename them or drop those rows.")
        target = raw
    else:
        unknown = raw[~raw.isin(list(BINARY_VALUES))]
        if len(unknown):
            counts = unknown.replace("", "(blank)").value_counts()
            raise ExternalError(f"labels file {path}: column {column!r} must hold 0 or 1; it also holds "
                                f"{', '.join(f'{k!r} ({v} rows)' for k, v in counts.items())}")
        target = raw.map(BINARY_VALUES).astype(int)

    notes = []
    group = next((c for c in ID_COLUMNS[1:] if c in df.columns and df[c].notna().any()), "image_id")
    out = pd.DataFrame({"image_id": df["image_id"], "target": target})
    for c in ID_COLUMNS[1:]:
        if c in df.columns:
            out[c] = df[c].str.strip()
    out["group"] = out[group]
    if out["group"].isna().any():
        n = int(out["group"].isna().sum())
        notes.append(f"{n} row(s) have no {group}: each counts as its own {group.removesuffix('_id')} in the "
                     "bootstrap")
        out["group"] = out["group"].fillna("image:" + out["image_id"])
    return Labels(out, form, column, group, str(path), notes)


# -------------------------------------------------------------------------------------------------- the images
def match_images(labels: Labels, images_dir) -> tuple[pd.DataFrame, list[tuple[str, str, str]], list[str]]:
    """Pair each label row with ``<image_id>.<jpg|jpeg|png>`` found under ``images_dir`` (recursively).

    Returns ``(matched, skipped, notes)``: matched is the labels table plus ``path``; skipped lists
    ``(kind, item, reason)`` for labels with no image and images with no label. The same name twice is fine when
    the files are identical (Kaggle's HAM10000 copies every folder) and an error when they differ.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ExternalError(f"images folder {images_dir} not found")
    found: dict[str, list[Path]] = {}
    for p in predict.find_images([images_dir]):
        found.setdefault(p.stem, []).append(p)
    notes = []
    copies = {k: v for k, v in found.items() if len(v) > 1}
    differ = [k for k, v in copies.items() if not all(filecmp.cmp(v[0], q, shallow=False) for q in v[1:])]
    if differ:
        raise ExternalError(f"{len(differ)} image name(s) occur more than once under {images_dir} with different "
                            f"content, so which one is labelled is ambiguous: "
                            f"{_listing([' vs '.join(map(str, found[k])) for k in differ], 5)}")
    if copies:
        notes.append(f"{len(copies)} image(s) occur more than once under the folder as identical files; "
                     "the first copy was used")
    others = [p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
              and not p.name.startswith(".")]
    if others:
        notes.append(f"{len(others)} file(s) without an image suffix ({', '.join(IMAGE_SUFFIXES)}) were ignored: "
                     f"{_listing(sorted(p.name for p in others), 5)}")
    table = labels.table
    has_image = table["image_id"].isin(list(found))
    skipped = [("label without image", i, f"no {i}.jpg/.jpeg/.png under {images_dir}")
               for i in table.loc[~has_image, "image_id"]]
    labelled = set(table["image_id"])
    skipped += [("image without label", str(found[k][0]), f"{k} is not in {labels.source}")
                for k in sorted(found) if k not in labelled]
    if not has_image.any():
        raise ExternalError(f"none of the {len(table)} image_id(s) in {labels.source} has an image under "
                            f"{images_dir} ({len(found)} image files found; names must be <image_id>.jpg/.png)")
    matched = table[has_image].reset_index(drop=True)
    matched["path"] = [str(found[i][0]) for i in matched["image_id"]]
    return matched, skipped, notes


# ------------------------------------------------------------------------------------------- what is evaluated
@dataclass
class Plan:
    """What a checkpoint can be asked on a labels file (checked before any prediction)."""
    classes: tuple
    multiclass: bool  # dx labels and a model over those diagnoses: the 7-class metrics
    malignancy: bool  # the classes have a malignancy score (P(mel)+P(bcc)+P(akiec), or p_malignant)
    positive: str | None  # binary labels scored by this class's probability too
    threshold: float | None  # the checkpoint's validation-chosen malignancy threshold


def plan(meta: dict, labels: Labels, positive: str | None = None) -> Plan:
    classes = tuple(meta["classes"])
    malignancy = M.has_malignancy_view(classes)
    if labels.form == "dx":
        if positive is not None:
            raise ExternalError("--positive applies to a 0/1 label column; with dx labels every class is scored")
        outside = sorted(set(labels.table["target"]) - set(classes))
        multiclass = not outside
        if outside and classes != BINARY_CLASSES:
            raise ExternalError(f"the labels hold diagnoses {outside} that this checkpoint does not predict "
                                f"(its classes: {list(classes)})")
    else:
        multiclass = False
        if positive is not None and positive not in classes:
            raise ExternalError(f"--positive {positive!r} is not one of the checkpoint's classes {list(classes)}")
        if positive is None and not malignancy:
            raise ExternalError(f"the checkpoint's classes {list(classes)} have no malignancy score: name the class "
                                f"that the 0/1 column means with --positive")
    threshold = meta.get("malignancy_threshold") if malignancy else None
    return Plan(classes, multiclass, malignancy, positive, None if threshold is None else float(threshold))


def binary_auc(y, score) -> float:
    """ROC AUC of a 0/1 outcome; ValueError (as ``metrics.macro_auc`` raises) when one outcome is absent, so the
    bootstrap skips such resamples instead of averaging NaNs."""
    y = np.asarray(y).astype(bool)
    M._require_both_outcomes(y, "the outcome")  # the one check metrics' AUCs use
    return float(roc_auc_score(y, score))


def class_auc_mean(pred: pd.DataFrame, classes: Sequence[str], over: Sequence[int]) -> float:
    """One-vs-rest ROC AUC averaged over the class indices ``over`` only (``metrics.macro_auc`` when ``over`` is
    every class): an external set often lacks a diagnosis, whose AUC is then undefined, not zero."""
    y, probs = pred["label"].to_numpy(), M.prob_matrix(pred, classes)
    return float(np.mean([binary_auc(y == k, probs[:, k]) for k in over]))


def _oracle(p: pd.DataFrame, what: str) -> float:
    """The threshold giving 95% sensitivity on these very labels, and the sensitivity/specificity it gives."""
    t = M.threshold_for_sensitivity(p["y_bin"], p["s_mal"], ORACLE_SENSITIVITY)
    if what == "threshold":
        return t
    sens, spec = M.sensitivity_specificity(p["y_bin"], p["s_mal"], t)
    return sens if what == "sensitivity" else spec


def metric_functions(pl: Plan, present: Sequence[int] = ()) -> dict[str, Callable[[pd.DataFrame], float]]:
    """name -> fn(prediction table) for every metric this plan supports; each goes to ``metrics.bootstrap_ci``."""
    fns: dict[str, Callable[[pd.DataFrame], float]] = {}
    classes = pl.classes
    if pl.multiclass:
        all_present = len(present) == len(classes)
        fns["accuracy"] = M.accuracy
        fns["balanced_accuracy"] = M.balanced_accuracy
        fns["auc" if all_present else "auc_present_classes"] = (
            partial(M.macro_auc, classes=classes) if all_present else partial(class_auc_mean, classes=classes,
                                                                                over=list(present)))
        fns["log_loss"] = lambda p: float(log_loss(p["label"], M.prob_matrix(p, classes),
                                                   labels=np.arange(len(classes))))
        fns["ece"] = lambda p: M.expected_calibration_error(M.prob_matrix(p, classes), p["label"].to_numpy())
    if pl.positive is not None:
        fns[f"auc_{pl.positive}"] = lambda p: binary_auc(p["y_bin"], p["s_pos"])
    if pl.malignancy:
        fns["malignancy_auc"] = lambda p: binary_auc(p["y_bin"], p["s_mal"])
        if pl.threshold is not None:
            fns["sensitivity"] = lambda p: M.sensitivity_specificity(p["y_bin"], p["s_mal"], pl.threshold)[0]
            fns["specificity"] = lambda p: M.sensitivity_specificity(p["y_bin"], p["s_mal"], pl.threshold)[1]
        for what in ("threshold", "sensitivity", "specificity"):
            fns[f"oracle_{what}"] = partial(_oracle, what=what)
    return fns


def metric_table(pred: pd.DataFrame, fns: dict, n_boot: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """(metric, value, ci_low, ci_high) by ``metrics.bootstrap_ci`` over ``pred["group"]``; a metric undefined on
    this set (a class absent, say) gets NaN and a note instead of stopping the others."""
    rows, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's "y_pred contains classes not in y_true" on small resamples
        for name, fn in fns.items():
            try:
                point = float(fn(pred))
            except ValueError as e:
                rows.append((name, np.nan, np.nan, np.nan))
                notes.append(f"{name}: not defined on this set ({e})")
                continue
            low = high = np.nan
            if n_boot:
                try:
                    _, low, high = M.bootstrap_ci(pred, fn, n_boot=n_boot, seed=seed, group="group")
                except ValueError as e:
                    notes.append(f"{name}: no interval ({e})")
            rows.append((name, point, low, high))
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"]), notes


def _score_table(y, score, classes=BINARY_CLASSES) -> pd.DataFrame:
    """A two-class prediction table for one score, so ``plots.roc_overlay`` / ``reliability_diagram`` take it."""
    score = np.clip(np.asarray(score, dtype=float), 0, 1)
    return pd.DataFrame({"label": np.asarray(y).astype(int), "pred": (score >= 0.5).astype(int),
                         f"p_{classes[0]}": 1 - score, f"p_{classes[1]}": score})


def primary_view(pred: pd.DataFrame, pl: Plan) -> tuple[str, pd.DataFrame, tuple]:
    """(name, two-class table, its classes) of the score the ROC leads with: the --positive class when given,
    else the malignancy score."""
    if pl.positive is not None:
        cls = (f"not {pl.positive}", pl.positive)
        return f"P({pl.positive})", _score_table(pred["y_bin"], pred["s_pos"], cls), cls
    return "malignancy score", _score_table(pred["y_bin"], pred["s_mal"]), BINARY_CLASSES


# ----------------------------------------------------------------------------------------------- one checkpoint
def external_metadata(labels_csv, images_dir, given=None) -> pd.DataFrame | None:
    """Age, sex and site per image_id for a metadata model: ``given`` (a CSV), else the labels CSV when it holds
    the columns, else ``metadata.csv`` in the images folder (where ``helpers.predict`` looks too); None when none
    has them."""
    for path in [given] if given else [labels_csv, Path(images_dir) / "metadata.csv"]:
        if path and Path(path).is_file():
            head = pd.read_csv(path, nrows=0).columns
            if given or all(c in head for c in C.COLUMNS):
                try:
                    return predict.read_metadata(path)
                except C.MetadataColumnsError as e:
                    raise ExternalError(str(e)) from None
    return None


def evaluate(model, meta: dict, labels: Labels, matched: pd.DataFrame, positive: str | None = None,
             n_boot: int = 1000, seed: int = 0, batch_size: int = 64, pl: Plan | None = None,
             metadata: pd.DataFrame | None = None, image_only: bool = False) -> dict:
    """Predict the matched images (evaluation preprocessing), then metrics with intervals, and the figures (in
    memory: ``write`` saves them). ExternalError when no image could be read. A model that uses metadata is scored
    twice, fused and image only (``result["image_only"]``), unless ``image_only``."""
    pl = pl or plan(meta, labels, positive)
    classes = pl.classes
    try:
        table, errors = predict.predict_paths(model, meta, matched["path"].tolist(), batch_size, metadata=metadata,
                                              image_only=image_only)
    except C.MetadataColumnsError as e:
        raise ExternalError(str(e)) from None
    skipped = [("unreadable", str(p), reason) for p, reason in errors]
    if table.empty:
        raise ExternalError(f"none of the {len(matched)} matched images could be read: "
                            f"{_listing([r for _, _, r in skipped], 3)}")
    rows = matched.set_index("path").loc[table["path"]].reset_index()
    pred = rows[[c for c in ("image_id", *ID_COLUMNS[1:]) if c in rows.columns]].copy()
    pred[labels.column] = rows["target"].to_numpy()
    probs = M.prob_matrix(table, classes)
    if pl.multiclass:
        pred["label"] = [classes.index(t) for t in rows["target"]]
    pred["pred"] = [classes.index(c) for c in table["predicted"]]  # the run's decision rule, as predict applies it
    pred["predicted"] = [classes[k] for k in pred["pred"]]
    for k, c in enumerate(classes):
        pred[f"p_{c}"] = probs[:, k]
    if labels.form == "dx":
        pred["y_bin"] = rows["target"].isin(MALIGNANT).astype(int).to_numpy()
    else:
        pred["y_bin"] = rows["target"].to_numpy().astype(int)
    if pl.malignancy:
        pred["s_mal"] = M.malignancy_score(pred.assign(label=0), classes)[1]
    if pl.positive is not None:
        pred["s_pos"] = pred[f"p_{pl.positive}"]
    pred["path"] = table["path"].to_numpy()
    pred["group"] = rows["group"].to_numpy()

    present = [k for k in range(len(classes)) if pl.multiclass and (pred["label"] == k).any()]
    met, notes = metric_table(pred, metric_functions(pl, present), n_boot, seed)
    if pl.multiclass and len(present) < len(classes):
        absent = [c for k, c in enumerate(classes) if k not in present]
        notes.append(f"no images of {', '.join(absent)}: macro AUC over the {len(present)} classes present "
                     "(auc_present_classes), not comparable with the internal test's 7-class macro AUC")
    result = dict(meta=meta, plan=pl, labels=labels, pred=pred, metrics=met, skipped=skipped, notes=notes,
                  n_boot=n_boot, seed=seed, scored_with=predict.scored_with(meta, image_only))
    result["figures"] = _figures(result)
    if predict.metadata_mode(meta, image_only):
        result["image_only"] = evaluate(model, meta, labels, matched, positive, n_boot, seed, batch_size, pl,
                                        image_only=True)
    return result


def _mark_operating_points(ax, met: pd.DataFrame, pl: Plan) -> None:
    """The validation threshold's and the oracle's (sensitivity, specificity) on the malignancy ROC."""
    t = met.set_index("metric")["value"]
    if pd.notna(t.get("sensitivity")) and pd.notna(t.get("specificity")):
        ax.plot(1 - t["specificity"], t["sensitivity"], "o", ms=8, color="black",
                label=f"validation threshold {pl.threshold:.3f}")
    if pd.notna(t.get("oracle_sensitivity")):
        ax.plot(1 - t["oracle_specificity"], t["oracle_sensitivity"], "x", ms=9, mew=2, color="tab:red",
                label=f"oracle: 95% sens. here ({t['oracle_threshold']:.3f})")
    ax.legend(loc="lower right", fontsize="small")


def _figures(result: dict) -> dict:
    """roc, reliability (and evaluation for 7-class labels) as Figures; a figure undefined on this set (one
    outcome only) is left out with a note."""
    pred, pl, meta = result["pred"], result["plan"], result["meta"]
    title = f"{_model_name(meta)} on the external set ({len(pred)} images)"
    views = {}
    if pl.positive is not None:
        name, t, cls = primary_view(pred, pl)
        views[name] = (t, cls)
    if pl.malignancy:
        views["malignancy score"] = (_score_table(pred["y_bin"], pred["s_mal"]), BINARY_CLASSES)
    figs = {}
    try:
        figs["roc"] = P.roc_overlay({k: v[0] for k, v in views.items()}, {k: v[1] for k, v in views.items()},
                                    f"ROC: {title}")
        if pl.malignancy:
            _mark_operating_points(figs["roc"].axes[0], result["metrics"], pl)
    except ValueError as e:
        result["notes"].append(f"roc.png not drawn: {e}")
    if pl.multiclass:
        figs["evaluation"] = P.evaluation_panel(pred, pl.classes, f"7-class evaluation: {title}")
        figs["reliability"] = P.reliability_diagram(pred, pl.classes, f"Calibration (top label): {title}")
    else:
        name, t, cls = primary_view(pred, pl)
        figs["reliability"] = P.reliability_diagram(t, cls, f"Calibration of {name}: {title}")
    return figs


def _model_name(meta: dict) -> str:
    return str(meta.get("run_name") or meta.get("model_name") or meta.get("arch", "model"))


# ------------------------------------------------------------------------------------------------------ writing
def check_out(out) -> Path:
    """``out`` may be new, empty, or an earlier output of this module (it holds external.md): it is replaced."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise ExternalError(f"--out {out} exists and is not an earlier external-validation folder (no {MARKER}); "
                            "choose a new folder or empty it")
    return out


def write_atomically(out, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``out``, which then replaces ``out``; if ``write`` fails the
    temporary folder is removed and ``out`` is left as it was."""
    out = check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


PRED_DROP = ["y_bin", "s_mal", "s_pos", "group"]


def write_result(result: dict, folder: Path, given: dict) -> None:
    """The files of one checkpoint's external evaluation into ``folder`` (which exists)."""
    pred = result["pred"].copy()
    if "s_mal" in pred:
        pred["malignancy_score"] = pred["s_mal"]
    pred = pred.drop(columns=[c for c in PRED_DROP if c in pred])
    cols = [c for c in pred.columns if c != "path"] + ["path"]
    pred[cols].to_csv(folder / "predictions.csv", index=False, float_format="%.6f")
    result["metrics"].to_csv(folder / "metrics.csv", index=False, float_format="%.4f")
    if "image_only" in result:
        result["image_only"]["metrics"].to_csv(folder / "metrics_image_only.csv", index=False, float_format="%.4f")
    if result["skipped"]:
        pd.DataFrame(result["skipped"], columns=["kind", "item", "reason"]).to_csv(folder / "skipped.csv",
                                                                                  index=False)
    for name, fig in result["figures"].items():
        P.save(fig, folder / f"{name}.png")
    (folder / MARKER).write_text(external_md(result, given))


def _fmt(v) -> str:
    return "–" if pd.isna(v) else f"{v:.3f}"


METRIC_TEXT = {
    "accuracy": "accuracy (7 classes)", "balanced_accuracy": "balanced accuracy (mean per-class recall)",
    "auc": "macro one-vs-rest AUC (7 classes)", "auc_present_classes": "macro one-vs-rest AUC over the classes present",
    "log_loss": "log loss", "ece": "expected calibration error (top label)",
    "malignancy_auc": "AUC of the malignancy score",
    "sensitivity": "sensitivity of the malignancy score at the validation threshold",
    "specificity": "specificity of the malignancy score at the validation threshold",
    "oracle_threshold": "**oracle** threshold: 95% sensitivity on these labels (malignancy score)",
    "oracle_sensitivity": "**oracle** sensitivity (at the oracle threshold)",
    "oracle_specificity": "**oracle** specificity (at the oracle threshold)",
}


def external_md(result: dict, given: dict) -> str:
    """The short report: provenance, what was evaluated and skipped, and the metric table."""
    meta, pl, labels, pred = result["meta"], result["plan"], result["labels"], result["pred"]
    prov = meta.get("provenance") or {}
    trained = ", ".join(str(x) for x in (prov.get("data"), prov.get("image_size") and f"{prov['image_size']} input",
                                         prov.get("split_seed") is not None and f"split seed {prov['split_seed']}",
                                         prov.get("weights"), prov.get("git_commit") and f"commit {prov['git_commit']}",
                                         prov.get("date")) if x)
    if labels.form == "dx":
        form = "`dx` column, HAM10000's diagnosis names" + ("" if pl.multiclass else
                                                           " (binary checkpoint: scored as malignant vs benign)")
        counts = pred[labels.column].value_counts().reindex([c for c in DX_CLASSES if c in set(pred[labels.column])])
        count_text = ", ".join(f"{k} {v}" for k, v in counts.items())
    else:
        form = f"0/1 column `{labels.column}`"
        n1 = int(pred["y_bin"].sum())
        count_text = f"1: {n1}, 0: {len(pred) - n1}"
    scored = []
    if pl.positive is not None:
        scored.append(f"P({pl.positive}) (`--positive {pl.positive}`)")
    if pl.malignancy:
        scored.append("the malignancy score " + ("p_malignant" if pl.classes == BINARY_CLASSES else
                                                 "P(mel)+P(bcc)+P(akiec)") + (" against malignant (akiec, bcc, mel)"
                                                                              if labels.form == "dx" else ""))
    if labels.group == "image_id":
        unit = ("**images**: the labels have no patient_id or lesion_id column, so several images of one lesion "
                "(if any) count as independent and the intervals may be too narrow")
    else:
        unit = f"**{labels.group}** ({pred['group'].nunique()} groups), so images of one " \
               f"{labels.group.removesuffix('_id')} stay together"
    threshold = (f"{pl.threshold:.4f}, the checkpoint's, chosen on its validation split for 95% sensitivity; "
                 "**not re-tuned** on these labels" if pl.threshold is not None else
                 "none in the checkpoint's metadata: no sensitivity/specificity at a validation threshold")
    skipped = result["skipped"]
    kinds = {}
    for kind, item, reason in skipped:
        kinds.setdefault(kind, []).append((item, reason))
    skipped_lines = [f"- {kind}: {len(items)} — " + (_listing([i for i, _ in items]) if kind != "unreadable" else
                                                     _listing([r for _, r in items]))
                     for kind, items in kinds.items()] or ["- nothing"]
    table = result["metrics"]
    rows = [f"| {METRIC_TEXT.get(r.metric, r.metric.replace('_', ' '))} | `{r.metric}` | {_fmt(r.value)} | "
            + ("–" if pd.isna(r.ci_low) else f"[{r.ci_low:.3f}, {r.ci_high:.3f}]") + " |" for r in table.itertuples()]
    notes = labels.notes + given.get("notes", []) + result["notes"]
    if "image_only" in result:
        alone = result["image_only"]["metrics"].set_index("metric")
        rows = [row[:-1] + f" {_fmt(alone.loc[m, 'value']) if m in alone.index else '–'} |"
                for row, m in zip(rows, table.metric)]
    oracle = ("\nThe **oracle** rows choose the threshold on the external labels themselves: optimistic by "
              "construction, shown only to say how far the validation threshold is from the one this set would "
              "need.\n" if "oracle_threshold" in set(table.metric) else "")
    metric_header = ("| metric | name in metrics.csv | value | 95% CI |\n|:--|:--|--:|:--|" if "image_only" not in result
                     else "| metric | name in metrics.csv | image + metadata | 95% CI | image only |\n"
                          "|:--|:--|--:|:--|--:|")
    metadata_note = ("" if "image_only" not in result else
                     " (the image-only score beside it: a model that uses age, sex and site is only as good as those "
                     "fields are where it is used)")
    return f"""# External validation: {_model_name(meta)}

- Checkpoint: `{given.get('checkpoint')}` ({meta.get('arch', '?')}, classes {', '.join(pl.classes)}, profile
  `{meta.get('profile', prov.get('profile', '?'))}`); trained on {trained or 'unknown data (no provenance)'}
- External images: `{given.get('images')}`; labels: `{given.get('labels')}`, {form}
- Evaluated: **{len(pred)} images**; labels: {count_text}; scored: {'; '.join(scored) or 'the 7 classes'}
- Scored with: {result.get('scored_with', 'image')}{metadata_note}
- Preprocessing: as in evaluation, a square resize to {meta['image_size']}x{meta['image_size']}, then the model's
  normalisation, no test-time augmentation
- Malignancy threshold: {threshold}
- 95% intervals: percentile bootstrap, {result['n_boot']} resamples of {unit}
- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}

## Skipped
{chr(10).join(skipped_lines)}
{('' if not skipped else chr(10) + 'All of them, with reasons, in `skipped.csv`.' + chr(10))}
## Metrics

{metric_header}
{chr(10).join(rows)}
{oracle}{('## Notes' + chr(10) + chr(10) + chr(10).join(f'- {n}' for n in notes) + chr(10)) if notes else ''}"""


# ---------------------------------------------------------------------------------------------------- the CLI
def validate(images, labels_csv, out, label_column=None) -> tuple[Labels, pd.DataFrame, list, list]:
    """Every check that needs no model: the labels, the images they name, the output folder."""
    check_out(out)
    labels = read_labels(labels_csv, label_column)
    matched, skipped, notes = match_images(labels, images)
    return labels, matched, skipped, notes


def checkpoint_path(path) -> Path:
    """A model.pt, or a run folder (reports/<run>/) whose run.json names its checkpoint relative to itself."""
    path = Path(path)
    if path.is_dir():
        run_json = path / "run.json"
        if not run_json.exists():
            raise ExternalError(f"{path} is a folder without run.json: give a model.pt or a run folder")
        rel = json.loads(run_json.read_text()).get("checkpoint")
        if not rel:
            raise ExternalError(f"{run_json} names no checkpoint")
        path = Path(os.path.normpath(path / rel))
    if not path.is_file():
        raise ExternalError(f"checkpoint {path} not found (models/ is not in git: it is filled by training, "
                            "notebooks 02-04 or ./run_all.sh)")
    return path


def load(ckpt: Path, device="auto"):
    """``predict.load_checkpoint``, its failures (an old or foreign file) as ExternalError."""
    try:
        return predict.load_checkpoint(ckpt, device)
    except (KeyError, ValueError, RuntimeError, OSError, EOFError, AttributeError, pickle.UnpicklingError) as e:
        raise ExternalError(f"checkpoint {ckpt} could not be loaded ({type(e).__name__}: {e})") from e


def run(checkpoint, images, labels, out, positive=None, label_column=None, n_boot=1000, seed=0, batch_size=64,
        device="auto", metadata=None, image_only=False) -> dict:
    """The CLI as a function: validate, predict, measure, then write ``out`` in one move. Returns the result."""
    ckpt = checkpoint_path(checkpoint)
    lab, matched, skipped, notes = validate(images, labels, out, label_column)
    model, meta = load(ckpt, device)
    pl = plan(meta, lab, positive)
    table = None if image_only or not predict.metadata_mode(meta) else external_metadata(labels, images, metadata)
    result = evaluate(model, meta, lab, matched, positive, n_boot, seed, batch_size, pl, table, image_only)
    result["skipped"] = skipped + result["skipped"]
    given = dict(checkpoint=str(checkpoint), images=str(images), labels=str(labels), notes=notes)
    result["out"] = write_atomically(out, lambda tmp: write_result(result, tmp, given))
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m helpers.external", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:4]))
    p.add_argument("--checkpoint", required=True, help="a model.pt, or a run folder reports/<run>/ (its run.json)")
    p.add_argument("--images", required=True, help="folder of images named <image_id>.jpg/.jpeg/.png (recursive)")
    p.add_argument("--labels", required=True, help="CSV: image_id + dx, or image_id + one 0/1 column")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier output: replaced)")
    p.add_argument("--positive", help="binary labels: the class whose probability scores them too (e.g. mel); "
                                      "the malignancy score is always evaluated")
    p.add_argument("--label-column", help="the 0/1 label column, when the file has several")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--metadata", help="CSV with image_id, age, sex, localization for a model that uses them "
                                      "(default: the labels CSV's own columns, else metadata.csv in the images folder)")
    p.add_argument("--image-only", action="store_true", help="score a metadata model's image part alone")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """0 on success; 2 on a fatal error (message on stderr, nothing written)."""
    args = parse_args(argv)
    try:
        result = run(args.checkpoint, args.images, args.labels, args.out, args.positive, args.label_column,
                     args.n_boot, args.seed, args.batch_size, args.device, args.metadata, args.image_only)
    except ExternalError as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 2
    for kind, item, reason in result["skipped"]:
        print(f"skipped ({kind}): {reason}", file=sys.stderr)
    t = result["metrics"].set_index("metric")["value"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in t.items() if pd.notna(v))
    print(f"{len(result['pred'])} images evaluated ({result['scored_with']}), {len(result['skipped'])} skipped; "
          f"{shown}\n"
          f"written to {result['out']}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ every run (05_compare)
COMPARED = ["auc", "malignancy_auc", "sensitivity", "specificity"]


def _folders(runs, profile: str | None, names: Iterable[str] | None) -> list[Path]:
    """``runs`` itself when it is a list of run folders; else every run under that reports folder, found by the
    project's one run discovery (``report.find_runs``: profile and names as 05_compare's)."""
    if isinstance(runs, (str, os.PathLike)):
        found = R.find_runs(Path(runs), profile, names=list(names) if names is not None else None, load=False)
        return [r["folder"] for r in found.values()]
    return [Path(r) for r in runs]


def score_runs(runs, external_dir, out_dir, profile: str | None = None, names=None, positive: str | None = None,
               label_column: str | None = None, n_boot: int = 1000, seed: int = 0, device="auto",
               batch_size: int = 64) -> dict:
    """Score every run (see ``_folders``) on ``external_dir`` (``images/`` + ``labels.csv``).

    Writes ``out_dir/<run>/`` (the CLI's files for each run), ``comparison.csv`` (external metrics beside each run's
    internal test metrics), ``roc.png`` (every run's ROC on the external set) and ``external.md``, all in one move.
    Runs whose checkpoint is missing (models/ is not in git) or unloadable are listed and skipped; none left is an
    error.
    Returns dict(table, display, figures={"roc": path}, results, skipped_runs, out, summary_line).
    """
    external_dir = Path(external_dir)
    images, labels_csv = external_dir / "images", external_dir / "labels.csv"
    if not images.is_dir() or not labels_csv.is_file():
        found = sorted(p.name for p in external_dir.iterdir()) if external_dir.is_dir() else "no such folder"
        raise ExternalError(f"{external_dir} must hold images/ and labels.csv (found: {found})")
    folders = _folders(runs, profile, names)
    if not folders:
        raise ExternalError(f"no runs{f' of profile {profile!r}' if profile else ''} under {runs}")
    lab, matched, skipped, notes = validate(images, labels_csv, out_dir, label_column)
    metadata = external_metadata(labels_csv, images)
    results, skipped_runs, internal = {}, [], {}
    for folder in folders:
        info = json.loads((folder / "run.json").read_text())
        name = info.get("run_name", folder.name)
        try:
            ckpt = checkpoint_path(folder)
            model, meta = load(ckpt, device)
        except ExternalError as e:
            skipped_runs.append((name, str(e)))
            continue
        meta = {**meta, "run_name": meta.get("run_name", name)}
        image_only = not info.get("uses_metadata")  # an image run shares its checkpoint with its fused twin
        try:
            res = evaluate(model, meta, lab, matched, positive, n_boot, seed, batch_size, metadata=metadata,
                           image_only=image_only)
        except ExternalError as e:  # e.g. a metadata model on a set without age, sex and site
            skipped_runs.append((name, str(e)))
            continue
        res["skipped"] = skipped + res["skipped"]
        res["given"] = dict(checkpoint=str(ckpt), images=str(images), labels=str(labels_csv), notes=notes)
        results[name] = res
        mfile = folder / "metrics.csv"
        internal[name] = pd.read_csv(mfile).set_index("metric") if mfile.exists() else pd.DataFrame()
        del model
    if not results:
        raise ExternalError("no run could be scored: " + "; ".join(f"{n}: {r}" for n, r in skipped_runs))

    first = next(iter(results.values()))
    external_only = ([f"auc_{positive}"] if positive else []) + ["oracle_specificity"]
    rows, shown = {}, {}
    for name, res in results.items():
        ext = res["metrics"].set_index("metric")
        row, disp = {"external images": len(res["pred"])}, {"external images": len(res["pred"])}
        for m in COMPARED + external_only:
            for where, t in (("test", internal[name]), ("external", ext)):
                if where == "test" and m in external_only:
                    continue
                if m in t.index:
                    v, lo, hi = t.loc[m, ["value", "ci_low", "ci_high"]]
                    row[f"{m} ({where})"] = v
                    disp[f"{m} ({where})"] = "–" if pd.isna(v) else (
                        f"{v:.3f}" if pd.isna(lo) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
        rows[name], shown[name] = row, disp
    table, display = pd.DataFrame(rows).T.apply(pd.to_numeric), pd.DataFrame(shown).T
    views = {n: primary_view(r["pred"], r["plan"]) for n, r in results.items()}
    what = next(iter(views.values()))[0]
    try:
        roc = P.roc_overlay({n: v[1] for n, v in views.items()}, {n: v[2] for n, v in views.items()},
                            f"External set {external_dir.name}: {len(first['pred'])} images, {what}")
    except ValueError as e:
        roc, notes = None, notes + [f"roc.png not drawn: {e}"]
    summary_line = (f"External set {external_dir}: {len(first['pred'])} images evaluated, {len(skipped)} label/image "
                    f"mismatches skipped; {len(results)} run(s) scored"
                    + (f", {len(skipped_runs)} skipped (no usable checkpoint)" if skipped_runs else "")
                    + f"; intervals resample {lab.group.removesuffix('_id')}s")

    def write(tmp: Path) -> None:
        for name, res in results.items():
            (tmp / name).mkdir()
            write_result(res, tmp / name, res["given"])
        table.to_csv(tmp / "comparison.csv", float_format="%.4f")
        if roc is not None:
            P.save(roc, tmp / "roc.png")
        lines = [f"# External validation of every run on `{external_dir}`", "", summary_line + ".", "",
                 display.to_markdown(), ""]
        lines += [f"- {n}: not scored ({r})" for n, r in skipped_runs]
        lines += ["", "Per run: `<run>/external.md`. `(test)` columns are the internal HAM10000 test split, "
                  "`(external)` this set; sensitivity and specificity use each run's validation threshold."]
        (tmp / MARKER).write_text("\n".join(lines) + "\n")

    out = write_atomically(out_dir, write)
    return dict(table=table, display=display, figures={"roc": out / "roc.png"} if roc is not None else {},
                results=results, skipped_runs=skipped_runs, out=out, summary_line=summary_line)


if __name__ == "__main__":
    sys.exit(main())
