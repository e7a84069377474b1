"""``python -m helpers.bench`` at tiny shapes: the table's columns, sane values, FLOP counts against hand counts, no
host read per step, and the CUDA-only choices (precision, cuDNN autotuning, compile advice) with CUDA stubbed.

Speeds are never checked (they depend on the machine and its load); only that each measurement is there and
positive. One thread everywhere: this runs beside timed experiments on a shared 2-core machine.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import bench
from helpers import train as T
from helpers.config import resolve_recipe
from helpers.synthetic import make_fake_ham10000

torch.set_num_threads(1)
TINY = ["--profile", "smoke", "--device", "cpu", "--models", "resnet18/tuned", "--warmup", "1", "--threads", "1",
        "--batch-size", "8"]  # smoke: 32 px
FAST = TINY + ["--steps", "2"]


def tables(text: str) -> list[list[dict]]:
    """Every markdown table in ``text``, as rows of {column: cell}."""
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            header = [c.strip() for c in lines[0].strip("|").split("|")]
            found.append([dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]])
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.fixture
def synthetic_cache(monkeypatch):
    """The training split replaced by random uint8 images (no JPEGs, no cache build), and a small matmul."""
    def load(cfg, data_dir, size):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (40, 3, size, size), dtype=torch.uint8, generator=g)
        y = torch.arange(40) % 7
        return (dict(root="synthetic", x=x, y=y, paths=[], classes=tuple("abcdefg")),
                dict(seconds=0.0, images=40, bytes=x.numel(), size=size))

    monkeypatch.setattr(bench, "load_train_data", load)
    monkeypatch.setattr(bench, "MATMUL_SIZES", {"cpu": (256,)})


def tiny_convnet(classes: int = 7) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes))


def test_table_has_every_column_and_sane_values(synthetic_cache, tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert bench.main(FAST + ["--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out + "\n"
    for part in ("Device: CPU", "torch threads: 1", "Date:", f"torch {torch.__version__}", "profile `smoke`",
                 "Main table at 32x32", "fp32", "matmul", "What each column includes", "no host synchronisation",
                 *(("bf16 on 1 thread(s)",) if bench.cpu_has_bf16() else ())):
        assert part in text, part
    rows, stages, augment = tables(text)
    assert [r["model"] for r in rows] == ["resnet18_tuned"]
    row = rows[0]
    assert tuple(row) == bench.COLUMNS
    assert row["augment"] == "strong" and row["batch"] == "8"
    for column in bench.COLUMNS[3:]:
        assert number(row[column]) > 0, (column, row[column])
    # achieved GFLOP/s = img/s x GFLOP per image, and the fractions are of one peak
    gflop = number(row["train GFLOP/img"])
    assert number(row["project GFLOP/s"]) == pytest.approx(number(row["project img/s"]) * gflop, rel=0.02)
    assert number(row["ceiling / peak"]) / number(row["project / peak"]) == pytest.approx(
        number(row["ceiling GFLOP/s"]) / number(row["project GFLOP/s"]), rel=0.05)
    # resnet18 at 32 px: 3.63 GFLOP forward at 224 px / 49, about three times that for training
    assert 2.5 * 3.63 / 49 < gflop < 3.1 * 3.63 / 49
    # smoke's tuned recipe trains one epoch at 24 px, then one at 32: both measured, FLOPs scale with the pixels
    assert [(r["model"], r["px"], r["epochs"]) for r in stages] == [("resnet18_tuned", "24", "1"),
                                                                    ("resnet18_tuned", "32", "1")]
    assert number(stages[1]["train GFLOP/img"]) == pytest.approx(gflop, rel=0.02)
    assert number(stages[0]["train GFLOP/img"]) < gflop and number(stages[0]["project / peak"]) > 0
    minutes = 40 * sum(1 / number(r["project img/s"]) for r in stages) / 60
    assert number(row["train min/run (est.)"]) == pytest.approx(minutes, rel=0.05)
    assert [r["augmentation"] for r in augment] == ["kornia, whole batch", "torchvision v2, loop over images",
                                                    "torchvision v2, whole batch"]
    assert all(number(r["img/s"]) > 0 for r in augment)
    assert "torch.compile, per model" not in text


def test_flops_per_image_match_a_hand_count():
    """conv 3->8 and 8->8 (3x3, 32x32) + linear 8->7. Backward: the first conv needs no input gradient, so it
    costs one forward's FLOPs (weights); the others cost two (input and weights)."""
    torch.manual_seed(0)
    model = tiny_convnet()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    hw = 32 * 32
    conv1, conv2, linear = 2 * 8 * hw * 3 * 9, 2 * 8 * hw * 8 * 9, 2 * 8 * 7
    expected = 2 * conv1 + 3 * conv2 + 3 * linear
    got = bench.train_flops_per_image(model, x, y, torch.device("cpu"))
    assert got == pytest.approx(expected, rel=0.10)
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def test_frozen_backbone_counts_only_the_head_backward():
    torch.manual_seed(0)
    r = dict(arch="resnet18", head="linear", dropout=0.0, freeze_backbone=True)
    frozen, full = bench.make_model(r, 7), bench.make_model({**r, "freeze_backbone": False}, 7)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2,))
    with torch.no_grad():
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as c:
            full.eval()(x)
        forward = c.get_total_flops() / 2
    full.train()
    assert bench.train_flops_per_image(frozen, x, y, torch.device("cpu")) == pytest.approx(forward, rel=0.01)
    assert bench.train_flops_per_image(full, x, y, torch.device("cpu")) == pytest.approx(3 * forward, rel=0.10)


