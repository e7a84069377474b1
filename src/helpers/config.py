"""Run configuration in one place: a profile file per run size, plus where outputs go.

A profile (``profiles/<name>.yaml`` beside this module) holds every knob of a run: data, split, image size,
weights, which recipes each model notebook trains, and the recipe settings. Notebooks take a profile name as a
papermill parameter and read everything else from here, so nothing is edited by hand between runs.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"


def project_root() -> Path:
    """The checkout's root when installed editable (where pyproject.toml is), else the working directory."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "notebooks").is_dir():
            return parent
    return Path.cwd()


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_profile(profile: str | os.PathLike | None = None, **overrides) -> dict:
    """Read a profile by name (``full``, ``quick``, ``smoke``) or path; ``None`` means ``$HAM_PROFILE`` or ``full``.

    Keyword overrides whose value is ``None`` are ignored, so notebook parameters left at ``None`` keep the
    profile's value. Unknown keys are refused: a typo must not silently do nothing.
    """
    profile = profile or os.environ.get("HAM_PROFILE") or "full"
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
    return cfg


def parse_weights(weights):
    """'imagenet' / None (random init) / a file path. 'none', 'random' and '' also mean random init."""
    if weights is None or str(weights).lower() in {"none", "random", "", "null"}:
        return None
    return str(weights)


def weights_label(weights) -> str:
    return "random init" if weights is None else ("ImageNet" if weights == "imagenet" else f"file {weights}")


def output_dirs(cfg: dict | None = None) -> dict[str, Path]:
    """Where a run writes: reports (committed), models (checkpoints, ignored by git) and the decoded-image cache.

    Environment variables override the defaults so tests can send a smoke run to a temporary folder.
    """
    root = project_root()
    dirs = {
        "reports": Path(os.environ.get("HAM_REPORTS_DIR") or (cfg or {}).get("reports_dir") or root / "reports"),
        "models": Path(os.environ.get("HAM_MODELS_DIR") or (cfg or {}).get("models_dir") or root / "models"),
        "cache": Path(os.environ.get("HAM_CACHE_DIR") or root / "data" / "cache"),
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def recipe(cfg: dict, arch: str, name: str) -> dict:
    """The training settings for one model: the profile's recipe, then its per-model overrides."""
    if name not in cfg["recipes"]:
        raise KeyError(f"recipe {name!r} not in profile {cfg['name']!r}; known: {sorted(cfg['recipes'])}")
    r = _merge(cfg["recipes"][name], cfg.get("recipe_overrides", {}).get(f"{arch}/{name}", {}))
    r.update(arch=arch, recipe=name, run_name=f"{arch}_{name}")
    from .train import resolve_recipe  # defaults and validation live with the loop that uses them

    return resolve_recipe(r)
