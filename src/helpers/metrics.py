"""Prediction tables in, numbers out: the metrics, intervals and tests the reports quote.

Everything works on one table per model and split, ``pred`` (one row per image): ``image_id``, ``lesion_id``,
``label`` (true class index), ``pred`` (argmax) and ``p_<class>`` for each class in label order. Keeping every model,
the baselines included, in that one form means every row of a results table goes through the same code.

Uncertainty is estimated by resampling *lesions*, not images: HAM10000 holds several photographs of many lesions,
those images are far from independent, and an image-level bootstrap would report intervals that are too narrow.
Models are compared the same way: paired differences over lesion resamples (``compare_models``), with Holm's
adjustment across the comparisons made. scikit-learn and SciPy compute the metrics; this module chooses and wires
them.

Why one module of this size: every number the reports quote goes through the same lesion-grouped resampling,
so the metrics, the bootstrap, the paired tests, strata and decision curves live together around it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix,
                             log_loss, roc_auc_score, roc_curve)

from .config import SELECT_METRICS  # the one definition: metric name -> higher is better
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
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, val_pred: pd.DataFrame | None = None,
                    target_sensitivity: float = 0.95) -> pd.DataFrame:
    """``summary`` as a table (metric, value, ci_low, ci_high) with lesion-bootstrap intervals for every metric.

    ``pred`` is the test split. Sensitivity and specificity need a malignancy threshold:

    - with ``val_pred`` (the validation predictions; the way to call it), the point estimate uses ``threshold``,
      or when that is None the threshold reaching ``target_sensitivity`` on the whole validation split; and every
      resample re-chooses the threshold on resampled validation lesions before applying it to the resampled test
      lesions, so the interval includes the uncertainty of the threshold itself, not only of the test sample. The
      table then has a ``malignancy_threshold`` row: the chosen threshold and its interval over validation
      resamples.
    - without ``val_pred``, ``threshold`` is held fixed in every resample (narrower than the truth; kept for
      callers that have no validation split).

    All metrics share each resample (one pass, and consistent intervals); a resample where any metric is undefined
    is dropped for all of them. Costs about 25 ms per resample for 7 classes on one CPU core (scikit-learn's input
    checks dominate), i.e. ~25 s at n_boot=1000; use ``bootstrap_ci`` with one metric when that is all you need.
    """
    rechoose = val_pred is not None and has_malignancy_view(classes)
    if not rechoose:
        point = summary(pred, classes, threshold)
        runs = _collect(lambda rows: summary(pred.iloc[rows], classes, threshold),
                        _group_resamples(pred["lesion_id"], n_boot, seed), n_boot)
    else:
        y_val, s_val = malignancy_score(val_pred, classes)
        if threshold is None:
            threshold = threshold_for_sensitivity(y_val, s_val, target_sensitivity)
        point = {**summary(pred, classes, threshold), "malignancy_threshold": float(threshold)}

        def one(rows_pair):
            test_rows, val_rows = rows_pair
            t = threshold_for_sensitivity(y_val[val_rows], s_val[val_rows], target_sensitivity)
            return {**summary(pred.iloc[test_rows], classes, t), "malignancy_threshold": t}

        # val and test hold different lesions: independent draws (seed + 1 so the two streams differ)
        pairs = zip(_group_resamples(pred["lesion_id"], n_boot, seed),
                    _group_resamples(val_pred["lesion_id"], n_boot, seed + 1))
        runs = _collect(one, pairs, n_boot)
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


# Paired lesion-level comparison of models, each possibly trained with several seeds, and the breakdowns by
# stratum. The scoring is written on arrays and vectorised over resamples: a resample of lesions is a vector of
# row multiplicities (how often each image was drawn, from ``_group_resamples``), so B resamples are one B x N
# weight matrix, and each metric is a few matrix operations for all of them at once (AUC by the Mann-Whitney
# formula on weighted tie blocks, recalls by weighted counts). With integer weights every metric equals the same
# metric on the resampled rows exactly; with weights 1 it equals ``macro_auc``, ``balanced_accuracy``,
# ``accuracy`` and friends (tests check both).
PAIRED_METRICS = ("auc", "balanced_accuracy", "accuracy")  # macro AUC first: it is what chose the best model
FAST_METRICS = ("auc", "balanced_accuracy", "accuracy", "malignancy_auc", "sensitivity", "specificity", "ece")


def _resample_weights(groups: pd.Series, n_boot: int, seed: int) -> np.ndarray:
    """B x N multiplicities of the rows in ``_group_resamples``' draws (the same draws, as weights)."""
    n = len(groups)
    return np.array([np.bincount(rows, minlength=n) for rows in _group_resamples(groups, n_boot, seed)],
                    dtype=float).reshape(-1, n)


