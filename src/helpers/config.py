"""Run configuration in one place: a profile file per run size, the recipe settings and their defaults, and where
outputs go.

A profile (``profiles/<name>.yaml`` beside this module) holds every knob of a run: data, split, image size,
weights, which recipes each model notebook trains, with which training seeds, the recipe settings, and the one
validation metric that chooses both each run's epoch and the best model. Notebooks take a profile name as a
papermill parameter and read everything else from here, so nothing is edited by hand between runs.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"
# The validation numbers that may choose epochs and models, and whether higher is better: the one definition.
SELECT_METRICS = {"val_auc": True, "val_bal_acc": True, "val_acc": True, "val_loss": False}
AUGMENTATIONS = ("none", "light", "strong")
METADATA_MODES = ("none", "late", "joint")  # age, sex, site: unused; fused after training; a trained branch
COMMITTED_PROFILE = "cpu"  # its reports are the checkout's reports/ and README's results block

# What a recipe may set, with defaults. The profiles fill these in; unknown keys are refused.
RECIPE_DEFAULTS = dict(
    epochs=10, batch_size=32, optimizer="adam", lr=3e-4, weight_decay=0.0, momentum=0.9, schedule="none",
    warmup_epochs=0, label_smoothing=0.0, class_weighting="none", sampler="shuffle", augment="light",
    resolution_schedule=None,  # [[size, epochs], ...]: cheap low-resolution epochs first; None: all at image_size
    image_size=224,            # the evaluation size (the cache's; from the profile); the last stage usually matches
    tta=False,                 # evaluate (val/test reports) averaging the 8 dihedral views
    logit_adjust=False,        # predicted class: argmax of log p - tau log prior, tau chosen on validation
    metadata="none",           # none | late (fused with a metadata model after training) | joint (a trained branch)
    select_metric="val_auc",   # from the profile: one rule for epochs and for the best model
    patience=None, seed=0, compile=False, check_every=50, deterministic=False,
    # model options, read by build_model
    arch="resnet34", head="linear", dropout=0.0, freeze_backbone=False, recipe="", run_name="",
)


def project_root() -> Path:
    """The checkout's root when installed editable (where pyproject.toml is), else the working directory."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "notebooks").is_dir():
            return parent
    return Path.cwd()


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def default_profile(cuda: bool | None = None) -> tuple[str, str]:
    """The profile to run when none is given, and why: ``full`` when CUDA is visible, else ``cpu`` (``quick``
    in a checkout without a ``cpu`` profile). ``$HAM_PROFILE`` is the caller's to honour before this."""
    cuda = cuda_visible() if cuda is None else cuda
    if cuda:
        import torch

        try:
            name = torch.cuda.get_device_name(0)
        except RuntimeError:  # asked with cuda=True where no driver answers (tests, odd set-ups)
            name = "a CUDA device"
        return "full", f"CUDA visible: {name}"
    if COMMITTED_PROFILE in profile_names():
        return COMMITTED_PROFILE, "no CUDA visible"
    return "quick", "no CUDA visible, and this checkout has no cpu profile"


def headless() -> bool:
    """Per-epoch lines instead of live progress bars (``HAM_HEADLESS=1``, set by run_all.sh)."""
    return bool(os.environ.get("HAM_HEADLESS"))


def compile_allowed() -> bool:
    """``HAM_COMPILE=0`` turns torch.compile off whatever the recipe says (a GPU without a working compiler)."""
    return os.environ.get("HAM_COMPILE", "1") != "0"


def known_archs() -> tuple[str, ...]:
    """model.py's architectures, shallow to deep."""
    from .model import ARCHS

    return tuple(sorted(ARCHS, key=lambda a: int(re.sub(r"\D", "", a) or 0)))


