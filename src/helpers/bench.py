"""How fast does the project train, and how close is that to what the hardware can do?

For every model the profile trains (architecture x recipe), with the recipe's batch, precision and memory format:

1. **train FLOPs per image**: the convolution and matmul FLOPs of one forward + backward pass over one training batch,
   counted by ``torch.utils.flop_counter.FlopCounterMode`` and divided by the batch size;
2. the **ceiling**: forward, backward and optimiser step on a synthetic batch already on the device (no data, no
   augmentation) that never waits on the host: the loss accumulates on the device and is read once, after the
   timed steps;
3. the **project's path**, as ``train.fit`` runs it: the sample order drawn on the device, the uint8 cache indexed
   there, ``augment.Preprocess`` (the recipe's kornia augmentation, normalisation, channels_last), autocast, the
   recipe's loss, backward, optimiser step, loss and accuracy accumulated on the device;
4. **evaluation**: ``evaluate.predict_proba`` over cached uint8 images;

then achieved GFLOP/s (img/s x train FLOPs per image) and its fraction of the machine's measured matmul peak (best
of a few square sizes, in the training precision). With ``--compile``: ``torch.compile``'s compile time apart from
its steady-state speed, per model, and whether it pays for itself within the recipe's epochs. With
``--reference-loop``: the write-ups' ``DataLoader`` + torchvision loop (slow on a CPU). Plus the augmentation alone
(kornia per-sample against torchvision v2) and the one-time cache build. Nothing here asserts a speed.

Why one module of this size: one benchmark, its measurements (ceiling, project path, stages, compile, evaluation,
reference loop) and the table that explains them; every training step it times is ``train.make_step``.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D
from .augment import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .config import load_profile, recipe as get_recipe
from .device import amp_dtype, autocast, device_label, pick_device, precision_label
from .evaluate import predict_proba
from .model import ARCHS, build_model, count_parameters, freeze, train_mode
from . import train as T

REFERENCE_BATCH = 32  # the write-ups' batch size, kept for the reference loop whatever the recipe says
DEFAULT_STEPS = {"cpu": (8, 2), "cuda": (30, 5)}  # (timed steps, warm-up steps) per measurement
MATMUL_SIZES = {"cpu": (1024, 2048, 3072), "cuda": (4096, 8192)}

COLUMNS = ("model", "augment", "batch", "trainable params (M)", "train GFLOP/img", "ceiling img/s",
           "ceiling GFLOP/s", "ceiling / peak", "project img/s", "project GFLOP/s", "project / peak",
           "project / ceiling", "eval img/s", "train min/run (est.)")
COMPILE_COLUMNS = ("compile s", "compiled img/s", "compile speed-up (x)", "compile pays back (epochs)")
REFERENCE_COLUMNS = ("reference-loop img/s", "project vs reference (x)")
GPU_COLUMNS = ("peak GPU mem (GiB)",)

LEGEND = {
    "model": "`<arch>_<recipe>` as the profile trains it (random init: these are speeds, not accuracies)",
    "augment": "the recipe's augmentation, included in the project's path",
    "batch": "the recipe's training batch size",
    "train GFLOP/img": "convolution + matmul FLOPs of forward + backward per image (FlopCounterMode on one batch; "
                       "batch-norm, activations and the optimiser are not counted)",
    "ceiling img/s": "forward + backward + optimiser step on a synthetic batch already on the device; no data, no "
                     "augmentation; same precision and memory format; no host sync per step",
    "ceiling GFLOP/s": "ceiling img/s x train GFLOP/img",
    "ceiling / peak": "ceiling GFLOP/s over the measured matmul peak",
    "project img/s": "`fit`'s step: uint8 cache -> `Preprocess` (augmentation, normalisation, channels_last) -> "
                     "forward, loss, backward, optimiser step, loss and accuracy accumulated on the device",
    "project GFLOP/s": "project img/s x train GFLOP/img",
    "project / peak": "project GFLOP/s over the measured matmul peak",
    "project / ceiling": "what the data path and augmentation cost (1 = nothing)",
    "eval img/s": "`predict_proba` over cached uint8 images (no augmentation, no TTA)",
    "train min/run (est.)": "one run's training minutes from the project img/s at each of its training "
                            "resolutions (table below): every epoch, no validation, no early stop",
    "compile s": "first `torch.compile`d step minus an eager step (forward and backward graphs)",
    "compiled img/s": "the project's path with the compiled model, after compiling",
    "compile speed-up (x)": "compiled img/s over project img/s",
    "compile pays back (epochs)": "epochs of the profile's training split until the saved time covers the compile "
                                  "time (inf: never)",
    "reference-loop img/s": f"the write-ups' loop: DataLoader decoding JPEGs with torchvision transforms in "
                            f"worker processes, fp32, NCHW, batch {REFERENCE_BATCH}",
    "project vs reference (x)": "project img/s over reference-loop img/s",
    "peak GPU mem (GiB)": "peak allocated during ceiling, project and evaluation",
}


# ------------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class Config:
    """One benchmarked model: an architecture and the profile's recipe it trains with."""

    arch: str
    recipe: str

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.recipe}"


