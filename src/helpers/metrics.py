"""Prediction tables in, numbers out: the metrics, intervals and tests the reports quote.

Everything works on one table per model and split, ``pred`` (one row per image): ``image_id``, ``lesion_id``,
``label`` (true class index), ``pred`` (argmax) and ``p_<class>`` for each class in label order. Keeping every model,
the baselines included, in that one form means every row of a results table goes through the same code.

Uncertainty is estimated by resampling *lesions*, not images: HAM10000 holds several photographs of many lesions,
those images are far from independent, and an image-level bootstrap would report intervals that are too narrow.
scikit-learn and SciPy compute the metrics and tests themselves; this module only chooses and wires them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix,
                             log_loss, roc_auc_score, roc_curve)

from .data import BINARY_CLASSES, MALIGNANT  # the diagnoses the malignancy view adds up


# ------------------------------------------------------------------------------------------------ reading a table
def prob_matrix(pred: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The N x C probability matrix from the ``p_<class>`` columns, in the order of ``classes``.

    Rows are renormalised: probabilities saved to CSV with a few decimals sum to 1 only to that precision."""
    cols = [f"p_{c}" for c in classes]
    missing = [c for c in cols if c not in pred.columns]
    if missing:
        raise KeyError(f"prediction table lacks column(s) {missing}; has {list(pred.columns)}")
    probs = pred[cols].to_numpy(dtype=float)
    return probs / probs.sum(axis=1, keepdims=True)


def has_malignancy_view(classes: Sequence[str]) -> bool:
    """True for the binary benign/malignant task and for any class set that contains all malignant diagnoses."""
    return tuple(classes) == BINARY_CLASSES or set(MALIGNANT) <= set(classes)


