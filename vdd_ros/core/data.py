"""Demonstration datasets in robomimic's HDF5 layout, train/valid splits and training windows.

Layout written and read (robomimic's low-dim convention)::

    data                        attrs: total (samples), env_args (JSON), obs_fields (JSON)
    data/demo_<i>/obs/<key>     (T, n) per observation field
    data/demo_<i>/next_obs/<key>  (T, n): the observation after each step
    data/demo_<i>/actions       (T, A)    rewards (T,)  dones (T,)  states (T, S) when known
    data/demo_<i>               attrs: num_samples, mode (when labelled), seed (when known)
    mask/<filter key>           demo names as byte strings (always mask/train, mask/valid)

obs[t] and states[t] are observed before actions[t]; next_obs[t] after it (obs[t + 1] unless
given, the last observation repeated at the end). Genuine robomimic low-dim files load too
(pick their observation keys by name).

Cameras (fields `<camera>_image`, see core/vision.py) are stored as robomimic stores images:
`obs/<camera>_image` uint8 `(T, H, W, 3)`, one gzip-compressed chunk per frame; their
`next_obs` is a virtual dataset over the same frames (no second copy). A `Demo` holds the
low-dimensional fields in `obs` and each camera in `frames`: arrays when written, `FrameRef`s
(read on demand, never the whole file at once) when loaded.

Filter keys (robomimic's `mask/<key>`): `load_dataset(filter_key=K)` trains on the demos of
mask/K and validates on mask/valid, as robomimic trains on `train_filter_key` and validates on
`valid`: the loaded demos are mask/K together with mask/valid, `train_idx` those of mask/K not
in mask/valid (never a validation demo), `valid_idx` those of mask/valid. Without a filter key
every demo is loaded, mask/train (else everything outside mask/valid) is trained on.
`dataset_info` describes a file (robomimic or raw robosuite layout) from shapes and
attributes, reading only the actions. torch/numpy/h5py only.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from vdd_ros.core.fields import camera_fields, is_camera, join_cameras, low_dim_fields
from vdd_ros.errors import UserError

_DEMO_RE = re.compile(r'^demo_(\d+)$')


class FrameRef:
    """One camera of one demo in a dataset file, read on demand: `ref[index]` ->
    `(len(index), H, W, 3)` uint8. Each process keeps the file open (with a chunk cache)."""

    _files: dict[str, h5py.File] = {}
    CACHE_BYTES = 64 * 2 ** 20

    def __init__(self, path: str, node: str, shape: tuple[int, ...]) -> None:
        self.path, self.node, self.shape = str(path), node, tuple(int(v) for v in shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _dataset(self) -> h5py.Dataset:
        f = FrameRef._files.get(self.path)
        if f is None or not f.id.valid:
            f = FrameRef._files[self.path] = h5py.File(self.path, 'r',
                                                       rdcc_nbytes=self.CACHE_BYTES,
                                                       rdcc_nslots=10007)
        return f[self.node]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return np.asarray(self._dataset()[index])
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(index, return_inverse=True)
        return np.asarray(self._dataset()[unique])[inverse]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    @classmethod
    def close_all(cls) -> None:
        """Close the files this process holds open (before rewriting one)."""
        for f in cls._files.values():
            if f.id.valid:
                f.close()
        cls._files.clear()


@dataclass
class Demo:
    """One demonstration: the low-dimensional observation fields (T, low_dim) float32 and the
    actions (T, A); `frames` maps each camera field to its images (T, H, W, 3) uint8 (an array
    or a FrameRef); `next_obs` (T, low_dim), when known, is the observation after each
    action."""

    obs: np.ndarray
    actions: np.ndarray
    mode: str | None = None
    rewards: np.ndarray | None = None
    dones: np.ndarray | None = None
    states: np.ndarray | None = None
    seed: int | None = None
    name: str | None = None
    next_obs: np.ndarray | None = None
    frames: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def flat(self, fields: Sequence[tuple[str, int]], t: int) -> np.ndarray:
        """The whole flat observation of step `t` (cameras inline), float32."""
        if not self.frames:
            return np.asarray(self.obs[t], dtype=np.float32)
        return join_cameras(self.obs[t], {k: np.asarray(v[[t]])[0]
                                          for k, v in self.frames.items()}, fields)


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
    def cameras(self) -> list[str]:
        """The camera fields (stored as images, in each demo's `frames`)."""
        return [k for k, _ in self.obs_fields if is_camera(k)]

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
    obs_dim = sum(int(n) for _, n in low_dim_fields(obs_fields))
    cameras = camera_fields(obs_fields)
    action_dim = None
    for i, d in enumerate(demos):
        if d.obs.ndim != 2 or d.obs.shape[1] != obs_dim:
            raise ValueError(f'demo {i}: obs shape {d.obs.shape}, expected (T, {obs_dim})')
        for key, side in cameras:
            if np.shape(d.frames.get(key)) != (len(d), side, side, 3):
                raise ValueError(f'demo {i}: frames {key!r} of shape '
                                 f'{np.shape(d.frames.get(key))}, expected '
                                 f'({len(d)}, {side}, {side}, 3)')
        if d.actions.ndim != 2 or d.actions.shape[0] != d.obs.shape[0]:
            raise ValueError(f'demo {i}: actions shape {d.actions.shape} does not match obs '
                             f'{d.obs.shape}')
        if action_dim is None:
            action_dim = d.actions.shape[1]
        elif d.actions.shape[1] != action_dim:
            raise ValueError(f'demo {i}: action dim {d.actions.shape[1]} != {action_dim}')
        if len(d) == 0:
            raise ValueError(f'demo {i} is empty')
        if d.next_obs is not None and np.shape(d.next_obs) != d.obs.shape:
            raise ValueError(f'demo {i}: next_obs shape {np.shape(d.next_obs)} does not match '
                             f'obs {d.obs.shape}')
    return int(action_dim)


def _masks(n: int, valid_fraction: float,
           masks: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Filter key -> demo indices: `masks` as given; a missing train (valid) is the complement
    of the valid (train) one; both missing, the `valid_fraction` split."""
    out: dict[str, list[int]] = {}
    for key, idx in (masks or {}).items():
        idx = [int(i) for i in idx]
        if not key or '/' in str(key):
            raise ValueError(f'filter key {key!r}: expected a non-empty name without "/"')
        if any(not 0 <= i < n for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(f'mask {key!r}: indices must be distinct and in [0, {n}), '
                             f'got {idx}')
        out[str(key)] = sorted(idx)
    if 'train' not in out and 'valid' not in out:
        out['train'], out['valid'] = split_indices(n, valid_fraction)
    for key, other in (('train', 'valid'), ('valid', 'train')):
        if key not in out:
            held = set(out[other])
            out[key] = [i for i in range(n) if i not in held]
    return out


def write_dataset(path: str | os.PathLike, demos: Sequence[Demo],
                  obs_fields: list[tuple[str, int]], env_args: dict[str, Any],
                  valid_fraction: float = 0.1,
                  masks: Mapping[str, Sequence[int]] | None = None,
                  default_keys: Sequence[str] | None = None) -> None:
    """Write demos in the robomimic layout, atomically (temporary file, then rename).

    `masks` maps filter keys to demo indices (written as mask/<key>); mask/train and
    mask/valid default as `_masks` says, from `valid_fraction` when neither is given.
    The `obs_fields` attribute (what `load_dataset` reads without keys) lists
    `default_keys`, or every written field.
    """
    path = Path(path)
    obs_fields = [(str(k), int(n)) for k, n in obs_fields]
    _check_demos(demos, obs_fields)
    split = _masks(len(demos), valid_fraction, masks)
    if not path.parent.is_dir():
        raise UserError(f'cannot write {path}: folder {path.parent} does not exist')
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        with h5py.File(tmp, 'w') as f:
            data = f.create_group('data')
            data.attrs['total'] = int(sum(len(d) for d in demos))
            data.attrs['env_args'] = json.dumps(env_args)
            sizes = dict(obs_fields)
            chosen = obs_fields if default_keys is None else \
                [(str(k), sizes[str(k)]) for k in default_keys]
            data.attrs['obs_fields'] = json.dumps(chosen)
            names = [f'demo_{i}' for i in range(len(demos))]
            for name, d in zip(names, demos):
                write_demo(data.create_group(name), d, obs_fields)
            mask = f.create_group('mask')
            for key, idx in split.items():
                mask.create_dataset(key, data=np.array([names[i] for i in idx], dtype='S'))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_demo(g: h5py.Group, d: Demo, obs_fields: list[tuple[str, int]]) -> None:
    """One demo into its (empty) robomimic group `g`: obs and next_obs per field, camera
    frames as uint8 (T, H, W, 3) with one gzip chunk per frame, actions, rewards, dones."""
    T = len(d)
    g.attrs['num_samples'] = T
    if d.mode is not None:
        g.attrs['mode'] = str(d.mode)
    if d.seed is not None:
        g.attrs['seed'] = int(d.seed)
    obs = np.asarray(d.obs, dtype=np.float32)
    following = (np.concatenate([obs[1:], obs[-1:]]) if d.next_obs is None
                 else np.asarray(d.next_obs, dtype=np.float32))
    for group, values in (('obs', obs), ('next_obs', following)):
        og = g.create_group(group)
        start = 0
        for key, size in low_dim_fields(obs_fields):
            og.create_dataset(key, data=values[:, start:start + size])
            start += size
    for key, images in d.frames.items():
        images = np.asarray(images, dtype=np.uint8)
        g['obs'].create_dataset(key, data=images, chunks=(1, *images.shape[1:]),
                                compression='gzip', compression_opts=4)
        # next_obs[t] = obs[t + 1], the last frame repeated: a view, not a copy
        layout = h5py.VirtualLayout(shape=images.shape, dtype=np.uint8)
        source = h5py.VirtualSource('.', f'{g.name}/obs/{key}', shape=images.shape)
        layout[:T - 1] = source[1:T]
        layout[T - 1] = source[T - 1]
        g['next_obs'].create_virtual_dataset(key, layout)
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


# -- reading ----------------------------------------------------------------------------------
# Largest magnitude accepted in observations and actions: beyond it float32 statistics and
# normalisation overflow or lose the data (the square of 1e19 is already infinite in float32).
MAX_ABS_VALUE = 1e12
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError)


def demo_names(group: h5py.Group) -> list[str]:
    """The demo_<i> names in `group`, by number."""
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


def read_array(path: Path, node: Any, where: str, dtype: Any = np.float32) -> np.ndarray:
    """A numeric HDF5 dataset as finite `(steps, size)` of `dtype`; anything else (a group, text,
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
    return wide.astype(dtype)


def load_dataset(path: str | os.PathLike, obs_keys: list[str] | None = None,
                 load_states: bool = False, filter_key: str | None = None,
                 load_next_obs: bool = False) -> DemoDataset:
    """Load a robomimic-style HDF5 file.

    `obs_keys` picks observation keys by name and order; without it, the file's recorded
    `obs_fields` are used, else every low-dimensional key in sorted order. `filter_key` trains
    on the demos of mask/<filter_key> and validates on mask/valid (see the module docstring).
    States and next observations are read on request (None where a demo has none). A missing
    or malformed file, a missing key or filter key, an empty demo, and observations or actions
    that are not finite numbers within +-MAX_ABS_VALUE raise UserError naming the file, the
    demo and the key.
    """
    with open_dataset(path) as (f, path):
        return _read(f, path, obs_keys, load_states, filter_key, load_next_obs)


@contextlib.contextmanager
def open_dataset(path: str | os.PathLike) -> Iterator[tuple[h5py.File, Path]]:
    """The file open for reading; read errors inside become one-line UserErrors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: no such dataset file')
    try:
        f = h5py.File(path, 'r')
    except _READ_ERRORS as exc:
        raise UserError(f'{path}: not a readable HDF5 file ({exc})') from None
    try:
        with f:
            yield f, path
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


def _read(f: h5py.File, path: Path, obs_keys: list[str] | None, load_states: bool,
          filter_key: str | None, load_next_obs: bool) -> DemoDataset:
    data = data_group(f, path)
    names = demo_names(data)
    masks = _mask_names(f, path)
    valid_names = set(masks.get('valid', []))
    train_names = set(masks['train']) if 'train' in masks else None
    if filter_key is not None:
        chosen = set(_filter_names(masks, filter_key, path))
        if not chosen & set(names):
            raise UserError(f'{path}: mask/{filter_key} lists none of the demos in "data"')
        train_names = chosen - valid_names
        if not train_names & set(names):
            raise UserError(f'{path}: every demo of mask/{filter_key} is also in mask/valid '
                            '(held out for validation): none is left to train on')
        names = [n for n in names if n in chosen or n in valid_names]
    env_args = _env_args(data, path)
    first_obs = demo_group(data, names[0], path).get('obs')
    if not isinstance(first_obs, h5py.Group):
        raw = 'states' in demo_group(data, names[0], path)
        raise UserError(f'{path}: {names[0]} has no "obs" group' + (
            ' (a raw robosuite recording: states and actions only; convert it with '
            f'vdd-ros convert-robosuite {path} --out F.hdf5)' if raw else ''))
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
            demo = _read_demo(demo_group(data, name, path), name, path, obs_keys, sizes,
                              load_states, load_next_obs)
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
    valid_idx = [i for i, n in enumerate(names) if n in valid_names]
    train_idx = [i for i, n in enumerate(names)
                 if (n not in valid_names if train_names is None else n in train_names)]
    return DemoDataset(demos=demos, obs_fields=[(k, sizes[k]) for k in obs_keys],
                       action_dim=int(action_dim or 0), env_args=env_args,
                       train_idx=train_idx, valid_idx=valid_idx, path=str(path))


def data_group(f: h5py.File, path: Path) -> h5py.Group:
    """The file's `data` group; a UserError unless it holds demo_<i> groups."""
    data = f.get('data')
    if not isinstance(data, h5py.Group):
        raise UserError(f'{path}: no "data" group (not a robomimic-style dataset)')
    if not demo_names(data):
        raise UserError(f'{path}: "data" holds no demo_<i> groups')
    return data


def _env_args(data: h5py.Group, path: Path) -> dict[str, Any]:
    try:
        env_args = json.loads(data.attrs.get('env_args', '{}'))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise UserError(f'{path}: data attribute env_args is not JSON ({exc})') from None
    if not isinstance(env_args, dict):
        raise UserError(f'{path}: data attribute env_args: expected a JSON object')
    return env_args


def _mask_names(f: h5py.File, path: Path) -> dict[str, list[str]]:
    """Filter key -> the demo names it lists (robomimic's mask/<key>)."""
    mask = f.get('mask')
    if not isinstance(mask, h5py.Group):
        return {}
    out = {}
    for key, node in mask.items():
        if not isinstance(node, h5py.Dataset):
            raise UserError(f'{path}: mask/{key}: expected a list of demo names')
        out[key] = _decode(node[()])
    return out


def _filter_names(masks: dict[str, list[str]], filter_key: str, path: Path) -> list[str]:
    if filter_key not in masks:
        have = ', '.join(sorted(masks)) or 'none (no mask group)'
        raise UserError(f'{path}: no filter key {filter_key!r} (mask/{filter_key}); its '
                        f'filter keys: {have}')
    return masks[filter_key]


def demo_group(data: h5py.Group, name: str, path: Path) -> h5py.Group:
    """data/<name> as a group; a UserError naming the demo otherwise."""
    try:
        group = data[name]
    except _READ_ERRORS as exc:
        raise UserError(f'{path}: {name}: unreadable ({type(exc).__name__}: {exc})') from None
    if not isinstance(group, h5py.Group):
        raise UserError(f'{path}: {name}: expected a group, found a {type(group).__name__}')
    return group


def _read_demo(g: h5py.Group, name: str, path: Path, obs_keys: list[str],
               sizes: dict[str, int], load_states: bool, load_next_obs: bool = False) -> Demo:
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
    parts, frames = [], {}
    for key in obs_keys:
        if key not in og:
            raise UserError(f'{path}: {name} has no obs key {key!r} '
                            f'(available: {", ".join(sorted(og.keys())) or "none"})')
        if is_camera(key):
            frames[key] = _frames(path, og[key], f'{name}/obs/{key}', T)
            size = int(np.prod(frames[key].shape[1:]))
            if sizes.setdefault(key, size) != size:
                raise UserError(f'{path}: {name}/obs/{key}: images of shape '
                                f'{frames[key].shape[1:]}, {sizes[key] // 3} pixels in the '
                                'demos before')
            continue
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
    obs = np.concatenate(parts, axis=1) if parts else np.zeros((T, 0), np.float32)
    low_keys = [k for k in obs_keys if not is_camera(k)]
    return Demo(obs=obs, actions=actions, frames=frames,
                mode=None if mode is None else _text(mode), rewards=optional('rewards'),
                dones=optional('dones'), states=optional('states') if load_states else None,
                seed=seed, name=name,
                next_obs=_next_obs(g, name, path, low_keys, obs.shape) if load_next_obs
                else None)


def _frames(path: Path, node: Any, where: str, steps: int) -> FrameRef:
    """A camera's images in a demo, checked (uint8, (steps, H, W, 3), square) but not read."""
    if not isinstance(node, h5py.Dataset):
        raise UserError(f'{path}: {where}: expected images, found a {type(node).__name__}')
    shape = tuple(node.shape)
    if node.dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise UserError(f'{path}: {where}: expected uint8 RGB images (steps, H, W, 3), found '
                        f'{node.dtype} of shape {shape}')
    if shape[0] != steps:
        raise UserError(f'{path}: {where} has {shape[0]} frames, actions have {steps} steps')
    if shape[1] != shape[2] or shape[1] < 8:
        raise UserError(f'{path}: {where}: {shape[1]}x{shape[2]} images; square images of at '
                        'least 8x8 are supported')
    return FrameRef(str(path), node.name, shape)


def _next_obs(g: h5py.Group, name: str, path: Path, obs_keys: list[str],
              shape: tuple[int, ...]) -> np.ndarray | None:
    """The demo's next_obs of `obs_keys` (same shape as its obs), None without a group."""
    ng = g.get('next_obs')
    if not isinstance(ng, h5py.Group):
        return None
    missing = [k for k in obs_keys if k not in ng]
    if missing:
        raise UserError(f'{path}: {name} has no next_obs key {missing[0]!r}')
    out = np.concatenate([read_array(path, ng[k], f'{name}/next_obs/{k}') for k in obs_keys],
                         axis=1)
    if out.shape != shape:
        raise UserError(f'{path}: {name}/next_obs: shape {out.shape}, obs has {shape}')
    return out


# -- description ------------------------------------------------------------------------------
def dataset_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a dataset holds, for `vdd-ros dataset-info` (JSON-serialisable).

    Demonstrations, transitions, lengths, observation keys and shapes (of the first demo),
    action dimension and per-dimension range, environment (robomimic `env_args`, or the `env` /
    `env_info` attributes of a raw robosuite recording), filter keys with their demo counts,
    and whether states and next observations are present. Reads shapes, attributes and the
    actions only.
    """
    with open_dataset(path) as (f, path):
        data = data_group(f, path)
        names = demo_names(data)
        lengths, low, high = [], None, None
        for name in names:
            g = demo_group(data, name, path)
            if 'actions' not in g:
                raise UserError(f'{path}: {name} has no key "actions"')
            actions = read_array(path, g['actions'], f'{name}/actions', np.float64)
            if low is not None and actions.shape[1] != low.size:
                raise UserError(f'{path}: {name}/actions: {actions.shape[1]}-d actions, '
                                f'{low.size}-d before')
            lengths.append(actions.shape[0])
            if actions.shape[0]:
                low = actions.min(0) if low is None else np.minimum(low, actions.min(0))
                high = actions.max(0) if high is None else np.maximum(high, actions.max(0))
        first = demo_group(data, names[0], path)
        obs = first.get('obs')
        shapes = ({k: list(v.shape[1:]) for k, v in obs.items() if isinstance(v, h5py.Dataset)}
                  if isinstance(obs, h5py.Group) else {})
        with_states = [data[n]['states'].shape[1] for n in names
                       if isinstance(data[n].get('states'), h5py.Dataset)]
        env = _environment(data, path)
        return {
            'path': str(path),
            'layout': 'robomimic' if isinstance(obs, h5py.Group) else 'robosuite (raw)',
            'demos': len(names),
            'transitions': int(sum(lengths)),
            'length': {'mean': float(np.mean(lengths)), 'min': int(min(lengths)),
                       'max': int(max(lengths))},
            'obs': shapes,
            'next_obs': isinstance(first.get('next_obs'), h5py.Group),
            'action_dim': 0 if low is None else int(low.size),
            'action_min': [] if low is None else [float(v) for v in low],
            'action_max': [] if high is None else [float(v) for v in high],
            **env,
            'filter_keys': {k: len(v) for k, v in _mask_names(f, path).items()},
            'states': len(with_states) == len(names),
            'state_dim': with_states[0] if with_states else None,
        }


def recorded_env_args(data: h5py.Group, path: Path) -> dict[str, Any]:
    """The robomimic `env_args` of a file: its env_args attribute, else built from a raw
    robosuite recording's attributes (`env`, `env_info` JSON of env_name and make keyword
    arguments, `repository_version`) as {env_name, type 1, env_kwargs, env_version}; {} when
    the file has neither."""
    env_args = _env_args(data, path)
    if env_args or 'env_info' not in data.attrs:
        return env_args
    try:
        info = json.loads(data.attrs['env_info'])
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise UserError(f'{path}: data attribute env_info is not JSON ({exc})') from None
    if not isinstance(info, dict):
        raise UserError(f'{path}: data attribute env_info: expected a JSON object')
    name = data.attrs.get('env', info.get('env_name'))
    out = {'env_name': None if name is None else _text(name), 'type': 1,
           'env_kwargs': {k: v for k, v in info.items() if k != 'env_name'}}
    if 'repository_version' in data.attrs:
        out['env_version'] = _text(data.attrs['repository_version'])
    return out


def _environment(data: h5py.Group, path: Path) -> dict[str, Any]:
    """env_name, robots, controller, env_version (robomimic's key, else robosuite_version)
    and a task label, of a file's metadata."""
    env_args = recorded_env_args(data, path)
    kwargs = env_args.get('env_kwargs')
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    robots = kwargs.get('robots', [])
    robots = [robots] if isinstance(robots, str) else [str(r) for r in robots]
    version = env_args.get('env_version', env_args.get('robosuite_version'))
    out = {'env_name': env_args.get('env_name'), 'robots': robots,
           'controller': _controller(kwargs.get('controller_configs')),
           'env_version': None if version is None else str(version)}
    if env_args.get('task') is not None:
        out['task'] = str(env_args['task'])
    return out


def _controller(cfg: Any) -> str | None:
    """'OSC_POSE' (robosuite <= 1.4 part), 'BASIC (right: OSC_POSE)' (1.5 composite)."""
    if not isinstance(cfg, dict):
        return None
    parts = cfg.get('body_parts')
    if isinstance(parts, dict):
        inner = ', '.join(f'{k}: {v.get("type")}' for k, v in parts.items()
                          if isinstance(v, dict))
        return f'{cfg.get("type")} ({inner})'
    return None if cfg.get('type') is None else str(cfg['type'])


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
