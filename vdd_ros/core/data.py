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
# Largest magnitude accepted in observations and actions: beyond it float32 statistics and
# normalisation overflow or lose the data (the square of 1e19 is already infinite in float32).
MAX_ABS_VALUE = 1e12
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError)


def _demo_names(group: h5py.Group) -> list[str]:
    found = [(int(m.group(1)), k) for k in group.keys() if (m := _DEMO_RE.match(k))]
    return [k for _, k in sorted(found)]


def _decode(names: Any) -> list[str]:
    return [n.decode(errors='replace') if isinstance(n, bytes) else str(n)
            for n in np.asarray(names).ravel()]


def _low_dim_keys(obs_group: h5py.Group) -> list[str]:
    return sorted(k for k, v in obs_group.items()
                  if isinstance(v, h5py.Dataset) and v.ndim <= 2)


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value.decode(errors='replace') if isinstance(value, bytes) else str(value)


def read_array(path: Path, node: Any, where: str) -> np.ndarray:
    """A numeric HDF5 dataset as finite float32 `(steps, size)`; anything else (a group, text,
    another shape, NaN/Inf, a magnitude above MAX_ABS_VALUE) is a UserError naming
    `where` (`demo_3/obs/key`), the step and the value."""
    if not isinstance(node, h5py.Dataset):
        raise UserError(f'{path}: {where}: expected an array, found a {type(node).__name__}')
    if node.dtype.kind not in 'biuf':
        raise UserError(f'{path}: {where}: expected numbers, found dtype {node.dtype}')
    arr = np.asarray(node[()])
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise UserError(f'{path}: {where}: expected shape (steps, size), got {arr.shape}')
    if arr.shape[1] == 0:
        raise UserError(f'{path}: {where}: holds no values per step (shape {arr.shape})')
    wide = arr.astype(np.float64)
    bad = ~np.isfinite(wide) | (np.abs(wide) > MAX_ABS_VALUE)
    if bad.any():
        t, i = (int(v) for v in np.argwhere(bad)[0])
        value, at = wide[t, i], f'at step {t}, entry {i}'
        if not np.isfinite(value):
            raise UserError(f'{path}: {where}: non-finite value {value:g} {at}')
        raise UserError(f'{path}: {where}: value {value:g} {at} is beyond +-{MAX_ABS_VALUE:g} '
                        f'(too large to normalise in float32)')
    return wide.astype(np.float32)


