"""`vdd-ros pipeline` end to end at a tiny size: artefacts, caching, resume, --from, errors."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vdd_ros import pipeline
from vdd_ros.policies import POLICY_KINDS
from vdd_ros.cli import main
from vdd_ros.core.config import TrainConfig
from vdd_ros.errors import ConfigError, UserError
from vdd_ros.pipeline import stages as pipeline_stages
from vdd_ros.policies import EVALUATIONS

PNG = b'\x89PNG\r\n\x1a\n'
STAGES = ['collect', *(f'seed_0/{k}' for k in POLICY_KINDS),
          *(f'seed_0/eval_{e}' for e in EVALUATIONS), 'seed_0/latency', 'video', 'report']
TINY = {
    'demos': 4, 'collect_workers': 1, 'eval_episodes': 2, 'eval_workers': 1,
    'latency_queries': 20,
    'train': {'teacher.iterations': 30, 'teacher.hidden_dim': 32, 'teacher.num_layers': 2,
              'teacher.batch_size': 32, 'moe.hidden_dim': 32, 'moe.num_layers': 2,
              'moe.num_experts': 2, 'vdd.iterations': 10, 'vdd.batch_size': 16,
              'gaussian_bc.iterations': 10, 'em_moe.iterations': 10,
              'consistency.iterations': 10, 'consistency.batch_size': 16},
}


def _config(tmp_path: Path, defaults: dict | None = None) -> Path:
    path = tmp_path / 'pipeline.yaml'
    path.write_text(yaml.safe_dump({'defaults': TINY if defaults is None else defaults,
                                    'tasks': {'lift_carry': {}}}))
    return path


def _run(config: Path, results: Path, *extra: str) -> int:
    return main(['pipeline', '--task', 'lift_carry', '--config', str(config), '--results',
                 str(results), '--quiet', *extra])


def _decisions(text: str) -> dict[str, str]:
    """Stage -> 'run' or 'skip' from the pipeline's banners."""
    return dict(re.findall(r'^== \[\d+/\d+\] ([\w/]+): .* -- (run|skip) ', text, re.M))


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob('*') if p.is_file()}


def _markers(folder: Path) -> set[str]:
    """The names of the stages whose markers exist."""
    return {str(p.relative_to(folder / 'stages').with_suffix(''))
            for p in (folder / 'stages').rglob('*.json')}


