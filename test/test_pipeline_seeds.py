"""Training seeds, intervals, the registry of policy kinds and the tuning protocol: the stage
graph for several seeds, the bootstrap intervals against known answers, and `vdd-ros tune`
at a tiny size with the test seeds sealed."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from vdd_ros.cli import main
from vdd_ros.core.policy import NOISE_SEEDING
from vdd_ros.errors import UserError
from vdd_ros.pipeline import Context, build_stages, load_pipeline_config
from vdd_ros.pipeline import stages as pipeline_stages
from vdd_ros.pipeline.runner import check_stage_name
from vdd_ros.policies import EVALUATIONS, POLICY_KINDS, Evaluation, PolicyKind, register
from vdd_ros.report import aggregate, check_targets, interval_summary
from vdd_ros.sim.rollout import (EVAL_SEED_BASE, VALID_SEED_BASE, evaluate, evaluation_seeds,
                                 sealed_test_seeds, validation_seeds)

MODES = ['left', 'right']


def _run(wins: list[bool], modes: list[str | None]) -> dict:
    """An evaluation's figures from its episodes, as the rollout runner writes them."""
    from vdd_ros.sim.rollout import mode_entropy
    counts = {m: sum(w and d == m for w, d in zip(wins, modes)) for m in MODES}
    return {'successes': sum(wins), 'episodes': len(wins), 'success_rate': np.mean(wins),
            'mode_counts': counts, 'mode_entropy': mode_entropy(counts, len(MODES)),
            'mean_length': 50.0, 'query_ms_p50': 1.0, 'query_ms_p99': 2.0,
            'episodes_detail': [{'seed': EVAL_SEED_BASE + i, 'success': w, 'mode': d}
                                for i, (w, d) in enumerate(zip(wins, modes))]}


def test_stages_for_three_training_seeds_share_the_data_and_pair_teachers():
    cfg = load_pipeline_config('lift_carry', None, {'seeds': 3, 'train.seed': 5})
    ctx = Context('lift_carry', Path('/nonexistent'), cfg, cfg.train_config())
    stages = {s.name: s for s in build_stages(ctx)}
    assert ctx.seeds == [5, 6, 7]
    for seed in ctx.seeds:
        for kind in POLICY_KINDS.values():
            stage = stages[f'seed_{seed}/{kind.name}']
            assert stage.settings['seed'] == seed
            want = ('collect', f'seed_{seed}/teacher') if kind.needs_teacher else ('collect',)
            assert stage.deps == want
        for name, (_, kind) in EVALUATIONS.items():
            assert stages[f'seed_{seed}/eval_{name}'].deps == ('collect',
                                                                f'seed_{seed}/{kind.name}')
            assert stages[f'seed_{seed}/eval_{name}'].settings['split'] == 'test'
            # keyed by the noise seeding: evaluations from an earlier seeding rerun
            assert stages[f'seed_{seed}/eval_{name}'].settings['noise'] == NOISE_SEEDING
        # each seed's policies are timed together, once its evaluations are done
        latency = stages[f'seed_{seed}/latency']
        assert latency.deps == ('collect', *(f'seed_{seed}/{k}' for k in POLICY_KINDS))
        assert list(latency.settings['policies']) == list(EVALUATIONS)
        assert latency.settings['policies']['teacher_4step'] == {'steps': 4}
        order = list(stages)
        assert order.index(f'seed_{seed}/latency') == 1 + max(
            order.index(f'seed_{seed}/eval_{name}') for name in EVALUATIONS)
    assert stages['video'].deps == ('seed_5/eval_vdd_moe',)
    assert set(stages['report'].deps) == set(stages) - {'report'}
    # --from names one stage, or a per-seed stage in every seed
    check_stage_name('teacher', list(stages.values()))
    check_stage_name('seed_6/eval_em_moe', list(stages.values()))
    with pytest.raises(UserError, match="unknown stage 'seed_9/teacher'"):
        check_stage_name('seed_9/teacher', list(stages.values()))


