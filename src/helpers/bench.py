"""How fast does the project train, and how close is that to what the hardware can do?

For each model configuration this measures, with the same model, batch and precision:

1. the **ceiling**: training steps on synthetic tensors already on the device (no data work at all);
2. the **project's path**: what ``train.fit`` does per step: index the uint8 cache, ``to_input`` with the strong
   kornia augmentation on the device, autocast, backward, optimiser step;
3. a **seed-style loop**: a torch ``DataLoader`` decoding JPEGs with torchvision transforms in worker processes,
   fp32, batch 32 (how the first seeds trained), on the same images;
4. **evaluation**: ``train.predict_proba`` over uint8 images;
5. **augmentation alone**, the reason for kornia: its per-sample random batch transforms against torchvision v2 on
   tensors, which draws one set of parameters per call (so per-sample means a Python loop over the batch).

Plus one-time costs: building the decoded-image cache, ``torch.compile`` (with ``--compile``) and peak GPU memory.
The numbers are speeds, not accuracies; nothing here asserts a speed. Run ``python -m helpers.bench --help``.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D
from .augment import IMAGENET_MEAN, IMAGENET_STD, make_augment, to_input
from .config import load_profile, project_root, recipe as get_recipe
from .model import build_model, count_parameters, freeze, train_mode
from .train import _optimizer, autocast, pick_device, predict_proba, resolve_recipe

SEED_BATCH = 32  # the seeds' batch size, kept for the seed-style loop whatever --batch-size says


@dataclass(frozen=True)
class Config:
    """One benchmarked model: an architecture, whether its backbone is frozen, and the recipe it trains with."""

    name: str
    arch: str
    frozen: bool
    recipe: str


CONFIGS = {c.name: c for c in (
    Config("resnet34-frozen", "resnet34", True, "seed"),  # seed 1: frozen backbone, transfer head
    Config("resnet34", "resnet34", False, "tuned"),
    Config("resnet50", "resnet50", False, "tuned"),
    Config("resnet101", "resnet101", False, "tuned"),
)}

COLUMNS = ("config", "trainable params (M)", "ceiling steps/s", "ceiling img/s", "project img/s",
           "project / ceiling", "seed-loop img/s", "speed-up vs seed (x)", "eval img/s", "compile s",
           "peak GPU mem (GiB)")


# ------------------------------------------------------------------------------------------------ building blocks
def make_model(config: Config, num_classes: int, r: dict) -> torch.nn.Module:
    """A randomly initialised model for ``config``.

    The frozen configuration freezes random weights by hand: ``build_model`` refuses that for training, because it
    would fit a head on noise, but the benchmark measures speed only and a frozen ImageNet backbone runs at exactly
    the same speed (no weights download needed).
    """
    model = build_model(config.arch, num_classes, weights=None, freeze_backbone=False, head=r["head"],
                        dropout=r["dropout"])
    if config.frozen:
        freeze(model)
    return model


def make_optimizer(model: torch.nn.Module, r: dict) -> torch.optim.Optimizer:
    """The recipe's optimiser over the trainable parameters, built by the same code ``fit`` uses."""
    return _optimizer([p for p in model.parameters() if p.requires_grad], r)


def amp_dtype(device: torch.device):
    """The autocast dtype ``fit`` trains with on ``device`` (None: fp32), read from ``train.autocast`` itself."""
    return getattr(autocast(device), "fast_dtype", None)


def precision_label(device: torch.device) -> str:
    dtype = amp_dtype(device)
    return f"{str(dtype).removeprefix('torch.')} autocast" if dtype is not None else "fp32"


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: without this the clock would stop before the GPU has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, scaler, x, y, amp_device: torch.device | None) -> float:
    """One optimiser step as in ``fit`` (autocast when ``amp_device`` is given, else fp32). Returns the loss as a
    float: ``fit`` reads it every step, which synchronises the device, so the benchmark does too."""
    with autocast(amp_device) if amp_device is not None else nullcontext():
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.item()


def seconds_per_step(step, steps: int, warmup: int, device: torch.device) -> float:
    """Mean wall time of ``step()`` over ``steps`` calls, after ``warmup`` untimed calls (allocator, cuDNN and
    DataLoader workers start up during those)."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def seed_transform(size: int):
    """The seeds' torchvision pipeline: PIL resize, flip, rotation, colour jitter, to tensor, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.RandomRotation(10),
                      T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def seed_batches(paths, labels, size: int, n_batches: int):
    """An iterator of ``n_batches`` seed-style batches: a shuffled DataLoader over ``ImageDataset`` with
    ``min(4, cpus)`` workers. The sampler reshuffles when the images run out, so even a tiny test dataset gives
    every step a full batch."""
    dataset = D.ImageDataset(paths, labels, seed_transform(size))
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=n_batches * SEED_BATCH)
    loader = torch.utils.data.DataLoader(dataset, batch_size=SEED_BATCH, sampler=sampler,
                                         num_workers=min(4, os.cpu_count() or 1), drop_last=True)
    return iter(loader)


