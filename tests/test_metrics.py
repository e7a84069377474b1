"""metrics.py against scikit-learn, SciPy and small cases worked out by hand."""
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

from helpers import metrics as M

DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
BINARY = ("benign", "malignant")


def make_pred(probs, labels, lesions=None, classes=DX, prefix="img"):
    """A prediction table in the project's format; one lesion per image unless ``lesions`` is given."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    n = len(labels)
    pred = pd.DataFrame({"image_id": [f"{prefix}{i}" for i in range(n)],
                         "lesion_id": lesions if lesions is not None else [f"les{i}" for i in range(n)],
                         "label": labels, "pred": probs.argmax(axis=1)})
    for k, c in enumerate(classes):
        pred[f"p_{c}"] = probs[:, k]
    return pred


def random_pred(n=400, classes=DX, seed=0, signal=1.0):
    """Probabilities that carry some information about the label (so AUCs are not all 0.5)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classes), n)
    logits = rng.normal(size=(n, len(classes))) + signal * np.eye(len(classes))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return make_pred(probs, labels, classes=classes)


# ----------------------------------------------------------------------------------------------------- summary
def test_summary_matches_sklearn_seven_classes():
    pred = random_pred()
    probs, y = M.prob_matrix(pred, DX), pred.label.to_numpy()
    s = M.summary(pred, DX)
    assert s["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert s["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert s["log_loss"] == pytest.approx(log_loss(y, probs))
    malignant = np.isin(y, [0, 1, 4])
    assert s["malignancy_auc"] == pytest.approx(roc_auc_score(malignant, probs[:, [0, 1, 4]].sum(1)))
    assert "sensitivity" not in s and "specificity" not in s  # no threshold given


def test_summary_binary_and_threshold():
    pred = random_pred(classes=BINARY, seed=1)
    y, p = pred.label.to_numpy(), pred.p_malignant.to_numpy()
    s = M.summary(pred, BINARY, threshold=0.5)
    assert s["auc"] == pytest.approx(roc_auc_score(y, p)) == pytest.approx(s["malignancy_auc"])
    assert s["sensitivity"] == pytest.approx(np.mean(p[y == 1] >= 0.5))
    assert s["specificity"] == pytest.approx(np.mean(p[y == 0] < 0.5))


def test_no_malignancy_view_for_other_classes():
    classes = ("cat", "dog", "fox")
    s = M.summary(random_pred(classes=classes), classes, threshold=0.5)
    assert "malignancy_auc" not in s and "sensitivity" not in s
    with pytest.raises(ValueError):
        M.malignancy_score(random_pred(classes=classes), classes)


def test_prob_matrix_names_missing_column():
    with pytest.raises(KeyError, match="p_vasc"):
        M.prob_matrix(random_pred().drop(columns="p_vasc"), DX)


# ------------------------------------------------------------------------------------------------- threshold
def test_threshold_for_sensitivity_is_the_highest_that_reaches_target():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.random(300) * 0.6 + 0.4 * y, 2)  # rounded: ties, as real scores have
    t = M.threshold_for_sensitivity(y, score, target=0.95)
    sensitivity = lambda thr: np.mean(score[y == 1] >= thr)
    assert sensitivity(t) >= 0.95
    higher = np.unique(score[score > t])
    assert all(sensitivity(h) < 0.95 for h in higher), "a higher threshold would also reach the target"


def test_threshold_for_sensitivity_hand_case():
    # positives score 0.9, 0.8, 0.7, 0.2: 75% sensitivity needs 3 of 4, so t = 0.7
    y = np.array([1, 1, 1, 1, 0, 0])
    score = np.array([0.9, 0.8, 0.7, 0.2, 0.75, 0.1])
    assert M.threshold_for_sensitivity(y, score, target=0.75) == pytest.approx(0.7)
    assert M.threshold_for_sensitivity(y, score, target=1.0) == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------ calibration
