"""Demonstration datasets in robomimic's HDF5 layout, train/valid splits and training windows.

Layout written and read (robomimic's low-dim convention)::

    data                      attrs: total (samples), env_args (JSON), obs_fields (JSON)
    data/demo_<i>/obs/<key>   (T, n) per observation field
    data/demo_<i>/actions     (T, A)    rewards (T,)  dones (T,)  states (T, S) when known
    data/demo_<i>             attrs: num_samples, mode (when labelled), seed (when known)
    mask/train, mask/valid    demo names as byte strings

obs[t] and states[t] are observed before actions[t]. Genuine robomimic low-dim files load too
(pick their observation keys by name). torch/numpy/h5py only.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from vdd_ros.errors import UserError

_DEMO_RE = re.compile(r'^demo_(\d+)$')


@dataclass
class Demo:
    """One demonstration: observations (T, obs_dim) float32 and actions (T, A)."""

    obs: np.ndarray
    actions: np.ndarray
    mode: str | None = None
    rewards: np.ndarray | None = None
    dones: np.ndarray | None = None
    states: np.ndarray | None = None
    seed: int | None = None
    name: str | None = None

    def __len__(self) -> int:
        return int(self.obs.shape[0])


@dataclass
class DemoDataset:
    """Demonstrations with their observation layout, environment and train/valid split."""

    demos: list[Demo]
    obs_fields: list[tuple[str, int]]
    action_dim: int
    env_args: dict[str, Any] = field(default_factory=dict)
    train_idx: list[int] = field(default_factory=list)
    valid_idx: list[int] = field(default_factory=list)
    path: str | None = None

    @property
    def obs_dim(self) -> int:
        return int(sum(n for _, n in self.obs_fields))

    @property
    def obs_keys(self) -> list[str]:
        return [k for k, _ in self.obs_fields]

    @property
    def modes(self) -> list[str]:
        """The distinct mode labels present, sorted."""
        return sorted({d.mode for d in self.demos if d.mode is not None})

    @property
    def num_samples(self) -> int:
        return int(sum(len(d) for d in self.demos))

    def train_demos(self) -> list[Demo]:
        return [self.demos[i] for i in self.train_idx]

    def valid_demos(self) -> list[Demo]:
        return [self.demos[i] for i in self.valid_idx]


# -- writing ----------------------------------------------------------------------------------
def split_indices(n: int, valid_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic train/valid split of n demos; valid gets round(n * fraction) of them, at
    least one when the fraction is positive and n >= 2, never all."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f'valid_fraction must be in [0, 1), got {valid_fraction}')
    n_valid = int(round(n * valid_fraction))
    if valid_fraction > 0 and n >= 2:
        n_valid = max(1, n_valid)
    n_valid = min(n_valid, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    valid = sorted(int(i) for i in perm[:n_valid])
    train = sorted(int(i) for i in perm[n_valid:])
    return train, valid


def _check_demos(demos: Sequence[Demo], obs_fields: list[tuple[str, int]]) -> int:
    if not demos:
        raise UserError('no demonstrations to write')
    obs_dim = sum(int(n) for _, n in obs_fields)
    action_dim = None
    for i, d in enumerate(demos):
        if d.obs.ndim != 2 or d.obs.shape[1] != obs_dim:
            raise ValueError(f'demo {i}: obs shape {d.obs.shape}, expected (T, {obs_dim})')
        if d.actions.ndim != 2 or d.actions.shape[0] != d.obs.shape[0]:
            raise ValueError(f'demo {i}: actions shape {d.actions.shape} does not match obs '
                             f'{d.obs.shape}')
        if action_dim is None:
            action_dim = d.actions.shape[1]
        elif d.actions.shape[1] != action_dim:
            raise ValueError(f'demo {i}: action dim {d.actions.shape[1]} != {action_dim}')
        if len(d) == 0:
            raise ValueError(f'demo {i} is empty')
    return int(action_dim)


def write_dataset(path: str | os.PathLike, demos: Sequence[Demo],
                  obs_fields: list[tuple[str, int]], env_args: dict[str, Any],
                  valid_fraction: float = 0.1) -> None:
    """Write demos in the robomimic layout, atomically (temporary file, then rename)."""
    path = Path(path)
    obs_fields = [(str(k), int(n)) for k, n in obs_fields]
    _check_demos(demos, obs_fields)
    train, valid = split_indices(len(demos), valid_fraction)
    if not path.parent.is_dir():
        raise UserError(f'cannot write {path}: folder {path.parent} does not exist')
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        with h5py.File(tmp, 'w') as f:
            data = f.create_group('data')
            data.attrs['total'] = int(sum(len(d) for d in demos))
            data.attrs['env_args'] = json.dumps(env_args)
            data.attrs['obs_fields'] = json.dumps(obs_fields)
            names = []
            for i, d in enumerate(demos):
                name = f'demo_{i}'
                names.append(name)
                g = data.create_group(name)
                T = len(d)
                g.attrs['num_samples'] = T
                if d.mode is not None:
                    g.attrs['mode'] = str(d.mode)
                if d.seed is not None:
                    g.attrs['seed'] = int(d.seed)
                obs = np.asarray(d.obs, dtype=np.float32)
                start = 0
                og = g.create_group('obs')
                for key, size in obs_fields:
                    og.create_dataset(key, data=obs[:, start:start + size])
                    start += size
                g.create_dataset('actions', data=np.asarray(d.actions, dtype=np.float32))
                rewards = np.zeros(T) if d.rewards is None else np.asarray(d.rewards, float)
                if d.dones is None:
                    dones = np.zeros(T, dtype=np.int64)
                    dones[-1] = 1
                else:
                    dones = np.asarray(d.dones, dtype=np.int64)
                g.create_dataset('rewards', data=rewards)
                g.create_dataset('dones', data=dones)
                if d.states is not None:
                    g.create_dataset('states', data=np.asarray(d.states, dtype=np.float64))
            mask = f.create_group('mask')
            mask.create_dataset('train', data=np.array([names[i] for i in train], dtype='S'))
            mask.create_dataset('valid', data=np.array([names[i] for i in valid], dtype='S'))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- reading ----------------------------------------------------------------------------------
def _demo_names(group: h5py.Group) -> list[str]:
    found = [(int(m.group(1)), k) for k in group.keys() if (m := _DEMO_RE.match(k))]
    return [k for _, k in sorted(found)]


def _decode(names: Any) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(names).ravel()]


def _low_dim_keys(obs_group: h5py.Group) -> list[str]:
    return sorted(k for k, v in obs_group.items()
                  if isinstance(v, h5py.Dataset) and v.ndim <= 2)


def load_dataset(path: str | os.PathLike, obs_keys: list[str] | None = None,
                 load_states: bool = False) -> DemoDataset:
    """Load a robomimic-style HDF5 file.

    `obs_keys` picks observation keys by name and order; without it, the file's recorded
    `obs_fields` are used, else every low-dimensional key in sorted order. A missing or
    malformed file, or a missing key, raises UserError naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: no such dataset file')
    try:
        f = h5py.File(path, 'r')
    except OSError as exc:
        raise UserError(f'{path}: not a readable HDF5 file ({exc})') from None
    try:
        with f:
            return _read(f, path, obs_keys, load_states)
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f'{path}: malformed dataset ({type(exc).__name__}: {exc})') from None


