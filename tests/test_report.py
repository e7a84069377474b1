"""report.py on fake run folders (small synthetic predictions in the files a model notebook writes; no training)."""
import ast
import json
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from helpers import metrics as M  # noqa: E402
from helpers import pages  # noqa: E402
from helpers import report as R  # noqa: E402
from helpers import review as V  # noqa: E402

DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_compare.ipynb"
PROVENANCE = {"data": "HAM10000 @ 200x150", "data_dir": "$HAM10000_DIR", "images": 600, "task": "dx",
              "image_size": "32x32", "split_seed": 42, "split_fractions": [0.7, 0.15, 0.15], "weights": "random init",
              "profile": "fake", "git_commit": "abc1234", "device": "CPU (x86_64, 2 cores)",
              "packages": {"numpy": np.__version__}, "date": "2026-01-01 00:00 UTC"}


def split_frame(n_lesions=(140, 60, 60), seed=0):
    """A lesion-grouped split: 1-3 images per lesion, nv the majority; each class has 4+ lesions per split."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in zip(("train", "val", "test"), n_lesions):
        labels = np.r_[np.repeat(np.arange(7), 4), rng.choice(7, n - 28, p=[.04, .05, .11, .02, .1, .65, .03])]
        for k, label in enumerate(labels):
            lesion = dict(dx_type=rng.choice(["histo", "follow_up", "consensus"]),
                          age=np.nan if rng.random() < 0.05 else float(rng.integers(10, 90)),
                          sex=rng.choice(["male", "female", "unknown"], p=[.5, .45, .05]),
                          localization=rng.choice(["back", "face", "trunk", "unknown"]))
            for j in range(rng.integers(1, 4)):
                rows.append(dict(image_id=f"{split}_{k}_{j}", lesion_id=f"{split}_L{k}", dx=DX[label], label=label,
                                 split=split, **lesion))
    return pd.DataFrame(rows)


def predictions(df, signal, temperature=1.0, seed=0):
    """A prediction table whose probabilities carry ``signal`` about the label, sharpened by 1/temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(df), 7)) + signal * np.eye(7)[df.label.to_numpy()]
    z = logits / temperature
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    out = df[["image_id", "lesion_id", "dx", "label"]].reset_index(drop=True).copy()
    out["pred"] = probs.argmax(1)
    for k, c in enumerate(DX):
        out[f"p_{c}"] = probs[:, k]
    return out