def test_a_camera_task_keys_its_stages_by_the_image_and_encoder_settings():
    def stages(task, **overrides):
        cfg = load_pipeline_config(task, None, overrides)
        return {s.name: s for s in build_stages(Context(task, Path('/x'), cfg,
                                                        cfg.train_config()))}
    camera = stages('pick_either_image')
    trained = {n.split('/')[1] for n in camera if n.startswith('seed_0/') and
               not n.startswith(('seed_0/eval', 'seed_0/latency'))}
    assert trained == {'teacher', 'vdd_moe', 'gaussian_bc'}
    assert camera['seed_0/teacher'].settings['vision']['encoder'] == 'conv'
    wider = stages('pick_either_image', **{'train.vision.feature_dim': 32})
    assert wider['seed_0/teacher'].settings != camera['seed_0/teacher'].settings
    assert 'vision' not in stages('lift_carry')['seed_0/teacher'].settings
    # whose encoder the VDD-MoE uses keys its stage, not the teacher's or the baselines'
    own = stages('pick_either_image', **{'train.vision.moe_encoder': 'own'})
    assert own['seed_0/vdd_moe'].settings['vision']['moe_encoder'] == 'own'
    for name in ('seed_0/teacher', 'seed_0/gaussian_bc'):
        assert own[name].settings == camera[name].settings
    # a dataset rendered at another size or filter is collected anew
    assert camera['collect'].settings['images'] == {'side': 32, 'supersample': 2}
    assert 'images' not in stages('pick_either')['collect'].settings


def test_registry_rejects_a_name_twice():
    kind = POLICY_KINDS['em_moe']
    with pytest.raises(ValueError, match="'em_moe' is registered twice"):
        register(kind)
    clash = PolicyKind('other', 't', 'moe', 'baseline', ('moe',), 'c', kind.job,
                       (Evaluation('teacher_1step', 'x', 'x'),))
    with pytest.raises(ValueError, match="'teacher_1step' is registered twice"):
        register(clash)
    assert 'other' not in POLICY_KINDS


def test_intervals_cover_known_answers():
    # all successes: no spread at all
    perfect = interval_summary([_run([True] * 40, ['left', 'right'] * 20)], MODES)
    assert perfect['success_rate'] == 1.0 and perfect['success_ci'] == [1.0, 1.0]
    assert perfect['mode_entropy'] == pytest.approx(1.0)
    # one seed, 20 of 40: the binomial interval, about +- 1.96 sqrt(0.25 / 40) = 0.155
    half = interval_summary([_run([True, False] * 20, ['left'] * 40)], MODES)
    lo, hi = half['success_ci']
    assert half['success_rate'] == 0.5 and 0.30 < lo < 0.40 and 0.60 < hi < 0.70
    assert half['mode_entropy'] == 0.0 and half['entropy_ci'] == [0.0, 0.0]
    # three seeds whose rates disagree: the interval spans the seeds' spread, far wider than
    # the pooled rollouts alone would give
    runs = [_run([True] * k + [False] * (40 - k), ['left', 'right'] * 20) for k in (4, 20, 36)]
    spread = interval_summary(runs, MODES)
    assert spread['success_rate'] == pytest.approx(0.5)
    lo, hi = spread['success_ci']
    assert lo < 0.25 and hi > 0.75
    pooled = interval_summary([_run([True, False] * 60, ['left', 'right'] * 60)], MODES)
    assert (pooled['success_ci'][1] - pooled['success_ci'][0]) < 0.5 * (hi - lo)


def test_entropy_difference_pairs_the_training_seeds():
    from vdd_ros.report import difference_text, entropy_difference
    balanced = _run([True] * 100, ['left', 'right'] * 50)
    one_mode = _run([True] * 100, ['left'] * 100)
    # balanced against one mode: a difference of 1, its interval well above 0
    d = entropy_difference([balanced], [one_mode], MODES)
    assert d['entropy_difference'] == pytest.approx(1.0) and d['difference_ci'][0] > 0.9
    assert difference_text(d) == f"+1.000 [{d['difference_ci'][0]:+.3f}, +1.000]"
    # the same policy on two very different seeds: paired, the seeds' spread (0 against 1)
    # cancels and only the rollouts' resampling is left; unpaired it would reach +-0.5
    d = entropy_difference([balanced, one_mode], [balanced, one_mode], MODES)
    assert d['entropy_difference'] == 0.0
    assert -0.05 < d['difference_ci'][0] <= 0.0 <= d['difference_ci'][1] < 0.05
    with pytest.raises(ValueError, match='paired runs'):
        entropy_difference([balanced], [balanced, one_mode], MODES)


