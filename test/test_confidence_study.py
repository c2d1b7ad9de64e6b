"""`vdd-ros confidence` end to end on real demonstrations and a real robosuite environment."""
import json

import numpy as np
import pytest

from vdd_ros.cli import main
from vdd_ros.confidence_study import STORABLE, StudyConfig, run_study
from vdd_ros.core.confidence import load_confidence
from vdd_ros.sim.rollout import EVAL_SEED_BASE, VALID_SEED_BASE


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Six scripted lift_carry demonstrations (two for validation) and an untrained MoE."""
    from vdd_ros.ros.testing import tiny_moe_checkpoint
    from vdd_ros.sim.collection import collect
    folder = tmp_path_factory.mktemp('study')
    collect('lift_carry', 6, str(folder / 'demos.hdf5'), seed=0, valid_fraction=0.34,
            show_progress=False)
    return str(tiny_moe_checkpoint(folder / 'moe')), str(folder / 'demos.hdf5'), folder


def test_the_study_chooses_calibrates_stores_and_reports(trained):
    policy, dataset, folder = trained
    cfg = StudyConfig(episodes=1, validation_episodes=1, conditions=('displace',),
                      components=2, initial_states=8, max_observations=300)
    report = run_study(policy, dataset, cfg, out=str(folder / 'out'), log=lambda _: None)
    assert report['chosen'] in STORABLE
    density = report['offline']['density']
    # lift_carry's features hold exact differences of each other: noise breaks them
    assert density['auroc']['3std'] >= 0.9 and density['auroc']['10std'] >= 0.95
    assert density['monotone'] and density['cost_ms'] < 1.0
    medians = list(density['median'].values())
    assert medians == sorted(medians)
    # seeds: calibration on validation seeds, the table on test seeds only
    assert report['validation_seeds'] == [VALID_SEED_BASE]
    assert report['test_seeds'] == [EVAL_SEED_BASE]
    closed = report['closed_loop'][report['chosen']]
    assert closed['clean']['episodes'] == closed['displace']['episodes'] == 1
    assert closed['pooled']['failures'] == closed['displace']['failures']
    monitor = load_confidence(policy)
    cal = report['calibrations'][report['chosen']]
    assert monitor.calibration.warn == pytest.approx(cal['warn'])
    assert monitor.calibration.error > monitor.calibration.warn
    assert monitor.calibration.sustain == cfg.sustain
    saved = json.loads((folder / 'out' / 'confidence.json').read_text())
    assert saved['chosen'] == report['chosen']
    assert '| density |' in (folder / 'out' / 'confidence.md').read_text()
    assert (folder / 'out' / 'confidence.png').stat().st_size > 1000


def test_warn_never_trips_on_the_validation_episodes_it_was_calibrated_on(trained):
    from vdd_ros.confidence_study import calibrate
    from vdd_ros.core.confidence import sustained_levels
    rng = np.random.default_rng(0)
    valid = rng.normal(size=500)
    episodes = [rng.normal(size=90) + 0.5 * i for i in range(4)]
    cal = calibrate(valid, episodes, sustain=3, signal='density')
    assert cal.warn >= np.percentile(valid, 99.5)
    assert not any(np.any(sustained_levels(e, cal)) for e in episodes)
    assert cal.error - np.median(valid) == pytest.approx(2 * (cal.warn - np.median(valid)))


@pytest.mark.parametrize('args, problem', [
    (['--episodes', '-1'], 'episodes: must be >= 0'),
    (['--conditions', 'earthquake'], "conditions: unknown ['earthquake']"),
    (['--sustain', '0'], 'sustain: must be >= 1'),
])
def test_bad_arguments_are_one_line_before_any_work(trained, capsys, args, problem):
    policy, dataset, _ = trained
    assert main(['confidence', '--policy', policy, '--dataset', dataset, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and problem in err


def test_a_teacher_or_another_layout_is_refused_with_one_line(trained, tmp_path, capsys):
    from vdd_ros.ros.testing import tiny_moe_checkpoint
    policy, dataset, _ = trained
    other = tiny_moe_checkpoint(tmp_path / 'pick', task='pick_either')
    assert main(['confidence', '--policy', str(other), '--dataset', dataset,
                 '--episodes', '0']) == 2
    assert "has no obs key 'cubeA_pos'" in capsys.readouterr().err
    assert main(['confidence', '--policy', policy, '--dataset', dataset, '--teacher', policy,
                 '--episodes', '0']) == 2
    assert '--teacher must be a teacher checkpoint' in capsys.readouterr().err
