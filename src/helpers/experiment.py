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

from . import clinical as C
from . import data as D
from . import runlock
from . import metrics as M
from . import plots as P
from .config import output_dirs, project_root, recipe as get_recipe, recipe_seeds, weights_label
from .augment import to_input
from .explain import gradcam, last_conv_layer
from .report import model_card, provenance_line
from .model import build_model, count_parameters, load_trained, save_trained
from .device import device_label, pick_device
from .evaluate import choose_tau, decide, decision_bias, predict_proba
from .train import fit, seed_everything

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


def data_label(df: pd.DataFrame) -> str:
    """'HAM10000 @ 200x150' for the downsampled mirror; the originals are 600x450."""
    with Image.open(df.path.iloc[0]) as img:
        w, h = img.size
    return "HAM10000 (600x450 originals)" if (w, h) == (600, 450) else f"HAM10000 @ {w}x{h}"


def data_source(root: Path) -> str:
    """Where the data came from, without a machine's private layout: relative to the project when it is beside it,
    kagglehub's handle when it came from there, else the folder's name."""
    root = Path(root).resolve()
    base = project_root().resolve()
    if base.parent in root.parents or root == base.parent:
        return os.path.relpath(root, base)
    if "kagglehub" in root.parts:
        return f"kagglehub:{D.KAGGLE_HANDLE}"
    return f"<{root.name}>"


def provenance(cfg: dict, df: pd.DataFrame, data_dir: Path, device=None) -> dict:
    import kornia
    import sklearn
    import torchvision

    return {
        "data": data_label(df), "data_dir": data_source(data_dir), "images": len(df), "task": cfg["task"],
        "image_size": f"{cfg['image_size']}x{cfg['image_size']}", "split_seed": cfg["split_seed"],
        "split_fractions": list(cfg["split_fractions"]), "weights": weights_label(cfg["weights"]),
        "profile": cfg["name"], "git_commit": git_commit(), "device": device_label(device or cfg["device"]),
        "packages": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "kornia": kornia.__version__, "scikit-learn": sklearn.__version__,
                     "pandas": pd.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


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
def predictions_frame(df: pd.DataFrame, probs: np.ndarray, classes, bias=None) -> pd.DataFrame:
    """One row per image: ids, true label, predicted class (``evaluate.decide``: argmax, or with the run's logit
    adjustment) and the probability of every class."""
    out = df[["image_id", "lesion_id", "dx", "label"]].reset_index(drop=True).copy()
    out["pred"] = decide(probs, bias)
    for i, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, i]
    return out


def subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` training rows, drawn by whole lesions and stratified by class: leakage-free.

    Each class gets its share of ``n`` images (at least one lesion); lesions are taken in a seeded random order
    while they fit, so the result never exceeds ``n`` unless ``n`` is below the number of classes.
    """
    if n is None or len(df) <= n:
        return df
    frac = n / len(df)
    keep = []
    for _, g in df.groupby("dx", sort=True):
        budget = max(1, int(len(g) * frac))
        sizes = g.groupby("lesion_id").size().sample(frac=1.0, random_state=seed)
        taken = sizes[sizes.cumsum() <= budget]
        keep += list(taken.index) if len(taken) else [sizes.index[0]]
    return df[df.lesion_id.isin(keep)]


# The source that shapes a trained model: change any of these and a finished run is retrained, not reloaded.
TRAINING_SOURCES = ("model.py", "train.py", "augment.py", "evaluate.py", "device.py")
SOURCE_DIR = Path(__file__).parent


def training_sources(r: dict) -> tuple[str, ...]:
    """The modules whose code shapes this run's weights: the metadata encoding too when a branch trains on it."""
    return TRAINING_SOURCES + (("clinical.py",) if r["metadata"] == "joint" else ())


def run_key_parts(r: dict, cfg: dict, data: dict) -> dict:
    """What identifies a training run: recipe, data content (the cache key covers images and resize), split,
    weights, the training code and the torch version."""
    return {"recipe": json.dumps(r, sort_keys=True, default=str), "weights": str(cfg["weights"]),
            "max_train_images": str(cfg["max_train_images"]), "cache": data["cache"]["path"].name,
            "split": hashlib.sha256((data["dirs"]["reports"] / "split.csv").read_bytes()).hexdigest()[:16],
            "torch": torch.__version__,
            **{f"source {f}": hashlib.sha256((SOURCE_DIR / f).read_bytes()).hexdigest()[:16]
               for f in training_sources(r)}}


def clinical_features(r: dict, data: dict) -> tuple[dict | None, dict]:
    """For a ``joint`` run: the encoder (fitted on the training rows) as saved in the checkpoint, and
    ``{split: N x features float tensor}`` in the tensors' row order. Otherwise ``(None, {})``."""
    if r["metadata"] != "joint":
        return None, {}
    df = data["df"]
    encoder = C.ClinicalEncoder.fit(df[df.split == "train"])
    feats = {s: torch.from_numpy(encoder.transform(df[df.split == s])) for s in D.SPLITS}
    return dict(mode="joint", encoder=encoder.to_dict(), features=encoder.names), feats


def run_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def why_retrain(models: Path, run: str, parts: dict) -> str | None:
    """When an earlier checkpoint of ``run`` exists under another key, which parts of the key changed."""
    older = sorted(models.glob(f"{run}-*/key.json"), key=lambda p: p.stat().st_mtime)
    if not older:
        return None
    before = json.loads(older[-1].read_text())
    changed = [k for k in sorted(set(parts) | set(before)) if parts.get(k) != before.get(k)]
    return (f"{run}: retraining, since {', '.join(changed) or 'the key'} changed since "
            f"{older[-1].parent.name}") if changed else None


def superseded(models: Path) -> list[Path]:
    """Checkpoint folders of a profile (``models/<profile>``) that a more recently used folder of the same run
    replaced (``train_or_load`` marks a folder used by touching it)."""
    newest, old = {}, []
    for folder in sorted((p for p in models.glob("*-*") if p.is_dir()), key=lambda p: p.stat().st_mtime):
        run = folder.name.rsplit("-", 1)[0]
        if run in newest:
            old.append(newest[run])
        newest[run] = folder
    return old


def train_or_load(cfg: dict, r: dict, data: dict, progress: bool = True):
    """Train one run (or resume it, or load it when that exact run is finished); returns (model, history, info)."""
    run = r["run_name"]
    parts = run_key_parts(r, cfg, data)
    models = data["dirs"]["models"] / cfg["name"]
    ckpt_dir = models / f"{run}-{run_key(parts)}"
    final = ckpt_dir / "model.pt"
    if not final.exists():  # one writer per run: hold the folder's lock (runlock), or wait and load the holder's
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        runlock.release_all(except_folder=ckpt_dir)  # this process has moved on from any earlier run
        runlock.claim(ckpt_dir, final)
    if final.exists():  # finished: the best weights are kept once, in model.pt
        runlock.release_all()
        os.utime(ckpt_dir)  # "last used": superseded() keeps the folder a profile uses now
        model, meta = load_trained(final)
        return model, pd.DataFrame(meta["history"]), meta["info"], ckpt_dir
    note = why_retrain(models, run, parts)
    if note and progress:
        print(note)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "key.json").write_text(json.dumps(parts, indent=1))
    train_df = data["df"][data["df"].split == "train"]
    keep = subsample(train_df, cfg["max_train_images"], r["seed"])
    mask = torch.tensor(train_df.image_id.isin(keep.image_id).to_numpy())
    x_train, y_train = data["tensors"]["train"]
    clinical, feats = clinical_features(r, data)
    seed_everything(r["seed"])  # the initial weights too, not only fit's shuffling and augmentation
    model = build_model(r["arch"], len(data["classes"]), cfg["weights"], r["freeze_backbone"], r["head"],
                        r["dropout"], meta_features=len(clinical["features"]) if clinical else 0)
    train = (x_train[mask], y_train[mask]) + ((feats["train"][mask],) if clinical else ())
    val = data["tensors"]["val"] + ((feats["val"],) if clinical else ())
    t0 = time.perf_counter()
    try:  # the lock stays held until run_recipe has written model.pt (released by the next run or the process)
        model, history, info = fit(model, train, val, r, ckpt_dir, device=pick_device(cfg["device"]),
                                   progress=progress)
    except BaseException:
        runlock.release(ckpt_dir)
        raise
    info.update(wall_seconds=time.perf_counter() - t0, train_images=int(mask.sum()))
    return model, history, info, ckpt_dir


def run_recipe(cfg: dict, arch: str, recipe_name: str, data: dict, seed: int | None = None,
               progress: bool = True) -> dict:
    """Train (or resume, or load) ``arch`` with a recipe of the profile and one training seed; evaluate on val and
    test; write reports under ``reports/<arch>_<recipe>_s<seed>/``.

    With ``metadata: late`` the run also gets its fused twin, ``reports/<run>_meta/`` (``result["twin"]``): the
    same network fused with a metadata model of age, sex and site (``clinical``), fitted on the training split with
    its weight chosen on validation, saved inside the same checkpoint."""
    r = get_recipe(cfg, arch, recipe_name, seed)
    classes, df, tensors = data["classes"], data["df"], data["tensors"]
    device = pick_device(cfg["device"])
    model, history, info, ckpt_dir = train_or_load(cfg, r, data, progress)
    clinical, feats = clinical_features(r, data)
    probs = {s: predict_proba(model, tensors[s][0], cfg["eval_batch_size"], device, tta=r["tta"],
                              size=cfg["image_size"], meta=feats.get(s)) for s in ("val", "test")}
    if r["metadata"] == "late":  # fitted on train, weight chosen on validation: no test label is read
        clinical = C.fit_late_fusion(df, probs["val"], len(classes))
    meta = dict(arch=arch, recipe=recipe_name, seed=r["seed"], model_name=f"{arch}_{recipe_name}",
                classes=list(classes), task=cfg["task"], image_size=cfg["image_size"], head=r["head"],
                dropout=r["dropout"], weights=cfg["weights"], freeze_backbone=r["freeze_backbone"], tta=r["tta"],
                select_metric=r["select_metric"], recipe_settings=r, profile=cfg["name"], clinical=clinical,
                uses_metadata=r["metadata"] == "joint", provenance=data["provenance"], info=info)
    model_path = ckpt_dir / "model.pt"
    meta["checkpoint"] = str(model_path)
    result = report_run(cfg, data, r, r["run_name"], probs, meta, model, history, info, feats)
    result["twin"] = None
    if r["metadata"] == "late":
        fused = {s: C.late_fusion_proba(clinical, probs[s], df[df.split == s]) for s in probs}
        twin_meta = {**meta, "model_name": f"{arch}_{recipe_name} + metadata", "uses_metadata": True,
                     "fusion": "late", "image_run": r["run_name"]}
        result["twin"] = report_run(cfg, data, r, f"{r['run_name']}_meta", fused, twin_meta, model, history, info,
                                    feats, figures=("evaluation", "reliability"))
        # The fused model's own decision rule travels with it in the checkpoint.
        clinical.update(decision_bias=result["twin"]["meta"]["decision_bias"],
                        malignancy_threshold=result["twin"]["meta"]["malignancy_threshold"])
    if not model_path.exists():
        saved = {k: v for k, v in result["meta"].items() if k != "checkpoint"}
        save_trained(model, {**saved, "clinical": clinical, "history": history.to_dict("records")}, model_path)
        (ckpt_dir / "last.pt").unlink(missing_ok=True)  # finished: optimiser state is no longer needed
    return result


def report_run(cfg: dict, data: dict, r: dict, run: str, probs: dict, meta: dict, model, history, info, feats,
               figures=None) -> dict:
    """Decision rule, metrics and files of one reported model (an image run or its fused twin) from its
    validation and test probabilities, under ``reports/<run>/``."""
    classes, df, tensors = data["classes"], data["df"], data["tensors"]
    out = data["dirs"]["reports"] / run
    out.mkdir(parents=True, exist_ok=True)
    # The decision rule: plain argmax, or logit adjustment with tau chosen on validation (never on test).
    prior = np.bincount(tensors["train"][1].numpy(), minlength=len(classes)) / len(tensors["train"][1])
    tau, sweep = choose_tau(probs["val"], tensors["val"][1].numpy(), prior) if r["logit_adjust"] else (0.0, [])
    bias = decision_bias(prior, tau).tolist() if tau else None
    info = {**info, "logit_adjust_tau": tau, "logit_adjust_sweep": sweep}
    preds = {s: predictions_frame(df[df.split == s], probs[s], classes, bias) for s in probs}
    threshold = M.threshold_for_sensitivity(*M.malignancy_score(preds["val"], classes), target=0.95) \
        if M.has_malignancy_view(classes) else None
    table = M.summary_with_ci(preds["test"], classes, threshold=threshold, val_pred=preds["val"],
                              n_boot=cfg["bootstrap"], seed=0)
    meta = {**meta, "run_name": run, "malignancy_threshold": threshold, "decision_bias": bias, "info": info}

    history.to_csv(out / "history.csv", index=False)
    for s, p in preds.items():
        p.to_csv(out / f"predictions_{s}.csv", index=False, float_format="%.6f")
    table.to_csv(out / "metrics.csv", index=False, float_format="%.4f")
    M.classification_table(preds["test"], classes).to_csv(out / "classification_report.csv", float_format="%.4f")
    (out / "model_card.md").write_text(model_card(meta, table))
    (out / "run.json").write_text(json.dumps({**meta, "checkpoint": os.path.relpath(meta["checkpoint"], out)},
                                             indent=1, default=str))
    result = dict(run=run, arch=meta["arch"], recipe=meta["recipe"], seed=r["seed"], model=model, history=history,
                  info=info, meta=meta, preds=preds, metrics=table, threshold=threshold, out=out)
    result["figures"] = run_figures(result, data, cfg, feats.get("test"), figures)
    return result


def check_runs(results: dict, data: dict) -> str:
    """The model notebooks' invariants (a regression fails the notebook, and nbval): metrics in range, test
    predictions cover the test split once with no lesion seen in training, history and figures written, and the
    saved model loads back with the same classes. Returns a one-line summary."""
    test_n = int((data["df"].split == "test").sum())
    train_lesions = set(data["df"][data["df"].split == "train"].lesion_id)
    for name, res in results.items():
        m = res["metrics"].set_index("metric")["value"]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["balanced_accuracy"] <= 1, (name, m)
        pred = res["preds"]["test"]
        assert pred.image_id.is_unique and len(pred) == test_n, name
        assert set(pred.lesion_id).isdisjoint(train_lesions), f"{name}: a test lesion was in training"
        assert len(res["history"]) == res["info"]["epochs_run"] >= 1, name
        assert all(Path(p).exists() for p in res["figures"].values()), name
        _, meta = load_trained(res["meta"]["checkpoint"])
        assert meta["classes"] == list(data["classes"]), name
    return "ok: " + ", ".join(f"{n}: accuracy {r['metrics'].set_index('metric').value['accuracy']:.3f}"
                              for n, r in results.items())


def run_figures(result: dict, data: dict, cfg: dict, test_meta=None, which=None) -> dict:
    """The per-model figures, saved as PNG under the run's report folder; returns {name: path}. ``which``: a subset
    of names (a fused twin shares its network's curves and Grad-CAM, so it draws only its own evaluation)."""
    classes, out, run = data["classes"], result["out"], result["run"]
    title = f"{run} — {provenance_line(data['provenance'])}"
    test_df = data["df"][data["df"].split == "test"].reset_index(drop=True)
    test_images = data["tensors"]["test"][0]
    which = set(which or ("curves", "evaluation", "reliability", "errors", "gradcam"))
    draw = {
        "curves": lambda: P.history_curves(result["history"], f"Training curves: {title}",
                                           best_epoch=result["info"]["best_epoch"]),
        "evaluation": lambda: P.evaluation_panel(result["preds"]["test"], classes, f"Test split: {title}"),
        "reliability": lambda: P.reliability_diagram(result["preds"]["test"], classes, f"Calibration (test): {run}"),
        "errors": lambda: P.error_grid(test_images.numpy(), result["preds"]["test"], classes, n=16,
                                       title=f"Most confident test errors: {run}"),
    }
    figs = {name: fn() for name, fn in draw.items() if name in which}
    if "gradcam" not in which:
        return {name: P.save(fig, out / f"{name}.png") for name, fig in figs.items()}
    # Grad-CAM on a few test images per class: where the network looked for its predicted class.
    pick = np.concatenate([np.flatnonzero(test_df.label.to_numpy() == k)[:cfg["gradcam_per_class"]]
                           for k in range(len(classes))])
    model = result["model"]
    x = test_images[pick]
    device = next(model.parameters()).device
    heat = gradcam(model, to_input(x.to(device), cfg["image_size"]), last_conv_layer(model),
                   meta=None if test_meta is None else test_meta[pick])
    figs["gradcam"] = P.gradcam_grid(x.numpy(), heat, test_df.label.to_numpy()[pick],
                                     result["preds"]["test"].pred.to_numpy()[pick], classes,
                                     title=f"Grad-CAM (test images): {run}")
    return {name: P.save(fig, out / f"{name}.png") for name, fig in figs.items()}


RECIPE_KEYS = ["head", "freeze_backbone", "optimizer", "lr", "schedule", "batch_size", "epochs",
               "resolution_schedule", "augment", "label_smoothing", "tta", "metadata", "select_metric", "patience"]


def recipe_table(cfg: dict, arch: str, recipes, num_classes: int) -> pd.DataFrame:
    """The settings of each recipe a notebook is about to train, its seeds and its trainable-parameter count."""
    rows = {}
    for name in recipes:
        r = get_recipe(cfg, arch, name)
        rows[name] = {**{k: r.get(k) for k in RECIPE_KEYS}, "seeds": recipe_seeds(cfg, arch, name),
                      **trainable_summary(cfg, arch, name, num_classes)}
    return pd.DataFrame(rows).T.rename(columns={"trainable": "trainable params", "total": "total params"})


def recipe_notes(cfg: dict, arch: str, recipes) -> list[str]:
    """Where the profile changes a recipe for this model, and why it says so (e.g. no ImageNet weights)."""
    notes = []
    for name in recipes:
        over = {k: v for k, v in cfg.get("recipe_overrides", {}).get(f"{arch}/{name}", {}).items() if k != "seeds"}
        base = cfg["recipes"][name]
        if base.get("freeze_backbone") and not over.get("freeze_backbone", True) and cfg["weights"] is None:
            notes.append(f"{arch}/{name}: the recipe freezes an ImageNet backbone, and this profile has no ImageNet "
                         f"weights ({weights_label(cfg['weights'])}); it runs its nearest honest variant: the same "
                         f"head, optimiser, lr, batch and augmentation, with the backbone trained too.")
        elif over:
            notes.append(f"{arch}/{name}: this profile overrides {over}.")
    return notes


def trainable_summary(cfg: dict, arch: str, recipe_name: str, num_classes: int) -> dict:
    """Parameter counts for a recipe's model without training it (shown before training in the notebooks)."""
    r = get_recipe(cfg, arch, recipe_name)
    m = build_model(arch, num_classes, None, False, r["head"], r["dropout"])
    head = sum(p.numel() for n, p in m.named_parameters() if n.startswith("fc."))
    return dict(total=count_parameters(m, False), trainable=head if r["freeze_backbone"] else count_parameters(m))


__all__ = ["prepare_data", "load_data", "run_recipe", "check_runs", "load_trained", "provenance",
           "provenance_line", "trainable_summary", "predictions_frame", "subsample", "superseded"]


def main(argv=None) -> int:
    """``python -m helpers.experiment prune PROFILE [--delete]``: list (or delete) superseded checkpoint folders."""
    import argparse
    import shutil

    p = argparse.ArgumentParser(prog="python -m helpers.experiment")
    sub = p.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="checkpoint folders of a profile that a newer run of the same name replaced")
    prune.add_argument("profile")
    prune.add_argument("--delete", action="store_true", help="delete them (default: only list them)")
    args = p.parse_args(argv)
    folder = output_dirs(create=False)["models"] / args.profile
    old = superseded(folder) if folder.is_dir() else []
    size = sum(f.stat().st_size for d in old for f in d.rglob("*") if f.is_file())
    for d in old:
        print(f"{'deleting' if args.delete else 'superseded'}: {d}")
        if args.delete:
            shutil.rmtree(d)
    if old:
        print(f"{len(old)} superseded checkpoint folder(s), {size / 2**20:.0f} MiB"
              + ("" if args.delete else f"; delete with: python -m helpers.experiment prune {args.profile} --delete"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