# ----------------------------------------------------------------------------------------------- measurements
@dataclass
class Setup:
    """Everything shared by the configurations of one run."""

    cfg: dict
    device: torch.device
    size: int
    batch: int
    eval_batch: int
    steps: int
    warmup: int
    compile: bool
    x_train: torch.Tensor  # uint8 N x 3 x S x S; on the GPU when there is one, as in fit
    y_train: torch.Tensor
    paths: list
    num_classes: int
    machine: str  # device_label, taken before the run adds its own load


def measure_config(config: Config, s: Setup) -> dict:
    """One table row. The same model and optimiser go through the ceiling, the project's path, evaluation and
    then (back in the default memory format) the seed-style loop, so every row pays model set-up once."""
    dev = s.device
    r = resolve_recipe(get_recipe(s.cfg, config.arch, config.recipe))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model = make_model(config, s.num_classes, r).to(dev).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if s.compile else model
    opt = make_optimizer(model, r)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(dev) == torch.float16)  # as fit: fp16 needs one

    def step(x, y, amp=True):
        return train_step(step_model if amp else model, opt, scaler, x, y, dev if amp else None)

    train_mode(model)
    x_syn = torch.randn(s.batch, 3, s.size, s.size, device=dev).contiguous(memory_format=torch.channels_last)
    y_syn = torch.randint(0, s.num_classes, (s.batch,), device=dev)
    compile_s = None
    if s.compile:  # the first call compiles; later calls with the same shapes reuse the compiled graph
        t0 = time.perf_counter()
        step(x_syn, y_syn)
        sync(dev)
        compile_s = time.perf_counter() - t0
    ceiling = seconds_per_step(lambda: step(x_syn, y_syn), s.steps, s.warmup, dev)

    augment = make_augment("strong").to(dev)
    gen = torch.Generator().manual_seed(0)

    def project_step():
        idx = torch.randint(0, len(s.y_train), (s.batch,), generator=gen)
        x = to_input(s.x_train[idx.to(s.x_train.device)].to(dev, non_blocking=True), augment)
        step(x, s.y_train[idx].to(dev, non_blocking=True))

    project = seconds_per_step(project_step, s.steps, s.warmup, dev)
    eval_ips = measure_eval(model, s)
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None

    model.to(memory_format=torch.contiguous_format)  # the seeds trained NCHW, fp32, uncompiled
    train_mode(model)  # predict_proba left it in eval mode
    batches = seed_batches(s.paths, s.y_train.tolist(), s.size, s.warmup + s.steps)

    def seed_step():
        x, y = next(batches)
        step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), amp=False)

    seed_ips = SEED_BATCH / seconds_per_step(seed_step, s.steps, s.warmup, dev)
    ceiling_ips, project_ips = s.batch / ceiling, s.batch / project
    row = {"config": config.name, "trainable params (M)": count_parameters(model) / 1e6,
           "ceiling steps/s": 1 / ceiling, "ceiling img/s": ceiling_ips, "project img/s": project_ips,
           "project / ceiling": project_ips / ceiling_ips, "seed-loop img/s": seed_ips,
           "speed-up vs seed (x)": project_ips / seed_ips, "eval img/s": eval_ips, "compile s": compile_s,
           "peak GPU mem (GiB)": peak}
    del batches, model, step_model, opt  # shuts the loader's workers down and frees the device
    release(dev)
    return row


def measure_eval(model, s: Setup) -> float:
    """Images/s of ``predict_proba`` over ``steps x batch`` cached images in batches of the profile's evaluation
    size, the images on the host as ``fit`` passes its validation split. One untimed batch warms up."""
    n = s.steps * s.batch
    idx = torch.randint(0, len(s.y_train), (n,), generator=torch.Generator().manual_seed(1))
    x = s.x_train[idx.to(s.x_train.device)].cpu()
    batch = min(s.eval_batch, n)
    predict_proba(model, x[:batch], batch, s.device)
    sync(s.device)
    t0 = time.perf_counter()
    predict_proba(model, x, batch, s.device)
    sync(s.device)
    return n / (time.perf_counter() - t0)


