"""``run_recipe``, the step every model notebook calls: the same profile and data give the same model and metrics,
whatever ran before it in the kernel (02_transfer_resnet34 trains two models in one kernel, 01-05 run in order)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers.config import load_profile
from helpers.experiment import load_data, prepare_data, run_recipe


def run_in(tmp_path, monkeypatch, name, disturb_seed):
    """One run of the smoke profile's first resnet34 recipe into its own reports/models folders, after drawing
    from the global RNG as an earlier cell might have."""
    monkeypatch.setenv("HAM_REPORTS_DIR", str(tmp_path / name / "reports"))
    monkeypatch.setenv("HAM_MODELS_DIR", str(tmp_path / name / "models"))
    cfg = load_profile("smoke")
    data = prepare_data(cfg)
    torch.manual_seed(disturb_seed)
    torch.rand(disturb_seed + 1)
    result = run_recipe(cfg, "resnet34", cfg["models"]["resnet34"][0], data, progress=False)
    return result["history"].drop(columns=["seconds", "img_per_s"]), result["metrics"]


@pytest.mark.filterwarnings("ignore")
def test_run_recipe_does_not_depend_on_earlier_random_draws(tmp_path, monkeypatch):
    history_a, metrics_a = run_in(tmp_path, monkeypatch, "a", 1)
    history_b, metrics_b = run_in(tmp_path, monkeypatch, "b", 7)
    pd.testing.assert_frame_equal(history_a, history_b)
    pd.testing.assert_frame_equal(metrics_a, metrics_b)


def test_etl_and_the_model_notebooks_share_one_decoded_cache(tmp_path, monkeypatch):
    """01_etl builds the cache; 02-05 read the saved split back and must find that same cache, not decode again."""
    monkeypatch.setenv("HAM_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("HAM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_profile("smoke")
    etl, later = prepare_data(cfg), load_data(cfg)
    assert etl["cache"]["built"] and not later["cache"]["built"]
    assert etl["cache"]["path"] == later["cache"]["path"]
    assert list(etl["df"].image_id) == list(later["df"].image_id)
    assert len(list((tmp_path / "cache").iterdir())) == 1
