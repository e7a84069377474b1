"""The ray executor for real: a local Ray (``ray.init(num_cpus=2, ...)``) runs the smoke profile's tiny runs on the
generated data. Each run is cut to a few seconds (ResNet-18, 128 training images, 20 bootstrap resamples)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]' installs it)")

from helpers import experiment as E  # noqa: E402
from helpers import runlock  # noqa: E402
from helpers import runs as R  # noqa: E402
from helpers.config import load_profile  # noqa: E402
from helpers.train import TrainingDiverged  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(max_train_images=128, bootstrap=20, gradcam_per_class=1, cpus_per_run=1, seeds=[0, 1],
             recipes={"reference": {"freeze_backbone": False, "metadata": "none"},
                      "tuned": {"batch_size": 32, "metadata": "none"}})
# (random init: the backbone trains; 4 steps per epoch, since one-cycle needs a few; no fused twins but in the first
# test, which compares the executors with the profile's own recipes)
TIMING_COLUMNS = ["seconds", "img_per_s", "train_seconds_cum"]


def small_cfg(**more):
    return load_profile("smoke", **{**SMALL, **more})


def ensure_ray(num_gpus: int) -> None:
    """A local Ray with 2 CPUs and ``num_gpus`` (fake) GPUs, started once and reused while it fits."""
    if ray.is_initialized():
        if ray.cluster_resources().get("GPU", 0) == num_gpus:
            return
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module", autouse=True)
def _shutdown_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def study(tmp: Path, name: str, monkeypatch) -> dict:
    """Reports and models folders of their own (the decoded-image cache is the session's), split written."""
    monkeypatch.setenv("HAM_REPORTS_DIR", str(tmp / name / "reports"))
    monkeypatch.setenv("HAM_MODELS_DIR", str(tmp / name / "models"))
    return E.prepare_data(small_cfg())


def comparable(res) -> tuple[pd.DataFrame, pd.DataFrame]:
    return res["history"].drop(columns=TIMING_COLUMNS).reset_index(drop=True), res["metrics"]


def test_two_runs_overlap_on_two_one_cpu_workers_and_match_the_local_executor(tmp_path, monkeypatch):
    cfg = small_cfg(recipes={"reference": {"freeze_backbone": False}})  # with its fused twins (metadata: late)
    data = study(tmp_path, "local", monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers train with one thread each: the same arithmetic here
    try:
        local = R.run_model(cfg, "resnet18", ["reference"], data, progress=False, executor="local")
    finally:
        torch.set_num_threads(threads)
    ensure_ray(num_gpus=0)
    data = study(tmp_path, "ray", monkeypatch)
    remote = R.run_model(cfg, "resnet18", ["reference"], data, progress=False, executor="ray")
    assert list(remote) == list(local) and any(name.endswith("_meta") for name in local)
    workers = [remote[f"resnet18_reference_s{s}"]["worker"] for s in (0, 1)]
    assert all(w["threads"] == 1 for w in workers)
    assert workers[0]["pid"] != workers[1]["pid"]
    spans = [(w["timings"]["enter"], w["timings"]["end"]) for w in workers]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the two runs did not overlap: {spans}"
    for name in local:
        h_local, m_local = comparable(R.load_result(local[name]["out"]))  # as written to disk (4 decimals)
        h_remote, m_remote = comparable(remote[name])
        pd.testing.assert_frame_equal(h_local, h_remote)
        pd.testing.assert_frame_equal(m_local, m_remote)
        assert remote[name]["model"] is None and Path(remote[name]["meta"]["checkpoint"]).exists()
    assert E.check_runs(remote, data).startswith("ok")
    # 05_compare reads the same folders: every run found, its checkpoint named relative to its report folder.
    from helpers.report import find_runs

    found = find_runs(Path(data["dirs"]["reports"]), "smoke")
    assert set(found) == set(remote)
    for name in remote:
        rel = json.loads((Path(data["dirs"]["reports"]) / name / "run.json").read_text())["checkpoint"]
        assert not Path(rel).is_absolute()
    log = Path(workers[0]["checkpoint"]).with_name(R.LOG_NAME).read_text()
    assert "attempt 1" in log and "epoch" in log  # the run's output went to its log file


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    ensure_ray(num_gpus=0)
    cfg = small_cfg(seeds=[0])
    clean = study(tmp_path, "clean", monkeypatch)
    clean_specs = R.make_specs(cfg, "resnet18", ["tuned"], clean)
    killed = study(tmp_path, "killed", monkeypatch)
    specs = R.make_specs(cfg, "resnet18", ["tuned"], killed, fault={"kill_after_epoch": 1})
    assert specs[0]["epochs"] == 2
    results, _ = R.run_specs(clean_specs + specs, cfg, progress=False)  # both at once, one per worker
    events = R.read_events(specs[0]["events"], specs[0]["submission"])
    starts = [e for e in events if e["state"] == "start"]
    assert [e["attempt"] for e in starts] == [1, 2]
    assert starts[0]["pid"] != starts[1]["pid"]
    epochs = [(e["attempt"], e["epoch"]) for e in events if e["state"] == "epoch"]
    assert epochs == [(1, 1), (2, 2)], f"epoch 1 was retrained after the retry: {epochs}"
    log = Path(specs[0]["log"]).read_text()
    assert "attempt 1" in log and "attempt 2" in log and "SIGKILL after epoch 1" in log
    clean_events = R.read_events(clean_specs[0]["events"])
    assert sum(e["state"] == "start" for e in clean_events) == 1
    # The same run, killed and resumed in another folder: the same history and metrics, bit for bit on the CPU.
    name = specs[0]["run"]
    out_killed = R.load_result(Path(killed["dirs"]["reports"]) / name)
    out_clean = R.load_result(Path(clean["dirs"]["reports"]) / name)
    for a, b in zip(comparable(out_killed), comparable(out_clean)):
        pd.testing.assert_frame_equal(a, b)
    assert results[name]["worker"]["attempt"] in (1, 2)


def test_a_diverging_run_is_attempted_once(tmp_path, monkeypatch):
    ensure_ray(num_gpus=0)
    cfg = small_cfg(seeds=[0], recipes={"reference": {"freeze_backbone": False, "optimizer": "sgd", "lr": 1e30}, "tuned": {}})
    data = study(tmp_path, "diverge", monkeypatch)
    specs = R.make_specs(cfg, "resnet18", ["reference"], data)
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        R.run_specs(specs, cfg, progress=False)
    events = R.read_events(specs[0]["events"], specs[0]["submission"])
    assert [e["state"] for e in events if e["state"] in ("start", "failed")] == ["start", "failed"]


def test_a_node_with_other_code_is_an_error_not_a_silent_mix(tmp_path, monkeypatch):
    ensure_ray(num_gpus=0)
    cfg = small_cfg(seeds=[0])
    data = study(tmp_path, "mismatch", monkeypatch)
    spec = R.make_specs(cfg, "resnet18", ["reference"], data)[0]
    spec["key_parts"] = {**spec["key_parts"], "torch": "0.0"}  # the driver as if it ran another torch
    spec["key"] = E.run_key(spec["key_parts"])
    with pytest.raises(R.RunKeyMismatch, match="torch"):
        R.run_specs([spec], cfg, progress=False)
    assert not (Path(data["dirs"]["reports"]) / spec["run"]).exists()  # nothing trained, nothing written


def test_gpu_tasks_get_one_gpu_each_and_a_fresh_process(tmp_path):
    ensure_ray(num_gpus=2)
    cfg = small_cfg()
    gpus = R.gpus_per_run(cfg, ray.cluster_resources()["GPU"])
    assert gpus == 1
    options = R.task_options(cfg, gpus)
    assert options["num_gpus"] == 1 and options["max_calls"] == 1 and options["retry_exceptions"] is False
    task = R.remote_for(cfg, gpus, R.probe)
    seen = ray.get([task.remote(2.0), task.remote(2.0)])
    devices = [s["gpus"] for s in seen]
    assert sorted(devices) == ["0", "1"], seen
    assert [s["ray_gpu_ids"] for s in seen] == [[d] for d in devices]
    assert R.gpus_per_run(cfg, 0) == 0  # auto: CPU runs on a cluster without GPUs
    ray.shutdown()


HOLDER = """
import sys, time
from pathlib import Path
from helpers import runlock
assert runlock.try_lock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""

CLAIMANT = """
import json, os, sys, time
from pathlib import Path
import helpers.experiment as E
import helpers.train as T
from helpers.config import load_profile

cfg = load_profile("smoke", **json.loads(sys.argv[1]))
data = E.load_data(cfg)
record = Path(sys.argv[2])
fit, save = E.fit, E.save_trained
def counted_fit(*a, **k):
    with open(record, "a") as fh:
        fh.write(f"fit {os.getpid()}\\n")
    return fit(*a, **k)
def counted_save(*a, **k):
    with open(record, "a") as fh:
        fh.write(f"save {os.getpid()}\\n")
    return save(*a, **k)
E.fit, E.save_trained = counted_fit, counted_save
barrier = Path(sys.argv[3])
Path(f"{barrier}.ready.{os.getpid()}").touch()
while not barrier.exists():
    time.sleep(0.02)
res = E.run_recipe(cfg, "resnet18", "reference", data, 0, progress=False)
print("RESULT", json.dumps({"pid": os.getpid(), "accuracy": float(res["metrics"].value.iloc[0])}), flush=True)
"""


def test_two_processes_asked_for_one_run_train_it_once(tmp_path, monkeypatch):
    data = study(tmp_path, "two", monkeypatch)
    record, barrier = tmp_path / "record.txt", tmp_path / "go"
    overrides = json.dumps({k: v for k, v in SMALL.items() if k != "seeds"})
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMANT, overrides, str(record), str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
             for _ in range(2)]
    deadline = time.time() + 600
    while len(list(tmp_path.glob("go.ready.*"))) < 2 and time.time() < deadline and all(p.poll() is None
                                                                                      for p in procs):
        time.sleep(0.1)
    barrier.touch()  # both have loaded the data: they ask for the run at the same moment
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(next(ln for ln in o.splitlines() if ln.startswith("RESULT"))[7:]) for o in outs]
    calls = record.read_text().split("\n")
    fits = {ln.split()[1] for ln in calls if ln.startswith("fit")}
    saves = [ln.split()[1] for ln in calls if ln.startswith("save")]
    assert len(fits) == 1 and saves == list(fits), calls  # one process trained and wrote the checkpoint
    trainer = int(next(iter(fits)))
    waiter = next(o for o, r in zip(outs, results) if r["pid"] != trainer)
    assert f"pid {trainer}" in waiter and "waiting for" in waiter, waiter
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert len(list((Path(data["dirs"]["models"]) / "smoke").glob("resnet18_reference_s0-*/model.pt"))) == 1


def test_a_claimant_with_a_timeout_stops_naming_the_holder(tmp_path, monkeypatch):
    folder = tmp_path / "resnet18_reference_s0-abc"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("HAM_LOCK_TIMEOUT", "0.5")
        with pytest.raises(runlock.RunLocked, match=f"pid {holder.pid}") as err:
            runlock.claim(folder, folder / "model.pt")
        assert f"host {socket.gethostname()}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    assert runlock.claim(folder, folder / "model.pt")  # the holder died: its lock went with it
    runlock.release(folder)


def test_the_default_path_imports_no_ray():
    code = ("import sys, helpers.config, helpers.experiment, helpers.preflight, helpers.runner; "
            "from helpers.runs import resolve_executor; "
            "assert resolve_executor({'executor': 'local'}) == 'local'; "
            "print([m for m in sys.modules if m == 'ray' or m.startswith('ray.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HAM_EXECUTOR": ""}).stdout.strip()
    assert out == "[]"


def test_papermill_runs_notebook_02_on_ray_end_to_end(tmp_path, monkeypatch):
    if ray.is_initialized():
        ray.shutdown()  # the notebook starts (and then stops) its own Ray
    data = study(tmp_path, "nb", monkeypatch)
    profile = tmp_path / "tiny.yaml"  # the smoke profile, one small run without a fused twin
    profile.write_text("extends: smoke\nmax_train_images: 128\nbootstrap: 20\ngradcam_per_class: 1\n"
                       "recipes: {reference: {metadata: none}}\n")
    out = tmp_path / "02.ipynb"
    subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "02_transfer_resnet34.ipynb"),
                    str(out), "-k", "python3", "--cwd", str(ROOT / "notebooks"), "-p", "profile", str(profile),
                    "-p", "executor", "ray", "-y", "recipes: [reference]",
                    "--log-level", "WARNING", "--no-progress-bar"],
                   check=True, env={**os.environ, "HAM_HEADLESS": "1"}, timeout=1200)
    nb = json.loads(out.read_text())
    text = json.dumps(nb["cells"])
    assert "ok: resnet34_reference_s0" in text
    html = ["".join(o.get("data", {}).get("text/html", "")) for c in nb["cells"] for o in c.get("outputs", [])
            if o.get("output_type") == "display_data"]
    tables = [h for h in html if "attempt" in h and "node / GPU" in h]
    assert len(tables) == 1, "one live table, refreshed in place"
    assert "done" in tables[0] and "resnet34_reference_s0" in tables[0]
    logs = list((Path(data["dirs"]["models"]) / "smoke").glob("resnet34_reference_s0-*/" + R.LOG_NAME))
    assert len(logs) == 1 and "attempt 1" in logs[0].read_text()
    assert "train_loss" not in text  # the per-epoch lines went to the run's log, not into the notebook


def test_preflight_stops_in_seconds_when_ray_cannot_run(monkeypatch, capsys):
    from helpers import preflight as PF

    cfg = small_cfg()
    assert PF.check_executor("smoke", cfg, {}) is None  # local: nothing to check
    with pytest.raises(PF.PreflightError, match="executor"):
        PF.check_executor("smoke", cfg, {"executor": "slurm"})
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(PF.PreflightError) as err:
        PF.check_executor("smoke", cfg, {"executor": "ray"})
    assert ".[ray]" in err.value.fix
    monkeypatch.delitem(sys.modules, "ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(PF.PreflightError, match="cannot be reached") as err:
        PF.check_executor("smoke", cfg, {"executor": "ray"})
    assert time.time() - t0 < 10 and "RAY_ADDRESS=127.0.0.1:9" in err.value.fix
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("HAM_EXECUTOR", "ray")
    monkeypatch.delenv("ALLOW_CPU", raising=False)
    if not torch.cuda.is_available():  # a GPU profile against a cluster (here: this machine) without GPUs
        with pytest.raises(PF.PreflightError, match="has none"):
            PF.check_executor("full", load_profile("full", weights="none"), {})
    note = PF.check_executor("smoke", cfg, {})
    assert note.startswith("executor ray") and "1 CPU(s)" in note
    with pytest.raises(PF.PreflightError, match="cpus_per_run"):
        PF.check_executor("smoke", small_cfg(cpus_per_run=(os.cpu_count() or 1) + 1), {})
    # run_all.sh's first step: the message alone, the remedy last, exit code 2, nothing staged.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    monkeypatch.setenv("HAM_PREFLIGHT_TIMING", "0")
    from helpers import runner

    assert runner.run(["smoke", "-p", "executor", "ray"]) == 2
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("[run_all] RAY_ADDRESS=127.0.0.1:9")


def test_the_executor_comes_from_the_parameter_then_the_environment_then_the_profile(monkeypatch):
    cfg = load_profile("smoke")
    assert (cfg["executor"], cfg["gpus_per_run"], cfg["cpus_per_run"], cfg["max_retries"]) == ("local", "auto", 1, 3)
    monkeypatch.delenv("HAM_EXECUTOR", raising=False)
    assert R.resolve_executor(cfg) == "local"
    monkeypatch.setenv("HAM_EXECUTOR", "ray")
    assert R.resolve_executor(cfg) == "ray"
    assert R.resolve_executor(cfg, "local") == "local"  # papermill's -p executor wins
    with pytest.raises(ValueError, match="local, ray"):
        R.resolve_executor(cfg, "dask")
    name, over = R.profile_overrides(load_profile("smoke", weights="imagenet", bootstrap=7))
    assert name == "smoke" and over == {"weights": "imagenet", "bootstrap": 7}
    assert R.plan([5, 4, 3, 3, 3], 2) == 10 and R.plan([10, 1, 1], 4) == 10  # longest first: 5+3 | 4+3+3