def test_aggregate_pools_counts_and_keeps_each_seed():
    runs = [_run([True, True, False, True], ['left', 'right', None, 'left']),
            _run([True, False, False, False], ['right', None, None, None])]
    m = aggregate(runs, [0, 1], MODES)
    assert m['successes'] == 4 and m['episodes'] == 8 and m['seeds'] == 2
    assert m['mode_counts'] == {'left': 2, 'right': 2}
    assert m['success_rate'] == pytest.approx((0.75 + 0.25) / 2)
    assert [r['seed'] for r in m['runs']] == [0, 1]
    assert m['mode_entropy'] == pytest.approx((runs[0]['mode_entropy'] + 0.0) / 2)


def test_mode_coverage_target_applies_to_four_modes():
    four = ['a', 'b', 'c', 'd']
    vdd = {'success_rate': 0.9, 'mode_entropy': 0.9, 'query_ms_p50': 0.1,
           'mode_counts': {'a': 30, 'b': 30, 'c': 27, 'd': 3}}
    teacher = {'success_rate': 0.9, 'mode_entropy': 1.0, 'query_ms_p50': 1.0}
    rows = {t['name']: t for t in check_targets({'vdd_moe': vdd, 'teacher': teacher}, four)}
    assert rows['mode_coverage']['value'] == pytest.approx(3 / 90)
    assert not rows['mode_coverage']['met'] and rows['mode_entropy']['met']
    two = check_targets({'vdd_moe': vdd, 'teacher': teacher}, ['a', 'b'])
    assert 'mode_coverage' not in {t['name'] for t in two}


def test_test_seeds_are_sealed_while_tuning():
    with sealed_test_seeds():
        assert validation_seeds(2) == [VALID_SEED_BASE, VALID_SEED_BASE + 1]
        with pytest.raises(RuntimeError, match='test seed was read while tuning'):
            evaluation_seeds(1)
        with pytest.raises(RuntimeError, match='test seed was read while tuning'):
            evaluate('scripted', 'lift_carry', 1, seeds=[EVAL_SEED_BASE + 7],
                     show_progress=False)
    assert evaluation_seeds(1) == [EVAL_SEED_BASE]


TINY = {
    'demos': 4, 'collect_workers': 1, 'eval_episodes': 2, 'eval_workers': 1,
    'latency_queries': 20,
    'train': {'teacher.iterations': 20, 'teacher.hidden_dim': 32, 'teacher.num_layers': 1,
              'teacher.batch_size': 32, 'moe.hidden_dim': 32, 'moe.num_layers': 1,
              'moe.num_experts': 2, 'vdd.iterations': 5, 'vdd.batch_size': 16,
              'vdd.init_em_iterations': 5, 'consistency.iterations': 5,
              'consistency.batch_size': 16},
}