def test_ece_zero_when_each_bin_is_calibrated():
    # 10 images at confidence 0.8 of which 8 right, 10 at 0.6 of which 6 right: accuracy equals confidence
    probs = np.array([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 10)
    labels = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    assert M.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed():
    # bin (0.9, 1.0]: conf 0.95, 0.95, acc 1/2 -> gap 0.45; bin (0.6, 0.7]: conf 0.7, acc 1 -> gap 0.3
    # bin (0.5, 0.6]: conf 0.55, acc 0 -> gap 0.55. ECE = (2 * 0.45 + 0.3 + 0.55) / 4
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1])
    expected = (2 * 0.45 + 0.3 + 0.55) / 4
    assert M.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected)
    table = M.reliability_table(probs, labels, n_bins=10)
    assert list(table.columns[:2]) == ["bin", "lower"] and {"confidence", "accuracy", "count"} <= set(table)
    assert table["count"].sum() == 4 and table.loc[9, "count"] == 2 and table.loc[9, "accuracy"] == 0.5
    assert table.loc[6, "confidence"] == pytest.approx(0.7) and table.loc[0, "count"] == 0


# -------------------------------------------------------------------------------------------------- bootstrap
def lesion_data(n_lesions, images_per_lesion, seed=0):
    """Each lesion's images share one prediction (identical copies): the evidence is n_lesions, not n_images."""
    rng = np.random.default_rng(seed)
    right = rng.random(n_lesions) < 0.7
    labels = np.repeat(rng.integers(0, 2, n_lesions), images_per_lesion)
    correct = np.repeat(right, images_per_lesion)
    p1 = np.where(correct == (labels == 1), 0.8, 0.2)
    lesions = np.repeat([f"les{i}" for i in range(n_lesions)], images_per_lesion)
    return make_pred(np.c_[1 - p1, p1], labels, lesions=lesions, classes=BINARY)


def width(ci):
    return ci[2] - ci[1]


def test_bootstrap_ci_contains_point_and_narrows_with_more_data():
    small, large = lesion_data(50, 1, seed=1), lesion_data(800, 1, seed=1)
    ci_small = M.bootstrap_ci(small, M.accuracy, n_boot=300)
    ci_large = M.bootstrap_ci(large, M.accuracy, n_boot=300)
    for point, low, high in (ci_small, ci_large):
        assert low <= point <= high
    assert width(ci_large) < 0.5 * width(ci_small)


def test_bootstrap_resamples_lesions_not_images():
    # 60 lesions x 10 identical images: lesion resampling sees 60 units, image resampling 600 (~sqrt(10) narrower)
    pred = lesion_data(60, 10, seed=2)
    by_lesion = M.bootstrap_ci(pred, M.accuracy, n_boot=300, seed=0)
    by_image = M.bootstrap_ci(pred, M.accuracy, n_boot=300, seed=0, group="image_id")
    assert by_lesion[0] == by_image[0]
    assert width(by_lesion) > 2 * width(by_image)
    # and it matches the width for 60 one-image lesions with the same outcomes
    one_each = pred.drop_duplicates("lesion_id")
    assert width(by_lesion) == pytest.approx(width(M.bootstrap_ci(one_each, M.accuracy, n_boot=300)), rel=0.3)


def test_bootstrap_keeps_a_lesion_s_images_together():
    pred = lesion_data(20, 3)
    rows_per_lesion = []

    def record(d):
        rows_per_lesion.extend(d.groupby("lesion_id").size())
        return 0.0

    M.bootstrap_ci(pred, record, n_boot=20)
    # a lesion drawn m times brings 3m rows: all of its images, every time
    assert len(rows_per_lesion) > 20 and all(n % 3 == 0 for n in rows_per_lesion)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_bootstrap_survives_a_class_missing_from_some_resamples():
    # a 3-class task where class 2 has a single lesion: ~37% of resamples lack it and AUC is undefined there
    pred = random_pred(n=40, classes=("a", "b", "c"), seed=4)
    pred["label"] = np.where(np.arange(40) == 0, 2, pred.label % 2)
    point, low, high = M.bootstrap_ci(pred, lambda d: M.macro_auc(d, ("a", "b", "c")), n_boot=100)
    assert low <= point <= high
    table = M.summary_with_ci(pred, ("a", "b", "c"), n_boot=50)
    assert table.notna().all().all()


