"""One training loop for every model: fast on a GPU, exact on a CPU, resumable everywhere.

``fit`` reads batches straight from the uint8 image tensor (moved to the GPU once when there is one, with its labels),
resizes, augments and normalises them on the device, and trains with autocast and channels_last on CUDA (fp32 on the
CPU). Nothing in a step waits on the host: the shuffled order is drawn on the device, loss and accuracy accumulate
there and are read once per epoch, and the NaN check runs every ``check_every`` steps. After each epoch it validates,
keeps the best weights by the profile's selection metric, and writes a checkpoint holding everything needed to
continue bit-for-bit on the CPU: model, optimiser, scheduler, scaler, every RNG state and the history.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .augment import Preprocess
from .config import SELECT_METRICS, compile_allowed, headless, resolve_recipe
from .device import amp_dtype, autocast, pick_device
from .evaluate import predict_proba, val_scores
from .model import count_parameters, train_mode


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def epoch_size(r: dict, epoch: int) -> int:
    """Training resolution of ``epoch`` (1-based)."""
    done = 0
    for size, n in r["resolution_schedule"] or [[r["image_size"], r["epochs"]]]:
        done += n
        if epoch <= done:
            return size
    return r["image_size"]


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


# --------------------------------------------------------------------------------------------------- pieces
def class_weights(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Inverse-frequency weights for the loss (``class_weighting: balanced``): n / (classes x count), so a class
    seen half as often weighs twice as much; a class absent from ``labels`` gets the weight of one image."""
    counts = torch.bincount(labels, minlength=num_classes or int(labels.max()) + 1).float()
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def make_optimizer(params, r, device=torch.device("cpu")):
    # On CUDA the fused kernels keep Adam's step counters on the device: no host loop, no reads per step.
    fused = {"fused": True} if device.type == "cuda" else {}
    if r["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=r["lr"], weight_decay=r["weight_decay"], **fused)
    if r["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"], **fused)
    return torch.optim.SGD(params, lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"], nesterov=True)


def make_scheduler(opt, r, steps_per_epoch):
    total = r["epochs"] * steps_per_epoch
    if r["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=total, pct_start=0.25)
    if r["schedule"] == "cosine":
        warm = r["warmup_epochs"] * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _order(labels: torch.Tensor, r, generator) -> torch.Tensor:
    """One epoch's sample order, drawn on the labels' device: a shuffle, or class-balanced sampling."""
    n = len(labels)
    if r["sampler"] == "balanced":
        weights = (1.0 / torch.bincount(labels).float())[labels]
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator, device=labels.device)


def optimizer_step(opt, sched, scaler) -> bool:
    """One optimiser step, and the schedule advances only when the optimiser really stepped: in fp16 the scaler
    skips steps whose gradients overflowed (it reads its inf flag on the host anyway, so checking costs no extra
    sync). Returns whether it stepped."""
    if not scaler.is_enabled():
        opt.step()
        sched.step()
        return True
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    stepped = scaler.get_scale() >= scale  # the scale only shrinks when the step was skipped
    if stepped:
        sched.step()
    return stepped


def make_step(model, opt, sched, scaler, prep, r: dict, device: torch.device, class_weight=None, step_model=None,
              amp: bool = True):
    """THE training step, the one ``fit``, the benchmark and the run-time estimate all time and run:
    ``step(x_uint8, y, size, meta=None) -> (loss, logits)``, both detached and left on the device (no host sync).

    uint8 batch -> ``prep`` (resize to ``size``, augmentation, normalisation, channels_last) -> forward under the
    device's autocast -> cross-entropy with the recipe's label smoothing and class weights -> backward -> optimiser
    and schedule step. ``meta``: the batch's encoded metadata, for a model with a metadata branch. ``amp=False``:
    fp32 whatever the device (the benchmark's write-up loop)."""
    step_model = step_model or model

    def step(x_uint8, y, size, meta=None):
        x = prep(x_uint8, size, train=True)
        with autocast(device) if amp else nullcontext():
            logits = step_model(x) if meta is None else step_model(x, meta)
            loss = F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=r["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        optimizer_step(opt, sched, scaler)
        return loss.detach(), logits.detach()

    return step


def training_step(model, r: dict, device: torch.device, labels: torch.Tensor, steps_per_epoch: int,
                  step_model=None):
    """The recipe's whole step around ``model``: its optimiser, schedule, grad scaler, augmentation and class
    weights (from ``labels``), put together by ``make_step``. Returns ``(step, opt, sched, scaler)``: ``fit``
    trains with it, and the benchmark and the run-time estimate time exactly this."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], r, device)
    sched = make_scheduler(opt, r, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
    prep = Preprocess(r["augment"]).to(device)
    weight = class_weights(labels) if r["class_weighting"] == "balanced" else None
    return make_step(model, opt, sched, scaler, prep, r, device, weight, step_model), opt, sched, scaler


def train_one_epoch(step, x, y, meta, order, size: int, batch_size: int, check_every: int, on_step=None):
    """One pass over ``order``; returns (summed loss, correct, all finite) as device tensors, read once by the
    caller. The finite check is read on the host every ``check_every`` steps only; a non-finite loss ends the
    epoch early."""
    device = y.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    finite = torch.ones((), device=device, dtype=torch.bool)
    for i, idx in enumerate(order.split(batch_size)):
        loss, logits = step(x[idx], y[idx], size, None if meta is None else meta[idx])
        finite &= torch.isfinite(loss)
        total_loss += loss * len(idx)
        correct += (logits.argmax(1) == y[idx]).sum()
        if (i + 1) % check_every == 0 and not bool(finite):  # one host read every check_every steps
            break
        if on_step is not None:
            on_step()
    return total_loss, correct, finite


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint


class EpochLog:
    """Progress that reads well in both places: a live bar with an ETA over all steps (terminal, JupyterLab) and a
    compact line per epoch; headless runs (``config.headless()``: run_all.sh) get the lines only, so the
    rendered HTML shows a small table instead of blocks of progress output."""

    COLUMNS = ("epoch", "px", "train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc", "val_auc", "s")

    def __init__(self, name: str, total_steps: int, done_steps: int, enabled: bool):
        self.name, self.enabled, self.header = name, enabled, False
        self.bar = None
        if enabled and not headless():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=done_steps, desc=name, unit="step", leave=False,
                            mininterval=1.0, file=sys.stdout)

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def epoch(self, row: dict):
        if not self.enabled:
            return
        if not self.header:
            print(f"{self.name}: " + " ".join(f"{c:>11}" for c in self.COLUMNS), flush=True)
            self.header = True
        vals = [row["epoch"], row["image_size"], *(row[c] for c in self.COLUMNS[2:8]), row["seconds"]]
        text = " " * (len(self.name) + 2) + " ".join(
            f"{v:>11}" if isinstance(v, int) else f"{v:>11.4f}" if abs(v) < 10 else f"{v:>11.1f}" for v in vals)
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------- training
def fit(model, train: tuple, val: tuple, recipe: dict, ckpt_dir: str | os.PathLike | None = None,
        device=None, progress: bool = True, stop_after_epochs: int | None = None):
    """Train ``model`` on ``train=(uint8 images, labels[, metadata])``, select on ``val`` (same form); returns
    ``(model, history, info)``. The metadata element (N x features, float) is for a model with a metadata branch.

    With ``ckpt_dir``, ``last.pt`` is written after every epoch and an unfinished run found there is resumed.
    ``stop_after_epochs`` simulates an interruption (for tests). The returned model holds the best epoch's weights.
    """
    r = resolve_recipe(recipe)
    device = pick_device(device) if device is None or isinstance(device, str) else device
    seed_everything(r["seed"])
    if device.type == "cuda":
        # cuDNN autotuning picks the fastest kernels; it is not bit-deterministic unless deterministic is asked for.
        torch.backends.cudnn.benchmark = not r["deterministic"]
        torch.backends.cudnn.deterministic = r["deterministic"]
    generator = torch.Generator(device=device).manual_seed(r["seed"])
    x_train, y_train, m_train = (*train, None)[:3]
    x_val, y_val, m_val = (*val, None)[:3]
    if (m_train is None) != (getattr(model, "meta_features", 0) == 0):
        raise ValueError("a model with a metadata branch trains with metadata (train=(images, labels, metadata)), "
                         "and a plain one without")
    # The uint8 images and their labels live on the device (the whole cache fits on a GPU): no loader, no host
    # copies per batch. On the CPU this is a no-op.
    x_train, y_train = x_train.to(device), y_train.to(device)
    m_train = None if m_train is None else m_train.to(device)
    model.to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if r["compile"] and compile_allowed() else model
    steps_per_epoch = math.ceil(len(y_train) / r["batch_size"])
    step, opt, sched, scaler = training_step(model, r, device, y_train, steps_per_epoch, step_model)
    sign = 1 if SELECT_METRICS[r["select_metric"]] else -1

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

    log = EpochLog(r["run_name"] or r["arch"], r["epochs"] * steps_per_epoch, state["epoch"] * steps_per_epoch,
                   progress)
    while not state["done"] and state["epoch"] < r["epochs"]:
        epoch = state["epoch"] + 1
        size = epoch_size(r, epoch)
        train_mode(model)
        t0 = time.perf_counter()
        order = _order(y_train, r, generator)
        total_loss, correct, finite = train_one_epoch(step, x_train, y_train, m_train, order, size, r["batch_size"],
                                                      r["check_every"], log.step)
        if not bool(finite):
            raise TrainingDiverged(f"{r['run_name']}: the loss became NaN or infinite in epoch {epoch}; the last good "
                                   f"checkpoint ({ckpt or 'none'}) is kept. Lower the lr?")
        seen = len(order)
        train_seconds = time.perf_counter() - t0
        val = val_scores(predict_proba(model, x_val, device=device, size=r["image_size"], meta=m_val), y_val.numpy())
        prev = state["history"][-1]["train_seconds_cum"] if state["history"] else 0.0
        row = dict(epoch=epoch, image_size=size, train_loss=float(total_loss) / seen, train_acc=int(correct) / seen,
                   **val, lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0,
                   train_seconds_cum=prev + train_seconds, img_per_s=seen / train_seconds)
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
        log.epoch(row)
        if stop_after_epochs is not None and epoch >= stop_after_epochs and not state["done"]:
            break
    log.close()
    model.load_state_dict(state["best_state"])
    history = pd.DataFrame(state["history"])
    info = dict(best_epoch=state["best_epoch"], epochs_run=state["epoch"], finished=state["done"],
                train_seconds=float(history.train_seconds_cum.iloc[-1]) if len(history) else 0.0,
                img_per_s=float(history.img_per_s.median()) if len(history) else 0.0,
                trainable_params=count_parameters(model), total_params=count_parameters(model, False),
                device=str(device), select_metric=r["select_metric"])
    return model, history, info