def test_tune_scores_candidates_on_validation_seeds(tmp_path, capsys, monkeypatch):
    config = tmp_path / 'pipeline.yaml'
    config.write_text(yaml.safe_dump({'defaults': TINY, 'tasks': {'lift_carry': {}}}))
    candidates = tmp_path / 'tune.yaml'
    candidates.write_text(yaml.safe_dump({'candidates': {
        'default': {}, 'shared': {'moe.experts': 'shared'},
        'no_warm': {'vdd': {'init_em_iterations': 0}}}}, sort_keys=False))
    results = tmp_path / 'results'
    args = ['tune', '--task', 'lift_carry', '--config', str(config), '--candidates',
            str(candidates), '--results', str(results), '--quiet']
    assert main(args) == 0
    assert evaluation_seeds(1) == [EVAL_SEED_BASE]      # unsealed once the study is done
    out = capsys.readouterr().out
    ran = re.findall(r'^== \[\d+/\d+\] ([\w/]+): .* -- run ', out, re.M)
    assert ran == ['collect', 'seed_0/teacher', 'seed_0/consistency',
                   'seed_0/eval_valid_teacher', 'seed_0/eval_valid_consistency',
                   *(f'tune/{c}/{s}' for c in ('default', 'shared', 'no_warm')
                     for s in ('vdd_moe', 'eval_vdd_moe')), 'tune/report']
    folder = results / 'lift_carry'
    result = json.loads((folder / 'tune' / 'tune.json').read_text())
    # the teacher and the consistency student are scored on the same validation seeds, as
    # the candidates' references
    for name in ('teacher', 'consistency'):
        ref = json.loads((folder / 'seed_0' / 'eval_valid' / f'{name}.json').read_text())
        assert [d['seed'] for d in ref['episodes_detail']] == validation_seeds(2)
        assert ref['split'] == 'valid' and ref['name'] == name
        assert result[name]['success_rate'] == ref['success_rate']
        assert result[name]['mode_entropy'] == ref['mode_entropy']
    assert all(isinstance(r['meets_targets'], bool) for r in result['rows'])
    cd = result['consistency']
    for r in result['rows']:
        assert r['versus_consistency']['entropy'] == (r['mode_entropy'] > cd['mode_entropy'])
        assert r['versus_consistency']['success'] == \
            (r['success_rate'] >= cd['success_rate'] - 0.05)
    assert [r['candidate'] for r in result['rows']] == ['default', 'shared', 'no_warm']
    assert result['rows'][2]['overrides'] == {'vdd.init_em_iterations': 0}
    assert result['best'] in ('default', 'shared', 'no_warm') and result['split'] == 'valid'
    for name in ('default', 'shared', 'no_warm'):
        ev = json.loads((folder / 'tune' / name / 'eval' / 'vdd_moe.json').read_text())
        assert [d['seed'] for d in ev['episodes_detail']] == validation_seeds(2)
        assert ev['split'] == 'valid'
    from vdd_ros.core.checkpoint import load_model
    experts = [load_model(folder / 'tune' / c / 'vdd_moe')[0].cfg.experts
               for c in ('default', 'shared')]
    assert experts == ['independent', 'shared']
    md = (folder / 'tune' / 'tune.md').read_text()
    assert '`moe.experts=shared`' in md and 'validation' in md
    assert '| *teacher* | (reference) |' in md and '| targets |' in md
    assert '| *consistency* | (reference) |' in md and '| above consistency |' in md
    assert (folder / 'tune' / 'candidates.png').read_bytes()[:4] == b'\x89PNG'
    # the pipeline on the same folder reuses the data and the first seed's teacher (stopped
    # at its first evaluation: the reuse is decided before it; test_pipeline checks that the
    # report leaves a study's markers out)
    def stop(policy, ctx, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline_stages, '_evaluate', stop)
    assert main(['pipeline', '--task', 'lift_carry', '--config', str(config), '--results',
                 str(results), '--quiet', '--set', 'train.gaussian_bc.iterations=5',
                 'train.em_moe.iterations=5', 'train.consistency.iterations=5',
                 'train.consistency.batch_size=16']) == 130
    decisions = dict(re.findall(r'^== \[\d+/\d+\] ([\w/]+): .* -- (run|skip) ',
                                capsys.readouterr().out, re.M))
    assert decisions['collect'] == decisions['seed_0/teacher'] == 'skip'
    assert decisions['seed_0/consistency'] == 'skip'      # the study's reference, shared
    assert decisions['seed_0/vdd_moe'] == decisions['seed_0/eval_teacher'] == 'run'
    # a bad candidate file is one clear error naming the field, before any work
    candidates.write_text(yaml.safe_dump({'candidates': {'x': {'vdd.lr': 'fast'}}}))
    assert main(args) == 2
    assert 'candidates.x.vdd.lr' in capsys.readouterr().err