from .config import default_profile  # noqa: E402  (one choice of profile for run_all, notebooks and bench)


def configs_for(cfg: dict, models: str | None = None) -> list[Config]:
    """The profile's models (``cfg['models']``: arch -> recipes), or those named in ``models``: a comma-separated
    list of ``arch/recipe`` or ``arch`` (the profile's recipes for it, else ``tuned``)."""
    if not models:
        return [Config(arch, rec) for arch, recs in cfg["models"].items() for rec in recs]
    out = []
    for item in (m.strip() for m in models.split(",") if m.strip()):
        arch, _, rec = item.partition("/")
        for r in [rec] if rec else (cfg["models"].get(arch) or ["tuned"]):
            out.append(Config(arch, r))
    for c in out:
        if c.arch not in ARCHS:
            raise ValueError(f"unknown architecture {c.arch!r}; choose from {sorted(ARCHS)}")
        if c.recipe not in cfg["recipes"]:
            raise ValueError(f"recipe {c.recipe!r} is not in profile {cfg['name']!r}; known: {sorted(cfg['recipes'])}")
    return out


def make_model(r: dict, num_classes: int) -> torch.nn.Module:
    """A randomly initialised model for recipe ``r``. A frozen backbone is frozen by hand: ``build_model`` refuses
    that with random weights (it would fit a head on noise), but speed does not depend on the weights."""
    model = build_model(r["arch"], num_classes, weights=None, freeze_backbone=False, head=r["head"],
                        dropout=r["dropout"])
    if r["freeze_backbone"]:
        freeze(model)
    return model


def uses_grad_scaler(device: torch.device) -> bool:
    """fp16 autocast needs a GradScaler (as in ``fit``); bf16 and fp32 do not."""
    return amp_dtype(device) == torch.float16


def setup_backend(device: torch.device) -> None:
    """cuDNN autotuning on for CUDA, as ``fit`` trains (it picks the fastest kernels for the fixed shapes)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: without this the clock would stop before the GPU has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMER_WARMUP = 2  # untimed calls torch.utils.benchmark.Timer.timeit makes before timing (for fewer than 200)


def seconds_per_step(step, steps: int, warmup: int, device: torch.device) -> float:
    """Mean wall time of ``step()`` over ``steps`` calls after ``warmup`` untimed calls, by
    ``torch.utils.benchmark.Timer``: it synchronises the device before and after the timed calls only, never
    between them, and makes two untimed calls of its own (counted in ``warmup`` here, so at least two). It runs at this process's
    thread count, not the Timer's default of one."""
    from torch.utils.benchmark import Timer

    for _ in range(max(0, warmup - TIMER_WARMUP)):
        step()
    sync(device)
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.timeit(steps).mean


