"""The data layer: sources, splits, the decoded-image cache, and bad input refused clearly."""
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import data as D


@pytest.fixture
def ham(tmp_path, fake_data):
    """A private copy of the tiny dataset that a test may damage."""
    shutil.copytree(fake_data, tmp_path / "ham")
    return tmp_path / "ham"


def first_image(root):
    return sorted((root / "HAM10000_images_part_1").glob("*.jpg"))[0]


# ------------------------------------------------------------------------------------------------- loading
def test_metadata_has_paths_labels_and_each_image_once(fake_data):
    df = D.load_metadata(fake_data)
    assert df.image_id.is_unique
    # the lower-case duplicate folders are ignored: every path is in an upper-case folder
    assert df.path.str.contains("/HAM10000_images_part_").all()
    assert df.attrs["classes"] == D.DX_CLASSES
    assert (df.label == df.dx.map(D.DX_CLASSES.index)).all()


def test_malignancy_task_is_a_parameter_not_a_copy(fake_data):
    df = D.load_metadata(fake_data, task="malignancy")
    assert df.attrs["classes"] == ("benign", "malignant")
    assert (df.label == df.dx.isin(["mel", "bcc", "akiec"])).all()


def test_explicit_folder_then_env(fake_data, monkeypatch, tmp_path):
    assert D.find_dataset(fake_data) == fake_data
    monkeypatch.setenv("HAM10000_DIR", str(fake_data))
    assert D.find_dataset() == fake_data
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.find_dataset(tmp_path / "nowhere")


def test_kagglehub_path_offline_from_a_filled_cache(fake_data, monkeypatch, tmp_path):
    monkeypatch.delenv("HAM10000_DIR", raising=False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kh"))
    target = D.fill_kagglehub_cache(fake_data)  # kagglehub's own cache functions place and mark it
    found = D.find_dataset()  # goes through kagglehub.dataset_download with the pinned handle
    assert found == target
    assert len(D.load_metadata(found)) == len(D.load_metadata(fake_data))


def test_kagglehub_missing_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("HAM10000_DIR", raising=False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="HAM10000_DIR") as e:
        D.find_dataset()
    assert "kagglehub" in str(e.value) and "versions/2" in str(e.value)


def test_image_folder_source(tmp_path, fake_data):
    df = D.load_metadata(fake_data)
    for row in df.head(30).itertuples():
        (tmp_path / "folders" / row.dx).mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, tmp_path / "folders" / row.dx)
    out = D.load_image_folder(tmp_path / "folders")
    assert len(out) == 30 and out.attrs["classes"] == tuple(sorted(df.head(30).dx.unique()))
    (tmp_path / "folders" / "empty_class").mkdir()
    with pytest.raises(D.DataError, match="empty_class"):
        D.load_image_folder(tmp_path / "folders")


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_image_file_names_it(ham):
    victim = first_image(ham)
    for copy in ham.rglob(victim.name):
        copy.unlink()
    with pytest.raises(D.DataError, match=victim.stem):
        D.load_metadata(ham)


def test_truncated_jpeg_names_the_file(ham):
    victim = first_image(ham)
    victim.write_bytes(victim.read_bytes()[:200])
    df = D.load_metadata(ham)
    with pytest.raises(D.DataError, match=victim.name):
        D.build_cache(df, 16, ham / "cache", workers=0)


def test_not_an_image_names_the_file(ham):
    victim = first_image(ham)
    victim.write_text("not a jpeg")
    with pytest.raises(D.DataError, match=victim.name):
        D.read_rgb(victim)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_colour_modes_are_converted(tmp_path, mode):
    path = tmp_path / ("x.png" if mode in ("RGBA", "P") else "x.jpg")
    Image.new(mode, (20, 10)).save(path)
    img = D.read_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 10)


def test_duplicate_image_id_names_rows(ham):
    csv = ham / D.METADATA_FILE
    df = pd.read_csv(csv)
    pd.concat([df, df.iloc[[3]]]).to_csv(csv, index=False)
    with pytest.raises(D.DataError, match=f"listed more than once.*{df.image_id[3]}"):
        D.load_metadata(ham)


def test_unknown_diagnosis_names_row(ham):
    csv = ham / D.METADATA_FILE
    df = pd.read_csv(csv)
    df.loc[5, "dx"] = "melanomaa"
    df.to_csv(csv, index=False)
    with pytest.raises(D.DataError, match="row 7 .*melanomaa"):
        D.load_metadata(ham)


