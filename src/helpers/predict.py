"""Classify new images with a trained model.

    python -m helpers.predict --checkpoint models/.../model.pt IMAGE_OR_FOLDER... --out preds.csv

Images of any size go through exactly what evaluation used: the cache's resize to the model's square input size
(``data.resize_to_uint8``), then ``evaluate.predict_proba`` (normalisation, no augmentation). A file that cannot
be read is named on stderr and skipped, so one bad image does not cost the predictions for the rest.
``helpers.external`` predicts through this module only, so a change of the evaluation path lands here once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

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


def predict_paths(model, meta: dict, paths, batch_size: int = 64, device=None):
    """Predict ``paths`` with a model from ``load_trained``; returns ``(table, errors)``.

    ``table`` has one row per readable image: ``path``, ``predicted`` (class name) and ``p_<class>`` per class, in
    ``meta["classes"]`` order. ``errors`` lists ``(path, reason)`` for the images skipped. Images are decoded
    ``batch_size`` at a time, so a large folder never sits in memory at once. ``device=None`` uses the model's.
    """
    classes = list(meta["classes"])
    device = next(model.parameters()).device if device is None else pick_device(device)
    model.to(device)
    paths = [Path(p) for p in paths]
    rows, errors = [], []
    for i in range(0, len(paths), batch_size):
        good, tensors, bad = load_images(paths[i:i + batch_size], meta["image_size"])
        errors += bad
        if not good:
            continue
        probs = predict_proba(model, torch.stack(tensors), batch_size, device, tta=meta.get("tta", False))
        for path, p, k in zip(good, probs, decide(probs, meta.get("decision_bias"))):
            rows.append({"path": str(path), "predicted": classes[int(k)],
                         **{f"p_{c}": float(v) for c, v in zip(classes, p)}})
    table = pd.DataFrame(rows, columns=["path", "predicted", *(f"p_{c}" for c in classes)])
    return table, errors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m helpers.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a model.pt written by the model notebooks (models/<profile>/<run>-<key>/model.pt)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (recursive)")
    p.add_argument("--out", required=True, help="CSV to write: path, predicted, p_<class>...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit code 0 when at least one image was predicted, 2 when none was (nothing is written then)."""
    args = parse_args(argv)
    try:
        model, meta = load_checkpoint(args.checkpoint, args.device)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = find_images(args.inputs)
    table, errors = predict_paths(model, meta, paths, args.batch_size)
    for path, reason in errors:
        print(f"skipped {reason}", file=sys.stderr)
    if table.empty:
        print(f"error: no image could be predicted ({len(paths)} found, {len(errors)} unreadable)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"predicted {len(table)} image(s), skipped {len(errors)}; written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
