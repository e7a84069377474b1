"""What scale-out costs on one machine: ``python -m helpers.bench --executors``.

Four runs of the ``quick`` profile's recipe (ResNet-34 ``tuned``: 6 epochs, 3 at 32 px then 3 at 48 px; seeds
0-3), each cut to ``--max-train-images`` training images so the whole benchmark takes minutes, trained:

1. by the local executor (one after another, torch on ``--threads`` threads);
2. on a local Ray with 1 worker x 2 threads (``cpus_per_run: 2``);
3. on a local Ray with 2 workers x 1 thread (``cpus_per_run: 1``);
4. as 3., with one worker SIGKILLed half-way through an epoch of one run (Ray retries it; it resumes from its
   last checkpoint).

It prints a Markdown table: the makespan against the sum of the runs' own seconds (training alone, and the whole
``run_recipe``: training, evaluation, reports); per task the overheads (starting Ray, a worker's start until the
task runs plus its imports and decoded-image cache load, reading a result back from disk); and the seconds lost to
the killed worker. Data: ``--data-dir`` / ``$HAM10000_DIR``, else a generated dataset (``synthetic``). Nothing is
asserted about speed.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path


def _setup(base: Path, name: str, cfg, data_dir):
    from . import experiment as E

    os.environ["HAM_REPORTS_DIR"] = str(base / name / "reports")
    os.environ["HAM_MODELS_DIR"] = str(base / name / "models")
    return E.prepare_data(cfg, data_dir)


def run_local(cfg, data, arch, recipe, threads: int) -> dict:
    import torch

    from . import experiment as E

    torch.set_num_threads(threads)
    t0 = time.time()
    rows = []
    for seed in cfg["seeds"]:
        t = time.time()
        res = E.run_recipe(cfg, arch, recipe, data, seed, progress=False)
        rows.append(dict(train_s=res["info"]["train_seconds"], run_s=time.time() - t))
    return dict(makespan=time.time() - t0, train=sum(r["train_s"] for r in rows), run=sum(r["run_s"] for r in rows))


def _killer(spec: dict, at_epoch: int, stop: threading.Event, out: dict):
    """SIGKILL the worker running ``spec`` half an epoch after its epoch ``at_epoch`` ended (first attempt)."""
    from . import runs as R

    while not stop.is_set():
        sub = spec.get("submission")
        ev = R.read_events(spec["events"], sub) if sub else []
        ep = [e for e in ev if e["state"] == "epoch" and e["attempt"] == 1]
        if len(ep) >= at_epoch:
            start = next(e for e in ev if e["state"] == "start")
            per_epoch = (ep[at_epoch - 1]["t"] - start["t"]) / at_epoch
            time.sleep(max(0.5, per_epoch / 2))
            try:
                os.kill(ep[-1]["pid"], signal.SIGKILL)
                out.update(killed_pid=ep[-1]["pid"], at=time.time(), after_epoch=at_epoch)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.2)


def run_ray(cfg, data, arch, recipe, workers: int, threads: int, kill_epoch: int | None = None) -> dict:
    import ray

    from . import runs as R

    t0 = time.time()
    ray.init(num_cpus=workers * threads, num_gpus=0, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    t_ray = time.time() - t0
    cfg = {**cfg, "cpus_per_run": threads}
    specs = R.make_specs(cfg, arch, [recipe], data)
    kill = {}
    stop = threading.Event()
    if kill_epoch:
        victim = sorted(specs, key=lambda s: -s["flops"])[0]  # the first submitted
        threading.Thread(target=_killer, args=(victim, kill_epoch, stop, kill), daemon=True).start()
    try:
        results, stats = R.run_specs(specs, cfg, progress=False)
    finally:
        stop.set()
        ray.shutdown()
    makespan = time.time() - t0
    w = {s["run"]: results[s["run"]]["worker"] for s in specs}
    first = [x for x in w.values() if x["timings"]["enter"] - stats["submitted"] < 1 + min(
        y["timings"]["enter"] - stats["submitted"] for y in w.values())]
    per_run = {}
    for s in specs:
        ev = R.read_events(s["events"], s["submission"])
        per_run[s["run"]] = ev[-1]["t"] - next(e["t"] for e in ev if e["state"] == "start")
    return dict(makespan=makespan, ray_start=t_ray,
                train=sum(x["train_seconds"] for x in w.values()),
                run=sum(x["timings"]["run_s"] for x in w.values()),
                worker_start=statistics.mean(x["timings"]["enter"] - stats["submitted"] for x in first),
                import_s=statistics.mean(x["timings"]["import_s"] for x in first),
                cache_s=statistics.mean(x["timings"]["data_s"] for x in w.values()),
                read_s=statistics.mean(stats["read_s"].values()),
                attempts={k: x["attempt"] for k, x in w.items()}, per_run=per_run, kill=kill,
                threads={k: x["threads"] for k, x in w.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers.bench --executors", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="HAM10000 folder (default: $HAM10000_DIR, else generated)")
    p.add_argument("--max-train-images", type=int, default=128)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--kill-after-epoch", type=int, default=3, help="the killed run dies half an epoch later")
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    import torch

    from .config import load_profile

    base = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    data_dir = args.data_dir or os.environ.get("HAM10000_DIR")
    label = "HAM10000 (" + str(data_dir) + ")" if data_dir else "generated (helpers.synthetic, 30 lesions/class)"
    if not data_dir:
        from .synthetic import make_fake_ham10000

        data_dir = str(make_fake_ham10000(base / "data", lesions_per_class=30, seed=0, size=(64, 48),
                                          lowercase_copies=False))
    os.environ.setdefault("HAM_CACHE_DIR", str(base / "cache"))
    cfg = load_profile("quick", seeds=list(range(args.runs)), max_train_images=args.max_train_images, bootstrap=50,
                       gradcam_per_class=1)
    arch, recipe = "resnet34", "tuned"
    threads = min(2, os.cpu_count() or 1)
    load_at_start = os.getloadavg()[0]  # anything else running would be measured too
    rows = []
    print(f"bench executors: {args.runs} runs of quick's {arch}/{recipe}, <= {args.max_train_images} training "
          f"images, data {label}", file=sys.stderr, flush=True)
    data = _setup(base, "local", cfg, data_dir)
    n = {s: int((data["df"].split == s).sum()) for s in ("train", "val", "test")}
    print("  local ...", file=sys.stderr, flush=True)
    local = run_local(cfg, data, arch, recipe, threads)
    rows.append(("local", f"1 x {threads}", local))
    results = {}
    for name, workers, thr, kill in (("ray", 1, 2, None), ("ray", 2, 1, None), ("ray, 1 worker killed", 2, 1,
                                                                                  args.kill_after_epoch)):
        print(f"  {name} {workers} x {thr} ...", file=sys.stderr, flush=True)
        data = _setup(base, f"ray{workers}x{thr}{'k' if kill else ''}", cfg, data_dir)
        res = run_ray(cfg, data, arch, recipe, workers, thr, kill)
        results[(workers, thr, bool(kill))] = res
        rows.append((name, f"{workers} x {thr}", res))
    lines = [f"Executor benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node()}: "
             f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, load average {load_at_start:.1f} "
             f"at the start and {os.getloadavg()[0]:.1f} at the end (its own). {args.runs} runs of the quick profile's {arch}/{recipe} "
             f"(6 epochs: 3 at 32 px, 3 at 48 px), {min(n['train'], args.max_train_images)} training / {n['val']} "
             f"validation / {n['test']} test images each, data: {label}.", "",
             "| executor | workers x threads | makespan s | sum of runs' training s | sum of runs' own s "
             "(train + eval + reports) | makespan / own | Ray start s | worker start s | import s | cache load s "
             "| read back s/run | attempts |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, shape, r in rows:
        ray_cols = (f"{r['ray_start']:.1f} | {r['worker_start']:.1f} | {r['import_s']:.1f} | {r['cache_s']:.2f} | "
                    f"{r['read_s']:.2f} | {sum(r['attempts'].values())}") if "ray_start" in r else "– | – | – | – | – | 4"
        lines.append(f"| {name} | {shape} | {r['makespan']:.0f} | {r['train']:.0f} | {r['run']:.0f} | "
                     f"{r['makespan'] / r['run']:.2f} | {ray_cols} |")
    clean, killed = results[(2, 1, False)], results[(2, 1, True)]
    if killed["kill"]:
        victim = max(killed["attempts"], key=killed["attempts"].get)
        lost = killed["per_run"][victim] - clean["per_run"][victim]
        lines += ["", f"Killed worker: the worker of {victim} was SIGKILLed half an epoch after its epoch "
                      f"{killed['kill']['after_epoch']} ({killed['attempts'][victim]} attempts); that run took "
                      f"{lost:+.0f} s against the same run uninterrupted, and the makespan "
                      f"{killed['makespan'] - clean['makespan']:+.0f} s. The loss is the half epoch since the last "
                      f"checkpoint plus a new worker's start, imports and cache load."]
    else:
        lines += ["", "Killed worker: the run finished before the kill (raise --max-train-images)."]
    lines += ["", "Worker start: from submission to the task's first line in a worker (first wave of tasks); import: "
                  "helpers.experiment and torch in the task; cache load: the profile, split and decoded-image cache; "
                  "read back: the driver reading a run's reports from disk. Own seconds are each run's "
                  "run_recipe (after its cache load) summed over the runs."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