def malignancy_score(pred: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(y_true 0/1, score): is the lesion malignant, and the model's probability that it is.

    For the 7 diagnoses the score is p_mel + p_bcc + p_akiec, so the 7-class and the binary model can be compared
    on the same clinical question (refer or not).
    """
    classes = tuple(classes)
    if classes == BINARY_CLASSES:
        return (pred["label"].to_numpy() == 1).astype(int), pred["p_malignant"].to_numpy(dtype=float)
    if not has_malignancy_view(classes):
        raise ValueError(f"classes {classes} do not contain all malignant diagnoses {MALIGNANT}")
    malignant_idx = [classes.index(c) for c in MALIGNANT]
    y = np.isin(pred["label"].to_numpy(), malignant_idx).astype(int)
    return y, pred[[f"p_{c}" for c in MALIGNANT]].to_numpy(dtype=float).sum(axis=1)


# ---------------------------------------------------------------------------------------------------- headline
# One function per metric, each taking a prediction table, so any of them can be handed to ``bootstrap_ci`` or
# ``paired_bootstrap_diff`` directly (``functools.partial(macro_auc, classes=classes)`` for those needing classes).
def accuracy(pred: pd.DataFrame) -> float:
    return float(accuracy_score(pred["label"].to_numpy(), pred["pred"].to_numpy()))


def balanced_accuracy(pred: pd.DataFrame) -> float:
    """Mean per-class recall: on HAM10000, where 2 of 3 images are nevi, plain accuracy rewards ignoring the rest."""
    return float(balanced_accuracy_score(pred["label"].to_numpy(), pred["pred"].to_numpy()))


def _require_both_outcomes(y_binary: np.ndarray, what: str) -> None:
    """ROC AUC needs positives and negatives. Recent scikit-learn (1.9 here) warns and returns NaN where older
    versions raised; raising here keeps one contract across versions (``bootstrap_ci`` skips on ValueError)."""
    if y_binary.all() or not y_binary.any():
        raise ValueError(f"AUC undefined: {what} has {'no' if not y_binary.any() else 'only'} positive cases")


def macro_auc(pred: pd.DataFrame, classes: Sequence[str]) -> float:
    """Macro one-vs-rest ROC AUC; for two classes the plain AUC of the second (positive) class."""
    y, probs = pred["label"].to_numpy(), prob_matrix(pred, classes)
    for k, c in enumerate(classes):
        _require_both_outcomes(y == k, f"class {c!r}")
    if len(classes) == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=np.arange(len(classes))))


def malignancy_auc(pred: pd.DataFrame, classes: Sequence[str]) -> float:
    """ROC AUC of the malignancy score (see ``malignancy_score``) for malignant vs benign."""
    y, score = malignancy_score(pred, classes)
    _require_both_outcomes(y, "malignancy")
    return float(roc_auc_score(y, score))


def sensitivity_specificity(y_true: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity when ``score >= threshold`` counts as positive."""
    y_true, positive = np.asarray(y_true).astype(bool), np.asarray(score) >= threshold
    if y_true.all() or not y_true.any():
        raise ValueError("sensitivity and specificity need both positive and negative cases")
    return float(positive[y_true].mean()), float((~positive[~y_true]).mean())


def summary(pred: pd.DataFrame, classes: Sequence[str], threshold: float | None = None) -> dict[str, float]:
    """Headline metrics of one model on one split.

    accuracy, balanced_accuracy (mean per-class recall), auc (see ``macro_auc``), log_loss, ece; plus, when the
    classes have a malignancy view, malignancy_auc and (given a threshold chosen on validation) sensitivity and
    specificity. Raises ValueError when a metric is undefined (e.g. a class absent from the labels for AUC).
    """
    y, probs = pred["label"].to_numpy(), prob_matrix(pred, classes)
    out = {
        "accuracy": accuracy(pred),
        "balanced_accuracy": balanced_accuracy(pred),
        "auc": macro_auc(pred, classes),
        "log_loss": float(log_loss(y, probs, labels=np.arange(len(classes)))),
        "ece": expected_calibration_error(probs, y),
    }
    if has_malignancy_view(classes):
        out["malignancy_auc"] = malignancy_auc(pred, classes)
        if threshold is not None:
            out["sensitivity"], out["specificity"] = sensitivity_specificity(*malignancy_score(pred, classes),
                                                                             threshold)
    return out


def threshold_for_sensitivity(y_true: np.ndarray, score: np.ndarray, target: float = 0.95) -> float:
    """The highest threshold t whose sensitivity (``score >= t`` is positive) is at least ``target``.

    The highest such t gives the best specificity at that sensitivity. Choose it on validation predictions and
    apply it unchanged to test; choosing it on test would overstate the specificity.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], not {target}")
    y_true = np.asarray(y_true)
    if not y_true.any():
        raise ValueError("no positive cases: sensitivity is undefined")
    _, tpr, thresholds = roc_curve(y_true, score, drop_intermediate=False)  # thresholds decreasing, tpr rising
    return float(thresholds[np.argmax(tpr >= target - 1e-12)])


# ------------------------------------------------------------------------------------------------- calibration
def _calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int):
    """Per equal-width bin of top-label confidence: count, mean confidence, accuracy (NaN where a bin is empty)."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    # bins are (lo, hi]; a confidence of exactly 0 (impossible for a probability row) would join the first bin
    bin_idx = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bin_idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bin_idx, confidence, minlength=n_bins) / count
        accuracy = np.bincount(bin_idx, correct, minlength=n_bins) / count
    return count, mean_conf, accuracy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the count-weighted mean gap |accuracy - confidence| over equal-width confidence bins."""
    count, mean_conf, accuracy = _calibration_bins(probs, labels, n_bins)
    filled = count > 0
    return float(np.sum(count[filled] * np.abs(accuracy[filled] - mean_conf[filled])) / count.sum())


def reliability_table(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """One row per confidence bin: bin, lower, upper, confidence (mean), accuracy, count; empty bins hold NaN."""
    count, mean_conf, accuracy = _calibration_bins(probs, labels, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    return pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:],
                         "confidence": mean_conf, "accuracy": accuracy, "count": count})


# --------------------------------------------------------------------------------------------------- bootstrap
def _group_resamples(groups: pd.Series, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row positions of ``n_boot`` resamples that draw whole groups (lesions) with replacement."""
    codes, uniques = pd.factorize(groups)
    order = np.argsort(codes, kind="stable")  # rows grouped by lesion
    sizes = np.bincount(codes, minlength=len(uniques))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = rng.integers(0, len(uniques), len(uniques))
        n = sizes[drawn]
        # position k of the output takes the (k - first output position of its lesion)-th row of that lesion
        offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        yield order[np.repeat(starts[drawn], n) + offsets]


def _collect(fn: Callable[[np.ndarray], object], resamples: Iterator[np.ndarray], n_boot: int) -> list:
    """``fn`` on each resample, skipping those where it raises ValueError (a class missing, say); too many skipped
    means the metric is not meaningful on this data, so that is an error rather than a quietly short bootstrap."""
    values, last_error = [], None
    for rows in resamples:
        try:
            values.append(fn(rows))
        except ValueError as e:
            last_error = e
    skipped = n_boot - len(values)
    if skipped > n_boot / 2:
        raise ValueError(f"the metric failed on {skipped} of {n_boot} bootstrap resamples (last error: "
                         f"{last_error}); too few lesions of some class for an interval")
    return values


