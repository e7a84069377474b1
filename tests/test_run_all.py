"""run_all.sh and its Python side (helpers.runner, helpers.preflight), and the HTML pages: fail fast with one clear line, never lose
reports, a default profile that fits the machine, parameters that do what they say, alt text and a headline.

The run_all.sh tests run the script in a subprocess, but only up to an early failure or with two tiny notebooks
(HAM_RUN_NOTEBOOKS), never a profile's real notebooks, and without the timing estimate (HAM_PREFLIGHT_TIMING=0).
"""
import base64
import io
import json
import os
import subprocess
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from helpers import pages
from helpers import preflight as PF
from helpers import runner as RN
from helpers import config as C
from helpers.config import load_profile, recipe

ROOT = Path(__file__).resolve().parents[1]


def run_all(*args, env=None, cwd=ROOT, timeout=240):
    e = dict(os.environ, HAM_PREFLIGHT_TIMING="0")
    e.update(env or {})
    for k, v in list(e.items()):
        if v is None:
            del e[k]
    t0 = time.perf_counter()
    p = subprocess.run([str(ROOT / "run_all.sh"), *args], env=e, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    p.seconds = time.perf_counter() - t0
    p.lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return p


def git_status_reports():
    return subprocess.run(["git", "status", "--porcelain", "--", "reports"], cwd=ROOT, capture_output=True,
                          text=True).stdout


# ------------------------------------------------------------------------------------------ failing fast
def test_nowhere_data_fails_fast_with_one_clear_line_and_touches_no_reports():
    def partials():
        folder = ROOT / "reports" / "_partial"
        return sorted(os.listdir(folder)) if folder.exists() else []

    before, partials_before = git_status_reports(), partials()
    p = run_all("quick", env={"HAM10000_DIR": "/nowhere", "HAM_REPORTS_DIR": None, "HAM_PROFILE": None})
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.seconds < 30
    assert "Traceback" not in p.stdout + p.stderr
    last = p.lines[-1]
    assert "/nowhere" in last and "HAM10000_DIR" in last, last
    assert git_status_reports() == before and partials() == partials_before  # nothing written, not even ignored


def test_unknown_profile_names_the_choices(tmp_path):
    p = run_all("nosuch", env={"HAM_REPORTS_DIR": str(tmp_path / "r")})
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr
    assert "nosuch" in p.lines[-1] and all(n in p.lines[-1] for n in ("cpu", "quick", "smoke", "full"))
    assert not (tmp_path / "r").exists()


def test_usage_lists_the_profiles_from_the_profile_folder():
    p = run_all("--help")
    assert p.returncode == 0
    for name in PF.profile_names():
        assert name in p.stdout.splitlines()[0]
    assert run_all("--bogus").returncode == 2


def test_missing_imagenet_weights_fail_before_any_notebook(tmp_path, monkeypatch):
    monkeypatch.setattr(PF, "_can_reach", lambda url, timeout=3.0: False)
    cfg, runs = PF.check_profile("smoke", {"weights": "imagenet"})
    with pytest.raises(PF.PreflightError) as e:
        PF.check_weights(cfg, runs)
    assert "resnet34" in e.value.what and "-p weights none" in e.value.fix
    assert str(PF.imagenet_file("resnet34")[0].parent) in e.value.fix
    with pytest.raises(PF.PreflightError, match="nope.pt not found") as e:
        PF.check_weights(dict(cfg, weights=str(tmp_path / "nope.pt")), runs)
    assert "nope.pt does not exist" in e.value.fix


def test_a_frozen_backbone_without_weights_is_refused_up_front(monkeypatch):
    import helpers.config as C

    cfg = load_profile("smoke")
    cfg["recipe_overrides"] = {f"{a}/{r}": {"freeze_backbone": True} for a, rs in cfg["models"].items() for r in rs}
    monkeypatch.setattr(C, "load_profile", lambda *a, **k: cfg)
    with pytest.raises(PF.PreflightError, match="(?i)freez"):
        PF.check_profile("smoke", {})


def test_bad_metadata_row_stops_in_preflight(tmp_path, fake_data):
    import shutil

    ham = tmp_path / "ham"
    shutil.copytree(fake_data, ham)
    df = pd.read_csv(ham / "HAM10000_metadata.csv")
    df.loc[2, "lesion_id"] = None
    df.to_csv(ham / "HAM10000_metadata.csv", index=False)
    p = run_all("smoke", env={"HAM10000_DIR": str(ham), "HAM_REPORTS_DIR": str(tmp_path / "r")})
    assert p.returncode == 2
    assert any("row 4: empty 'lesion_id'" in ln for ln in p.lines), p.stdout
    assert str(ham) in p.lines[-1]


# ------------------------------------------------------------------------------------- never lose reports
def test_a_foreign_non_empty_folder_is_refused_and_kept(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "precious.txt").write_text("do not delete")
    p = run_all("smoke", env={"HAM_REPORTS_DIR": str(target)})
    assert p.returncode == 2
    assert str(target) in p.lines[-1] and "HAM_REPORTS_DIR" in p.lines[-1]
    assert sorted(x.name for x in target.iterdir()) == ["precious.txt"]


def test_relative_reports_dir_is_taken_from_the_callers_folder(tmp_path):
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "x.txt").write_text("x")
    p = run_all("smoke", env={"HAM_REPORTS_DIR": "rel"}, cwd=tmp_path)
    assert p.returncode == 2 and str(tmp_path / "rel") in p.lines[-1]