def _weighted_auc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for the 0/1 ``positive`` rows under each row of weights ``w`` (B x N): ties count half,
    as in ``roc_auc_score``. NaN where a weight row has no positive or no negative case."""
    order = np.argsort(score, kind="stable")
    s, pos = score[order], positive[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie blocks of the sorted scores
    wo = w[:, order]
    pos_b = np.add.reduceat(wo * pos, starts, axis=1)
    neg_b = np.add.reduceat(wo * ~pos, starts, axis=1)
    neg_below = np.cumsum(neg_b, axis=1) - neg_b
    n_pos, n_neg = pos_b.sum(axis=1), neg_b.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_b * (neg_below + 0.5 * neg_b)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _weighted_scores(y: np.ndarray, y_hat: np.ndarray, probs: np.ndarray, n_classes: int, names: Sequence[str],
                     w: np.ndarray, auc_cols: Sequence[int] | None = None, malignant: Sequence[int] | None = None,
                     threshold: float | None = None) -> np.ndarray:
    """B x len(names) scores, one row per weight row of ``w`` (B x N); NaN where a metric is undefined.

    ``names`` from ``FAST_METRICS`` or ``recall_<k>`` (recall of class k). ``auc`` is the macro one-vs-rest AUC
    over ``auc_cols`` (default: every class; for two classes the second); balanced accuracy the mean recall over
    the classes present; the malignancy metrics use the summed probabilities of the ``malignant`` columns,
    sensitivity/specificity at ``score >= threshold``; ece the top-label ECE over 15 bins."""
    y, y_hat = np.asarray(y), np.asarray(y_hat)
    onehot = np.eye(n_classes, dtype=float)[y]  # N x C
    correct = (y == y_hat).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        support, hits = w @ onehot, w @ (onehot * correct[:, None])
        recall = hits / support
    total = w.sum(axis=1)
    out = []
    for name in names:
        with np.errstate(invalid="ignore", divide="ignore"):
            if name == "auc":
                cols = ([1] if n_classes == 2 else list(range(n_classes))) if auc_cols is None else list(auc_cols)
                out.append(np.mean([_weighted_auc(y == k, probs[:, k], w) for k in cols], axis=0) if cols
                           else np.full(len(w), np.nan))
            elif name == "accuracy":
                out.append(w @ correct / total)
            elif name == "balanced_accuracy":
                present = support > 0
                out.append(np.where(present, recall, 0).sum(axis=1) / present.sum(axis=1))
            elif name.startswith("recall_"):
                out.append(recall[:, int(name.split("_", 1)[1])])
            elif name == "ece":
                n_bins = 15
                confidence = probs.max(axis=1)
                bins = np.eye(n_bins)[np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)]
                count, conf = w @ bins, w @ (bins * confidence[:, None])
                out.append(np.abs(w @ (bins * correct[:, None]) - conf).sum(axis=1) / count.sum(axis=1))
            elif name in ("malignancy_auc", "sensitivity", "specificity"):
                if malignant is None:
                    out.append(np.full(len(w), np.nan))
                    continue
                y_mal, score = np.isin(y, malignant), probs[:, malignant].sum(axis=1)
                if name == "malignancy_auc":
                    out.append(_weighted_auc(y_mal, score, w))
                elif threshold is None or pd.isna(threshold):
                    out.append(np.full(len(w), np.nan))
                else:
                    cases = (y_mal if name == "sensitivity" else ~y_mal).astype(float)
                    agree = ((score >= threshold) == (name == "sensitivity")).astype(float)
                    out.append(w @ (cases * agree) / (w @ cases))
            else:
                raise ValueError(f"unknown metric {name!r}; choose from {FAST_METRICS} or recall_<class index>")
    return np.stack(out, axis=1) if out else np.zeros((len(w), 0))


def _fast_scores(y: np.ndarray, y_hat: np.ndarray, probs: np.ndarray, n_classes: int, names: Sequence[str],
                 auc_cols: Sequence[int] | None = None, malignant: Sequence[int] | None = None,
                 threshold: float | None = None, undefined: str = "raise") -> list[float]:
    """``_weighted_scores`` of one sample (every weight 1): the metrics ``names`` as floats. An undefined metric
    (a class absent) raises ValueError, or with ``undefined="nan"`` is NaN."""
    values = _weighted_scores(y, y_hat, probs, n_classes, names, np.ones((1, len(y))), auc_cols, malignant,
                              threshold)[0]
    if undefined != "nan" and np.isnan(values).any():
        raise ValueError(f"metric(s) {[n for n, v in zip(names, values) if np.isnan(v)]} undefined on this sample "
                         "(a class with no positive or no negative case)")
    return [float(v) for v in values]


def malignant_columns(classes: Sequence[str]) -> list[int] | None:
    """Column indices whose probabilities add up to the malignancy score; None without a malignancy view."""
    classes = tuple(classes)
    if classes == BINARY_CLASSES:
        return [1]
    return [classes.index(c) for c in MALIGNANT] if has_malignancy_view(classes) else None


def bootstrap_p_value(diffs, point: float) -> float:
    """Two-sided bootstrap p-value of a difference: twice the share of resampled differences on the other side of
    0 from the point estimate (0 itself counts as the other side), at least 1/(n+1) and at most 1.

    It agrees with the percentile interval: p < alpha about when the (1 - alpha) interval excludes 0.
    """
    diffs = np.asarray(diffs, dtype=float)
    if point == 0 or not len(diffs):
        return 1.0
    other_side = np.mean(diffs <= 0) if point > 0 else np.mean(diffs >= 0)
    return float(min(1.0, max(2 * other_side, 1 / (len(diffs) + 1))))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment: the k-th smallest of m p-values is multiplied by (m - k + 1), running maxima
    keep the order, capped at 1. Controls the family-wise error rate over all the tests passed in."""
    p = np.asarray(p_values, dtype=float)
    if np.isnan(p).any() or ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must be in [0, 1], got {p}")
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def compare_models(models: Mapping[str, Sequence[pd.DataFrame]], classes: Sequence[str], reference: str,
                   metrics: Sequence[str] = PAIRED_METRICS, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                   group: str = "lesion_id", resample_seeds: bool = True) -> pd.DataFrame:
    """Paired lesion-bootstrap differences ``reference - other`` for every other model and metric, with Holm.

    ``models`` maps a model name to its test prediction tables, one per training seed (all on the same images;
    rows are aligned on ``image_id``). Per resample:

    1. one draw of lesions with replacement (all images of a drawn lesion come along), shared by every run of
       every model, so the comparison is paired and correlated photographs are not counted as independent;
    2. each model's seeds are drawn with replacement (a model with one seed keeps its one run), and the model's
       score is the mean of the metric over the drawn seeds;
    3. the difference is the reference model's score minus the other's.

    Step 2 is the choice for training-seed noise: averaging the metric (not the probabilities, which would score a
    seed ensemble instead of the models as trained) over seeds, and resampling the seeds, lets lesion noise and
    seed noise both enter the interval. With few seeds the seed part is underestimated (a bootstrap of k values has
    variance (k - 1) / k of the usual estimate) and with one seed per model it is absent: the interval then covers
    test-set sampling only. ``resample_seeds=False`` keeps every seed in every resample (lesion noise only).

    The point difference uses all seeds and all lesions. The p-value is ``bootstrap_p_value``; ``p_holm`` adjusts
    it with ``holm`` over every row of the table (all other models x all metrics): the comparisons made.
    Resamples where a metric is undefined (a class absent) are dropped for all (see ``_collect``).

    Returns one row per (other model, metric): reference, other, metric, difference, ci_low, ci_high, p_value,
    p_holm, n_boot (resamples used), seeds_reference, seeds_other (counts).
    """
    if reference not in models:
        raise KeyError(f"reference model {reference!r} not among {list(models)}")
    if any(not len(tables) for tables in models.values()):
        raise ValueError("every model needs at least one prediction table")
    names = list(models)
    runs = [(name, table) for name in names for table in models[name]]
    base = runs[0][1].reset_index(drop=True)
    aligned = [_paired(base, table)[1] for _, table in runs]  # every run in the first table's row order
    y = base["label"].to_numpy()
    arrays = [(t["pred"].to_numpy(), prob_matrix(t, classes)) for t in aligned]
    n_classes = len(classes)

    point_runs = np.array([_fast_scores(y, y_hat, probs, n_classes, metrics) for y_hat, probs in arrays])
    w = _resample_weights(base[group], n_boot, seed)
    boot = np.stack([_weighted_scores(y, y_hat, probs, n_classes, metrics, w) for y_hat, probs in arrays],
                    axis=1).reshape(len(w), len(arrays), len(metrics))  # B x runs x metrics
    defined = ~np.isnan(boot).any(axis=(1, 2))  # as ``_collect``: a resample undefined for one is dropped for all
    if (~defined).sum() > n_boot / 2:
        raise ValueError(f"a metric was undefined on {(~defined).sum()} of {n_boot} bootstrap resamples; too few "
                         "lesions of some class for an interval")
    boot = boot[defined]
    n_used = len(boot)
    positions = {name: np.array([i for i, (n, _) in enumerate(runs) if n == name]) for name in names}
    rng = np.random.default_rng(seed + 1)

    def model_scores(name):
        pos = positions[name]
        draws = rng.integers(0, len(pos), (n_used, len(pos))) if resample_seeds else \
            np.broadcast_to(np.arange(len(pos)), (n_used, len(pos)))
        return point_runs[pos].mean(axis=0), boot[np.arange(n_used)[:, None], pos[draws]].mean(axis=1)

    ref_point, ref_boot = model_scores(reference)
    rows = []
    for name in names:
        if name == reference:
            continue
        point, values = model_scores(name)
        for k, metric in enumerate(metrics):
            d, diffs = float(ref_point[k] - point[k]), ref_boot[:, k] - values[:, k]
            low, high = _percentiles(diffs, alpha)
            rows.append(dict(reference=reference, other=name, metric=metric, difference=d, ci_low=low, ci_high=high,
                             p_value=bootstrap_p_value(diffs, d), n_boot=n_used,
                             seeds_reference=len(positions[reference]), seeds_other=len(positions[name])))
    table = pd.DataFrame(rows, columns=["reference", "other", "metric", "difference", "ci_low", "ci_high", "p_value",
                                        "p_holm", "n_boot", "seeds_reference", "seeds_other"])
    if len(table):
        table["p_holm"] = holm(table["p_value"])
    return table


