"""The stage runner: cached, resumable, locked stages in one results folder.

A stage writes its outputs atomically, then its marker `stages/<stage>.json` (wall time,
outputs, the settings it used, a key and a run id). A stage is skipped when its marker
exists, the marker's key matches and every output exists. The key hashes the stage's settings
and the run ids of the stages it reads, so a stage that reruns (changed settings, lost output,
`force`) makes everything downstream of it rerun too. A run killed at any moment leaves no
marker for the stage it was in, so the next run resumes there. Stage names may hold a folder
(`seed_1/teacher`): its marker is then `stages/seed_1/teacher.json`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from vdd_ros.core.config import TrainConfig
from vdd_ros.core.io import write_json
from vdd_ros.errors import UserError
from vdd_ros.pipeline.config import PipelineConfig


def seed_dir(seed: int) -> str:
    """The folder of one training seed's models, evaluations and markers."""
    return f'seed_{seed}'


@dataclass
class Stage:
    """One cached step: `run(ctx)` writes `outputs` (paths relative to the task folder)."""

    name: str
    title: str
    deps: tuple[str, ...]
    outputs: list[str]
    settings: dict[str, Any]
    run: Callable[['Context'], dict[str, Any]]


@dataclass
class Context:
    """What every stage needs: the task, its folder, the settings and where to print."""

    task: str
    folder: Path
    cfg: PipelineConfig
    train: TrainConfig
    device: str = 'cpu'
    show_progress: bool = True
    log: Callable[[str], None] = print
    via_bags: bool = False
    nproc: int = 1                  # training stages on this many torchrun ranks
    dataset: dict[str, Any] | None = None   # a run on the user's dataset: `dataset_source`
    eval_split: str = 'test'        # evaluation seeds: 'test' (the report) or 'valid' (tuning)

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def modes(self) -> list[str]:
        """The task's behaviour modes (none on the user's dataset)."""
        if self.dataset is not None:
            return []
        from vdd_ros.sim.tasks import get_task
        return list(get_task(self.task).modes)

    def cameras(self) -> bool:
        """Whether the observation has cameras (the task's, or the imported dataset's keys)."""
        from vdd_ros.core.fields import is_camera
        if self.dataset is not None:
            return any(is_camera(k) for k in self.dataset.get('obs_keys') or [])
        from vdd_ros.sim.tasks import get_task
        return bool(get_task(self.task).cameras)

    @property
    def seeds(self) -> list[int]:
        """The training seeds: `cfg.seeds` consecutive ones from `train.seed`."""
        return list(range(self.train.seed, self.train.seed + self.cfg.seeds))

    def env(self) -> Any:
        """Where episodes run: the task, or the imported dataset's robosuite environment."""
        if self.dataset is None:
            return self.task
        from vdd_ros.sim.rollout import dataset_env
        return dataset_env(self.path('demos.hdf5'), self.cfg.horizon)


def marker_path(folder: Path, stage: str) -> Path:
    return folder / 'stages' / f'{stage}.json'