def write_run(reports, split, arch, recipe, seed, val, test, metrics=None, profile="fake", train_seconds=120.0,
              epochs=4, history_cum=True):
    """One run folder as the model notebooks write it (run.json, metrics.csv, history.csv, predictions_*.csv)."""
    run = f"{arch}_{recipe}_s{seed}"
    out = Path(reports) / run
    out.mkdir(parents=True, exist_ok=True)
    val.to_csv(out / "predictions_val.csv", index=False)
    test.to_csv(out / "predictions_test.csv", index=False)
    if metrics is None:
        metrics = M.summary_with_ci(test, DX, val_pred=val, n_boot=20, seed=0)
    elif isinstance(metrics, dict):
        metrics = pd.DataFrame([(k, v, v - 0.01, v + 0.01) for k, v in metrics.items()],
                               columns=["metric", "value", "ci_low", "ci_high"])
    metrics.to_csv(out / "metrics.csv", index=False)
    e = np.arange(1, epochs + 1)
    hist = pd.DataFrame({"epoch": e, "image_size": 32, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e,
                         "val_loss": 1 / e, "val_acc": 1 - 0.6 / e, "val_bal_acc": 0.5 - 0.3 / e,
                         "val_auc": 0.9 - 0.2 / e, "lr": 1e-3, "seconds": train_seconds / epochs + 1.0,
                         "img_per_s": 50.0})
    if history_cum:
        hist["train_seconds_cum"] = train_seconds / epochs * e
    hist.to_csv(out / "history.csv", index=False)
    meta = dict(run_name=run, model_name=f"{arch}_{recipe}", arch=arch, recipe=recipe, seed=seed, classes=list(DX),
                profile=profile, select_metric="val_auc", malignancy_threshold=0.1, image_size=32,
                checkpoint="model.pt", task="dx",
                info=dict(train_seconds=train_seconds, epochs_run=epochs, best_epoch=epochs, img_per_s=50.0,
                          trainable_params=1000, total_params=1000, select_metric="val_auc", device="cpu"),
                provenance={**PROVENANCE, "profile": profile})
    (out / "run.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def _study_template(tmp_path_factory):
    """Fake reports: resnet34_tuned with seeds 0 and 1, resnet50_tuned and resnet34_reference with one seed."""
    reports = tmp_path_factory.mktemp("study") / "reports"
    reports.mkdir()
    split = split_frame()
    split.to_csv(reports / "split.csv", index=False)
    val, test = split[split.split == "val"], split[split.split == "test"]
    specs = [("resnet34", "tuned", 0, 2.5), ("resnet34", "tuned", 1, 2.3), ("resnet50", "tuned", 0, 1.5),
             ("resnet34", "reference", 0, 0.8)]
    for i, (arch, recipe, seed, signal) in enumerate(specs):
        write_run(reports, split, arch, recipe, seed, predictions(val, signal, seed=10 + i),
                  predictions(test, signal, seed=20 + i), train_seconds=60.0 * (i + 1), history_cum=i != 3)
    return dict(reports=reports, split=split, val=val, test=test)


@pytest.fixture
def study(_study_template, tmp_path):
    """A fresh copy of the fake reports for each test (tests add runs and overwrite files), built once."""
    reports = tmp_path / "reports"
    shutil.copytree(_study_template["reports"], reports)
    return dict(reports=reports, **{k: _study_template[k].copy() for k in ("split", "val", "test")})


def cfg(**extra):
    return {"name": "fake", "bootstrap": 60, "description": "fake study", **extra}


# ------------------------------------------------------------------------------------------------ comparison
def test_compare_runs_end_to_end(study):
    comp = R.compare_runs(cfg(), study["reports"])
    t = comp["table"]
    assert list(comp["models"]) == ["resnet34_reference", "resnet34_tuned", "resnet50_tuned"]
    assert comp["models"]["resnet34_tuned"] == ["resnet34_tuned_s0", "resnet34_tuned_s1"]
    assert comp["baseline"] == R.BASELINE in t.index
    assert comp["best"] == "resnet34_tuned"  # the strongest signal, by validation AUC
    # paired comparisons: best against each other model, three metrics each, macro AUC first
    p = comp["paired"]
    assert len(p) == 2 * 3 and list(p.metric[:3]) == ["auc", "balanced_accuracy", "accuracy"]
    assert set(p.other) == {"resnet34_reference", "resnet50_tuned"} and (p.reference == "resnet34_tuned").all()
    assert ((p.p_value >= 0) & (p.p_value <= 1)).all() and (p.p_holm >= p.p_value - 1e-12).all()
    assert (p.seeds_reference == 2).all()
    assert {"difference [95% CI]", "p (Holm)"} <= set(comp["paired_display"].columns)
    # training minutes per run, from info.train_seconds (mean over seeds), and the device in the note
    assert t.loc["resnet34_tuned", "train min"] == pytest.approx((60 + 120) / 2 / 60)
    assert "train min" in comp["display"] and "CPU (x86_64, 2 cores)" in R.table_note(comp)
    for name in ("roc_overlay", "history_overlay", "time_to_accuracy"):
        assert comp["figures"][name].exists()
    assert comp["figures"]["time_to_accuracy"].name == "time_to_accuracy.png"
    for f in ("comparison.csv", "comparison_ci.csv", "runs.csv", "paired.csv", "seed_spread.csv"):
        assert (study["reports"] / "compare" / f).exists()
    summary = R.write_summary(cfg(), comp, study["reports"])
    assert "Holm" in summary["text"] and "noise floor" in summary["text"]


def test_seed_aggregation_mean_and_spread(tmp_path):
    """Two seeds of one model -> the table shows their mean and min–max, comparison.csv the sd too."""
    reports = tmp_path / "reports"
    reports.mkdir()
    split = split_frame()
    split.to_csv(reports / "split.csv", index=False)
    val, test = split[split.split == "val"], split[split.split == "test"]
    for seed, auc, acc in ((0, 0.80, 0.70), (1, 0.90, 0.76)):
        write_run(reports, split, "resnet34", "tuned", seed, predictions(val, 2, seed=seed),
                  predictions(test, 2, seed=seed), metrics={"accuracy": acc, "balanced_accuracy": 0.5, "auc": auc})
    write_run(reports, split, "resnet50", "tuned", 0, predictions(val, 1, seed=5), predictions(test, 1, seed=5),
              metrics={"accuracy": 0.6, "balanced_accuracy": 0.4, "auc": 0.7})
    comp = R.compare_runs(cfg(), reports)
    row = comp["table"].loc["resnet34_tuned"]
    assert row["n_seeds"] == 2 and row["seeds"] == "0,1"
    assert row["auc"] == pytest.approx(0.85) and row["auc_sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert (row["auc_min"], row["auc_max"]) == (pytest.approx(0.80), pytest.approx(0.90))
    assert comp["display"].loc["resnet34_tuned", "Macro AUC"] == "0.850 (0.800–0.900)"
    assert comp["display"].loc["resnet50_tuned", "Macro AUC"] == "0.700 [0.690, 0.710]"  # one seed: its CI
    spread = comp["seed_spread"].set_index("metric")
    assert set(comp["seed_spread"].model) == {"resnet34_tuned"}
    assert spread.loc["auc", "range"] == pytest.approx(0.10)
    text = comp["seed_spread_text"]
    assert "resnet34_tuned** over seeds 0, 1" in text and "test Macro AUC sd 0.071" in text and "noise floor" in text
    csv = pd.read_csv(reports / "compare" / "comparison.csv", index_col=0)
    assert csv.loc["resnet34_tuned", "auc_sd"] == pytest.approx(0.0707, abs=1e-4)
    # accuracy is the plain argmax's, recomputed from the predictions; the recipe rule's (metrics.csv) beside it
    argmax_acc = [M.accuracy(M.argmax_predictions(pd.read_csv(reports / f"resnet34_tuned_s{s}" / "predictions_test.csv"),
                                                  DX)) for s in (0, 1)]
    assert row["accuracy"] == pytest.approx(np.mean(argmax_acc), abs=1e-9)
    assert row["accuracy_rule"] == pytest.approx(0.73) and csv.loc["resnet34_tuned", "accuracy_rule_max"] == 0.76


def test_seed_spread_says_when_not_measured(study):
    comp = R.compare_runs(cfg(), study["reports"], names=["resnet50_tuned", "resnet34_reference"])
    assert not len(comp["seed_spread"])
    assert "not measured" in comp["seed_spread_text"]


def test_names_select_models_or_runs(study):
    comp = R.compare_runs(cfg(), study["reports"], names=["resnet34_tuned", "resnet50_tuned_s0"])
    assert set(comp["runs"]) == {"resnet34_tuned_s0", "resnet34_tuned_s1", "resnet50_tuned_s0"}
    with pytest.raises(FileNotFoundError, match="resnet152"):
        R.compare_runs(cfg(), study["reports"], names=["resnet152_tuned"])


@pytest.mark.parametrize("select_metric, best", [("val_auc", "sharp"), ("val_loss", "soft"), ("val_acc", "sharp")])
def test_best_model_chosen_by_the_profile_select_metric(tmp_path, select_metric, best):
    """'sharp' ranks validation images better (higher AUC) but is over-confident (higher loss); 'soft' is the
    reverse. The profile's select_metric decides, and test numbers (where 'soft' is far better) never do."""
    reports = tmp_path / "reports"
    reports.mkdir()
    split = split_frame()
    split.to_csv(reports / "split.csv", index=False)
    val, test = split[split.split == "val"], split[split.split == "test"]
    sharp_val, soft_val = predictions(val, 2.0, temperature=0.05, seed=1), predictions(val, 0.7, seed=2)
    assert M.macro_auc(sharp_val, DX) > M.macro_auc(soft_val, DX)
    assert M.validation_score(sharp_val, DX, "val_loss") > M.validation_score(soft_val, DX, "val_loss")
    write_run(reports, split, "sharp", "tuned", 0, sharp_val, predictions(test, 0.3, seed=3))
    write_run(reports, split, "soft", "tuned", 0, soft_val, predictions(test, 4.0, seed=4))
    comp = R.compare_runs(cfg(select_metric=select_metric), reports)
    assert comp["best"] == f"{best}_tuned" and comp["select_metric"] == select_metric
    assert f"{select_metric} (selects)" in comp["display"].columns and select_metric in comp["table"].columns
    assert comp["table"].loc[f"{best}_tuned", select_metric] == pytest.approx(
        M.validation_score(sharp_val if best == "sharp" else soft_val, DX, select_metric))
    assert (comp["paired"].reference == comp["best"]).all()


def test_default_select_metric_is_val_auc(study):
    assert R.compare_runs(cfg(), study["reports"])["select_metric"] == "val_auc"
    with pytest.raises(ValueError, match="select_metric"):
        R.compare_runs(cfg(select_metric="test_auc"), study["reports"])


# ------------------------------------------------------------------------------------------- README and structure
def test_readme_update_only_when_asked(monkeypatch):
    monkeypatch.delenv("HAM_UPDATE_README", raising=False)
    assert R.readme_update_wanted(None) is False  # the notebook default: never from a plain run
    assert R.readme_update_wanted(True) is True
    monkeypatch.setenv("HAM_UPDATE_README", "1")  # run_all.sh, committed profile
    assert R.readme_update_wanted(None) is True
    assert R.readme_update_wanted(False) is False  # explicit wins
    monkeypatch.setenv("HAM_UPDATE_README", "0")
    assert R.readme_update_wanted(None) is False


def test_notebook_update_readme_defaults_to_none_and_uses_the_gate():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = {t.id: n.value for n in ast.parse(params.source).body if isinstance(n, ast.Assign) for t in n.targets}
    assert ast.literal_eval(assigned["update_readme"]) is None
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "readme_update_wanted(update_readme)" in code
    for name in assigned:  # every parameter is used
        assert code.count(name) > 1, f"parameter {name} unused"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed outputs must be empty"


def test_provenance_line_lives_in_report():
    assert R.provenance_line(PROVENANCE) == ("HAM10000 @ 200x150, 32x32 input, split seed 42 (lesion-grouped "
                                             "70/15/15), random init, profile fake")


def test_compare_notebook_runs_on_fake_runs(study, tmp_path):
    """05_compare (up to any External validation section) on fake runs: parameters, prose and invariants hold."""
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cut = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                and c.source.lstrip().startswith("## External validation")), len(nb.cells))
    nb.cells = nb.cells[:cut]
    profile = tmp_path / "fake.yaml"
    profile.write_text("extends: smoke\nname: fake\nbootstrap: 40\n")
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\nprofile = {str(profile)!r}\n"
    env = {**os.environ, "HAM_REPORTS_DIR": str(study["reports"]), "MPLBACKEND": "Agg"}
    env.pop("HAM_UPDATE_README", None)
    readme = (ROOT / "README.md").read_bytes()
    old_env = dict(os.environ)
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    assert (ROOT / "README.md").read_bytes() == readme, "a plain run must not rewrite the README"
    assert (study["reports"] / "summary.md").exists()
    assert (study["reports"] / "compare" / "time_to_accuracy.png").exists()


