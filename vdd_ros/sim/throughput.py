"""Collection throughput against bare robosuite stepping (a measurement helper for reports).

`measure_throughput` times, in this process, (a) recorded scripted episodes exactly as a
collection worker runs them (oracle, wrapper, classifiers, MuJoCo state capture) and (b) the
same actions replayed on the same robosuite environment with nothing around it, alternating the
two to share any CPU contention; then end-to-end `collect` runs with 1 and 2 workers.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from vdd_ros.sim.collection import collect
from vdd_ros.sim.demonstrators import make_oracle
from vdd_ros.sim.env import SimEnv
from vdd_ros.sim.rollout import run_episode


def _bare_replay(env: SimEnv, episodes: list[tuple[int, np.ndarray]]) -> tuple[int, float]:
    raw = env._env
    steps, start = 0, time.perf_counter()
    for seed, actions in episodes:
        raw.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        raw.reset()
        for a in actions:
            raw.step(np.asarray(a, dtype=np.float64))
            steps += 1
    return steps, time.perf_counter() - start


def per_worker_throughput(task: str, episodes: int = 20, repeats: int = 3,
                          seed: int = 0) -> dict[str, Any]:
    """Best-of-`repeats` steps/s of recorded scripted episodes and of a bare replay."""
    env = SimEnv(task)
    oracle = make_oracle(task)
    run_episode(env, oracle, seed)  # warm-up (numba kernels, caches)
    seeds = list(range(seed + 1, seed + 1 + episodes))
    rec_rates, bare_rates = [], []
    try:
        for _ in range(repeats):
            steps, start, recorded = 0, time.perf_counter(), []
            for s in seeds:
                r = run_episode(env, oracle, s, record=True)
                steps += r['length']
                recorded.append((s, r['actions']))
            rec_rates.append(steps / (time.perf_counter() - start))
            bare_steps, bare_s = _bare_replay(env, recorded)
            bare_rates.append(bare_steps / bare_s)
    finally:
        env.close()
    collect_rate, bare_rate = max(rec_rates), max(bare_rates)
    return {'task': task, 'episodes': episodes, 'repeats': repeats,
            'collect_steps_per_s': collect_rate, 'bare_steps_per_s': bare_rate,
            'ratio': collect_rate / bare_rate,
            'collect_all': rec_rates, 'bare_all': bare_rates}


def parallel_throughput(task: str, episodes: int = 200,
                        worker_counts: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """End-to-end `collect` steps/s (process start-up and environment builds included)."""
    out: dict[str, Any] = {'task': task, 'episodes': episodes, 'runs': {}}
    with tempfile.TemporaryDirectory(prefix='vdd_ros_tp_') as tmp:
        for k in worker_counts:
            s = collect(task, episodes, os.path.join(tmp, f'w{k}.hdf5'), workers=k,
                        show_progress=False)
            out['runs'][k] = {key: s[key] for key in
                              ('steps', 'wall_s', 'steps_per_s', 'busy_steps_per_s')}
    runs = out['runs']
    if 1 in runs and 2 in runs:
        out['speedup_2_vs_1'] = runs[2]['steps_per_s'] / runs[1]['steps_per_s']
    return out


def measure_throughput(task: str = 'pick_either', episodes: int = 20, repeats: int = 3,
                       parallel_episodes: int = 200) -> dict[str, Any]:
    """Both measurements, plus the load average at the start (contention from others)."""
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    return {'load_avg_1min': load,
            'per_worker': per_worker_throughput(task, episodes, repeats),
            'parallel': parallel_throughput(task, parallel_episodes)}


if __name__ == '__main__':
    import json
    import sys

    import torch
    torch.set_num_threads(1)
    tasks = sys.argv[1:] or ['pick_either']
    for name in tasks:
        print(json.dumps(measure_throughput(name), indent=1), flush=True)
