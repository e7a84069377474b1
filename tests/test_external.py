"""``python -m helpers.external`` and the 05_compare section on generated external sets: both label forms, images of
odd sizes and modes, a missing image, a stray image, an unreadable one, fatal label errors that write nothing, and
a known-answer case whose metrics are computed by hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import external as X
from helpers import metrics as M
from helpers import predict
from helpers.data import BINARY_CLASSES, DX_CLASSES, MALIGNANT
from helpers.model import build_model, save_trained
from helpers.synthetic import fake_image

SIZE = 32
N_BOOT = 40
ROOT = Path(__file__).resolve().parents[1]
# (mode, size, suffix) cycled over the images: grayscale, RGBA, palette, a very wide one, odd sizes
VARIANTS = [("RGB", (33, 47), ".jpg"), ("L", (64, 48), ".jpg"), ("RGBA", (40, 30), ".png"), ("P", (17, 23), ".png"),
            ("RGB", (300, 16), ".jpeg")]


def tiny_checkpoint(path: Path, classes=DX_CLASSES, threshold=0.5, **extra) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes), None)
    meta = dict(arch="resnet18", classes=list(classes), image_size=SIZE, head="linear", dropout=0.0,
                malignancy_threshold=threshold, profile="smoke", run_name="resnet18_tuned_s0",
                provenance=dict(data="HAM10000 @ 40x30 (generated)", image_size=f"{SIZE}x{SIZE}", split_seed=42,
                                weights="random init", profile="smoke", git_commit="test", date="today"))
    meta.update(extra)
    return save_trained(model, meta, path)


def make_external(root: Path, form: str = "dx", per_class: int = 5, seed: int = 0, group: str | None = "lesion_id",
                  stray: bool = True, missing: bool = True, broken: bool = True) -> Path:
    """``root/images`` (some in a sub-folder) + ``root/labels.csv`` in either label form."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    (images / "clinic_b").mkdir(parents=True, exist_ok=True)
    rows = []
    for dx in DX_CLASSES:
        for _ in range(per_class):
            i = len(rows)
            mode, size, suffix = VARIANTS[i % len(VARIANTS)]
            img = fake_image(dx, rng, size).convert(mode)
            folder = images / "clinic_b" if i % 3 == 0 else images
            img.save(folder / f"EXT_{i:04d}{suffix}")
            rows.append(dict(image_id=f"EXT_{i:04d}", lesion_id=f"LES_{i // 2:04d}", dx=dx))
    if stray:
        fake_image("nv", rng).save(images / "STRAY_0001.jpg")
    if missing:
        rows.append(dict(image_id="MISSING_0001", lesion_id="LES_9999", dx="nv"))
    if broken:
        fake_image("mel", rng).save(images / "BROKEN_0001.jpg")
        data = (images / "BROKEN_0001.jpg").read_bytes()
        (images / "BROKEN_0001.jpg").write_bytes(data[: len(data) // 3])
        rows.append(dict(image_id="BROKEN_0001", lesion_id="LES_9998", dx="mel"))
    df = pd.DataFrame(rows)
    if form == "binary":
        df["melanoma"] = (df.dx == "mel").astype(int)
        df = df.drop(columns="dx")
    if group is None:
        df = df.drop(columns="lesion_id")
    elif group != "lesion_id":
        df = df.rename(columns={"lesion_id": group})
    df.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def dx_set(tmp_path_factory):
    return make_external(tmp_path_factory.mktemp("ext_dx"), "dx")


@pytest.fixture(scope="module")
def binary_set(tmp_path_factory):
    return make_external(tmp_path_factory.mktemp("ext_bin"), "binary", group=None)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "helpers.external", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ------------------------------------------------------------------------------------------------------ the CLI
def test_cli_dx_form_writes_everything_and_names_what_it_skipped(ckpt, dx_set, tmp_path):
    out = tmp_path / "out"
    r = cli("--checkpoint", ckpt, "--images", dx_set / "images", "--labels", dx_set / "labels.csv", "--out", out,
            "--n-boot", N_BOOT, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for name in ("predictions.csv", "metrics.csv", "roc.png", "reliability.png", "evaluation.png", "skipped.csv",
                 "external.md"):
        assert (out / name).exists(), name
    for name in ("MISSING_0001", "STRAY_0001", "BROKEN_0001"):
        assert name in r.stderr
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 7 * 5 and set(pred.dx) == set(DX_CLASSES)
    # exactly what predict.predict_paths gives (the evaluation preprocessing, tested in test_predict.py)
    model, meta = predict.load_checkpoint(ckpt, "cpu")
    ref, _ = predict.predict_paths(model, meta, pred.path.tolist())
    cols = [f"p_{c}" for c in DX_CLASSES]
    np.testing.assert_allclose(pred[cols].to_numpy(), ref[cols].to_numpy(), atol=2e-6)
    met = pd.read_csv(out / "metrics.csv")
    assert list(met.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert {"accuracy", "balanced_accuracy", "auc", "log_loss", "ece", "malignancy_auc", "sensitivity",
            "specificity", "oracle_threshold", "oracle_sensitivity", "oracle_specificity"} <= set(met.metric)
    assert met.set_index("metric").loc["oracle_sensitivity", "value"] >= 0.95
    md = (out / "external.md").read_text()
    for text in ("35 images", "lesion_id", "MISSING_0001", "STRAY_0001", "BROKEN_0001", "oracle", "0.5000",
                 "not re-tuned", str(dx_set / "images"), "HAM10000 @ 40x30"):
        assert text in md, text
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(skipped.kind) == ["image without label", "label without image", "unreadable"]


def test_binary_form_with_positive_class(ckpt, binary_set, tmp_path):
    out = tmp_path / "out"
    assert X.main(["--checkpoint", str(ckpt), "--images", str(binary_set / "images"), "--labels",
                   str(binary_set / "labels.csv"), "--out", str(out), "--positive", "mel", "--n-boot", str(N_BOOT),
                   "--device", "cpu"]) == 0
    met = pd.read_csv(out / "metrics.csv").set_index("metric")
    assert {"auc_mel", "malignancy_auc", "sensitivity", "specificity", "oracle_threshold"} <= set(met.index)
    assert "accuracy" not in met.index  # no 7-class metrics from a 0/1 column
    pred = pd.read_csv(out / "predictions.csv")
    assert {"melanoma", "malignancy_score", "p_mel"} <= set(pred.columns)
    np.testing.assert_allclose(pred.malignancy_score, pred[[f"p_{c}" for c in MALIGNANT]].sum(axis=1), atol=1e-5)
    md = (out / "external.md").read_text()
    assert "**images**" in md and "no patient_id or lesion_id" in md  # the bootstrap unit is said
    assert "0/1 column `melanoma`" in md and "P(mel)" in md
    assert not (out / "evaluation.png").exists()


def test_known_answer_with_fixed_probabilities(ckpt, tmp_path, monkeypatch):
    """8 images, P(mel) and P(bcc) fixed by hand (the network replaced), so every number is known:
    positives' P(mel) 0.9 0.8 0.4 0.3, negatives' 0.7 0.2 0.1 0.05 -> AUC 14/16 = 0.875.
    Malignancy score (adding P(bcc) 0.3 to the 4th positive, 0.25 to the 2nd negative): positives 0.9 0.8 0.4 0.6,
    negatives 0.7 0.45 0.1 0.05 -> AUC 13/16 = 0.8125. At the checkpoint's threshold 0.5: sensitivity 3/4,
    specificity 3/4. Oracle: the highest threshold catching all 4 positives is 0.4; specificity there 2/4."""
    images = tmp_path / "ext" / "images"
    images.mkdir(parents=True)
    p_mel = [0.9, 0.8, 0.4, 0.3, 0.7, 0.2, 0.1, 0.05]
    p_bcc = [0, 0, 0, 0.3, 0, 0.25, 0, 0]
    ids = [f"K{i}" for i in range(8)]
    for i in ids:
        Image.new("RGB", (8, 8)).save(images / f"{i}.png")
    pd.DataFrame({"image_id": ids, "patient_id": ["A", "A", "B", "C", "D", "D", "E", "F"],
                  "melanoma": [1, 1, 1, 1, 0, 0, 0, 0]}).to_csv(tmp_path / "ext" / "labels.csv", index=False,
                                                                encoding="utf-8-sig")  # with a BOM, as Excel saves

    def fixed(model, meta, paths, batch_size=64, device=None, metadata=None, image_only=False):
        rows = []
        for p in map(Path, paths):
            k = ids.index(p.stem)
            probs = dict.fromkeys(meta["classes"], 0.0)
            probs.update(mel=p_mel[k], bcc=p_bcc[k], nv=1 - p_mel[k] - p_bcc[k])
            rows.append({"path": str(p), "predicted": max(probs, key=probs.get), **{f"p_{c}": v for c, v in
                                                                                    probs.items()}})
        return pd.DataFrame(rows), []

    monkeypatch.setattr(predict, "predict_paths", fixed)
    res = X.run(ckpt, images, tmp_path / "ext" / "labels.csv", tmp_path / "out", positive="mel", n_boot=N_BOOT,
                device="cpu")
    got = res["metrics"].set_index("metric")["value"]
    expected = dict(auc_mel=0.875, malignancy_auc=0.8125, sensitivity=0.75, specificity=0.75, oracle_threshold=0.4,
                    oracle_sensitivity=1.0, oracle_specificity=0.5)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name
    written = pd.read_csv(tmp_path / "out" / "metrics.csv").set_index("metric")["value"]
    for name, value in expected.items():
        assert written[name] == pytest.approx(value, abs=1e-4), name
    md = (tmp_path / "out" / "external.md").read_text()
    assert "**patient_id** (6 groups)" in md
    assert "0.8125" in (tmp_path / "out" / "metrics.csv").read_text()


# ------------------------------------------------------------------------------------------------ fatal errors
def _with_labels(src: Path, tmp: Path, edit) -> Path:
    labels = edit(pd.read_csv(src / "labels.csv", dtype=str))
    path = tmp / "labels.csv"
    labels.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda df: df.assign(dx=df.dx.where(df.index != 3, "melanoma")),
     "unknown diagnosis name(s) in column dx: 'melanoma' (1 rows)"),
    (lambda df: df.assign(dx=df.dx.where(df.index != 3, None)), "'(blank)' (1 rows)"),
    (lambda df: df.rename(columns={"dx": "diagnosis"}), "neither a dx column"),
    (lambda df: df.drop(columns="image_id"), "no image_id column"),
    (lambda df: df.assign(image_id=df.image_id.where(df.index != 1, df.image_id[0])), "more than once"),
])
def test_dx_label_errors_are_fatal_and_write_nothing(ckpt, dx_set, tmp_path, edit, message, run_main):
    labels = _with_labels(dx_set, tmp_path, edit)
    out = tmp_path / "out"
    r = run_main("helpers.external", "--checkpoint", ckpt, "--images", dx_set / "images", "--labels", labels,
                 "--out", out, "--device", "cpu")
    assert r.returncode == 2
    assert message in r.stderr and "nothing was written" in r.stderr
    assert nothing_written(out)


def test_binary_label_errors(binary_set, tmp_path):
    def unknown(df):
        df.loc[2, "melanoma"] = "2"
        return df
    with pytest.raises(X.ExternalError, match=r"column 'melanoma' must hold 0 or 1; it also holds '2' \(1 rows\)"):
        X.read_labels(_with_labels(binary_set, tmp_path, unknown), label_column="melanoma")
    # without --label-column the column is no longer a 0/1 column: "neither form", naming the stray value
    with pytest.raises(X.ExternalError, match=r"neither a dx column.*'melanoma' holds values other than 0/1: 2"):
        X.read_labels(tmp_path / "labels.csv")

    def two(df):
        return df.assign(keratosis="0")
    with pytest.raises(X.ExternalError, match=r"several 0/1 columns \['melanoma', 'keratosis'\].*--label-column"):
        X.read_labels(_with_labels(binary_set, tmp_path, two))
    assert X.read_labels(tmp_path / "labels.csv", label_column="keratosis").column == "keratosis"


def test_option_and_output_folder_errors(ckpt, dx_set, binary_set, tmp_path):
    args = dict(checkpoint=ckpt, n_boot=0, device="cpu")
    with pytest.raises(X.ExternalError, match="--positive applies to a 0/1 label column"):
        X.run(images=dx_set / "images", labels=dx_set / "labels.csv", out=tmp_path / "a", positive="mel", **args)
    with pytest.raises(X.ExternalError, match="--positive 'melanoma' is not one of the checkpoint's classes"):
        X.run(images=binary_set / "images", labels=binary_set / "labels.csv", out=tmp_path / "b",
              positive="melanoma", **args)
    with pytest.raises(X.ExternalError, match="checkpoint .* not found"):
        X.run(images=dx_set / "images", labels=dx_set / "labels.csv", out=tmp_path / "c",
              **{**args, "checkpoint": tmp_path / "nope.pt"})
    assert all(nothing_written(tmp_path / n) for n in "abc")
    # a folder with other files is never replaced; an earlier output is
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.docx").write_text("precious")
    with pytest.raises(X.ExternalError, match="not an earlier external-validation folder"):
        X.run(images=dx_set / "images", labels=dx_set / "labels.csv", out=busy, **args)
    assert (busy / "thesis.docx").read_text() == "precious"
    out = tmp_path / "again"
    X.run(images=dx_set / "images", labels=dx_set / "labels.csv", out=out, **args)
    (out / "stale.png").write_text("old")
    X.run(images=binary_set / "images", labels=binary_set / "labels.csv", out=out, **args)
    assert not (out / "stale.png").exists() and "0/1 column" in (out / "external.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------------------------- metric details
def test_absent_class_and_binary_checkpoint(ckpt, dx_set, tmp_path):
    labels = X.read_labels(dx_set / "labels.csv")
    matched, skipped, _ = X.match_images(labels, dx_set / "images")
    model, meta = predict.load_checkpoint(ckpt, "cpu")
    res = X.evaluate(model, meta, labels, matched[matched.target != "df"].reset_index(drop=True), n_boot=0)
    got = res["metrics"].set_index("metric")["value"]
    assert "auc" not in got and "auc_present_classes" in got
    pred = res["pred"]
    by_hand = np.mean([M.macro_auc(pred.assign(label=(pred.label == k).astype(int), **{
        "p_no": 1 - pred[f"p_{c}"], "p_yes": pred[f"p_{c}"]}), ("no", "yes"))
        for k, c in enumerate(DX_CLASSES) if c != "df"])
    assert got["auc_present_classes"] == pytest.approx(by_hand)
    assert any("no images of df" in n for n in res["notes"])
    # with every class present the mean over classes is metrics.macro_auc itself
    full = X.evaluate(model, meta, labels, matched, n_boot=0)["pred"]
    assert X.class_auc_mean(full, DX_CLASSES, range(7)) == pytest.approx(M.macro_auc(full, DX_CLASSES))
    # a benign/malignant checkpoint on dx labels: scored as malignant vs benign
    bin_ckpt = tiny_checkpoint(tmp_path / "binary.pt", BINARY_CLASSES, threshold=0.3)
    out = tmp_path / "out"
    res = X.run(bin_ckpt, dx_set / "images", dx_set / "labels.csv", out, n_boot=0, device="cpu")
    assert set(res["metrics"].metric) == {"malignancy_auc", "sensitivity", "specificity", "oracle_threshold",
                                          "oracle_sensitivity", "oracle_specificity"}
    y = res["pred"].dx.isin(MALIGNANT)
    assert res["metrics"].set_index("metric").loc["sensitivity", "value"] == pytest.approx(
        (res["pred"].p_malignant[y] >= 0.3).mean())


# ---------------------------------------------------------------------------------------- every run, 05_compare
def fake_reports(root: Path, ckpt_dir: Path) -> Path:
    """reports/<run>/run.json (+ metrics.csv) for two runs of the smoke profile, one of another profile, one whose
    checkpoint was never trained here and one whose checkpoint is not a checkpoint."""
    reports = root / "reports"
    for run, profile, trained in [("resnet18_tuned_s0", "smoke", True), ("resnet34_tuned_s0", "smoke", True),
                                  ("resnet18_tuned_s1", "smoke", False), ("resnet18_tuned_s2", "smoke", None),
                                  ("resnet18_tuned_s9", "quick", True)]:
        folder = reports / run
        folder.mkdir(parents=True)
        model_pt = ckpt_dir / run / "model.pt"
        if trained:
            tiny_checkpoint(model_pt, run_name=run, recipe="tuned")
        elif trained is None:
            model_pt.parent.mkdir(parents=True)
            model_pt.write_bytes(b"not a checkpoint")
        (folder / "run.json").write_text(json.dumps(dict(run_name=run, profile=profile,
                                                         checkpoint=str(Path("..", "..", "models", run, "model.pt")))))
        pd.DataFrame({"metric": ["auc", "malignancy_auc", "sensitivity", "specificity"],
                      "value": [0.8, 0.75, 0.95, 0.4], "ci_low": [0.7, 0.7, 0.9, 0.3],
                      "ci_high": [0.9, 0.8, 1.0, 0.5]}).to_csv(folder / "metrics.csv", index=False)
    return reports


def test_score_runs_every_run_of_the_profile(dx_set, tmp_path):
    reports = fake_reports(tmp_path, tmp_path / "models")
    ext = X.score_runs(reports, dx_set, reports / "external", profile="smoke", n_boot=0, device="cpu")
    assert sorted(ext["table"].index) == ["resnet18_tuned_s0", "resnet34_tuned_s0"]
    assert [n for n, _ in ext["skipped_runs"]] == ["resnet18_tuned_s1", "resnet18_tuned_s2"]
    assert "not found" in ext["skipped_runs"][0][1] and "could not be loaded" in ext["skipped_runs"][1][1]
    assert {"auc (test)", "auc (external)", "malignancy_auc (test)", "malignancy_auc (external)",
            "oracle_specificity (external)"} <= set(ext["table"].columns)
    assert (ext["table"]["auc (test)"] == 0.8).all()
    assert ext["display"].loc["resnet18_tuned_s0", "auc (test)"] == "0.800 [0.700, 0.900]"
    out = reports / "external"
    assert ext["figures"]["roc"] == out / "roc.png" and (out / "roc.png").exists()
    assert (out / "comparison.csv").exists() and (out / "resnet34_tuned_s0" / "metrics.csv").exists()
    assert "resnet18_tuned_s1: not scored" in (out / "external.md").read_text()
    assert "lesions" in ext["summary_line"]
    X.score_runs(reports, dx_set, out, profile="smoke", names=["resnet34_tuned_s0"], n_boot=0, device="cpu")
    assert not (out / "resnet18_tuned_s0").exists()  # the earlier output was replaced, not merged


def external_cells() -> tuple[str, list[str]]:
    nb = nbformat.read(ROOT / "notebooks" / "05_compare.ipynb", as_version=4)
    params = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    start = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                 and c.source.startswith("## External validation"))
    assert all(c.cell_type == "markdown" or "external" in c.source for c in nb.cells[start:])
    return params, [c.source for c in nb.cells[start:] if c.cell_type == "code"]


@pytest.mark.parametrize("given", [False, True])
def test_notebook_section(dx_set, tmp_path, monkeypatch, given):
    """The section's cells, run as 05_compare runs them (its parameters, then after the comparison), with and
    without an external set."""
    params, cells = external_cells()
    assert "external_dir = None" in params
    reports = fake_reports(tmp_path, tmp_path / "models")
    shown = []
    ns = dict(cfg={"name": "smoke", "bootstrap": 0}, reports=reports, runs=None, comp={},
              display=lambda *a: shown.extend(a), Image=lambda p: ("image", Path(p)), Markdown=lambda t: ("md", t))
    monkeypatch.delenv("HAM_EXTERNAL_DIR", raising=False)
    exec(params, ns)
    if given:
        monkeypatch.setenv("HAM_EXTERNAL_DIR", str(dx_set))
    for source in cells:
        exec(source, ns)
    if given:
        assert [s for s in shown if isinstance(s, tuple)] == [("image", reports / "external" / "roc.png")]
        assert any(isinstance(s, pd.DataFrame) and "auc (external)" in s.columns for s in shown)
    else:
        assert shown == [("md", X.HOW_TO_ADD)] and not (reports / "external").exists()
