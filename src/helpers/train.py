"""One training loop for every model: fast on a GPU, exact on a CPU, resumable everywhere.

``fit`` reads batches straight from the uint8 image tensor (moved to the GPU once when there is one), augments and
normalises them on the device, and trains with bf16 autocast and channels_last on CUDA (fp32 on the CPU). After each
epoch it validates, keeps the best weights by a validation metric, and writes a checkpoint holding everything
needed to continue bit-for-bit: model, optimiser, scheduler, scaler, every RNG state and the history.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from tqdm import tqdm  # text bars: they render in JupyterLab and in the HTML reports alike, no widgets

from .augment import make_augment, to_input
from .model import count_parameters, train_mode

# What a recipe may set, with defaults. The profiles fill these in; unknown keys are refused.
DEFAULTS = dict(
    epochs=10, batch_size=32, optimizer="adam", lr=3e-4, weight_decay=0.0, momentum=0.9, schedule="none",
    warmup_epochs=0, label_smoothing=0.0, class_weighting="none", sampler="shuffle", augment="seed",
    select_metric="val_loss", patience=None, seed=0, compile=False, max_train_images=None,
    # model options, read by build_model
    arch="resnet34", head="linear", dropout=0.0, freeze_backbone=False, recipe="", run_name="",
)
HIGHER_IS_BETTER = {"val_loss": False, "val_acc": True, "val_bal_acc": True, "val_auc": True}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_recipe(recipe: dict) -> dict:
    unknown = sorted(set(recipe) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"unknown recipe setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    r = {**DEFAULTS, **recipe}
    checks = {
        "optimizer": ("adam", "adamw", "sgd"), "schedule": ("none", "cosine", "onecycle"),
        "class_weighting": ("none", "balanced"), "sampler": ("shuffle", "balanced"),
        "select_metric": tuple(HIGHER_IS_BETTER), "augment": ("none", "seed", "strong"),
    }
    for key, allowed in checks.items():
        if r[key] not in allowed:
            raise ValueError(f"recipe {key}={r[key]!r}; allowed: {allowed}")
    for key in ("epochs", "batch_size"):
        if not isinstance(r[key], int) or r[key] < 1:
            raise ValueError(f"recipe {key} must be a positive integer, not {r[key]!r}")
    if not (r["lr"] > 0):
        raise ValueError(f"recipe lr must be positive, not {r['lr']!r}")
    return r


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA where supported, else fp16 (with a GradScaler in fit); fp32 on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator) -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                generator=generator.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_proba(model, images_uint8: torch.Tensor, batch_size: int = 256, device=None) -> np.ndarray:
    """Class probabilities (N x C, float64) for uint8 images, no augmentation, model in eval mode."""
    device = pick_device(device) if device is None or isinstance(device, str) else device
    model.eval()
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = to_input(images_uint8[i:i + batch_size].to(device, non_blocking=True))
        with autocast(device):
            out.append(torch.softmax(model(x).float(), 1).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Validation numbers used to select epochs: loss, accuracy, balanced accuracy, macro one-vs-rest AUC."""
    labels = np.asarray(labels)
    eps = 1e-12
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + eps)))
    pred = probs.argmax(1)
    n = probs.shape[1]
    try:
        if n == 2:
            auc = roc_auc_score(labels, probs[:, 1])
        else:
            auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(n)))
    except ValueError:  # a class absent from this split (tiny smoke data)
        auc = float("nan")
    return dict(val_loss=loss, val_acc=float((pred == labels).mean()),
                val_bal_acc=float(balanced_accuracy_score(labels, pred)), val_auc=float(auc))


# --------------------------------------------------------------------------------------------------- training
def _optimizer(params, r):
    if r["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=r["lr"], weight_decay=r["weight_decay"])
    if r["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    return torch.optim.SGD(params, lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"], nesterov=True)


