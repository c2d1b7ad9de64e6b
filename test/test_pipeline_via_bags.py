"""`vdd-ros pipeline --via-bags` end to end at a tiny size: demonstrations recorded through
sim_node and policy_node into MCAP bags, converted by bag2dataset into exactly the native
dataset, the teacher and the VDD-MoE evaluated over the task binding, the report comparing
with the native pipeline; cached on a rerun."""
import json
import re

import numpy as np
import yaml

from vdd_ros.cli import main
from vdd_ros.core.data import load_dataset
from vdd_ros.policies import EVALUATIONS, POLICY_KINDS

TINY = {
    'demos': 3, 'collect_workers': 1, 'eval_episodes': 2, 'eval_workers': 1,
    'latency_queries': 20,
    'train': {'teacher.iterations': 20, 'teacher.hidden_dim': 32, 'teacher.num_layers': 1,
              'teacher.batch_size': 32, 'moe.hidden_dim': 32, 'moe.num_layers': 1,
              'moe.num_experts': 2, 'vdd.iterations': 5, 'vdd.batch_size': 16,
              'gaussian_bc.iterations': 5, 'em_moe.iterations': 5,
              'consistency.iterations': 5, 'consistency.batch_size': 16},
}
STAGES = ['record', 'bag2dataset', *(f'seed_0/{k}' for k in POLICY_KINDS),
          *(f'seed_0/eval_{e}' for e in EVALUATIONS), 'seed_0/latency', 'video', 'report']


def _decisions(text):
    return dict(re.findall(r'^== \[\d+/\d+\] ([\w/]+): .* -- (run|skip) ', text, re.M))


def test_pipeline_via_bags_end_to_end(tmp_path, capsys):
    from vdd_ros.sim.collection import collect
    config = tmp_path / 'pipeline.yaml'
    config.write_text(yaml.safe_dump({'defaults': TINY, 'tasks': {'lift_carry': {}}}))
    results = tmp_path / 'results'
    # native evaluations to compare with (only their eval/*.json are read)
    native = results / 'lift_carry' / 'seed_0' / 'eval'
    native.mkdir(parents=True)
    for name, wins in (('teacher', [True, True]), ('vdd_moe', [False, True])):
        detail = [{'seed': 1_000_000 + i, 'success': w, 'mode': None, 'length': 90}
                  for i, w in enumerate(wins)]
        (native / f'{name}.json').write_text(json.dumps({
            'success_rate': sum(wins) / 2, 'successes': sum(wins), 'episodes': 2,
            'episodes_detail': detail}))
    args = ['pipeline', '--task', 'lift_carry', '--config', str(config), '--results',
            str(results), '--quiet', '--via-bags']
    assert main(args) in (0, 1)
    out = capsys.readouterr().out
    assert _decisions(out) == {s: 'run' for s in STAGES}
    folder = results / 'via_bags' / 'lift_carry'
    assert (folder / 'bags' / 'round_0' / 'metadata.yaml').is_file()

    # the recorded and converted dataset is the native collection, bitwise
    collect('lift_carry', 3, str(tmp_path / 'native.hdf5'), seed=0, show_progress=False)
    want, got = load_dataset(tmp_path / 'native.hdf5'), load_dataset(folder / 'demos.hdf5')
    assert [d.seed for d in got.demos] == [d.seed for d in want.demos]
    for a, b in zip(got.demos, want.demos):
        assert np.array_equal(a.obs, b.obs) and np.array_equal(a.actions, b.actions)
        assert a.mode == b.mode

    for name in ('teacher', 'vdd_moe'):
        ev = json.loads((folder / 'seed_0' / 'eval' / f'{name}.json').read_text())
        assert ev['via_ros'] and ev['binding'] == 'lift_carry', name
        assert [d['seed'] for d in ev['episodes_detail']] == [1_000_000, 1_000_001]
        assert 0 < ev['obs_to_action_ms_p50']
    bc = json.loads((folder / 'seed_0' / 'eval' / 'gaussian_bc.json').read_text())
    assert not bc.get('via_ros')
    metrics = json.loads((folder / 'metrics.json').read_text())
    rows = {r['policy']: r for r in metrics['via_bags']['rows']}
    assert rows['teacher']['native'] == 1.0 and rows['vdd_moe']['native'] == 0.5
    assert rows['vdd_moe']['same_seeds']
    assert metrics['settings']['dataset']['demos'] == 3
    report = (folder / 'report.md').read_text()
    assert '--via-bags' in report and '## Via bags' in report
    assert '| VDD-MoE (over ROS) | 0.50 (1/2) |' in report
    assert (results / 'via_bags' / 'summary.md').is_file()
    assert not (results / 'summary.md').exists()     # the native summary is not touched

    # everything cached: a rerun skips every stage
    assert main(args) in (0, 1)
    assert set(_decisions(capsys.readouterr().out).values()) == {'skip'}
