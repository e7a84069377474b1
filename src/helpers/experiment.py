"""The steps the notebooks call, in the order data flows: raw data -> split + cache -> trained model -> reports.

``prepare_data`` (01_etl) writes the split; ``load_data`` (02-05) reads it back with the decoded images;
``run_recipe`` (02-04) trains one model with one recipe, or loads it when that exact run is already finished, and
writes its predictions, metrics and figures under ``reports/<arch>_<recipe>/``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from . import data as D
from . import metrics as M
from . import plots as P
from .config import output_dirs, recipe as get_recipe, weights_label
from .explain import gradcam, last_conv_layer
from .report import model_card
from .model import build_model, count_parameters, load_trained, save_trained
from .train import fit, pick_device, predict_proba, seed_everything, subsample

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- provenance
def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # Generated outputs (reports/, the README's results block) do not make the code "uncommitted".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)reports", ":(top,exclude)README.md"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+uncommitted" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device=None) -> str:
    device = pick_device(device if isinstance(device, str) else None) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def data_label(df: pd.DataFrame) -> str:
    """'HAM10000 @ 200x150' for the downsampled mirror; the originals are 600x450."""
    with Image.open(df.path.iloc[0]) as img:
        w, h = img.size
    return "HAM10000 (600x450 originals)" if (w, h) == (600, 450) else f"HAM10000 @ {w}x{h}"


def provenance(cfg: dict, df: pd.DataFrame, data_dir: Path, device=None) -> dict:
    import kornia
    import sklearn
    import torchvision

    return {
        "data": data_label(df), "data_dir": str(data_dir), "images": len(df), "task": cfg["task"],
        "image_size": f"{cfg['image_size']}x{cfg['image_size']}", "split_seed": cfg["split_seed"],
        "split_fractions": list(cfg["split_fractions"]), "weights": weights_label(cfg["weights"]),
        "profile": cfg["name"], "git_commit": git_commit(), "device": device_name(device or cfg["device"]),
        "packages": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "kornia": kornia.__version__, "scikit-learn": sklearn.__version__,
                     "pandas": pd.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def provenance_line(p: dict) -> str:
    return (f"{p['data']}, {p['image_size']} input, split seed {p['split_seed']} (lesion-grouped "
            f"{'/'.join(str(round(f * 100)) for f in p['split_fractions'])}), {p['weights']}, profile {p['profile']}")


# ------------------------------------------------------------------------------------------------------- data
def prepare_data(cfg: dict, data_dir=None) -> dict:
    """01_etl: metadata -> lesion-grouped split (saved) -> decoded-image cache. Returns what load_data returns."""
    root = D.find_dataset(data_dir)
    df = D.load_metadata(root, cfg["task"])
    df = D.split_by_lesion(df, cfg["split_fractions"], cfg["split_seed"])
    dirs = output_dirs(cfg)
    # Continue from the saved file, exactly as notebooks 02-05 will: same row order, so one decoded-image cache.
    df = D.load_split(D.save_split(df, dirs["reports"] / "split.csv"), root, cfg["task"])
    return _with_cache(cfg, df, root, dirs)


def load_data(cfg: dict, data_dir=None) -> dict:
    """02-05: the split written by 01_etl, with image paths and the decoded images."""
    dirs = output_dirs(cfg)
    split_csv = dirs["reports"] / "split.csv"
    if not split_csv.exists():
        raise FileNotFoundError(f"{split_csv} not found: run notebooks/01_etl.ipynb first (./run_all.sh does)")
    root = D.find_dataset(data_dir)
    return _with_cache(cfg, D.load_split(split_csv, root, cfg["task"]), root, dirs)


def _with_cache(cfg, df, root, dirs):
    cache = D.build_cache(df, cfg["image_size"], dirs["cache"])
    return dict(df=df, classes=df.attrs["classes"], root=root, cache=cache, images=cache["images"],
                tensors=D.split_tensors(df, cache["images"]), dirs=dirs,
                provenance=provenance(cfg, df, root))


# ------------------------------------------------------------------------------------------------- one model
def predictions_frame(df: pd.DataFrame, probs: np.ndarray, classes) -> pd.DataFrame:
    out = df[["image_id", "lesion_id", "dx", "label"]].reset_index(drop=True).copy()
    out["pred"] = probs.argmax(1)
    for i, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, i]
    return out


def run_key(r: dict, cfg: dict, data: dict) -> str:
    """Identifies a training run: recipe, data content, split and weights. A finished run with the same key is
    loaded instead of retrained; anything else starts (or resumes) its own checkpoint folder."""
    split_bytes = (data["dirs"]["reports"] / "split.csv").read_bytes()
    blob = json.dumps([r, cfg["weights"], cfg["max_train_images"], data["cache"]["path"].name,
                       hashlib.sha256(split_bytes).hexdigest()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_recipe(cfg: dict, arch: str, recipe_name: str, data: dict, progress: bool = True) -> dict:
    """Train (or resume, or load) ``arch`` with a recipe of the profile; evaluate on val and test; write reports."""
    r = get_recipe(cfg, arch, recipe_name)
    classes, df, tensors = data["classes"], data["df"], data["tensors"]
    run = r["run_name"]
    out = data["dirs"]["reports"] / run
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = data["dirs"]["models"] / cfg["name"] / f"{run}-{run_key(r, cfg, data)}"
    device = pick_device(cfg["device"])

    train_df = df[df.split == "train"]
    keep = subsample(train_df, cfg["max_train_images"], r.get("seed", 0))
    mask = torch.tensor(train_df.image_id.isin(keep.image_id).to_numpy())
    x_train, y_train = tensors["train"]
    train = (x_train[mask], y_train[mask])

    seed_everything(r["seed"])  # the initial weights too, not only fit's shuffling and augmentation
    model = build_model(arch, len(classes), cfg["weights"], r["freeze_backbone"], r["head"], r["dropout"])
    t0 = time.perf_counter()
    model, history, info = fit(model, train, tensors["val"], r, ckpt_dir, device=device, progress=progress)
    info.update(wall_seconds=time.perf_counter() - t0, train_images=int(mask.sum()))

    probs = {s: predict_proba(model, tensors[s][0], cfg["eval_batch_size"], device) for s in ("val", "test")}
    preds = {s: predictions_frame(df[df.split == s], probs[s], classes) for s in probs}
    threshold = M.threshold_for_sensitivity(*M.malignancy_score(preds["val"], classes), target=0.95) \
        if M.has_malignancy_view(classes) else None
    table = M.summary_with_ci(preds["test"], classes, threshold=threshold, n_boot=cfg["bootstrap"], seed=0)

    meta = dict(arch=arch, recipe=recipe_name, run_name=run, classes=list(classes), task=cfg["task"],
                image_size=cfg["image_size"], head=r["head"], dropout=r["dropout"], weights=cfg["weights"],
                freeze_backbone=r["freeze_backbone"], recipe_settings=r, profile=cfg["name"],
                malignancy_threshold=threshold, provenance=data["provenance"], info=info)
    model_path = save_trained(model, meta, ckpt_dir / "model.pt")
    meta["checkpoint"] = str(model_path)

    history.to_csv(out / "history.csv", index=False)
    for s, p in preds.items():
        p.to_csv(out / f"predictions_{s}.csv", index=False, float_format="%.6f")
    table.to_csv(out / "metrics.csv", index=False, float_format="%.4f")
    M.classification_table(preds["test"], classes).to_csv(out / "classification_report.csv", float_format="%.4f")
    (out / "model_card.md").write_text(model_card(meta, table))
    (out / "run.json").write_text(json.dumps({**meta, "checkpoint": os.path.relpath(model_path, out)},
                                             indent=1, default=str))
    result = dict(run=run, arch=arch, recipe=recipe_name, model=model, history=history, info=info, meta=meta,
                  preds=preds, metrics=table, threshold=threshold, out=out)
    result["figures"] = run_figures(result, data, cfg)
    return result


def run_figures(result: dict, data: dict, cfg: dict) -> dict:
    """The per-model figures, saved as PNG under the run's report folder; returns {name: path}."""
    classes, out, run = data["classes"], result["out"], result["run"]
    title = f"{run} — {provenance_line(data['provenance'])}"
    test_df = data["df"][data["df"].split == "test"].reset_index(drop=True)
    test_images = data["tensors"]["test"][0]
    figs = {
        "curves": P.history_curves(result["history"], f"Training curves: {title}",
                                   best_epoch=result["info"]["best_epoch"]),
        "evaluation": P.evaluation_panel(result["preds"]["test"], classes, f"Test split: {title}"),
        "reliability": P.reliability_diagram(result["preds"]["test"], classes, f"Calibration (test): {run}"),
        "errors": P.error_grid(test_images.numpy(), result["preds"]["test"], classes, n=16,
                               title=f"Most confident test errors: {run}"),
    }
    # Grad-CAM on a few test images per class: where the network looked for its predicted class.
    pick = np.concatenate([np.flatnonzero(test_df.label.to_numpy() == k)[:cfg["gradcam_per_class"]]
                           for k in range(len(classes))])
    model = result["model"]
    x = test_images[pick]
    from .augment import to_input
    device = next(model.parameters()).device
    heat = gradcam(model, to_input(x.to(device)), last_conv_layer(model))
    figs["gradcam"] = P.gradcam_grid(x.numpy(), heat, test_df.label.to_numpy()[pick],
                                     result["preds"]["test"].pred.to_numpy()[pick], classes,
                                     title=f"Grad-CAM (test images): {run}")
    return {name: P.save(fig, out / f"{name}.png") for name, fig in figs.items()}


def trainable_summary(cfg: dict, arch: str, recipe_name: str, num_classes: int) -> dict:
    """Parameter counts for a recipe's model without training it (shown before training in the notebooks)."""
    r = get_recipe(cfg, arch, recipe_name)
    m = build_model(arch, num_classes, None, False, r["head"], r["dropout"])
    head = sum(p.numel() for n, p in m.named_parameters() if n.startswith("fc."))
    return dict(total=count_parameters(m, False), trainable=head if r["freeze_backbone"] else count_parameters(m))


__all__ = ["prepare_data", "load_data", "run_recipe", "load_trained", "provenance", "provenance_line",
           "trainable_summary", "predictions_frame"]