def _scheduler(opt, r, steps_per_epoch):
    total = r["epochs"] * steps_per_epoch
    if r["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=total, pct_start=0.25)
    if r["schedule"] == "cosine":
        warm = r["warmup_epochs"] * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _batches(labels: torch.Tensor, r, generator) -> list[torch.Tensor]:
    """Index batches for one epoch: a shuffle, or class-balanced sampling with replacement."""
    n = len(labels)
    if r["sampler"] == "balanced":
        counts = torch.bincount(labels).float()
        weights = (1.0 / counts)[labels]
        order = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    return [order[i:i + r["batch_size"]] for i in range(0, n, r["batch_size"])]


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint


def fit(model, train: tuple, val: tuple, recipe: dict, ckpt_dir: str | os.PathLike | None = None,
        device=None, progress: bool = True, stop_after_epochs: int | None = None):
    """Train ``model`` on ``train=(uint8 images, labels)``, select on ``val``; returns ``(model, history, info)``.

    With ``ckpt_dir``, ``last.pt`` is written after every epoch and an unfinished run found there is resumed; a
    finished one with the same recipe is loaded instead of retrained. ``stop_after_epochs`` simulates an
    interruption (for tests). The returned model holds the best epoch's weights.
    """
    r = resolve_recipe(recipe)
    device = pick_device(device) if device is None or isinstance(device, str) else device
    seed_everything(r["seed"])
    generator = torch.Generator().manual_seed(r["seed"])
    x_train, y_train = train
    x_val, y_val = val
    if device.type == "cuda":  # the whole uint8 cache fits on the GPU: no loader, no host copies per batch
        x_train = x_train.to(device)
    model.to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if r["compile"] else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, r)
    steps_per_epoch = math.ceil(len(y_train) / r["batch_size"])
    sched = _scheduler(opt, r, steps_per_epoch)
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    augment = make_augment(r["augment"])
    if augment is not None:
        augment = augment.to(device)
    class_weight = None
    if r["class_weighting"] == "balanced":
        counts = torch.bincount(y_train, minlength=int(y_train.max()) + 1).float()
        class_weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
    sign = 1 if HIGHER_IS_BETTER[r["select_metric"]] else -1

    state = dict(epoch=0, history=[], best_score=-math.inf, best_epoch=0, best_state=None, bad_epochs=0, done=False)
    ckpt = Path(ckpt_dir) / "last.pt" if ckpt_dir else None
    if ckpt and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved["recipe"] != r:
            raise RuntimeError(f"{ckpt} was written by a different recipe; delete {ckpt.parent} to start over.\n"
                               f"  saved: {saved['recipe']}\n  now:   {r}")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"], generator)
        state = saved["state"]

    epoch_bar = tqdm(total=r["epochs"], initial=state["epoch"], desc=r["run_name"] or r["arch"],
                     disable=not progress, mininterval=5)
    while not state["done"] and state["epoch"] < r["epochs"]:
        epoch = state["epoch"] + 1
        train_mode(model)
        t0 = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        for step, idx in enumerate(_batches(y_train, r, generator)):
            x = to_input(x_train[idx.to(x_train.device)].to(device, non_blocking=True), augment)
            y = y_train[idx].to(device, non_blocking=True)
            with autocast(device):
                logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=r["label_smoothing"])
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{r['run_name']}: loss is {loss.item()} at epoch {epoch}, step {step}; "
                                       f"the last good checkpoint ({ckpt or 'none'}) is kept. Lower the lr?")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        train_seconds = time.perf_counter() - t0
        val_scores = scores(predict_proba(model, x_val, device=device), y_val.numpy())
        row = dict(epoch=epoch, train_loss=total_loss / seen, train_acc=correct / seen, **val_scores,
                   lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0, img_per_s=seen / train_seconds)
        state["history"].append(row)
        score = sign * row[r["select_metric"]]
        if score > state["best_score"] or state["best_state"] is None:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        if (r["patience"] is not None and state["bad_epochs"] >= r["patience"]) or epoch == r["epochs"]:
            state["done"] = True
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                       scaler=scaler.state_dict(), rng=rng_state(generator), state=state, recipe=r), ckpt)
        epoch_bar.update(1)
        epoch_bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row[r['select_metric']]:.3f}",
                              img_s=f"{row['img_per_s']:.0f}")
        if stop_after_epochs is not None and epoch >= stop_after_epochs and not state["done"]:
            break
    epoch_bar.close()
    model.load_state_dict(state["best_state"])
    history = pd.DataFrame(state["history"])
    info = dict(best_epoch=state["best_epoch"], epochs_run=state["epoch"], finished=state["done"],
                train_seconds=float(history.seconds.sum()) if len(history) else 0.0,
                img_per_s=float(history.img_per_s.median()) if len(history) else 0.0,
                trainable_params=count_parameters(model), total_params=count_parameters(model, False),
                device=str(device), select_metric=r["select_metric"])
    return model, history, info


def subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` training rows, drawn by lesion and stratified by class (quick profiles): leakage-free."""
    if n is None or len(df) <= n:
        return df
    frac = n / len(df)
    lesions = df.drop_duplicates("lesion_id")
    keep = lesions.groupby("dx", group_keys=False).apply(
        lambda g: g.sample(max(1, round(len(g) * frac)), random_state=seed))
    return df[df.lesion_id.isin(keep.lesion_id)]