def read_marker(folder: Path, stage: str) -> dict[str, Any] | None:
    """A stage's marker, or None when it is missing or unreadable."""
    try:
        data = json.loads(marker_path(folder, stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def stage_key(settings: Mapping[str, Any], deps: Mapping[str, str]) -> str:
    """Hash of a stage's settings and the run ids of the stages it reads."""
    text = json.dumps({'settings': settings, 'deps': deps}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _decide(ctx: Context, stage: Stage, deps: dict[str, str], forced: bool
            ) -> tuple[bool, str]:
    """(run?, why) for one stage."""
    if forced:
        return True, 'forced'
    marker = read_marker(ctx.folder, stage.name)
    if marker is None:
        return True, 'not done yet'
    if marker.get('key') != stage_key(stage.settings, deps):
        settings = json.loads(json.dumps(stage.settings, default=str))
        if marker.get('settings') != settings:
            return True, 'settings changed'
        changed = [d for d, run_id in deps.items() if (marker.get('deps') or {}).get(d) != run_id]
        return True, f'input rerun ({", ".join(changed) or "?"})'
    missing = [o for o in stage.outputs if not ctx.path(o).exists()]
    if missing:
        return True, f'output missing ({missing[0]})'
    return False, f'done {marker.get("finished", "?")}, {marker.get("wall_s", 0):.1f} s'


def run_stages(ctx: Context, stages: list[Stage], force: bool = False,
               rerun_from: str | None = None) -> list[str]:
    """Run (or skip) `stages` in order; returns the names of those that ran.

    `rerun_from` names a stage (or, for per-seed stages, its name after the folder, e.g.
    `teacher` for every `seed_<k>/teacher`) that reruns even when cached.
    """
    log = ctx.log
    ran: list[str] = []
    for index, stage in enumerate(stages, 1):
        deps = {}
        for dep in stage.deps:
            marker = read_marker(ctx.folder, dep)
            if marker is None:  # only when a dependency's marker vanished during this run
                raise UserError(f'stage {stage.name}: input stage {dep} has no marker')
            deps[dep] = marker['run_id']
        forced = force or rerun_from in (stage.name, stage.name.rpartition('/')[2])
        run, why = _decide(ctx, stage, deps, forced)
        log(f'== [{index}/{len(stages)}] {stage.name}: {stage.title} -- '
            f'{"run" if run else "skip"} ({why})')
        if not run:
            continue
        marker_path(ctx.folder, stage.name).unlink(missing_ok=True)
        t0 = time.monotonic()
        try:
            info = stage.run(ctx)
        except UserError as exc:
            raise UserError(f'stage {stage.name} failed: {exc}') from None
        except KeyboardInterrupt:
            log(f'stage {stage.name} interrupted; finished stages are kept, rerun to resume')
            raise
        wall = time.monotonic() - t0
        missing = [o for o in stage.outputs if not ctx.path(o).exists()]
        if missing:
            raise UserError(f'stage {stage.name} did not write {missing[0]}')
        write_json(marker_path(ctx.folder, stage.name), {
            'stage': stage.name, 'key': stage_key(stage.settings, deps),
            'run_id': uuid.uuid4().hex, 'deps': deps,
            'settings': json.loads(json.dumps(stage.settings, default=str)),
            'outputs': stage.outputs, 'wall_s': wall,
            'finished': datetime.now(timezone.utc).astimezone().isoformat(timespec='seconds'),
            'info': info})
        ran.append(stage.name)
        log(f'   {stage.name} done in {wall:.1f} s')
    return ran


def check_stage_name(name: str | None, stages: list[Stage]) -> None:
    """One UserError when `name` (a `--from` argument) names no stage."""
    names = [s.name for s in stages]
    if name is not None and name not in names + [n.rpartition('/')[2] for n in names]:
        short = dict.fromkeys(n.rpartition('/')[2] for n in names)
        raise UserError(f'unknown stage {name!r} (stages: {", ".join(short)})')


def results_root(results: str | os.PathLike, via_bags: bool = False) -> Path:
    """Where a run's task folders go: `<results>`, or `<results>/via_bags` for via-bags runs."""
    return Path(results) / 'via_bags' if via_bags else Path(results)


@contextlib.contextmanager
def task_lock(folder: Path) -> Iterator[None]:
    """Hold `<folder>/.lock` for the run: one run per task folder.

    The lock is an exclusive `flock` on the file, held while the file stays open, so the
    kernel releases it when the holder dies however it dies (no stale lock to take over).
    The file holds the holder's process id for the error message. A contender that locked
    a file the holder unlinked while leaving retries on the path's current file.
    """
    lock = folder / '.lock'
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or '?'
            os.close(fd)
            raise UserError(f'{folder}: another pipeline run (process {holder}) is working '
                            f'here; wait for it to finish') from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)   # the file was unlinked by a holder that just left: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)   # while still locked, so no one locks a dead file
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files and folders (`.name.tmp...`, `.name.old-...`) that a killed
    run left behind; under the task lock nothing else is writing them."""
    stale = [p for p in folder.rglob('.*') if p.name != '.lock'
             and ('.tmp' in p.name or '.old-' in p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
