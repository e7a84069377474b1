"""Past one machine: a model notebook's runs as Ray tasks, one run per task (``executor: ray``).

The default executor, ``local``, trains a notebook's runs one after another in the notebook (``run_model``
as it always did); nothing here is imported then, and Ray never is. With ``executor: ray`` (the profile's setting,
else ``$HAM_EXECUTOR``, else papermill's ``-p executor ray``, which wins):

1. each run becomes a plain **spec** (``make_specs``): profile name and overrides, arch, recipe, seed, the data,
   reports, models and cache folders as absolute paths (papermill runs in ``notebooks/``), the driver's run key,
   and the run's log and event files, inside its checkpoint folder ``models/<profile>/<run>-<key>/``;
2. specs are submitted **longest first** (``estimate_flops``) as Ray core tasks with the profile's ``cpus_per_run``
   and ``gpus_per_run`` (Ray reserves the GPU and sets ``CUDA_VISIBLE_DEVICES``); GPU tasks use ``max_calls=1`` so
   every run gets a fresh process that frees its GPU memory. Ray retries a task up to ``max_retries`` times when
   its worker or node is lost (the retry resumes from ``last.pt``); an exception raised by the run (a diverged
   run, ``train.TrainingDiverged``, or a bug) is never retried;
3. the worker (``run_task``) sets torch's threads to its CPUs, checks that its run key equals the driver's (other
   code or another torch version on a node is an error, not a silent mix), calls ``experiment.run_recipe`` with
   its output going to the run's log file, and returns paths and timings, never a model;
4. the driver shows one table refreshed in place (run, state, epoch k/N, validation score, node/GPU, attempt,
   elapsed), checks each returned key again and reads every result back from the run's folders on disk
   (``load_result``): what ``check_runs``, ``show_run`` and ``05_compare`` need is all there. It shuts Ray down only
   if it started it.

``experiment.train_or_load`` holds an OS lock per run folder (``runlock``), so a retried task racing a worker that
was only presumed dead, or two notebooks asking for one run, never train it twice.

``python -m helpers.runs queue PROFILE`` submits every model notebook's runs of a profile at once (one cluster, one
queue, longest first); ``python -m helpers.runs plan PROFILE`` estimates a study's makespan on K GPUs on paper.

Why one module of this size: everything Ray needs (specs, the worker, submission with retries, run-key checks,
the live table, the cluster-wide queue) is in one optional module, so the default path imports none of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from . import config

EXECUTORS = ("local", "ray")
LOG_NAME, EVENTS_NAME = "worker.log", "events.jsonl"
FIGURES = ("curves", "evaluation", "reliability", "errors", "gradcam")
REFRESH_SECONDS = 2.0
RAY_REMEDY = 'pip install -e ".[ray]" (or pip install "ray>=2.9") into this environment, or run with -p executor local'


class RunKeyMismatch(RuntimeError):
    """A worker computed another run key than the driver: other code, data or torch on that node."""


# ------------------------------------------------------------------------------------------- the notebooks' API
def run_model(cfg: dict, arch: str, recipes, data: dict, progress: bool = True, executor: str | None = None) -> dict:
    """Every (recipe, seed) run of one model notebook: ``{run_name: result}``, fused twins included.

    ``executor`` (else ``$HAM_EXECUTOR``, else the profile's ``executor``): ``local`` trains the runs here, one after
    another; ``ray`` sends each run to a Ray cluster as one task (``helpers.runs``) and reads its results back from
    the run's folders on disk (those results hold no ``model``: ``meta["checkpoint"]`` loads it)."""
    from . import experiment as E  # runs -> experiment, never back: the pipeline knows no executor

    if resolve_executor(cfg, executor) == "ray":
        return run_model_ray(cfg, arch, recipes, data, progress)
    results = {}
    for name in recipes:
        for seed in config.recipe_seeds(cfg, arch, name):
            res = E.run_recipe(cfg, arch, name, data, seed, progress)
            results[res["run"]] = res
            if res["twin"] is not None:
                results[res["twin"]["run"]] = res["twin"]
    E.runlock.release_all()  # every model.pt is written: the runs' folders are free for other processes
    return results


# --------------------------------------------------------------------------------------------------- settings
def resolve_executor(cfg: dict, executor: str | None = None) -> str:
    """``executor`` as given (papermill's ``-p executor``), else ``$HAM_EXECUTOR``, else the profile's, else local."""
    value = executor or os.environ.get("HAM_EXECUTOR") or cfg.get("executor") or "local"
    value = str(value).strip().lower()
    if value not in EXECUTORS:
        raise ValueError(f"executor {value!r}: choose one of {', '.join(EXECUTORS)}")
    return value


def gpus_per_run(cfg: dict, cluster_gpus: float) -> float:
    """The profile's ``gpus_per_run``; ``auto``: one GPU per run when the cluster has GPUs, else none."""
    value = cfg.get("gpus_per_run", "auto")
    if value in (None, "auto"):
        return 1.0 if cluster_gpus > 0 else 0.0
    value = float(value)
    if value < 0:
        raise ValueError(f"gpus_per_run must be 'auto' or a number >= 0, not {cfg.get('gpus_per_run')!r}")
    return value


def cpus_per_run(cfg: dict) -> float:
    value = float(cfg.get("cpus_per_run") or 1)
    if value <= 0:
        raise ValueError(f"cpus_per_run must be > 0, not {cfg.get('cpus_per_run')!r}")
    return value


def max_retries(cfg: dict) -> int:
    return int(cfg.get("max_retries", 3))


def profile_overrides(cfg: dict) -> tuple[str, dict]:
    """(profile, overrides) that rebuild ``cfg`` with ``config.load_profile``: the profile's name when it is one of
    the package's profiles (a node reads its own copy), else its file; overrides are the top-level settings that
    differ from the file's."""
    path = Path(cfg["profile_file"]).resolve()
    name = cfg["name"] if path.parent == config.PROFILE_DIR.resolve() and path.stem == cfg["name"] else str(path)
    base = config.load_profile(str(path))
    over = {}
    for k, v in cfg.items():
        if k != "profile_file" and base.get(k) != v:
            over[k] = "none" if (k == "weights" and v is None) else v
    return name, over


def cfg_digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k != "profile_file"}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ run sizes
# Forward multiply-accumulates per 224x224 image (torchvision's model docs), in GMACs; a FLOP is 2 MACs, and a
# training step costs about 3 forwards (forward + backward) of the trained layers.
FORWARD_GMACS_224 = {"resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51}


def estimate_flops(r: dict, n_train: int, n_val: int, n_test: int) -> float:
    """FLOPs of one run on paper: its training epochs (a resolution schedule's stages at their sizes; a frozen
    backbone costs a forward only), the validation pass after every epoch, and the final evaluation of val and
    test (8 views with ``tta``). Epochs are the recipe's maximum (``patience`` may stop earlier)."""
    fwd = 2e9 * FORWARD_GMACS_224.get(r["arch"], FORWARD_GMACS_224["resnet50"])
    per = lambda size: fwd * (size / 224) ** 2  # noqa: E731
    stages = r.get("resolution_schedule") or [[r["image_size"], r["epochs"]]]
    train = sum(e * n_train * per(s) * (1 if r.get("freeze_backbone") else 3) for s, e in stages)
    val = sum(e for _, e in stages) * n_val * per(r["image_size"])
    final = (n_val + n_test) * per(r["image_size"]) * (8 if r.get("tta") else 1)
    return train + val + final


def split_sizes(df) -> tuple[int, int, int]:
    return tuple(int((df.split == s).sum()) for s in ("train", "val", "test"))


def plan(costs: list[float], workers: int) -> float:
    """Makespan of longest-first list scheduling of ``costs`` (seconds) on ``workers`` identical workers."""
    finish = [0.0] * workers
    for c in sorted(costs, reverse=True):
        i = finish.index(min(finish))
        finish[i] += c
    return max(finish) if costs else 0.0


# ------------------------------------------------------------------------------------------------------ specs
def make_specs(cfg: dict, arch: str, recipes, data: dict, fault: dict | None = None) -> list[dict]:
    """One plain, JSON-able spec per (recipe, seed) run of ``arch``, in the notebook's order."""
    from . import experiment as E

    profile, overrides = profile_overrides(cfg)
    n_train, n_val, n_test = split_sizes(data["df"])
    if cfg.get("max_train_images"):
        n_train = min(n_train, int(cfg["max_train_images"]))
    dirs = {k: str(Path(v).resolve()) for k, v in data["dirs"].items()}
    env = {"HAM_REPORTS_DIR": dirs["reports"], "HAM_MODELS_DIR": dirs["models"], "HAM_CACHE_DIR": dirs["cache"],
           "HAM10000_DIR": str(Path(data["root"]).resolve()), "HAM_HEADLESS": "1", "MPLBACKEND": "Agg"}
    for var in ("TORCH_HOME", "KAGGLEHUB_CACHE", "HAM_COMPILE", "HAM_LOCK_TIMEOUT"):
        if os.environ.get(var):
            env[var] = str(Path(os.environ[var]).resolve()) if var in ("TORCH_HOME", "KAGGLEHUB_CACHE") \
                else os.environ[var]
    specs = []
    for name in recipes:
        for seed in config.recipe_seeds(cfg, arch, name):
            r = config.recipe(cfg, arch, name, seed)
            parts = E.run_key_parts(r, cfg, data)
            key = E.run_key(parts)
            folder = Path(dirs["models"]) / cfg["name"] / f"{r['run_name']}-{key}"
            specs.append(dict(run=r["run_name"], arch=arch, recipe=name, seed=seed, epochs=r["epochs"],
                              select_metric=r["select_metric"], profile=profile, overrides=overrides,
                              cfg_digest=cfg_digest(cfg), data_dir=env["HAM10000_DIR"], dirs=dirs, env=env,
                              key=key, key_parts=parts, folder=str(folder), log=str(folder / LOG_NAME),
                              events=str(folder / EVENTS_NAME), cpus=cpus_per_run(cfg),
                              flops=estimate_flops(r, n_train, n_val, n_test), fault=dict(fault or {})))
    return specs


# ----------------------------------------------------------------------------------------------------- events
def write_event(path, **event) -> None:
    """Append one JSON line (a single small O_APPEND write: whole lines even with several writers)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"t": time.time(), **event}, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(path, submission: str | None = None) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for ln in lines:
        try:
            e = json.loads(ln)
        except ValueError:
            continue  # a line being written
        if submission is None or e.get("submission") == submission:
            out.append(e)
    return out


# ----------------------------------------------------------------------------------------------------- worker
@contextmanager
def _output_to(path):
    """The process's stdout and stderr (file descriptors 1 and 2, so C libraries and subprocesses too) appended to
    ``path`` for the duration: a run's output goes to its log file, not to Ray's driver or the notebook."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@contextmanager
def _env(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _epoch_events(spec: dict, attempt: int):
    """Each finished epoch (after its checkpoint is written) as an event for the driver's table. ``spec["fault"]``
    (tests and the benchmark only): ``{"kill_after_epoch": k}`` SIGKILLs this worker after epoch k of its first
    attempt, as a lost node would."""
    from . import train as T

    base = getattr(T, "EpochLog", None)
    if base is None:  # pragma: no cover - the training loop changed: no live epochs, nothing else lost
        yield
        return
    kill_after = (spec.get("fault") or {}).get("kill_after_epoch")

    class Watched(base):
        def epoch(self, row):
            super().epoch(row)
            write_event(spec["events"], submission=spec["submission"], state="epoch", attempt=attempt,
                        epoch=int(row["epoch"]), of=spec["epochs"], score=row.get(spec["select_metric"]),
                        pid=os.getpid())
            if kill_after is not None and attempt == 1 and int(row["epoch"]) == int(kill_after):
                print(f"[fault injection] SIGKILL after epoch {row['epoch']}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    T.EpochLog = Watched
    try:
        yield
    finally:
        T.EpochLog = base


def worker_place() -> dict:
    """Where this task runs: host, pid, the GPUs Ray gave it."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return dict(host=socket.gethostname(), pid=os.getpid(), gpus=gpus if gpus not in (None, "") else None)


def run_task(spec: dict) -> dict:
    """One run in a Ray worker (or any process): train or resume or load it, write its reports, return paths and
    timings. The run's output goes to ``spec["log"]``; its progress to ``spec["events"]``."""
    t_enter = time.time()
    attempt = 1 + sum(e["state"] == "start" for e in read_events(spec["events"], spec["submission"]))
    place = worker_place()
    with _env(spec["env"]), _output_to(spec["log"]):
        print(f"=== {spec['run']}: attempt {attempt} on {place['host']} pid {place['pid']}"
              f"{' GPU ' + place['gpus'] if place['gpus'] else ''} at {time.strftime('%Y-%m-%d %H:%M:%S')}",
              flush=True)
        write_event(spec["events"], submission=spec["submission"], state="start", attempt=attempt, **place)
        try:
            t0 = time.time()
            import torch

            threads = max(1, int(spec["cpus"]))
            torch.set_num_threads(threads)
            from . import experiment as E
            from . import runlock

            t_import = time.time()
            cfg = config.load_profile(spec["profile"], **spec["overrides"])
            if cfg_digest(cfg) != spec["cfg_digest"]:
                raise RunKeyMismatch(f"{spec['run']}: profile {spec['profile']!r} resolves differently on "
                                     f"{place['host']} than on the driver (another version of the profile file)")
            data = E.load_data(cfg, spec["data_dir"])
            t_data = time.time()
            r = config.recipe(cfg, spec["arch"], spec["recipe"], spec["seed"])
            parts = E.run_key_parts(r, cfg, data)
            key = E.run_key(parts)
            if key != spec["key"]:
                changed = sorted(k for k in set(parts) | set(spec["key_parts"])
                                 if parts.get(k) != spec["key_parts"].get(k))
                raise RunKeyMismatch(f"{spec['run']}: run key {key} on {place['host']} differs from the driver's "
                                     f"{spec['key']} in: {', '.join(changed)} (other code, data or torch there); "
                                     f"install the same checkout and environment on every node")
            with _epoch_events(spec, attempt):
                res = E.run_recipe(cfg, spec["arch"], spec["recipe"], data, spec["seed"], progress=True)
            runlock.release_all()
            t_run = time.time()
            reports = [str(res["out"])] + ([str(res["twin"]["out"])] if res.get("twin") else [])
            out = dict(run=spec["run"], key=key, reports=reports, checkpoint=str(res["meta"]["checkpoint"]),
                       attempt=attempt, threads=torch.get_num_threads(), **place,
                       train_seconds=float(res["info"].get("train_seconds", 0.0)),
                       epochs_run=int(res["info"].get("epochs_run", 0)),
                       timings=dict(enter=t_enter, import_s=t_import - t0, data_s=t_data - t_import,
                                    run_s=t_run - t_data, end=time.time()))
            print(f"=== {spec['run']}: done in {t_run - t_enter:.1f} s", flush=True)
            write_event(spec["events"], submission=spec["submission"], state="done", attempt=attempt, **place)
            return out
        except BaseException as e:
            import traceback

            traceback.print_exc()
            write_event(spec["events"], submission=spec["submission"], state="failed", attempt=attempt,
                        error=f"{type(e).__name__}: {e}", **place)
            raise


def probe(seconds: float = 1.0) -> dict:
    """Where a task lands and what it sees (tests): host, pid, CUDA_VISIBLE_DEVICES, Ray's GPU ids."""
    import ray

    time.sleep(seconds)  # held long enough that tasks submitted together run together
    return {**worker_place(), "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


# ----------------------------------------------------------------------------------------------------- driver
def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(f"executor ray: Ray is not installed in this environment ({sys.executable}); "
                          f"{RAY_REMEDY}") from None
    return ray


def connect(**init_kwargs) -> bool:
    """Ray for this process: the running one (a test, a user's own ``ray.init``), else ``ray.init()``, which joins
    ``$RAY_ADDRESS`` or starts a private local instance. Returns whether this call started it (then the caller
    shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    init_kwargs.setdefault("logging_level", "WARNING")  # Ray's start-up lines stay out of the notebook
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, **init_kwargs)
    return True


def task_options(cfg: dict, gpus: float) -> dict:
    """A run's Ray task options from the profile: ``max_calls=1`` for GPU tasks (a fresh process per run frees its
    GPU memory), ``max_retries`` for lost workers and nodes, never for exceptions (a diverged run, a bug)."""
    return dict(num_cpus=cpus_per_run(cfg), num_gpus=gpus, max_retries=max_retries(cfg), retry_exceptions=False,
                max_calls=1 if gpus > 0 else 0)


def remote_for(cfg: dict, gpus: float, fn=None):
    """``fn`` (default ``run_task``) as a Ray task with ``task_options``."""
    return import_ray().remote(**task_options(cfg, gpus))(fn or run_task)


def load_result(out: str | Path) -> dict:
    """A run's result read back from its report folder (as ``run_recipe`` returns it, without the model): what
    ``check_runs`` and ``report.show_run`` use. ``meta["checkpoint"]`` is absolute."""
    import pandas as pd

    out = Path(out)
    meta = json.loads((out / "run.json").read_text())
    meta["checkpoint"] = str((out / meta["checkpoint"]).resolve())
    ids = {"image_id": str, "lesion_id": str}
    preds = {s: pd.read_csv(out / f"predictions_{s}.csv", dtype=ids) for s in ("val", "test")}
    # A fused twin may keep no history of its own: its network's (``image_run``) is the one it was trained with.
    history = next((pd.read_csv(f) for f in (out / "history.csv", out.parent / str(meta.get("image_run")) /
                                             "history.csv") if f.is_file()), pd.DataFrame())
    return dict(run=meta["run_name"], arch=meta["arch"], recipe=meta["recipe"], seed=meta["seed"], model=None,
                history=history, info=meta["info"], meta=meta, preds=preds,
                metrics=pd.read_csv(out / "metrics.csv"), threshold=meta.get("malignancy_threshold"), out=out,
                figures={n: out / f"{n}.png" for n in FIGURES if (out / f"{n}.png").exists()}, twin=None)


def _fmt_elapsed(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def status_rows(specs: list[dict], done: dict, failed: dict) -> list[dict]:
    """The live table's rows, from each run's events file (this submission's lines) and the finished tasks."""
    rows = []
    now = time.time()
    for spec in specs:
        ev = read_events(spec["events"], spec["submission"])
        starts = [e for e in ev if e["state"] == "start"]
        last_start = starts[-1] if starts else None
        epochs = [e for e in ev if e["state"] == "epoch"]
        state = "queued"
        if spec["folder"] in done:
            state = "done"
        elif spec["folder"] in failed:
            state = "failed"
        elif last_start:
            state = "running" if len(starts) == 1 else "retried"
        end = next((e["t"] for e in reversed(ev) if e["state"] in ("done", "failed")), None)
        elapsed = ((end if state in ("done", "failed") and end else now) - starts[0]["t"]) if starts else 0.0
        last = epochs[-1] if epochs else None
        place = "–"
        if last_start:
            place = last_start["host"] + (f" / GPU {last_start['gpus']}" if last_start.get("gpus") else
                                          f" / {spec['cpus']:g} CPU")
        score = last["score"] if last and last.get("score") is not None else None
        rows.append({"run": spec["run"], "state": state,
                     "epoch": f"{last['epoch']}/{spec['epochs']}" if last else f"–/{spec['epochs']}",
                     spec["select_metric"]: "–" if score is None else f"{score:.4f}",
                     "node / GPU": place, "attempt": len(starts) or "–", "elapsed": _fmt_elapsed(elapsed)})
    return rows


class LiveTable:
    """One table refreshed in place: an IPython display handle in a notebook (papermill keeps the last version in
    the saved notebook, so the rendered HTML shows it), else a line per change of state on stdout."""

    def __init__(self, enabled: bool):
        self.enabled, self.handle, self.seen = enabled, None, {}
        try:
            from IPython import get_ipython

            self.kernel = getattr(get_ipython(), "kernel", None) is not None
        except ImportError:
            self.kernel = False

    def update(self, rows: list[dict], final: bool = False):
        if not (self.enabled or final):
            return
        import pandas as pd

        df = pd.DataFrame(rows).set_index("run")
        if self.kernel:
            from IPython.display import display

            if self.handle is None:
                self.handle = display(df, display_id=True)
            else:
                self.handle.update(df)
            return
        for row in rows:
            sig = (row["state"], row["epoch"], row["attempt"])
            if self.seen.get(row["run"]) != sig or final:
                self.seen[row["run"]] = sig
                print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)


def submit(specs: list[dict], cfg: dict, progress: bool = True) -> tuple[dict, dict]:
    """Run ``specs`` on Ray, longest first; returns ({spec's folder: worker output}, stats). Raises the first run's
    error after every other run has finished (their checkpoints and reports are kept)."""
    ray = import_ray()
    t_init = time.time()
    started = connect()
    t_ready = time.time()
    try:
        gpus = gpus_per_run(cfg, ray.cluster_resources().get("GPU", 0.0))
        task = remote_for(cfg, gpus)
        submission = uuid.uuid4().hex[:12]
        for spec in specs:
            spec["submission"], spec["gpus"] = submission, gpus
            Path(spec["folder"]).mkdir(parents=True, exist_ok=True)
        order = sorted(specs, key=lambda s: -s["flops"])
        t_submit = time.time()
        refs = {task.remote(spec): spec for spec in order}
        table = LiveTable(progress)
        done, failed, got = {}, {}, {}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=REFRESH_SECONDS)
                for ref in ready:
                    spec = refs[ref]
                    try:
                        out = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - reported below, after the other runs
                        cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
                        failed[spec["folder"]] = cause
                        continue
                    got[spec["folder"]] = time.time()
                    if out["key"] != spec["key"]:
                        failed[spec["folder"]] = RunKeyMismatch(
                            f"{spec['run']}: the worker on {out['host']} returned run key {out['key']}, the driver "
                            f"expects {spec['key']}: other code, data or torch on that node")
                        continue
                    done[spec["folder"]] = out
                table.update(status_rows(specs, done, failed))
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        table.update(status_rows(specs, done, failed), final=True)
    finally:
        t_end = time.time()
        if started:
            ray.shutdown()
    stats = dict(ray_start_s=t_ready - t_init, started_ray=started, submitted=t_submit, got=got,
                 finished=t_end, gpus_per_run=gpus, order=[s["run"] for s in order])
    if failed:
        first = next(iter(failed.values()))
        if len(failed) > 1:
            print(f"{len(failed)} runs failed: " + "; ".join(f"{k}: {type(v).__name__}: {v}"[:300]
                                                            for k, v in failed.items()), file=sys.stderr)
        raise first
    return done, stats


def run_specs(specs: list[dict], cfg: dict, progress: bool = True) -> tuple[dict, dict]:
    """Submit ``specs`` and read every result back from disk: ({run_name: result}, stats) in the specs' order,
    each run followed by its fused twin when it has one."""
    done, stats = submit(specs, cfg, progress)
    results, read = {}, {}
    for spec in specs:
        t = time.time()
        for out in done[spec["folder"]]["reports"]:
            res = load_result(out)
            res["worker"] = done[spec["folder"]]
            results[res["run"]] = res
        read[spec["folder"]] = time.time() - t
    stats["read_s"] = read
    return results, stats


def run_model_ray(cfg: dict, arch: str, recipes, data: dict, progress: bool = True) -> dict:
    """``run_model`` with ``executor: ray``: ``{run_name: result}`` read back from disk."""
    specs = make_specs(cfg, arch, recipes, data)
    if not specs:
        return {}
    if progress:
        print(f"{len(specs)} run(s) of {arch} as Ray tasks, longest first; each run's output: "
              f"{Path(specs[0]['folder']).parent}/<run>-<key>/{LOG_NAME}", flush=True)
    results, _ = run_specs(specs, cfg, progress)
    return results


# ------------------------------------------------------------------------------------------------------- CLI
def queue(profile: str, data_dir=None, reports=None, progress: bool = True) -> dict:
    """Every model notebook's runs of ``profile`` at once, on one cluster: the split (as 01_etl writes it), then
    all runs of every model, longest first, in one submission. A later ``./run_all.sh PROFILE -p executor ray``
    (or a local one) then finds them finished and only loads and reports them."""
    import tempfile

    from . import experiment as E

    scratch = None
    if reports is None and not os.environ.get("HAM_REPORTS_DIR"):
        scratch = tempfile.mkdtemp(prefix="ham-queue-reports-")
        reports = scratch
    if reports:
        os.environ["HAM_REPORTS_DIR"] = str(Path(reports).resolve())
    cfg = config.load_profile(profile)
    data = E.prepare_data(cfg, data_dir)
    specs = [s for arch in cfg.get("models") or {} for s in make_specs(cfg, arch, config.model_recipes(cfg, arch),
                                                                       data)]
    print(f"queue: {len(specs)} run(s) of profile {cfg['name']} on Ray, longest first", flush=True)
    done, stats = submit(specs, cfg, progress)
    print(f"queue: {len(done)} run(s) finished in {stats['finished'] - stats['submitted']:.0f} s; checkpoints under "
          f"{Path(specs[0]['folder']).parent if specs else '-'}", flush=True)
    return done


def plan_table(profile: str, tflops: float, gpus=(1, 2, 4, 8), n_images: int = 10015, overhead: float = 60.0) -> str:
    """Markdown: the profile's runs with their FLOPs and minutes at ``tflops`` effective TFLOP/s per GPU plus
    ``overhead`` seconds per run (worker start, cache load, compiling, figures), then the makespan of
    longest-first scheduling on K GPUs against the bound max(longest run, sum/K)."""
    cfg = config.load_profile(profile)
    f = cfg.get("split_fractions") or (0.7, 0.15, 0.15)
    n_train = round(n_images * f[0])
    n_val = round(n_images * f[1])
    n_test = n_images - n_train - n_val
    if cfg.get("max_train_images"):
        n_train = min(n_train, int(cfg["max_train_images"]))
    rows, costs = [], []
    for arch in cfg.get("models") or {}:
        for name in config.model_recipes(cfg, arch):
            for seed in config.recipe_seeds(cfg, arch, name):
                r = config.recipe(cfg, arch, name, seed)
                fl = estimate_flops(r, n_train, n_val, n_test)
                costs.append(fl / (tflops * 1e12) + overhead)
                rows.append(f"| {r['run_name']} | {r['epochs']} | {fl / 1e15:.1f} | {costs[-1] / 60:.1f} |")
    total, longest = sum(costs), max(costs)
    lines = [f"Profile `{cfg['name']}`: {len(costs)} runs, {n_train} training / {n_val} validation / {n_test} test "
             f"images, at {tflops:g} effective TFLOP/s per GPU, plus {overhead:g} s per run.", "",
             "| run | epochs (max) | PFLOP | minutes |", "|---|---:|---:|---:|", *rows, "",
             "| GPUs | longest-first makespan (h) | bound max(longest, sum/K) (h) | speed-up |", "|---:|---:|---:|---:|"]
    for k in gpus:
        m = plan(costs, k)
        lines.append(f"| {k} | {m / 3600:.2f} | {max(longest, total / k) / 3600:.2f} | {plan(costs, 1) / m:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m helpers.runs")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="submit every model notebook's runs of a profile at once (one Ray cluster)")
    q.add_argument("profile")
    q.add_argument("--data-dir", default=None)
    q.add_argument("--reports", default=None, help="where the runs' reports go (default: a temporary folder)")
    pl = sub.add_parser("plan", help="a profile's makespan on K GPUs, on paper")
    pl.add_argument("profile")
    pl.add_argument("--tflops", type=float, default=60.0, help="effective training TFLOP/s per GPU")
    pl.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    pl.add_argument("--overhead", type=float, default=60.0, help="seconds per run beside its FLOPs")
    args = p.parse_args(argv)
    if args.command == "plan":
        print(plan_table(args.profile, args.tflops, args.gpus, overhead=args.overhead))
        return 0
    queue(args.profile, args.data_dir, args.reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