# ------------------------------------------------------------------------------------------------ measurements
def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, sizes=None, repeats: int = 5) -> dict:
    """The best GFLOP/s of a square ``torch.mm`` over ``sizes`` (``repeats`` timed calls each, after one warm-up).
    Returns ``{"gflops", "size", "sizes", "repeats", "dtype"}``."""
    sizes = tuple(sizes or MATMUL_SIZES.get(device.type, MATMUL_SIZES["cpu"]))
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    best = dict(gflops=0.0, size=None, sizes=sizes, repeats=repeats, dtype=names.get(dtype, str(dtype)))
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            sync(device)
            gflops = 2 * n ** 3 / (time.perf_counter() - t0) / 1e9
            if gflops > best["gflops"]:
                best.update(gflops=gflops, size=n)
        del a, b, out
    return best


def cpu_peak_context(repeats: int = 5) -> list[dict]:
    """On the CPU, the peaks that explain the main one: fp32 on one thread (one core's share: a figure quoted for
    this machine, 169 GFLOP/s, was this one) and bf16 on every thread (whether bf16 would pay: without AMX units
    it runs slower than fp32, so training stays fp32 on the CPU)."""
    threads = torch.get_num_threads()
    out = []
    if threads > 1:
        torch.set_num_threads(1)
        try:
            out.append({**matmul_peak(torch.device("cpu"), sizes=(2048,), repeats=repeats), "threads": 1})
        finally:
            torch.set_num_threads(threads)
    # Without bf16 units (avx512_bf16 / AMX) torch emulates bf16 matmul at a tiny fraction of fp32: measured at
    # 2048 it took minutes on an AMD EPYC, so it is not measured there (training stays fp32 either way).
    if cpu_has_bf16():
        out.append({**matmul_peak(torch.device("cpu"), torch.bfloat16, sizes=(2048,), repeats=repeats),
                    "threads": threads})
    return out


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (x86 flags avx512_bf16 or amx_bf16; other CPUs: assume yes)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags or "flags" not in flags


def train_flops_per_image(model, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                          label_smoothing: float = 0.0) -> float:
    """FLOPs of one forward + backward pass over the batch ``x``, per image, as ``FlopCounterMode`` counts them
    (convolutions and matmuls, forward and backward; the backward skips what needs no gradient, e.g. a frozen
    backbone). Leaves no gradients behind."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def no_prep(x, size=None, train=False):
    """The ceiling's input is a synthetic batch already normalised on the device: nothing to do."""
    return x


def measure_ceiling(step, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
                    device: torch.device) -> tuple[float, bool]:
    """Seconds per ceiling step and whether the loss stayed finite. The loss accumulates on the device; the one
    host read happens after the timed region."""
    total = torch.zeros((), device=device)

    def one():
        total.add_(step(x, y, None)[0])

    seconds = seconds_per_step(one, steps, warmup, device)
    return seconds, math.isfinite(float(total))