def test_beyond_noise_names_the_side_it_favours():
    assert R.beyond_noise(+0.03, 0.01) == "best ahead"
    assert R.beyond_noise(-0.031, 0.018) == "other ahead"  # the committed cpu run: resnet101 vs resnet50 accuracy
    assert R.beyond_noise(+0.03, 0.05) == "no" and R.beyond_noise(-0.2, 0.9) == "no"


# --------------------------------------------------------------------------------- the review (issue 19)
def test_comparison_has_argmax_rule_and_both_baselines(study):
    comp = R.compare_runs(cfg(), study["reports"])
    t = comp["table"]
    assert R.METADATA_BASELINE in t.index and comp["baseline"] in t.index
    assert {"Accuracy (argmax)", "Balanced acc. (argmax)", "Recipe rule", "Balanced acc. (recipe rule)"} <= set(
        comp["display"].columns)
    test = pd.read_csv(study["reports"] / "resnet50_tuned_s0" / "predictions_test.csv", dtype={"image_id": str})
    assert t.loc["resnet50_tuned", "balanced_accuracy"] == pytest.approx(
        M.balanced_accuracy(M.argmax_predictions(test, DX)))
    low, high = t.loc[R.METADATA_BASELINE, ["auc_ci_low", "auc_ci_high"]]
    assert low <= t.loc[R.METADATA_BASELINE, "auc"] <= high
    assert t["is_best"].sum() == 1 and (t["select_metric"] == "val_auc").all()
    assert (study["reports"] / "compare" / "paired_rule.csv").exists()