def test_bootstrap_errors_when_most_resamples_fail():
    # class "c" has no images at all: its AUC is undefined in every resample, which must not pass silently
    pred = random_pred(n=30, classes=("a", "b", "c"), seed=5)
    pred["label"] %= 2
    with pytest.raises(ValueError, match="failed on 50 of 50 bootstrap resamples"):
        M.bootstrap_ci(pred, lambda d: M.macro_auc(d, ("a", "b", "c")), n_boot=50)


def test_auc_undefined_raises():
    pred = random_pred(n=30, classes=BINARY, seed=5).assign(label=0)
    with pytest.raises(ValueError, match="AUC undefined"):
        M.macro_auc(pred, BINARY)
    with pytest.raises(ValueError, match="AUC undefined"):
        M.malignancy_auc(pred, BINARY)


def test_bootstrap_is_fast_enough():
    pred = lesion_data(1000, 1)
    pred = pd.concat([pred, lesion_data(250, 2, seed=9).assign(lesion_id=lambda d: "x" + d.lesion_id,
                                                                 image_id=lambda d: "x" + d.image_id)])
    start = time.perf_counter()
    M.bootstrap_ci(pred, lambda d: float(np.mean(d["label"].to_numpy() == d["pred"].to_numpy())), n_boot=1000)
    assert time.perf_counter() - start < 5


def test_summary_with_ci_table():
    pred = random_pred(n=300, seed=6)
    table = M.summary_with_ci(pred, DX, threshold=0.3, n_boot=40)
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert set(table.metric) == set(M.summary(pred, DX, 0.3))
    assert (table.ci_low <= table.value).all() and (table.value <= table.ci_high).all()
    # with the validation predictions: the threshold is chosen there, and reported with its interval
    val = random_pred(n=300, seed=16)
    table = M.summary_with_ci(pred, DX, val_pred=val, n_boot=40).set_index("metric")
    chosen = M.threshold_for_sensitivity(*M.malignancy_score(val, DX), target=0.95)
    assert table.loc["malignancy_threshold", "value"] == pytest.approx(chosen)
    assert table.loc["sensitivity", "value"] == pytest.approx(M.summary(pred, DX, chosen)["sensitivity"])
    assert (table.ci_low <= table.value + 1e-12).all() and (table.value <= table.ci_high + 1e-12).all()


def threshold_case(seed=0):
    """Binary task: validation has 15 malignant lesions (its 95%-sensitivity threshold jumps from resample to
    resample), test has 400 lesions with scores spread evenly (fixed-threshold intervals are narrow)."""
    rng = np.random.default_rng(seed)
    def table(n_pos, n_neg, prefix):
        y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
        score = np.clip(np.where(y == 1, rng.beta(4, 2, len(y)), rng.beta(2, 4, len(y))), 1e-6, 1 - 1e-6)
        return make_pred(np.c_[1 - score, score], y, classes=BINARY, prefix=prefix)
    return table(15, 60, "v"), table(200, 200, "t")


def test_sensitivity_interval_includes_the_threshold_choice():
    val, test = threshold_case()
    chosen = M.threshold_for_sensitivity(*M.malignancy_score(val, BINARY), target=0.95)
    fixed = M.summary_with_ci(test, BINARY, threshold=chosen, n_boot=300).set_index("metric")
    rechosen = M.summary_with_ci(test, BINARY, threshold=chosen, val_pred=val, n_boot=300).set_index("metric")
    # the point estimates are the same: the threshold chosen on the whole validation split
    for m in ("sensitivity", "specificity", "auc"):
        assert rechosen.loc[m, "value"] == pytest.approx(fixed.loc[m, "value"])
    # the threshold itself varies across validation resamples, and that widens sensitivity/specificity
    assert rechosen.loc["malignancy_threshold", "ci_high"] - rechosen.loc["malignancy_threshold", "ci_low"] > 0.1
    for m in ("sensitivity", "specificity"):
        w_fixed = fixed.loc[m, "ci_high"] - fixed.loc[m, "ci_low"]
        w_rechosen = rechosen.loc[m, "ci_high"] - rechosen.loc[m, "ci_low"]
        assert w_rechosen > 1.5 * w_fixed, (m, w_fixed, w_rechosen)
    # metrics that do not use the threshold keep the same interval
    assert rechosen.loc["auc", "ci_low"] == pytest.approx(fixed.loc["auc", "ci_low"])


