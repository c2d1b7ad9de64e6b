"""No child outlives its parent: a SIGKILLed `vdd-ros evaluate --via-ros` leaves no node
running, and the next run removes the temporary folder the killed one left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vdd_ros.core import process
from vdd_ros.ros.evaluation import TEMP_PREFIX

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(process._PRCTL is None, reason='needs Linux prctl')


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            started = process.start_time(child)
            if started is not None:
                out[child] = started
                todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode()
    except OSError:
        return ''


def test_nodes_die_with_a_sigkilled_ros_evaluation(tmp_path):
    env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}',
               TMPDIR=str(tmp_path))
    parent = subprocess.Popen(
        [sys.executable, '-m', 'vdd_ros.cli', 'evaluate', '--policy', 'scripted', '--task',
         'lift_carry', '--episodes', '20', '--via-ros', '--quiet'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        nodes: dict[int, str] = {}
        while time.monotonic() < deadline:   # both nodes up and stepping episodes
            assert parent.poll() is None, 'the evaluation ended before it was killed'
            nodes = {p: s for p, s in _descendants(parent.pid).items()
                     if 'vdd_ros.ros.' in _cmdline(p)}
            folders = list(tmp_path.glob(f'{TEMP_PREFIX}{parent.pid}_*'))
            if len(nodes) == 2 and folders and (folders[0] / 'results.json').exists():
                break
            time.sleep(0.2)
        assert len(nodes) == 2, 'the nodes did not start'
        family = _descendants(parent.pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    time.sleep(5.0)
    survivors = [p for p, s in family.items() if process.alive(p, s)]
    print(f'nodes alive 5 s after SIGKILL of the parent: '
          f'{len([p for p in survivors if p in nodes])} of {len(nodes)} '
          f'(all descendants: {len(survivors)} of {len(family)})')
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []
    # the killed run's folder is left; the next run's clean-up removes it and nothing else
    left = list(tmp_path.glob(f'{TEMP_PREFIX}{parent.pid}_*'))
    assert len(left) == 1
    mine = process.owned_tempdir(TEMP_PREFIX, tmp_path)
    assert process.remove_dead_owners(TEMP_PREFIX, tmp_path) == left
    assert sorted(tmp_path.iterdir()) == [mine]


def test_only_folders_of_dead_owners_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / f'{TEMP_PREFIX}{dead.pid}_abc'
    stale.mkdir()
    (stale / process.OWNER_FILE).write_text(f'{dead.pid} 1\n')
    unnamed = tmp_path / f'{TEMP_PREFIX}{dead.pid}_nofile'   # owner file not written yet
    unnamed.mkdir()
    live_parent = tmp_path / f'{TEMP_PREFIX}{os.getppid()}_x'
    live_parent.mkdir()
    # a reused pid: the live process started at another time than the folder's owner
    reused = tmp_path / f'{TEMP_PREFIX}{os.getpid()}_old'
    reused.mkdir()
    (reused / process.OWNER_FILE).write_text(f'{os.getpid()} 1\n')
    mine = process.owned_tempdir(TEMP_PREFIX, tmp_path)
    other = tmp_path / 'vdd_ros_other_1_x'
    other.mkdir()
    removed = process.remove_dead_owners(TEMP_PREFIX, tmp_path)
    assert sorted(removed) == sorted([stale, unnamed, reused])
    assert sorted(tmp_path.iterdir()) == sorted([live_parent, mine, other])
    assert tempfile.gettempdir()  # the default location is the system's temporary folder


def test_a_child_started_with_child_preexec_gets_sigterm_when_its_parent_dies(tmp_path):
    """The parent (a shell-less python) starts a sleeping child, then is SIGKILLed."""
    code = ('import subprocess, sys, time\n'
            'from vdd_ros.core.process import child_preexec\n'
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            ' preexec_fn=child_preexec())\n'
            'print(c.pid, flush=True)\n'
            'time.sleep(60)\n')
    env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    parent = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    started = process.start_time(child)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while process.alive(child, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = process.alive(child, started)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


def test_a_worker_watching_its_owner_gets_sigterm_when_the_owner_dies():
    """Pool workers watch the process that owns the pool (their parent is the forkserver)."""
    owner = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    code = ('import sys, time\n'
            'from vdd_ros.core.process import watch_process\n'
            'watch_process(int(sys.argv[1]))\n'
            "print('watching', flush=True)\n"
            'while True:\n    sum(range(1000))\n')
    env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    worker = subprocess.Popen([sys.executable, '-c', code, str(owner.pid)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == 'watching'
        time.sleep(0.3)
        assert worker.poll() is None          # busy while its owner lives
        owner.kill()
        owner.wait()
        assert worker.wait(timeout=5) == -signal.SIGTERM
    finally:
        for proc in (owner, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        worker.stdout.close()