class ProjectPath:
    """``fit``'s data path: an order drawn on the device over the uint8 cache (already on the device, with its
    labels), batches indexed there, then ``train.make_step``'s step at ``size`` (``Preprocess`` inside it); loss,
    correct count and a finite flag accumulate on the device, read every ``check_every`` steps as ``fit`` does."""

    def __init__(self, x_cache, y_cache, batch: int, size: int, device: torch.device, check_every: int = 50,
                 seed: int = 0):
        n = len(y_cache)
        gen = torch.Generator(device=device).manual_seed(seed)
        reps = max(1, math.ceil(batch / n))
        perm = torch.cat([torch.randperm(n, generator=gen, device=device) for _ in range(reps)])
        self.order = perm[:len(perm) // batch * batch].view(-1, batch)  # whole batches only, cycled
        self.x, self.y, self.size, self.check_every = x_cache, y_cache, size, check_every
        self.total_loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.finite = torch.ones((), device=device, dtype=torch.bool)
        self.i = 0

    def __call__(self, step):
        idx = self.order[self.i % len(self.order)]  # a view: no host read
        y = self.y[idx]
        loss, logits = step(self.x[idx], y, self.size)
        self.finite &= torch.isfinite(loss)
        self.total_loss += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.i += 1
        if self.i % self.check_every == 0:
            bool(self.finite)


def compile_payback(compile_s: float | None, eager_ips: float, compiled_ips: float | None,
                    images_per_epoch: int) -> float | None:
    """Epochs of ``images_per_epoch`` until ``torch.compile``'s steady-state gain repays its compile time
    (``inf`` when compiled is not faster; None when not measured)."""
    if compile_s is None or compiled_ips is None:
        return None
    saved_per_epoch = images_per_epoch * (1 / eager_ips - 1 / compiled_ips)
    return compile_s / saved_per_epoch if saved_per_epoch > 0 else math.inf


def compile_advice(row: dict) -> str:
    """One line: compile this model in this profile or not, and why."""
    pays, epochs = row["compile pays back (epochs)"], row["_epochs"]
    if pays is None:
        return f"{row['model']}: torch.compile not measured"
    verdict = "compile" if pays <= epochs else "do not compile"
    gain = (row["compile speed-up (x)"] - 1) * 100
    payback = ("never pays back" if math.isinf(pays) else
               f"pays back after {fmt(pays)} epoch(s) of {row['_images']:,} images")
    return (f"{row['model']}: {verdict} ({gain:+.0f}% img/s after {row['compile s']:.0f} s of compiling, which "
            f"{payback}; the recipe trains {epochs} epochs)")


@dataclass
class Setup:
    """Everything shared by the configurations of one run."""

    cfg: dict
    device: torch.device
    size: int
    steps: int
    warmup: int
    compile: bool
    reference_loop: bool
    schedule: bool  # also measure the recipes' other training resolutions (not when --size fixes one)
    x_train: torch.Tensor  # uint8 N x 3 x S x S on the device, with its labels, as in fit
    y_train: torch.Tensor
    paths: list
    num_classes: int
    eval_batch: int
    batch_override: int | None = None
    peak: dict = field(default_factory=dict)
    other_peaks: list = field(default_factory=list)  # context for the peak: one thread, other precisions


def measure_config(config: Config, s: Setup) -> dict:
    """One table row: FLOPs per image, ceiling, project path (at each training resolution), the optional compiled
    path, evaluation, then the optional reference loop, all with one model and optimiser."""
    dev = s.device
    r = get_recipe(s.cfg, config.arch, config.recipe)
    batch = s.batch_override or r["batch_size"]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = make_model(r, s.num_classes).to(dev).to(memory_format=torch.channels_last)
    train_mode(model)
    # The training loop's own step (train.training_step: optimiser, schedule, scaler, augmentation, class weights);
    # the ceiling runs the same step on a synthetic batch that needs no preprocessing.
    # The schedule's horizon only has to outlast the benchmark's own steps (ceiling, path, stages, compile, the
    # reference loop), which on a tiny training split exceed a real run's; the learning rate does not change a
    # step's cost.
    horizon = max(math.ceil(images_per_epoch(s) / batch), 10 * (s.steps + s.warmup + 1))
    step, opt, sched, scaler = T.training_step(model, r, dev, s.y_train, horizon)
    class_weight = T.class_weights(s.y_train, s.num_classes) if r["class_weighting"] == "balanced" else None
    ceiling_step = T.make_step(model, opt, sched, scaler, no_prep, r, dev, class_weight)

    x_syn = torch.randn(batch, 3, s.size, s.size, device=dev).contiguous(memory_format=torch.channels_last)
    y_syn = torch.randint(0, s.num_classes, (batch,), device=dev)
    flops = train_flops_per_image(model, x_syn, y_syn, dev, r["label_smoothing"])
    ceiling, finite = measure_ceiling(ceiling_step, x_syn, y_syn, s.steps, s.warmup, dev)
    if not finite:
        print(f"warning: {config.name}: the ceiling's loss was not finite", file=sys.stderr)

    path = ProjectPath(s.x_train, s.y_train, batch, s.size, dev, r.get("check_every", 50))
    project = seconds_per_step(lambda: path(step), s.steps, s.warmup, dev)

    gflop = flops / 1e9
    ceiling_ips, project_ips = batch / ceiling, batch / project
    peak = s.peak["gflops"]
    row = {"model": config.name, "augment": r["augment"], "batch": batch,
           "trainable params (M)": count_parameters(model) / 1e6, "train GFLOP/img": gflop,
           "ceiling img/s": ceiling_ips, "ceiling GFLOP/s": ceiling_ips * gflop,
           "ceiling / peak": ceiling_ips * gflop / peak, "project img/s": project_ips,
           "project GFLOP/s": project_ips * gflop, "project / peak": project_ips * gflop / peak,
           "project / ceiling": project_ips / ceiling_ips, "_epochs": r["epochs"], "_images": images_per_epoch(s),
           "_compile": bool(r.get("compile"))}
    row["_stages"] = measure_stages(r, s, model, step, batch, {s.size: (gflop, project_ips)})
    row["train min/run (est.)"] = estimate_minutes(row["_stages"], row["_images"])
    if s.compile:
        row.update(measure_compiled(model, opt, sched, scaler, r, class_weight, path, project, project_ips, s, batch))
    row["eval img/s"] = measure_eval(model, s, batch)  # leaves the model in eval mode: training measurements first
    row["peak GPU mem (GiB)"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    if s.reference_loop:
        row.update(measure_reference(model, opt, sched, scaler, r, s, project_ips))
    del model, opt, step, ceiling_step, path
    release(dev)
    return row


def measure_stages(r: dict, s: Setup, model, step, batch: int, measured: dict) -> list[dict]:
    """The recipe's training resolutions (``resolution_schedule``, else all epochs at the profile's image_size),
    each with its train GFLOP/img and the project path's img/s there. ``measured`` ({px: (GFLOP/img, img/s)})
    holds sizes already measured; the others are measured now (unless ``--size`` fixed one size: then they stay
    unmeasured, None)."""
    stages = []
    for px, epochs in r.get("resolution_schedule") or [[s.cfg["image_size"], r["epochs"]]]:
        if px not in measured and s.schedule:
            x = torch.randn(batch, 3, px, px, device=s.device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, s.num_classes, (batch,), device=s.device)
            gflop = train_flops_per_image(model, x, y, s.device, r["label_smoothing"]) / 1e9
            path = ProjectPath(s.x_train, s.y_train, batch, px, s.device, r.get("check_every", 50))
            measured[px] = (gflop, batch / seconds_per_step(lambda: path(step), s.steps, s.warmup, s.device))
        gflop, ips = measured.get(px, (None, None))
        stages.append({"px": px, "epochs": epochs, "train GFLOP/img": gflop, "project img/s": ips,
                       "project / peak": ips * gflop / s.peak["gflops"] if ips else None})
    return stages


def estimate_minutes(stages: list[dict], images: int) -> float | None:
    """Training minutes of one run from the measured speeds: every epoch of every stage, validation excluded."""
    if any(st["project img/s"] is None for st in stages):
        return None
    return sum(st["epochs"] * images / st["project img/s"] for st in stages) / 60


def images_per_epoch(s: Setup) -> int:
    cap = s.cfg.get("max_train_images")
    return min(len(s.y_train), cap) if cap else len(s.y_train)


def measure_compiled(model, opt, sched, scaler, r, class_weight, path: ProjectPath, eager_seconds: float,
                     eager_ips: float, s: Setup, batch: int) -> dict:
    """Compile time (the first compiled step minus an eager one) apart from the compiled steady-state img/s, on
    the project's path."""
    step = T.make_step(model, opt, sched, scaler, Preprocess(r["augment"]).to(s.device), r, s.device, class_weight,
                       step_model=torch.compile(model))
    t0 = time.perf_counter()
    path(step)
    sync(s.device)
    compile_s = max(0.0, time.perf_counter() - t0 - eager_seconds)
    compiled_ips = batch / seconds_per_step(lambda: path(step), s.steps, s.warmup, s.device)
    return {"compile s": compile_s, "compiled img/s": compiled_ips, "compile speed-up (x)": compiled_ips / eager_ips,
            "compile pays back (epochs)": compile_payback(compile_s, eager_ips, compiled_ips,
                                                          images_per_epoch(s))}


def measure_eval(model, s: Setup, batch: int) -> float:
    """Images/s of ``predict_proba`` over ``steps x batch`` cached images in batches of the profile's evaluation
    size, the images on the host as ``fit`` passes its validation split. One untimed batch warms up."""
    n = s.steps * batch
    idx = torch.randint(0, len(s.y_train), (n,), generator=torch.Generator().manual_seed(1))
    x = s.x_train[idx.to(s.x_train.device)].cpu()
    eval_batch = min(s.eval_batch, n)
    predict_proba(model, x[:eval_batch], eval_batch, s.device)
    sync(s.device)
    t0 = time.perf_counter()
    predict_proba(model, x, eval_batch, s.device)
    sync(s.device)
    return n / (time.perf_counter() - t0)


def reference_transform(size: int):
    """The write-ups' torchvision pipeline: PIL resize, flip, rotation, colour jitter, to tensor, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.RandomRotation(10),
                      T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def reference_batches(paths, labels, size: int, n_batches: int):
    """``n_batches`` reference-style batches: a shuffled DataLoader over ``ImageDataset`` with ``min(4, cpus)``
    workers; the sampler draws with replacement, so even a tiny test dataset gives every step a full batch."""
    dataset = D.ImageDataset(paths, labels, reference_transform(size))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=n_batches * REFERENCE_BATCH)
    loader = torch.utils.data.DataLoader(dataset, batch_size=REFERENCE_BATCH, sampler=sampler,
                                         num_workers=min(4, os.cpu_count() or 1), drop_last=True)
    return iter(loader)


def measure_reference(model, opt, sched, scaler, r, s: Setup, project_ips: float) -> dict:
    """The reference loop with the same model: NCHW, fp32, no compile (how the write-ups trained)."""
    model.to(memory_format=torch.contiguous_format)
    train_mode(model)  # predict_proba left it in eval mode
    step = T.make_step(model, opt, sched, scaler, no_prep, r, s.device, amp=False)
    batches = reference_batches(s.paths, s.y_train.cpu().tolist(), s.size,
                                max(s.warmup, TIMER_WARMUP) + s.steps)

    def one():
        x, y = next(batches)
        step(x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True), None)

    ips = REFERENCE_BATCH / seconds_per_step(one, s.steps, s.warmup, s.device)
    del batches  # shuts the workers down
    return {"reference-loop img/s": ips, "project vs reference (x)": project_ips / ips}


def tv_strong():
    """torchvision v2's nearest counterpart of the ``strong`` kornia recipe (v2's affine pads with zeros, not by
    reflection), for one image or a whole batch given one parameter draw."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                       v2.RandomAffine(degrees=180.0, translate=(0.05, 0.05), scale=(0.85, 1.15)),
                       v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.8)])