# ------------------------------------------------------------------------------------------------------ tables
def test_confusion_and_classification_table():
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    pred = make_pred(probs, [0, 1, 1, 2, 2, 0], classes=("a", "b", "c"))
    cm = M.confusion(pred, ("a", "b", "c"))
    assert cm.loc["a", "a"] == 1 and cm.loc["b", "a"] == 1 and cm.loc["a", "c"] == 1 and cm.values.sum() == 6
    table = M.classification_table(pred, ("a", "b", "c"))
    assert table.loc["c", "precision"] == pytest.approx(2 / 3) and table.loc["c", "recall"] == 1.0
    assert table.loc["b", "support"] == 2 and "macro avg" in table.index


# ---------------------------------------------------------------------------------------------- model comparison
def test_mcnemar_is_gone():
    # per-image McNemar treated the photographs of one lesion as independent evidence (issue 11)
    assert not hasattr(M, "mcnemar")


def test_comparisons_refuse_different_images():
    a, b = random_pred(n=20), random_pred(n=21)
    with pytest.raises(ValueError, match="different images"):
        M.compare_models({"a": [a], "b": [b]}, DX, "a", n_boot=10)
    with pytest.raises(ValueError, match="different images"):
        M.paired_bootstrap_diff(a, b, M.accuracy, n_boot=10)


def test_paired_bootstrap_diff():
    a = random_pred(n=300, seed=7, signal=3.0)
    b = random_pred(n=300, seed=7, signal=0.5)
    diff, low, high = M.paired_bootstrap_diff(a, b, M.accuracy, n_boot=300)
    assert diff == pytest.approx(M.accuracy(a) - M.accuracy(b))
    assert 0 < low <= diff <= high
    same = M.paired_bootstrap_diff(a, a, M.accuracy, n_boot=50)
    assert same == (0.0, 0.0, 0.0)  # same resample for both: a model never differs from itself


def test_majority_baseline():
    labels = [5] * 8 + [0, 1, 2, 3, 4, 6]  # nv is 8 of 14 images
    test_df = pd.DataFrame({"image_id": [f"i{k}" for k in range(14)], "lesion_id": [f"l{k}" for k in range(14)],
                            "label": labels})
    pred = M.majority_predictions(test_df, DX, majority_label=5)
    s = M.summary(pred, DX)
    assert s["accuracy"] == pytest.approx(8 / 14)
    assert s["balanced_accuracy"] == pytest.approx(1 / 7)  # recall 1 on nv, 0 on the six others
    assert s["auc"] == pytest.approx(0.5) and s["malignancy_auc"] == pytest.approx(0.5)
    np.testing.assert_allclose(M.prob_matrix(pred, DX).sum(axis=1), 1.0)


# ------------------------------------------------------------------------------------ lesion-level model comparison
def test_fast_scores_equal_the_reference_metrics():
    for classes, seed in ((DX, 0), (BINARY, 1)):
        pred = random_pred(n=500, classes=classes, seed=seed)
        for c in classes:
            pred[f"p_{c}"] = pred[f"p_{c}"].round(2)  # ties, as saved probabilities have
        rows = np.random.default_rng(seed).integers(0, 500, 500)  # a resample: repeated rows
        sub = pred.iloc[rows]
        fast = M._fast_scores(sub.label.to_numpy(), sub.pred.to_numpy(), M.prob_matrix(sub, classes), len(classes),
                              M.PAIRED_METRICS)
        assert fast == pytest.approx([M.macro_auc(sub, classes), M.balanced_accuracy(sub), M.accuracy(sub)],
                                     abs=1e-12)