def model_recipes(cfg: dict, arch: str, recipes=None) -> list[str]:
    """The recipes a model notebook trains for ``arch``: ``recipes`` as given (a name or a list), else the profile's
    list for ``arch`` (an empty list: the profile trains no such model), else (an architecture the profile does
    not list) every recipe of the profile. An unknown architecture or recipe name is refused with a ValueError
    naming the choices."""
    archs = known_archs()
    if arch not in archs:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(archs)}.")
    known = list(cfg.get("recipes") or {})
    if recipes is None:
        models = cfg.get("models") or {}
        if arch in models:  # the profile's list, maybe empty: this profile trains no such model
            return list(models[arch] or [])
        recipes = known  # an architecture the profile does not list: every recipe of the profile
    elif isinstance(recipes, str):
        recipes = [recipes]
    recipes = list(recipes)
    if not recipes:
        raise ValueError(f"no recipes to train for {arch}: name one or more of {', '.join(known)}.")
    unknown = [r for r in recipes if r not in known]
    if unknown:
        raise ValueError(f"unknown recipe{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                         f"profile {cfg.get('name', '?')!r}: choose from {', '.join(known)}.")
    return recipes


REPLACED_KEYS = ("models",)  # a profile's model list replaces its parent's; other settings merge key by key


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_KEYS:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_profile(profile: str | os.PathLike | None = None, **overrides) -> dict:
    """Read a profile by name (``full``, ``cpu``, ``quick``, ``smoke``) or path. ``None`` means ``$HAM_PROFILE``,
    else ``full`` when CUDA is visible and ``cpu`` otherwise (as ``./run_all.sh`` chooses).

    Keyword overrides whose value is ``None`` are ignored, so notebook parameters left at ``None`` keep the
    profile's value. Unknown keys are refused: a typo must not silently do nothing.
    """
    profile = profile or os.environ.get("HAM_PROFILE") or default_profile()[0]
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"profile {profile!r} not found ({path}); known profiles: {profile_names()}")
    with open(path) as fh:
        cfg = yaml.safe_load(fh)
    if cfg.get("extends"):
        cfg = _merge(load_profile(cfg.pop("extends")), cfg)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(cfg))
    if unknown:
        raise KeyError(f"unknown setting(s) {unknown} for profile {cfg['name']!r}; known: {sorted(cfg)}")
    cfg = _merge(cfg, given)
    cfg["profile_file"] = str(path)
    cfg["weights"] = parse_weights(cfg.get("weights"))
    if cfg.get("select_metric", "val_auc") not in SELECT_METRICS:
        raise ValueError(f"profile {cfg['name']!r}: select_metric {cfg['select_metric']!r}; "
                         f"allowed: {tuple(SELECT_METRICS)}")
    seeds = cfg.setdefault("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise ValueError(f"profile {cfg['name']!r}: seeds must be a non-empty list of integers, not {seeds!r}")
    return cfg


def parse_weights(weights):
    """'imagenet' / None (random init) / a file path. 'none', 'random' and '' also mean random init."""
    if weights is None or str(weights).lower() in {"none", "random", "", "null"}:
        return None
    return str(weights)


def weights_label(weights) -> str:
    return "random init" if weights is None else ("ImageNet" if weights == "imagenet" else f"file {weights}")


def output_dirs(cfg: dict | None = None, create: bool = True) -> dict[str, Path]:
    """Where a run writes: reports (committed), models (checkpoints, ignored by git) and the decoded-image cache.

    Environment variables override the defaults so tests can send a smoke run to a temporary folder. ``create``:
    make the folders (a run about to write); False for callers that only look (pruning checkpoints must not
    recreate the reports folder run_all.sh has just published).
    """
    root = project_root()
    dirs = {
        "reports": Path(os.environ.get("HAM_REPORTS_DIR") or (cfg or {}).get("reports_dir") or root / "reports"),
        "models": Path(os.environ.get("HAM_MODELS_DIR") or (cfg or {}).get("models_dir") or root / "models"),
        "cache": Path(os.environ.get("HAM_CACHE_DIR") or root / "data" / "cache"),
    }
    for d in dirs.values() if create else ():
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def _override(cfg: dict, arch: str, name: str) -> dict:
    return dict(cfg.get("recipe_overrides", {}).get(f"{arch}/{name}", {}))


def recipe_seeds(cfg: dict, arch: str, name: str) -> list[int]:
    """The training seeds of one model: the profile's ``seeds``, or a per-model ``seeds`` in recipe_overrides."""
    return list(_override(cfg, arch, name).get("seeds", cfg["seeds"]))


def recipe(cfg: dict, arch: str, name: str, seed: int | None = None) -> dict:
    """The training settings for one run: the profile's recipe, its per-model overrides, the profile's image size
    and selection metric, and the training seed (default: the model's first seed)."""
    if name not in cfg["recipes"]:
        raise ValueError(f"recipe {name!r} is not in profile {cfg['name']!r}; known: {sorted(cfg['recipes'])}")
    over = _override(cfg, arch, name)
    over.pop("seeds", None)
    seed = recipe_seeds(cfg, arch, name)[0] if seed is None else seed
    r = _merge(cfg["recipes"][name], over)
    r.update(arch=arch, recipe=name, seed=seed, run_name=f"{arch}_{name}_s{seed}", image_size=cfg["image_size"],
             select_metric=cfg.get("select_metric", "val_auc"))
    return resolve_recipe(r)


def resolve_recipe(recipe: dict) -> dict:
    """Defaults filled in and every value checked: a wrong setting stops here with a sentence, not mid-training."""
    unknown = sorted(set(recipe) - set(RECIPE_DEFAULTS))
    if unknown:
        raise KeyError(f"unknown recipe setting(s) {unknown}; known: {sorted(RECIPE_DEFAULTS)}")
    r = {**RECIPE_DEFAULTS, **recipe}
    checks = {
        "optimizer": ("adam", "adamw", "sgd"), "schedule": ("none", "cosine", "onecycle"),
        "class_weighting": ("none", "balanced"), "sampler": ("shuffle", "balanced"),
        "select_metric": tuple(SELECT_METRICS), "augment": AUGMENTATIONS, "head": ("linear", "mlp"),
        "metadata": METADATA_MODES,
    }
    for key, allowed in checks.items():
        if r[key] not in allowed:
            raise ValueError(f"recipe {key}={r[key]!r}; allowed: {allowed}")
    if r["resolution_schedule"]:
        stages = [list(s) if isinstance(s, (list, tuple)) else [s] for s in r["resolution_schedule"]]
        if not all(len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in stages):
            raise ValueError(f"resolution_schedule must be a list of [size, epochs] pairs of positive integers, "
                             f"not {r['resolution_schedule']!r}")
        if max(s[0] for s in stages) > r["image_size"]:
            raise ValueError(f"resolution_schedule {stages} trains above the cache's image_size {r['image_size']}")
        r["resolution_schedule"] = stages
        r["epochs"] = sum(s[1] for s in stages)  # the schedule says how many epochs there are
    for key in ("epochs", "batch_size", "image_size", "check_every"):
        if not isinstance(r[key], int) or isinstance(r[key], bool) or r[key] < 1:
            raise ValueError(f"recipe {key} must be a positive integer, not {r[key]!r}")
    if not (isinstance(r["lr"], (int, float)) and r["lr"] > 0):
        raise ValueError(f"recipe lr must be a positive number, not {r['lr']!r}")
    return r
