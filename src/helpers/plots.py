"""The report's figures: each function takes tables or arrays and returns a matplotlib Figure.

Figures are built with the object API (``matplotlib.figure.Figure``), not pyplot: nothing is drawn to a global
state, nothing needs a display, and a loop making a hundred figures does not keep a hundred alive. In a notebook a
returned Figure shows when it is the cell's last expression (or via ``display(fig)``); ``save`` writes the PNG the
report links to. Class names, never label indices, appear on the axes.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from helpers import metrics


def _figure(nrows: int = 1, ncols: int = 1, size=(6.4, 4.8)):
    """A constrained-layout Figure and its axes as a 2-D array (also for a single panel)."""
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _hwc(images) -> np.ndarray:
    """uint8 N x 3 x H x W (numpy, or a torch tensor on any device) -> N x H x W x 3 numpy, as imshow wants it."""
    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return images.transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------------ training
def history_curves(history: pd.DataFrame, title: str, best_epoch: int | None = None) -> Figure:
    """Loss (train vs val) and accuracy (train, val, val balanced) per epoch; a dotted line at ``best_epoch``; shaded
    spans for epochs trained below the final resolution (a resolution schedule)."""
    fig, ((loss_ax, acc_ax),) = _figure(1, 2, size=(11, 4))
    loss_ax.plot(history.epoch, history.train_loss, "o-", label="train")
    loss_ax.plot(history.epoch, history.val_loss, "o-", label="validation")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    acc_ax.plot(history.epoch, history.train_acc, "o-", label="train accuracy")
    acc_ax.plot(history.epoch, history.val_acc, "o-", label="validation accuracy")
    acc_ax.plot(history.epoch, history.val_bal_acc, "s--", label="validation balanced accuracy")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    sizes = history["image_size"] if "image_size" in history else None
    for ax in (loss_ax, acc_ax):
        if sizes is not None and sizes.nunique() > 1:  # a resolution schedule: shade the low-resolution epochs
            for size in sorted(sizes.unique())[:-1]:
                epochs = history.epoch[sizes == size]
                ax.axvspan(epochs.min() - 0.5, epochs.max() + 0.5, color="grey", alpha=0.12 + 0.08 * (size == sizes.min()),
                           lw=0, label=f"trained at {size} px")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", label=f"selected epoch ({best_epoch})")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def history_overlay(histories: Mapping[str, pd.DataFrame], title: str) -> Figure:
    """Validation loss and validation balanced accuracy of several models, one line each."""
    fig, ((loss_ax, bal_ax),) = _figure(1, 2, size=(11, 4))
    for name, h in histories.items():
        loss_ax.plot(h.epoch, h.val_loss, "o-", ms=3, label=name)
        bal_ax.plot(h.epoch, h.val_bal_acc, "o-", ms=3, label=name)
    loss_ax.set(title="Validation loss", xlabel="epoch", ylabel="cross-entropy loss")
    bal_ax.set(title="Validation balanced accuracy", xlabel="epoch", ylabel="balanced accuracy")
    bal_ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def cumulative_train_seconds(history: pd.DataFrame) -> pd.Series:
    """Training seconds up to the end of each epoch: ``train_seconds_cum`` when the history has it, else the
    running sum of ``seconds`` (older histories; that column also counts each epoch's validation time)."""
    if "train_seconds_cum" in history:
        return history["train_seconds_cum"].astype(float)
    return history["seconds"].astype(float).cumsum()


def time_to_accuracy(histories: Mapping[str, pd.DataFrame], title: str,
                     groups: Mapping[str, str] | None = None) -> Figure:
    """Validation macro AUC (left) and balanced accuracy (right) against cumulative training time, one line per
    run, all runs on the same axes: what each model buys per minute of training on this hardware.

    ``groups`` maps a run to its model (runs of one model, e.g. several seeds, share a colour and differ in line
    style). The x axis is in minutes (``cumulative_train_seconds`` / 60), as "train min" in the comparison table.
    """
    if not histories:
        raise ValueError("time_to_accuracy needs at least one history")
    groups = dict(groups or {})
    models = list(dict.fromkeys(groups.get(run, run) for run in histories))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    fig, ((auc_ax, bal_ax),) = _figure(1, 2, size=(12, 4.5))
    for run, h in histories.items():
        model = groups.get(run, run)
        k = seen[model] = seen.get(model, -1) + 1
        minutes = cumulative_train_seconds(h) / 60
        style = dict(color=colours[model], ls=styles[k % len(styles)], marker="o", ms=3, label=run)
        auc_ax.plot(minutes, h["val_auc"], **style)
        bal_ax.plot(minutes, h["val_bal_acc"], **style)
    auc_ax.set(title="Validation macro AUC", xlabel="cumulative training time (min)", ylabel="macro AUC")
    bal_ax.set(title="Validation balanced accuracy", xlabel="cumulative training time (min)",
               ylabel="balanced accuracy")
    for ax in (auc_ax, bal_ax):
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    bal_ax.legend(fontsize="small", loc="best")
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------------- evaluation
def _confusion_ax(ax, pred, classes) -> None:
    """Counts as numbers; colour by row share, so rare classes' errors are as visible as the nevi's."""
    counts = metrics.confusion(pred, classes)
    share = counts.div(counts.sum(axis=1).replace(0, 1), axis=0)
    sns.heatmap(share, annot=counts, fmt="d", cmap="Blues", vmin=0, vmax=1, square=True, ax=ax,
                cbar_kws={"label": "share of true class"})
    ax.set(title="Confusion matrix (colour: row share)", xlabel="predicted", ylabel="true")


def _report_ax(ax, pred, classes) -> None:
    table = metrics.classification_table(pred, classes)
    cells = [[f"{r.precision:.2f}", f"{r.recall:.2f}", f"{r.f1:.2f}", f"{r.support:d}"] for r in table.itertuples()]
    ax.axis("off")
    t = ax.table(cellText=cells, rowLabels=list(table.index), colLabels=["precision", "recall", "f1", "support"],
                 loc="center", cellLoc="center")
    t.scale(1, 1.3)
    ax.set_title("Classification report")


def _distribution_ax(ax, pred, classes) -> None:
    k = np.arange(len(classes))
    ax.bar(k - 0.2, np.bincount(pred["label"], minlength=len(classes)), 0.4, label="true")
    ax.bar(k + 0.2, np.bincount(pred["pred"], minlength=len(classes)), 0.4, label="predicted")
    ax.set_xticks(k, classes, rotation=45 if len(classes) > 2 else 0)
    ax.set(title="Class distribution: true vs predicted", xlabel="class", ylabel="images")
    ax.legend()


def _roc_ax(ax, pred, classes) -> None:
    """One-vs-rest ROC per class (binary: the positive class), AUC in the legend, macro AUC in the title."""
    y, probs = pred["label"].to_numpy(), metrics.prob_matrix(pred, classes)
    shown = [1] if len(classes) == 2 else range(len(classes))
    for k in shown:
        positive = y == k
        if positive.all() or not positive.any():  # ROC undefined without both outcomes
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    try:
        name = "AUC" if len(classes) == 2 else "macro AUC"
        ax.set_title(f"ROC ({name} {metrics.macro_auc(pred, classes):.3f})")
    except ValueError:  # a class absent from the labels
        ax.set_title("ROC (AUC undefined: a class has no images)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.legend(fontsize="small", loc="lower right")


def evaluation_panel(pred: pd.DataFrame, classes: Sequence[str], title: str) -> Figure:
    """Confusion matrix, classification report, true vs predicted class counts, ROC curves: one model, one split."""
    fig, axes = _figure(2, 2, size=(13, 11))
    _confusion_ax(axes[0, 0], pred, classes)
    _report_ax(axes[0, 1], pred, classes)
    _distribution_ax(axes[1, 0], pred, classes)
    _roc_ax(axes[1, 1], pred, classes)
    fig.suptitle(title)
    return fig


def reliability_diagram(pred: pd.DataFrame, classes: Sequence[str], title: str, n_bins: int = 15) -> Figure:
    """Accuracy vs confidence per confidence bin (top label), with the bin counts below: where the model is
    over-confident the bars fall short of the diagonal."""
    y, probs = pred["label"].to_numpy(), metrics.prob_matrix(pred, classes)
    table = metrics.reliability_table(probs, y, n_bins)
    ece = metrics.expected_calibration_error(probs, y, n_bins)
    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    rel_ax, count_ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]})
    width = 1 / n_bins
    rel_ax.bar(table.lower, table.accuracy.fillna(0), width, align="edge", edgecolor="k", label="accuracy")
    rel_ax.bar(table.lower, (table.confidence - table.accuracy).fillna(0), width, bottom=table.accuracy.fillna(0),
               align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
    rel_ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    rel_ax.set(title=f"Reliability (ECE {ece:.3f})", xlabel="confidence", ylabel="accuracy", xlim=(0, 1),
               ylim=(0, 1))
    rel_ax.legend(loc="upper left", fontsize="small")
    count_ax.bar(table.lower, table["count"], width, align="edge", edgecolor="k", color="grey")
    count_ax.set(title="Images per bin", xlabel="confidence (top predicted probability)", ylabel="images",
                 xlim=(0, 1))
    fig.suptitle(title)
    return fig


def _roc_view(pred: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, float, str]:
    """(fpr, tpr, AUC, what) for the malignancy question when the classes have it, else the macro-average ROC."""
    if metrics.has_malignancy_view(classes):
        fpr, tpr, _ = roc_curve(*metrics.malignancy_score(pred, classes))
        return fpr, tpr, metrics.malignancy_auc(pred, classes), "malignant vs benign"
    y, probs = pred["label"].to_numpy(), metrics.prob_matrix(pred, classes)
    if len(classes) == 2:
        fpr, tpr, _ = roc_curve(y == 1, probs[:, 1])
        return fpr, tpr, metrics.macro_auc(pred, classes), f"{classes[1]} vs {classes[0]}"
    grid = np.linspace(0, 1, 201)  # macro average: per-class TPR interpolated onto one FPR grid, then averaged
    tprs = [np.interp(grid, *roc_curve(y == k, probs[:, k])[:2]) for k in range(len(classes))]
    return grid, np.mean(tprs, axis=0), metrics.macro_auc(pred, classes), "macro average, one-vs-rest"


def roc_overlay(preds: Mapping[str, pd.DataFrame], classes: Sequence[str] | Mapping[str, Sequence[str]],
                title: str) -> Figure:
    """Several models' ROC on one axis: the malignancy ROC where the classes have that view, else the macro average.

    ``classes`` is one class tuple for all models, or a mapping model name -> classes, so that a 7-class and a
    binary model can be compared on the same question (is it malignant?).
    """
    if not preds:
        raise ValueError("roc_overlay needs at least one prediction table")
    fig, ((ax,),) = _figure(size=(6, 6))
    views = []
    for name, pred in preds.items():
        fpr, tpr, area, what = _roc_view(pred, classes[name] if isinstance(classes, Mapping) else classes)
        ax.plot(fpr, tpr, label=f"{name} (AUC {area:.3f})")
        views.append(what)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set(title="ROC: " + " / ".join(dict.fromkeys(views)), xlabel="false positive rate",
           ylabel="true positive rate", aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    return fig


def roc_by_population(preds: Mapping[str, pd.DataFrame], classes: Sequence[str],
                      populations: Mapping[str, Sequence[str]], title: str) -> Figure:
    """The malignancy ROC of several models, one panel per population (``populations``: panel title -> the
    image_ids it holds), e.g. all test images against the histopathology-confirmed ones. A panel without both
    malignant and benign images says so instead of drawing."""
    fig, axes = _figure(1, len(populations), size=(5.2 * len(populations), 5.4))
    for ax, (where, ids) in zip(axes[0], populations.items()):
        ids = set(ids)
        for k, (name, pred) in enumerate(preds.items()):
            sub = pred[pred["image_id"].isin(ids)]
            y, score = metrics.malignancy_score(sub, classes)
            if y.all() or not y.any():
                ax.text(0.5, 0.5, "no malignant or no benign image", ha="center", transform=ax.transAxes)
                break
            fpr, tpr, _ = roc_curve(y, score)
            ax.plot(fpr, tpr, color=f"C{k % 10}", label=f"{name} (AUC {metrics.malignancy_auc(sub, classes):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        n_mal = int(metrics.malignancy_score(pred[pred["image_id"].isin(ids)], classes)[0].sum()) if preds else 0
        ax.set(title=f"{where}: {len(ids)} images, {n_mal} malignant", xlabel="false positive rate",
               ylabel="true positive rate", aspect="equal")
        ax.legend(loc="lower right", fontsize="x-small")
    fig.suptitle(title)
    return fig


FOREST_LABELS = {"balanced_accuracy": "Balanced accuracy (argmax)", "auc": "Macro AUC",
                 "malignancy_auc": "Malignancy AUC", "sensitivity": "Sensitivity (val. threshold)",
                 "specificity": "Specificity (val. threshold)"}


def subgroup_forest(table: pd.DataFrame, title: str,
                    metrics_shown: Sequence[str] = ("balanced_accuracy", "malignancy_auc", "sensitivity",
                                                    "specificity")) -> Figure:
    """Forest plot of subgroup metrics: one row per subgroup (``variable``, ``stratum``, with its image count), one
    panel per metric, a point and 95% interval per (``model``, ``population``): filled markers for all images of
    the subgroup, open ones for its histopathology-confirmed images. The dashed line in each panel is the first
    model's value on all test images (the row whose variable is "overall")."""
    rows = list(dict.fromkeys(zip(table["variable"], table["stratum"])))
    series = list(dict.fromkeys(zip(table["model"], table["population"])))
    models = list(dict.fromkeys(table["model"]))
    fig, axes = _figure(1, len(metrics_shown), size=(3.3 * len(metrics_shown) + 2.5, 0.32 * len(rows) + 1.8))
    step = 0.8 / max(len(series), 1)
    for ax, m in zip(axes[0], metrics_shown):
        for j, (model, population) in enumerate(series):
            sub = table[(table["model"] == model) & (table["population"] == population)].set_index(
                ["variable", "stratum"])
            ys, xs, lo, hi = [], [], [], []
            for i, key in enumerate(rows):
                if key in sub.index and pd.notna(sub.loc[key, m]):
                    r = sub.loc[key]
                    ys.append(i - 0.4 + step * (j + 0.5))
                    xs.append(r[m])
                    # a percentile interval need not contain the point (small strata): draw what lies beyond it
                    lo.append(max(0.0, r[m] - r[f"{m}_ci_low"]) if pd.notna(r[f"{m}_ci_low"]) else 0)
                    hi.append(max(0.0, r[f"{m}_ci_high"] - r[m]) if pd.notna(r[f"{m}_ci_high"]) else 0)
            colour = f"C{models.index(model) % 10}"
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o" if population == "all" else "s", color=colour, ms=4,
                        mfc=colour if population == "all" else "white", lw=1, capsize=2,
                        label=f"{model}, {population}")
        overall = table[(table["variable"] == "overall") & (table["model"] == models[0])
                        & (table["population"] == "all")]
        if len(overall) and pd.notna(overall[m].iloc[0]):
            ax.axvline(overall[m].iloc[0], color="grey", ls="--", lw=1)
        ax.set(title=FOREST_LABELS.get(m, m), ylim=(len(rows) - 0.5, -0.5))
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([])
    n = table.drop_duplicates(["variable", "stratum"]).set_index(["variable", "stratum"])["n_images"]
    axes[0][0].set_yticklabels([f"{v}: {s} (n={int(n[(v, s)])})" for v, s in rows], fontsize="small")
    axes[0][-1].legend(fontsize="x-small", loc="lower left", bbox_to_anchor=(1.02, 0))
    fig.suptitle(title)
    return fig


def decision_curves(curves: Mapping[str, pd.DataFrame], title: str) -> Figure:
    """Net benefit against threshold probability for each model (with its 95% band), beside refer-all and
    refer-none (tables from ``metrics.decision_curve``)."""
    fig, ((ax,),) = _figure(size=(7.5, 5))
    first = next(iter(curves.values()))
    for k, (name, c) in enumerate(curves.items()):
        ax.plot(c["threshold"] * 100, c["net_benefit"], color=f"C{k % 10}", label=name)
        ax.fill_between(c["threshold"] * 100, c["ci_low"], c["ci_high"], color=f"C{k % 10}", alpha=0.15, lw=0)
    ax.plot(first["threshold"] * 100, first["refer_all"], "k--", lw=1, label="refer all")
    ax.axhline(0, color="k", lw=1, ls=":", label="refer none")
    top = max(float(np.nanmax(c[["net_benefit", "ci_high"]].to_numpy())) for c in curves.values())
    ax.set(xlabel="threshold probability of malignancy (%)", ylabel="net benefit (per image)", ylim=(min(-0.02, -0.1 * top), top * 1.1 + 0.01),
           title="Decision curve: refer when P(malignant) >= threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


# -------------------------------------------------------------------------------------------------------- images
def error_grid(images_uint8, pred: pd.DataFrame, classes: Sequence[str], n: int = 16,
               title: str = "Most confident errors") -> Figure:
    """The ``n`` misclassified images the model was most sure about, each titled "true → predicted (p=...)".

    ``images_uint8`` (N x 3 x H x W) is aligned with the rows of ``pred``.
    """
    probs = metrics.prob_matrix(pred, classes)
    y, y_hat = pred["label"].to_numpy(), pred["pred"].to_numpy()
    confidence = probs[np.arange(len(pred)), y_hat]
    wrong = np.flatnonzero(y != y_hat)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    ncols = max(1, min(len(shown), int(np.ceil(np.sqrt(n)))))
    nrows = max(1, -(-len(shown) // ncols))
    fig, axes = _figure(nrows, ncols, size=(2.2 * ncols, 2.2 * nrows + 0.6))
    for ax in axes.flat:
        ax.axis("off")
    if not len(shown):
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    images = _hwc(images_uint8)
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i])
        ax.set_title(f"{classes[y[i]]} → {classes[y_hat[i]]} (p={confidence[i]:.2f})", fontsize="small")
    fig.suptitle(title)
    return fig


def gradcam_grid(images_uint8, heatmaps, labels, preds, classes: Sequence[str], title: str,
                 ncols: int = 8) -> Figure:
    """Each image above its Grad-CAM overlay. ``heatmaps`` (N x h x w, any size) are stretched over the image by
    imshow's extent with bilinear interpolation, which is the upsampling."""
    images, heatmaps = _hwc(images_uint8), np.asarray(heatmaps)
    n = len(images)
    ncols = max(1, min(n, ncols))
    blocks = -(-n // ncols)
    fig, axes = _figure(2 * blocks, ncols, size=(2.0 * ncols, 4.1 * blocks + 0.6))
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        top, bottom = axes[2 * (i // ncols), i % ncols], axes[2 * (i // ncols) + 1, i % ncols]
        h, w = images[i].shape[:2]
        top.imshow(images[i])
        top.set_title(f"true {classes[labels[i]]}\npred {classes[preds[i]]}", fontsize="small")
        bottom.imshow(images[i])
        bottom.imshow(heatmaps[i], cmap="jet", alpha=0.45, interpolation="bilinear", vmin=0, vmax=1,
                      extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        bottom.set_title("Grad-CAM", fontsize="small")
    fig.suptitle(title)
    return fig


def _class_names(df: pd.DataFrame, classes: Sequence[str]) -> pd.Series:
    """Each row's class name: from ``label`` (index into ``classes``) when present, else the ``dx`` column."""
    names = df["label"].map(dict(enumerate(classes))) if "label" in df else df["dx"]
    unknown = set(names.dropna()) - set(classes)
    if names.isna().any() or unknown:
        raise ValueError(f"rows whose class is not among {tuple(classes)}: {sorted(map(str, unknown))[:5]}")
    return names


def example_grid(images_uint8, df: pd.DataFrame, classes: Sequence[str], per_class: int = 4,
                 title: str = "Example images per class", names: Mapping[str, str] | None = None,
                 seed: int = 0) -> Figure:
    """``per_class`` randomly chosen images of each class, one row per class (``names``: readable row labels).

    ``images_uint8`` (N x 3 x H x W) is aligned with the rows of ``df``.
    """
    images, cls = _hwc(images_uint8), _class_names(df, classes).to_numpy()
    rng = np.random.default_rng(seed)
    fig, axes = _figure(len(classes), per_class, size=(2.0 * per_class + 1.5, 1.9 * len(classes) + 0.6))
    for row, c in zip(axes, classes):
        idx = np.flatnonzero(cls == c)
        chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for ax, i in zip(row, chosen):
            ax.imshow(images[i])
        label = (names or {}).get(c, c)
        row[0].set_ylabel(f"{label}\n({len(idx)} images)", rotation=0, ha="right", va="center")
    fig.suptitle(title)
    return fig


SPLIT_ORDER = ("train", "val", "test")


def class_counts(df: pd.DataFrame, classes: Sequence[str], title: str,
                 names: Mapping[str, str] | None = None) -> Figure:
    """Images per class, overall and per split (log scale: nevi outnumber dermatofibromas about 60 to 1)."""
    cls = _class_names(df, classes)
    table = pd.crosstab(cls, df["split"]).reindex(index=list(classes), fill_value=0)
    splits = [s for s in SPLIT_ORDER if s in table] + sorted(set(table.columns) - set(SPLIT_ORDER))
    table = table[splits]
    table.insert(0, "all", table.sum(axis=1))
    fig, ((ax,),) = _figure(size=(max(6, 1.3 * len(classes) + 2), 4.5))
    k, width = np.arange(len(classes)), 0.8 / table.shape[1]
    for j, split in enumerate(table.columns):
        bars = ax.bar(k + (j - (table.shape[1] - 1) / 2) * width, table[split], width, label=split)
        ax.bar_label(bars, fontsize=6, rotation=90, padding=2)
    ax.set_yscale("log")
    ax.set_ylim(0.8, table.to_numpy().max() * 3)  # a class with 1 image still shows a bar; room for the labels
    ax.set_xticks(k, [(names or {}).get(c, c) for c in classes], rotation=30 if len(classes) > 2 else 0, ha="right")
    ax.set(title="Images per class, overall and per split", xlabel="class", ylabel="images (log scale)")
    ax.legend(title="split")
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------------------- save
def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG (110 dpi, tight box), creating folders; then close it (a no-op unless pyplot made it).

    The figure's title goes into the PNG's "Title" text, where the HTML pages find their images' alt text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = " ".join(fig.get_suptitle().split())
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Title": title} if title else None)
    plt.close(fig)
    return path