def test_tune_with_several_training_seeds_pairs_each_candidate_with_each_seeds_teacher():
    from vdd_ros.pipeline.tune import TuneConfig, build_tune_stages
    cfg = load_pipeline_config('carry_four', None, {'seeds': 2})
    ctx = Context('carry_four', Path('/nonexistent'), cfg, cfg.train_config(),
                  eval_split='valid')
    tune = TuneConfig({'default': {}, 'uniform': {'vdd.uniform_gating_fraction': 0.3}})
    tune.validate()
    stages = {s.name: s for s in build_tune_stages(ctx, tune)}
    for name in ('default', 'uniform'):
        # the first seed's outputs stay in tune/<name> (cached single-seed runs are reused)
        for prefix, seed in ((f'tune/{name}', 0), (f'tune/{name}/seed_1', 1)):
            vdd = stages[f'{prefix}/vdd_moe']
            assert f'seed_{seed}/teacher' in vdd.deps
            assert stages[f'{prefix}/eval_vdd_moe'].deps[-1] == f'{prefix}/vdd_moe'
    assert {'seed_0/teacher', 'seed_1/teacher'} <= set(stages)
    assert set(stages['tune/report'].deps) >= {'tune/uniform/seed_1/eval_vdd_moe',
                                                  'tune/default/eval_vdd_moe',
                                                  'seed_1/eval_valid_consistency'}
    # each seed's consistency student is its own teacher's, scored on validation seeds
    for seed in (0, 1):
        assert stages[f'seed_{seed}/consistency'].deps[-1] == f'seed_{seed}/teacher'
        assert stages[f'seed_{seed}/eval_valid_consistency'].settings['split'] == 'valid'
        assert stages[f'seed_{seed}/eval_valid_consistency'].outputs == \
            [f'seed_{seed}/eval_valid/consistency.json']
    # a run without consistency distillation compares with the teacher alone
    cfg = load_pipeline_config('carry_four', None, {'policies': ['teacher', 'vdd_moe']})
    ctx = Context('carry_four', Path('/nonexistent'), cfg, cfg.train_config(),
                  eval_split='valid')
    names = [s.name for s in build_tune_stages(ctx, tune)]
    assert 'seed_0/eval_valid_teacher' in names
    assert not any('consistency' in n for n in names)


def test_tune_report_pools_seeds_and_names_the_rarest_mode():
    from vdd_ros.pipeline.tune import rarest_mode_share, tune_markdown
    a = _run([True] * 4, ['left', 'left', 'left', 'right'])
    b = _run([True, True, False, True], ['left', 'left', 'right', 'left'])
    assert rarest_mode_share([a, b], MODES) == pytest.approx(1 / 7)
    assert rarest_mode_share([_run([False], [None])], MODES) is None
    row = {'candidate': 'default', 'overrides': {}, **interval_summary([a, b], MODES),
           'rarest_mode_share': rarest_mode_share([a, b], MODES)}
    md = tune_markdown({'task': 'pick_either', 'episodes': 4, 'training_seeds': [0, 1],
                        'rows': [row], 'best': 'default'})
    assert 'training seeds 0, 1' in md and '| 14% |' in md