def measure_augment(s: Setup, batch: int) -> list[dict]:
    """Images/s of the strong augmentation alone on one float batch on the device, three ways."""
    x = s.x_train[:batch].float().div_(255)
    kornia_aug, tv = Preprocess("strong").to(s.device).augment, tv_strong()
    ways = [("kornia, whole batch", "yes", lambda: kornia_aug(x)),
            ("torchvision v2, loop over images", "yes", lambda: torch.stack([tv(img) for img in x])),
            ("torchvision v2, whole batch", "no (one draw per batch)", lambda: tv(x))]
    return [{"augmentation": name, "per-sample parameters": per_sample,
             "img/s": len(x) / seconds_per_step(fn, s.steps, s.warmup, s.device)} for name, per_sample, fn in ways]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ data + report
def load_train_data(cfg: dict, data_dir, size: int) -> tuple[dict, dict]:
    """The training split's uint8 images, from a cache built once into a fresh temporary folder so its build time
    is measured (the project's own cache folder is left alone). Returns ``(data, cache_info)``."""
    root = D.find_dataset(data_dir)
    df = D.split_by_lesion(D.load_metadata(root, cfg["task"]), cfg["split_fractions"], cfg["split_seed"])
    with tempfile.TemporaryDirectory(prefix="ham_bench_cache_") as tmp:
        cache = D.build_cache(df, size, tmp)
        x_train, y_train = D.split_tensors(df, cache["images"])["train"]  # copied into memory
        info = dict(seconds=cache["seconds"], images=len(df), bytes=cache["bytes"], size=size)
        del cache
    train_paths = df.path[df.split == "train"].tolist()
    return dict(root=str(data_dir or os.environ.get("HAM10000_DIR") or root), x=x_train, y=y_train, paths=train_paths,
                classes=df.attrs["classes"]), info


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def markdown_table(rows: list[dict], columns) -> str:
    def numeric(c):
        return any(isinstance(row.get(c), (int, float)) for row in rows)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def table_columns(s: Setup) -> tuple:
    return (COLUMNS + (COMPILE_COLUMNS if s.compile else ()) + (REFERENCE_COLUMNS if s.reference_loop else ())
            + (GPU_COLUMNS if s.device.type == "cuda" else ()))


