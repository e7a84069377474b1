"""Image + metadata (issue 21): the encoder, the metadata-only model, late fusion chosen on validation alone, the
joint branch on synthetic data with and without a signal, and predict / external with and without the columns."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import clinical as C
from helpers.config import resolve_recipe
from helpers.data import DX_CLASSES
from helpers.model import MetadataResNet, build_model, load_trained, save_trained
from helpers.predict import predict_paths, read_metadata
from helpers.train import fit


def table(n, rng, signal=False):
    """A split table in HAM10000's columns: 3 classes; with ``signal`` the site and age depend on the label."""
    label = rng.integers(0, 3, n)
    sites = np.array(["back", "face", "trunk"])
    site = sites[label] if signal else rng.choice(sites, n)
    age = (30 + 20 * label if signal else rng.integers(20, 80, n)).astype(float) + rng.normal(0, 3, n)
    return pd.DataFrame(dict(label=label, age=age, sex=rng.choice(["male", "female"], n), localization=site))


# ------------------------------------------------------------------------------------------------- the encoder
def test_missing_and_unseen_categories_are_their_own_features():
    train = pd.DataFrame(dict(age=[40.0, 60.0, np.nan], sex=["male", "female", "unknown"],
                              localization=["back", "face", ""]))
    enc = C.ClinicalEncoder.fit(train)
    assert enc.sexes == ["female", "male"] and enc.sites == ["back", "face"]  # missing is not a category
    x = enc.transform(pd.DataFrame(dict(age=[np.nan, 50.0], sex=["Unknown", "other"], localization=[None, "moon"])))
    row = dict(zip(enc.names, x[0]))
    assert row["age_missing"] == 1 and row["age"] == 0 and row["sex_missing"] == 1 and row["site_missing"] == 1
    assert row["sex_unseen"] == 0 and row["site_unseen"] == 0
    row = dict(zip(enc.names, x[1]))
    assert row["sex_unseen"] == 1 and row["site_unseen"] == 1 and row["age"] == pytest.approx(0.0)  # mean of 40, 60
    assert sum(v for k, v in row.items() if k.startswith(("sex=", "site="))) == 0
    assert C.ClinicalEncoder.from_dict(enc.to_dict()).names == enc.names


def test_missing_columns_are_named():
    with pytest.raises(C.MetadataColumnsError, match=r"\['sex', 'localization'\]"):
        C.ClinicalEncoder.fit(pd.DataFrame(dict(age=[1.0])))


# ---------------------------------------------------------------------------------------------- late fusion
def split_frame(seed=0, signal=True):
    rng = np.random.default_rng(seed)
    df = table(600, rng, signal)
    df["split"] = np.repeat(["train", "val", "test"], 200)
    return df


def test_fusion_is_chosen_on_validation_alone():
    df = split_frame()
    rng = np.random.default_rng(1)
    p_val = rng.dirichlet(np.ones(3), 200)  # an uninformative "image network"
    fused = C.fit_late_fusion(df, p_val, 3)
    permuted = df.copy()
    test = permuted.split == "test"
    permuted.loc[test, "label"] = rng.permutation(permuted.loc[test, "label"].to_numpy())
    assert C.fit_late_fusion(permuted, p_val, 3) == fused  # test labels change nothing
    assert fused["weight"] > 0  # the metadata carries the signal here, and validation sees it
    val = permuted.split == "val"
    permuted.loc[val, "label"] = rng.permutation(permuted.loc[val, "label"].to_numpy())
    assert C.fit_late_fusion(permuted, p_val, 3)["weight_sweep"] != fused["weight_sweep"]  # validation does


def test_fuse_is_a_product_of_experts():
    p_img = np.array([[0.6, 0.3, 0.1]])
    p_meta = np.array([[0.2, 0.5, 0.3]])
    log_prior = np.log([0.5, 0.3, 0.2])
    z = np.log(p_img) + 0.5 * (np.log(p_meta) - log_prior)
    want = np.exp(z) / np.exp(z).sum()
    assert np.allclose(C.fuse(p_img, p_meta, log_prior, 0.5), want)
    assert np.allclose(C.fuse(p_img, p_meta, log_prior, 0.0), p_img)


# --------------------------------------------------------------------------------------------- the joint branch
def joint_auc(signal: bool, meta: bool, seed: int = 0) -> float:
    """Validation macro AUC of a tiny ResNet-18 on images of pure noise, with or without the metadata branch."""
    rng = np.random.default_rng(seed)
    df = table(480, rng, signal)
    x = torch.from_numpy(rng.integers(0, 256, (480, 3, 16, 16), dtype=np.uint8))
    y = torch.as_tensor(df.label.to_numpy())
    train, val = slice(0, 360), slice(360, 480)
    enc = C.ClinicalEncoder.fit(df.iloc[train])
    m = torch.from_numpy(enc.transform(df))
    torch.manual_seed(seed)
    model = build_model("resnet18", 3, meta_features=len(enc.names) if meta else 0)
    r = resolve_recipe(dict(epochs=4, batch_size=60, optimizer="adamw", lr=3e-3, image_size=16, augment="none",
                            seed=seed, run_name="joint-test"))
    tr = (x[train], y[train]) + ((m[train],) if meta else ())
    va = (x[val], y[val]) + ((m[val],) if meta else ())
    _, history, _ = fit(model, tr, va, r, device="cpu", progress=False)
    return float(history.val_auc.max())


