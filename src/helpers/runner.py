"""run_all.sh's Python side: choose and check (``preflight``), stage, run the notebooks, publish.

``./run_all.sh [PROFILE] [-p NAME VALUE ...]`` sets up the environment and then runs ``python -m helpers.runner``
with the same arguments. In order:

1. ``preflight.prepare`` chooses the profile, checks in seconds what would fail minutes later, and estimates the
   duration; a failure prints its message alone (its last line names the folder and the remedy) and writes
   nothing.
2. A staging folder ``<reports>/_partial/<profile>-<time>/`` is made; the notebooks write there.
3. Each of ``notebooks/0*.ipynb`` runs through papermill's Python API (``papermill.execute_notebook``) with the
   parameters as a dict, in ``notebooks/`` and headless; its output notebook is rendered to HTML. A failing cell
   raises ``PapermillExecutionError``, which names it: the run stops, names the notebook, cell and exception, and
   leaves the reports as they were.
4. When all passed: ``index.html`` is written and the staged reports replace the old ones (``benchmark*``,
   ``_partial/`` and dot-files stay); superseded checkpoint folders are listed (deleted with ``PRUNE=1``).

``FRESH=1`` drops the profile's checkpoints first. Only folders the runner made (a ``.made-by-run_all`` file) or the
checkout's own reports/ are ever replaced.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from . import config
from .config import COMMITTED_PROFILE, project_root
from .preflight import MARKER, _kept

MARKER_TEXT = ("This folder was made by run_all.sh, which may replace its contents (except _partial/, benchmark* "
               "and dot-files)\non the next successful run. It refuses to replace a non-empty folder without this "
               "file.\n")
KEEP_PARTIALS = 5  # failed runs' staging folders kept under <reports>/_partial/
TAG = "[run_all]"


class RunnerError(Exception):
    """Reports that cannot be published. ``what``: what is wrong (may span lines); ``fix``: one line naming the
    folder or file and the remedy, printed last."""

    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv) -> argparse.Namespace:
    """``[PROFILE] [-p NAME VALUE]... [-r NAME VALUE]...``: papermill's parameter options. ``-p`` values are typed
    as papermill's own command line types them (``True``, ``None``, numbers), ``-r`` values stay strings."""
    p = argparse.ArgumentParser(prog="./run_all.sh", add_help=False)
    p.add_argument("profile", nargs="?")
    p.add_argument("-p", "--parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("-r", "--parameters_raw", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = p.parse_args(argv)
    if args.parameters:  # papermill's own typing of -p values, so both entry points agree (a 3 s import: only then)
        from papermill.cli import _resolve_type
    args.params = {name: _resolve_type(value) for name, value in args.parameters}
    args.params.update(dict(args.parameters_raw))
    return args


# ----------------------------------------------------------------------------------------- output folders
def mark(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).exists():
        (folder / MARKER).write_text(MARKER_TEXT)


def make_stage(target: Path, profile: str) -> Path:
    """A new staging folder ``<target>/_partial/<profile>-<time>/`` (marked), pruning old failed runs' ones."""
    mark(target)
    partial = target / "_partial"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stage = partial / f"{profile}-{stamp}"
    n = 1
    while stage.exists():
        n += 1
        stage = partial / f"{profile}-{stamp}-{n}"
    mark(stage)
    old = sorted((p for p in partial.iterdir() if p != stage and (p / MARKER).exists()),
                 key=lambda p: p.stat().st_mtime)
    for p in old[:-KEEP_PARTIALS] if len(old) > KEEP_PARTIALS else []:
        shutil.rmtree(p, ignore_errors=True)
    return stage


def publish(stage: Path, target: Path) -> None:
    """Replace ``target``'s reports with ``stage``'s (both marked): the previous entries move aside, the new ones
    move in (renames on one file system), then the previous ones are deleted. ``_partial/``, ``benchmark*``,
    dot-files (and other profiles' folders in the checkout's reports) stay."""
    stage, target = Path(stage), Path(target)
    for folder in (stage, target):
        if not (folder / MARKER).exists():
            raise RunnerError(f"{folder} lost its {MARKER} marker during the run; nothing was replaced.",
                              f"{folder}: the new reports are in {stage}; move them by hand.")
    previous = stage.parent / f"{stage.name}-previous"
    previous.mkdir()
    (previous / MARKER).write_text(MARKER_TEXT)
    for p in list(target.iterdir()):
        if not _kept(p.name, target):
            os.replace(p, previous / p.name)
    for p in list(stage.iterdir()):
        if p.name != MARKER:
            os.replace(p, target / p.name)
    shutil.rmtree(previous)
    shutil.rmtree(stage)


def updates_readme(profile: str, target: Path) -> bool:
    """README's results block is rewritten only by a run of the committed profile into the checkout's reports/."""
    return profile == COMMITTED_PROFILE and Path(target).resolve() == project_root().resolve() / "reports"


# ------------------------------------------------------------------------------------------------ failures
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def failure_lines(err, source_nb: Path, name: str) -> list[str]:
    """Where a notebook failed, from papermill's ``PapermillExecutionError``: the notebook, the cell (its number in
    the source notebook, from 1, and its first line) and the exception's type and message."""
    import nbformat

    # papermill injects one cell of parameters after the cell tagged ``parameters``; cells after it shift by one
    cells = nbformat.read(source_nb, as_version=4).cells
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    number = err.cell_index + (0 if tagged and err.cell_index > tagged[0] else 1)
    first = next((ln.strip() for ln in str(err.source).splitlines() if ln.strip()), "")
    first = first if len(first) <= 70 else first[:67] + "..."
    message = _ANSI.sub("", str(err.evalue)).strip().splitlines() or [""]
    return ([f"{TAG} FAILED in {name}, cell {number} ({first}): {err.ename}: {message[0]}"]
            + [f"{TAG}   {ln}" for ln in message[1:12]])


# ---------------------------------------------------------------------------------------------- the run
def run_notebook(nb: Path, out: Path, params: dict, logs: Path) -> None:
    """One notebook through papermill, in notebooks/, its output streams and papermill's log in ``logs``."""
    import papermill as pm

    handler = logging.FileHandler(logs / f"{nb.stem}.papermill.log")
    logger = logging.getLogger("papermill")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    try:
        with open(logs / f"{nb.stem}.log", "w") as stdout, open(logs / f"{nb.stem}.stderr.log", "w") as stderr:
            # The kernel process inherits file descriptor 2: its own warnings go to papermill's log, not the terminal.
            os.dup2(handler.stream.fileno(), 2)
            pm.execute_notebook(nb, out, parameters=params, kernel_name="python3", cwd=project_root() / "notebooks",
                                progress_bar=False, stdout_file=stdout, stderr_file=stderr)
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        logger.removeHandler(handler)
        handler.close()


def run(argv=None) -> int:
    """The whole of ``./run_all.sh``: 0 when every notebook passed and the reports were replaced, 1 when a notebook
    failed (the reports unchanged), 2 when the run could not start, 130 when interrupted."""
    from . import preflight

    try:
        args = parse_args(argv)
    except SystemExit:
        return 2
    try:
        plan = preflight.prepare(args.profile, args.params)
    except preflight.PreflightError as e:
        print("\n".join(f"{TAG} {line}" for line in [*e.what.splitlines(), e.fix]), flush=True)
        return 2
    for line in plan.lines:
        print(f"{TAG} {line}", flush=True)
    from . import pages  # heavy (pandas, matplotlib, scikit-learn): only once the run can start
    stage = make_stage(plan.target, plan.profile)
    if os.environ.get("FRESH"):
        models = config.output_dirs(create=False)["models"] / plan.profile
        print(f"{TAG} FRESH: removing checkpoints {models}")
        shutil.rmtree(models, ignore_errors=True)
    # The notebooks write into the stage; the training loop prints a per-epoch table instead of live bars.
    os.environ.update(HAM_REPORTS_DIR=str(stage), HAM_PROFILE=plan.profile, HAM_HEADLESS="1",
                      HAM_UPDATE_README="1" if updates_readme(plan.profile, plan.target) else "0")
    logs = stage / "notebooks"
    logs.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill ends the run as Ctrl-C does, with its message
    timings = ["notebook,profile,seconds,status"]
    print(f"{TAG} writing to {stage} (replaces {plan.target} when every notebook passed)", flush=True)
    folder = Path(os.environ.get("HAM_RUN_NOTEBOOKS") or project_root() / "notebooks")  # tests: tiny notebooks
    try:
        for nb in sorted(folder.glob("0*.ipynb")):
            out = logs / nb.name
            print(f"{TAG} {nb.stem} (follow: tail -f {logs / (nb.stem + '.log')})", flush=True)
            start, failure = time.time(), None
            try:
                run_notebook(nb, out, dict(args.params, profile=plan.profile), logs)
            except Exception as e:  # a cell raised (PapermillExecutionError), or the kernel died
                failure = e
            timings.append(f"{nb.stem},{plan.profile},{round(time.time() - start)},{'failed' if failure else 'ok'}")
            (stage / "timings.csv").write_text("\n".join(timings) + "\n")
            if out.exists():
                try:
                    pages.render_notebook(out)
                except Exception as e:  # a rendering problem must not hide the notebook's own result
                    print(f"{TAG} could not render {out.name} to HTML: {type(e).__name__}: {e}")
            if failure is not None:
                return _report_failure(failure, nb, out, plan.target, stage, logs)
    except KeyboardInterrupt:
        print(f"\n{TAG} interrupted; {plan.target} unchanged, partial output in {stage}")
        return 130
    for f in [*logs.glob("*.ipynb"), *logs.glob("*.log")]:  # the HTML renderings hold the same outputs
        f.unlink()
    pages.write_index(stage)
    try:
        publish(stage, plan.target)
    except RunnerError as e:
        print(f"{TAG} {e.what}\n{TAG} {e.fix}")
        return 1
    print(f"{TAG} done: {plan.target / 'index.html'}")
    rows = [line.split(",") for line in timings]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    _list_superseded(plan.profile, delete=bool(os.environ.get("PRUNE")))
    return 0


def _report_failure(err, nb: Path, out: Path, target: Path, stage: Path, logs: Path) -> int:
    from papermill.exceptions import PapermillExecutionError

    print(f"{TAG} {target} is unchanged; this run's partial output stays in {stage}")
    print(f"{TAG} traceback and outputs: {out} (and .html); papermill's log: {logs / (nb.stem + '.papermill.log')}")
    if isinstance(err, PapermillExecutionError):
        print("\n".join(failure_lines(err, nb, f"notebooks/{nb.name}")))
    else:
        print(f"{TAG} FAILED in notebooks/{nb.name} without a Python exception in a cell (kernel died? out of "
              f"memory?): {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
    return 1


def _list_superseded(profile: str, delete: bool) -> None:
    """Checkpoint folders that a newer run of the same name replaced (a changed recipe or training code): listed,
    or deleted with PRUNE=1. The current runs' folders are never touched."""
    import contextlib
    import io

    from .experiment import main as experiment_main

    listed = io.StringIO()
    with contextlib.redirect_stdout(listed):
        experiment_main(["prune", profile] + (["--delete"] if delete else []))
    for line in listed.getvalue().splitlines():
        print(f"{TAG} {line}")


if __name__ == "__main__":
    sys.exit(run())
