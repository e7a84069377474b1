"""Classify new images with a trained model.

    python -m helpers.predict --checkpoint models/.../model.pt IMAGE_OR_FOLDER... --out preds.csv

Images of any size go through exactly what evaluation used: the cache's resize to the model's square input size
(``data.resize_to_uint8``), then ``evaluate.predict_proba`` (normalisation, no augmentation). A file that cannot
be read is named on stderr and skipped, so one bad image does not cost the predictions for the rest.
``helpers.external`` predicts through this module only, so a change of the evaluation path lands here once.

A model that uses the patient's metadata (``metadata: late`` or ``joint``) needs ``age``, ``sex`` and
``localization`` per image: from ``--metadata CSV`` (with ``image_id``, the file name without extension), else
``metadata.csv`` beside the images. Without them it stops with an error naming the columns; ``--image-only``
scores the image part alone (late fusion: the network's own probabilities; joint: the branch told that every
field is unknown) and the output says so in ``scored_with``. A value never seen in training is its own category.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from . import clinical as C
from .data import IMAGE_SUFFIXES, DataError, read_rgb, resize_to_uint8
from .model import load_trained
from .device import pick_device
from .evaluate import decide, predict_proba


def find_images(inputs) -> list[Path]:
    """Files given directly (tried whatever their suffix), plus every .jpg/.jpeg/.png under folders, recursively
    and sorted so the output order is stable."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            found.append(item)  # a missing file is reported by the reader, not dropped here
    return found


def load_images(paths, size: int) -> tuple[list[Path], list[torch.Tensor], list[tuple[Path, str]]]:
    """uint8 3 x size x size tensors for the readable images; ``(path, reason naming the path)`` for the others."""
    resize = resize_to_uint8(size)
    good, tensors, errors = [], [], []
    for path in paths:
        try:
            tensors.append(resize(read_rgb(path)))
            good.append(path)
        except (DataError, Image.DecompressionBombError) as e:
            errors.append((path, str(e) if str(path) in str(e) else f"{path}: {e}"))
    return good, tensors, errors


def load_checkpoint(path, device="auto"):
    """``(model, meta)`` from a model.pt, on ``device`` ("auto" | "cpu" | "cuda"), in eval mode: the loading half
    of this module, so callers (``helpers.external``) never import the training code themselves."""
    return load_trained(path, pick_device(device))


def metadata_mode(meta: dict, image_only: bool = False) -> str | None:
    """How a checkpoint uses metadata as asked: "late", "joint", or None (image only)."""
    return None if image_only else (meta.get("clinical") or {}).get("mode")


def read_metadata(path) -> pd.DataFrame:
    """A metadata CSV: ``image_id`` plus age, sex, localization (errors name the file and the columns)."""
    df = pd.read_csv(path, dtype={"image_id": str})
    if "image_id" not in df.columns:
        raise C.MetadataColumnsError(f"{path}: needs an image_id column (the image file name without extension)")
    C.require_columns(df, str(path))
    return df.drop_duplicates("image_id").set_index("image_id")


