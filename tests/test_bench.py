"""``python -m helpers.bench`` runs end to end on the CPU at its smallest setting and prints a complete table.

Speeds are not checked (they depend on the machine); only that every configuration and every column is there and
that each measurement is a positive number (or n/a where it cannot apply: GPU memory on a CPU, compile time
without --compile).
"""
from __future__ import annotations

import os
import subprocess
import sys

from helpers.bench import COLUMNS, CONFIGS
from helpers.synthetic import make_fake_ham10000

NOT_ON_CPU = {"compile s", "peak GPU mem (GiB)"}


def tables(text: str) -> list[list[dict]]:
    """Every markdown table in ``text``, as rows of {column: cell}."""
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            header = [c.strip() for c in lines[0].strip("|").split("|")]
            found.append([dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]])
    return found


def test_bench_smoke_on_cpu(tmp_path):
    data = make_fake_ham10000(tmp_path / "ham", lesions_per_class=8, lowercase_copies=False)
    out = tmp_path / "bench.md"
    # One OpenMP thread: on a shared 2-core machine two spinning threads per process can be 4x slower, and this
    # test checks the table, not the speeds.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "helpers.bench", "--profile", "smoke", "--device", "cpu", "--steps", "1",
         "--warmup", "1", "--image-size", "32", "--batch-size", "4", "--data-dir", str(data), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() in result.stdout + "\n"
    header = next(line for line in out.read_text().splitlines() if line.startswith("Device:"))
    for part in ("torch", "image 32x32", "batch 4", "fp32"):
        assert part in header
    rows, augment = tables(out.read_text())
    assert [r["config"] for r in rows] == list(CONFIGS)
    for row in rows:
        assert list(row) == list(COLUMNS)
        for column in COLUMNS[1:]:
            if column in NOT_ON_CPU:
                assert row[column] == "n/a", (row["config"], column)
            else:
                assert float(row[column].replace(",", "")) > 0, (row["config"], column, row[column])
    assert [r["augmentation"] for r in augment] == ["kornia, whole batch", "torchvision v2, loop over images",
                                                    "torchvision v2, whole batch"]
    assert all(float(r["img/s"].replace(",", "")) > 0 for r in augment)
