"""`vdd-ros pipeline --dataset`: the user's robomimic file trained on and evaluated in the
robosuite environment its metadata describes (here: robosuite 1.4.1's three human Lift
demonstrations, converted by state replay, and scripted demonstrations of standard Lift)."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from vdd_ros.cli import main
from vdd_ros.core.data import load_dataset
from vdd_ros.sim.robosuite_env import LIFT_KEYS

RAW = Path(__file__).parent / 'fixtures' / 'robosuite_lift' / 'demo.hdf5'
TINY = {
    'eval_episodes': 2, 'eval_workers': 1, 'latency_queries': 10, 'horizon': 25,
    'train': {'teacher.iterations': 30, 'teacher.hidden_dim': 32, 'teacher.num_layers': 2,
              'teacher.batch_size': 32, 'moe.hidden_dim': 32, 'moe.num_layers': 2,
              'moe.num_experts': 2, 'vdd.iterations': 10, 'vdd.batch_size': 16,
              'vdd.init_em_iterations': 10, 'gaussian_bc.iterations': 10,
              'em_moe.iterations': 10, 'consistency.iterations': 10,
              'consistency.batch_size': 16},
}


@pytest.fixture(scope='module')
def human(tmp_path_factory):
    """The three human demonstrations in the robomimic layout (19-d by default)."""
    out = tmp_path_factory.mktemp('human') / 'human_lift.hdf5'
    assert main(['convert-robosuite', str(RAW), '--out', str(out), '--valid-fraction', '0.34',
                 '--bench-steps', '0', '--quiet']) == 0
    return out


def _config(tmp_path: Path) -> Path:
    path = tmp_path / 'pipeline.yaml'
    path.write_text(yaml.safe_dump({'defaults': TINY}))
    return path


def _decisions(text: str) -> dict[str, str]:
    return dict(re.findall(r'^== \[\d+/\d+\] ([\w/]+): .* -- (run|skip) ', text, re.M))


def test_human_demonstrations_end_to_end_and_resumed(human, tmp_path, capsys):
    results = tmp_path / 'results'
    args = ['pipeline', '--dataset', str(human), '--config', str(_config(tmp_path)),
            '--results', str(results), '--quiet']
    code = main(args)
    out = capsys.readouterr().out
    assert code in (0, 1)                  # (targets are not the point at this size)
    runs = _decisions(out)
    assert list(runs)[0] == 'dataset' and 'collect' not in runs
    assert set(runs.values()) == {'run'}
    folder = results / 'human_lift'
    data = load_dataset(folder / 'demos.hdf5')
    assert data.obs_keys == list(LIFT_KEYS) and len(data.demos) == 3
    assert len(data.valid_idx) == 1
    metrics = json.loads((folder / 'metrics.json').read_text())
    run = metrics['dataset_run']
    assert run['horizon'] == 25 and run['environment'].startswith('Lift')
    assert run['obs_keys'] == list(LIFT_KEYS)
    assert 'mode_entropy' not in [t['name'] for t in metrics['targets']]
    for name, m in metrics['policies'].items():
        assert m['episodes'] == 2 and m['mode_counts'] == {}
        assert m['mean_length'] <= 25
    report = (folder / 'report.md').read_text()
    assert 'no modes defined' in report and 'rebuilt from the dataset' in report
    assert not (results / 'summary.md').exists()   # a dataset is not one of the tasks
    # resumed: nothing reruns
    assert main(args) in (0, 1)
    assert set(_decisions(capsys.readouterr().out).values()) == {'skip'}
    # --force reruns every stage and rewrites what they wrote
    before = {p: p.stat().st_mtime_ns for p in (folder / 'seed_0').rglob('*') if p.is_file()}
    assert main([*args, '--force']) in (0, 1)
    assert _decisions(capsys.readouterr().out) == runs
    assert not [p for p, t in before.items() if p.stat().st_mtime_ns == t]
    assert json.loads((folder / 'metrics.json').read_text())['policies'].keys() == \
        metrics['policies'].keys()
    assert len(load_dataset(folder / 'demos.hdf5').demos) == 3
    assert not list(folder.rglob('.*tmp*')), 'temporary files left behind'


def test_standard_lift_demonstrations_are_collected_without_modes(tmp_path, capsys):
    out = tmp_path / 'lift.hdf5'
    assert main(['collect', '--task', 'Lift', '--episodes', '2', '--out', str(out),
                 '--quiet']) == 0
    assert 'no modes defined' in capsys.readouterr().out
    data = load_dataset(out)
    assert data.obs_keys == list(LIFT_KEYS) and data.obs_dim == 19
    assert data.env_args['env_name'] == 'Lift' and 'task' not in data.env_args
    assert all(d.rewards[-1] == 1.0 and d.mode is None for d in data.demos)


@pytest.mark.parametrize('extra, problem', [
    (['--obs-keys', 'robot0_eef_pos', 'cube_to_goal'], "has no obs key 'cube_to_goal'"),
    (['--filter-key', 'expert'], "no filter key 'expert' (mask/expert); its filter keys: "
                                 'train, valid'),
    (['--via-bags'], '--via-bags records the registered tasks'),
])
def test_bad_dataset_arguments_are_one_line_before_any_stage(human, tmp_path, capsys,
                                                             extra, problem):
    assert main(['pipeline', '--dataset', str(human), '--results', str(tmp_path), '--quiet',
                 *extra]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and problem in err
    assert not any(tmp_path.iterdir())


def test_a_dataset_without_env_args_is_refused(tmp_path, capsys):
    import numpy as np

    from vdd_ros.core.data import Demo, write_dataset
    path = tmp_path / 'bare.hdf5'
    write_dataset(path, [Demo(obs=np.zeros((3, 2), np.float32),
                              actions=np.zeros((3, 7), np.float32))] * 2, [('x', 2)], {})
    assert main(['pipeline', '--dataset', str(path), '--results', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no env_args with an env_name' in err
    assert not (tmp_path / 'r').exists()


def test_a_raw_robosuite_recording_is_pointed_to_the_converter(tmp_path, capsys):
    assert main(['pipeline', '--dataset', str(RAW), '--results', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'a raw robosuite recording' in err
    assert f'vdd-ros convert-robosuite {RAW}' in err


def test_training_takes_a_filter_key_and_reports_the_validation_loss(human, tmp_path, capsys):
    from vdd_ros.core.checkpoint import read_meta
    from vdd_ros.core.data import write_dataset
    data = load_dataset(human)
    path = tmp_path / 'masked.hdf5'        # mask/first: demo 0 only; mask/valid: demo 2
    write_dataset(path, data.demos, data.obs_fields, data.env_args,
                  masks={'first': [0], 'train': [0, 1], 'valid': [2]})
    out = tmp_path / 'teacher'
    assert main(['train-teacher', '--dataset', str(path), '--out', str(out), '--quiet',
                 '--filter-key', 'first', '--set', 'teacher.iterations=20',
                 'teacher.hidden_dim=16', 'teacher.num_layers=1']) == 0
    assert 'validation loss' in capsys.readouterr().out
    metrics = read_meta(out)['metrics']
    assert metrics['valid_loss'] > 0
    from vdd_ros.core.checkpoint import load_model
    teacher, spec, _ = load_model(out)
    # normalisers fitted on demo 0 alone: its action range, not the others'
    first = torch.as_tensor(data.demos[0].actions)
    torch.testing.assert_close(teacher.action_normalizer.offset,
                               (first.max(0).values + first.min(0).values) / 2)