def _read(f: h5py.File, path: Path, obs_keys: list[str] | None,
          load_states: bool) -> DemoDataset:
    data = f.get('data')
    if not isinstance(data, h5py.Group):
        raise UserError(f'{path}: no "data" group (not a robomimic-style dataset)')
    names = _demo_names(data)
    if not names:
        raise UserError(f'{path}: "data" holds no demo_<i> groups')
    try:
        env_args = json.loads(data.attrs.get('env_args', '{}'))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f'{path}: data attribute env_args is not JSON ({exc})') from None
    first_obs = data[names[0]].get('obs')
    if not isinstance(first_obs, h5py.Group):
        raise UserError(f'{path}: {names[0]} has no "obs" group')
    if obs_keys is None:
        if 'obs_fields' in data.attrs:
            obs_keys = [str(k) for k, _ in json.loads(data.attrs['obs_fields'])]
        else:
            obs_keys = _low_dim_keys(first_obs)
    obs_keys = list(obs_keys)
    if not obs_keys:
        raise UserError(f'{path}: no observation keys selected')
    sizes: dict[str, int] = {}
    demos: list[Demo] = []
    action_dim = None
    for name in names:
        g = data[name]
        og = g.get('obs')
        if not isinstance(og, h5py.Group):
            raise UserError(f'{path}: {name} has no "obs" group')
        if 'actions' not in g:
            raise UserError(f'{path}: {name} has no key "actions"')
        actions = np.asarray(g['actions'][()], dtype=np.float32)
        if actions.ndim == 1:
            actions = actions[:, None]
        T = actions.shape[0]
        parts = []
        for key in obs_keys:
            if key not in og:
                raise UserError(f'{path}: {name} has no obs key {key!r} '
                                f'(available: {", ".join(_low_dim_keys(og)) or "none"})')
            arr = np.asarray(og[key][()], dtype=np.float32)
            if arr.ndim == 1:
                arr = arr[:, None]
            if arr.ndim != 2:
                raise UserError(f'{path}: obs key {key!r} is not low-dimensional '
                                f'(shape {arr.shape})')
            if arr.shape[0] != T:
                raise UserError(f'{path}: {name}/obs/{key} has {arr.shape[0]} steps, '
                                f'actions have {T}')
            if sizes.setdefault(key, arr.shape[1]) != arr.shape[1]:
                raise UserError(f'{path}: obs key {key!r} has size {arr.shape[1]} in {name}, '
                                f'{sizes[key]} before')
            parts.append(arr)
        if action_dim is None:
            action_dim = actions.shape[1]
        elif actions.shape[1] != action_dim:
            raise UserError(f'{path}: {name} has {actions.shape[1]}-d actions, '
                            f'{action_dim}-d before')
        mode = g.attrs.get('mode')
        demos.append(Demo(
            obs=np.concatenate(parts, axis=1), actions=actions,
            mode=None if mode is None else (mode.decode() if isinstance(mode, bytes)
                                            else str(mode)),
            rewards=np.asarray(g['rewards'][()]) if 'rewards' in g else None,
            dones=np.asarray(g['dones'][()]) if 'dones' in g else None,
            states=np.asarray(g['states'][()]) if load_states and 'states' in g else None,
            seed=int(g.attrs['seed']) if 'seed' in g.attrs else None,
            name=name))
    index = {n: i for i, n in enumerate(names)}
    mask = f.get('mask')
    valid_idx: list[int] = []
    train_idx: list[int] | None = None
    if isinstance(mask, h5py.Group):
        if 'valid' in mask:
            valid_idx = sorted(index[n] for n in _decode(mask['valid'][()]) if n in index)
        if 'train' in mask:
            train_idx = sorted(index[n] for n in _decode(mask['train'][()]) if n in index)
    if train_idx is None:
        held = set(valid_idx)
        train_idx = [i for i in range(len(demos)) if i not in held]
    return DemoDataset(demos=demos, obs_fields=[(k, sizes[k]) for k in obs_keys],
                       action_dim=int(action_dim), env_args=env_args, train_idx=train_idx,
                       valid_idx=valid_idx, path=str(path))


# -- training windows -------------------------------------------------------------------------
def make_windows(demos: Sequence[Demo], obs_horizon: int,
                 action_horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """One training window per time step of every demo.

    Returns obs windows (N, obs_horizon, obs_dim), the last entry being step t and earlier
    steps padded by repeating the first observation, and action chunks (N, action_horizon, A)
    starting at step t, padded by repeating the last action.
    """
    if obs_horizon < 1 or action_horizon < 1:
        raise ValueError(f'horizons must be >= 1, got obs {obs_horizon}, action '
                         f'{action_horizon}')
    if not demos:
        raise ValueError('make_windows needs at least one demo')
    obs_out, act_out = [], []
    for d in demos:
        T = len(d)
        t = np.arange(T)[:, None]
        oi = np.clip(t + np.arange(-obs_horizon + 1, 1)[None, :], 0, T - 1)
        ai = np.clip(t + np.arange(action_horizon)[None, :], 0, T - 1)
        obs_out.append(np.asarray(d.obs, dtype=np.float32)[oi])
        act_out.append(np.asarray(d.actions, dtype=np.float32)[ai])
    return np.concatenate(obs_out), np.concatenate(act_out)
