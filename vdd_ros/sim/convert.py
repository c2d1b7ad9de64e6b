"""Raw robosuite demonstrations (states and actions, no observations) converted to the
robomimic layout by state replay, as robomimic's `dataset_states_to_obs` does.

Input: robosuite's recording layout, `data` attributes `env` (environment name), `env_info`
(JSON: env_name and the `robosuite.make` keyword arguments: robots, controller_configs, ...)
and `repository_version`; `data/demo_<i>/states` (T, S) flat MuJoCo states, each observed
before the action of `data/demo_<i>/actions` (T, A) at the same step. A file that already has
robomimic `env_args` is replayed with those (its observations are extracted again). The
recording's `model_file` is not loaded: the environment is rebuilt from the metadata with
`DatasetEnv` (robosuite <= 1.4 controllers mapped exactly or refused, single arm only), and
its own model must take the recorded states (same state size).

Output (`vdd_ros.core.data` layout): obs[t] is read at states[t]; next_obs[t] at states[t+1]
and, at the last step, after stepping the last action from the last state; rewards[t] is 1.0
where that next state succeeds (robomimic's sparse reward); dones is 1 at the last step;
actions and states are copied; env_args = {env_name, type 1, env_kwargs, env_version (the
recording's robosuite)}; mask/train and mask/valid split the demos by `valid_fraction`.
Observation keys carry robomimic's names (`object` for robosuite's `object-state`); the
default is every low-dimensional observation the environment gives, in its order. The keys a
learner takes by default (the `obs_fields` attribute) are robomimic's usual low-dimensional
ones, LIFT_KEYS (robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, object: 19 values on
Lift), when they were written; every written key otherwise. Everything written stays
selectable by name (`--obs-keys`).

Every bad input (no env info, an unknown environment, an unmappable controller, a two-arm
environment, missing observation keys, a state or action size that does not fit) is one
UserError raised before any output exists; the output is written atomically.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from vdd_ros.core.data import (Demo, data_group, demo_group, demo_names, open_dataset,
                               read_array, recorded_env_args, split_indices,
                               write_dataset)
from vdd_ros.core.io import check_writable
from vdd_ros.errors import UserError
from vdd_ros.sim.env import import_robosuite
from vdd_ros.sim.robosuite_env import ALIASES, LIFT_KEYS, DatasetEnv

ROBOMIMIC_NAMES = {v: k for k, v in ALIASES.items()}   # robosuite key -> robomimic key
BENCH_STEPS = 200   # zero-action env.step calls timed for the bare stepping rate


def convert_robosuite(raw_path: str | Path, out_path: str | Path,
                      obs_keys: Sequence[str] | None = None, valid_fraction: float = 0.1,
                      show_progress: bool = True,
                      bench_steps: int = BENCH_STEPS) -> dict[str, Any]:
    """Convert `raw_path` into a robomimic-layout file at `out_path` (see the module
    docstring); a summary: per-demo success, transitions, replay and bare stepping rates."""
    raw_path, out_path = Path(raw_path), Path(out_path)
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f'valid fraction must be in [0, 1), got {valid_fraction}')
    if out_path.resolve() == raw_path.resolve():
        raise UserError(f'{out_path}: the output would replace the input; choose another '
                        'file')
    check_writable(out_path, 'output', create_parents=False)
    start = time.perf_counter()
    with open_dataset(raw_path) as (f, path):
        if not isinstance(f.get('data'), h5py.Group):
            raise UserError(f'{path}: no "data" group (not a robosuite recording)')
        data = data_group(f, path)
        env_args = recorded_env_args(data, path)
        if not env_args:
            raise UserError(f'{path}: a dataset without env_args (data has neither env_args '
                            'nor env_info attributes): the robosuite environment to replay '
                            'in is unknown')
        recorded = [(n, *_read_demo(demo_group(data, n, path), n, path))
                    for n in demo_names(data)]
    longest = max(len(states) for _, states, _ in recorded)
    with DatasetEnv(env_args, list(obs_keys or []), horizon=max(longest, bench_steps) + 1,
                    where=str(path)) as env:
        keys = _robomimic_keys(obs_keys, env.raw())
        for name, states, actions in recorded:
            _check_sizes(name, path, states, actions, env)
        fields = [(k, int(np.asarray(env.raw()[ALIASES.get(k, k)]).size)) for k in keys]
        demos, report, replay_s = [], [], 0.0
        for name, states, actions in tqdm(recorded, desc='convert-robosuite',
                                          disable=not show_progress, dynamic_ncols=True,
                                          leave=False):
            tick = time.perf_counter()
            demo, row = _replay(env, keys, states, actions, name)
            replay_s += time.perf_counter() - tick
            demos.append(demo)
            report.append(row)
        bare = _bare_step_rate(env, bench_steps)
    transitions = sum(len(d) for d in demos)
    train, valid = split_indices(len(demos), valid_fraction)
    written = [k for k, _ in fields]
    default = list(LIFT_KEYS) if set(LIFT_KEYS) <= set(written) else None
    write_dataset(out_path, demos, fields, env_args, masks={'train': train, 'valid': valid},
                  default_keys=default)
    return {'out': str(out_path), 'source': str(path), 'env_name': env_args['env_name'],
            'recorded_with': env_args.get('env_version'),
            'robosuite': import_robosuite().__version__, 'obs_fields': fields,
            'default_keys': default or written,
            'obs_dim': sum(n for _, n in fields), 'demos': report,
            'transitions': transitions, 'replay_s': replay_s,
            'transitions_per_s': transitions / max(replay_s, 1e-9),
            'train': len(train), 'valid': len(valid),
            'bench_steps': bench_steps, 'bare_steps_per_s': bare,
            'wall_s': time.perf_counter() - start}


def _robomimic_keys(requested: Sequence[str] | None, raw: dict[str, Any]) -> list[str]:
    """The observation keys to write, by robomimic's names: `requested` (present in `raw`,
    DatasetEnv checked that) or every low-dimensional one of `raw`."""
    if requested:
        keys = [ROBOMIMIC_NAMES.get(str(k), str(k)) for k in requested]
    else:
        keys = [ROBOMIMIC_NAMES.get(k, k) for k, v in raw.items() if np.ndim(v) <= 1]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UserError(f'observation key {twice[0]!r} is requested twice (robosuite '
                        f'{ALIASES.get(twice[0], twice[0])!r} is robomimic {twice[0]!r})')
    return keys


def _read_demo(g: h5py.Group, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A demo's recorded states and actions, float64."""
    for key in ('states', 'actions'):
        if key not in g:
            raise UserError(f'{path}: {name} has no "{key}" array (a robosuite recording '
                            'holds states and actions)')
    return (read_array(path, g['states'], f'{name}/states', np.float64),
            read_array(path, g['actions'], f'{name}/actions', np.float64))