def _check_artefacts(folder: Path) -> None:
    from PIL import Image

    from vdd_ros.core.checkpoint import load_policy, read_training
    from vdd_ros.core.data import load_dataset
    assert len(load_dataset(folder / 'demos.hdf5').demos) == 4
    for name in POLICY_KINDS:
        policy = load_policy(folder / 'seed_0' / name)
        assert policy.spec.task == 'lift_carry'
        assert 'loss_history' not in policy.meta['metrics'], name   # in curves.json
        training = read_training(folder / 'seed_0' / name)
        assert training['loss_history'] and training['iterations'] > 0, name
    metrics = json.loads((folder / 'metrics.json').read_text())
    assert list(metrics['policies']) == ['teacher', 'teacher_4step', 'teacher_2step',
                                         'teacher_1step', 'vdd_moe', 'consistency',
                                         'gaussian_bc', 'em_moe']
    assert metrics['training_seeds'] == [0] and list(metrics['training']) == list(POLICY_KINDS)
    # every policy timed in the latency stage, in turn: eight denoiser passes cost more than one
    latency = json.loads((folder / 'seed_0' / 'latency.json').read_text())
    assert latency['queries'] == 20 and list(latency['policies']) == list(metrics['policies'])
    assert latency['policies']['teacher']['query_ms_p50'] > \
        latency['policies']['teacher_1step']['query_ms_p50']
    for name, m in metrics['policies'].items():
        for key in ('success_rate', 'mode_entropy', 'latency_ms_p50', 'query_ms_p50',
                    'mode_counts', 'episodes'):
            assert key in m, (name, key)
        assert m['episodes'] == 2 and m['query_ms_p50'] > 0 and m['seeds'] == 1
        assert m['query_ms_p50'] == latency['policies'][name]['query_ms_p50'], name
        lo, hi = m['success_ci']
        assert 0 <= lo <= m['success_rate'] <= hi <= 1
        detail = json.loads((folder / 'seed_0' / 'eval' / f'{name}.json').read_text())[
            'episodes_detail']
        assert [d['seed'] for d in detail] == [1_000_000, 1_000_001]
    assert metrics['policies']['teacher']['sampling_steps'] == TrainConfig().teacher.sampling_steps
    for name, steps in (('teacher_4step', 4), ('teacher_2step', 2), ('teacher_1step', 1),
                        ('consistency', 1)):
        assert metrics['policies'][name]['sampling_steps'] == steps, name
    vdd = metrics['policies']['vdd_moe']
    assert vdd['via_ros'] and 0 < vdd['obs_to_action_ms_p50'] <= vdd['obs_to_action_ms_p99']
    assert {t['name'] for t in metrics['targets']} == {
        'success_vs_teacher', 'success_floor', 'mode_entropy', 'latency'}
    assert list(metrics['stages']) == STAGES[:-1]
    for plot in ('success_entropy', 'latency', 'latency_success', 'training_curves'):
        assert (folder / 'plots' / f'{plot}.png').read_bytes()[:8] == PNG
    with Image.open(folder / 'vdd_moe_modes.gif') as gif:
        assert gif.format == 'GIF' and gif.n_frames > 5
    report = (folder / 'report.md').read_text()
    assert '| policy | success [95% CI] |' in report and '| VDD-MoE (over ROS) |' in report
    assert f"({latency['queries']} timed queries per policy" in report
    assert f"timed in turn over {latency['rounds']} rounds" in report
    _check_report_tables(report, metrics)
    assert 'plots/training_curves.png' in report and 'vdd_moe_modes.gif' in report
    summary = (folder.parent / 'summary.md').read_text()
    assert '[lift_carry](lift_carry/report.md)' in summary
    # the comparison with consistency distillation carries the entropy difference's interval
    from vdd_ros.report import difference_text
    vs, p = metrics['versus_consistency'], metrics['policies']
    assert vs['entropy_difference'] == pytest.approx(
        p['vdd_moe']['mode_entropy'] - p['consistency']['mode_entropy'])
    assert vs['difference_ci'][0] <= vs['difference_ci'][1]
    assert difference_text(vs) in summary and difference_text(vs) in report
    assert not list(folder.rglob('.*tmp*')), 'temporary files left behind'


def _table(report: str, head: str) -> list[list[str]]:
    """The cells of each body row of the Markdown table whose header starts with `head`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip().strip('|').split('|')])
    return rows


def _check_report_tables(report: str, metrics: dict) -> None:
    """report.md shows the metrics it was built from: each policy's label, success, entropy and
    latency in its row, each target's value, requirement and status, where the targets follow
    from the policies' figures."""
    policies = metrics['policies']
    rows = _table(report, '| policy | success [95% CI] |')
    assert len(rows) == len(policies)
    for row, (name, m) in zip(rows, policies.items()):
        assert row[0].startswith(m.get('label', name)), (name, row)
        assert row[6].startswith(f"{m['query_ms_p50']:.3f} / "), row
        lo, hi = m['success_ci']
        assert row[1] == f"{m['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]", row
        assert row[2] == f"{m['successes']}/{m['episodes']}", row
        assert m['success_rate'] == pytest.approx(m['successes'] / m['episodes'])
        lo, hi = m['entropy_ci']
        assert row[4] == f"{m['mode_entropy']:.3f} [{lo:.3f}, {hi:.3f}]", row
    vdd, teacher = policies['vdd_moe'], policies['teacher']
    expected = {'success_vs_teacher': (vdd['success_rate'], teacher['success_rate'] - 0.05),
                'success_floor': (vdd['success_rate'], 0.85),
                'mode_entropy': (vdd['mode_entropy'], 0.85 * teacher['mode_entropy']),
                'latency': (teacher['query_ms_p50'] / vdd['query_ms_p50'], 8.0)}
    rows = _table(report, '| target | value |')
    assert len(rows) == len(metrics['targets']) + 2     # and the two cross-task rows
    for row, t in zip(rows, metrics['targets']):
        assert (t['value'], t['required']) == pytest.approx(expected[t['name']]), t
        assert t['met'] == (t['value'] >= t['required'] - 1e-12)
        assert row[0] == t['description']
        assert row[1].startswith(f"{t['value']:.3f}") and row[2].startswith(
            f">= {t['required']:.3f}"), row
        assert row[3] == ('met' if t['met'] else 'MISSED'), row
    verdict = 'all per-task targets met' if all(t['met'] for t in metrics['targets']) \
        else 'some per-task targets MISSED'
    assert f'**{verdict}**' in report


