"""Atomic file output: write to a temporary sibling, then rename over the target.

Files get the normal permissions (0666 less the umask). `check_writable` finds an output
location that cannot be written before any work is done, as one line.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from vdd_ros.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, else is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}{path.suffix}'
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + '\n')


def check_writable(path: str | os.PathLike, what: str = 'output', folder: bool = False,
                   create_parents: bool = True) -> Path:
    """Raise UserError (one line, naming `what` and `path`) unless `path` can be written.

    `path` is a file, or with `folder` a folder (an existing one is replaced). Missing parent
    folders are allowed with `create_parents`. Writability is tested by creating and removing
    a file in the nearest existing folder, so it holds for root and read-only mounts alike.
    """
    path = Path(path)
    where = f'{what} {path}'
    if path.is_dir() and not folder:
        raise UserError(f'{where}: is a folder, expected a file name')
    if path.exists() and not path.is_dir() and folder:
        raise UserError(f'{where}: is a file, expected a folder')
    base = path.parent
    while not base.exists() and base != base.parent:
        if not create_parents:
            raise UserError(f'{where}: folder {path.parent} does not exist')
        base = base.parent
    if not base.is_dir():
        raise UserError(f'{where}: cannot be written under {base}, which is a file')
    try:
        fd, probe = tempfile.mkstemp(prefix='.vdd_ros-write-check-', dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f'{where}: cannot write in folder {base} ({exc.strerror or exc})') \
            from None
    return path


def package_config(relative: str) -> Path | None:
    """`config/<relative>` of the source tree, else of the installed package's share
    (found through AMENT_PREFIX_PATH); None when neither exists."""
    here = Path(__file__).resolve().parents[2] / 'config' / relative
    if here.exists():
        return here
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        shared = Path(prefix) / 'share' / 'vdd_ros' / 'config' / relative
        if prefix and shared.exists():
            return shared
    return None