def count_host_reads(monkeypatch) -> list:
    """Host reads (item, bool, float, int, tolist, cpu, numpy) made by bench.py itself, not by torch or kornia."""
    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == bench.__file__:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("which", ["ceiling", "project"])
def test_no_host_read_per_step(monkeypatch, which):
    torch.manual_seed(0)
    model = tiny_convnet().to(memory_format=torch.channels_last)
    r = resolve_recipe(dict(label_smoothing=0.1, augment="strong", optimizer="adamw", lr=1e-3, image_size=16))
    dev = torch.device("cpu")
    x_cache, y_cache = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8), torch.arange(24) % 7
    step, opt, sched, scaler = T.training_step(model, r, dev, y_cache, steps_per_epoch=100)
    if which == "ceiling":
        step = T.make_step(model, opt, sched, scaler, bench.no_prep, r, dev)
    counts = []
    for steps in (1, 5):
        calls = count_host_reads(monkeypatch)
        if which == "ceiling":
            x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
            seconds, finite = bench.measure_ceiling(step, x, torch.arange(4), steps, 1, dev)
            assert finite and seconds > 0
        else:
            path = bench.ProjectPath(x_cache, y_cache, 4, 16, dev, check_every=50)
            bench.seconds_per_step(lambda: path(step), steps, 1, dev)
            assert path.i == steps + 2  # torch.utils.benchmark.Timer warms up with two calls (at least)
        counts.append(len(calls))
        monkeypatch.undo()
    assert counts[0] == counts[1], counts


def test_project_path_cycles_whole_batches_even_on_tiny_data():
    x, y = torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.arange(3)
    path = bench.ProjectPath(x, y, 5, 8, torch.device("cpu"))
    assert path.order.shape == (1, 5)
    seen = []
    for _ in range(3):
        path(lambda xb, yb, size: (seen.append(xb.shape) or torch.tensor(1.0), torch.zeros(len(yb), 7)))
    assert seen == [(5, 3, 8, 8)] * 3
    assert float(path.total_loss) == 15.0 and bool(path.finite)


