"""Child processes that never outlive their parent, and temporary folders of dead owners.

On Linux `die_with_parent()` asks the kernel (`prctl(PR_SET_PDEATHSIG)`) to send this process
SIGTERM when its parent exits, however it exits (a SIGKILLed pipeline included); every node and
worker process the package starts calls it, directly or through `child_preexec()` as the
`preexec_fn` of `subprocess.Popen`. Elsewhere it does nothing.

A temporary folder owned by one run is named `<prefix><pid>_<random>` and holds an `owner`
file (`pid start-time`), so a later run can remove exactly the folders whose owner is gone,
even when the pid has since been reused. Standard library only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import select
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

_PR_SET_PDEATHSIG = 1
OWNER_FILE = 'owner'


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once at import so that a forked child never calls dlopen."""
    if not os.uname().sysname == 'Linux':
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent exits.

    `parent` is the pid that started this process: when it exited before the request took
    effect (this process was already re-parented), `sig` is sent at once. Returns whether the
    request is in place (False where prctl is not available).
    """
    if _PRCTL is None or _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def child_preexec(sig: int = signal.SIGTERM) -> Callable[[], object]:
    """A `preexec_fn` for `subprocess.Popen` that makes the child die with this process.

    The kernel ties the signal to the thread that starts the child: start children from a
    thread that outlives them (the caller's own, as the evaluation does).
    """
    return functools.partial(die_with_parent, sig, os.getpid())


def watch_process(pid: int, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to this process as soon as process `pid` exits (a daemon thread waits on a
    pidfd; without pidfd support it polls twice a second).

    For processes whose parent is not the one to outlive: a multiprocessing forkserver's
    workers watch the process that owns the pool, since the forkserver stays up as long as
    its workers do.
    """
    me = os.getpid()
    started = start_time(pid)

    def wait() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os.kill(me, sig)
            return
        except (AttributeError, OSError):
            while alive(pid, started):
                time.sleep(0.5)
            os.kill(me, sig)
            return
        try:
            select.select([fd], [], [])
        finally:
            os.close(fd)
        os.kill(me, sig)
    threading.Thread(target=wait, name=f'watch-{pid}', daemon=True).start()


# -- liveness and owned temporary folders --------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (comm)": state first; None when unknown."""
    try:
        stat = Path(f'/proc/{int(pid)}/stat').read_text()
    except (OSError, ValueError):
        return None
    return stat[stat.rfind(')') + 2:].split()


def start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), or None."""
    fields = _stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` runs (a zombie does not; given `started`, it must be the process
    started then, not a later one that reuses the pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if fields is None:
        return True   # no /proc: trust kill(0)
    if fields[0] in ('Z', 'X'):
        return False
    return started is None or len(fields) <= 19 or fields[19] == started


def owned_tempdir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A new temporary folder `<prefix><pid>_<random>` recording this process as its owner.

    The caller removes it; `remove_dead_owners(prefix)` removes it once its owner is gone.
    """
    folder = Path(tempfile.mkdtemp(prefix=f'{prefix}{os.getpid()}_', dir=parent))
    (folder / OWNER_FILE).write_text(f'{os.getpid()} {start_time(os.getpid()) or ""}\n')
    return folder


def remove_dead_owners(prefix: str, parent: str | os.PathLike | None = None) -> list[Path]:
    """Delete the `owned_tempdir(prefix)` folders whose owner process is gone; returns them.

    A folder without a readable owner file is judged by the pid in its name alone.
    """
    base = Path(tempfile.gettempdir() if parent is None else parent)
    pattern = re.compile(rf'^{re.escape(prefix)}(\d+)_')
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for folder in entries:
        match = pattern.match(folder.name)
        if not match or not folder.is_dir() or folder.is_symlink():
            continue
        pid, started = int(match.group(1)), None
        try:
            owner = (folder / OWNER_FILE).read_text().split()
            pid, started = int(owner[0]), (owner[1] if len(owner) > 1 else None)
        except (OSError, ValueError, IndexError):
            pass
        if alive(pid, started):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