def test_joint_branch_uses_metadata_only_when_it_carries_signal():
    image_only = joint_auc(signal=True, meta=False)
    with_signal = joint_auc(signal=True, meta=True)
    no_signal = joint_auc(signal=False, meta=True)
    assert with_signal > image_only + 0.2, (with_signal, image_only)  # the branch reads a real signal
    assert no_signal < image_only + 0.1, (no_signal, image_only)  # and invents none from shuffled fields


def test_a_joint_model_saves_and_loads_as_one_object(tmp_path):
    enc = C.ClinicalEncoder.fit(table(30, np.random.default_rng(0)))
    torch.manual_seed(0)
    model = build_model("resnet18", 7, meta_features=len(enc.names))
    assert isinstance(model, MetadataResNet)
    meta = dict(arch="resnet18", classes=list(DX_CLASSES), image_size=16, head="linear", dropout=0.0,
                clinical=dict(mode="joint", encoder=enc.to_dict(), features=enc.names))
    loaded, back = load_trained(save_trained(model, meta, tmp_path / "model.pt"))
    x, m = torch.randint(0, 255, (2, 3, 16, 16)).float(), torch.from_numpy(enc.transform(table(2, np.random.default_rng(1))))
    model.eval()
    assert torch.allclose(loaded(x, m), model(x, m)) and back["clinical"]["encoder"] == enc.to_dict()


# ------------------------------------------------------------------------------------ predict and external
@pytest.fixture(scope="module")
def late_model(tmp_path_factory):
    """A random ResNet-18 with a late-fusion metadata model, three images and their metadata.csv."""
    tmp = tmp_path_factory.mktemp("late")
    df = split_frame()
    df["label"] = df["label"] * 2  # three of the seven diagnoses
    rng = np.random.default_rng(0)
    fusion = C.fit_late_fusion(df, rng.dirichlet(np.ones(7), 200), 7)
    fusion["weight"] = 1.0  # so the fused probabilities surely differ from the image's
    torch.manual_seed(0)
    meta = dict(arch="resnet18", classes=list(DX_CLASSES), image_size=16, head="linear", dropout=0.0,
                clinical=fusion, uses_metadata=False)
    ckpt = save_trained(build_model("resnet18", 7), meta, tmp / "model.pt")
    images = tmp / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    pd.DataFrame(dict(image_id=["a", "b", "c"], age=[50, None, 30], sex=["male", "unknown", "robot"],
                      localization=["back", "face", "moon"])).to_csv(tmp / "metadata.csv", index=False)
    return dict(ckpt=ckpt, images=images, metadata=tmp / "metadata.csv")


def test_predict_fuses_with_metadata_and_scores_the_image_alone_when_asked(late_model):
    model, meta = load_trained(late_model["ckpt"])
    paths = sorted(late_model["images"].glob("*.jpg"))
    with pytest.raises(C.MetadataColumnsError, match="age.*sex.*localization"):
        predict_paths(model, meta, paths)
    fused, errors = predict_paths(model, meta, paths, metadata=read_metadata(late_model["metadata"]))
    alone, _ = predict_paths(model, meta, paths, image_only=True)
    assert not errors and len(fused) == 3  # a missing age, an unknown sex and an unseen site are all fine
    p = [f"p_{c}" for c in DX_CLASSES]
    assert np.allclose(fused[[f"image_{c}" for c in p]].to_numpy(), alone[p].to_numpy())
    assert not np.allclose(fused[p].to_numpy(), alone[p].to_numpy())
    assert set(fused.scored_with) == {"image + metadata (late fusion)"} and "image only" in alone.scored_with[0]


def test_predict_cli_without_columns_names_them_and_image_only_works(late_model, tmp_path, run_main):
    no_meta = tmp_path / "images"
    no_meta.mkdir()
    for p in late_model["images"].glob("*.jpg"):
        (no_meta / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "p.csv"
    res = run_main("helpers.predict", "--checkpoint", late_model["ckpt"], no_meta, "--out", out)
    assert res.returncode == 2 and "['age', 'sex', 'localization']" in res.stderr and "--image-only" in res.stderr
    assert not out.exists()
    res = run_main("helpers.predict", "--checkpoint", late_model["ckpt"], no_meta, "--out", out, "--image-only")
    assert res.returncode == 0 and "image only" in res.stderr and len(pd.read_csv(out)) == 3
    res = run_main("helpers.predict", "--checkpoint", late_model["ckpt"], no_meta, "--out", out,
                   "--metadata", late_model["metadata"])
    assert res.returncode == 0 and "late fusion" in res.stderr


def test_external_without_columns_names_them_and_reports_both_scores_with_them(late_model, tmp_path, run_main):
    labels = tmp_path / "labels.csv"
    pd.DataFrame(dict(image_id=["a", "b", "c"], dx=["mel", "nv", "bkl"])).to_csv(labels, index=False)
    args = ["helpers.external", "--checkpoint", late_model["ckpt"], "--images", late_model["images"], "--labels",
            labels, "--n-boot", "0"]
    res = run_main(*args, "--out", tmp_path / "none")
    assert res.returncode == 2 and "['age', 'sex', 'localization']" in res.stderr
    assert not (tmp_path / "none").exists()
    res = run_main(*args, "--out", tmp_path / "alone", "--image-only")
    assert res.returncode == 0 and "image only" in res.stderr
    res = run_main(*args, "--out", tmp_path / "both", "--metadata", late_model["metadata"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "both" / "metrics_image_only.csv").exists()
    assert "| image + metadata | 95% CI | image only |" in (tmp_path / "both" / "external.md").read_text()