def test_matmul_peak_is_positive():
    peak = bench.matmul_peak(torch.device("cpu"), sizes=(64, 128), repeats=2)
    assert peak["gflops"] > 0 and peak["size"] in (64, 128) and peak["dtype"] == "fp32"


def test_cpu_peak_context_measures_one_thread_and_bf16_and_restores_the_threads(monkeypatch):
    calls = []

    def fake_peak(device, dtype=torch.float32, sizes=None, repeats=5):
        calls.append((torch.get_num_threads(), dtype))
        return dict(gflops=1.0, size=2048, sizes=sizes, repeats=repeats, dtype={torch.float32: "fp32"}.get(dtype, "bf16"))

    monkeypatch.setattr(bench, "matmul_peak", fake_peak)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(bench, "cpu_has_bf16", lambda: True)
        out = bench.cpu_peak_context()
        assert torch.get_num_threads() == 2
        # a CPU without native bf16 would only time an emulation: that row is skipped
        monkeypatch.setattr(bench, "cpu_has_bf16", lambda: False)
        out_no_bf16 = bench.cpu_peak_context()
    finally:
        torch.set_num_threads(before)
    assert calls == [(1, torch.float32), (2, torch.bfloat16), (1, torch.float32)]
    assert [(o["dtype"], o["threads"]) for o in out] == [("fp32", 1), ("bf16", 2)]
    assert [(o["dtype"], o["threads"]) for o in out_no_bf16] == [("fp32", 1)]