def test_check_target_rules(tmp_path):
    assert PF.check_target(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    assert PF.check_target(tmp_path / "empty")
    kept_only = tmp_path / "kept"
    (kept_only / "_partial").mkdir(parents=True)
    (kept_only / "benchmark_cpu.md").write_text("b")
    assert PF.check_target(kept_only)
    assert PF.check_target(PF.project_root() / "reports")  # the checkout's own reports: marked once
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.csv").write_text("a")
    with pytest.raises(PF.PreflightError):
        PF.check_target(tmp_path / "foreign")
    (tmp_path / "foreign" / PF.MARKER).write_text("")
    assert PF.check_target(tmp_path / "foreign")


def test_publish_replaces_only_its_own_output(tmp_path):
    target = tmp_path / "reports"
    stage = RN.make_stage(target, "smoke")
    for name, text in [("old.txt", "old"), ("benchmark_cpu.md", "bench"), (".gitkeep", "")]:
        (target / name).write_text(text)
    (target / "old_run").mkdir()
    (stage / "new.txt").write_text("new")
    (stage / "notebooks").mkdir()
    RN.publish(stage, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [".gitkeep", PF.MARKER, "_partial", "benchmark_cpu.md", "new.txt", "notebooks"])
    assert list((target / "_partial").iterdir()) == []


def _tiny_notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("profile = None")] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, path)


WRITE_AND_PLOT = """import os, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from IPython.display import Image, display
out = os.environ["HAM_REPORTS_DIR"]
open(os.path.join(out, "hello.txt"), "w").write(profile + " " + os.environ["HAM_HEADLESS"] + os.environ["HAM_UPDATE_README"])
fig, ax = plt.subplots(); ax.plot([0, 1]); fig.suptitle("Validation AUC per epoch")
fig.savefig(os.path.join(out, "fig.png"), metadata={"Title": "Validation AUC per epoch"})
display(Image(os.path.join(out, "fig.png")))"""


