"""Raw robosuite demonstrations to the robomimic layout by state replay (sim/convert.py,
`vdd-ros convert-robosuite`), on the three real human Lift demonstrations of robosuite 1.4.1
(test/fixtures/robosuite_lift, see its README)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vdd_ros.cli import main
from vdd_ros.core.data import load_dataset
from vdd_ros.core.normalizer import Normalizer
from vdd_ros.sim.convert import convert_robosuite

RAW = Path(__file__).parent / 'fixtures' / 'robosuite_lift' / 'demo.hdf5'
LIFT_KEYS = ['robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos', 'object']
DEMOS = ['demo_1', 'demo_2', 'demo_3']


@pytest.fixture(scope='module')
def converted(tmp_path_factory) -> tuple[Path, dict]:
    """The fixture converted with the default observation keys."""
    out = tmp_path_factory.mktemp('convert') / 'lift.hdf5'
    summary = convert_robosuite(RAW, out, show_progress=False, bench_steps=20)
    return out, summary


def test_layout_matches_robomimic_and_the_recording(converted) -> None:
    out, summary = converted
    with h5py.File(RAW, 'r') as raw, h5py.File(out, 'r') as f:
        env_args = json.loads(f['data'].attrs['env_args'])
        assert env_args['env_name'] == 'Lift' and env_args['type'] == 1
        assert env_args['env_version'] == '1.4.0'
        assert env_args['env_kwargs']['robots'] == 'Panda'
        assert env_args['env_kwargs']['controller_configs']['type'] == 'OSC_POSE'
        assert 'env_name' not in env_args['env_kwargs']
        names = sorted(f['data'].keys())
        assert len(names) == 3 and f['data'].attrs['total'] == 1384
        train = {n.decode() for n in f['mask/train'][()]}
        valid = {n.decode() for n in f['mask/valid'][()]}
        assert len(valid) == 1 and not train & valid and train | valid == set(names)
        for name, source in zip(names, DEMOS):
            g, r = f['data'][name], raw['data'][source]
            T = r['states'].shape[0]
            np.testing.assert_array_equal(g['states'][()], r['states'][()])
            np.testing.assert_allclose(g['actions'][()], r['actions'][()], atol=1e-6)
            assert sorted(g['obs'].keys()) == sorted(g['next_obs'].keys())
            for key in g['obs']:
                obs, nxt = g['obs'][key][()], g['next_obs'][key][()]
                assert obs.shape[0] == nxt.shape[0] == T and np.isfinite(nxt).all()
                np.testing.assert_array_equal(nxt[:-1], obs[1:])
            # the last next_obs is one real step on from the last state, not a copy of it
            moved = np.abs(g['next_obs/robot0_joint_vel'][-1] - g['obs/robot0_joint_vel'][-1])
            assert moved.max() > 0
            assert np.abs(g['next_obs/robot0_eef_pos'][-1] - g['obs/robot0_eef_pos'][-1]).max() \
                < 0.05
            dones = g['dones'][()]
            assert dones[-1] == 1 and dones[:-1].sum() == 0
            assert set(np.unique(g['rewards'][()])) <= {0.0, 1.0}


def test_every_demo_reaches_success_by_its_states(converted) -> None:
    out, summary = converted
    assert [d['name'] for d in summary['demos']] == DEMOS
    assert [d['steps'] for d in summary['demos']] == [482, 510, 392]
    assert all(d['success'] and d['final_success'] for d in summary['demos'])
    with h5py.File(out, 'r') as f:
        for name, d in zip(sorted(f['data'].keys()), summary['demos']):
            rewards = f['data'][name]['rewards'][()]
            # rewards[t] is the success of the state after action t
            first = d['first_success']
            assert 0 < first < d['steps']
            assert rewards[first - 1] == 1.0 and not rewards[:first - 1].any()
            assert rewards[-1] == 1.0
    assert summary['transitions'] == 1384
    # setting a state and reading it is far cheaper than simulating a control step
    assert summary['transitions_per_s'] > summary['bare_steps_per_s'] > 0


def test_every_low_dim_observation_is_written_and_robomimics_keys_are_the_default(
        converted) -> None:
    out, summary = converted
    written = [k for k, _ in summary['obs_fields']]
    assert set(LIFT_KEYS) <= set(written) and 'object-state' not in written
    assert 'robot0_proprio-state' in written and summary['obs_dim'] == 120
    data = load_dataset(out)           # no keys: robomimic's usual four, 19 values
    assert data.obs_keys == list(LIFT_KEYS) and data.obs_dim == 19
    assert summary['default_keys'] == list(LIFT_KEYS)
    every = load_dataset(out, obs_keys=written)     # the rest stays selectable by name
    assert every.obs_fields == [tuple(f) for f in summary['obs_fields']]


def test_converted_file_loads_and_human_actions_normalise_into_unit_range(converted) -> None:
    out, _ = converted
    data = load_dataset(out, obs_keys=LIFT_KEYS, load_states=True, load_next_obs=True)
    assert data.obs_dim == 19 and data.action_dim == 7 and len(data.demos) == 3
    assert all(d.states.shape[1] == 32 and d.next_obs.shape == d.obs.shape
               for d in data.demos)
    actions = torch.as_tensor(np.concatenate([d.actions for d in data.demos]))
    assert actions.abs().max() > 1.0  # human teleoperation: position actions up to 3.75
    norm = Normalizer(7).fit(actions, 'minmax')
    scaled = norm.normalize(actions)
    assert scaled.min() >= -1 - 1e-5 and scaled.max() <= 1 + 1e-5
    torch.testing.assert_close(norm.unnormalize(scaled), actions)


def test_cli_with_robomimic_lift_keys_gives_19_values(tmp_path, capsys) -> None:
    out = tmp_path / 'lift19.hdf5'
    keys = ['robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos', 'object-state']
    assert main(['convert-robosuite', str(RAW), '--out', str(out), '--obs-keys', *keys,
                 '--valid-fraction', '0', '--bench-steps', '0', '--quiet']) == 0
    text = capsys.readouterr().out
    assert '3/3 demonstrations reach success' in text and 'obs 19-d from 4 keys' in text
    for name, steps in zip(DEMOS, (482, 510, 392)):
        assert any(line.split()[:3] == [name, str(steps), 'yes'] for line in text.splitlines())
    data = load_dataset(out)
    assert data.obs_fields == [('robot0_eef_pos', 3), ('robot0_eef_quat', 4),
                               ('robot0_gripper_qpos', 2), ('object', 10)]
    assert data.valid_idx == [] and len(data.train_idx) == 3


def _raw(tmp_path: Path, edit) -> Path:
    """A one-demo, ten-step copy of the fixture changed by `edit(h5py.File)`."""
    path = tmp_path / 'raw.hdf5'
    shutil.copy(RAW, path)
    with h5py.File(path, 'a') as f:
        for name in ('demo_2', 'demo_3'):
            del f['data'][name]
        for key in ('states', 'actions'):
            value = f['data/demo_1'][key][:10]
            del f['data/demo_1'][key]
            f['data/demo_1'][key] = value
        edit(f)
    return path


def _set_info(f: h5py.File, **changes) -> None:
    info = json.loads(f['data'].attrs['env_info'])
    info.update(changes)
    f['data'].attrs['env_info'] = json.dumps(info)
    if 'env_name' in changes:
        f['data'].attrs['env'] = changes['env_name']


def _replace(f: h5py.File, key: str, value) -> None:
    del f[key]
    f[key] = value


@pytest.mark.parametrize('edit, args, message', [
    (lambda f: f.move('data', 'other'), [], 'no "data" group \\(not a robosuite recording'),
    (lambda f: (f['data'].attrs.__delitem__('env_info'), f['data'].attrs.__delitem__('env')),
     [], 'a dataset without env_args'),
    (lambda f: _set_info(f, env_name='Lfit'), [], "has no environment 'Lfit'"),
    (lambda f: _set_info(f, controller_configs={'type': 'IK_POSE'}), [],
     "type 'IK_POSE' from robosuite <= 1.4 has no exact"),
    (lambda f: _set_info(f, env_name='TwoArmLift', robots=['Panda', 'Panda']), [],
     'TwoArmLift is a two-arm environment'),
    (lambda f: _replace(f, 'data/demo_1/states', f['data/demo_1/states'][:, :31]), [],
     'demo_1/states: 31 values per state, Lift has 32'),
    (lambda f: _replace(f, 'data/demo_1/actions', f['data/demo_1/actions'][:, :6]), [],
     r'demo_1/actions: shape \(10, 6\), expected \(10, 7\)'),
    (lambda f: f['data/demo_1'].__delitem__('states'), [], 'demo_1 has no "states" array'),
    (lambda f: None, ['--obs-keys', 'robot0_eef_pos', 'agentview_image'],
     "Lift provides no observation 'agentview_image'"),
    (lambda f: None, ['--obs-keys', 'object', 'object-state'],
     "observation key 'object' is requested twice"),
])
def test_bad_input_is_one_line_and_no_file(tmp_path, capsys, edit, args, message) -> None:
    raw = _raw(tmp_path, edit)
    out = tmp_path / 'out' / 'converted.hdf5'
    out.parent.mkdir()
    assert main(['convert-robosuite', str(raw), '--out', str(out), '--quiet',
                 '--bench-steps', '0', *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('vdd-ros convert-robosuite: error: ') and '\n' not in err
    assert re.search(message, err), err
    assert list(out.parent.iterdir()) == []


def test_the_input_is_never_the_output(tmp_path, capsys) -> None:
    raw = _raw(tmp_path, lambda f: None)
    before = raw.read_bytes()
    assert main(['convert-robosuite', str(raw), '--out', str(raw), '--quiet']) == 2
    assert 'would replace the input' in capsys.readouterr().err
    assert raw.read_bytes() == before
