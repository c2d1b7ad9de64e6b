"""Bad outputs, checkpoints and data are one line from the CLI, found before any work starts;
divergence is one line naming the iteration."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vdd_ros.cli import main
from vdd_ros.core.checkpoint import save_checkpoint
from vdd_ros.core.config import MoEConfig
from vdd_ros.core.data import Demo, write_dataset
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.policy import PolicySpec

FIELDS = [('a', 2), ('b', 2)]
TINY = ['--quiet', '--set', 'teacher.iterations=3', 'teacher.hidden_dim=8',
        'teacher.num_layers=1']


def _dataset(path: Path, steps: int = 6, demos: int = 3, poison=None) -> Path:
    rng = np.random.default_rng(0)
    out = [Demo(obs=rng.normal(size=(steps, 4)).astype(np.float32),
                actions=rng.uniform(-1, 1, size=(steps, 2)).astype(np.float32))
           for _ in range(demos)]
    if poison is not None:
        poison(out)
    write_dataset(path, out, FIELDS, {'task': 'lift_carry'}, valid_fraction=0.0)
    return path


def _no_work(monkeypatch, *targets: str) -> None:
    """Make each `module.attribute` fail the test if it is called."""
    def forbidden(*args, **kwargs):
        raise AssertionError('work started before the check')
    for target in targets:
        monkeypatch.setattr(target, forbidden)


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'vdd-ros {command}: error: ') and '\n' not in err, err
    return err


def _bad_outputs(tmp_path: Path) -> list[tuple[Path, str]]:
    """Output locations that cannot be written, even by root: under an existing file, and
    under /proc (no new files there); a read-only folder too when not running as root."""
    (tmp_path / 'a_file').write_text('x')
    bad = [(tmp_path / 'a_file' / 'out', 'which is a file'),
           (Path('/proc/vdd_ros_out'), 'cannot write in folder /proc')]
    if os.geteuid() != 0:
        locked = tmp_path / 'locked'
        locked.mkdir(mode=0o500)
        bad.append((locked / 'out', 'cannot write in folder'))
    return bad


def test_unwritable_outputs_fail_before_any_work(tmp_path, monkeypatch, capsys):
    data = _dataset(tmp_path / 'd.hdf5')
    _no_work(monkeypatch, 'vdd_ros.core.jobs.train_teacher', 'vdd_ros.core.jobs.train_em',
             'vdd_ros.core.jobs.distill', 'vdd_ros.sim.collection.collect',
             'vdd_ros.sim.rollout.evaluate', 'vdd_ros.commands.toy.run_toy',
             'vdd_ros.commands.bench.latency_benchmark', 'vdd_ros.ros.bench.run_suite',
             'vdd_ros.pipeline.stages.run_stages')
    teacher = tmp_path / 'teacher'   # never read: the output check comes first
    for out, why in _bad_outputs(tmp_path):
        runs = [
            ('collect', ['--task', 'lift_carry', '--episodes', '1', '--out', f'{out}.hdf5']),
            ('train-teacher', ['--dataset', str(data), '--out', str(out), *TINY]),
            ('distill', ['--teacher', str(teacher), '--dataset', str(data), '--out', str(out)]),
            ('evaluate', ['--policy', 'scripted', '--task', 'lift_carry', '--episodes', '1',
                          '--json', f'{out}.json']),
            ('toy', ['--json', f'{out}.json', '--quiet']),
            ('toy', ['--json', str(tmp_path / 'toy.json'), '--plot', f'{out}.png']),
            ('bench', ['--json', f'{out}.json']),
            ('bench', ['--ros', '--json', f'{out}.json']),
            ('pipeline', ['--task', 'lift_carry', '--results', str(out), '--quiet']),
        ]
        for command, args in runs:
            assert main([command, *args]) == 2, (command, out)
            err = _one_line(capsys, command)
            assert why in err and str(out) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'd.hdf5']


def test_distill_with_an_moe_checkpoint_names_the_kind_before_training(tmp_path, monkeypatch,
                                                                      capsys):
    data = _dataset(tmp_path / 'd.hdf5')
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=8, num_layers=1), 4, 2, 2, 8)
    spec = PolicySpec(obs_fields=FIELDS, action_dim=2, obs_horizon=2, action_horizon=8,
                      action_exec=8)
    ckpt = save_checkpoint(tmp_path / 'moe', moe, spec, 'em_moe')
    _no_work(monkeypatch, 'vdd_ros.core.jobs.train_em', 'vdd_ros.core.jobs.distill',
             'vdd_ros.core.jobs.load_model')
    assert main(['distill', '--teacher', str(ckpt), '--dataset', str(data), '--out',
                 str(tmp_path / 'out'), '--quiet']) == 2
    err = _one_line(capsys, 'distill')
    assert 'a moe checkpoint (method em_moe)' in err and 'kind teacher' in err
    assert not (tmp_path / 'out').exists()


def _nan_obs(demos):
    demos[1].obs[2, 3] = np.nan


def _huge_actions(demos):
    demos[2].actions[4, 1] = 3e38


@pytest.mark.parametrize('poison, steps, demos, message', [
    (_nan_obs, 6, 3, 'demo_1/obs/b: non-finite value nan at step 2, entry 1'),
    (_huge_actions, 6, 3, 'demo_2/actions: value 3e+38 at step 4, entry 1 is beyond'),
    (None, 1, 1, 'the training demos (demo_0) hold 1 time step in all'),
])
def test_unusable_data_is_a_data_error_before_training(tmp_path, monkeypatch, capsys, poison,
                                                       steps, demos, message):
    data = _dataset(tmp_path / 'd.hdf5', steps, demos, poison)
    _no_work(monkeypatch, 'vdd_ros.core.jobs.train_teacher')
    assert main(['train-teacher', '--dataset', str(data), '--out', str(tmp_path / 't'),
                 *TINY, 'obs_horizon=1']) == 2
    assert message in _one_line(capsys, 'train-teacher')
    assert not (tmp_path / 't').exists()


def test_distill_warm_start_on_bad_data_is_a_data_error(tmp_path, capsys):
    good, bad = _dataset(tmp_path / 'good.hdf5'), _dataset(tmp_path / 'bad.hdf5',
                                                            poison=_nan_obs)
    torch.manual_seed(0)
    assert main(['train-teacher', '--dataset', str(good), '--out', str(tmp_path / 't'),
                 *TINY]) == 0
    capsys.readouterr()
    assert main(['distill', '--teacher', str(tmp_path / 't'), '--dataset', str(bad), '--out',
                 str(tmp_path / 'm'), '--quiet', '--set', 'vdd.init_em_iterations=2']) == 2
    assert 'demo_1/obs/b: non-finite value nan' in _one_line(capsys, 'distill')


def test_divergence_is_one_line_naming_the_iteration(tmp_path, capsys):
    data = _dataset(tmp_path / 'd.hdf5')
    assert main(['train-teacher', '--dataset', str(data), '--out', str(tmp_path / 't'),
                 '--quiet', '--set', 'teacher.iterations=200', 'teacher.hidden_dim=8',
                 'teacher.lr=1e30']) == 2
    err = _one_line(capsys, 'train-teacher')
    assert 'training diverged: teacher: loss became nan at iteration' in err
    assert not (tmp_path / 't').exists()