def load_dataset(path: str | os.PathLike, obs_keys: list[str] | None = None,
                 load_states: bool = False) -> DemoDataset:
    """Load a robomimic-style HDF5 file.

    `obs_keys` picks observation keys by name and order; without it, the file's recorded
    `obs_fields` are used, else every low-dimensional key in sorted order. A missing or
    malformed file, a missing key, an empty demo, and observations or actions that are not
    finite numbers within +-MAX_ABS_VALUE raise UserError naming the file, the demo and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: no such dataset file')
    try:
        f = h5py.File(path, 'r')
    except _READ_ERRORS as exc:
        raise UserError(f'{path}: not a readable HDF5 file ({exc})') from None
    try:
        with f:
            return _read(f, path, obs_keys, load_states)
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise UserError(f'{path}: malformed dataset ({type(exc).__name__}: {exc})') from None


def _recorded_keys(data: h5py.Group, path: Path) -> list[str] | None:
    """The observation keys of the `obs_fields` attribute, or None when it is absent."""
    if 'obs_fields' not in data.attrs:
        return None
    try:
        fields = json.loads(data.attrs['obs_fields'])
        keys = [str(k) for k, _ in fields]
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise UserError(f'{path}: data attribute obs_fields: expected a JSON list of [key, '
                        f'size] pairs ({type(exc).__name__})') from None
    return keys


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
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise UserError(f'{path}: data attribute env_args is not JSON ({exc})') from None
    if not isinstance(env_args, dict):
        raise UserError(f'{path}: data attribute env_args: expected a JSON object')
    first_obs = _demo_group(data, names[0], path).get('obs')
    if not isinstance(first_obs, h5py.Group):
        raise UserError(f'{path}: {names[0]} has no "obs" group')
    if obs_keys is None:
        obs_keys = _recorded_keys(data, path)
        if obs_keys is None:
            obs_keys = _low_dim_keys(first_obs)
    obs_keys = [str(k) for k in obs_keys]
    if not obs_keys:
        raise UserError(f'{path}: no observation keys selected')
    twice = sorted({k for k in obs_keys if obs_keys.count(k) > 1})
    if twice:
        raise UserError(f'{path}: observation key {twice[0]!r} is selected twice')
    sizes: dict[str, int] = {}
    demos: list[Demo] = []
    action_dim: int | None = None
    for name in names:
        try:
            demo = _read_demo(_demo_group(data, name, path), name, path, obs_keys, sizes,
                              load_states)
        except UserError:
            raise
        except _READ_ERRORS as exc:
            raise UserError(f'{path}: {name}: unreadable ({type(exc).__name__}: {exc})') \
                from None
        if action_dim is None:
            action_dim = demo.actions.shape[1]
        elif demo.actions.shape[1] != action_dim:
            raise UserError(f'{path}: {name}/actions: {demo.actions.shape[1]}-d actions, '
                            f'{action_dim}-d before')
        demos.append(demo)
    index = {n: i for i, n in enumerate(names)}
    mask = f.get('mask')
    valid_idx: list[int] = []
    train_idx: list[int] | None = None
    if isinstance(mask, h5py.Group):
        for key in ('valid', 'train'):
            if key in mask and not isinstance(mask[key], h5py.Dataset):
                raise UserError(f'{path}: mask/{key}: expected a list of demo names')
        if 'valid' in mask:
            valid_idx = sorted({index[n] for n in _decode(mask['valid'][()]) if n in index})
        if 'train' in mask:
            train_idx = sorted({index[n] for n in _decode(mask['train'][()]) if n in index})
    if train_idx is None:
        held = set(valid_idx)
        train_idx = [i for i in range(len(demos)) if i not in held]
    return DemoDataset(demos=demos, obs_fields=[(k, sizes[k]) for k in obs_keys],
                       action_dim=int(action_dim or 0), env_args=env_args,
                       train_idx=train_idx, valid_idx=valid_idx, path=str(path))


def _demo_group(data: h5py.Group, name: str, path: Path) -> h5py.Group:
    try:
        group = data[name]
    except _READ_ERRORS as exc:
        raise UserError(f'{path}: {name}: unreadable ({type(exc).__name__}: {exc})') from None
    if not isinstance(group, h5py.Group):
        raise UserError(f'{path}: {name}: expected a group, found a {type(group).__name__}')
    return group


def _read_demo(g: h5py.Group, name: str, path: Path, obs_keys: list[str],
               sizes: dict[str, int], load_states: bool) -> Demo:
    """One demo group; observation sizes are checked against (and recorded in) `sizes`."""
    og = g.get('obs')
    if not isinstance(og, h5py.Group):
        raise UserError(f'{path}: {name} has no "obs" group')
    if 'actions' not in g:
        raise UserError(f'{path}: {name} has no key "actions"')
    actions = read_array(path, g['actions'], f'{name}/actions')
    T = actions.shape[0]
    if T == 0:
        raise UserError(f'{path}: {name}/actions: empty demonstration (0 steps)')
    parts = []
    for key in obs_keys:
        if key not in og:
            raise UserError(f'{path}: {name} has no obs key {key!r} '
                            f'(available: {", ".join(_low_dim_keys(og)) or "none"})')
        arr = read_array(path, og[key], f'{name}/obs/{key}')
        if arr.shape[0] != T:
            raise UserError(f'{path}: {name}/obs/{key} has {arr.shape[0]} steps, '
                            f'actions have {T}')
        if sizes.setdefault(key, arr.shape[1]) != arr.shape[1]:
            raise UserError(f'{path}: {name}/obs/{key}: size {arr.shape[1]}, '
                            f'{sizes[key]} in the demos before')
        parts.append(arr)
    mode = g.attrs.get('mode')
    seed = g.attrs.get('seed')
    try:
        seed = None if seed is None else int(np.asarray(seed).item())
    except (TypeError, ValueError):
        raise UserError(f'{path}: {name}: attribute seed: expected an integer, got '
                        f'{seed!r}') from None

    def optional(key: str) -> np.ndarray | None:
        node = g.get(key)
        return np.asarray(node[()]) if isinstance(node, h5py.Dataset) else None
    return Demo(obs=np.concatenate(parts, axis=1), actions=actions,
                mode=None if mode is None else _text(mode), rewards=optional('rewards'),
                dones=optional('dones'), states=optional('states') if load_states else None,
                seed=seed, name=name)


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
