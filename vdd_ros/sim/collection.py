"""Scripted demonstration collection into a robomimic-style HDF5 file.

Seeds run `seed, seed + 1, ...` in rounds: each round asks for as many new episodes as
demonstrations are still missing, failed episodes are discarded, and the kept ones are the
first successes in seed order, so the file does not depend on the number of workers.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vdd_ros.core.data import Demo, write_dataset
from vdd_ros.core.fields import split_cameras
from vdd_ros.errors import UserError
from vdd_ros.sim.demonstrators import DEFAULT_NOISE, make_oracle
from vdd_ros.sim.rollout import (EVAL_SEED_BASE, _WORKER, cached_env, run_episode,
                                 standard_env, worker_pool)
from vdd_ros.sim.tasks import get_task


def _oracle(task: str, mode_probs: list[float] | None, noise: float) -> Any:
    key = ('oracle', task, None if mode_probs is None else tuple(mode_probs), noise)
    if _WORKER.get('oracle_key') != key:
        _WORKER['oracle'] = make_oracle(task, 'scripted', mode_probs=mode_probs, noise=noise)
        _WORKER['oracle_key'] = key
    return _WORKER['oracle']


def collect_episode(job: tuple[str, int, list[float] | None, float]) -> dict[str, Any]:
    """Run one scripted episode (in a worker) and return its recorded arrays."""
    task, seed, mode_probs, noise = job
    env = cached_env(standard_env(task) if task == 'Lift' else task)
    rec = run_episode(env, _oracle(task, mode_probs, noise), seed, record=True)
    rec.pop('latency_ms')
    rec['obs'], rec['frames'] = split_cameras(rec['obs'], env.obs_fields)  # images as uint8
    rec['env_args'] = env.env_args()   # of this task's env (a worker may serve several tasks)
    rec['obs_fields'] = list(env.obs_fields)
    return rec


def collect(task: str, episodes: int, out: str, workers: int = 1, seed: int = 0,
            mode_probs: list[float] | None = None, noise: float = DEFAULT_NOISE,
            valid_fraction: float = 0.1, max_attempts: int | None = None,
            show_progress: bool = True) -> dict[str, Any]:
    """Collect `episodes` successful scripted demonstrations of `task` into `out`.

    Returns a summary: kept, discarded, attempts, steps (all episodes), wall_s, steps_per_s,
    busy_steps_per_s (stepping time only, summed over workers), mode_counts, complete.
    The file holds whatever succeeded when `max_attempts` (default 2 * episodes + 10) runs
    out; nothing is written when no episode succeeds. `task` 'Lift' is robosuite's standard
    Lift (StandardLiftOracle, robomimic's keys, no modes; `env_args` without a task).
    """
    modes = [] if task == 'Lift' else list(get_task(task).modes)
    if episodes < 1:
        raise UserError(f'episodes must be at least 1, got {episodes}')
    if workers < 1:
        raise UserError(f'workers must be at least 1, got {workers}')
    max_attempts = int(max_attempts or 2 * episodes + 10)
    if seed < 0 or seed + max_attempts > EVAL_SEED_BASE:
        raise UserError(f'collection seeds must lie in [0, {EVAL_SEED_BASE}) (evaluation seeds '
                        f'start there); seed {seed} with up to {max_attempts} attempts does not')
    make_oracle(task, mode_probs=mode_probs, noise=noise)  # validate the arguments here
    if not Path(out).parent.is_dir():
        raise UserError(f'cannot write {out}: folder {Path(out).parent} does not exist')
    kept: list[dict[str, Any]] = []
    attempts = discarded = steps = 0
    busy = 0.0
    env_args: dict[str, Any] | None = None
    start = time.perf_counter()
    bar = tqdm(total=episodes, desc=f'collect {task}', disable=not show_progress,
               dynamic_ncols=True, leave=False)
    try:
        with worker_pool(workers) as pool:
            next_seed = seed
            while len(kept) < episodes and attempts < max_attempts:
                n = min(episodes - len(kept), max_attempts - attempts)
                jobs = [(task, s, mode_probs, noise) for s in range(next_seed, next_seed + n)]
                next_seed += n
                attempts += n
                results = map(collect_episode, jobs) if pool is None else \
                    pool.imap_unordered(collect_episode, jobs)
                batch = []
                for rec in results:
                    steps += rec['length']
                    busy += rec['episode_s']
                    env_args = rec['env_args']
                    if rec['success']:
                        batch.append(rec)
                        bar.update(1)
                    else:
                        discarded += 1
                    bar.set_postfix(discarded=discarded, refresh=False)
                kept += sorted(batch, key=lambda r: r['seed'])
    finally:
        bar.close()
    wall = time.perf_counter() - start
    if not kept:
        raise UserError(f'no successful {task} episode in {attempts} attempts; '
                        f'{out} was not written')
    demos = [Demo(obs=r['obs'], actions=r['actions'], mode=r['policy_mode'],
                  rewards=r['rewards'], dones=r['dones'], states=r['states'], seed=r['seed'],
                  frames=r['frames'])
             for r in kept]
    write_dataset(out, demos, kept[0]['obs_fields'], env_args or {},
                  valid_fraction=valid_fraction)
    counts = {m: 0 for m in modes}
    for r in kept:
        if modes:
            counts[r['policy_mode']] = counts.get(r['policy_mode'], 0) + 1
    return {
        'task': task, 'out': str(out), 'kept': len(kept), 'discarded': discarded,
        'attempts': attempts, 'complete': len(kept) == episodes, 'steps': steps,
        'wall_s': wall, 'steps_per_s': steps / wall if wall > 0 else 0.0,
        'busy_steps_per_s': steps / busy if busy > 0 else 0.0, 'workers': workers,
        'mode_counts': counts,
        'mean_length': float(np.mean([len(d) for d in demos])),
    }