def test_a_candidate_meets_the_targets_against_the_validation_teacher():
    from vdd_ros.pipeline.tune import meets_targets, tune_markdown
    teacher = {'success_rate': 0.90, 'mode_entropy': 0.80, 'rarest_mode_share': 0.2}

    def row(success, entropy, rarest):
        return {'success_rate': success, 'mode_entropy': entropy, 'rarest_mode_share': rarest}
    # the margin (0.05) and the entropy fraction (0.85) are inclusive
    assert meets_targets(row(0.85, 0.68, 0.2), teacher, 2)
    assert not meets_targets(row(0.84, 0.99, 0.2), teacher, 2)
    assert not meets_targets(row(0.95, 0.67, 0.2), teacher, 2)
    # with four modes, every mode needs 10% of the successful rollouts
    assert meets_targets(row(0.9, 0.8, 0.09), teacher, 2)
    assert not meets_targets(row(0.9, 0.8, 0.09), teacher, 4)
    assert meets_targets(row(0.9, 0.8, 0.10), teacher, 4)
    # a task without modes is judged on success alone
    plain = {'success_rate': 0.9, 'mode_entropy': None, 'rarest_mode_share': None}
    assert meets_targets({**plain, 'success_rate': 0.86}, plain, 0)
    ci = {'success_ci': [0.8, 1.0], 'entropy_ci': [0.7, 0.9]}
    md = tune_markdown({'task': 'carry_four', 'episodes': 50, 'training_seeds': [0],
                        'teacher': {**teacher, **ci}, 'best': 'a',
                        'rows': [{'candidate': 'a', 'overrides': {}, **row(0.9, 0.8, 0.09),
                                  **ci, 'meets_targets': False}]})
    assert '| *teacher* | (reference) | 0.90 [0.80, 1.00] | 0.80 [0.70, 0.90] | 20% | |' in md
    assert '| a | (defaults) | 0.90 [0.80, 1.00] | 0.80 [0.70, 0.90] | 9% | missed |' in md
    assert '(here 0.85)' in md and 'above consistency' not in md
    # overrides read as the candidates file writes them
    md = tune_markdown({'task': 'carry_four', 'episodes': 50, 'training_seeds': [0],
                        'best': 'a', 'rows': [{
                            'candidate': 'a', **row(0.9, 0.8, 0.2), **ci, 'meets_targets': True,
                            'overrides': {'vdd.min_std': None, 'vdd.score_sigma': [0.2, 0.5],
                                          'moe.experts': 'shared', 'x.flag': True}}]})
    assert ('| a | `vdd.min_std=null`, `vdd.score_sigma=[0.2, 0.5]`, `moe.experts=shared`, '
            '`x.flag=true` |') in md


def test_a_candidate_is_compared_with_consistency_distillation_on_validation_seeds():
    from vdd_ros.pipeline.tune import tune_markdown
    from vdd_ros.report import versus_consistency
    ci = {'success_ci': [0.8, 1.0], 'entropy_ci': [0.7, 0.9]}

    def row(success, entropy):
        return {'success_rate': success, 'mode_entropy': entropy, 'rarest_mode_share': 0.4,
                **ci}
    cd = row(0.90, 0.80)
    # above on entropy, success within the margin (inclusive); equal entropy is not above
    assert versus_consistency({'vdd_moe': row(0.85, 0.81), 'consistency': cd})['met']
    assert not versus_consistency({'vdd_moe': row(0.84, 0.99), 'consistency': cd})['met']
    assert not versus_consistency({'vdd_moe': row(0.99, 0.80), 'consistency': cd})['met']
    rows = [{'candidate': name, 'overrides': {}, **r, 'meets_targets': True,
             'versus_consistency': versus_consistency({'vdd_moe': r, 'consistency': cd})}
            for name, r in (('wide', row(0.9, 0.9)), ('narrow', row(0.9, 0.7)))]
    md = tune_markdown({'task': 'pick_either', 'episodes': 50, 'training_seeds': [0, 1, 2],
                        'teacher': row(0.95, 0.9), 'consistency': cd, 'rows': rows,
                        'best': 'wide'})
    assert '| *consistency* | (reference) | 0.90 [0.80, 1.00] | 0.80 [0.70, 0.90] | 40% | | |' \
        in md
    assert '| wide | (defaults) | 0.90 [0.80, 1.00] | 0.90 [0.70, 0.90] | 40% | met | yes |' in md
    assert '| narrow | (defaults) | 0.90 [0.80, 1.00] | 0.70 [0.70, 0.90] | 40% | met | no |' \
        in md
    # with the difference's interval (as `vdd-ros tune` writes it) in brackets
    rows[1]['versus_consistency'].update(entropy_difference=-0.1, difference_ci=[-0.2, 0.01])
    md = tune_markdown({'task': 'pick_either', 'episodes': 50, 'training_seeds': [0, 1, 2],
                        'teacher': row(0.95, 0.9), 'consistency': cd, 'rows': rows,
                        'best': 'wide'})
    assert '| 40% | met | no (entropy -0.100 [-0.200, +0.010]) |' in md