def better_on_every_lesion(n_lesions=80, images_per_lesion=1, seed=0):
    """A is right on every lesion; B is right on 60% of them (same labels, same images)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, 2, n_lesions), images_per_lesion)
    b_right = np.repeat(rng.random(n_lesions) < 0.6, images_per_lesion)
    lesions = np.repeat([f"les{i}" for i in range(n_lesions)], images_per_lesion)
    p_a = np.where(labels == 1, 0.9, 0.1)
    p_b = np.where(b_right == (labels == 1), 0.7, 0.3)
    a = make_pred(np.c_[1 - p_a, p_a], labels, lesions=lesions, classes=BINARY)
    b = make_pred(np.c_[1 - p_b, p_b], labels, lesions=lesions, classes=BINARY)
    return a, b


def test_compare_models_known_answer():
    a, b = better_on_every_lesion()
    table = M.compare_models({"A": [a], "B": [b.iloc[::-1]]}, BINARY, "A", n_boot=400).set_index("metric")
    assert list(table.index) == ["auc", "balanced_accuracy", "accuracy"]  # macro AUC leads
    assert table.loc["accuracy", "difference"] == pytest.approx(M.accuracy(a) - M.accuracy(b))
    assert table.loc["auc", "difference"] == pytest.approx(M.macro_auc(a, BINARY) - M.macro_auc(b, BINARY))
    for m in table.index:
        row = table.loc[m]
        assert row.difference > 0 and 0 < row.ci_low <= row.difference <= row.ci_high
        assert row.p_value == pytest.approx(1 / 401)  # never on the other side of 0: the floor 1/(n_boot+1)
        assert row.p_holm == pytest.approx(3 / 401)
    # and the other way round: the same size, negative, just as significant
    rev = M.compare_models({"B": [b], "A": [a]}, BINARY, "B", n_boot=400).set_index("metric")
    assert rev.loc["accuracy", "difference"] == pytest.approx(-table.loc["accuracy", "difference"])
    np.testing.assert_allclose(rev.p_value, 1 / 401)


def test_compare_models_identical_models():
    a = random_pred(n=200, seed=11)
    table = M.compare_models({"A": [a], "B": [a.copy()]}, DX, "A", n_boot=100)
    assert (table.difference == 0).all() and (table.ci_low == 0).all() and (table.ci_high == 0).all()
    assert (table.p_value == 1).all() and (table.p_holm == 1).all()


def test_compare_models_resamples_lesions_not_images():
    """Ten identical photographs per lesion are one lesion's evidence: the paired interval must not shrink."""
    one = better_on_every_lesion(60, 1, seed=3)
    ten = better_on_every_lesion(60, 10, seed=3)
    w = lambda t: (t.ci_high - t.ci_low).to_numpy()  # noqa: E731
    by_lesion_1 = M.compare_models({"A": [one[0]], "B": [one[1]]}, BINARY, "A", n_boot=400)
    by_lesion_10 = M.compare_models({"A": [ten[0]], "B": [ten[1]]}, BINARY, "A", n_boot=400)
    by_image_10 = M.compare_models({"A": [ten[0]], "B": [ten[1]]}, BINARY, "A", n_boot=400, group="image_id")
    assert by_lesion_10.difference.to_numpy() == pytest.approx(by_lesion_1.difference.to_numpy())
    assert w(by_lesion_10) == pytest.approx(w(by_lesion_1), rel=0.3)
    assert (w(by_image_10) < 0.5 * w(by_lesion_10)).all()  # what a per-image test would claim


def test_compare_models_uses_every_seed():
    """Point: mean over seeds. Seeds that disagree widen the interval when seeds are resampled."""
    a, b = better_on_every_lesion(100, 1, seed=5)
    worse_a = b.copy()  # a second seed of A that is no better than B
    table = M.compare_models({"A": [a, worse_a], "B": [b]}, BINARY, "A", n_boot=400).set_index("metric")
    fixed = M.compare_models({"A": [a, worse_a], "B": [b]}, BINARY, "A", n_boot=400,
                             resample_seeds=False).set_index("metric")
    assert table.loc["accuracy", "difference"] == pytest.approx((M.accuracy(a) + M.accuracy(worse_a)) / 2
                                                                - M.accuracy(b))
    assert (table.seeds_reference == 2).all() and (table.seeds_other == 1).all()
    wide = table.loc["accuracy", "ci_high"] - table.loc["accuracy", "ci_low"]
    narrow = fixed.loc["accuracy", "ci_high"] - fixed.loc["accuracy", "ci_low"]
    assert wide > 2 * narrow
    assert table.loc["accuracy", "ci_low"] <= 1e-12  # with seed noise, "A better" is no longer certain