def tv_strong():
    """torchvision v2's nearest counterpart of the ``strong`` kornia recipe (v2's affine pads with zeros, not by
    reflection), for one image or a whole batch given one parameter draw."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                       v2.RandomAffine(degrees=180.0, translate=(0.05, 0.05), scale=(0.85, 1.15)),
                       v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.8)])


def measure_augment(s: Setup) -> list[dict]:
    """Images/s of the strong augmentation alone on one float batch on the device, three ways."""
    x = s.x_train[:s.batch].to(s.device).float().div_(255)
    kornia_aug, tv = make_augment("strong").to(s.device), tv_strong()
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
        info = dict(seconds=cache["seconds"], images=len(df), bytes=cache["bytes"])
        del cache
    train_paths = df.path[df.split == "train"].tolist()
    return dict(root=root, x=x_train, y=y_train, paths=train_paths, classes=df.attrs["classes"]), info


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU with its core count and load average: CPU timings on a shared machine mean
    little without the load they were taken under."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"torch threads, load average {os.getloadavg()[0]:.1f})")


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    align = ["---:" if isinstance(rows[0][c], (int, float)) or rows[0][c] is None else "---" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(rows: list[dict], s: Setup, data: dict, cache: dict, profile: str, aug_rows: list[dict]) -> str:
    """The markdown written to ``--out``: a header line (device, versions, date, sizes, precision), the table and
    the one-time costs."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Device: {s.machine} · torch {torch.__version__} · {date} · image {s.size}x{s.size} · "
              f"batch {s.batch} (seed loop {SEED_BATCH}, eval {s.eval_batch}) · precision "
              f"{precision_label(s.device)}, channels_last (seed loop fp32) · profile {profile} · "
              f"{s.steps} timed steps after {s.warmup} warm-up{' · torch.compile' if s.compile else ''}")
    costs = (f"One-time costs: decoded-image cache built in {cache['seconds']:.1f} s ({cache['images']:,} images at "
             f"{s.size}x{s.size}, {cache['bytes'] / 2 ** 20:,.0f} MiB); data {data['root']} "
             f"({len(data['y']):,} training images).")
    notes = ("Ceiling: synthetic tensors already on the device. Project: `fit`'s path (uint8 cache -> `to_input` "
             "with the strong kornia augmentation on the device). Seed loop: DataLoader + torchvision transforms, "
             f"{min(4, os.cpu_count() or 1)} workers, fp32. Eval: `predict_proba`. Peak GPU memory covers ceiling, "
             "project and eval. Random weights throughout: these are speeds, not accuracies.")
    aug = (f"Augmentation alone (the strong recipe, batch {s.batch} at {s.size}x{s.size} on the device):\n\n"
           + markdown_table(aug_rows, tuple(aug_rows[0])))
    return "\n\n".join(["# Training-speed benchmark", header, markdown_table(rows), costs, aug, notes]) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=None, help="full | quick | smoke (default: $HAM_PROFILE or full)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--archs", default=",".join(CONFIGS), help=f"comma-separated, from {','.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--data-dir", default=None, help="HAM10000 folder (default: $HAM10000_DIR or kagglehub)")
    p.add_argument("--image-size", type=int, default=None, help="default: the profile's image_size")
    p.add_argument("--batch-size", type=int, default=None, help="default: the profile's tuned recipe batch size")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: the profile's eval_batch_size")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (ceiling and project path)")
    p.add_argument("--out", default=None, help="markdown file (default: reports/benchmark.md)")
    args = p.parse_args(argv)
    unknown = [a for a in args.archs.split(",") if a not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_profile(args.profile)
    device = pick_device(args.device)
    machine = device_label(device)
    size = args.image_size or cfg["image_size"]
    torch.manual_seed(0)
    data, cache = load_train_data(cfg, args.data_dir, size)
    s = Setup(cfg=cfg, device=device, size=size, batch=args.batch_size or cfg["recipes"]["tuned"]["batch_size"],
              eval_batch=args.eval_batch_size or cfg["eval_batch_size"], steps=args.steps, warmup=args.warmup,
              compile=args.compile, x_train=data["x"].to(device) if device.type == "cuda" else data["x"],
              y_train=data["y"], paths=data["paths"], num_classes=len(data["classes"]), machine=machine)
    rows = []
    for name in args.archs.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(measure_config(CONFIGS[name], s))
    print("benchmarking augmentation ...", file=sys.stderr, flush=True)
    text = report(rows, s, data, cache, cfg["name"], measure_augment(s))
    out = Path(args.out) if args.out else project_root() / "reports" / "benchmark.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
