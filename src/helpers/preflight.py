"""Before anything runs: which profile, whether it can start, and how long it will take.

``helpers.runner`` (behind ``./run_all.sh``) calls ``prepare`` once before the first notebook: it chooses the profile
(the one given, else ``$HAM_PROFILE``, else ``config.default_profile()``), checks in seconds what would otherwise
fail minutes later inside a notebook (the profile and its recipes load, the executor can start, the data folder
resolves and its metadata is sound, ImageNet weights are there when the profile asks for them, the output folder is
one the runner may replace), and times the training loop's own step (``train.training_step``) for each model to
estimate the run's duration. A failure is a ``PreflightError`` whose last line names the folder and the remedy.

Only light modules are imported at module level (``config`` needs PyYAML alone); torch and the data code are imported by the checks that
use them.

Why one module of this size: the checks are many, small and independent, and each carries its own message and
remedy; the estimate beside them times the training loop's own step.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config
from .config import COMMITTED_PROFILE, PROFILE_DIR, cuda_visible, default_profile, model_recipes, profile_names, \
    project_root

MARKER = ".made-by-run_all"  # in a reports folder the runner made, and so may replace
TOUR = "./run_all.sh quick is a 10-minute tour"
EXAMPLE_DATA = "../shared/data/ham10000-200x150"


class PreflightError(Exception):
    """A run that cannot start. ``what``: what is wrong (may span lines); ``fix``: one line naming the folder or
    file and the remedy, printed last."""

    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


# ------------------------------------------------------------------------------------------------ choices


def choose_profile(given: str | None = None) -> tuple[str, str]:
    """(profile, why): the one given, else ``$HAM_PROFILE``, else ``default_profile()``."""
    if given:
        return given, "given on the command line"
    if os.environ.get("HAM_PROFILE"):
        return os.environ["HAM_PROFILE"], "from $HAM_PROFILE"
    return default_profile()


# ------------------------------------------------------------------------------------------------- checks
def _from_notebooks(path) -> Path:
    """A path given as a notebook parameter: notebooks run in notebooks/, so a relative one is taken from there."""
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else (project_root() / "notebooks" / p).resolve()


def check_profile(profile: str, params: dict) -> tuple[dict, list[tuple[str, str, dict]]]:
    """The profile and every run it will train, resolved as the notebooks will: (cfg, [(arch, recipe, settings)])."""
    try:
        cfg = config.load_profile(profile, weights=params.get("weights"))
    except FileNotFoundError:
        raise PreflightError(f"profile {profile!r} not found.",
                             f"{PROFILE_DIR}: no {profile}.yaml; choose one of: {', '.join(profile_names())}.") from None
    except Exception as e:
        raise PreflightError(f"profile {profile!r} does not load: {type(e).__name__}: {e}",
                             f"{PROFILE_DIR / (profile + '.yaml')}: fix the setting named above.") from None
    runs = []
    for arch in cfg.get("models") or {}:
        try:
            for name in model_recipes(cfg, arch):
                runs.append((arch, name, config.recipe(cfg, arch, name)))
        except Exception as e:
            raise PreflightError(f"profile {profile!r}, model {arch}: {type(e).__name__}: {e}",
                                 f"{cfg['profile_file']}: fix the recipe named above.") from None
    for arch, name, r in runs:
        if r.get("freeze_backbone") and cfg.get("weights") is None:
            raise PreflightError(
                f"{arch}/{name} freezes the backbone, but the weights are random (weights: none): it would train a "
                f"head on noise.", f"{cfg['profile_file']}: set {arch}/{name}: {{freeze_backbone: false}} under "
                f"recipe_overrides, or run with ImageNet weights (-p weights imagenet).")
    return cfg, runs


def check_data(cfg: dict, params: dict):
    """The data folder resolves and its metadata loads (the table, every image file present): the metadata table."""
    from . import data as D

    given = params.get("data_dir")
    source = "-p data_dir" if given else ("$HAM10000_DIR" if os.environ.get("HAM10000_DIR") else None)
    folder = _from_notebooks(given) if given else (Path(os.environ["HAM10000_DIR"]).expanduser()
                                                    if os.environ.get("HAM10000_DIR") else None)
    remedy = (f"set HAM10000_DIR (or -p data_dir) to a folder holding {D.METADATA_FILE} and the "
              f"HAM10000_images_part_* folders, e.g. HAM10000_DIR={EXAMPLE_DATA} ./run_all.sh ...")
    if folder is not None and not folder.is_dir():
        raise PreflightError(f"data folder {folder} (from {source}) does not exist.",
                             f"{folder} does not exist: {remedy}")
    try:
        root = D.find_dataset(folder)
    except FileNotFoundError as e:  # kagglehub: not cached and no download
        try:
            import kagglehub.config

            cache = kagglehub.config.get_cache_folder()
        except Exception:  # pragma: no cover
            cache = os.environ.get("KAGGLEHUB_CACHE", "the kagglehub cache")
        raise PreflightError(str(e), f"no HAM10000 in {cache} and no HAM10000_DIR: {remedy}; or run once with "
                                     f"internet access so kagglehub fills {cache}.") from None
    try:
        return D.load_metadata(root, cfg.get("task", "dx"))
    except D.DataError as e:
        raise PreflightError(str(e), f"{root}: the data named above cannot be used as it is; fix it, or {remedy}") \
            from None


def imagenet_file(arch: str) -> tuple[Path, str]:
    """Where torchvision keeps ``arch``'s ImageNet weights ($TORCH_HOME/hub/checkpoints/...) and their URL."""
    import torch
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name, url


