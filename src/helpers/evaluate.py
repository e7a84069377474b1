"""Evaluation-time prediction and the validation scores that select epochs and models.

Kept apart from the training loop: ``train.fit`` calls ``val_scores(predict_proba(...))`` once per epoch, and the
reports, ``predict`` and ``external`` call the same ``predict_proba``, so every number in the study comes from one
preprocessing path (the cache's resize, then ``augment.Preprocess`` without augmentation).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from .augment import Preprocess
from .device import autocast, pick_device


def dihedral_views(x: torch.Tensor):
    """The 8 symmetries of the square (4 rotations x optional flip): a lesion has no up, so each is a fair view."""
    for flip in (False, True):
        v = x.flip(-1) if flip else x
        for k in range(4):
            yield torch.rot90(v, k, dims=(-2, -1))


@torch.no_grad()
def predict_proba(model, images_uint8: torch.Tensor, batch_size: int = 256, device=None, tta: bool = False,
                  size: int | None = None, meta: torch.Tensor | None = None) -> np.ndarray:
    """Class probabilities (N x C, float64) for uint8 N x 3 x H x W images; model in eval mode, no augmentation.

    ``size`` resizes on the fly (evaluate at another resolution than the cache's); ``tta`` averages the softmax
    over the 8 dihedral views (8x the cost); ``meta`` (N x features) feeds a model's metadata branch.
    """
    device = pick_device(device) if device is None or isinstance(device, str) else device
    model.eval()
    prep = Preprocess().to(device)
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = prep(images_uint8[i:i + batch_size].to(device, non_blocking=True), size)
        m = None if meta is None else meta[i:i + batch_size].to(device)
        views = list(dihedral_views(x)) if tta else [x]
        p = 0
        for v in views:
            v = v.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                p = p + torch.softmax((model(v) if m is None else model(v, m)).float(), 1)
        out.append((p / len(views)).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


def val_scores(probs: np.ndarray, labels) -> dict:
    """Validation numbers that select epochs and models: loss, accuracy, balanced accuracy, macro one-vs-rest AUC."""
    labels = np.asarray(labels)
    n = probs.shape[1]
    loss = float(log_loss(labels, probs / probs.sum(1, keepdims=True), labels=list(range(n))))
    pred = probs.argmax(1)
    try:
        if n == 2:
            auc = roc_auc_score(labels, probs[:, 1])
        else:
            auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(n)))
    except ValueError:  # a class absent from this split (tiny smoke data)
        auc = float("nan")
    return dict(val_loss=loss, val_acc=float((pred == labels).mean()),
                val_bal_acc=float(balanced_accuracy_score(labels, pred)), val_auc=float(auc))


# ------------------------------------------------------------------------------------------- the decision rule
# A network trained on HAM10000's prior (2 of 3 images are nevi) predicts the majority class whenever in doubt. Post-hoc
# logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021) subtracts tau x log(prior) from
# the log-probabilities before the argmax: tau = 0 is the plain argmax, tau = 1 the balanced-error-optimal rule. The
# probabilities (and so every AUC) are unchanged; only the predicted class moves. tau is chosen on validation.
TAU_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def decision_bias(prior, tau: float) -> np.ndarray:
    """The per-class offset added to log-probabilities: -tau * log(prior)."""
    return -tau * np.log(np.clip(np.asarray(prior, dtype=float), 1e-12, None))


def decide(probs: np.ndarray, bias=None) -> np.ndarray:
    """Predicted class per row: argmax of log p + bias (no bias: plain argmax)."""
    if bias is None:
        return probs.argmax(1)
    return (np.log(np.clip(probs, 1e-12, None)) + np.asarray(bias)[None, :]).argmax(1)


def choose_tau(probs: np.ndarray, labels, prior, grid=TAU_GRID) -> tuple[float, list[dict]]:
    """The tau that maximises the mean of accuracy and balanced accuracy on validation (ties: the smaller tau), and
    the whole sweep. The mean of the two asks for a rule that serves the rare classes without giving up the common
    one; balanced accuracy alone would trade away most of the nevi."""
    labels = np.asarray(labels)
    sweep = []
    for tau in grid:
        pred = decide(probs, decision_bias(prior, tau))
        acc, bal = float((pred == labels).mean()), float(balanced_accuracy_score(labels, pred))
        sweep.append(dict(tau=float(tau), val_acc=acc, val_bal_acc=bal, criterion=(acc + bal) / 2))
    best = max(sweep, key=lambda row: (round(row["criterion"], 12), -row["tau"]))
    return best["tau"], sweep