def test_pipeline_end_to_end_and_resumed(tmp_path, capsys, monkeypatch):
    config, results = _config(tmp_path), tmp_path / 'results'
    folder = results / 'lift_carry'

    # 1. A run killed (SIGKILL) once the teacher is done: the next run skips what finished.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, '-m', 'vdd_ros.cli', 'pipeline', '--task',
                             'lift_carry', '--config', str(config), '--results', str(results),
                             '--quiet'], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (folder / 'stages' / 'seed_0' / 'teacher.json').exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    finished = _markers(folder)
    assert {'collect', 'seed_0/teacher'} <= finished and 'report' not in finished

    # 2. A run interrupted during the Gaussian BC evaluation, after a partial output.
    real_evaluate = pipeline_stages._evaluate

    def killed(policy, ctx, **kwargs):
        if policy == 'gaussian_bc':
            ctx.path('seed_0/eval/gaussian_bc.json').write_text('{"partial": ')
            raise KeyboardInterrupt
        return real_evaluate(policy, ctx, **kwargs)
    monkeypatch.setattr(pipeline_stages, '_evaluate', killed)
    assert _run(config, results) == 130
    out = capsys.readouterr().out
    done = STAGES[:STAGES.index('seed_0/eval_gaussian_bc')]
    assert _decisions(out) == {s: 'skip' if s in finished else 'run'
                               for s in done + ['seed_0/eval_gaussian_bc']}
    assert 'rerun to resume' in out
    assert _markers(folder) == set(done)
    monkeypatch.setattr(pipeline_stages, '_evaluate', real_evaluate)

    # 3. The rerun resumes at the interrupted stage and finishes; exit 1: targets missed.
    before = _mtimes(folder)
    assert _run(config, results) == 1
    out = capsys.readouterr().out
    assert _decisions(out) == {s: 'skip' if s in done else 'run' for s in STAGES}
    after = _mtimes(folder)
    for path in ('demos.hdf5', 'seed_0/teacher/model.safetensors',
                 'seed_0/vdd_moe/model.safetensors', 'seed_0/eval/teacher.json',
                 'seed_0/eval/vdd_moe.json', 'stages/seed_0/teacher.json'):
        assert after[path] == before[path], path
    assert 'MISSED' in out and 'VDD-MoE (over ROS)' in out
    _check_artefacts(folder)

    # 4. Everything cached: nothing reruns, no file changes except summary.md.
    before = _mtimes(folder)
    assert _run(config, results) == 1
    assert set(_decisions(capsys.readouterr().out).values()) == {'skip'}
    assert _mtimes(folder) == before

    # (a study's marker in the folder, as `vdd-ros tune` leaves: the report's stage list in
    #  _check_artefacts below must leave it out)
    marker = json.loads((folder / 'stages' / 'seed_0' / 'vdd_moe.json').read_text())
    (folder / 'stages' / 'tune' / 'default').mkdir(parents=True)
    (folder / 'stages' / 'tune' / 'default' / 'vdd_moe.json').write_text(
        json.dumps({**marker, 'stage': 'tune/default/vdd_moe'}))

    # 5. A changed training setting reruns that model and what reads it, nothing else.
    assert _run(config, results, '--set', 'train.em_moe.iterations=12') == 1
    ran = {s for s, d in _decisions(capsys.readouterr().out).items() if d == 'run'}
    assert ran == {'seed_0/em_moe', 'seed_0/eval_em_moe', 'seed_0/latency', 'report'}
    assert json.loads((folder / 'stages' / 'seed_0' / 'em_moe.json').read_text())['info'][
        'iterations'] == 12

    # 6. A lost output reruns its stage; --from reruns a stage and its dependants.
    (folder / 'vdd_moe_modes.gif').unlink()
    assert _run(config, results, '--from', 'gaussian_bc', '--set',
                'train.em_moe.iterations=12') == 1
    decisions = _decisions(capsys.readouterr().out)
    assert {s for s, d in decisions.items() if d == 'run'} == {
        'seed_0/gaussian_bc', 'seed_0/eval_gaussian_bc', 'seed_0/latency', 'video', 'report'}
    assert (folder / 'vdd_moe_modes.gif').is_file()
    _check_artefacts(folder)       # (--force: test_pipeline_dataset, on a shorter horizon)

    # `vdd-ros report` redraws from metrics.json and writes the cross-task summary.
    (folder / 'report.md').unlink()
    assert main(['report', '--results', str(results), '--all']) == 0
    assert (folder / 'report.md').is_file()
    assert 'pending' in (results / 'summary.md').read_text()
    assert 'every baseline on >= 3 of 4 tasks: pending' in capsys.readouterr().out