def _can_reach(url: str, timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    u = urlparse(url)
    return _can_connect(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout)


def check_weights(cfg: dict, runs) -> str | None:
    """ImageNet weights present (or downloadable) for every model when the profile asks for them; a weights file
    present. Returns a note for the user (e.g. "will download ..."), or None."""
    w = cfg.get("weights")
    if w is None:
        return None
    if w != "imagenet":
        path = _from_notebooks(w)
        if not path.is_file():
            raise PreflightError(f"weights file {path} not found (profile {cfg['name']!r} / -p weights).",
                                 f"{path} does not exist: give an existing state_dict file, -p weights imagenet, or "
                                 f"-p weights none (random init).")
        return None
    missing = {}
    for arch in dict.fromkeys(a for a, _, _ in runs):
        path, url = imagenet_file(arch)
        if not path.is_file():
            missing[arch] = (path, url)
    if not missing:
        return None
    first_url = next(iter(missing.values()))[1]
    if _can_reach(first_url):
        return f"ImageNet weights for {', '.join(missing)} will be downloaded to {next(iter(missing.values()))[0].parent}"
    folder = next(iter(missing.values()))[0].parent
    lines = "\n".join(f"  {arch}: {url} -> {path}" for arch, (path, url) in missing.items())
    raise PreflightError(
        f"profile {cfg['name']!r} asks for ImageNet weights; these are not cached and {Path(first_url).parent} "
        f"cannot be reached:\n{lines}",
        f"{folder}: copy the files listed above there (TORCH_HOME picks another cache folder), or run offline with "
        f"random init: -p weights none (or the cpu / quick profile).")


def check_gpu(profile: str, cfg: dict) -> None:
    if profile == "full" and not os.environ.get("ALLOW_CPU") and not cuda_visible():
        raise PreflightError("the full profile is sized for a GPU and none is visible here (it would take days on "
                             "a CPU).", f"no CUDA device: run ./run_all.sh cpu (or quick, {TOUR.split(' is ')[1]}), "
                                        f"or set ALLOW_CPU=1 to run full anyway.")


def _ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a RAY_ADDRESS such as ``10.0.0.5:6379`` or ``ray://head:10001``; None for ``auto``/``local``."""
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return None
    u = urlparse(address if "://" in address else f"gcs://{address}")
    return u.hostname or "localhost", u.port or (10001 if u.scheme == "ray" else 6379)


def check_executor(profile: str, cfg: dict, params: dict) -> str | None:
    """With ``executor: ray`` (the profile's, ``$HAM_EXECUTOR`` or ``-p executor``): Ray is installed, the cluster
    at ``$RAY_ADDRESS`` answers, and a GPU profile finds GPUs there; a run's CPUs fit on a node. Returns a line
    about the cluster (the notebooks' runs go there, so the local GPU check does not apply), or None for local."""
    from . import runs as R

    try:
        executor = R.resolve_executor(cfg, params.get("executor"))
    except ValueError as e:
        raise PreflightError(str(e), "-p executor / $HAM_EXECUTOR / the profile's executor: use local or ray.") \
            from None
    if executor != "ray":
        return None
    try:
        import ray
    except ImportError:
        raise PreflightError(f"executor ray: Ray is not installed in this environment ({sys.executable}).",
                             R.RAY_REMEDY + ".") from None
    address = os.environ.get("RAY_ADDRESS", "").strip()
    where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray instance (no RAY_ADDRESS)"
    if address:
        endpoint = _ray_endpoint(address)
        reachable = (Path("/tmp/ray/ray_current_cluster").exists() if address == "auto" else True) \
            if endpoint is None else _can_connect(*endpoint)
        if not reachable:
            raise PreflightError(f"executor ray: {where} cannot be reached.",
                                 f"RAY_ADDRESS={address}: start the cluster (ray start --head, KubeRay, ray up; "
                                 f"docs/scale-out.md) or fix the address; unset it to use a local Ray here.")
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            resources = ray.cluster_resources()
            node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        finally:
            ray.shutdown()
    else:
        import torch

        resources = {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}
        node_cpus = resources["CPU"]
    cluster_gpus = resources.get("GPU", 0)
    try:
        gpus, cpus = R.gpus_per_run(cfg, cluster_gpus), R.cpus_per_run(cfg)
    except ValueError as e:
        raise PreflightError(f"profile {profile!r}: {e}", f"{cfg['profile_file']}: fix gpus_per_run / cpus_per_run.") \
            from None
    gpu_profile = (profile == "full" and not os.environ.get("ALLOW_CPU")) or (cfg.get("gpus_per_run") not in
                                                                               (None, "auto") and gpus > 0)
    if gpu_profile and cluster_gpus == 0:
        raise PreflightError(f"executor ray: profile {profile!r} wants a GPU per run and {where} has none "
                             f"({resources.get('CPU', 0):g} CPUs).",
                             "RAY_ADDRESS: point it at a cluster with GPU nodes (docs/scale-out.md), or run the cpu "
                             "profile, or set ALLOW_CPU=1 (full) / gpus_per_run: 0 to run on its CPUs.")
    if cpus > node_cpus:
        raise PreflightError(f"executor ray: cpus_per_run {cpus:g} is more than any node of {where} has "
                             f"({node_cpus:g}); no run could start.",
                             f"{cfg['profile_file']}: lower cpus_per_run (or add larger nodes).")
    return (f"executor ray: {where}, {resources.get('CPU', 0):g} CPUs and {cluster_gpus:g} GPUs; each run "
            f"takes {cpus:g} CPU(s) and {gpus:g} GPU(s); one log per run in models/<profile>/<run>-<key>/worker.log")


def _can_connect(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- the estimate
def measure_step(r: dict, size: int, steps: int = 3, device=None) -> float:
    """Seconds per training step of recipe ``r`` at ``size`` x ``size``: the training loop's own step
    (``train.training_step``: the recipe's optimiser, schedule, loss and augmentation, from a uint8 batch) on a
    random-init model with 7 classes. One untimed warm-up step, then the fastest of ``steps`` timed ones (the least
    disturbed by other work; a step over 5 s is timed once)."""
    import torch

    from .device import pick_device
    from .model import build_model, freeze
    from .train import training_step

    device = device or pick_device()
    model = build_model(r["arch"], 7, None, False, r["head"], r["dropout"]).to(device)
    model.to(memory_format=torch.channels_last)
    if r["freeze_backbone"]:
        freeze(model)  # random weights are fine for timing; build_model refuses them only for training
    batch = r["batch_size"]
    labels = torch.arange(batch, device=device) % 7
    step, *_ = training_step(model, r, device, labels, steps_per_epoch=10 * (steps + 1))
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

    def one():
        step(x, labels, size)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
        if times[-1] > 5:
            break
    return min(times)


def _timing_cache() -> Path:
    return config.output_dirs(create=False)["cache"] / "preflight_steps.json"


def _machine() -> str:
    import torch

    from .device import pick_device

    return f"{socket.gethostname()};{os.cpu_count()};torch {torch.__version__};{pick_device()}"


TIMING_MAX_AGE = 7 * 86400  # re-measure a week later (or delete data/cache/preflight_steps.json)


def step_seconds(r: dict, size: int, measure=measure_step) -> tuple[float, bool]:
    """(seconds per step of recipe ``r`` at ``size``, measured now?) from this machine's timing cache (under a week
    old), else measured and cached."""
    cache = _timing_cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    key = (f"{_machine()};{r['arch']};{size};{r['batch_size']};{'frozen' if r['freeze_backbone'] else 'full'};"
           f"{r['optimizer']};{r['augment']}")
    entry = known.get(key)
    if isinstance(entry, dict) and time.time() - entry.get("time", 0) < TIMING_MAX_AGE:
        return entry["seconds"], False
    s = measure(r, size)
    known[key] = {"seconds": s, "time": time.time()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass
    return s, True


# Costs outside the training steps, from the quick profile's timings on a 2-core CPU: notebook start-up and ETL,
# the comparison, and per run its evaluation, figures and Grad-CAM.
FIXED_SECONDS = 150
PER_RUN_SECONDS = 30


def estimate_seconds(cfg: dict, runs, n_images: int | None = None, step=None) -> float:
    """Wall seconds for the profile: each run's epochs x steps at its resolution(s) (``resolution_schedule`` or
    the image size) and batch size, timed on this machine (``step(arch, size, batch, freeze) -> (s, measured)``),
    its validation each epoch and final evaluation (8 views when ``tta``), per training seed, plus fixed costs.
    ``step(r, size) -> (seconds, measured now?)`` times the training loop's own step.
    ``n_images``: the dataset's size (HAM10000: 10,015, so 7,000 training images)."""
    step = step or step_seconds
    fractions = cfg.get("split_fractions") or (0.70, 0.15, 0.15)
    n_images = n_images or 10015
    n_split = round(n_images * fractions[0])
    n_eval = n_images - n_split
    total = FIXED_SECONDS
    for arch, name, r in runs:
        cap = r.get("max_train_images") or cfg.get("max_train_images")
        n_train = min(n_split, int(cap)) if cap else n_split
        batch = int(r.get("batch_size") or 32)
        size = int(r.get("image_size") or cfg.get("image_size") or 224)
        schedule = r.get("resolution_schedule") or [[size, int(r.get("epochs") or 1)]]
        freeze = bool(r.get("freeze_backbone"))
        seconds = 0.0
        for stage_size, epochs in schedule:
            s, _ = step(r, int(stage_size))
            seconds += int(epochs) * math.ceil(n_train / batch) * s
        s_eval, _ = step(r, size)
        per_image_forward = s_eval / batch / (1 if freeze else 3)  # forward ~ a third of a training step
        n_epochs = sum(int(e) for _, e in schedule)
        seconds += n_epochs * n_eval / 2 * per_image_forward  # validation after every epoch
        seconds += n_eval * per_image_forward * (8 if r.get("tta") else 1) + PER_RUN_SECONDS
        total += seconds * len(config.recipe_seeds(cfg, arch, name))
    return total


def fmt_minutes(seconds: float) -> str:
    m = seconds / 60
    if m < 2:
        return f"{seconds:.0f} s"
    if m < 90:
        return f"{m:.0f} min"
    return f"{m / 60:.1f} h"


# ----------------------------------------------------------------------------------------- output folders
def reports_target(profile: str) -> Path:
    """Where this run's reports go: $HAM_REPORTS_DIR, else the checkout's reports/ for the committed profile and
    reports/<profile>/ (ignored by git) for the others, so a quick tour never replaces the committed study."""
    root = project_root()
    if os.environ.get("HAM_REPORTS_DIR"):
        return Path(os.environ["HAM_REPORTS_DIR"]).expanduser().resolve()
    return root / "reports" if profile == COMMITTED_PROFILE else root / "reports" / profile


def _own_defaults() -> set[Path]:
    """Folders run_all.sh itself defaults to: they may be marked without asking."""
    root = project_root().resolve()
    return {root / "reports"} | {root / "reports" / p for p in profile_names()}


def _kept(name: str, target: Path) -> bool:
    """Entries of a reports folder that a run never replaces (other profiles' folders in the checkout's reports)."""
    if name.startswith(".") or name == "_partial" or name.startswith("benchmark"):
        return True
    return name in profile_names() and target.resolve() == project_root().resolve() / "reports"


def check_target(target: Path) -> bool:
    """May the runner replace ``target``'s reports? Yes when it does not exist, is empty (bar kept entries), holds
    run_all.sh's marker, or is the checkout's own reports/ (marked now). Returns whether the marker is (to be)
    written; raises PreflightError otherwise."""
    target = Path(target)
    if not target.exists():
        return True
    if not target.is_dir():
        raise PreflightError(f"the reports path {target} is a file, not a folder.",
                             f"{target} is a file: point HAM_REPORTS_DIR at a new or empty folder.")
    if (target / MARKER).exists():
        return True
    own = [p for p in target.iterdir() if not _kept(p.name, target)]
    if not own or target.resolve() in _own_defaults():
        return True
    raise PreflightError(
        f"{target} holds {len(own)} entries (e.g. {', '.join(sorted(p.name for p in own)[:3])}) and was not made by "
        f"run_all.sh (no {MARKER} file): a successful run would replace them.",
        f"{target} is not a run_all.sh folder: point HAM_REPORTS_DIR at a new or empty folder (or, if it holds "
        f"earlier run_all.sh reports, create {target / MARKER}).")


# ------------------------------------------------------------------------------------------------ prepare
@dataclass
class Plan:
    """A run that may start: its profile, why that one, where its reports go, and the lines to show first."""

    profile: str
    why: str
    target: Path
    lines: list[str] = field(default_factory=list)


def prepare(given: str | None, params: dict) -> Plan:
    """Choose, check (profile, executor, GPU, output folder, data, weights: quickest first), then estimate. Raises
    PreflightError, its ``what`` opening with the profile and that nothing was written."""
    profile, why = choose_profile(given)
    try:
        cfg, runs = check_profile(profile, params)
        cluster = check_executor(profile, cfg, params)  # executor ray: the runs' GPUs are the cluster's
        if cluster is None:
            check_gpu(profile, cfg)
        target = reports_target(profile)
        check_target(target)
        df = check_data(cfg, params)
        note = check_weights(cfg, runs)
    except PreflightError as e:
        e.what = f"profile {profile} ({why}): stopped before any notebook ran; nothing was written.\n{e.what}"
        raise
    first = f"profile {profile} ({why})"
    if os.environ.get("HAM_PREFLIGHT_TIMING", "1") != "0" and runs and cluster is None:  # ray: not this machine
        if sys.stdout.isatty():
            print(f"[run_all] {first}: timing a few training steps ...", end="\r", flush=True)
        first += f", about {fmt_minutes(estimate_seconds(cfg, runs, len(df)))} on this machine (measured)"
    if profile not in ("quick", "smoke"):
        first += f"; {TOUR}"
    return Plan(profile, why, target, [first.ljust(90) if sys.stdout.isatty() else first,
                                       *(line for line in (cluster, note) if line)])