# ---------------------------------------------------------------------------------------------- model selection
def validation_score(val_pred: pd.DataFrame, classes: Sequence[str], select_metric: str = "val_auc") -> float:
    """A run's validation score by the profile's selection metric, from its saved validation predictions.

    The same definitions as ``evaluate.val_scores`` (which picks each run's epoch during training): val_auc is
    macro one-vs-rest AUC, val_bal_acc balanced accuracy, val_acc accuracy, val_loss the mean negative log
    probability of the true class (lower is better; see ``SELECT_METRICS``). NaN where undefined (a class absent).
    """
    if select_metric not in SELECT_METRICS:
        raise ValueError(f"select_metric {select_metric!r}; allowed: {tuple(SELECT_METRICS)}")
    if select_metric == "val_loss":
        probs, y = prob_matrix(val_pred, classes), val_pred["label"].to_numpy()
        return float(-np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12)))
    fn = {"val_auc": lambda p: macro_auc(p, classes), "val_bal_acc": balanced_accuracy, "val_acc": accuracy}
    try:
        return fn[select_metric](val_pred)
    except ValueError:
        return float("nan")


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


# --------------------------------------------------------------------------------------------- decision rules
ARGMAX = "argmax"  # the rule every model is compared under: the class with the highest probability


def argmax_predictions(pred: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """The table with ``pred`` replaced by the plain argmax of its probabilities.

    A run's saved ``pred`` is its recipe's own rule (the argmax after a logit adjustment where the recipe uses
    one); comparing two recipes' saved ``pred`` would compare two rules as if they were one. The ISIC 2018 Task 3
    metric (balanced accuracy) is defined on the plain argmax."""
    out = pred.copy()
    out["pred"] = prob_matrix(pred, classes).argmax(axis=1)
    return out


# ------------------------------------------------------------------------------------------ unit of analysis
def lesion_level(pred: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per lesion: the mean probability over the lesion's images, its label, the argmax of the mean.

    ``image_id`` becomes the lesion id (so the table goes through the same metric code) and ``n_images`` counts the
    lesion's images. An error when one lesion's images disagree on the label."""
    labels = pred.groupby("lesion_id", sort=True)["label"].agg(["min", "max", "size"])
    if (labels["min"] != labels["max"]).any():
        bad = labels.index[labels["min"] != labels["max"]].tolist()[:5]
        raise ValueError(f"lesion(s) {bad} have images with different labels; a lesion needs one label")
    cols = [f"p_{c}" for c in classes]
    probs = pred.groupby("lesion_id", sort=True)[cols].mean()
    out = pd.DataFrame({"image_id": probs.index, "lesion_id": probs.index, "label": labels["min"].to_numpy(),
                        "n_images": labels["size"].to_numpy()})
    p = probs.to_numpy()
    out["pred"] = p.argmax(axis=1)
    for k, c in enumerate(cols):
        out[c] = p[:, k]
    return out.reset_index(drop=True)


def within_lesion_disagreement(pred: pd.DataFrame, classes: Sequence[str],
                               threshold: float | None = None) -> dict[str, float]:
    """Among lesions with two or more images: how many there are, the share whose images disagree on the top-1
    class (the table's ``pred``: pass ``argmax_predictions`` for the plain argmax), and (given a malignancy
    threshold) the share whose images disagree on the refer decision (malignancy score >= threshold)."""
    probs = prob_matrix(pred, classes)
    frame = pd.DataFrame({"lesion": pred["lesion_id"].to_numpy(), "top1": pred["pred"].to_numpy()})
    mal = malignant_columns(classes)
    if threshold is not None and mal is not None and not pd.isna(threshold):
        frame["refer"] = probs[:, mal].sum(axis=1) >= threshold
    g = frame.groupby("lesion")
    multi = g.size() > 1
    n_multi = int(multi.sum())
    out = {"multi_image_lesions": n_multi,
           "top1_disagreement": float((g["top1"].nunique()[multi] > 1).mean()) if n_multi else np.nan}
    out["refer_disagreement"] = (float((g["refer"].nunique()[multi] > 1).mean()) if n_multi and "refer" in frame
                                 else np.nan)
    return out


# ------------------------------------------------------------------------------------------------- subgroups
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, np.inf, ">=75"))
UNKNOWN = "unknown"


def age_band(age) -> pd.Series:
    """Age in years -> "<30", "30-44", "45-59", "60-74", ">=75", or "unknown" (missing or not a number)."""
    age = pd.to_numeric(pd.Series(age), errors="coerce")
    out = pd.Series(UNKNOWN, index=age.index, dtype=object)
    for low, high, name in AGE_BANDS:
        out[(age >= low) & (age < high)] = name
    return out


def clean_category(values) -> pd.Series:
    """Lower-case labels, with NaN, empty and "unknown" as "unknown"."""
    v = pd.Series(values).astype(object)
    text = v.astype(str).str.strip().str.lower()
    return text.where(v.notna() & ~text.isin(["", "nan", "none", UNKNOWN]), UNKNOWN)


def subgroup_levels(df: pd.DataFrame, variable: str, min_images: int = 50) -> pd.Series:
    """The subgroup of every row for ``variable``: ``sex`` (as recorded, "unknown" when missing), ``age`` (see
    ``age_band``) or ``site`` (``localization``; sites with fewer than ``min_images`` rows in ``df`` pooled as
    "other"; "unknown" kept apart)."""
    if variable == "age":
        return age_band(df["age"])
    if variable == "sex":
        return clean_category(df["sex"])
    if variable == "site":
        site = clean_category(df["localization"])
        counts = site.value_counts()
        small = [s for s in counts.index if counts[s] < min_images and s != UNKNOWN]
        return site.where(~site.isin(small), "other")
    raise ValueError(f"unknown subgroup variable {variable!r}; choose from age, sex, site")


# ------------------------------------------------------------------------------------- strata with intervals
BREAKDOWN_METRICS = ("balanced_accuracy", "auc", "malignancy_auc", "sensitivity", "specificity")


def _nan_percentiles(values: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column over the defined (non-NaN) resamples; NaN where fewer than half are defined
    (a metric that is mostly undefined on this data has no meaningful interval)."""
    low, high = np.full(values.shape[1:], np.nan), np.full(values.shape[1:], np.nan)
    for idx in np.ndindex(values.shape[1:]):
        v = values[(slice(None), *idx)]
        v = v[~np.isnan(v)]
        if len(v) >= len(values) / 2 and len(v):
            low[idx], high[idx] = _percentiles(v, alpha)
    return low, high


def auc_classes(labels: np.ndarray, groups: np.ndarray, n_classes: int, min_positives: int = 5) -> list[int]:
    """The classes with at least ``min_positives`` positive lesions (distinct ``groups``) and at least one negative
    row: the classes a stratum's macro AUC averages over."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    out = []
    for k in range(n_classes):
        pos = labels == k
        if len(np.unique(groups[pos])) >= min_positives and (~pos).any():
            out.append(k)
    return out


def breakdown(preds: Mapping[str, pd.DataFrame], classes: Sequence[str], levels: pd.Series | None = None,
              thresholds: Mapping[str, float | None] | None = None, metrics: Sequence[str] = BREAKDOWN_METRICS,
              n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, min_positives: int = 5,
              group: str = "lesion_id") -> pd.DataFrame:
    """Every model's metrics in every stratum, with lesion-bootstrap intervals and the stratum's counts.

    ``preds`` maps a model to its prediction table (all on the same images; aligned on ``image_id``). ``levels``
    gives each image's stratum, indexed by ``image_id`` (NaN: in no stratum); None: one stratum, "all". Within a
    stratum every resample draws its lesions with replacement once, shared by all models (paired), so strata are
    resampled separately with their own size held fixed. ``thresholds`` maps a model to its malignancy threshold
    (chosen on validation; held fixed here). ``auc`` is the macro AUC over the classes with at least
    ``min_positives`` positive lesions in the stratum (named in ``auc_classes``); an undefined metric (no malignant
    case, say) is NaN, and its interval NaN when it is undefined in more than half of the resamples.

    Returns one row per (stratum, model): stratum, model, n_images, n_lesions, n_malignant (lesions),
    n_malignant_images, auc_classes, then ``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high`` per metric.
    """
    names = list(preds)
    if not names:
        raise ValueError("breakdown needs at least one prediction table")
    base = preds[names[0]].reset_index(drop=True)
    aligned = [base] + [_paired(base, preds[n])[1] for n in names[1:]]
    y, lesions = base["label"].to_numpy(), base[group].to_numpy()
    arrays = [(t["pred"].to_numpy(), prob_matrix(t, classes)) for t in aligned]
    thresholds = dict(thresholds or {})
    n_classes, mal = len(classes), malignant_columns(classes)
    if levels is None:
        stratum = pd.Series("all", index=base.index, dtype=object)
    else:
        levels = pd.Series(levels)
        missing = set(base["image_id"]) - set(levels.index)
        if missing:
            raise KeyError(f"levels lack {len(missing)} image(s), e.g. {sorted(missing)[:3]}")
        stratum = pd.Series(levels.loc[base["image_id"]].to_numpy(), index=base.index)
    order = list(dict.fromkeys(stratum.dropna()))
    rows = []
    for s in order:
        at = np.flatnonzero((stratum == s).to_numpy())
        ys, gs = y[at], lesions[at]
        cols = auc_classes(ys, gs, n_classes, min_positives)
        y_mal = np.isin(ys, mal) if mal is not None else np.zeros(len(ys), bool)

        w = np.vstack([np.ones((1, len(at))), _resample_weights(pd.Series(gs), n_boot, seed)])  # point + resamples
        scores = np.stack([_weighted_scores(ys, y_hat[at], probs[at], n_classes, metrics, w, auc_cols=cols,
                                            malignant=mal, threshold=thresholds.get(name))
                           for name, (y_hat, probs) in zip(names, arrays)], axis=1)  # (1 + B) x models x metrics
        point, boot = scores[0], scores[1:]
        low, high = _nan_percentiles(boot, alpha) if n_boot else (np.full_like(point, np.nan),) * 2
        counts = dict(n_images=len(at), n_lesions=len(np.unique(gs)), n_malignant=len(np.unique(gs[y_mal])),
                      n_malignant_images=int(y_mal.sum()), auc_classes=" ".join(classes[k] for k in cols) or "–")
        for i, name in enumerate(names):
            row = dict(stratum=s, model=name, **counts)
            for k, m in enumerate(metrics):
                row.update({m: point[i, k], f"{m}_ci_low": low[i, k], f"{m}_ci_high": high[i, k]})
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- decision curve
def net_benefit(y_true, score, thresholds) -> np.ndarray:
    """Net benefit of referring when ``score >= pt``, at each threshold probability pt:
    TP/n - FP/n * pt / (1 - pt) (Vickers & Elkin 2006)."""
    y, score, pt = np.asarray(y_true).astype(bool), np.asarray(score, dtype=float), np.asarray(thresholds, float)
    if ((pt <= 0) | (pt >= 1)).any():
        raise ValueError("threshold probabilities must lie strictly between 0 and 1")
    refer = score[:, None] >= pt[None, :]
    n = len(y)
    tp, fp = (refer & y[:, None]).sum(axis=0), (refer & ~y[:, None]).sum(axis=0)
    return tp / n - fp / n * pt / (1 - pt)


DECISION_THRESHOLDS = np.round(np.arange(0.01, 0.505, 0.01), 2)  # 1% to 50%


def decision_curve(pred: pd.DataFrame, classes: Sequence[str], thresholds=DECISION_THRESHOLDS, n_boot: int = 1000,
                   seed: int = 0, alpha: float = 0.05, group: str = "lesion_id") -> pd.DataFrame:
    """Net benefit of referring on the malignancy score, with a lesion-bootstrap interval, beside the two default
    strategies: refer everyone (``refer_all``: prevalence - (1 - prevalence) pt / (1 - pt)) and refer no one (0).

    The score is read as a probability of malignancy: a model whose scores are not calibrated is penalised here,
    which is the point of a decision curve."""
    y, score = malignancy_score(pred, classes)
    pt = np.asarray(thresholds, dtype=float)
    nb = net_benefit(y, score, pt)
    w = _resample_weights(pred[group], n_boot, seed)
    refer = score[:, None] >= pt[None, :]
    boot = (w @ (refer & (y[:, None] == 1)) - w @ (refer & (y[:, None] == 0)) * pt / (1 - pt)) / w.sum(axis=1)[:, None]
    low, high = _nan_percentiles(boot, alpha) if n_boot else (np.full(len(pt), np.nan),) * 2
    prevalence = y.mean()
    return pd.DataFrame({"threshold": pt, "net_benefit": nb, "ci_low": low, "ci_high": high,
                         "refer_all": prevalence - (1 - prevalence) * pt / (1 - pt), "refer_none": 0.0})


# -------------------------------------------------------------------------------------- the metadata baseline
METADATA_BASELINE = "metadata only (age, sex, site)"


def metadata_baseline(split: pd.DataFrame, classes: Sequence[str], C: float | None = None) -> dict:
    """A logistic regression on age, sex and site alone (``clinical.MetadataModel``): coefficients fitted on the
    training rows of ``split``, the regularisation C chosen on the validation rows (or given as ``C``: then the
    validation labels play no part at all), test labels never passed in. Missing values have explicit indicators.

    Returns dict(model, C, sweep, val, test, threshold): ``val`` / ``test`` are prediction tables in the project's
    form (``pred`` the argmax), ``threshold`` the malignancy threshold chosen on validation for 95% sensitivity.
    """
    from threadpoolctl import threadpool_limits

    from .clinical import C_GRID, MetadataModel

    train, val, test = (split[split["split"] == s].reset_index(drop=True) for s in ("train", "val", "test"))
    with threadpool_limits(1):  # a small problem: threaded BLAS on a shared 2-core machine is 100x slower here
        model, sweep = MetadataModel.fit(train, val, len(classes), grid=C_GRID if C is None else (C,))

    def table(df):
        probs = model.predict_proba(df)
        out = df[["image_id", "lesion_id", "label"]].copy()
        out["pred"] = probs.argmax(axis=1)
        for k, c in enumerate(classes):
            out[f"p_{c}"] = probs[:, k]
        return out

    val_pred, test_pred = table(val), table(test)
    threshold = (threshold_for_sensitivity(*malignancy_score(val_pred, classes), target=0.95)
                 if has_malignancy_view(classes) else None)
    return dict(model=model, C=model.C, sweep=pd.DataFrame(sweep), val=val_pred, test=test_pred, threshold=threshold)