@pytest.fixture
def tiny_notebooks(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _tiny_notebook(folder / "01_ok.ipynb", WRITE_AND_PLOT)
    return folder


def test_failed_notebook_keeps_reports_and_names_cell_and_exception(tmp_path, tiny_notebooks):
    _tiny_notebook(tiny_notebooks / "02_fail.ipynb", "x = 1", "def f():\n    raise ValueError('boom: the cause')\nf()")
    target = tmp_path / "reports"
    target.mkdir()
    (target / PF.MARKER).write_text("")
    (target / "previous.txt").write_text("the last good run")
    p = run_all("smoke", env={"HAM_REPORTS_DIR": str(target), "HAM_RUN_NOTEBOOKS": str(tiny_notebooks)})
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.lines[-1]
    assert "02_fail" in last and "cell 3" in last and "def f():" in last and "ValueError: boom: the cause" in last
    assert "Traceback" not in p.stdout
    assert (target / "previous.txt").read_text() == "the last good run" and not (target / "hello.txt").exists()
    (stage,) = (target / "_partial").iterdir()
    assert (stage / "hello.txt").exists() and str(stage) in p.stdout
    failed = nbformat.read(stage / "notebooks" / "02_fail.ipynb", 4)
    assert any(o.get("output_type") == "error" and o.get("traceback") for c in failed.cells for o in c.get("outputs", []))
    assert (stage / "notebooks" / "02_fail.html").exists()


def test_successful_run_replaces_reports_keeps_benchmarks_and_renders_alt_text(tmp_path, tiny_notebooks):
    target = tmp_path / "reports"
    target.mkdir()
    (target / PF.MARKER).write_text("")
    (target / "stale_run").mkdir()
    (target / "benchmark_cpu.md").write_text("bench")
    p = run_all("smoke", env={"HAM_REPORTS_DIR": str(target), "HAM_RUN_NOTEBOOKS": str(tiny_notebooks)})
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (target / "stale_run").exists() and (target / "benchmark_cpu.md").read_text() == "bench"
    assert (target / "hello.txt").read_text() == "smoke 10"  # HAM_HEADLESS=1; not the committed profile: no README
    assert list((target / "_partial").iterdir()) == []
    page = (target / "notebooks" / "01_ok.html").read_text()
    assert 'alt="Validation AUC per epoch"' in page and "No description has been provided" not in page
    assert (target / "index.html").exists() and (target / "timings.csv").exists()


# ------------------------------------------------------------------------------------------- the profile
def test_default_profile_fits_the_machine(monkeypatch):
    assert C.default_profile(cuda=False) == ("cpu", "no CUDA visible")
    monkeypatch.setattr("torch.cuda.get_device_name", lambda i=0: "Fake GPU")
    assert C.default_profile(cuda=True)[0] == "full"
    monkeypatch.setattr("helpers.config.profile_names", lambda: ["full", "quick", "smoke"])
    assert C.default_profile(cuda=False)[0] == "quick"


def test_profile_env_wins_over_default_and_argument_over_env(monkeypatch):
    monkeypatch.setenv("HAM_PROFILE", "smoke")
    assert PF.choose_profile(None) == ("smoke", "from $HAM_PROFILE")
    assert PF.choose_profile("quick")[0] == "quick"
    monkeypatch.delenv("HAM_PROFILE")
    monkeypatch.setattr("helpers.config.cuda_visible", lambda: False)
    assert PF.choose_profile(None) == ("cpu", "no CUDA visible")


def test_estimate_extrapolates_timed_steps_with_epochs_schedule_and_seeds():
    cfg = {"split_fractions": [0.7, 0.15, 0.15], "image_size": 64, "max_train_images": None, "seeds": [0]}
    calls = []

    def step(r, size):
        calls.append((size, r["batch_size"]))
        return {48: 0.5, 64: 1.0}[size], False

    base = dict(batch_size=64, image_size=64, epochs=2)
    one = PF.estimate_seconds(cfg, [("resnet34", "a", base)], 10000, step) - PF.FIXED_SECONDS
    steps = 110  # 7,000 training images / 64
    assert one == pytest.approx(2 * steps * 1.0 + 2 * 3000 / 2 * (1 / 64 / 3)
                                + 3000 / 64 / 3 + PF.PER_RUN_SECONDS)
    sched = PF.estimate_seconds(cfg, [("resnet34", "a", dict(base, resolution_schedule=[[48, 4], [64, 2]]))],
                                10000, step) - PF.FIXED_SECONDS
    assert sched > one and ((48, 64) in calls)
    capped = PF.estimate_seconds(dict(cfg, max_train_images=1500), [("resnet34", "a", base)], 10000, step)
    assert capped - PF.FIXED_SECONDS < one


def test_measured_step_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("HAM_CACHE_DIR", str(tmp_path))
    r = recipe(load_profile("smoke"), "resnet18", "tuned")
    s, measured = PF.step_seconds(r, 32, measure=lambda *a: PF.measure_step(*a, steps=1))
    assert s > 0 and measured
    assert PF.step_seconds(r, 32, measure=lambda *a: 1 / 0) == (s, False)
    assert PF.step_seconds(dict(r, augment="none"), 32, measure=lambda *a: 2.0) == (2.0, True)  # recipe in key


def test_first_line_says_profile_why_and_measured_estimate(tmp_path, monkeypatch):
    monkeypatch.setenv("HAM_PREFLIGHT_TIMING", "1")
    monkeypatch.setenv("HAM_REPORTS_DIR", str(tmp_path / "r"))
    monkeypatch.delenv("HAM_PROFILE")
    monkeypatch.setattr("helpers.config.cuda_visible", lambda: False)
    monkeypatch.setattr("helpers.config.profile_names", lambda: ["full", "quick", "smoke"])  # no cpu: quick
    monkeypatch.setattr(PF, "step_seconds", lambda *a, **k: (0.5, True))
    plan = PF.prepare(None, {"weights": "none"})
    assert plan.profile == "quick" and plan.target == tmp_path / "r"
    assert plan.lines[0].startswith("profile quick (no CUDA visible") and "min on this machine (measured)" in \
        plan.lines[0]
    assert not (tmp_path / "r").exists()  # preflight writes nothing


def test_readme_update_only_for_the_committed_profile_into_the_checkouts_reports(tmp_path):
    reports = PF.project_root() / "reports"
    assert RN.updates_readme("cpu", reports)
    assert not RN.updates_readme("cpu", tmp_path / "elsewhere")
    assert not RN.updates_readme("quick", reports)


def test_run_all_parameters_are_typed_as_papermill_types_them():
    args = RN.parse_args(["quick", "-p", "weights", "none", "-p", "epochs", "2", "-p", "flag", "True",
                          "-r", "x", "1"])
    assert args.profile == "quick"
    assert args.params == {"weights": "none", "epochs": 2, "flag": True, "x": "1"}
    assert RN.parse_args(["-p", "executor", "ray"]).profile is None


# ---------------------------------------------------------------------------- parameters that do what they say
def test_model_recipes():
    cfg = load_profile("smoke")
    arch = next(iter(cfg["models"]))
    assert C.model_recipes(cfg, arch) == cfg["models"][arch]
    assert C.model_recipes(cfg, "resnet18") == list(cfg["recipes"])  # any architecture: the profile's recipes
    assert C.model_recipes(cfg, "resnet152", "tuned") == ["tuned"]
    with pytest.raises(ValueError, match="unknown architecture 'resnet19': choose one of resnet18, resnet34"):
        C.model_recipes(cfg, "resnet19")
    with pytest.raises(ValueError, match=r"unknown recipe 'fancy' for profile 'smoke': choose from .*tuned"):
        C.model_recipes(cfg, "resnet34", ["tuned", "fancy"])
    with pytest.raises(ValueError, match="no recipes"):
        C.model_recipes(cfg, "resnet34", [])


# ---------------------------------------------------------------------------------- failure report lines
def test_notebook_failure_names_notebook_cell_and_exception(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, nbformat.v4.new_code_cell("\n# load\ncfg = 1")]
    nbformat.write(nb, tmp_path / "02_x.ipynb")
    # executed, the notebook holds papermill's injected cell after the parameters: the failing cell is at index 3
    err = PapermillExecutionError(cell_index=3, exec_count=2, source="\n# load\ncfg = 1", ename="KeyError",
                                  evalue="\x1b[31m'resnet18'\x1b[0m\nsecond line", traceback=[])
    lines = RN.failure_lines(err, tmp_path / "02_x.ipynb", "notebooks/02_x.ipynb")
    assert lines[0] == "[run_all] FAILED in notebooks/02_x.ipynb, cell 3 (# load): KeyError: 'resnet18'"
    assert lines[1].endswith("second line")
    before = PapermillExecutionError(cell_index=0, exec_count=1, source="x", ename="E", evalue="v", traceback=[])
    assert "cell 1 (x)" in RN.failure_lines(before, tmp_path / "02_x.ipynb", "n")[0]  # before the injection


# ---------------------------------------------------------------------------------------- HTML pages
def _png(title=None):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if title:
        info.add_text("Title", title)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _fake_reports(root: Path):
    (root / "compare").mkdir(parents=True)
    (root / "etl").mkdir()
    (root / "resnet34_tuned_s0").mkdir()
    (root / "etl" / "class_counts.png").write_bytes(_png("Images per diagnosis — HAM10000 @ 200x150"))
    (root / "compare" / "roc_overlay.png").write_bytes(_png())
    (root / "resnet34_tuned_s0" / "evaluation.png").write_bytes(_png("resnet34_tuned_s0 on the test split"))
    (root / "resnet34_tuned_s0" / "run.json").write_text(json.dumps({
        "run_name": "resnet34_tuned_s0", "model_name": "resnet34_tuned", "profile": "cpu",
        "provenance": {"data": "HAM10000 @ 200x150", "image_size": "64x64", "weights": "random init",
                       "profile": "cpu"}}))
    pd.DataFrame({"Macro AUC": ["0.920 [0.901, 0.934]", "0.900 (0.890–0.910)", "0.500 [0.500, 0.500]"],
                  "Balanced acc.": ["0.600 [0.550, 0.650]", "0.500 (0.49–0.51)", "0.143 [0.143, 0.143]"],
                  "val_loss (selects)": ["0.4", "0.5", "1.2"]},
                 index=["resnet34_tuned", "resnet50_tuned", "majority class (nv)"]).to_csv(root / "compare" / "comparison_ci.csv")
    # the headline reads these numeric columns, never the display strings above
    pd.DataFrame({"auc": [0.92, 0.90, 0.5], "auc_ci_low": [0.901, 0.89, None], "auc_ci_high": [0.934, 0.91, None],
                  "balanced_accuracy": [0.6, 0.5, 1 / 7], "balanced_accuracy_ci_low": [0.55, 0.49, None],
                  "balanced_accuracy_ci_high": [0.65, 0.51, None], "val_loss": [0.4, 0.5, 1.2],
                  "n_seeds": [1, 1, 0], "select_metric": ["val_loss"] * 3, "is_best": [True, False, False]},
                 index=pd.Index(["resnet34_tuned", "resnet50_tuned", "majority class (nv)"], name="model")
                 ).to_csv(root / "compare" / "comparison.csv")


def test_index_opens_with_the_headline_and_every_figure_has_alt_text(tmp_path):
    _fake_reports(tmp_path)
    sentence = pages.headline(tmp_path)
    assert sentence == ("Best model, chosen on validation val_loss: resnet34_tuned, with macro AUC 0.920 (95% CI "
                        "0.901–0.934) and balanced accuracy of the plain argmax 0.600 (95% CI 0.550–0.650), per "
                        "image, on the lesion-grouped test split of HAM10000 @ 200x150 (64x64 input, random init), "
                        "profile cpu.")
    page = pages.write_index(tmp_path).read_text()
    assert page.index(sentence.split(",")[0]) < page.index("<img")  # the headline opens the page
    from bs4 import BeautifulSoup

    imgs = BeautifulSoup(page, "html.parser").find_all("img")
    assert len(imgs) == 3 and all(i.get("alt") for i in imgs)
    alts = {i["src"]: i["alt"] for i in imgs}
    assert alts["etl/class_counts.png"] == "Images per diagnosis — HAM10000 @ 200x150"  # the PNG's own title
    assert alts["compare/roc_overlay.png"] == "Test-split ROC curves of every model"  # no title: from the name
    assert alts["resnet34_tuned_s0/evaluation.png"] == "resnet34_tuned_s0 on the test split"


def test_rendered_notebook_images_have_alt_text(tmp_path):
    nb = nbformat.v4.new_notebook()
    img = lambda png: nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png).decode(),
                                                                    "text/plain": "<Image>"})
    nb.cells = [nbformat.v4.new_markdown_cell("## The split\ntext"),
                nbformat.v4.new_code_cell("show()", outputs=[img(_png("Class counts per split")), img(_png())])]
    nbformat.write(nb, tmp_path / "01_etl.ipynb")
    page = pages.render_notebook(tmp_path / "01_etl.ipynb").read_text()
    assert 'alt="Class counts per split"' in page and "Figure 2 of section “The split”" in page
    assert "No description has been provided" not in page


def test_model_recipes_for_a_model_the_profile_skips():
    cfg = load_profile("quick")
    skipped = [a for a, rs in cfg["models"].items() if not rs]
    if not skipped:
        pytest.skip("the quick profile skips no model")
    assert C.model_recipes(cfg, skipped[0]) == []
    assert C.model_recipes(cfg, "resnet18") == list(cfg["recipes"])
