"""HAM10000 in, tidy tables and decoded tensors out.

Flow: ``find_dataset`` (a folder, or kagglehub) -> ``load_metadata`` (one row per image, with its path and label)
-> ``split_by_lesion`` (no lesion in two splits) -> ``build_cache`` (decode every image once, at the training size,
into a uint8 array on disk). Training reads batches from that array; see ``augment.py`` for what happens next.
Bad input stops with an error that names the file or row; nothing is dropped silently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

log = logging.getLogger(__name__)

KAGGLE_HANDLE = "kmader/skin-cancer-mnist-ham10000/versions/2"  # pinned: unversioned handles hit the API first
METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Fixed class order: label i always means the same diagnosis, in every split, model and report.
DX_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DX_NAMES = {
    "akiec": "actinic keratosis / Bowen's",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
MALIGNANT = ("akiec", "bcc", "mel")
BINARY_CLASSES = ("benign", "malignant")


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file or row."""


# --------------------------------------------------------------------------------------------------- finding data
def find_dataset(data_dir: str | os.PathLike | None = None, handle: str = KAGGLE_HANDLE) -> Path:
    """The dataset folder: ``data_dir``, else ``$HAM10000_DIR``, else kagglehub (cache first), else a clear error."""
    data_dir = data_dir or os.environ.get("HAM10000_DIR")
    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data folder {path} does not exist (from data_dir or $HAM10000_DIR; a relative "
                                    f"path is taken from the working directory {Path.cwd()})")
        return path
    try:
        import kagglehub
    except ImportError as e:  # pragma: no cover - kagglehub is a dependency
        raise FileNotFoundError("no data folder given and kagglehub is not installed; " + _HOW_TO_GET_DATA) from e
    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as e:  # kagglehub raises requests/HTTP errors of several kinds
        text = f"{type(e).__name__}: {e}"
        if any(s in text for s in ("401", "403", "Unauthenticated", "credentials")):
            why = "Kaggle refused the download without credentials (set KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json)"
        else:
            why = "the dataset is not in the kagglehub cache ($KAGGLEHUB_CACHE) and the download failed (no network?)"
        raise FileNotFoundError(f"could not get HAM10000 via kagglehub ({handle}): {why}.\n  {text}\n"
                                + _HOW_TO_GET_DATA) from e


_HOW_TO_GET_DATA = (
    "To use a local copy, pass data_dir=... or set HAM10000_DIR to a folder holding HAM10000_metadata.csv and "
    "the image folders (Kaggle's kmader/skin-cancer-mnist-ham10000 layout); or run once with internet access so "
    "kagglehub fills its cache.")


# ------------------------------------------------------------------------------------------------------ metadata
def index_images(root: Path) -> dict[str, Path]:
    """image_id -> path for every image under ``root``, following symlinked folders (a shared copy linked in).
    Kaggle's copy holds each image twice (upper- and lower-case folders): the first path in sorted order wins and
    the copies are ignored."""
    paths, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: do not loop
            dirs[:] = []
            continue
        seen.add(real)
        paths += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    found: dict[str, Path] = {}
    for path in sorted(paths):
        if path.is_file():
            found.setdefault(path.stem, path)
    return found