def test_compare_models_holm_over_all_rows():
    a, b = better_on_every_lesion(80, 1, seed=6)
    c = random_pred(n=80, classes=BINARY, seed=6).assign(image_id=a.image_id, lesion_id=a.lesion_id, label=a.label)
    table = M.compare_models({"A": [a], "B": [b], "C": [c]}, BINARY, "A", n_boot=200)
    assert len(table) == 6 and list(table.other) == ["B"] * 3 + ["C"] * 3
    np.testing.assert_allclose(table.p_holm, M.holm(table.p_value))
    assert (table.p_holm >= table.p_value).all()


def test_holm_known_answer():
    # sorted 0.005, 0.01, 0.03, 0.04 (m=4) -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for the last
    np.testing.assert_allclose(M.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(M.holm([0.5, 0.4]), [0.8, 0.8])
    np.testing.assert_allclose(M.holm([0.9, 0.6, 0.7]), [1.0, 1.0, 1.0])  # capped at 1
    assert M.holm([0.2]).tolist() == [0.2]
    with pytest.raises(ValueError):
        M.holm([0.1, float("nan")])


def test_bootstrap_p_value():
    assert M.bootstrap_p_value([0.1, 0.2, 0.3, -0.1], 0.2) == pytest.approx(0.5)  # 1 of 4 at or below 0, doubled
    assert M.bootstrap_p_value([-0.1, -0.2, 0.1, 0.0], -0.1) == pytest.approx(1.0)  # capped
    assert M.bootstrap_p_value([0.1] * 99, 0.1) == pytest.approx(1 / 100)  # floor
    assert M.bootstrap_p_value([0.0] * 10, 0.0) == 1.0


def test_validation_score_definitions():
    pred = random_pred(n=200, seed=12)
    probs, y = M.prob_matrix(pred, DX), pred.label.to_numpy()
    assert M.validation_score(pred, DX, "val_auc") == pytest.approx(M.macro_auc(pred, DX))
    assert M.validation_score(pred, DX, "val_bal_acc") == pytest.approx(M.balanced_accuracy(pred))
    assert M.validation_score(pred, DX, "val_acc") == pytest.approx(M.accuracy(pred))
    assert M.validation_score(pred, DX, "val_loss") == pytest.approx(log_loss(y, probs), rel=1e-6)
    with pytest.raises(ValueError, match="select_metric"):
        M.validation_score(pred, DX, "test_auc")


# ------------------------------------------------------------------------ strata, lesions, decision curve, baseline
def strat_pred(n=600, seed=4):
    """Random 7-class predictions, 1-3 images per lesion, with a dx_type per lesion."""
    rng = np.random.default_rng(seed)
    lesions = np.repeat(np.arange(n // 2), rng.integers(1, 4, n // 2))[:n]
    labels = rng.choice(7, lesions.max() + 1, p=[.08, .08, .14, .04, .12, .5, .04])[lesions]
    logits = rng.normal(size=(len(lesions), 7)) + 1.5 * np.eye(7)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = make_pred(probs, labels, lesions=[f"L{k}" for k in lesions])
    pred["dx_type"] = rng.choice(["histo", "follow_up", "consensus"], lesions.max() + 1)[lesions]
    return pred


def test_breakdown_stratum_equals_sklearn_on_the_filtered_frame():
    pred = strat_pred()
    levels = pred.set_index("image_id")["dx_type"]
    t = M.breakdown({"m": pred}, DX, levels, {"m": 0.3}, n_boot=30, seed=0, min_positives=5)
    for stratum, sub in pred.groupby("dx_type"):
        row = t[t.stratum == stratum].iloc[0]
        y, p = sub.label.to_numpy(), M.prob_matrix(sub, DX)
        eligible = [k for k in range(7) if sub.loc[y == k, "lesion_id"].nunique() >= 5]
        assert row.auc_classes == " ".join(DX[k] for k in eligible)
        assert row.auc == pytest.approx(np.mean([roc_auc_score(y == k, p[:, k]) for k in eligible]))
        assert row.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, sub.pred))
        mal, score = np.isin(y, [0, 1, 4]), p[:, [0, 1, 4]].sum(1)
        assert row.malignancy_auc == pytest.approx(roc_auc_score(mal, score))
        assert row.sensitivity == pytest.approx(np.mean(score[mal] >= 0.3))
        assert row.specificity == pytest.approx(np.mean(score[~mal] < 0.3))
        assert (row.n_images, row.n_lesions) == (len(sub), sub.lesion_id.nunique())
        assert row.n_malignant == sub.loc[mal, "lesion_id"].nunique()
        assert row.auc_ci_low <= row.auc <= row.auc_ci_high


def test_breakdown_undefined_metric_is_nan_not_an_error():
    pred = strat_pred()
    pred.loc[pred.dx_type == "follow_up", "label"] = 5  # follow-up: nevi only, as in HAM10000
    t = M.breakdown({"m": pred}, DX, pred.set_index("image_id")["dx_type"], {"m": 0.3}, n_boot=20)
    fu = t[t.stratum == "follow_up"].iloc[0]
    assert np.isnan(fu.malignancy_auc) and np.isnan(fu.sensitivity) and np.isnan(fu.auc) and fu.n_malignant == 0
    assert 0 <= fu.specificity <= 1 and fu.auc_classes == "–"


def test_weighted_scores_equal_the_metrics_on_the_resampled_rows():
    """The vectorised bootstrap (weights) gives exactly what scoring each resample's rows does."""
    pred = strat_pred(300)
    y, y_hat, p = pred.label.to_numpy(), pred.pred.to_numpy(), M.prob_matrix(pred, DX)
    names = ["auc", "balanced_accuracy", "accuracy", "malignancy_auc", "sensitivity", "specificity", "ece", "recall_5"]
    w = M._resample_weights(pred.lesion_id, 5, 0)
    got = M._weighted_scores(y, y_hat, p, 7, names, w, malignant=[0, 1, 4], threshold=0.3)
    for b, rows in enumerate(M._group_resamples(pred.lesion_id, 5, 0)):
        sub = pred.iloc[rows]
        s = M.summary(sub, DX, threshold=0.3)
        want = [s["auc"], s["balanced_accuracy"], s["accuracy"], s["malignancy_auc"], s["sensitivity"],
                s["specificity"], s["ece"], np.mean(sub.pred[sub.label == 5] == 5)]
        assert got[b] == pytest.approx(want)


def test_lesion_level_is_a_groupby_mean():
    pred = strat_pred(200)
    les = M.lesion_level(pred, DX).set_index("lesion_id")
    cols = [f"p_{c}" for c in DX]
    expected = pred.groupby("lesion_id")[cols].mean()
    np.testing.assert_allclose(les.loc[expected.index, cols].to_numpy(), expected.to_numpy())
    assert (les["pred"] == les[cols].to_numpy().argmax(1)).all()
    assert (les.loc[expected.index, "n_images"] == pred.groupby("lesion_id").size()).all()
    bad = pred.copy()
    multi = bad.lesion_id.value_counts().index[bad.lesion_id.value_counts() > 1][0]
    bad.loc[bad.index[bad.lesion_id == multi][0], "label"] = (bad.loc[bad.lesion_id == multi, "label"].iloc[0] + 1) % 7
    with pytest.raises(ValueError, match="different labels"):
        M.lesion_level(bad, DX)


def test_within_lesion_disagreement_hand_case():
    # lesion A: 2 images, same top-1, refer differs; B: 2 images, top-1 differs; C: one image (not counted)
    probs = np.full((5, 7), 0.01)
    probs[0, 5], probs[1, 5] = 0.9, 0.6
    probs[1, 4] = 0.35  # malignancy score of image 1 above 0.3, of image 0 below
    probs[2, 2], probs[3, 5], probs[4, 5] = 0.9, 0.9, 0.9
    pred = make_pred(probs, [5, 5, 2, 2, 5], lesions=["A", "A", "B", "B", "C"])
    d = M.within_lesion_disagreement(pred, DX, threshold=0.3)
    assert d == {"multi_image_lesions": 2, "top1_disagreement": 0.5, "refer_disagreement": 0.5}


def test_net_benefit_hand_case():
    y = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    score = np.array([.9, .4, .35, .2, .05, .1, .6, .02, .3, .01])
    for pt in (0.05, 0.25, 0.5):
        refer = score >= pt
        tp, fp = np.sum(refer & (y == 1)), np.sum(refer & (y == 0))
        assert M.net_benefit(y, score, [pt])[0] == pytest.approx(tp / 10 - fp / 10 * pt / (1 - pt))
    assert M.net_benefit(y, score, [0.25])[0] == pytest.approx(2 / 10 - 3 / 10 * (0.25 / 0.75))  # .9 .4 / .35 .6 .3
    dc = M.decision_curve(make_pred(np.c_[score, np.zeros((10, 5)), 1 - score], np.where(y == 1, 0, 5)), DX,
                          thresholds=[0.1, 0.2], n_boot=50)
    assert dc["refer_all"].to_numpy() == pytest.approx(0.3 - 0.7 * np.array([0.1, 0.2]) / np.array([0.9, 0.8]))
    assert (dc["ci_low"] <= dc["net_benefit"] + 1e-12).all() and (dc["refer_none"] == 0).all()


def test_age_bands_and_subgroup_levels():
    ages = [0, 29.9, 30, 44, 45, 59, 60, 74, 75, 90, np.nan, "unknown"]
    assert list(M.age_band(ages)) == ["<30", "<30", "30-44", "30-44", "45-59", "45-59", "60-74", "60-74", ">=75",
                                      ">=75", "unknown", "unknown"]
    df = pd.DataFrame({"sex": ["male", "Female", None, "unknown"], "age": [1, 2, 3, 4],
                       "localization": ["back", "back", "ear", "unknown"]})
    assert list(M.subgroup_levels(df, "sex")) == ["male", "female", "unknown", "unknown"]
    assert list(M.subgroup_levels(df, "site", min_images=2)) == ["back", "back", "other", "unknown"]


def metadata_split(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", 400), ("val", 150), ("test", 150)):
        for k in range(n):
            label = int(rng.choice(7, p=[.06, .06, .12, .04, .12, .55, .05]))
            rows.append(dict(image_id=f"{split}{k}", lesion_id=f"{split}L{k}", label=label, split=split,
                             age=np.nan if rng.random() < .05 else float(rng.integers(5, 90) + 5 * (label == 4)),
                             sex=rng.choice(["male", "female", "unknown"], p=[.5, .45, .05]),
                             localization=rng.choice(["back", "face", "trunk", "unknown"], p=[.4, .2, .3, .1])))
    return pd.DataFrame(rows)


def test_metadata_baseline_never_sees_validation_or_test_labels_for_its_coefficients():
    split = metadata_split()
    fit = M.metadata_baseline(split, DX)
    assert fit["C"] in set(fit["sweep"]["C"]) and len(fit["test"]) == 150
    permuted = split.copy()
    rng = np.random.default_rng(1)
    for s in ("val", "test"):
        at = permuted.index[permuted.split == s]
        permuted.loc[at, "label"] = rng.permutation(permuted.loc[at, "label"].to_numpy())
    again = M.metadata_baseline(permuted, DX, C=fit["C"])  # given the chosen C: val and test labels play no part
    np.testing.assert_array_equal(again["model"].coef, fit["model"].coef)
    np.testing.assert_array_equal(again["model"].intercept, fit["model"].intercept)
    only_test = split.copy()  # test labels never enter at all: not even the choice of C
    at = only_test.index[only_test.split == "test"]
    only_test.loc[at, "label"] = rng.permutation(only_test.loc[at, "label"].to_numpy())
    third = M.metadata_baseline(only_test, DX)
    assert third["C"] == fit["C"]
    np.testing.assert_array_equal(third["model"].coef, fit["model"].coef)
    np.testing.assert_allclose(third["test"][[f"p_{c}" for c in DX]], fit["test"][[f"p_{c}" for c in DX]])


def test_argmax_predictions_ignore_the_saved_rule():
    pred = random_pred()
    rule = pred.assign(pred=(pred.pred + 1) % 7)
    assert (M.argmax_predictions(rule, DX)["pred"] == pred["pred"]).all()