def test_cpu_has_bf16_reads_the_flags_line(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open

    def cpuinfo(text):
        f = tmp_path / "cpuinfo"
        f.write_text(text)
        return lambda path, *a, **k: real_open(f if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(builtins, "open", cpuinfo("flags\t\t: fpu sse avx2 avx512f\n"))
    assert bench.cpu_has_bf16() is False
    monkeypatch.setattr(builtins, "open", cpuinfo("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n"))
    assert bench.cpu_has_bf16() is True


def test_compile_payback_and_advice():
    # 100 img/s eager, 125 compiled: 1,000 images per epoch save 2 s; 10 s of compiling pays back after 5 epochs
    assert bench.compile_payback(10.0, 100.0, 125.0, 1000) == pytest.approx(5.0)
    assert bench.compile_payback(10.0, 100.0, 90.0, 1000) == math.inf
    assert bench.compile_payback(None, 100.0, None, 1000) is None
    row = {"model": "resnet34_tuned", "compile s": 10.0, "compile speed-up (x)": 1.25, "_epochs": 8, "_images": 1000,
           "compile pays back (epochs)": 5.0}
    assert bench.compile_advice(row).startswith("resnet34_tuned: compile (+25% img/s")
    assert bench.compile_advice({**row, "_epochs": 4}).startswith("resnet34_tuned: do not compile")
    assert "never pays back" in bench.compile_advice({**row, "compile pays back (epochs)": math.inf,
                                                       "compile speed-up (x)": 0.9})


def test_compile_columns_with_compile_stubbed(synthetic_cache, monkeypatch, capsys):
    """--compile adds its columns and one advice line per model; torch.compile itself is stubbed (compiling on
    this CPU takes a minute), so the compiled model is the eager one and never pays back."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    assert bench.main(FAST + ["--compile"]) == 0
    text = capsys.readouterr().out
    (row,), _, _ = tables(text)
    assert tuple(row) == bench.COLUMNS + bench.COMPILE_COLUMNS
    assert number(row["compile s"]) >= 0 and number(row["compiled img/s"]) > 0
    advice = [line for line in text.splitlines() if line.startswith("- resnet18_tuned:")]
    assert len(advice) == 1 and ("do not compile" in advice[0] or "compile (" in advice[0])


class FakeCuda:
    """torch.cuda's bf16 checks for three kinds of card and an older torch without ``including_emulation``."""

    def __init__(self, native: bool, emulated: bool, old_torch: bool = False, capability=(8, 0)):
        self.native, self.emulated, self.old_torch, self.capability = native, emulated, old_torch, capability

    def is_bf16_supported(self, including_emulation=None):
        if including_emulation is not None and self.old_torch:
            raise TypeError("is_bf16_supported() got an unexpected keyword argument 'including_emulation'")
        return self.native or (self.emulated and including_emulation is not False)

    def get_device_capability(self, device=None):
        return self.capability


@pytest.mark.parametrize("card, label, scaler", [
    (FakeCuda(native=True, emulated=True), "bf16", False),                      # A100, H100
    (FakeCuda(native=False, emulated=True), "fp16", True),                      # T4, V100: bf16 only emulated
    (FakeCuda(native=False, emulated=True, old_torch=True, capability=(7, 5)), "fp16", True),
    (FakeCuda(native=False, emulated=True, old_torch=True, capability=(8, 6)), "bf16", False),
])
def test_cuda_precision_is_bf16_only_when_native(monkeypatch, card, label, scaler):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", card.is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", card.get_device_capability)
    cuda = torch.device("cuda")
    assert bench.precision_label(cuda).startswith(label)
    assert ("GradScaler" in bench.precision_label(cuda)) == scaler
    assert bench.uses_grad_scaler(cuda) == scaler
    assert bench.precision_label(torch.device("cpu")) == "fp32" and not bench.uses_grad_scaler(torch.device("cpu"))


def test_cudnn_benchmark_on_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    bench.setup_backend(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    bench.setup_backend(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True


def test_default_profile_and_model_list(monkeypatch):
    assert bench.default_profile(cuda=True)[0] == "full"
    import helpers.config as C  # bench uses config's choice, the one run_all.sh and the notebooks make

    assert bench.default_profile is C.default_profile
    monkeypatch.setattr(C, "profile_names", lambda: ["cpu", "full", "quick", "smoke"])
    assert bench.default_profile(cuda=False)[0] == "cpu"
    monkeypatch.setattr(C, "profile_names", lambda: ["full", "quick", "smoke"])
    assert bench.default_profile(cuda=False)[0] == "quick"
    cfg = {"name": "x", "models": {"resnet34": ["reference", "tuned"], "resnet50": ["tuned"]},
           "recipes": {"reference": {}, "tuned": {}}}
    assert [c.name for c in bench.configs_for(cfg)] == ["resnet34_reference", "resnet34_tuned", "resnet50_tuned"]
    assert [c.name for c in bench.configs_for(cfg, "resnet34, resnet18/tuned")] == [
        "resnet34_reference", "resnet34_tuned", "resnet18_tuned"]
    with pytest.raises(ValueError, match="unknown architecture"):
        bench.configs_for(cfg, "resnet7")
    with pytest.raises(ValueError, match="not in profile"):
        bench.configs_for(cfg, "resnet34/seed")


def test_cli_end_to_end_on_generated_jpegs_with_reference_loop(tmp_path):
    """The real data path (JPEGs -> cache -> split) and the reference DataLoader loop, in a fresh process."""
    data = make_fake_ham10000(tmp_path / "ham", lesions_per_class=8, lowercase_copies=False)
    out = tmp_path / "bench.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = TINY + ["--size", "32", "--steps", "1", "--reference-loop", "--data-dir", str(data), "--out", str(out)]
    result = subprocess.run([sys.executable, "-m", "helpers.bench", *args], capture_output=True, text=True,
                            timeout=300, env=env, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,), stages, _ = tables(out.read_text())
    assert tuple(row) == bench.COLUMNS + bench.REFERENCE_COLUMNS
    assert row["train min/run (est.)"] == "n/a" and {r["project img/s"] for r in stages} >= {"n/a"}  # --size given
    assert number(row["reference-loop img/s"]) > 0 and number(row["project vs reference (x)"]) > 0
    assert "cache built in" in out.read_text()