def test_each_candidates_file_is_a_study_with_its_own_report(tmp_path, capsys):
    from vdd_ros.pipeline.tune import TuneConfig, build_tune_stages, report_files
    assert report_files('tune') == ('tune/report', ['tune/tune.json', 'tune/tune.md',
                                                    'tune/candidates.png'])
    cfg = load_pipeline_config('carry_four', None, {})
    ctx = Context('carry_four', Path('/nonexistent'), cfg, cfg.train_config())
    report = build_tune_stages(ctx, TuneConfig({'default': {}}), 'tune_modes')[-1]
    assert report.name == 'tune/tune_modes_report'
    assert report.outputs == ['tune/tune_modes.json', 'tune/tune_modes.md', 'tune/tune_modes.png']
    bad = tmp_path / 'my study.yaml'
    bad.write_text(yaml.safe_dump({'candidates': {'default': {}}}))
    assert main(['tune', '--task', 'carry_four', '--candidates', str(bad), '--results',
                 str(tmp_path / 'results')]) == 2
    assert "my study.yaml: the file name names the study" in capsys.readouterr().err
    assert not (tmp_path / 'results').exists()


@pytest.mark.parametrize('name', ['tune.yaml', 'tune_modes.yaml'])
def test_the_shipped_candidate_files_are_valid_studies_of_distinct_settings(name):
    from vdd_ros.pipeline.tune import load_tune_config
    tune = load_tune_config(Path(__file__).resolve().parents[1] / 'config' / name)
    assert tune.candidates['default'] == {}
    settings = [tuple(sorted(c.items())) for c in tune.candidates.values()]
    assert len(set(settings)) == len(settings) >= 2


def test_the_annealing_study_pins_its_candidates_and_one_of_them_is_the_default():
    import copy

    from vdd_ros.core.config import TrainConfig, apply_overrides, to_dict
    from vdd_ros.pipeline.tune import load_tune_config
    tune = load_tune_config(Path(__file__).resolve().parents[1] / 'config' / 'tune_anneal.yaml')
    defaults = to_dict(TrainConfig())
    applied = {name: apply_overrides(copy.deepcopy(defaults), overrides)
               for name, overrides in tune.candidates.items()}
    assert [n for n, d in applied.items() if d == defaults] == ['anneal_0_001_sharp']
    assert applied['floor_0_05']['vdd']['init_em_final_min_std'] is None
    # every candidate names both floors, so a later change of the defaults keeps its meaning
    assert all({'vdd.init_em_final_min_std', 'vdd.min_std'} <= set(c)
               for c in tune.candidates.values())


def test_the_samples_study_differs_from_the_default_in_v_alone():
    import copy

    from vdd_ros.core.config import TrainConfig, apply_overrides, to_dict
    from vdd_ros.pipeline.tune import load_tune_config
    tune = load_tune_config(Path(__file__).resolve().parents[1] / 'config' / 'tune_samples.yaml')
    defaults = to_dict(TrainConfig())
    applied = {name: apply_overrides(copy.deepcopy(defaults), overrides)
               for name, overrides in tune.candidates.items()}
    assert applied['anneal_0_001_sharp'] == defaults
    four = applied['samples_4_anneal']
    assert four['vdd'].pop('samples_per_expert') == 4 != defaults['vdd'].pop('samples_per_expert')
    assert four == defaults
    assert all({'vdd.init_em_final_min_std', 'vdd.min_std'} <= set(c)
               for c in tune.candidates.values())


def test_an_unset_optional_setting_keys_no_stage_and_a_set_one_does():
    from vdd_ros.core.config import TrainConfig
    from vdd_ros.pipeline.runner import stage_key
    from vdd_ros.pipeline.stages import train_settings
    kind = POLICY_KINDS['vdd_moe']
    cfg = TrainConfig()
    cfg.vdd.min_std = None
    unset = train_settings(cfg, kind)
    assert 'min_std' not in unset['vdd'] and unset['moe']['min_std'] == 0.05
    cfg.vdd.min_std = 0.001
    floored = train_settings(cfg, kind)
    assert floored['vdd']['min_std'] == 0.001
    assert stage_key(unset, {}) != stage_key(floored, {})