def _check_sizes(name: str, path: Path, states: np.ndarray, actions: np.ndarray,
                 env: DatasetEnv) -> None:
    """States and actions fit the environment and each other."""
    if states.shape[1] != env.state_dim:
        raise UserError(f'{path}: {name}/states: {states.shape[1]} values per state, '
                        f'{env.task} has {env.state_dim} (recorded with another robot or '
                        'model?)')
    if actions.shape != (len(states), env.action_dim):
        raise UserError(f'{path}: {name}/actions: shape {actions.shape}, expected '
                        f'({len(states)}, {env.action_dim}) for {len(states)} states and '
                        f"{env.task}'s {env.action_dim}-d controller")


def _replay(env: DatasetEnv, keys: list[str], states: np.ndarray, actions: np.ndarray,
            name: str) -> tuple[Demo, dict[str, Any]]:
    """Observations at every recorded state, and after the last action from the last one."""
    names = [ALIASES.get(k, k) for k in keys]

    def observe() -> np.ndarray:
        raw = env.raw()
        return np.concatenate([np.asarray(raw[k], dtype=np.float64).reshape(-1)
                               for k in names])
    obs, success = [], []
    for state in states:
        env.set_state(state)
        obs.append(observe())
        success.append(env.check_success())
    env.reset(0)   # an episode to step in, then back to the last recorded state
    env.set_state(states[-1])
    env.step(actions[-1])
    last_obs, last_success = observe(), env.check_success()
    obs_arr = np.asarray(obs, dtype=np.float32)
    next_obs = np.concatenate([obs_arr[1:], np.asarray([last_obs], dtype=np.float32)])
    rewards = np.asarray(success[1:] + [last_success], dtype=np.float64)
    dones = np.zeros(len(states), dtype=np.int64)
    dones[-1] = 1
    hits = np.flatnonzero(success)
    row = {'name': name, 'steps': len(states), 'success': bool(hits.size),
           'first_success': int(hits[0]) if hits.size else None,
           'final_success': bool(success[-1])}
    return Demo(obs=obs_arr, actions=actions.astype(np.float32), rewards=rewards, dones=dones,
                states=states, next_obs=next_obs, name=name), row


def _bare_step_rate(env: DatasetEnv, steps: int) -> float | None:
    """robosuite steps per second with zero actions from a reset (None for 0 steps)."""
    if steps <= 0:
        return None
    env.reset(0)
    zero = np.zeros(env.action_dim)
    tick = time.perf_counter()
    for _ in range(steps):
        env.step(zero)
    return steps / (time.perf_counter() - tick)
