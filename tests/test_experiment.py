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
    cfg = load_profile("smoke", max_train_images=128, bootstrap=20, gradcam_per_class=1)  # seconds, not tens
    data = prepare_data(cfg)
    torch.manual_seed(disturb_seed)
    torch.rand(disturb_seed + 1)
    result = run_recipe(cfg, "resnet34", cfg["models"]["resnet34"][0], data, progress=False)
    return result["history"].drop(columns=["seconds", "img_per_s", "train_seconds_cum"]), result["metrics"]


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


def test_subsample_returns_at_most_n_whole_lesions_of_every_class():
    from helpers.experiment import subsample

    df = pd.DataFrame({"lesion_id": [f"L{i // 3}" for i in range(300)],
                       "dx": ["nv"] * 210 + ["mel"] * 60 + ["df"] * 30})
    for n in (20, 50, 101):
        sub = subsample(df, n, seed=0)
        assert len(sub) <= n, (n, len(sub))  # it promised "at most n" and returned more
        assert set(sub.dx) == {"nv", "mel", "df"}
        assert sub.groupby("lesion_id").size().eq(3).all()


def test_changed_training_code_retrains_and_says_why(tmp_path, monkeypatch, capsys):
    """The run key covers the source that shapes training: an edited augment.py must not load the old run."""
    import shutil

    import helpers.experiment as E

    monkeypatch.setenv("HAM_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("HAM_MODELS_DIR", str(tmp_path / "models"))
    src = tmp_path / "src"
    shutil.copytree(E.Path(E.__file__).parent, src)
    monkeypatch.setattr(E, "SOURCE_DIR", src)
    cfg = load_profile("smoke")
    data = prepare_data(cfg)
    r = E.get_recipe(cfg, "resnet34", "reference")
    key_before = E.run_key(E.run_key_parts(r, cfg, data))
    run_recipe(cfg, "resnet34", "reference", data, progress=True)
    with open(src / "augment.py", "a") as fh:
        fh.write("\n# an edit\n")
    parts = E.run_key_parts(r, cfg, data)
    assert E.run_key(parts) != key_before
    note = E.why_retrain(tmp_path / "models" / "smoke", r["run_name"], parts)
    assert note and "source augment.py" in note
    parts_torch = {**parts, "torch": "0.0"}
    assert E.run_key(parts_torch) != E.run_key(parts)


def test_superseded_lists_older_folders_of_a_run_and_keeps_the_one_in_use(tmp_path, monkeypatch):
    import os

    from helpers.experiment import main, superseded

    models = tmp_path / "cpu"
    for i, name in enumerate(["resnet34_tuned_s0-aaa", "resnet34_tuned_s0-bbb", "resnet50_tuned_s0-ccc"]):
        (models / name).mkdir(parents=True)
        (models / name / "model.pt").write_bytes(b"x" * 10)
        os.utime(models / name, (1000 + i, 1000 + i))
    assert superseded(models) == [models / "resnet34_tuned_s0-aaa"]
    os.utime(models / "resnet34_tuned_s0-aaa", (2000, 2000))  # the older key is in use again (code reverted)
    assert superseded(models) == [models / "resnet34_tuned_s0-bbb"]
    monkeypatch.setenv("HAM_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HAM_REPORTS_DIR", str(tmp_path / "published"))
    assert main(["prune", "cpu", "--delete"]) == 0
    assert not (tmp_path / "published").exists()  # pruning looks at models only: it creates no reports folder
    assert sorted(p.name for p in models.iterdir()) == ["resnet34_tuned_s0-aaa", "resnet50_tuned_s0-ccc"]