def test_missing_column_names_it(ham):
    csv = ham / D.METADATA_FILE
    pd.read_csv(csv).drop(columns="lesion_id").to_csv(csv, index=False)
    with pytest.raises(D.DataError, match="lesion_id"):
        D.load_metadata(ham)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(D.DataError, match="not found"):
        D.load_metadata(tmp_path)
    pd.DataFrame(columns=["lesion_id", "image_id", "dx"]).to_csv(tmp_path / D.METADATA_FILE, index=False)
    with pytest.raises(D.DataError, match="no images"):
        D.load_metadata(tmp_path)


def test_class_with_too_few_lesions_is_named(fake_data):
    df = D.load_metadata(fake_data)
    few = df[df.dx != "df"]
    few = pd.concat([few, df[df.lesion_id.isin(df[df.dx == "df"].lesion_id.unique()[:3])]])
    with pytest.raises(D.DataError, match="'df' has 3 lesion"):
        D.split_by_lesion(few)


# ---------------------------------------------------------------------------------------------------- split
def test_split_is_grouped_reproducible_and_seeded(fake_data, tmp_path):
    df = D.load_metadata(fake_data)
    a = D.split_by_lesion(df, seed=1)
    assert a.groupby("lesion_id").split.nunique().max() == 1
    assert set(a.split) == {"train", "val", "test"}
    p1 = D.save_split(a, tmp_path / "a.csv")
    p2 = D.save_split(D.split_by_lesion(df, seed=1), tmp_path / "b.csv")
    p3 = D.save_split(D.split_by_lesion(df, seed=2), tmp_path / "c.csv")
    assert p1.read_bytes() == p2.read_bytes()
    assert p1.read_bytes() != p3.read_bytes()
    back = D.load_split(p1, fake_data)
    assert (back.set_index("image_id").split == a.set_index("image_id").split.loc[back.image_id]).all()


def test_bad_fractions_refused(fake_data):
    with pytest.raises(ValueError, match="fractions"):
        D.split_by_lesion(D.load_metadata(fake_data), fractions=(0.8, 0.3, 0.1))


@pytest.mark.realdata
def test_real_split_no_leak_and_proportions(real_data):
    df = D.split_by_lesion(D.load_metadata(real_data))
    assert len(df) == 10015 and df.lesion_id.nunique() == 7470
    assert df.groupby("lesion_id").split.nunique().max() == 1
    overall = df.dx.value_counts(normalize=True)
    for s, part in df.groupby("split"):
        diff = (part.dx.value_counts(normalize=True) - overall).abs().max()
        assert diff < 0.02, f"{s}: class proportions differ from the whole by {diff:.3f}"
    shares = df.split.value_counts(normalize=True)
    assert abs(shares["train"] - 0.70) < 0.02 and abs(shares["test"] - 0.15) < 0.02


# ---------------------------------------------------------------------------------------------------- cache
def test_cache_built_once_then_read_back(fake_data, tmp_path):
    df = D.load_metadata(fake_data)
    first = D.build_cache(df, 24, tmp_path, workers=0)
    assert first["built"] and first["images"].shape == (len(df), 3, 24, 24) and first["images"].dtype == np.uint8
    second = D.build_cache(df, 24, tmp_path, workers=0)
    assert not second["built"] and np.array_equal(first["images"], second["images"])
    assert D.build_cache(df, 16, tmp_path, workers=0)["built"]  # another size, another entry
    # a pixel changed in one image is another cache key
    changed = tmp_path / "changed"
    shutil.copytree(fake_data, changed)
    victim = first_image(changed)
    arr = np.array(Image.open(victim))
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(victim, quality=95)
    assert D.build_cache(D.load_metadata(changed), 24, tmp_path, workers=0)["built"]


def test_cache_matches_the_dataset_transform(fake_data, tmp_path):
    df = D.load_metadata(fake_data).head(5)
    cache = D.build_cache(df, 20, tmp_path, workers=0)
    ds = D.ImageDataset(df.path, df.label, D.resize_to_uint8(20))
    x, y = ds[3]
    assert np.array_equal(cache["images"][3], x.numpy()) and y == df.label.iloc[3]


@pytest.mark.realdata
def test_real_cache_second_run_reads_back(real_data, tmp_path):
    df = D.load_metadata(real_data)
    first = D.build_cache(df, 32, tmp_path)
    second = D.build_cache(df, 32, tmp_path)
    assert first["built"] and not second["built"]
    assert second["seconds"] < first["seconds"]
    assert second["images"].shape == (10015, 3, 32, 32)