def predict_paths(model, meta: dict, paths, batch_size: int = 64, device=None, metadata: pd.DataFrame | None = None,
                  image_only: bool = False):
    """Predict ``paths`` with a model from ``load_trained``; returns ``(table, errors)``.

    ``table`` has one row per readable image: ``path``, ``predicted`` (class name) and ``p_<class>`` per class, in
    ``meta["classes"]`` order, and ``scored_with`` (image only, or image + metadata); a late-fusion model adds the
    network's own ``image_p_<class>`` beside the fused ones. ``errors`` lists ``(path, reason)`` for the images
    skipped. ``metadata``: age, sex and localization indexed by image_id (``read_metadata``), required when the
    model uses them, unless ``image_only``. Images are decoded ``batch_size`` at a time, so a large folder never
    sits in memory at once. ``device=None`` uses the model's.
    """
    classes = list(meta["classes"])
    clinical = meta.get("clinical") or {}
    mode = metadata_mode(meta, image_only)
    if mode and metadata is None:
        raise C.MetadataColumnsError(
            f"this model uses the patient's metadata ({mode} fusion) and needs the columns {list(C.COLUMNS)} per "
            f"image: give --metadata CSV (image_id, {', '.join(C.COLUMNS)}) or put metadata.csv beside the images; "
            f"or score the image part alone with --image-only.")
    if mode:
        C.require_columns(metadata, "metadata table")
    encoder = C.ClinicalEncoder.from_dict(clinical["encoder"]) if clinical.get("mode") == "joint" else None
    device = next(model.parameters()).device if device is None else pick_device(device)
    model.to(device)
    paths = [Path(p) for p in paths]
    rows, errors = [], []
    for i in range(0, len(paths), batch_size):
        good, tensors, bad = load_images(paths[i:i + batch_size], meta["image_size"])
        errors += bad
        if mode:
            absent = [p for p in good if p.stem not in metadata.index]
            errors += [(p, f"{p}: no row for image_id {p.stem!r} in the metadata table") for p in absent]
            tensors = [t for p, t in zip(good, tensors) if p.stem in metadata.index]
            good = [p for p in good if p.stem in metadata.index]
        if not good:
            continue
        table = metadata.loc[[p.stem for p in good]] if mode else pd.DataFrame({c: [None] * len(good) for c in C.COLUMNS})
        m = torch.from_numpy(encoder.transform(table)) if encoder is not None else None  # unknowns when image only
        probs = predict_proba(model, torch.stack(tensors), batch_size, device, tta=meta.get("tta", False), meta=m)
        image_probs, bias = probs, meta.get("decision_bias")
        if mode == "late":
            probs, bias = C.late_fusion_proba(clinical, image_probs, table), clinical.get("decision_bias")
        for j, (path, p, k) in enumerate(zip(good, probs, decide(probs, bias))):
            rows.append({"path": str(path), "predicted": classes[int(k)],
                         **{f"p_{c}": float(v) for c, v in zip(classes, p)},
                         **({f"image_p_{c}": float(v) for c, v in zip(classes, image_probs[j])} if mode == "late" else {}),
                         "scored_with": scored_with(meta, image_only)})
    image_cols = [f"image_p_{c}" for c in classes] if mode == "late" else []
    table = pd.DataFrame(rows, columns=["path", "predicted", *(f"p_{c}" for c in classes), *image_cols, "scored_with"])
    return table, errors


def scored_with(meta: dict, image_only: bool) -> str:
    mode = (meta.get("clinical") or {}).get("mode")
    if mode and image_only:
        return ("image only (--image-only: the network's own probabilities)" if mode == "late" else
                "image only (--image-only: the metadata branch told every field is unknown)")
    return {"late": "image + metadata (late fusion)", "joint": "image + metadata (joint branch)"}.get(mode, "image")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m helpers.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a model.pt written by the model notebooks (models/<profile>/<run>-<key>/model.pt)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (recursive)")
    p.add_argument("--out", required=True, help="CSV to write: path, predicted, p_<class>...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--metadata", help="CSV with image_id, age, sex, localization, for a model that uses them "
                                      "(default: metadata.csv beside the images, when there)")
    p.add_argument("--image-only", action="store_true",
                   help="score a metadata model's image part alone (the output says so)")
    return p.parse_args(argv)


def find_metadata(given, inputs) -> Path | None:
    """``--metadata`` as given, else ``metadata.csv`` in the first input folder (or beside the first file)."""
    if given:
        return Path(given)
    for item in map(Path, inputs):
        candidate = (item if item.is_dir() else item.parent) / "metadata.csv"
        if candidate.is_file():
            return candidate
    return None


def main(argv=None) -> int:
    """Exit code 0 when at least one image was predicted, 2 when none was (nothing is written then)."""
    args = parse_args(argv)
    try:
        model, meta = load_checkpoint(args.checkpoint, args.device)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = find_images(args.inputs)
    try:
        source = None if args.image_only or not metadata_mode(meta) else find_metadata(args.metadata, args.inputs)
        metadata = read_metadata(source) if source else None
        table, errors = predict_paths(model, meta, paths, args.batch_size, metadata=metadata,
                                      image_only=args.image_only)
    except (C.MetadataColumnsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, reason in errors:
        print(f"skipped {reason}", file=sys.stderr)
    if table.empty:
        print(f"error: no image could be predicted ({len(paths)} found, {len(errors)} unreadable)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"predicted {len(table)} image(s) ({table['scored_with'].iloc[0]}), skipped {len(errors)}; written to "
          f"{out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