def load_metadata(data_dir: str | os.PathLike, task: str = "dx") -> pd.DataFrame:
    """One row per image: the metadata columns plus ``path`` (absolute) and ``label`` (int in the fixed class order).

    ``task="dx"`` gives 7 diagnoses; ``task="malignancy"`` gives benign (0) vs malignant (1: mel, bcc, akiec).
    """
    root = Path(data_dir)
    csv = root / METADATA_FILE
    if not csv.exists():
        raise DataError(f"{csv} not found: a HAM10000 folder holds {METADATA_FILE} and the image folders")
    df = pd.read_csv(csv)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{csv}: missing column(s) {missing}; found {list(df.columns)}")
    for col in REQUIRED_COLUMNS:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            i = empty.idxmax()
            raise DataError(f"{csv} row {i + 2}: empty {col!r} (every row needs {', '.join(REQUIRED_COLUMNS)}; "
                            f"{int(empty.sum())} row(s) with an empty {col!r})")
    dup = df[df.image_id.duplicated(keep=False)]
    if len(dup):
        rows = ", ".join(f"row {i + 2}: {r}" for i, r in zip(dup.index[:5], dup.image_id[:5]))
        raise DataError(f"{csv}: image_id listed more than once ({len(dup)} rows; {rows})")
    unknown = df[~df.dx.isin(DX_CLASSES)]
    if len(unknown):
        i = unknown.index[0]
        raise DataError(f"{csv} row {i + 2} (image_id {df.image_id[i]}): unknown diagnosis {df.dx[i]!r}; "
                        f"known: {list(DX_CLASSES)} ({len(unknown)} such rows)")
    images = index_images(root)
    if not images:
        raise DataError(f"{root}: no images found (expected HAM10000_images_part_1/, HAM10000_images_part_2/)")
    absent = df[~df.image_id.isin(images)]
    if len(absent):
        i = absent.index[0]
        raise DataError(f"{csv} row {i + 2}: image file for {df.image_id[i]!r} not found under {root} "
                        f"({len(absent)} listed images missing)")
    df["path"] = df.image_id.map(lambda i: str(images[i]))
    return add_labels(df, task)


def load_image_folder(root: str | os.PathLike) -> pd.DataFrame:
    """An ImageFolder-style source (one sub-folder per class) in the same table form as ``load_metadata``.

    Folders carry no lesion ids, so each image is its own lesion: the split can only be leakage-free if the user's
    folders hold one image per lesion. The labels keep the folders' sorted order.
    """
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root}: no class sub-folders (ImageFolder layout: {root}/<class>/<image>.jpg)")
    rows = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root / cls}: class folder holds no images")
        rows += [dict(image_id=p.stem, lesion_id=p.stem, dx=cls, label=label, path=str(p)) for p in files]
    df = pd.DataFrame(rows)
    if df.image_id.duplicated().any():
        raise DataError(f"{root}: image names repeat across folders: {df.image_id[df.image_id.duplicated()].tolist()[:5]}")
    log.warning("%s: no lesion ids in an image folder; each image is treated as its own lesion", root)
    df.attrs["classes"] = tuple(classes)
    return df


def add_labels(df: pd.DataFrame, task: str = "dx") -> pd.DataFrame:
    """Label-encode ``dx`` in the fixed order for the task; ``df.attrs['classes']`` names the labels."""
    df = df.copy()
    if task == "dx":
        classes = DX_CLASSES
        df["label"] = df.dx.map({c: i for i, c in enumerate(classes)}).astype(int)
    elif task == "malignancy":
        classes = BINARY_CLASSES
        df["label"] = df.dx.isin(MALIGNANT).astype(int)
    else:
        raise ValueError(f"task must be 'dx' or 'malignancy', not {task!r}")
    df.attrs["classes"] = classes
    return df


# --------------------------------------------------------------------------------------------------------- split
SPLITS = ("train", "val", "test")


