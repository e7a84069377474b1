"""A tiny dataset in HAM10000's exact layout, so tests run the same loading code as the real data.

Each class gets its own colour of "lesion" on a skin-toned background, so a model can learn something in seconds
and the notebooks' sanity checks (metrics above chance) are meaningful even on fake data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .data import DX_CLASSES, METADATA_FILE

COLOURS = {"akiec": (200, 60, 60), "bcc": (230, 160, 180), "bkl": (120, 90, 60), "df": (160, 110, 90),
           "mel": (40, 30, 30), "nv": (110, 70, 50), "vasc": (170, 20, 60)}


def fake_image(dx: str, rng: np.random.Generator, size=(40, 30)) -> Image.Image:
    w, h = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = (225, 180, 160)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h / 2 + rng.normal(0, 2), w / 2 + rng.normal(0, 2)
    r = rng.uniform(0.25, 0.4) * min(w, h)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2
    img[blob] = COLOURS[dx]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_fake_ham10000(root, lesions_per_class: int = 10, seed: int = 0, size=(40, 30),
                       lowercase_copies: bool = True) -> Path:
    """Write ``HAM10000_metadata.csv`` + ``HAM10000_images_part_1/2`` (and Kaggle's lower-case duplicate folders)
    under ``root``. Lesions have one to three images each; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows, n = [], 0
    for dx in DX_CLASSES:
        for _ in range(lesions_per_class):
            lesion = f"HAM_{len(rows):07d}"
            for _ in range(int(rng.integers(1, 4))):
                rows.append(dict(lesion_id=lesion, image_id=f"ISIC_{24306 + n:07d}", dx=dx, dx_type="histo",
                                 age=float(rng.integers(20, 85)), sex=rng.choice(["male", "female"]),
                                 localization=rng.choice(["back", "face", "trunk", "lower extremity"])))
                n += 1
    df = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / METADATA_FILE, index=False)
    folders = ["HAM10000_images_part_1", "HAM10000_images_part_2"]
    for i, row in df.iterrows():
        img = fake_image(row.dx, rng, size)
        part = folders[int(i >= len(df) // 2)]
        for folder in [part, part.lower()] if lowercase_copies else [part]:
            (root / folder).mkdir(exist_ok=True)
            img.save(root / folder / f"{row.image_id}.jpg", quality=90)
    return root