def test_review_writes_every_table_and_figure(study):
    comp = R.compare_runs(cfg(), study["reports"])
    review = V.review_runs(comp, study["reports"], n_boot=30, min_site_images=20)
    out = study["reports"] / "compare"
    for f in ("by_reference_standard.csv", "subgroups.csv", "subgroups_forest.png", "unit_of_analysis.csv",
              "per_class_recall.csv", "decision_curve.csv", "decision_curve.png", "roc_by_reference_standard.png"):
        assert (out / f).exists(), f
    # a stratum's metric is the metric on the filtered frame
    ref = review["by_reference_standard"].set_index(["stratum", "run"])
    test = pd.read_csv(study["reports"] / "resnet50_tuned_s0" / "predictions_test.csv", dtype={"image_id": str})
    histo = test[test.image_id.isin(study["test"].image_id[study["test"].dx_type == "histo"])]
    assert ref.loc[("histo", "resnet50_tuned_s0"), "balanced_accuracy"] == pytest.approx(
        M.balanced_accuracy(M.argmax_predictions(histo, DX)))
    assert ref.loc[("histo", "resnet50_tuned_s0"), "n_images"] == len(histo)
    # the lesion rows are the groupby mean's metrics
    unit = review["unit_of_analysis"].set_index(["run", "unit"])
    les = M.lesion_level(M.argmax_predictions(test, DX), DX)
    assert unit.loc[("resnet50_tuned_s0", "lesion"), "auc"] == pytest.approx(M.macro_auc(les, DX))
    assert unit.loc[("resnet50_tuned_s0", "lesion"), "n_images"] == test.lesion_id.nunique()
    sub = review["subgroups"]
    assert set(sub.variable) == {"overall", "sex", "age", "site"} and set(sub.population) == {"all", "histo"}
    assert set(sub.run) == {review["best_run"], R.BASELINE, R.METADATA_BASELINE}
    summary = R.write_summary(cfg(), comp, study["reports"], review)
    for words in ("plain argmax", "per image", "By reference standard", "descriptive", "patient identifier",
                  "skin tone", "centre or device", "Decision curve", R.METADATA_BASELINE):
        assert words in summary["text"], words
    card = (study["reports"] / "resnet50_tuned_s0" / "model_card.md")
    assert not card.exists() or "patient identifier" in card.read_text()


