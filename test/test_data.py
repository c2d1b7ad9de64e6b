"""Datasets: robomimic-style HDF5 round trip, layout, hand-made files, errors, windows."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vdd_ros.core.data import (Demo, load_dataset, make_windows, split_indices,
                               write_dataset)
from vdd_ros.errors import UserError

FIELDS = [('robot0_eef_pos', 3), ('robot0_gripper_qpos', 2), ('cube_pos', 3)]
ENV_ARGS = {'env_name': 'Lift', 'type': 1, 'env_kwargs': {'horizon': 90}, 'task': 'lift_carry'}


def _demos(n: int = 5, seed: int = 0) -> list[Demo]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = 4 + i
        out.append(Demo(obs=rng.normal(size=(T, 8)).astype(np.float32),
                        actions=rng.uniform(-1, 1, size=(T, 7)).astype(np.float32),
                        mode='left' if i % 2 else 'right',
                        rewards=np.r_[np.zeros(T - 1), 1.0],
                        dones=np.r_[np.zeros(T - 1, dtype=np.int64), 1],
                        states=rng.normal(size=(T, 11)), seed=100 + i))
    return out


def test_round_trip_and_layout(tmp_path: Path) -> None:
    demos = _demos(10)
    path = tmp_path / 'd.hdf5'
    write_dataset(path, demos, FIELDS, ENV_ARGS, valid_fraction=0.2)
    with h5py.File(path, 'r') as f:
        data = f['data']
        assert data.attrs['total'] == sum(len(d) for d in demos)
        assert json.loads(data.attrs['env_args']) == ENV_ARGS
        assert sorted(data.keys(), key=lambda k: int(k[5:])) == [f'demo_{i}' for i in range(10)]
        g = data['demo_3']
        assert g.attrs['num_samples'] == 7
        assert g.attrs['mode'] == 'left'
        assert g.attrs['seed'] == 103
        assert g['obs/robot0_eef_pos'].shape == (7, 3)
        assert g['obs/robot0_gripper_qpos'].shape == (7, 2)
        np.testing.assert_array_equal(g['obs/cube_pos'][()], demos[3].obs[:, 5:8])
        assert g['actions'].shape == (7, 7)
        assert g['states'].shape == (7, 11)
        assert g['rewards'].shape == (7,) and g['dones'][-1] == 1
        train = [n.decode() for n in f['mask/train'][()]]
        valid = [n.decode() for n in f['mask/valid'][()]]
        assert len(valid) == 2 and len(train) == 8 and not set(train) & set(valid)
    ds = load_dataset(path, load_states=True)
    assert ds.obs_fields == FIELDS and ds.action_dim == 7 and ds.env_args == ENV_ARGS
    assert ds.modes == ['left', 'right'] and ds.num_samples == sum(len(d) for d in demos)
    assert sorted(ds.train_idx + ds.valid_idx) == list(range(10)) and len(ds.valid_idx) == 2
    for a, b in zip(demos, ds.demos):
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.states, b.states)
        assert a.mode == b.mode and a.seed == b.seed
    # selecting keys by name reorders and subsets the observation
    sub = load_dataset(path, obs_keys=['cube_pos', 'robot0_eef_pos'])
    assert sub.obs_fields == [('cube_pos', 3), ('robot0_eef_pos', 3)]
    np.testing.assert_array_equal(sub.demos[2].obs, np.c_[demos[2].obs[:, 5:8],
                                                           demos[2].obs[:, :3]])
    assert sub.demos[0].states is None  # states only on request


def _robomimic_file(path: Path) -> None:
    """A file laid out as robomimic writes low-dim datasets (image key, no obs_fields)."""
    rng = np.random.default_rng(1)
    with h5py.File(path, 'w') as f:
        data = f.create_group('data')
        data.attrs['total'] = 9
        data.attrs['env_args'] = json.dumps({'env_name': 'PickPlaceCan', 'type': 1,
                                             'env_kwargs': {}})
        for i, T in ((0, 5), (2, 4)):  # non-contiguous demo numbering, as after filtering
            g = data.create_group(f'demo_{i}')
            g.attrs['num_samples'] = T
            g.create_dataset('obs/object', data=rng.normal(size=(T, 14)))
            g.create_dataset('obs/robot0_eef_pos', data=rng.normal(size=(T, 3)))
            g.create_dataset('obs/robot0_gripper_qpos', data=rng.normal(size=(T, 2)))
            g.create_dataset('obs/agentview_image', data=np.zeros((T, 8, 8, 3), np.uint8))
            g.create_dataset('next_obs/object', data=rng.normal(size=(T, 14)))
            g.create_dataset('actions', data=rng.uniform(-1, 1, size=(T, 7)))
            g.create_dataset('states', data=rng.normal(size=(T, 32)))
            g.create_dataset('rewards', data=np.zeros(T))
            g.create_dataset('dones', data=np.zeros(T))
        f.create_dataset('mask/train', data=np.array([b'demo_0']))
        f.create_dataset('mask/valid', data=np.array([b'demo_2']))


def test_load_handmade_robomimic_file(tmp_path: Path) -> None:
    path = tmp_path / 'low_dim.hdf5'
    _robomimic_file(path)
    ds = load_dataset(path, obs_keys=['robot0_eef_pos', 'robot0_gripper_qpos', 'object'])
    assert ds.obs_fields == [('robot0_eef_pos', 3), ('robot0_gripper_qpos', 2), ('object', 14)]
    assert [len(d) for d in ds.demos] == [5, 4]
    assert ds.demos[0].obs.shape == (5, 19) and ds.demos[0].obs.dtype == np.float32
    assert ds.train_idx == [0] and ds.valid_idx == [1]
    assert ds.env_args['env_name'] == 'PickPlaceCan' and ds.demos[0].mode is None
    with h5py.File(path, 'r') as f:
        np.testing.assert_allclose(ds.demos[1].obs[:, 5:], f['data/demo_2/obs/object'][()],
                                   rtol=1e-6)
    # without keys: every low-dimensional key, sorted (the image is left out)
    auto = load_dataset(path)
    assert auto.obs_keys == ['object', 'robot0_eef_pos', 'robot0_gripper_qpos']


def test_missing_obs_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / 'low_dim.hdf5'
    _robomimic_file(path)
    with pytest.raises(UserError) as err:
        load_dataset(path, obs_keys=['robot0_eef_pos', 'cube_pos'])
    msg = str(err.value)
    assert str(path) in msg and "'cube_pos'" in msg and 'robot0_eef_pos' in msg
    assert '\n' not in msg


@pytest.mark.parametrize('content', [b'', b'not an hdf5 file at all' * 10])
def test_malformed_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / 'bad.hdf5'
    path.write_bytes(content)
    with pytest.raises(UserError, match='bad.hdf5'):
        load_dataset(path)


def test_missing_file_and_missing_groups(tmp_path: Path) -> None:
    with pytest.raises(UserError, match='nope.hdf5'):
        load_dataset(tmp_path / 'nope.hdf5')
    empty = tmp_path / 'empty.hdf5'
    with h5py.File(empty, 'w') as f:
        f.create_group('something_else')
    with pytest.raises(UserError, match='no "data" group'):
        load_dataset(empty)
    no_actions = tmp_path / 'no_actions.hdf5'
    with h5py.File(no_actions, 'w') as f:
        f.create_dataset('data/demo_0/obs/x', data=np.zeros((3, 2)))
    with pytest.raises(UserError, match='"actions"'):
        load_dataset(no_actions)


def test_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / 'd.hdf5'

    class Boom:  # fails while the file is being written
        def __str__(self) -> str:
            raise RuntimeError('boom')

    bad = _demos(2)
    bad[1].mode = Boom()  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match='boom'):
        write_dataset(path, bad, FIELDS, ENV_ARGS)
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed rewrite untouched
    write_dataset(path, _demos(2), FIELDS, ENV_ARGS)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_dataset(path, bad, FIELDS, ENV_ARGS)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError):  # shape mismatch is caught before any file is opened
        write_dataset(tmp_path / 'x.hdf5', _demos(2), FIELDS[:2], ENV_ARGS)
    assert not (tmp_path / 'x.hdf5').exists()


def test_make_windows_padding() -> None:
    obs = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    actions = 10 + np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    demos = [Demo(obs=obs, actions=actions), Demo(obs=obs[:2] + 100, actions=actions[:2])]
    o, a = make_windows(demos, obs_horizon=3, action_horizon=2)
    assert o.shape == (6, 3, 2) and a.shape == (6, 2, 3)
    assert o[0, :, 0].tolist() == [0, 0, 0]        # padded with the first observation
    assert o[1, :, 0].tolist() == [0, 0, 1]
    assert o[3, :, 0].tolist() == [1, 2, 3]
    assert a[3, :, 0].tolist() == [13, 13]         # padded with the last action
    assert a[2, :, 0].tolist() == [12, 13]
    assert o[4, :, 0].tolist() == [100, 100, 100]  # windows never cross demos
    assert a[5, :, 0].tolist() == [11, 11]
    o1, a1 = make_windows(demos, 1, 1)
    np.testing.assert_array_equal(o1[:, 0], np.concatenate([obs, obs[:2] + 100]))


def test_split_indices() -> None:
    train, valid = split_indices(20, 0.1)
    assert len(valid) == 2 and sorted(train + valid) == list(range(20))
    assert split_indices(20, 0.1) == (train, valid)
    assert split_indices(2, 0.1)[1] != [] and split_indices(1, 0.5) == ([0], [])
    assert split_indices(5, 0.0) == ([0, 1, 2, 3, 4], [])


def _edit(path: Path, edit) -> Path:
    """A written dataset, changed by `edit(h5py.File)`."""
    write_dataset(path, _demos(3), FIELDS, ENV_ARGS, valid_fraction=0.0)
    with h5py.File(path, 'a') as f:
        edit(f)
    return path


def _replace(f: h5py.File, key: str, value) -> None:
    del f[key]
    f[key] = value


@pytest.mark.parametrize('edit, message', [
    (lambda f: f['data/demo_1/obs/cube_pos'].__setitem__((2, 1), np.nan),
     r'demo_1/obs/cube_pos: non-finite value nan at step 2, entry 1'),
    (lambda f: f['data/demo_2/actions'].__setitem__((0, 6), -np.inf),
     r'demo_2/actions: non-finite value -inf at step 0, entry 6'),
    (lambda f: f['data/demo_0/actions'].__setitem__((3, 0), 3e38),
     r'demo_0/actions: value 3e\+38 at step 3, entry 0 is beyond \+-1e\+12'),
    (lambda f: _replace(f, 'data/demo_1/obs/robot0_eef_pos', np.full((5, 3), 1e300)),
     r'demo_1/obs/robot0_eef_pos: value 1e\+300 at step 0'),
    (lambda f: _replace(f, 'data/demo_0/actions', np.zeros((0, 7), np.float32)),
     r'demo_0/actions: empty demonstration'),
    (lambda f: _replace(f, 'data/demo_2/actions', np.array([b'a', b'b'] * 3)),
     r'demo_2/actions: expected numbers, found dtype'),
    (lambda f: _replace(f, 'data/demo_1/obs/cube_pos', np.zeros((5, 3, 2))),
     r'demo_1/obs/cube_pos: expected shape \(steps, size\), got \(5, 3, 2\)'),
    (lambda f: _replace(f, 'data/demo_1/obs/cube_pos', np.zeros((5, 4))),
     r'demo_1/obs/cube_pos: size 4, 3 in the demos before'),
    (lambda f: _replace(f, 'data/demo_2/obs/cube_pos', np.zeros((5, 3))),
     r'demo_2/obs/cube_pos has 5 steps, actions have 6'),
    (lambda f: (f['data/demo_1'].__delitem__('actions'),
                f['data/demo_1'].create_group('actions')),
     r'demo_1/actions: expected an array, found a Group'),
    (lambda f: f['data'].attrs.__setitem__('obs_fields', '{"a": 1'),
     r'data attribute obs_fields: expected a JSON list'),
    (lambda f: f['data/demo_0'].attrs.__setitem__('seed', 'abc'),
     r'demo_0: attribute seed: expected an integer'),
])
def test_broken_data_is_one_error_naming_the_demo_and_key(tmp_path: Path, edit,
                                                          message: str) -> None:
    path = _edit(tmp_path / 'd.hdf5', edit)
    with pytest.raises(UserError, match=message) as err:
        load_dataset(path)
    assert str(err.value).startswith(str(path)) and '\n' not in str(err.value)


def test_observation_keys_selected_twice_are_an_error(tmp_path: Path) -> None:
    path = _edit(tmp_path / 'd.hdf5', lambda f: None)
    with pytest.raises(UserError, match="key 'cube_pos' is selected twice"):
        load_dataset(path, obs_keys=['cube_pos', 'robot0_eef_pos', 'cube_pos'])
    with h5py.File(path, 'a') as f:
        f['data'].attrs['obs_fields'] = json.dumps([['cube_pos', 3], ['cube_pos', 3]])
    with pytest.raises(UserError, match='selected twice'):
        load_dataset(path)


def test_integer_and_bool_arrays_load_as_float32(tmp_path: Path) -> None:
    path = _edit(tmp_path / 'd.hdf5', lambda f: (
        _replace(f, 'data/demo_0/obs/robot0_gripper_qpos', np.ones((4, 2), np.int16)),
        _replace(f, 'data/demo_0/actions', np.ones((4, 7), bool))))
    demo = load_dataset(path).demos[0]
    assert demo.obs.dtype == demo.actions.dtype == np.float32
    assert demo.obs[:, 3:5].tolist() == [[1.0, 1.0]] * 4 and demo.actions.sum() == 28


# -- next_obs, explicit masks, filter keys ----------------------------------------------------
@st.composite
def _demos_and_masks(draw):
    """Demos (some with next_obs given) and masks: filter keys with any subsets, and train
    and/or valid given or left to their defaults."""
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    given = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    demos = [Demo(obs=rng.normal(size=(T, 8)).astype(np.float32),
                  actions=rng.normal(size=(T, 2)).astype(np.float32),
                  next_obs=rng.normal(size=(T, 8)).astype(np.float32) if g else None)
             for T, g in zip(lengths, given)]
    subset = st.lists(st.integers(0, n - 1), unique=True)
    masks = draw(st.dictionaries(st.sampled_from(['train', 'valid', 'half', '20_percent']),
                                 subset, max_size=3))
    return demos, masks


@settings(max_examples=40, deadline=None)
@given(_demos_and_masks(), st.sampled_from([0.0, 0.3]))
def test_next_obs_and_masks_round_trip(tmp_path_factory, case, fraction: float) -> None:
    demos, masks = case
    path = tmp_path_factory.mktemp('rt') / 'd.hdf5'
    write_dataset(path, demos, FIELDS, ENV_ARGS, valid_fraction=fraction, masks=masks)
    n = len(demos)
    if 'train' in masks or 'valid' in masks:
        valid = sorted(masks.get('valid', set(range(n)) - set(masks.get('train', []))))
        train = sorted(masks.get('train', set(range(n)) - set(valid)))
    else:
        train, valid = split_indices(n, fraction)
    with h5py.File(path, 'r') as f:
        written = {k: [n.decode() for n in v[()]] for k, v in f['mask'].items()}
    expected = {k: [f'demo_{i}' for i in sorted(v)] for k, v in masks.items()}
    expected.update(train=[f'demo_{i}' for i in train], valid=[f'demo_{i}' for i in valid])
    assert written == expected
    ds = load_dataset(path, load_next_obs=True)
    assert ds.valid_idx == valid and ds.train_idx == train
    for d, back in zip(demos, ds.demos):
        following = d.next_obs if d.next_obs is not None else np.r_[d.obs[1:], d.obs[-1:]]
        np.testing.assert_array_equal(back.next_obs, following)
    assert load_dataset(path).demos[0].next_obs is None  # only on request
    for key in masks:  # every filter key trains on its demos outside mask/valid
        kept = set(masks[key]) - set(valid)
        if not kept:
            with pytest.raises(UserError, match=f'mask/{key}'):
                load_dataset(path, filter_key=key)
            continue
        sub = load_dataset(path, filter_key=key)
        names = [d.name for d in sub.demos]
        assert names == [f'demo_{i}' for i in sorted(kept | set(valid))]
        assert sorted(names[i] for i in sub.train_idx) == [f'demo_{i}' for i in sorted(kept)]
        assert [names[i] for i in sub.valid_idx] == [f'demo_{i}' for i in valid]


def test_next_obs_selects_keys_and_old_files_have_none(tmp_path: Path) -> None:
    path = tmp_path / 'd.hdf5'
    demos = _demos(3)
    demos[1].next_obs = demos[1].obs + 1
    write_dataset(path, demos, FIELDS, ENV_ARGS)
    sub = load_dataset(path, obs_keys=['cube_pos', 'robot0_eef_pos'], load_next_obs=True)
    np.testing.assert_array_equal(sub.demos[1].next_obs,
                                  np.c_[demos[1].obs[:, 5:8], demos[1].obs[:, :3]] + 1)
    np.testing.assert_array_equal(sub.demos[0].next_obs[:-1], sub.demos[0].obs[1:])
    with h5py.File(path, 'a') as f:  # a file written before next_obs existed
        del f['data/demo_0/next_obs']
        del f['data/demo_2/next_obs/cube_pos']
    ds = load_dataset(path, obs_keys=['robot0_eef_pos'], load_next_obs=True)
    assert ds.demos[0].next_obs is None and ds.demos[2].next_obs is not None
    with pytest.raises(UserError, match="demo_2 has no next_obs key 'cube_pos'"):
        load_dataset(path, load_next_obs=True)


def test_filter_key_errors_name_the_file_and_its_keys(tmp_path: Path) -> None:
    path = tmp_path / 'd.hdf5'
    write_dataset(path, _demos(4), FIELDS, ENV_ARGS, masks={'valid': [3], 'half': [0, 1]})
    with pytest.raises(UserError) as err:
        load_dataset(path, filter_key='20_percent')
    msg = str(err.value)
    assert msg.startswith(str(path)) and "'20_percent'" in msg and '\n' not in msg
    assert 'half, train, valid' in msg
    with pytest.raises(UserError, match='none is left to train on'):
        load_dataset(path, filter_key='valid')
    with h5py.File(path, 'a') as f:
        f['mask/ghost'] = np.array([b'demo_9'])
        del f['mask']['train']
        f['mask'].create_group('train')
    with pytest.raises(UserError, match='mask/train: expected a list of demo names'):
        load_dataset(path)
    with h5py.File(path, 'a') as f:
        del f['mask/train']
    with pytest.raises(UserError, match='mask/ghost lists none of the demos'):
        load_dataset(path, filter_key='ghost')
    ds = load_dataset(path, filter_key='half')
    assert [d.name for d in ds.demos] == ['demo_0', 'demo_1', 'demo_3']
    assert ds.train_idx == [0, 1] and ds.valid_idx == [2]
    with h5py.File(path, 'a') as f:
        del f['mask']
    with pytest.raises(UserError, match=r'filter keys: none \(no mask group\)'):
        load_dataset(path, filter_key='half')


def test_write_checks_masks_and_next_obs(tmp_path: Path) -> None:
    path = tmp_path / 'd.hdf5'
    with pytest.raises(ValueError, match="mask 'valid'"):
        write_dataset(path, _demos(3), FIELDS, ENV_ARGS, masks={'valid': [3]})
    with pytest.raises(ValueError, match="mask 'train'"):
        write_dataset(path, _demos(3), FIELDS, ENV_ARGS, masks={'train': [1, 1]})
    with pytest.raises(ValueError, match='filter key'):
        write_dataset(path, _demos(3), FIELDS, ENV_ARGS, masks={'a/b': [1]})
    bad = _demos(2)
    bad[1].next_obs = bad[1].obs[:-1]
    with pytest.raises(ValueError, match='demo 1: next_obs shape'):
        write_dataset(path, bad, FIELDS, ENV_ARGS)
    assert list(tmp_path.iterdir()) == []
