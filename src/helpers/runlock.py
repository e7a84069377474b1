"""One writer per run: an exclusive OS file lock on each checkpoint folder (``models/<profile>/<run>-<key>/``).

``experiment.train_or_load`` takes the lock before it trains or resumes a run and keeps it until the run's
``model.pt`` is written (``run_recipe`` writes it after evaluation) or the process moves on to another run; the OS
releases it when the process dies, however it dies (a SIGKILLed Ray worker, a closed notebook), so a lost holder
never leaves a stale lock behind. A second claimant (a retried Ray task racing a worker that was only presumed
dead, or a second ``./run_all.sh`` in the same checkout) waits: as soon as ``model.pt`` appears it loads the
finished run, and if the holder dies first it takes the lock and resumes from ``last.pt``. With a timeout
(``HAM_LOCK_TIMEOUT`` seconds) it stops instead, naming the holder's host and pid. It never trains beside it.

The lock is ``fcntl.flock`` on ``<run folder>/.lock``, which holds the holder's host, pid and start time. On NFS
(v4) Linux maps ``flock`` onto byte-range locks, which the server arbitrates across machines; Lustre needs the
``flock`` mount option. Only the standard library is used (no Ray).
"""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"
POLL_SECONDS = 0.5

_held: dict[Path, int] = {}  # run folder -> open file descriptor holding its lock, in this process


class RunLocked(RuntimeError):
    """Another process holds a run's lock and the wait timed out."""


def lock_timeout() -> float | None:
    """``HAM_LOCK_TIMEOUT`` in seconds (0: stop at once); unset or empty: wait as long as the holder lives."""
    value = os.environ.get("HAM_LOCK_TIMEOUT", "").strip()
    return float(value) if value else None


def holder(folder: Path) -> dict:
    """Who holds (or last held) the lock of ``folder``: {host, pid, since}, or {} when nobody wrote it."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    return (f"host {info.get('host', '?')} pid {info.get('pid', '?')} (since {info.get('since', '?')})"
            if info else "another process (it has not written its host and pid yet)")


def try_lock(folder: Path) -> bool:
    """Take ``folder``'s lock without waiting; True when this process holds it (now or already)."""
    import fcntl

    folder = Path(folder)
    if folder in _held:
        return True
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except BaseException:
        os.close(fd)
        raise
    info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _held[folder] = fd
    return True


def release(folder: Path) -> None:
    """Release ``folder``'s lock if this process holds it (closing the descriptor releases a flock)."""
    fd = _held.pop(Path(folder), None)
    if fd is not None:
        os.close(fd)


def release_all(except_folder: Path | None = None) -> None:
    """Release every lock this process holds (but ``except_folder``'s): a process that moves on to another run
    is no longer writing the earlier one."""
    for folder in list(_held):
        if folder != except_folder:
            release(folder)


def claim(folder: Path, finished: Path, timeout: float | None = None, say=print) -> bool:
    """Hold ``folder``'s lock so this process may train the run, or wait for the holder to finish.

    Returns True when this process holds the lock (train or resume), False when ``finished`` (the run's
    ``model.pt``) appeared while waiting (load it). With ``timeout`` seconds (default ``HAM_LOCK_TIMEOUT``) it
    raises RunLocked naming the holder instead of waiting longer. Processes without ``fcntl`` (Windows) do not
    lock.
    """
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not on this project's platforms
        return True
    folder, finished = Path(folder), Path(finished)
    timeout = lock_timeout() if timeout is None else timeout
    start, told = time.monotonic(), False
    while True:
        if try_lock(folder):
            if finished.exists():  # the holder finished between our look and our lock
                release(folder)
                return False
            return True
        if finished.exists():
            return False
        info = holder(folder)
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise RunLocked(f"{folder.name} is being trained by {describe(info)}; waited {waited:.0f} s "
                            f"(HAM_LOCK_TIMEOUT={timeout:g}). Wait for it to finish (this run then loads its "
                            f"result), or stop that process; its lock is {folder / LOCK_FILE}.")
        if not told:
            say(f"{folder.name}: waiting for {describe(info)}, which is training this run; it is loaded when "
                f"finished (HAM_LOCK_TIMEOUT=SECONDS stops waiting instead)", flush=True)
            told = True
        time.sleep(POLL_SECONDS)