def _percentiles(values, alpha: float) -> tuple[float, float]:
    low, high = np.percentile(np.asarray(values, dtype=float), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(pred: pd.DataFrame, metric_fn: Callable[[pd.DataFrame], float], n_boot: int = 1000,
                 seed: int = 0, group: str = "lesion_id", alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, low, high): ``metric_fn`` on ``pred`` and its percentile interval over lesion resamples.

    All images of a drawn lesion come along, so correlated photographs of one lesion are not counted as
    independent evidence. Resamples where ``metric_fn`` raises ValueError are skipped (see ``_collect``).
    """
    values = _collect(lambda rows: metric_fn(pred.iloc[rows]), _group_resamples(pred[group], n_boot, seed), n_boot)
    return (float(metric_fn(pred)), *_percentiles(values, alpha))


def summary_with_ci(pred: pd.DataFrame, classes: Sequence[str], threshold: float | None = None,
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """``summary`` as a table (metric, value, ci_low, ci_high) with lesion-bootstrap intervals for every metric.

    All metrics share each resample (one pass, and consistent intervals); a resample where any metric is undefined
    is dropped for all of them. Costs about 25 ms per resample for 7 classes on one CPU core (scikit-learn's input
    checks dominate), i.e. ~25 s at n_boot=1000; use ``bootstrap_ci`` with one metric when that is all you need.
    """
    point = summary(pred, classes, threshold)
    runs = _collect(lambda rows: summary(pred.iloc[rows], classes, threshold),
                    _group_resamples(pred["lesion_id"], n_boot, seed), n_boot)
    boot = pd.DataFrame(runs)
    rows = [(name, value, *_percentiles(boot[name], alpha)) for name, value in point.items()]
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])


# ------------------------------------------------------------------------------------------------------ tables
def classification_table(pred: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per-class precision, recall, f1 and support, then the macro and weighted averages (scikit-learn's report)."""
    report = classification_report(pred["label"], pred["pred"], labels=np.arange(len(classes)),
                                   target_names=list(classes), output_dict=True, zero_division=0)
    report.pop("accuracy", None)  # a bare number, not a row; ``summary`` reports it
    table = pd.DataFrame(report).T[["precision", "recall", "f1-score", "support"]]
    table = table.rename(columns={"f1-score": "f1"})
    table["support"] = table["support"].astype(int)
    return table


def confusion(pred: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Confusion counts: rows are the true class, columns the predicted class."""
    counts = confusion_matrix(pred["label"], pred["pred"], labels=np.arange(len(classes)))
    return pd.DataFrame(counts, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))


# --------------------------------------------------------------------------------------------- comparing models
def _paired(pred_a: pd.DataFrame, pred_b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables in the same row order by image_id; an error unless they cover exactly the same images."""
    for name, p in (("pred_a", pred_a), ("pred_b", pred_b)):
        if p["image_id"].duplicated().any():
            raise ValueError(f"{name} lists an image more than once")
    ids_a, ids_b = set(pred_a["image_id"]), set(pred_b["image_id"])
    if ids_a != ids_b:
        raise ValueError(f"the two prediction tables cover different images ({len(ids_a - ids_b)} only in pred_a, "
                         f"{len(ids_b - ids_a)} only in pred_b); compare models on the same split")
    b = pred_b.set_index("image_id").loc[pred_a["image_id"]].reset_index()
    if not np.array_equal(pred_a["label"].to_numpy(), b["label"].to_numpy()):
        raise ValueError("the two prediction tables disagree on the true labels of some images")
    return pred_a.reset_index(drop=True), b


def mcnemar(pred_a: pd.DataFrame, pred_b: pd.DataFrame) -> dict:
    """Exact McNemar test on paired correctness: b = images only model A gets right, c = only model B.

    Under "the models are equally accurate", each discordant image is a fair coin, so p is the two-sided binomial
    test of b successes in b + c trials (scipy's exact ``binomtest``).
    """
    a, b = _paired(pred_a, pred_b)
    right_a = (a["pred"] == a["label"]).to_numpy()
    right_b = (b["pred"] == b["label"]).to_numpy()
    n_b, n_c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    p_value = binomtest(n_b, n_b + n_c, 0.5).pvalue if n_b + n_c else 1.0
    return {"b": n_b, "c": n_c, "p_value": float(p_value)}


def paired_bootstrap_diff(pred_a: pd.DataFrame, pred_b: pd.DataFrame, metric_fn: Callable[[pd.DataFrame], float],
                          n_boot: int = 1000, seed: int = 0, group: str = "lesion_id",
                          alpha: float = 0.05) -> tuple[float, float, float]:
    """(diff, low, high) of ``metric_fn(A) - metric_fn(B)``, both models scored on the same lesion resample.

    Pairing removes the variation both models share (which lesions happen to be in the sample), so the interval
    of the difference is much narrower than two separate intervals would suggest.
    """
    a, b = _paired(pred_a, pred_b)
    values = _collect(lambda rows: metric_fn(a.iloc[rows]) - metric_fn(b.iloc[rows]),
                      _group_resamples(a[group], n_boot, seed), n_boot)
    return (float(metric_fn(a) - metric_fn(b)), *_percentiles(values, alpha))


def majority_predictions(test_df: pd.DataFrame, classes: Sequence[str], majority_label: int) -> pd.DataFrame:
    """A prediction table that gives probability 1 to ``majority_label`` for every image.

    Pass the most common label of the TRAINING split (a baseline must not look at test labels). The result goes
    through the same metric code as the models: its accuracy is the majority share, its AUCs are 0.5.
    """
    if not 0 <= majority_label < len(classes):
        raise ValueError(f"majority_label {majority_label} is not a class index for {len(classes)} classes")
    out = test_df[["image_id", "lesion_id", "label"]].reset_index(drop=True).copy()
    out["pred"] = majority_label
    for i, c in enumerate(classes):
        out[f"p_{c}"] = float(i == majority_label)
    return out