def test_a_bad_config_field_is_one_clear_error(tmp_path, capsys):
    results = tmp_path / 'results'
    config = _config(tmp_path, dict(TINY, eval_episodes=0))
    assert _run(config, results) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f'vdd-ros pipeline: error: {config} [lift_carry]: eval_episodes: '
                   f'must be >= 1, got 0')
    assert _run(_config(tmp_path), results, '--set', 'train.teacher.iterations=many') == 2
    assert "train.teacher.iterations: expected an integer, got 'many'" in \
        capsys.readouterr().err
    assert _run(_config(tmp_path), results, '--set', 'demo=3') == 2
    assert 'demo: unknown key' in capsys.readouterr().err
    assert _run(_config(tmp_path), results, '--from', 'nothing') == 2
    assert "unknown stage 'nothing'" in capsys.readouterr().err
    assert not results.exists() or not any(results.rglob('*.json'))


def test_shipped_config_is_valid_for_every_task():
    from vdd_ros.sim.tasks import TASKS
    for task in TASKS:
        cfg = pipeline.load_pipeline_config(task)
        assert cfg.eval_episodes >= 50
        assert cfg.train_config().teacher.iterations == cfg.train['teacher.iterations']


def test_state_tasks_share_one_training_configuration():
    from vdd_ros.sim.tasks import TASKS
    base = pipeline.load_pipeline_config('lift_carry')
    for task, spec in TASKS.items():
        cfg = pipeline.load_pipeline_config(task)
        assert cfg.train == base.train, task
        if not spec.cameras:
            assert cfg.policies is None, task
        else:   # a camera task trains the policies its figures need
            assert cfg.policies and set(cfg.policies) < set(POLICY_KINDS)


def test_task_sections_merge_over_the_defaults(tmp_path):
    path = tmp_path / 'p.yaml'
    path.write_text(yaml.safe_dump({
        'defaults': {'demos': 10, 'train': {'teacher.iterations': 5, 'vdd.iterations': 7}},
        'tasks': {'pick_either': {'demos': 20, 'train': {'teacher': {'iterations': 9}}}}}))
    cfg = pipeline.load_pipeline_config('pick_either', path, {'train.vdd.lr': 0.01})
    assert cfg.demos == 20
    assert cfg.train == {'teacher.iterations': 9, 'vdd.iterations': 7, 'vdd.lr': 0.01}
    assert pipeline.load_pipeline_config('lift_carry', path).demos == 10
    path.write_text(yaml.safe_dump({'tasks': {'fly': {}}}))
    with pytest.raises(ConfigError, match=r'tasks\.fly: unknown task'):
        pipeline.load_pipeline_config('lift_carry', path)