def test_headline_reads_numbers_not_display_strings(study):
    comp = R.compare_runs(cfg(), study["reports"])
    V.review_runs(comp, study["reports"], n_boot=20, min_site_images=20)
    before = pages.headline(study["reports"])
    assert "plain argmax" in before and "per image" in before and R.METADATA_BASELINE in before
    assert f"{comp['table'].loc[comp['best'], 'auc']:.3f}" in before
    shown = study["reports"] / "compare" / "comparison_ci.csv"
    shown.write_text("model,garbage (selects)\nx,0.999 [0.1, 0.2]\n")  # the display table plays no part
    assert pages.headline(study["reports"]) == before
    src = (ROOT / "src" / "helpers" / "report.py").read_text()
    assert '" (selects)")' not in src and 'split("[", 1)' not in src


def test_fused_twin_appears_and_is_paired_with_its_image_run(study):
    reports = study["reports"]
    src = reports / "resnet50_tuned_s0"
    twin = reports / "resnet50_tuned_s0_meta"
    twin.mkdir()
    for f in ("predictions_val.csv", "predictions_test.csv", "metrics.csv"):
        (twin / f).write_bytes((src / f).read_bytes())
    meta = json.loads((src / "run.json").read_text())
    meta.update(run_name="resnet50_tuned_s0_meta", model_name="resnet50_tuned + metadata", fusion="late",
                image_run="resnet50_tuned_s0")
    (twin / "run.json").write_text(json.dumps(meta))  # no history.csv: late fusion trains nothing
    comp = R.compare_runs(cfg(), reports)
    assert "resnet50_tuned + metadata" in comp["table"].index
    assert comp["metadata_pairs"] == {"resnet50_tuned + metadata": "resnet50_tuned"}
    pm = comp["paired_metadata"]
    assert len(pm) == 3 and (pm.reference == "resnet50_tuned + metadata").all() and (pm.other == "resnet50_tuned").all()
    assert np.allclose(pm["difference"], 0)  # identical predictions: no difference


def test_one_run_discovery_and_one_select_metrics():
    ext = (ROOT / "src" / "helpers" / "external.py").read_text()
    assert "run_folders" not in ext and "R.find_runs(" in ext and 'glob("*/run.json")' not in ext
    for module in ("metrics.py", "report.py", "review.py", "pages.py"):
        tree = ast.parse((ROOT / "src" / "helpers" / module).read_text())
        assigned = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        assert "SELECT_METRICS" not in assigned, module
    from helpers import config
    assert M.SELECT_METRICS is config.SELECT_METRICS


def test_table_one_counts_every_image_once_per_variable():
    split = split_frame()
    t1 = V.table_one(split)
    counts = t1["counts"]
    for variable, block in counts.groupby(level="variable"):
        assert (block.sum() == [sum(split.split == s) for s in ("train", "val", "test")] + [len(split)]).all()
    assert counts.loc[("age band", "missing (unknown)"), "all"] == split.age.isna().sum()
    assert counts.loc[("sex", "missing (unknown)"), "all"] == (split.sex == "unknown").sum()
    assert t1["display"].loc[("lesions", ""), "test"] == str(split[split.split == "test"].lesion_id.nunique())
