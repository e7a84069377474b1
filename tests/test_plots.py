"""Every figure builds from small synthetic inputs, 7-class and binary, with a title and labelled axes."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from helpers import plots  # noqa: E402

DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
BINARY = ("benign", "malignant")
TASKS = [DX, BINARY]


def make_pred(classes, n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(classes)  # every class present
    logits = rng.normal(size=(n, len(classes))) + 1.5 * np.eye(len(classes))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "lesion_id": [f"l{k // 2}" for k in range(n)],
                         "label": labels, "pred": probs.argmax(axis=1)})
    for k, c in enumerate(classes):
        pred[f"p_{c}"] = probs[:, k]
    return pred


def make_history(epochs=5, seed=0):
    rng = np.random.default_rng(seed)
    e = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e,
                         "val_loss": 1 / e + rng.random(epochs) * 0.1, "val_acc": 1 - 0.6 / e,
                         "val_bal_acc": 1 - 0.7 / e, "val_auc": 1 - 0.3 / e, "lr": 1e-3, "seconds": 2.0,
                         "img_per_s": 500.0})


def images(n, size=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def check(fig, title):
    """A Figure titled ``title`` whose plotting axes (those showing data, not images or tables) are all labelled."""
    assert isinstance(fig, Figure)
    assert fig.get_suptitle() == title
    for ax in fig.axes:
        plotted = ax.lines or ax.patches or ax.collections
        if plotted and not ax.images and ax.get_label() != "<colorbar>":
            assert ax.get_title(), "every plotting panel has a title"
            assert ax.get_xlabel() and ax.get_ylabel(), f"panel {ax.get_title()!r} lacks axis labels"
    fig.canvas.draw()  # rendering must not fail either


def tick_texts(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


def test_history_curves_marks_best_epoch():
    fig = plots.history_curves(make_history(), "ResNet-18 training", best_epoch=3)
    check(fig, "ResNet-18 training")
    loss_ax, acc_ax = fig.axes
    assert {l.get_label() for l in acc_ax.lines} >= {"validation balanced accuracy", "selected epoch (3)"}


def test_history_overlay():
    fig = plots.history_overlay({"resnet18": make_history(), "resnet50": make_history(7, seed=1)}, "Models")
    check(fig, "Models")
    assert len(fig.axes[0].lines) == 2


@pytest.mark.parametrize("classes", TASKS)
def test_evaluation_panel(classes):
    fig = plots.evaluation_panel(make_pred(classes), classes, "Test split")
    check(fig, "Test split")
    confusion_ax, report_ax, dist_ax, roc_ax = fig.axes[:4]
    assert [t.get_text() for t in confusion_ax.get_yticklabels()] == list(classes)  # names, not indices
    assert tick_texts(dist_ax) == list(classes)
    assert report_ax.tables and "AUC" in roc_ax.get_title()
    assert len(roc_ax.get_legend().get_texts()) == (len(classes) if len(classes) > 2 else 1) + 1  # + chance


@pytest.mark.parametrize("classes", TASKS)
def test_reliability_diagram(classes):
    fig = plots.reliability_diagram(make_pred(classes), classes, "Calibration")
    check(fig, "Calibration")
    assert "ECE" in fig.axes[0].get_title()


@pytest.mark.parametrize("classes", TASKS)
def test_error_grid_most_confident_first(classes):
    pred = make_pred(classes)
    fig = plots.error_grid(images(len(pred)), pred, classes, n=4, title="Errors")
    check(fig, "Errors")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    wrong = pred[pred.label != pred.pred]
    assert len(titles) == min(4, len(wrong))
    confidences = [float(t.split("p=")[1].rstrip(")")) for t in titles]
    assert confidences == sorted(confidences, reverse=True)
    assert all(" → " in t and t.split(" → ")[0] in classes for t in titles)


def test_error_grid_without_errors():
    pred = make_pred(BINARY).assign(pred=lambda d: d.label)
    check(plots.error_grid(images(len(pred)), pred, BINARY, title="No errors"), "No errors")


def test_gradcam_grid_accepts_smaller_heatmaps():
    heat = np.random.default_rng(0).random((5, 3, 3))
    fig = plots.gradcam_grid(torch.from_numpy(images(5)), heat, [0, 1, 2, 3, 4], [0, 1, 2, 4, 4], DX, "Grad-CAM",
                             ncols=3)
    check(fig, "Grad-CAM")
    overlay = [ax for ax in fig.axes if len(ax.images) == 2]
    assert len(overlay) == 5
    # the 3x3 map is stretched over the whole 24x24 image
    assert overlay[0].images[1].get_extent() == pytest.approx([-0.5, 23.5, 23.5, -0.5])


def split_table(classes, n=70, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(classes)
    return pd.DataFrame({"dx": np.array(DX)[np.arange(n) % 7], "label": labels,
                         "split": rng.choice(["train", "val", "test"], n)})


@pytest.mark.parametrize("classes", TASKS)
def test_class_counts(classes):
    df = split_table(classes)
    fig = plots.class_counts(df, classes, "Images per class", names={"nv": "melanocytic nevus"})
    check(fig, "Images per class")
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"all", "train", "val", "test"}
    if classes == DX:
        assert "melanocytic nevus" in tick_texts(ax)
    heights = sorted(p.get_height() for p in ax.patches[:len(classes)])  # the "all" bars
    assert heights == sorted(np.bincount(df.label, minlength=len(classes)))


def test_class_counts_uses_dx_without_label_and_rejects_unknown():
    df = split_table(DX).drop(columns="label")
    check(plots.class_counts(df, DX, "From dx"), "From dx")
    with pytest.raises(ValueError, match="not among"):
        plots.class_counts(df, BINARY, "wrong classes")


@pytest.mark.parametrize("classes", TASKS)
def test_example_grid(classes):
    df = split_table(classes, n=30)
    fig = plots.example_grid(images(len(df)), df, classes, per_class=3, title="Examples")
    check(fig, "Examples")
    row_labels = [ax.get_ylabel().split("\n")[0] for ax in fig.axes if ax.get_ylabel()]
    assert row_labels == list(classes)
    assert sum(len(ax.images) for ax in fig.axes) == 3 * len(classes)


def test_roc_overlay_views():
    seven, binary = make_pred(DX, seed=1), make_pred(BINARY, seed=2)
    fig = plots.roc_overlay({"7-class": seven, "binary": binary}, {"7-class": DX, "binary": BINARY}, "Malignancy")
    check(fig, "Malignancy")
    assert fig.axes[0].get_title() == "ROC: malignant vs benign"
    other = ("cat", "dog", "fox")
    fig = plots.roc_overlay({"a": make_pred(other), "b": make_pred(other, seed=3)}, other, "Macro")
    assert "macro" in fig.axes[0].get_title() and len(fig.axes[0].lines) == 3


def test_save_writes_png(tmp_path):
    fig = plots.history_curves(make_history(), "saved")
    path = plots.save(fig, tmp_path / "deep" / "folder" / "history.png")
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as img:
        assert img.text.get("Title") == "saved"  # the HTML pages' alt text


def test_time_to_accuracy_puts_every_run_on_cumulative_training_time():
    with_cum = make_history(4).assign(train_seconds_cum=[60.0, 120.0, 180.0, 240.0])
    without = make_history(3, seed=1)  # older history: falls back to the running sum of ``seconds`` (2 s each)
    runs = {"resnet34_tuned_s0": with_cum, "resnet34_tuned_s1": with_cum, "resnet50_tuned_s0": without}
    groups = {"resnet34_tuned_s0": "resnet34_tuned", "resnet34_tuned_s1": "resnet34_tuned",
              "resnet50_tuned_s0": "resnet50_tuned"}
    fig = plots.time_to_accuracy(runs, "Time to accuracy", groups=groups)
    check(fig, "Time to accuracy")
    auc_ax, bal_ax = fig.axes
    assert "AUC" in auc_ax.get_title() and "balanced" in bal_ax.get_title()
    for ax, column in ((auc_ax, "val_auc"), (bal_ax, "val_bal_acc")):
        lines = {l.get_label(): l for l in ax.lines}
        assert set(lines) == set(runs), "one line per run, all on the same axes"
        assert lines["resnet34_tuned_s0"].get_xdata() == pytest.approx([1, 2, 3, 4])  # minutes
        assert lines["resnet50_tuned_s0"].get_xdata() == pytest.approx([2 / 60, 4 / 60, 6 / 60])
        assert lines["resnet34_tuned_s0"].get_ydata() == pytest.approx(with_cum[column])
        assert "min" in ax.get_xlabel()
    # seeds of one model share a colour and differ in line style; another model gets another colour
    a, b, c = (next(l for l in auc_ax.lines if l.get_label() == r) for r in runs)
    assert a.get_color() == b.get_color() != c.get_color() and a.get_linestyle() != b.get_linestyle()
    with pytest.raises(ValueError):
        plots.time_to_accuracy({}, "empty")


def test_history_curves_shade_the_low_resolution_epochs():
    h = make_history().assign(image_size=lambda d: [32 if e <= 2 else 48 for e in d.epoch])
    fig = plots.history_curves(h, "schedule", best_epoch=3)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "trained at 32 px" in labels and "trained at 48 px" not in labels
    plain = plots.history_curves(make_history(), "no schedule")
    assert not any("trained at" in t.get_text() for t in plain.axes[0].get_legend().get_texts())
