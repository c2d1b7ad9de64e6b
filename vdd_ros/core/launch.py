"""Training jobs on several processes: torchrun started as a subprocess, progress from rank 0.

The parent (`torchrun_job`, used by the pipeline's `--nproc` and the training nodes' `nproc`)
runs `torchrun --standalone --nproc-per-node N -m vdd_ros.core.launch SPEC`; every rank runs the
job of SPEC (distributed.py), and rank 0 prints one JSON line per progress report and a last
line with the checkpoint or the error, each after PREFIX, on stdout. Other stdout lines go to
`log`; stderr (the progress bar, torchrun's own messages) is the parent's. Setting `stop`
creates the spec's stop file, which the ranks watch: they agree to stop after the iteration,
rank 0 saves, the training state stays for `resume`, and torchrun exits 0. A rank also stops on
SIGINT or SIGTERM (torchrun forwards the one it receives, e.g. Ctrl-C).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from vdd_ros.core.progress import DivergenceError, Progress, ProgressCallback
from vdd_ros.errors import UserError

PREFIX = '@vdd_ros '
METHODS = ('teacher', 'vdd_moe', 'gaussian_bc', 'em_moe', 'consistency')


def run_training(method: str, dataset: str | os.PathLike, out: str | os.PathLike, *,
                 teacher: str | os.PathLike | None = None, **kwargs: Any) -> Path:
    """Run the job of `method` (one of METHODS) in this process (one rank under torchrun)."""
    from vdd_ros.core.jobs import (baseline_job, consistency_job, distill_job,
                                   train_teacher_job)
    if method == 'teacher':
        return train_teacher_job(dataset, out, **kwargs)
    if method in ('vdd_moe', 'consistency'):
        if teacher is None:
            raise UserError(f'{method}: needs a teacher checkpoint')
        job = distill_job if method == 'vdd_moe' else consistency_job
        return job(teacher, dataset, out, **kwargs)
    if method in METHODS:
        return baseline_job(method, dataset, out, **kwargs)
    raise UserError(f'training method {method!r}: expected one of {", ".join(METHODS)}')


def torchrun_command(nproc: int, spec: Mapping[str, Any]) -> list[str]:
    """The torchrun command line that runs `spec` on `nproc` local ranks."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node',
            str(int(nproc)), '-m', 'vdd_ros.core.launch', json.dumps(dict(spec))]


def torchrun_job(method: str, dataset: str | os.PathLike, out: str | os.PathLike, nproc: int,
                 *, teacher: str | os.PathLike | None = None,
                 config: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
                 progress: ProgressCallback | None = None, stop: threading.Event | None = None,
                 show_bar: bool = True, checkpoint_every: int = 1000, resume: bool = False,
                 threads: int = 1, log: Callable[[str], None] | None = None) -> Path:
    """Run `run_training(method, ...)` on `nproc` local ranks under torchrun; returns the
    checkpoint folder (also when stopped). A failed job raises UserError with its message."""
    if int(nproc) < 1:
        raise UserError(f'nproc: must be >= 1, got {nproc}')
    tmp = Path(tempfile.mkdtemp(prefix='vdd_ros-torchrun-'))
    spec = {'method': method, 'dataset': str(dataset), 'out': str(out),
            'teacher': None if teacher is None else str(teacher),
            'config': None if config is None else str(config),
            'overrides': dict(overrides or {}), 'device': device, 'show_bar': show_bar,
            'checkpoint_every': checkpoint_every, 'resume': resume, 'threads': threads,
            'stop_file': str(tmp / 'stop')}
    result: dict[str, Any] = {}
    try:
        proc = subprocess.Popen(torchrun_command(nproc, spec), stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        threading.Thread(target=_stop_on, args=(stop, proc, tmp / 'stop'), daemon=True).start()
        try:
            for line in proc.stdout:
                line = line.rstrip('\n')
                if not line.startswith(PREFIX):
                    if log is not None:
                        log(line)
                    continue
                message = json.loads(line[len(PREFIX):])
                if 'progress' in message and progress is not None:
                    progress(Progress(**message['progress']))
                result.update({k: v for k, v in message.items() if k != 'progress'})
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if 'error' in result:
        raise UserError(result['error'])
    if 'checkpoint' not in result:
        raise UserError(f'{method}: torchrun with {nproc} ranks ended (status {code}) without '
                        f'a checkpoint; see its messages above')
    return Path(result['checkpoint'])


def _stop_on(stop: threading.Event | None, proc: subprocess.Popen, stop_file: Path) -> None:
    """Create the ranks' stop file once `stop` is set."""
    while stop is not None and proc.poll() is None:
        if stop.wait(0.1):
            stop_file.touch()
            return


def _watch(stop_file: str, stop: threading.Event) -> None:
    """In a rank: set `stop` once the parent created the stop file."""
    while not stop.wait(0.2):
        if os.path.exists(stop_file):
            stop.set()


def main(argv: list[str] | None = None) -> int:
    """One rank of `torchrun_job`: run the job of the JSON spec in argv[0]."""
    import torch

    from vdd_ros.core.distributed import rank_from_env
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    if spec.get('threads', 1) > 0:
        torch.set_num_threads(int(spec.get('threads', 1)))
    is_main = rank_from_env() == 0
    stop = threading.Event()

    def emit(message: dict[str, Any]) -> None:
        if is_main:
            print(PREFIX + json.dumps(message), flush=True)

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if spec.get('stop_file'):
        threading.Thread(target=_watch, args=(spec['stop_file'], stop), daemon=True).start()
    kwargs = {k: spec[k] for k in ('config', 'overrides', 'device', 'show_bar',
                                   'checkpoint_every', 'resume')}
    try:
        path = run_training(spec['method'], spec['dataset'], spec['out'],
                            teacher=spec.get('teacher'), stop=stop,
                            progress=lambda p: emit({'progress': dataclasses.asdict(p)}),
                            **kwargs)
    except UserError as exc:
        emit({'error': str(exc)})
        return 2
    except DivergenceError as exc:
        emit({'error': f'training diverged: {exc}'})
        return 2
    emit({'checkpoint': str(path), 'stopped': stop.is_set()})
    return 0


if __name__ == '__main__':
    sys.exit(main())