# ------------------------------------------------------------------------------- issue 11/14: data and cache fixes
@pytest.mark.parametrize("col", ["lesion_id", "image_id", "dx"])
@pytest.mark.parametrize("value", [None, "  "])
def test_empty_required_field_names_row_and_column(ham, col, value):
    csv = ham / D.METADATA_FILE
    df = pd.read_csv(csv)
    df[col] = df[col].astype(object)
    df.loc[4, col] = value
    df.to_csv(csv, index=False)
    with pytest.raises(D.DataError, match=f"row 6: empty '{col}'"):
        D.load_metadata(ham)


def test_symlinked_image_folders_are_followed(tmp_path, fake_data):
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(fake_data / D.METADATA_FILE, linked)
    for folder in fake_data.iterdir():
        if folder.is_dir():  # upper- and lower-case folders alike, as symlinks to the shared copy
            (linked / folder.name).symlink_to(folder, target_is_directory=True)
    df = D.load_metadata(linked)
    assert len(df) == len(D.load_metadata(fake_data))
    assert df.path.str.contains("/HAM10000_images_part_").all()  # still not the lower-case duplicates


def test_symlink_loop_does_not_hang(ham):
    (ham / "HAM10000_images_part_1" / "back_up").symlink_to(ham, target_is_directory=True)
    assert len(D.load_metadata(ham)) == len(pd.read_csv(ham / D.METADATA_FILE))


def test_cache_key_covers_the_resize_step(fake_data, tmp_path, monkeypatch):
    import torchvision

    df = D.load_metadata(fake_data).head(6)
    first = D.build_cache(df, 16, tmp_path, workers=0)
    monkeypatch.setattr(D, "RESIZE_ANTIALIAS", False)
    no_aa = D.build_cache(df, 16, tmp_path, workers=0)
    assert no_aa["built"] and no_aa["path"] != first["path"]
    monkeypatch.setattr(D, "RESIZE_ANTIALIAS", True)
    monkeypatch.setattr(D, "RESIZE_INTERPOLATION", "nearest")
    assert D.build_cache(df, 16, tmp_path, workers=0)["path"] not in (first["path"], no_aa["path"])
    monkeypatch.setattr(D, "RESIZE_INTERPOLATION", "bilinear")
    monkeypatch.setattr(torchvision, "__version__", "0.0.0-other")
    assert D.build_cache(df, 16, tmp_path, workers=0)["path"] != first["path"]


def test_crash_after_writing_the_index_leaves_a_readable_cache(fake_data, tmp_path, monkeypatch):
    """A crash between the two final steps of a build must not leave images.npy without its index."""
    df = D.load_metadata(fake_data).head(6)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing the index")

    with monkeypatch.context() as m:
        m.setattr(D.json, "dumps", crash)
        with pytest.raises(KeyboardInterrupt):
            D.build_cache(df, 16, tmp_path, workers=0)
    again = D.build_cache(df, 16, tmp_path, workers=0)  # old code: images.npy without index.json -> error
    assert again["built"] and again["images"].shape == (6, 3, 16, 16)
    assert not list(again["path"].glob("*partial*"))


def test_two_builds_of_one_cache_never_share_a_partial_file(fake_data, tmp_path, monkeypatch):
    """Another process builds the same cache while this one is halfway: both end with the same complete file."""
    df = D.load_metadata(fake_data).head(6)
    expected = np.stack([D.resize_to_uint8(16)(D.read_rgb(p)).numpy() for p in df.path])
    original = D.ImageDataset.__getitem__
    state = {"inner": None}

    def getitem(self, i):
        if i == 3 and state["inner"] is None:  # halfway through: the "other process" runs a whole build
            state["inner"] = "running"
            state["inner"] = D.build_cache(df, 16, tmp_path, workers=0)
        return original(self, i)

    monkeypatch.setattr(D.ImageDataset, "__getitem__", getitem)
    outer = D.build_cache(df, 16, tmp_path, workers=0)
    inner = state["inner"]
    assert inner["built"] and not outer["built"]  # the later one kept the earlier one's file
    assert np.array_equal(outer["images"], expected) and np.array_equal(inner["images"], expected)
    assert sorted(f.name for f in outer["path"].iterdir()) == ["images.npy", "index.json"]


def test_dead_builds_partial_files_are_removed(fake_data, tmp_path):
    import socket

    df = D.load_metadata(fake_data).head(4)
    folder = D.build_cache(df, 12, tmp_path, workers=0)["path"]
    (folder / "images.npy").unlink()
    stale = folder / f"images.partial-{socket.gethostname()}-999999999-deadbeef.npy"
    stale.write_bytes(b"half")
    assert D.build_cache(df, 12, tmp_path, workers=0)["built"]
    assert not stale.exists()