def split_by_lesion(df: pd.DataFrame, fractions=(0.70, 0.15, 0.15), seed: int = 42) -> pd.DataFrame:
    """Assign each image to train/val/test so that every lesion's images share one split, stratified by diagnosis.

    Lesions (not images) are split with scikit-learn's stratified ``train_test_split``, twice; images follow their
    lesion. Returns ``df`` with a ``split`` column. Errors name a class with too few lesions to split.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, not {fractions}")
    lesions = df.groupby("lesion_id").dx.agg(lambda s: s.mode().iloc[0]).rename("dx").reset_index()
    mixed = df.groupby("lesion_id").dx.nunique()
    if (mixed > 1).any():
        log.warning("%d lesions carry more than one diagnosis; stratifying by their most common", (mixed > 1).sum())
    counts = lesions.dx.value_counts()
    need = int(np.ceil(1 / min(fractions))) + 1
    few = counts[counts < need]
    if len(few):
        raise DataError(f"class {few.index[0]!r} has {few.iloc[0]} lesion(s); at least {need} are needed to put it "
                        f"in all three splits with fractions {tuple(fractions)}")
    train_frac, val_frac, test_frac = fractions
    rest, test = train_test_split(lesions, test_size=test_frac, stratify=lesions.dx, random_state=seed)
    train, val = train_test_split(rest, test_size=val_frac / (train_frac + val_frac), stratify=rest.dx,
                                  random_state=seed)
    which = {**dict.fromkeys(train.lesion_id, "train"), **dict.fromkeys(val.lesion_id, "val"),
             **dict.fromkeys(test.lesion_id, "test")}
    out = df.copy()
    out["split"] = out.lesion_id.map(which)
    assert_no_lesion_overlap(out)
    return out


def assert_no_lesion_overlap(df: pd.DataFrame) -> None:
    per_lesion = df.groupby("lesion_id").split.nunique()
    if (per_lesion > 1).any():
        raise AssertionError(f"lesions in more than one split: {per_lesion[per_lesion > 1].index.tolist()[:5]}")


SPLIT_COLUMNS = ["image_id", "lesion_id", "dx", "label", "split", "dx_type", "age", "sex", "localization"]


def save_split(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the split table (no absolute paths, sorted by image_id) so the same seed gives the same bytes."""
    cols = [c for c in SPLIT_COLUMNS if c in df.columns]
    path = Path(path)
    df.sort_values("image_id")[cols].to_csv(path, index=False, lineterminator="\n")
    return path


def load_split(path: str | os.PathLike, data_dir: str | os.PathLike | None = None, task: str = "dx") -> pd.DataFrame:
    """Read a saved split; with ``data_dir`` the image paths are attached (and checked) again."""
    df = pd.read_csv(path)
    if data_dir is not None:
        images = index_images(Path(data_dir))
        absent = df[~df.image_id.isin(images)]
        if len(absent):
            raise DataError(f"{path}: {len(absent)} images of the split are missing under {data_dir}, "
                            f"first {absent.image_id.iloc[0]!r}")
        df["path"] = df.image_id.map(lambda i: str(images[i]))
    return add_labels(df, task)


