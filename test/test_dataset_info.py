"""`vdd-ros dataset-info` and `core.data.dataset_info`: the numbers against the files (the raw
robosuite Lift fixture and robomimic-layout files), the table, JSON and errors."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from vdd_ros.cli import main
from vdd_ros.core.data import Demo, dataset_info, write_dataset

RAW = Path(__file__).parent / 'fixtures' / 'robosuite_lift' / 'demo.hdf5'
FIELDS = [('robot0_eef_pos', 3), ('object', 10)]
COMPOSITE = {'type': 'BASIC', 'body_parts': {'right': {'type': 'OSC_POSE'}}}
ENV_ARGS = {'env_name': 'PickPlaceCan', 'type': 1, 'env_version': '1.5.2',
            'env_kwargs': {'robots': ['Panda'], 'controller_configs': COMPOSITE}}


def _dataset(path: Path) -> tuple[Path, list[Demo]]:
    rng = np.random.default_rng(0)
    demos = [Demo(obs=rng.normal(size=(T, 13)).astype(np.float32),
                  actions=rng.uniform(-2, 2, size=(T, 4)).astype(np.float32),
                  states=rng.normal(size=(T, 9)) if T != 7 else None)
             for T in (5, 9, 7, 12)]
    write_dataset(path, demos, FIELDS, ENV_ARGS,
                  masks={'valid': [1], '50_percent': [0, 1]})
    return path, demos


def test_raw_fixture_numbers() -> None:
    info = dataset_info(RAW)
    with h5py.File(RAW, 'r') as f:
        actions = [f['data'][n]['actions'][()] for n in ('demo_1', 'demo_2', 'demo_3')]
        env_info = json.loads(f['data'].attrs['env_info'])
    lengths = [len(a) for a in actions]
    everything = np.concatenate(actions)
    assert info['layout'] == 'robosuite (raw)' and info['obs'] == {} and not info['next_obs']
    assert info['demos'] == 3 and info['transitions'] == sum(lengths) == 1384
    assert info['length'] == {'mean': pytest.approx(np.mean(lengths)), 'min': min(lengths),
                              'max': max(lengths)}
    assert info['action_dim'] == 7
    np.testing.assert_array_equal(info['action_min'], everything.min(0))
    np.testing.assert_array_equal(info['action_max'], everything.max(0))
    assert max(info['action_max']) == pytest.approx(3.75)
    assert info['env_name'] == env_info['env_name'] == 'Lift'
    assert info['robots'] == ['Panda'] and info['controller'] == 'OSC_POSE'
    assert info['env_version'] == '1.4.0'
    assert info['filter_keys'] == {} and info['states'] and info['state_dim'] == 32


def test_robomimic_file_numbers(tmp_path) -> None:
    path, demos = _dataset(tmp_path / 'd.hdf5')
    info = dataset_info(path)
    assert info['layout'] == 'robomimic' and info['next_obs']
    assert info['obs'] == {'object': [10], 'robot0_eef_pos': [3]}
    assert info['demos'] == 4 and info['transitions'] == 33
    assert info['length'] == {'mean': 8.25, 'min': 5, 'max': 12}
    everything = np.concatenate([d.actions for d in demos])
    np.testing.assert_allclose(info['action_min'], everything.min(0))
    np.testing.assert_allclose(info['action_max'], everything.max(0))
    assert info['env_name'] == 'PickPlaceCan' and info['robots'] == ['Panda']
    assert info['controller'] == 'BASIC (right: OSC_POSE)' and info['env_version'] == '1.5.2'
    assert info['filter_keys'] == {'valid': 1, '50_percent': 2, 'train': 3}
    assert not info['states'] and info['state_dim'] == 9  # demo_2 has none
    with h5py.File(path, 'a') as f:  # an image key: its full shape
        f['data/demo_0/obs/agentview_image'] = np.zeros((5, 8, 6, 3), np.uint8)
    assert dataset_info(path)['obs']['agentview_image'] == [8, 6, 3]


def test_table_and_json(tmp_path, capsys) -> None:
    path, _ = _dataset(tmp_path / 'd.hdf5')
    assert main(['dataset-info', str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:line.index('  ', 2)].strip(): line[line.index('  ', 2):].strip()
            for line in lines}
    column = {len(line) - len(line[line.index('  ', 2):].lstrip()) for line in lines}
    assert len(column) == 1  # one aligned value column
    assert rows['demonstrations'] == '4' and rows['transitions'] == '33'
    assert rows['length'] == 'mean 8.2, min 5, max 12'
    assert rows['observations'] == '13 values in 2 keys' and rows['object'] == '10'
    assert rows['environment'] == ('PickPlaceCan (robots Panda; controller BASIC (right: '
                                   'OSC_POSE); recorded with robosuite 1.5.2)')
    assert rows['filter keys'] == '50_percent (2 demos), train (3 demos), valid (1 demo)'
    assert rows['states'] == 'not in every demo' and rows['actions'] == '4-d'
    assert main(['dataset-info', str(path), '--json']) == 0
    assert json.loads(capsys.readouterr().out) == dataset_info(path)


def test_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(['dataset-info', str(tmp_path / 'missing.hdf5')]) == 2
    err = capsys.readouterr().err.strip()
    assert 'missing.hdf5: no such dataset file' in err and '\n' not in err
    path, _ = _dataset(tmp_path / 'd.hdf5')
    with h5py.File(path, 'a') as f:
        f['data/demo_3/actions'][2, 1] = np.nan
    assert main(['dataset-info', str(path)]) == 2
    assert 'demo_3/actions: non-finite value nan at step 2' in capsys.readouterr().err