def test_cross_task_target_and_mode_episode_picks():
    from vdd_ros.report import consistency_status, cross_task_status
    win, lose = {'beats_baselines': True}, {'beats_baselines': False}
    assert cross_task_status({'a': win}) == 'pending'
    assert cross_task_status({'a': win, 'b': win, 'c': win}) == 'met'
    assert cross_task_status({'a': lose, 'b': lose}) == 'MISSED'
    assert cross_task_status({'a': win, 'b': win, 'c': lose}) == 'pending'
    better, worse = {'versus_consistency': {'met': True}}, {'versus_consistency': {'met': False}}
    assert consistency_status({'a': better, 'b': better}) == 'pending'
    assert consistency_status({'a': better, 'b': better, 'c': better}) == 'met'
    assert consistency_status({'a': worse, 'b': worse, 'c': better}) == 'MISSED'
    detail = [{'seed': 1, 'success': False, 'mode': 'left'},
              {'seed': 2, 'success': True, 'mode': 'right'},
              {'seed': 3, 'success': True, 'mode': 'left'},
              {'seed': 4, 'success': False, 'mode': None}]
    assert pipeline.pick_mode_episodes(detail, ['left', 'right'], 2) == {
        'left': [(3, True), (1, False)], 'right': [(2, True)]}
    assert pipeline.pick_mode_episodes(detail[3:], ['left', 'right'], 1) == {
        'no mode': [(4, False)]}


def test_task_lock_and_stale_temporaries(tmp_path):
    lock = tmp_path / '.lock'
    holder = subprocess.Popen(     # a live run holds the folder
        [sys.executable, '-c', 'import sys, time; from pathlib import Path; '
         'from vdd_ros.pipeline import task_lock\n'
         'with task_lock(Path(sys.argv[1])):\n    print("held", flush=True); time.sleep(60)',
         str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(UserError, match=f'another pipeline run \\(process '
                           f'{holder.pid}\\)'):
            with pipeline.task_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with pipeline.task_lock(tmp_path):   # the killed holder's lock died with it
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()
    lock.write_text('999999999')          # a file left behind by a killed run holds nothing
    with pipeline.task_lock(tmp_path):
        assert lock.read_text() == str(os.getpid())
    (tmp_path / '.demos.hdf5.tmp123').write_text('x')
    (tmp_path / 'teacher' / '.x.tmp-5').mkdir(parents=True)
    (tmp_path / '.vdd_moe.old-7').mkdir()
    (tmp_path / 'keep.json').write_text('{}')
    assert len(pipeline.remove_stale_temporaries(tmp_path)) == 3
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == [
        'keep.json', 'teacher']


def _contend(folder: str, rounds: int, first: bool, barrier, counts) -> None:
    """One contender: each round, try the lock at once with the others; inside, claim a
    marker that only one holder at a time can create. Between rounds the first contender
    leaves a lock file as a killed run would (naming a dead process)."""
    marker = Path(folder) / 'holder'
    acquired = overlaps = 0
    for _ in range(rounds):
        barrier.wait()
        try:
            with pipeline.task_lock(Path(folder)):
                acquired += 1
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    overlaps += 1
                else:
                    time.sleep(0.01)
                    marker.unlink()
        except UserError:
            pass
        barrier.wait()
        if first:
            (Path(folder) / '.lock').write_text('999999999')
    with counts.get_lock():
        counts[0] += acquired
        counts[1] += overlaps


def test_contending_runs_never_hold_the_task_lock_together(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context('fork')
    contenders, rounds = 3, 150
    barrier, counts = ctx.Barrier(contenders), ctx.Array('i', 2)
    (tmp_path / '.lock').write_text('999999999')   # left by a killed run
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), rounds, i == 0, barrier, counts))
             for i in range(contenders)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * contenders
    acquired, overlaps = counts[0], counts[1]
    print(f'{contenders} contenders x {rounds} rounds: {acquired} acquisitions, '
          f'{overlaps} overlaps')
    assert overlaps == 0
    assert rounds <= acquired < contenders * rounds   # at least one per round, never all