# ---------------------------------------------------------------------------------------------- decoding images
def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image fully as RGB; grayscale, RGBA, CMYK and palette images are converted (and logged)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a batch
            if img.mode != "RGB":
                log.info("%s: converting %s image to RGB", path, img.mode)
                img = img.convert("RGB")
            return img
    except FileNotFoundError:
        raise DataError(f"image file missing: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"unreadable or truncated image {path}: {e}") from e


class ImageDataset(torch.utils.data.Dataset):
    """Paths + labels + transform (the seed's design): item i is ``(transform(image_i), label_i)``."""

    def __init__(self, paths, labels, transform=None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = read_rgb(self.paths[i])
        return (self.transform(img) if self.transform else img), self.labels[i]


RESIZE_INTERPOLATION = "bilinear"
RESIZE_ANTIALIAS = True


def resize_to_uint8(size: int):
    """The cache's transform: resize to size x size (bilinear, antialiased) and keep uint8 CHW."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), interpolation=InterpolationMode(RESIZE_INTERPOLATION),
                                                   antialias=RESIZE_ANTIALIAS)])


def resize_spec() -> str:
    """What the cache's pixels depend on besides the files: the resize step and the libraries that run it."""
    import PIL
    import torchvision

    return (f"resize={RESIZE_INTERPOLATION};antialias={RESIZE_ANTIALIAS};torchvision={torchvision.__version__};"
            f"torch={torch.__version__};PIL={PIL.__version__}")


def content_key(paths, size: int) -> str:
    """A digest of every image's bytes, in order, the size and the resize step (``resize_spec``): a changed, added
    or reordered file, another resize method or another torchvision/PIL version changes it."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"size={size};n={len(paths)};{resize_spec()}".encode())
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def build_cache(df: pd.DataFrame, size: int, cache_dir: str | os.PathLike, workers: int | None = None) -> dict:
    """Decode every image of ``df`` once into ``<cache_dir>/<key>/images.npy`` (uint8, N x 3 x size x size).

    The key covers the images' content, the size and the resize step, so a second run with the same data starts
    in seconds. ``images.npy`` appears only complete, and only after ``index.json``: each build writes its own
    temporary files (host, pid and a random part in the name) and renames them into place, so two processes
    building the same cache never share a partial file; the later one keeps the earlier one's complete file.
    Returns ``{"images": memory-mapped array in df's row order, "path", "seconds", "built", "bytes"}``.
    """
    paths = df.path.tolist()
    t0 = time.perf_counter()
    key = content_key(paths, size)
    folder = Path(cache_dir) / f"ham_{size}px_{key}"
    target = folder / "images.npy"
    built = False
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(folder)
        workers = min(os.cpu_count() or 1, 8) if workers is None else workers
        loader = torch.utils.data.DataLoader(ImageDataset(paths, range(len(paths)), resize_to_uint8(size)),
                                             batch_size=64, num_workers=workers, shuffle=False)
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = folder / f"images.partial-{tag}.npy"  # renamed only when complete: an interrupted build is never read
        tmp_index = folder / f"index.partial-{tag}.json"
        try:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
            i = 0
            for batch, _ in loader:
                arr[i:i + len(batch)] = batch.numpy()
                i += len(batch)
            arr.flush()
            del arr
            # the index first: whoever sees images.npy finds its index.json (same key, same content, whoever wrote it)
            tmp_index.write_text(json.dumps({"size": size, "resize": resize_spec(), "image_ids": df.image_id.tolist()}))
            os.replace(tmp_index, folder / "index.json")
            if target.exists():  # another process finished the same cache first: keep its file, drop ours
                log.info("%s: built meanwhile by another process; using it", target)
            else:
                os.replace(tmp, target)
                built = True
        finally:
            for t in (tmp, tmp_index):
                t.unlink(missing_ok=True)
    images = np.load(target, mmap_mode="r")
    ids = json.loads((folder / "index.json").read_text())["image_ids"]
    if ids != df.image_id.tolist():
        raise DataError(f"cache {folder} does not match the table's image order; delete the folder and re-run")
    return dict(images=images, path=folder, seconds=time.perf_counter() - t0, built=built,
                bytes=target.stat().st_size)


def _remove_dead_partials(folder: Path) -> None:
    """Delete temporary files left in ``folder`` by builds on this host whose process no longer runs."""
    host = socket.gethostname()
    for f in folder.glob("*.partial-*"):
        try:
            f_host, pid = f.name.split(".partial-", 1)[1].rsplit("-", 2)[:2]
            if f_host == host:
                os.kill(int(pid), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass


def split_tensors(df: pd.DataFrame, images: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (uint8 images N x 3 x H x W, int64 labels)} from the cache, in df's row order within each split."""
    out = {}
    for s in SPLITS:
        idx = np.flatnonzero(df.split.to_numpy() == s)
        out[s] = (torch.from_numpy(np.ascontiguousarray(images[idx])),
                  torch.as_tensor(df.label.to_numpy()[idx], dtype=torch.long))
    return out


def fill_kagglehub_cache(src: str | os.PathLike, handle: str = KAGGLE_HANDLE, copy: bool = False) -> Path:
    """Put a local HAM10000 folder where kagglehub looks for ``handle`` (``$KAGGLEHUB_CACHE``), so the kagglehub
    path works offline. kagglehub's own functions say where and mark the entry complete. Links by default."""
    import shutil

    from kagglehub import cache, handle as kh

    h = kh.parse_dataset_handle(handle)
    store = cache.Cache()
    target = Path(store.get_path(h))
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} already exists in the kagglehub cache")
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copytree(src, target)
    else:
        target.symlink_to(Path(src).resolve(), target_is_directory=True)
    store.mark_as_complete(h)
    return target
