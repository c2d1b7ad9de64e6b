"""Collection throughput against bare robosuite stepping (a measurement helper for reports).

`measure_throughput` times, in this process, (a) recorded scripted episodes exactly as a
collection worker runs them (oracle, wrapper, classifiers, MuJoCo state capture) and (b) the
same actions replayed on the same robosuite environment with nothing around it, alternating the
two to share any CPU contention; then end-to-end `collect` runs with 1 and 2 workers; for a
camera task, the rendering cost per frame. `python -m vdd_ros.sim.throughput TASK...`.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from vdd_ros.sim.cameras import SUPERSAMPLE
from vdd_ros.sim.collection import collect
from vdd_ros.sim.demonstrators import make_oracle
from vdd_ros.sim.env import SimEnv
from vdd_ros.sim.rollout import run_episode
from vdd_ros.sim.tasks import get_task


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


def render_cost(task: str, frames: int = 200, seed: int = 0) -> dict[str, Any]:
    """Milliseconds per camera frame of a camera task's rig (every camera rendered at the
    states of a scripted episode, `frames` renders of each, best of three passes)."""
    env = SimEnv(task)
    try:
        rec = run_episode(env, make_oracle(task), seed, record=True)
        states = rec['states']
        rig = env._rig
        if rig is None:
            raise ValueError(f'{task} has no cameras')
        sim = env._env.sim
        per_pass = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(frames):
                sim.set_state_from_flattened(states[i % len(states)])
                sim.forward()
                rig.render()
            per_pass.append((time.perf_counter() - start) / (frames * len(rig.cameras)))
        return {'task': task, 'cameras': list(rig.cameras), 'side': rig.side,
                'drawn_side': rig.side * SUPERSAMPLE, 'frames': frames,
                'ms_per_frame': 1e3 * min(per_pass)}
    finally:
        env.close()


def measure_throughput(task: str = 'pick_either', episodes: int = 20, repeats: int = 3,
                       parallel_episodes: int = 200) -> dict[str, Any]:
    """Both measurements (and a camera task's rendering cost), plus the load average at the
    start (contention from others)."""
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    out = {'load_avg_1min': load,
           'per_worker': per_worker_throughput(task, episodes, repeats),
           'parallel': parallel_throughput(task, parallel_episodes)}
    if get_task(task).cameras:
        out['render'] = render_cost(task)
    return out


if __name__ == '__main__':
    import argparse
    import json

    import torch
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(prog='python -m vdd_ros.sim.throughput')
    parser.add_argument('tasks', nargs='*', default=['pick_either'])
    parser.add_argument('--episodes', type=int, default=20, help='per-worker episodes')
    parser.add_argument('--parallel-episodes', type=int, default=200,
                        help='episodes of each end-to-end collect run')
    args = parser.parse_args()
    for name in args.tasks:
        print(json.dumps(measure_throughput(name, args.episodes,
                                            parallel_episodes=args.parallel_episodes),
                         indent=1), flush=True)
