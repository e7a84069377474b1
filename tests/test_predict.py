"""``python -m helpers.predict``: one row per readable image, bad files named and skipped, and the same numbers as
``predict_proba`` on the evaluation preprocessing."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers.data import DX_CLASSES, read_rgb, resize_to_uint8
from helpers.model import build_model, save_trained
from helpers.predict import predict_paths
from helpers.evaluate import predict_proba

SIZE = 32
GOOD_SIZES = {"a.jpg": (200, 150), "b.jpeg": (40, 30), "sub/c.png": (600, 450), "sub/d.JPG": (31, 77)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random ResNet-18 checkpoint, four good images of different sizes (one in a sub-folder), a truncated JPEG
    and a text file with an image suffix."""
    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = build_model("resnet18", 7, None)
    meta = dict(arch="resnet18", classes=list(DX_CLASSES), image_size=SIZE, head="linear", dropout=0.0)
    ckpt = save_trained(model, meta, tmp / "model.pt")
    images = tmp / "images"
    rng = np.random.default_rng(0)
    for name, (w, h) in GOOD_SIZES.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    whole = images / "a.jpg"
    (images / "truncated.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (images / "not_an_image.png").write_text("this is not a PNG\n")
    good = sorted(images / name for name in GOOD_SIZES)
    return dict(ckpt=ckpt, meta=meta, images=images, good=good, bad=["truncated.jpg", "not_an_image.png"])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "helpers.predict", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def reference_probs(ckpt, paths) -> np.ndarray:
    """What evaluation computes: the cache's resize, then predict_proba."""
    from helpers.model import load_trained

    model, meta = load_trained(ckpt)
    x = torch.stack([resize_to_uint8(meta["image_size"])(read_rgb(p)) for p in paths])
    return predict_proba(model, x, device="cpu")


def test_cli_predicts_good_images_and_names_bad_ones(setup, tmp_path):
    out = tmp_path / "preds.csv"
    missing = tmp_path / "missing.jpg"
    result = run_cli("--checkpoint", setup["ckpt"], setup["images"], missing, "--out", out, "--batch-size", 3,
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for name in [*setup["bad"], missing.name]:
        assert name in result.stderr
    table = pd.read_csv(out)
    assert sorted(table.path) == sorted(map(str, setup["good"]))
    prob_cols = [f"p_{c}" for c in DX_CLASSES]
    assert list(table.columns) == ["path", "predicted", *prob_cols, "scored_with"]
    assert set(table.scored_with) == {"image"}  # this model uses no metadata
    np.testing.assert_allclose(table[prob_cols].sum(axis=1), 1.0, atol=1e-6)
    assert (table.predicted == [DX_CLASSES[i] for i in table[prob_cols].to_numpy().argmax(1)]).all()
    expected = reference_probs(setup["ckpt"], table.path)
    np.testing.assert_allclose(table[prob_cols].to_numpy(), expected, atol=1e-5)


def test_cli_exits_2_when_nothing_is_readable(setup, tmp_path, run_main):
    out = tmp_path / "preds.csv"
    result = run_main("helpers.predict", "--checkpoint", setup["ckpt"], setup["images"] / "truncated.jpg",
                      "--out", out, "--device", "cpu")
    assert result.returncode == 2
    assert "truncated.jpg" in result.stderr
    assert not out.exists()


def test_predict_paths_returns_errors(setup):
    from helpers.model import load_trained

    model, meta = load_trained(setup["ckpt"])
    paths = [*setup["good"], setup["images"] / "truncated.jpg"]
    table, errors = predict_paths(model, meta, paths, batch_size=2)
    assert len(table) == len(setup["good"])
    assert [p.name for p, _ in errors] == ["truncated.jpg"]
    np.testing.assert_allclose(table.filter(like="p_").to_numpy(), reference_probs(setup["ckpt"], setup["good"]),
                               atol=1e-5)