def report(rows: list[dict], s: Setup, data: dict, cache: dict, profile: str, profile_reason: str,
           aug_rows: list[dict], aug_batch: int, load: tuple, wall_s: float) -> str:
    """The markdown written to ``--out``: what was measured where and when, the table, what each column includes,
    the compile advice (with ``--compile``), the augmentation alone and the one-time costs."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    p = s.peak
    extras = (["cudnn.benchmark on"] if s.device.type == "cuda" else []) + (["--compile"] if s.compile else [])
    header = "\n".join([
        f"- Device: {device_label(s.device)}; torch threads: {torch.get_num_threads()} intra-op; load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after",
        f"- Date: {date}; torch {torch.__version__}; profile `{profile}` ({profile_reason})",
        f"- Main table at {s.size}x{s.size} input ({'the profile image_size' if s.schedule else '--size'}; uint8 "
        f"cache {cache['size']}x{cache['size']}); precision "
        f"{precision_label(s.device)}; channels_last; random init; " + "; ".join(
            [f"{s.steps} timed steps after {s.warmup} warm-up per measurement"] + extras),
        f"- Peak: {p['dtype']} matmul {p['gflops']:.0f} GFLOP/s (best of {p['repeats']} at each of "
        f"{', '.join(f'{n}x{n}' for n in p['sizes'])}; best at {p['size']}x{p['size']}), "
        f"{torch.get_num_threads()} thread(s): the denominator of every \"/ peak\" column"
        + "".join(f"; {o['dtype']} on {o['threads']} thread(s): {o['gflops']:.0f} GFLOP/s at {o['size']}x{o['size']}"
                  for o in s.other_peaks),
    ])
    columns = table_columns(s)
    legend = "What each column includes:\n\n" + "\n".join(f"- **{c}**: {LEGEND[c]}" for c in columns
                                                         if c in LEGEND)
    ceiling_note = ("The ceiling is forward, backward and optimiser step only: no data, no augmentation, the same "
                    "precision and memory format as the project's path, and no host synchronisation per step (the "
                    "loss accumulates on the device and is read once, after the timed steps)"
                    + ("; with fp16 the GradScaler reads its overflow flag once per step, in training too."
                       if uses_grad_scaler(s.device) else "."))
    parts = ["# Training-speed benchmark", header, markdown_table(rows, columns), legend, ceiling_note]
    if s.compile:
        parts.append("torch.compile, per model (compile when it pays back within the recipe's epochs; a last "
                     "partial batch or another resolution may compile once more):\n\n"
                     + "\n".join(f"- {compile_advice(r)}" for r in rows))
    compiled = [r["model"] for r in rows if r["_compile"]]
    if compiled and not s.compile:
        parts.append(f"The profile trains {', '.join(compiled)} with `torch.compile`; this table is eager: run with "
                     "`--compile` to measure the compiled path.")
    stages = [{"model": r["model"], **st} for r in rows for st in r["_stages"]]
    parts.append("The project's path at each training resolution of each recipe (its `resolution_schedule`, else "
                 "all epochs at the profile's image_size); **train min/run (est.)** adds up epochs x "
                 f"{rows[0]['_images']:,} images / img/s over them (training only, every epoch, no early stop"
                 + ("" if s.schedule else "; n/a: `--size` measured one resolution only") + "):\n\n"
                 + markdown_table(stages, ("model", "px", "epochs", "train GFLOP/img", "project img/s",
                                           "project / peak")))
    parts.append(f"Augmentation alone (the strong recipe, batch {aug_batch} at "
                 f"{s.size}x{s.size} on the device):\n\n"
                 + markdown_table(aug_rows, ("augmentation", "per-sample parameters", "img/s")))
    parts.append(f"One-time costs: decoded-image cache built in {cache['seconds']:.1f} s ({cache['images']:,} "
                 f"images at {cache['size']}x{cache['size']}, {cache['bytes'] / 2 ** 20:,.0f} MiB); data "
                 f"{data['root']} ({len(data['y']):,} training images). This benchmark took {wall_s:.0f} s.")
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=None,
                   help="profile name or file (default: full with CUDA, else cpu; quick until cpu exists)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--models", "--archs", default=None,
                   help="comma-separated arch/recipe or arch (default: every model the profile trains)")
    p.add_argument("--size", "--image-size", dest="size", type=int, default=None,
                   help="training resolution (default: the profile's image_size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 8 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each (default: 2 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--data-dir", default=None, help="HAM10000 folder (default: $HAM10000_DIR or kagglehub)")
    p.add_argument("--batch-size", type=int, default=None, help="default: each recipe's batch size")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: the profile's eval_batch_size")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile per model")
    p.add_argument("--reference-loop", action="store_true",
                   help="also measure the write-ups' DataLoader + torchvision loop (slow on a CPU)")
    p.add_argument("--out", default=None, help="also write the markdown here (e.g. reports/benchmark_cpu.md)")
    args = p.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--executors" in argv:  # local against Ray executors: bench_executors.py
        from .bench_executors import main as executors

        return executors([a for a in argv if a != "--executors"])
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    setup_backend(device)
    if args.profile:
        profile, reason = args.profile, "asked for"
    else:
        profile, reason = default_profile(device.type == "cuda")
    cfg = load_profile(profile)
    configs = configs_for(cfg, args.models)
    steps, warmup = DEFAULT_STEPS.get(device.type, DEFAULT_STEPS["cpu"])
    size = args.size or cfg["image_size"]
    print(f"benchmark: profile {cfg['name']} ({reason}), {device_label(device)}, {size}px, "
          f"{len(configs)} model(s)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    data, cache = load_train_data(cfg, args.data_dir, max(size, cfg["image_size"]))
    s = Setup(cfg=cfg, device=device, size=size, steps=args.steps or steps,
              warmup=warmup if args.warmup is None else args.warmup, compile=args.compile,
              reference_loop=args.reference_loop, schedule=args.size is None, x_train=data["x"].to(device),
              y_train=data["y"].to(device),
              paths=data["paths"], num_classes=len(data["classes"]),
              eval_batch=args.eval_batch_size or cfg["eval_batch_size"], batch_override=args.batch_size)
    print("measuring the matmul peak ...", file=sys.stderr, flush=True)
    s.peak = matmul_peak(device, amp_dtype(device) or torch.float32)
    s.other_peaks = cpu_peak_context() if device.type == "cpu" else []
    rows = []
    for config in configs:
        t0 = time.perf_counter()
        print(f"benchmarking {config.name} ...", file=sys.stderr, flush=True)
        rows.append(measure_config(config, s))
        print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print("benchmarking the augmentation alone ...", file=sys.stderr, flush=True)
    aug_batch = min(rows[0]["batch"], len(s.y_train))
    aug_rows = measure_augment(s, aug_batch)
    text = report(rows, s, data, cache, cfg["name"], reason, aug_rows, aug_batch, (load_before, os.getloadavg()[0]),
                  time.perf_counter() - t_start)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
